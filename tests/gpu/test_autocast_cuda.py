"""CUDA autocast over the quaternion layers and A-QCF-Net (aqcf_kernels/ops/autocast.py; the CPU side
is tests/nn/test_autocast.py): what ``aqcf-train`` runs on a GPU with ``train.amp`` (bf16 autocast)."""

from __future__ import annotations

import pytest
import torch

from aqcf_kernels import reference
from aqcf_kernels.models import AQCFNet
from aqcf_kernels.nn import QuaternionConv2d

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
# a bf16/fp16 result against float64 on the same rounded operands (see tests/nn/test_autocast.py)
TOLERANCE = 2e-2


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    return ((out - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("algorithm", ["auto", "hamilton", "fast8"])
def test_conv_runs_in_the_autocast_dtype(dtype, algorithm, qrand):
    conv = QuaternionConv2d(32, 32, 3, padding=1, algorithm=algorithm, device="cuda")
    x = qrand(2, 32, 17, 15, seed=1, dtype=torch.float32).cuda().requires_grad_()
    with torch.autocast("cuda", dtype=dtype):
        y = conv(x)
    assert y.dtype == dtype
    g = qrand(*y.shape, seed=2, dtype=dtype).cuda()
    y.backward(g)
    assert conv.weight.grad.dtype == torch.float32
    xr, wr, br = (t.detach().to(dtype).double().cpu().requires_grad_() for t in (x, conv.weight, conv.bias))
    ref = reference.quaternion_conv_naive(xr, wr, br, padding=1)
    ref.backward(g.double().cpu())
    assert rel(y, ref) < TOLERANCE
    assert rel(conv.weight.grad, wr.grad) < TOLERANCE
    assert rel(x.grad, xr.grad) < TOLERANCE


def test_aqcfnet_trains_under_cuda_autocast():
    torch.manual_seed(0)
    model = AQCFNet(2, features=(8, 16), bottleneck=32, heads=2, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(1)
    ct = torch.randn(2, 1, 48, 40, device="cuda", generator=g)
    mri = torch.randn(2, 1, 48, 40, device="cuda", generator=g)
    expected = sum(v.square().mean() for v in model(ct, mri).values())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(ct, mri)
        loss = sum(v.float().square().mean() for v in out.values())
    assert all(v.dtype == torch.bfloat16 for v in out.values())
    assert abs(loss.item() - expected.item()) < TOLERANCE * expected.item()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == p.dtype and torch.isfinite(p.grad).all(), name
