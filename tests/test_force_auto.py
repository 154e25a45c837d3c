"""tests/_force_auto.py, the hunting aid that makes every 'auto' conv choice take one algorithm."""

from __future__ import annotations

import pytest
import torch
from _force_auto import force_auto

import aqcf_kernels.functional as QF


def test_the_force_auto_hunting_aid_serves_the_named_algorithm(cache, measured) -> None:
    """tests/_force_auto.py (``AQCF_TEST_FORCE_AUTO``): inside it an 'auto' conv is the named algorithm's, bit for
    bit, with nothing measured or remembered; outside it 'auto' measures again; another name is refused."""
    g = torch.Generator().manual_seed(0)
    x, b = torch.randn(2, 32, 9, 7, generator=g), torch.randn(32, generator=g)
    w = 0.2 * torch.randn(4, 8, 8, 3, 3, generator=g)
    by = {a: QF.quaternion_conv2d(x, w, b, padding=1, algorithm=a) for a in ("hamilton", "fast8")}
    assert not torch.equal(by["hamilton"], by["fast8"])  # (they round differently: the check tells them apart)
    for algorithm in ("fast8", "hamilton", "fast8"):
        with force_auto(algorithm):
            for _ in range(2):  # (the second call: not served by a choice the extension remembered)
                assert torch.equal(QF.quaternion_conv2d(x, w, b, padding=1), by[algorithm]), algorithm
    assert measured == [] and not cache.exists()
    QF.quaternion_conv2d(x, w, b, padding=1)
    assert len(measured) == 1
    with pytest.raises(ValueError, match="AQCF_TEST_FORCE_AUTO must be one of hamilton, fast8, not 'fastest'"):
        with force_auto("fastest"):
            pass
