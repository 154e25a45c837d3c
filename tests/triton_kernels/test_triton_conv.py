"""The first-design Triton quaternion-conv kernels (conv_kernels.py: forward, input grad, weight grad)
against the reference.

Since the implicit GEMMs (igemm.py, igemm_wgrad.py; tested in test_igemm*.py) serve both algorithms, these
kernels serve only tensors of 2**31 elements or more (the GEMMs' offsets are int32): the tests make the
GEMMs refuse every call and count the first design's launches, so a fallback cannot pass silently.

On machines without CUDA, tests/conftest.py sets TRITON_INTERPRET=1 before anything imports
triton, so the very kernels that run on GPUs run here on CPU tensors (slowly: shapes are tiny,
but every case has partial tiles and masked edges). float64 has no tl.dot, so the check is
fp32/fp16 against the float64 reference within the accuracy contract; bf16 arithmetic is wrong
in the interpreter, so bf16 is checked only on GPUs (tests marked gpu).
"""

from __future__ import annotations

import zlib

import pytest
import torch

from aqcf_kernels import functional as QF
from aqcf_kernels import reference
from aqcf_kernels.backends import registered

TRITON = registered()["triton"]
pytestmark = pytest.mark.skipif(
    TRITON.unavailable() is not None, reason=f"triton backend unavailable: {TRITON.unavailable()}"
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (spatial_dims, transposed, groups, stride, padding, dilation, output_padding, bias)
CASES = [
    (2, False, 1, 1, 1, 1, 0, True),
    (2, False, 2, 2, 0, (1, 2), 0, False),
    (2, True, 1, 2, 1, 1, 1, True),
    (2, True, 2, (1, 2), 0, 2, 0, False),
    (3, False, 1, 2, 1, 1, 0, True),
    (3, True, 2, 2, 0, 1, (1, 0, 1), True),
]
IDS = [f"{n}d-{'T' if t else 'conv'}-g{g}-s{s}-p{p}-d{d}" for n, t, g, s, p, d, _, _ in CASES]


def _make(case, dtype, generator):
    n, transposed, groups, *_, bias = case
    cq_in, cq_out = 3 * groups, 5 * groups  # odd channel counts: partial K and N tiles
    spatial = (7, 6, 5)[:n] if n == 2 else (4, 5, 3)
    # the 3d transposed case with one tap along H: 4 taps instead of 12 keep the interpreter's time
    # (it runs ~10 ms per program per K step) at ~1/3; test_igemm*.py cover 3d kernels of every size
    kernel = (3, 2, 3)[:n] if n == 2 else ((2, 1, 2) if transposed else (2, 3, 2))
    shape_w = (4, cq_in, cq_out // groups, *kernel) if transposed else (4, cq_out, cq_in // groups, *kernel)
    x = torch.randn(2, 4 * cq_in, *spatial, generator=generator, dtype=torch.float64)
    w = torch.randn(*shape_w, generator=generator, dtype=torch.float64) / 4
    b = torch.randn(4 * cq_out, generator=generator, dtype=torch.float64) if bias else None
    return x, w, b


def _run(fn, case, x, w, b):
    n, transposed, groups, stride, padding, dilation, output_padding, _ = case
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    if transposed:
        kw.update(transposed=True, output_padding=output_padding)
    return fn(x, w, b, **kw)


def _grads(fn, case, x, w, b, gy_seed):
    leaves = [t.detach().requires_grad_() for t in (x, w, b) if t is not None]
    xx, ww, *bb = leaves
    y = _run(fn, case, xx, ww, bb[0] if bb else None)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(gy_seed), dtype=torch.float64)
    y.backward(gy.to(y.dtype).to(y.device))
    return [y.detach()] + [t.grad for t in leaves]


def _rel(out, ref):
    out, ref = out.double().cpu(), ref.double().cpu()
    return ((out - ref).norm() / ref.norm()).item()


@pytest.fixture
def force_triton(monkeypatch):
    """The triton backend with the first design's kernels (the GEMMs refuse); yields their launches."""
    from aqcf_kernels.backends.triton import conv as triton_conv
    from aqcf_kernels.backends.triton import igemm, igemm_wgrad

    monkeypatch.setenv("AQCF_BACKEND", "triton")
    for module in (igemm, igemm_wgrad):
        monkeypatch.setattr(module, "cannot_serve", lambda *args, **kwargs: "refused by the test")
    launches = []
    for name in ("conv", "conv_weight_grad"):
        real = getattr(triton_conv, name)

        def counting(*args, _real=real, _name=name, **kwargs):
            launches.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(triton_conv, name, counting)
    return launches


@pytest.mark.parametrize("algorithm", ["hamilton", "fast8"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_triton_fp32_matches_reference(case, algorithm, force_triton):
    g = torch.Generator().manual_seed(zlib.crc32(f"{IDS[CASES.index(case)]}-{algorithm}".encode()))
    x, w, b = _make(case, torch.float64, g)
    ref = _grads(reference.quaternion_conv_naive, case, x, w, b, gy_seed=1)

    def ours(x, w, b, **kw):
        return QF.quaternion_conv(x, w, b, algorithm=algorithm, **kw)

    to = dict(dtype=torch.float32, device=DEVICE)
    got = _grads(ours, case, x.to(**to), w.to(**to), None if b is None else b.to(**to), gy_seed=1)
    # tf32 would be ~1e-3: the tests run in ieee fp32 (the default allow_tf32=False)
    tol = 1e-5 if algorithm == "hamilton" else 5e-4
    assert sorted(force_triton) == ["conv", "conv", "conv_weight_grad"]
    for name, o, r in zip(["y", "grad_input", "grad_weight", "grad_bias"][: len(got)], got, ref, strict=True):
        assert o.dtype == torch.float32
        assert _rel(o, r) <= tol, f"{name}: relative error {_rel(o, r):.2e} > {tol}"


@pytest.mark.parametrize("case", CASES[::2], ids=IDS[::2])
def test_triton_fp16_within_twice_expanded_error(case, force_triton):
    g = torch.Generator().manual_seed(7)
    x, w, b = _make(case, torch.float64, g)
    ref = _grads(reference.quaternion_conv_naive, case, x, w, b, gy_seed=2)
    to = dict(dtype=torch.float16, device=DEVICE)
    args = (x.to(**to), w.to(**to), None if b is None else b.to(**to))
    baseline = _grads(reference.quaternion_conv_expanded, case, *args, gy_seed=2)

    def ours(x, w, b, **kw):
        return QF.quaternion_conv(x, w, b, algorithm="hamilton", **kw)

    got = _grads(ours, case, *args, gy_seed=2)
    assert sorted(force_triton) == ["conv", "conv", "conv_weight_grad"]
    names = ["y", "grad_input", "grad_weight", "grad_bias"][: len(got)]
    for name, o, e, r in zip(names, got, baseline, ref, strict=True):
        assert o.dtype == torch.float16
        # floor: when the expanded conv happens to be near-exact, allow a few fp16 ulps
        assert _rel(o, r) <= max(2 * _rel(e, r), 2e-3), f"{name}: {_rel(o, r):.2e} vs expanded {_rel(e, r):.2e}"


def test_triton_rejects_float64(force_triton):
    x = torch.randn(1, 8, 5, 5, dtype=torch.float64, device=DEVICE)
    w = torch.randn(4, 2, 2, 3, 3, dtype=torch.float64, device=DEVICE)
    with pytest.raises(RuntimeError, match="triton.*float64"):
        QF.quaternion_conv2d(x, w)


@pytest.mark.parametrize("cudnn_tf32", [False, True])
@pytest.mark.parametrize("matmul_tf32", [False, True])
def test_fp32_dots_use_tf32_only_when_matmul_tf32_is_allowed(matmul_tf32, cudnn_tf32, monkeypatch):
    # cudnn.allow_tf32 defaults to True: following it made every fp32 Triton conv TF32 on the H100
    # (relative error ~7e-4 against the 1e-5 contract). Only the matmul flag (default False) counts.
    from aqcf_kernels.backends.triton import common as triton_common

    monkeypatch.setattr(triton_common, "INTERPRET", False)
    # torch's flag objects are not plain attributes (monkeypatch can't restore them): by hand
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul_tf32, cudnn_tf32
    try:
        _, precision = triton_common.dot_config(torch.float32)
        bf16_precision = triton_common.dot_config(torch.bfloat16)[1]
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    assert precision == ("tf32" if matmul_tf32 else "ieee")
    assert bf16_precision == "ieee"
