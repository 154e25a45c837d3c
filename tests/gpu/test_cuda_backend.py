"""The ``cuda`` backend (aqcf_kernels._C.conv_aten / conv_weight_grad_aten: the extension's ATen host
code on CUDA tensors, cuDNN under at::convolution) against the reference, on a GPU.

Everything goes through the public functions with ``AQCF_BACKEND=cuda`` (forward, input gradient
= the adjoint conv, weight gradient), except the tests of the raw entry points. (The same host code
runs on CPU tensors in tests/conv/test_aten_path.py.)

Contract (see DESIGN.md): float64 gradcheck (+ gradgradcheck for hamilton), fp32 (tf32 off)
≤ 1e-5 (hamilton) / ≤ 5e-4 (fast8) relative to the float64 reference, fp16/bf16 ≤ 2x the error of
the expanded-weight conv in the same dtype.
"""

from __future__ import annotations

import zlib

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

from aqcf_kernels import functional as QF
from aqcf_kernels import reference
from aqcf_kernels.backends import registered

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
DEVICE = "cuda"
ALGORITHMS = ["hamilton", "fast8"]
FP32_TOL = {"hamilton": 1e-5, "fast8": 5e-4}


@pytest.fixture(autouse=True)
def force_cuda(monkeypatch):
    """AQCF_BACKEND=cuda, ieee fp32 everywhere (tf32 would be ~1e-3)."""
    backend = registered().get("cuda")
    if backend is None:
        pytest.fail("the cuda backend is not registered (aqcf_kernels/backends/cuda/__init__.py)")
    why = backend.unavailable()
    if why is not None:  # a GPU machine without the extension: a build bug
        pytest.fail(f"cuda backend unavailable on a machine with a GPU: {why}")
    monkeypatch.setenv("AQCF_BACKEND", "cuda")
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# (spatial, transposed, groups, stride, padding, dilation, output_padding, bias, cq_in, cq_out, size, kernel)
# Odd channel counts (partial K and N tiles), odd sizes, uneven per-dim hyper-parameters.
CASES = {
    "1d": (1, False, 1, 2, 1, 2, 0, True, 3, 5, (11,), (3,)),
    "1d-T": (1, True, 1, 3, 1, 1, 2, True, 2, 3, (5,), (3,)),
    "2d": (2, False, 1, 1, 1, 1, 0, True, 3, 5, (7, 6), (3, 3)),
    "2d-g2-s-d": (2, False, 2, (2, 1), (1, 0), (1, 2), 0, False, 4, 6, (9, 8), (3, 2)),
    "2d-T": (2, True, 1, 2, 1, 1, 1, True, 3, 2, (5, 4), (3, 3)),
    "2d-T-g2": (2, True, 2, (2, 3), (0, 1), (2, 1), (1, 2), False, 4, 6, (4, 5), (2, 3)),
    "3d": (3, False, 1, 1, (1, 0, 0), 1, 0, True, 2, 3, (4, 5, 3), (2, 3, 1)),
    "3d-T-g3": (3, True, 3, 2, 0, 1, 1, True, 3, 3, (3, 3, 2), (2, 2, 2)),
    # several tiles along every GEMM dim: > 64 pixels, > 64 (32) output channels, > 8 input channels
    "2d-multitile": (2, False, 1, 1, 1, 1, 0, True, 20, 70, (9, 11), (3, 3)),
    "2d-T-multitile": (2, True, 2, 2, 1, 1, 1, True, 24, 40, (5, 7), (3, 3)),
}


def _seed(*parts) -> int:
    return zlib.crc32("-".join(map(str, parts)).encode())


def _make(case, seed, n_batch=2):
    n, transposed, groups, *_, bias, cq_in, cq_out, size, kernel = CASES[case]
    g = torch.Generator().manual_seed(seed)
    shape_w = (4, cq_in, cq_out // groups, *kernel) if transposed else (4, cq_out, cq_in // groups, *kernel)
    x = torch.randn(n_batch, 4 * cq_in, *size, generator=g, dtype=torch.float64)
    w = torch.randn(*shape_w, generator=g, dtype=torch.float64) / (cq_in * len(kernel)) ** 0.5
    b = torch.randn(4 * cq_out, generator=g, dtype=torch.float64) if bias else None
    return x, w, b


def _kwargs(case):
    n, transposed, groups, stride, padding, dilation, output_padding, *_ = CASES[case]
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    if transposed:
        kw.update(transposed=True, output_padding=output_padding)
    return kw


def _grads(fn, case, x, w, b, gy_seed, memory_format=None):
    """[y, grad_x, grad_w, (grad_b)] of fn with a fixed random grad_output."""
    if memory_format is not None:
        x = x.contiguous(memory_format=memory_format)
    leaves = [t.detach().requires_grad_() for t in (x, w, b) if t is not None]
    xx, ww, *bb = leaves
    y = fn(xx, ww, bb[0] if bb else None, **_kwargs(case))
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(gy_seed), dtype=torch.float64)
    gy = gy.to(dtype=y.dtype, device=y.device)
    if memory_format is not None:
        gy = gy.contiguous(memory_format=memory_format)
    y.backward(gy)
    return [y.detach()] + [t.grad for t in leaves]


def _rel(out, ref) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert not out.isnan().any(), "NaN in the output"
    return ((out - ref).norm() / ref.norm()).item()


def _on(device, dtype, *ts):
    return [None if t is None else t.to(device=device, dtype=dtype) for t in ts]


def _ours(algorithm):
    def fn(x, w, b, **kw):
        return QF.quaternion_conv(x, w, b, algorithm=algorithm, **kw)

    return fn


NAMES = ["y", "grad_input", "grad_weight", "grad_bias"]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("case", list(CASES))
def test_fp32_matches_reference(case, algorithm):
    x, w, b = _make(case, _seed(case, algorithm))
    ref = _grads(reference.quaternion_conv_naive, case, x, w, b, gy_seed=1)
    got = _grads(_ours(algorithm), case, *_on(DEVICE, torch.float32, x, w, b), gy_seed=1)
    for name, o, r in zip(NAMES[: len(got)], got, ref, strict=True):
        assert o.dtype == torch.float32 and o.device.type == DEVICE
        assert _rel(o, r) <= FP32_TOL[algorithm], f"{name}: relative error {_rel(o, r):.2e}"


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("case", ["2d-g2-s-d", "2d-T-g2", "3d", "3d-T-g3", "2d-multitile"])
def test_fp32_channels_last(case, algorithm):
    """Strided (channels_last) input and grad_output."""
    x, w, b = _make(case, _seed(case, algorithm, "cl"))
    fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    ref = _grads(reference.quaternion_conv_naive, case, x, w, b, gy_seed=3)
    got = _grads(_ours(algorithm), case, *_on(DEVICE, torch.float32, x, w, b), gy_seed=3, memory_format=fmt)
    assert got[0].is_contiguous(memory_format=fmt), "the output keeps the input's memory format"
    for name, o, r in zip(NAMES[: len(got)], got, ref, strict=True):
        assert _rel(o, r) <= FP32_TOL[algorithm], f"{name}: relative error {_rel(o, r):.2e}"


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_fp32_non_contiguous_views(algorithm):
    """Input and weight as strided views (every other pixel, a transposed weight copy)."""
    case = "2d"
    x, w, b = _make(case, _seed("views", algorithm))
    wide = torch.randn(x.shape[0], x.shape[1], x.shape[2], 2 * x.shape[3], dtype=torch.float64)
    wide[..., ::2] = x
    xv = wide.to(DEVICE, torch.float32)[..., ::2]
    wv = w.to(DEVICE, torch.float32).transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not xv.is_contiguous() and not wv.is_contiguous()
    ref = reference.quaternion_conv_naive(x, w, b, **_kwargs(case))
    got = QF.quaternion_conv(xv, wv, b.to(DEVICE, torch.float32), algorithm=algorithm, **_kwargs(case))
    assert _rel(got, ref) <= FP32_TOL[algorithm]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_fp32_real_dominant(algorithm, qrand):
    """fast8's hardest regime: imaginary parts 100x smaller than the real part, per component."""
    case = "2d-g2-s-d"
    x = qrand(2, 16, 9, 8, seed=11, real_dominant=True)
    w = qrand(4, 6, 2, 3, 2, dim=0, seed=12, real_dominant=True)
    ref = reference.quaternion_conv_naive(x, w, None, **_kwargs(case))
    got = QF.quaternion_conv(*_on(DEVICE, torch.float32, x, w), None, algorithm=algorithm, **_kwargs(case))
    for c, (o, r) in enumerate(zip(got.chunk(4, 1), ref.chunk(4, 1), strict=True)):
        assert _rel(o, r) <= FP32_TOL[algorithm], f"component {'rijk'[c]}: {_rel(o, r):.2e}"


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_weight_grad_with_split_pixel_reduction(algorithm):
    """Many pixels, few channels, through the raw entry point."""
    g = torch.Generator().manual_seed(_seed("split", algorithm))
    x = torch.randn(4, 8, 65, 67, generator=g, dtype=torch.float64)
    w = torch.randn(4, 3, 2, 3, 3, generator=g, dtype=torch.float64)
    gy = torch.randn(4, 12, 65, 67, generator=g, dtype=torch.float64)
    x_, gy_, w_ = x.to(DEVICE), gy.to(DEVICE), w.to(DEVICE).requires_grad_()
    (ref,) = torch.autograd.grad(reference.quaternion_conv_naive(x_, w_, padding=1), w_, gy_)  # float64
    args = ([1, 1], [1, 1], [1, 1], False, [0, 0], 1, algorithm == "fast8")
    got = _raw().conv_weight_grad_aten(x_.float(), gy_.float(), list(w.shape), *args)
    assert got.dtype == torch.float32
    assert _rel(got, ref) <= FP32_TOL[algorithm]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("case", ["1d", "1d-T", "2d-g2-s-d", "2d-T", "3d", "3d-T-g3"])
def test_gradcheck_float64(case, algorithm):
    x, w, b = _on(DEVICE, torch.float64, *_make(case, _seed(case, "gc"), n_batch=1))
    x, w = x.requires_grad_(), w.requires_grad_()
    inputs = (x, w) if b is None else (x, w, b.requires_grad_())

    def f(x, w, b=None):
        return QF.quaternion_conv(x, w, b, algorithm=algorithm, **_kwargs(case))

    assert gradcheck(f, inputs)
    if algorithm == "hamilton":
        assert gradgradcheck(f, inputs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["1d", "2d", "2d-T-g2", "3d-T-g3", "2d-multitile"])
def test_half_precision_within_twice_expanded_error(case, dtype):
    x, w, b = _make(case, _seed(case, dtype))
    ref = _grads(reference.quaternion_conv_naive, case, x, w, b, gy_seed=2)
    args = _on(DEVICE, dtype, x, w, b)
    baseline = _grads(reference.quaternion_conv_expanded, case, *args, gy_seed=2)
    got = _grads(_ours("hamilton"), case, *args, gy_seed=2)
    # floor: a few ulps, for the (rare) case of a near-exact expanded conv
    floor = 4 * torch.finfo(dtype).eps
    for name, o, e, r in zip(NAMES[: len(got)], got, baseline, ref, strict=True):
        assert o.dtype == dtype
        assert _rel(o, r) <= max(2 * _rel(e, r), floor), f"{name}: {_rel(o, r):.2e} vs expanded {_rel(e, r):.2e}"


# ---------------------------------------------------------------------------------------------
# The raw entry points.


def _raw():
    from aqcf_kernels import _C

    return _C


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_raw_conv_every_dtype(dtype, algorithm):
    """Every dtype through the raw entry point: the values match the reference."""
    x, w, b = _make("2d-T-g2", _seed("raw", dtype, algorithm))
    ref = reference.quaternion_conv_naive(x, w, b, **_kwargs("2d-T-g2"))
    xd, wd = _on(DEVICE, dtype, x, w)
    y = _raw().conv_aten(xd, wd, None, [2, 3], [0, 1], [2, 1], True, [1, 2], 2, algorithm == "fast8")
    assert y.dtype == dtype and y.shape == ref.shape
    tol = {torch.float64: 1e-12, torch.float32: FP32_TOL[algorithm], torch.float16: 5e-3, torch.bfloat16: 4e-2}[dtype]
    assert _rel(y, ref) <= tol


def test_raw_conv_rejects_bad_arguments():
    """Raised, not crashed (the old hand-written kernels' launcher segfaulted on an error path)."""
    C = _raw()
    x = torch.randn(1, 8, 5, 5, device=DEVICE)
    w = torch.randn(4, 2, 2, 3, 3, device=DEVICE)
    args = ([1, 1], [0, 0], [1, 1], False, [0, 0], 1, False)
    with pytest.raises(RuntimeError, match="one device"):
        C.conv_aten(x, w.cpu(), None, *args)
    with pytest.raises(RuntimeError, match="one dtype"):
        C.conv_aten(x, w.double(), None, *args)
    with pytest.raises(RuntimeError, match="multiple of 4"):
        C.conv_aten(torch.randn(1, 6, 5, 5, device=DEVICE), w, None, *args)
    with pytest.raises(RuntimeError, match="one device"):
        C.conv_weight_grad_aten(x, torch.randn(1, 8, 3, 3), [4, 2, 2, 3, 3], *args)
