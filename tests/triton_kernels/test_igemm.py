"""The implicit-GEMM conv kernel (aqcf_kernels/backends/triton/igemm.py) against reference.py.

Run by triton's interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU), through
the public op with the triton backend forced, so the launcher, the weight packing, the channels_last
boundary and autograd's adjoint calls are what is tested: the forward of convs and transposed convs,
and the input gradient (the adjoint conv, served by the same kernel), in fp32 (≤ 1e-5, the hamilton
contract) and fp16 (≤ 2x the expanded-weight conv's error in fp16), against a float64 reference.
Every case has odd channel counts and partial tiles; the first has several M, N and K blocks and a
partial GROUP_M band with the interpreter's tiles (igemm.INTERPRETER_CONFIG). The weight gradient is
another kernel (igemm_wgrad.py, tested in test_igemm_wgrad.py): not requested here.
"""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F

from aqcf_kernels import functional as QF
from aqcf_kernels import reference
from aqcf_kernels.backends import registered

TRITON = registered()["triton"]
pytestmark = pytest.mark.skipif(
    TRITON.unavailable() is not None, reason=f"triton backend unavailable: {TRITON.unavailable()}"
)
if TRITON.unavailable() is None:
    from aqcf_kernels.backends.triton import igemm
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (spatial_dims, transposed, groups, stride, padding, dilation, output_padding, cq_in, cq_out, spatial, kernel)
CASES = [
    # 3 M tiles (a partial GROUP_M band) x 2 N tiles x 2 K blocks per tap with the interpreter's tiles
    (2, False, 1, 1, 1, 1, 0, 9, 20, (13, 12), (3, 2)),
    (2, False, 2, 2, 0, (1, 2), 0, 6, 10, (7, 6), (3, 2)),
    (2, True, 1, 2, 1, 1, 1, 3, 5, (3, 4), (3, 2)),
    (2, True, 2, (1, 2), 0, 2, 0, 6, 2, (3, 3), (2, 2)),
    (3, False, 1, 2, 1, 1, 0, 3, 5, (3, 4, 3), (2, 3, 2)),
    (3, True, 2, 2, 0, 1, (1, 0, 1), 2, 6, (2, 2, 2), (2, 1, 2)),
    (1, False, 3, 2, 1, 2, 0, 3, 9, (11,), (3,)),
    (1, True, 1, 3, 1, 1, 2, 5, 3, (5,), (3,)),
]
IDS = [f"{c[0]}d-{'T' if c[1] else 'conv'}-g{c[2]}-s{c[3]}-p{c[4]}-d{c[5]}" for c in CASES]


def _make(case, generator, bias: bool = True):
    n, transposed, groups, *_, cq_in, cq_out, spatial, kernel = case
    shape_w = (4, cq_in, cq_out // groups, *kernel) if transposed else (4, cq_out, cq_in // groups, *kernel)
    x = torch.randn(2, 4 * cq_in, *spatial, generator=generator, dtype=torch.float64)
    w = torch.randn(*shape_w, generator=generator, dtype=torch.float64) / 4
    b = torch.randn(4 * cq_out, generator=generator, dtype=torch.float64) if bias else None
    return x, w, b


def _kwargs(case) -> dict:
    n, transposed, groups, stride, padding, dilation, output_padding, *_ = case
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    if transposed:
        kw.update(transposed=True, output_padding=output_padding)
    return kw


def _forward_and_input_grad(fn, case, x, w, b, gy_seed: int, activation: str | None = None):
    """``(y, grad_input)``; only the input needs a gradient, so the weight-gradient kernel never runs."""
    x = x.detach().requires_grad_()
    y = fn(x, w, b, **_kwargs(case))
    y = _activate(y, activation)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(gy_seed), dtype=torch.float64)
    y.backward(gy.to(y.dtype).to(y.device))
    return y.detach(), x.grad


def _activate(y, activation):
    if activation == "relu":
        return F.relu(y)
    if activation == "leaky_relu":
        return F.leaky_relu(y, 0.1)
    if activation == "gelu":
        return F.gelu(y)
    return y


def _rel(out, ref) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    return ((out - ref).norm() / ref.norm()).item()


@pytest.fixture
def igemm_calls(monkeypatch):
    """Force the triton backend and count the implicit-GEMM launches (so a fallback can't pass silently)."""
    monkeypatch.setenv("AQCF_BACKEND", "triton")
    calls = []
    real = igemm.conv_igemm

    def counting(*args, **kwargs):
        calls.append(args[3].transposed)
        return real(*args, **kwargs)

    monkeypatch.setattr(igemm, "conv_igemm", counting)
    return calls


def _ours(activation=None, negative_slope=0.1):
    def fn(x, w, b, **kw):
        return QF.quaternion_conv(
            x, w, b, algorithm="hamilton", activation=activation, negative_slope=negative_slope, **kw
        )

    return fn


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("transposed", [False, True])
def test_pack_weight_is_the_expanded_weight(transposed, groups):
    """Per group, B[c·Cg_out + o, tap·4Cg_in + a·Cg_in + i] (K-major) is Parcollet's expanded weight
    (transposed for a transposed conv)."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(4, 2 * groups, 5, 3, 2, generator=g, dtype=torch.float64)
    packed = igemm.pack_weight(w, groups, transposed)
    for gi, wg in enumerate(w.chunk(groups, dim=1)):
        e = reference.expand_weight(wg)  # conv: (4·out, 4·in, *k); transposed: (4·in, 4·out, *k)
        e = e.permute(2, 3, 1, 0) if not transposed else e.permute(2, 3, 0, 1)  # (*k, 4·in, 4·out)
        assert torch.equal(packed[gi].T, e.reshape(-1, e.shape[-1]))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_igemm_fp32_forward_and_input_grad(case, igemm_calls):
    g = torch.Generator().manual_seed(zlib.crc32(IDS[CASES.index(case)].encode()))
    x, w, b = _make(case, g)
    ref = _forward_and_input_grad(reference.quaternion_conv_naive, case, x, w, b, gy_seed=1)
    to = dict(dtype=torch.float32, device=DEVICE)
    got = _forward_and_input_grad(_ours(), case, x.to(**to), w.to(**to), b.to(**to), gy_seed=1)
    # the forward, then the adjoint (transposed for a conv, plain for a transposed conv)
    assert igemm_calls == [case[1], not case[1]]
    for name, o, r in zip(("y", "grad_input"), got, ref, strict=True):
        assert o.dtype == torch.float32 and o.shape == r.shape
        assert _rel(o, r) <= 1e-5, f"{name}: relative error {_rel(o, r):.2e}"


#: small cases for the epilogue: a conv with bias (the pre-activation kept for leaky_relu/gelu) and a transposed one
ACT_CASES = [(2, False, 1, 1, 1, 1, 0, 3, 5, (4, 5), (3, 3)), CASES[7]]


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "gelu"])
@pytest.mark.parametrize("case", ACT_CASES, ids=["2d-conv", IDS[7]])
def test_igemm_fused_bias_activation(case, activation, igemm_calls):
    g = torch.Generator().manual_seed(11)
    x, w, b = _make(case, g)
    ref = _forward_and_input_grad(reference.quaternion_conv_naive, case, x, w, b, gy_seed=4, activation=activation)
    to = dict(dtype=torch.float32, device=DEVICE)
    got = _forward_and_input_grad(_ours(activation), case, x.to(**to), w.to(**to), b.to(**to), gy_seed=4)
    assert igemm_calls == [case[1], not case[1]]
    for name, o, r in zip(("y", "grad_input"), got, ref, strict=True):
        assert _rel(o, r) <= 1e-5, f"{name}: relative error {_rel(o, r):.2e}"


@pytest.mark.parametrize("case", CASES[::2], ids=IDS[::2])
def test_igemm_fp16_within_twice_expanded_error(case, igemm_calls):
    g = torch.Generator().manual_seed(5)
    x, w, b = _make(case, g)
    ref = _forward_and_input_grad(reference.quaternion_conv_naive, case, x, w, b, gy_seed=2)
    to = dict(dtype=torch.float16, device=DEVICE)
    args = (x.to(**to), w.to(**to), b.to(**to))
    baseline = _forward_and_input_grad(reference.quaternion_conv_expanded, case, *args, gy_seed=2)
    got = _forward_and_input_grad(_ours(), case, *args, gy_seed=2)
    assert len(igemm_calls) == 2
    for name, o, e, r in zip(("y", "grad_input"), got, baseline, ref, strict=True):
        assert o.dtype == torch.float16
        # floor: when the expanded conv happens to be near-exact, allow a few fp16 ulps
        assert _rel(o, r) <= max(2 * _rel(e, r), 2e-3), f"{name}: {_rel(o, r):.2e} vs expanded {_rel(e, r):.2e}"


def test_igemm_channels_last_in_channels_last_out_no_bias(igemm_calls):
    case = CASES[0]
    x, w, _ = _make(case, torch.Generator().manual_seed(9), bias=False)
    ref = reference.quaternion_conv_naive(x, w, None, **_kwargs(case))
    xc = x.float().to(DEVICE).contiguous(memory_format=torch.channels_last)
    y = _ours()(xc, w.float().to(DEVICE), None, **_kwargs(case))
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert _rel(y, ref) <= 1e-5


def test_igemm_not_used_for_fast8(igemm_calls):
    """fast8 keeps the old kernel (its 8 products are not one GEMM on a packed weight)."""
    case = CASES[4]
    x, w, b = _make(case, torch.Generator().manual_seed(2))
    QF.quaternion_conv(x.float(), w.float(), b.float(), algorithm="fast8", **_kwargs(case))
    assert igemm_calls == []
