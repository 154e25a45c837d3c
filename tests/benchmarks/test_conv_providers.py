"""The conv benchmark measures what it says: a provider that forces a backend gets it for the
backward too (autograd picks the backward ops' backend when they run, outside the forward call)."""

from __future__ import annotations

import pytest
import torch

from aqcf_kernels import backends
from benchmarks.conv import MODES, Case, Provider, make_inputs, make_step


@pytest.mark.parametrize("mode", MODES)
def test_forced_backend_serves_every_op_of_the_step(mode, monkeypatch):
    forced = backends.registered()["torch"]  # on CPU, auto would pick cpp
    calls = []
    for method in ("conv", "conv_weight_grad"):
        original = getattr(forced, method)

        def spy(*args, _original=original, _method=method, **kwargs):
            calls.append(_method)
            return _original(*args, **kwargs)

        monkeypatch.setattr(forced, method, spy)
    case = Case(dims=2, channels=4, size=6, batch=2)
    provider = Provider("torch/hamilton", algorithm="hamilton", backend="torch")
    inputs = make_inputs(case, torch.float32)
    step = make_step(mode, provider.build(case), inputs, provider.scope)
    calls.clear()  # the bwd step runs its forward when built
    step()
    # fwd: one conv; bwd: input grad (a conv) and weight grad; fwdbwd: all three
    expected = {"fwd": ["conv"], "bwd": ["conv", "conv_weight_grad"], "fwdbwd": ["conv", "conv", "conv_weight_grad"]}
    assert sorted(calls) == expected[mode]
