"""The ONNX lowering's grouped convs under ``torch.export`` with dynamic sizes, on any torch the package supports.

Self-contained (torch and the package only, no conftest needed): ``tools/check_cuda.sh`` also runs it against
the lent GPU machines' torch (2.11), whose export refused the eager layers' channel reorder on 1-d inputs of
dynamic length; this project's CPU torch (2.13) never did.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor
from torch.export import Dim

from aqcf_kernels import nn as qnn
from aqcf_kernels.pipeline import export as ex

#: fp32: the lowered conv folds the weight (re-associated sums, ~1e-7 relative)
RTOL, ATOL = 1e-4, 1e-5


def _random_input(*shape: int, seed: int) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "make",
    [
        lambda: qnn.QuaternionConv1d(24, 16, 3, padding=1, groups=2),
        lambda: qnn.QuaternionConvTranspose1d(16, 32, 3, stride=2, padding=1, output_padding=1, groups=4),
        lambda: qnn.QuaternionConv2d(16, 16, 3, padding=1, groups=2),
        lambda: qnn.QuaternionConv1d(16, 24, 3, padding=1, groups=2, rotation=True),
        lambda: qnn.QuaternionConv1d(6, 12, 3, padding=1, groups=2, rotation=True, quaternion_format=False),
    ],
    ids=["conv1d-g2", "convT1d-g4", "conv2d-g2", "rotation1d-g2", "rotation1d-ijk-g2"],
)
def test_grouped_lowered_convs_match_eager_and_export_with_a_dynamic_length(make) -> None:
    """A grouped lowered conv reorders channels by index (``Gather``), not the eager layers' reshape → transpose
    → reshape, which torch 2.11's export (the GPU machines' torch) refuses on a 1-d input of dynamic length:
    the lowered copy matches the layer, exports with a dynamic batch and length, and keeps the index buffers
    out of its state dict."""
    conv = make().eval()
    with torch.no_grad():
        conv.bias.copy_(_random_input(*conv.bias.shape, seed=3))
    x = _random_input(2, conv.in_channels, *([9] * (conv.weight.dim() - 3)), seed=5)
    lowered = ex.lowered_for_onnx(conv)
    with torch.no_grad():
        torch.testing.assert_close(lowered(x), conv(x), rtol=RTOL, atol=ATOL)
    assert not any("group_major" in k or "blocked_out" in k for k in lowered.state_dict())
    dims = {0: Dim("batch", min=1), **{d: Dim(f"s{d}", min=4) for d in range(2, x.dim())}}
    program = torch.export.export(lowered, (x,), dynamic_shapes=(dims,))
    y = _random_input(3, conv.in_channels, *([7] * (x.dim() - 2)), seed=6)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(y), conv(y), rtol=RTOL, atol=ATOL)


def test_the_channel_orders_live_on_the_layers_device() -> None:
    """A layer lowered where it lives (e.g. on a GPU) gathers with indices on that device: here ``meta``."""
    for conv in (
        qnn.QuaternionConv1d(16, 16, 3, padding=1, groups=2),
        qnn.QuaternionConv1d(16, 24, 3, padding=1, groups=2, rotation=True),
    ):
        lowered = ex.lowered_for_onnx(conv.to("meta"))
        devices = {name: b.device.type for name, b in lowered.named_buffers()}
        assert devices and set(devices.values()) == {"meta"} and "group_major_in" in devices, devices
