"""``torch.autocast`` over the quaternion layers, as over torch.nn's (aqcf_kernels/ops/autocast.py).

Under CPU autocast (bfloat16; CUDA's is tests/gpu) a conv, a linear layer, the A-QCF block and the whole
A-QCF-Net take float32 parameters and inputs and run in bfloat16, as ``nn.Conv2d`` and SDPA do; each
result is held against the float64 reference computed from the same bf16-rounded operands, every
parameter gradient arrives in the parameter's dtype. Before, a conv under autocast failed inside the
backends (mixed dtypes) and a bf16 feature map met a float32 weight in the argument checks.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import aqcf_kernels
from aqcf_kernels import reference, tuning
from aqcf_kernels.backends._extension import _C
from aqcf_kernels.models import AQCFNet
from aqcf_kernels.nn import AQCFBlock, QuaternionConv2d, QuaternionConvTranspose2d, QuaternionLinear

BF16 = torch.bfloat16
# The accuracy contract's half-precision bound: a bf16 result against float64 on the same operands.
# bf16 has 8 mantissa bits (unit roundoff 2^-8 ≈ 4e-3): a sum of ~100 rounded products stays well inside.
TOLERANCE = 2e-2


def autocast():
    return torch.autocast("cpu", dtype=BF16)


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    return ((out - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("algorithm", ["auto", "hamilton", "fast8"])
@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda a: QuaternionConv2d(16, 12, 3, padding=1, bias=True, algorithm=a), (2, 16, 7, 6)),
        (lambda a: QuaternionConvTranspose2d(16, 12, 3, stride=2, output_padding=1, algorithm=a), (2, 16, 4, 5)),
        (lambda a: QuaternionLinear(16, 12, algorithm=a), (5, 16)),
    ],
)
def test_layer_runs_in_the_autocast_dtype(make, shape, algorithm, qrand):
    torch.manual_seed(0)
    layer = make(algorithm)
    with torch.no_grad():
        layer.bias.copy_(qrand(*layer.bias.shape, dim=0, seed=3))
    x = qrand(*shape, dim=-1 if len(shape) == 2 else 1, seed=1, dtype=torch.float32, requires_grad=True)
    with autocast():
        y = layer(x)
    assert y.dtype == BF16  # as nn.Conv2d / nn.Linear under autocast
    g = qrand(*y.shape, dim=-1 if len(shape) == 2 else 1, seed=2, dtype=BF16)
    y.backward(g)
    assert layer.weight.grad.dtype == torch.float32 and layer.bias.grad.dtype == torch.float32
    assert x.grad.dtype == torch.float32

    # the float64 reference on the operands autocast used (x, W and b rounded to bf16)
    xr, wr, br = (t.detach().to(BF16).double().requires_grad_() for t in (x, layer.weight, layer.bias))
    if isinstance(layer, QuaternionLinear):
        ref = reference.quaternion_conv_naive(xr.t().unsqueeze(0), wr.unsqueeze(-1), br).squeeze(0).t()
    else:
        geometry = dict(stride=layer.stride, padding=layer.padding, transposed=layer._transposed)
        if layer._transposed:
            geometry["output_padding"] = layer.output_padding
        ref = reference.quaternion_conv_naive(xr, wr, br, **geometry)
    ref.backward(g.double())
    assert rel(y, ref) < TOLERANCE
    assert rel(x.grad, xr.grad) < TOLERANCE
    assert rel(layer.weight.grad, wr.grad) < TOLERANCE
    assert rel(layer.bias.grad, br.grad) < TOLERANCE


def test_float64_is_left_alone_as_autocast_leaves_it(qrand):
    conv = QuaternionConv2d(8, 8, 3, dtype=torch.float64)
    with autocast():
        assert conv(qrand(2, 8, 5, 5)).dtype == torch.float64
        assert nn.Conv2d(8, 8, 3, dtype=torch.float64)(qrand(2, 8, 5, 5)).dtype == torch.float64


def test_autocast_off_inside_keeps_mismatched_dtypes_an_error(qrand):
    conv = QuaternionConv2d(8, 8, 3)
    x = qrand(2, 8, 5, 5, dtype=BF16)
    with pytest.raises(TypeError, match="weight dtype torch.float32 does not match input dtype torch.bfloat16"):
        conv(x)
    with autocast(), torch.autocast("cpu", enabled=False):
        with pytest.raises(TypeError, match="does not match input dtype"):
            conv(x)


def test_aqcf_block_under_autocast(qrand):
    torch.manual_seed(0)
    block = AQCFBlock(16, heads=2)
    with torch.no_grad():
        block.alpha_a.fill_(0.7)
        block.alpha_b.fill_(-1.3)
    f_a, f_b = qrand(2, 16, 6, 5, seed=1), qrand(2, 16, 4, 4, seed=2)
    expected = block.double()(f_a, f_b)
    block.float()
    with autocast():
        out = block(f_a.float(), f_b.float())
    assert all(o.dtype == BF16 for o in out)
    assert all(rel(o, e) < 5 * TOLERANCE for o, e in zip(out, expected, strict=True))  # a chain of bf16 ops
    sum(o.float().square().sum() for o in out).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in block.parameters())


def test_aqcfnet_trains_under_autocast():
    # aqcf-train's bf16 autocast (on CUDA; CPU autocast takes the same dispatch path): a training step
    torch.manual_seed(0)
    model = AQCFNet(2, features=(8, 16), bottleneck=32, heads=2)
    g = torch.Generator().manual_seed(1)
    ct, mri = torch.randn(2, 1, 24, 20, generator=g), torch.randn(2, 1, 24, 20, generator=g)
    expected = sum(v.square().mean() for v in model(ct, mri).values())
    with autocast():
        out = model(ct, mri)
        loss = sum(v.float().square().mean() for v in out.values())
    assert all(v.dtype == BF16 for v in out.values())
    assert abs(loss.item() - expected.item()) < TOLERANCE * expected.item()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == p.dtype and torch.isfinite(p.grad).all(), name


def test_the_autocast_kernels_are_registered_for_cpu_and_cuda():
    for op in ("qconv", "cross_attention", "gated_residual"):
        dump = torch._C._dispatch_dump(f"aqcf::{op}")
        for key in ("AutocastCPU", "AutocastCUDA"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"aqcf::{op}", key), (op, key)
            # the extension's own (csrc/cpu/autocast.h) where it defines the op, else Python's
            (line,) = [line for line in dump.splitlines() if line.startswith(f"{key}:")]
            assert ("csrc/cpu/" in line) == (_C is not None), line


def _aqcf_python_frames(fn) -> list[str]:
    """The package's Python functions entered while ``fn()`` runs."""
    package = str(Path(aqcf_kernels.__file__).parent)
    entered = []

    def profile(frame, event, arg):
        if event == "call" and frame.f_code.co_filename.startswith(package):
            entered.append(f"{Path(frame.f_code.co_filename).name}:{frame.f_code.co_name}")

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return entered


@pytest.mark.skipif(_C is None, reason="aqcf_kernels._C is not built")
@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")],
        ),
    ],
)
def test_remembered_calls_under_autocast_run_no_python(monkeypatch, qrand, device):
    """Once a signature is remembered, a conv, the attention and the gate under autocast run the extension's
    autocast kernels and op kernels only: no function of the package is entered (the training step's ops on
    CUDA run under bf16 autocast)."""

    def rand(*shape, seed, dim=1):
        return qrand(*shape, dim=dim, seed=seed, dtype=torch.float32).to(device)

    x, w, b = rand(2, 16, 7, 6, seed=1), rand(4, 3, 4, 1, 1, seed=2), rand(12, dim=0, seed=3)
    q = [rand(2, 2, 5, 8, dim=-1, seed=4 + i) for i in range(6)]
    f, alpha = rand(2, 8, 5, seed=10), torch.tensor(0.3, device=device)
    calls = {
        "qconv": lambda: torch.ops.aqcf.qconv(x, w, b, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, "hamilton"),
        "cross_attention": lambda: torch.ops.aqcf.cross_attention(*q, 0.35),
        "gated_residual": lambda: torch.ops.aqcf.gated_residual(f, f, f, alpha),
    }
    # conv: the cpp backend (CPU) or the cuda backend (CUDA), served natively once remembered
    monkeypatch.delenv("AQCF_BACKEND", raising=False)
    with torch.autocast(device, dtype=BF16), torch.no_grad():
        for name, call in calls.items():
            assert _aqcf_python_frames(call), f"{name}: the first call is resolved in Python"
            out = call()
            # A measured choice ('auto': the bf16 attention's route on CPU) is remembered once final; on a busy
            # machine a close first measurement is refined over later calls.
            for _ in range(tuning.max_provisional_calls(2)):
                if not tuning.provisional():
                    break
                out = call()
            assert (out[0] if isinstance(out, tuple) else out).dtype == BF16, name
            assert _aqcf_python_frames(call) == [], name


def test_compiled_conv_under_autocast_matches_eager(qrand):
    torch._dynamo.reset()
    conv = QuaternionConv2d(8, 8, 3, padding=1)
    x = qrand(2, 8, 6, 6, seed=4, dtype=torch.float32, requires_grad=True)

    def loss(x):
        return conv(x).float().square().sum()

    compiled = torch.compile(loss, fullgraph=True)
    with autocast():
        eager, got = loss(x), compiled(x)
    assert abs(got.item() - eager.item()) <= 1e-5 * abs(eager.item())
    got.backward()
    assert conv.weight.grad.dtype == torch.float32 and torch.isfinite(conv.weight.grad).all()


@pytest.mark.skipif(_C is None, reason="without the extension the whole suite tests the Python kernels")
def test_the_python_autocast_kernels_pass_these_tests(without_extension):
    """``AQCF_NO_EXTENSION=1``: the ops and their autocast kernels as Python defines them, through this file."""
    without_extension(__file__)
