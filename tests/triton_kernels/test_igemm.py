"""The implicit-GEMM conv kernel (aqcf_kernels/backends/triton/igemm.py) against reference.py.

Run by triton's interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU), through
the public op with the triton backend forced, so the launcher, the weight packing, the channels_last
boundary and autograd's adjoint calls are what is tested: the forward of convs and transposed convs,
and the input gradient (the adjoint conv, served by the same kernel), in fp32 (≤ 1e-5, the hamilton
contract; fast8 ≤ 5e-4, also on real-dominant data) and fp16 (≤ 2x the expanded-weight conv's error in
fp16; fast8 on balanced components), against a float64 reference. fast8 runs the same kernel as 8 GEMMs
on the operand combinations of aqcf_kernels/backends/triton/fast8.py (tested here against
quaternion.FAST8_LEFT / FAST8_RIGHT) with the butterfly in the epilogue.
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
        algorithm = kwargs.get("algorithm", args[7] if len(args) > 7 else "hamilton")
        calls.append(args[3].transposed if algorithm == "hamilton" else (args[3].transposed, algorithm))
        return real(*args, **kwargs)

    monkeypatch.setattr(igemm, "conv_igemm", counting)
    return calls


def _ours(activation=None, negative_slope=0.1, algorithm="hamilton"):
    def fn(x, w, b, **kw):
        return QF.quaternion_conv(
            x, w, b, algorithm=algorithm, activation=activation, negative_slope=negative_slope, **kw
        )

    return fn


def _launches(case, algorithm: str) -> list:
    """What ``igemm_calls`` records for a forward and its input gradient: the adjoint is transposed for a
    conv, plain for a transposed conv."""
    calls = [case[1], not case[1]]
    return calls if algorithm == "hamilton" else [(t, algorithm) for t in calls]


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
    assert igemm_calls == _launches(case, "hamilton")
    for name, o, r in zip(("y", "grad_input"), got, ref, strict=True):
        assert o.dtype == torch.float32 and o.shape == r.shape
        assert _rel(o, r) <= 1e-5, f"{name}: relative error {_rel(o, r):.2e}"


#: transposed convs whose sub-pixel phases have different tap sets: gcd(stride, dilation) > 1 (taps exist
#: only for some phases), a 1-tap dim with stride 3 (two of its three phases have no tap: bias only), 3d
SUBPIXEL_CASES = [
    (2, True, 1, (2, 3), (1, 0), (2, 1), (1, 2), 3, 5, (4, 3), (3, 1)),
    (1, True, 1, 3, 1, 3, 2, 2, 3, (5,), (4,)),
    (3, True, 1, 2, (1, 1, 0), (1, 2, 1), (1, 0, 1), 2, 3, (3, 2, 3), (3, 2, 1)),
    (2, True, 2, 2, (0, 2), 3, 1, 4, 2, (3, 3), (2, 2)),
]
SUBPIXEL_IDS = ["2d-gcd2-empty-phases", "1d-s3-d3", "3d-mixed", "2d-g2-d3"]


@pytest.mark.parametrize("algorithm", ["hamilton", "fast8"])
@pytest.mark.parametrize("case", SUBPIXEL_CASES, ids=SUBPIXEL_IDS)
def test_transposed_sub_pixel_phases(case, algorithm, igemm_calls):
    """A transposed conv runs one grid slice per output phase with only the taps that feed it: every phase
    (those without a tap included) matches the reference, forward and input gradient."""
    x, w, b = _make(case, torch.Generator().manual_seed(zlib.crc32(repr(case).encode())))
    ref = _forward_and_input_grad(reference.quaternion_conv_naive, case, x, w, b, gy_seed=6)
    to = dict(dtype=torch.float32, device=DEVICE)
    got = _forward_and_input_grad(_ours(algorithm=algorithm), case, x.to(**to), w.to(**to), b.to(**to), gy_seed=6)
    assert igemm_calls == _launches(case, algorithm)
    for name, o, r in zip(("y", "grad_input"), got, ref, strict=True):
        assert _rel(o, r) <= (1e-5 if algorithm == "hamilton" else 5e-4), f"{name}: relative error {_rel(o, r):.2e}"


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


# ------------------------------------------------------------------------------------------------
# fast8: 8 GEMMs on the operand combinations, the butterfly in the epilogue
# ------------------------------------------------------------------------------------------------

#: fast8 interprets 2 K loops of 4 dots per program: the cases with several M, N and K blocks, groups, 3d, 1d
FAST8_CASES = [CASES[0], CASES[3], CASES[5], CASES[7]]
FAST8_IDS = [IDS[CASES.index(c)] for c in FAST8_CASES]


def _fast8_combinations(q: list, table, conjugate: bool) -> list:
    """The 8 combinations of quaternion components ``q``, straight from quaternion.FAST8_LEFT/RIGHT."""
    if conjugate:
        q = [q[0], -q[1], -q[2], -q[3]]
    return [q[p] + sign * q[r] for p, r, sign in table]


@pytest.mark.parametrize("conjugate", [False, True], ids=["plain", "conjugate"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_fast8_combinations_follow_the_tables(side, conjugate):
    from aqcf_kernels.backends.triton import fast8
    from aqcf_kernels.quaternion import FAST8_LEFT, FAST8_RIGHT

    table = FAST8_LEFT if side == "left" else FAST8_RIGHT
    g = torch.Generator().manual_seed(12)
    x = torch.randn(2, 3, 5, 7, 4 * 9, generator=g).to(DEVICE)  # channels_last, 9 quaternion channels
    got = fast8.combine_activation(x, side, conjugate)
    want = _fast8_combinations(list(x.chunk(4, dim=-1)), table, conjugate)
    assert torch.equal(got, torch.cat(want, dim=-1))
    w = torch.randn(4, 6, 5, 3, 2, generator=g, dtype=torch.float64)
    assert torch.equal(
        fast8.combine_weight(w, side, conjugate), torch.stack(_fast8_combinations(list(w), table, conjugate))
    )


@pytest.mark.parametrize(("cq", "tile", "align"), [(9, (64, 16), 1), (24, (32, 32), 8), (72, (16, 64), 8)])
def test_fast8_combinations_tiles_and_channel_alignment(cq, tile, align, launch_constexprs):
    """The pre-pass's tile follows the channel count (partial in pixels and channels here: 105 pixels; 72
    channels take two channel blocks of 64) and each launch says the alignment of its channel runs."""
    from aqcf_kernels.backends.triton import fast8
    from aqcf_kernels.quaternion import FAST8_RIGHT

    launches = launch_constexprs(fast8, "combine_kernel")
    g = torch.Generator().manual_seed(cq)
    x = torch.randn(3, 1, 5, 7, 4 * cq, generator=g, dtype=torch.float16).to(DEVICE)
    got = fast8.combine_activation(x, "right")
    want = [c.float() for c in _fast8_combinations(list(x.float().chunk(4, dim=-1)), FAST8_RIGHT, False)]
    assert torch.equal(got, torch.cat(want, dim=-1).half())  # formed in fp32, rounded once
    assert [(k["BLOCK_P"], k["BLOCK_C"], k["CHAN_ALIGN"]) for k in launches] == [(*tile, align)]


@pytest.mark.parametrize("case", FAST8_CASES, ids=FAST8_IDS)
def test_fast8_fp32_forward_and_input_grad(case, igemm_calls):
    g = torch.Generator().manual_seed(zlib.crc32(("fast8" + IDS[CASES.index(case)]).encode()))
    x, w, b = _make(case, g)
    ref = _forward_and_input_grad(reference.quaternion_conv_naive, case, x, w, b, gy_seed=1)
    to = dict(dtype=torch.float32, device=DEVICE)
    got = _forward_and_input_grad(_ours(algorithm="fast8"), case, x.to(**to), w.to(**to), b.to(**to), gy_seed=1)
    assert igemm_calls == _launches(case, "fast8")
    for name, o, r in zip(("y", "grad_input"), got, ref, strict=True):
        assert o.dtype == torch.float32 and o.shape == r.shape
        assert _rel(o, r) <= 5e-4, f"{name}: relative error {_rel(o, r):.2e}"


def test_fast8_fp32_real_dominant_data(igemm_calls):
    """The contract holds when the imaginary parts are 1% of the real part (the combinations then cancel)."""
    case = CASES[0]
    x, w, b = _make(case, torch.Generator().manual_seed(13))
    scale = torch.tensor([1.0, 0.01, 0.01, 0.01], dtype=torch.float64)
    x = (x.unflatten(1, (4, -1)) * scale[:, None, None, None]).flatten(1, 2)
    w = w * scale.view(4, 1, 1, 1, 1)
    ref = _forward_and_input_grad(reference.quaternion_conv_naive, case, x, w, b, gy_seed=3)
    got = _forward_and_input_grad(_ours(algorithm="fast8"), case, x.float(), w.float(), b.float(), gy_seed=3)
    assert igemm_calls == _launches(case, "fast8")
    for name, o, r in zip(("y", "grad_input"), got, ref, strict=True):
        assert _rel(o, r) <= 5e-4, f"{name}: relative error {_rel(o, r):.2e}"


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_fast8_fused_bias_activation(activation, igemm_calls):
    """Each of the four output components goes through the epilogue (gelu keeps the pre-activation)."""
    case = ACT_CASES[0]
    x, w, b = _make(case, torch.Generator().manual_seed(14))
    ref = _forward_and_input_grad(reference.quaternion_conv_naive, case, x, w, b, gy_seed=4, activation=activation)
    to = dict(dtype=torch.float32, device=DEVICE)
    got = _forward_and_input_grad(
        _ours(activation, algorithm="fast8"), case, x.to(**to), w.to(**to), b.to(**to), gy_seed=4
    )
    assert igemm_calls == _launches(case, "fast8")
    for name, o, r in zip(("y", "grad_input"), got, ref, strict=True):
        assert _rel(o, r) <= 5e-4, f"{name}: relative error {_rel(o, r):.2e}"


@pytest.mark.parametrize("case", FAST8_CASES[:2], ids=FAST8_IDS[:2])
def test_fast8_fp16_balanced_within_twice_expanded_error(case, igemm_calls):
    """Opt-in fast8 in half precision: the combinations are rounded to fp16 once, before the GEMMs; on
    balanced components (randn in every component) within 2x the expanded conv's error in fp16."""
    x, w, b = _make(case, torch.Generator().manual_seed(15))
    ref = _forward_and_input_grad(reference.quaternion_conv_naive, case, x, w, b, gy_seed=2)
    to = dict(dtype=torch.float16, device=DEVICE)
    args = (x.to(**to), w.to(**to), b.to(**to))
    baseline = _forward_and_input_grad(reference.quaternion_conv_expanded, case, *args, gy_seed=2)
    got = _forward_and_input_grad(_ours(algorithm="fast8"), case, *args, gy_seed=2)
    assert igemm_calls == _launches(case, "fast8")
    for name, o, e, r in zip(("y", "grad_input"), got, baseline, ref, strict=True):
        assert o.dtype == torch.float16
        assert _rel(o, r) <= max(2 * _rel(e, r), 2e-3), f"{name}: {_rel(o, r):.2e} vs expanded {_rel(e, r):.2e}"


#: channel runs that are whole K blocks (K_EVEN: the kernel's loads have no K mask): 16 quaternion channels
#: (a tap's run of 64 real channels) without groups, both ways; 64 per group with groups (one run per
#: component); fast8's runs of Cg_in = 64; a 1d case. The adjoint's runs are the output's channels. Each
#: run's alignment (CHAN_ALIGN, the power of two said to the compiler, at most 16) follows its length: runs
#: of 24 and 12 (fast8 at 24 quaternion channels in, 12 out) start at multiples of 8 and 4.
EVEN_CASES = [
    ((2, False, 1, 1, 1, 1, 0, 16, 16, (5, 6), (3, 3)), "hamilton", [True, True], [16, 16]),
    ((1, True, 1, 2, 1, 1, 1, 16, 16, (7,), (3,)), "hamilton", [True, True], [16, 16]),
    ((2, False, 2, 1, 1, 1, 0, 128, 2, (3, 3), (3, 3)), "hamilton", [True, False], [16, 1]),
    ((2, False, 1, 1, 1, 1, 0, 64, 3, (3, 4), (3, 3)), "fast8", [True, False], [16, 1]),
    ((2, False, 1, 1, 1, 1, 0, 24, 12, (3, 4), (3, 3)), "fast8", [False, False], [8, 4]),
]


@pytest.mark.parametrize(
    "case, algorithm, even, align", EVEN_CASES, ids=["2d", "1d-T", "2d-g2", "2d-fast8", "2d-fast8-24q"]
)
def test_whole_channel_blocks_without_k_mask(case, algorithm, even, align, igemm_calls, launch_constexprs):
    launches = launch_constexprs(igemm, "_igemm")
    g = torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))
    x, w, b = _make(case, g)
    ref = _forward_and_input_grad(reference.quaternion_conv_naive, case, x, w, b, gy_seed=1)
    to = dict(dtype=torch.float32, device=DEVICE)
    got = _forward_and_input_grad(_ours(algorithm=algorithm), case, x.to(**to), w.to(**to), b.to(**to), gy_seed=1)
    assert [c["K_EVEN"] for c in launches] == even and [c["DIMS"] for c in launches] == [case[0]] * 2
    assert [c["CHAN_ALIGN"] for c in launches] == align
    assert all(c["TAP_BITS"] for c in launches)
    tol = 1e-5 if algorithm == "hamilton" else 5e-4
    for name, o, r in zip(("y", "grad_input"), got, ref, strict=True):
        assert _rel(o, r) <= tol, f"{name}: relative error {_rel(o, r):.2e}"


#: more than 32 taps: the kernel checks each row's bounds every step instead of reading them from the
#: per-row tap bits (TAP_BITS); a 7x5 conv with padding 3, and a transposed 6x6 with stride 2
MANY_TAP_CASES = [
    (2, False, 1, 1, 3, 1, 0, 3, 5, (6, 7), (7, 5)),
    (2, True, 1, 2, 2, 1, 1, 3, 4, (4, 3), (6, 6)),
]


@pytest.mark.parametrize("case", MANY_TAP_CASES, ids=["7x5", "T-6x6-s2"])
def test_more_taps_than_bits_checks_bounds_per_step(case, igemm_calls, launch_constexprs):
    launches = launch_constexprs(igemm, "_igemm")
    g = torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))
    x, w, b = _make(case, g)
    ref = _forward_and_input_grad(reference.quaternion_conv_naive, case, x, w, b, gy_seed=1)
    to = dict(dtype=torch.float32, device=DEVICE)
    got = _forward_and_input_grad(_ours(), case, x.to(**to), w.to(**to), b.to(**to), gy_seed=1)
    assert [c["TAP_BITS"] for c in launches] == [False, False]
    for name, o, r in zip(("y", "grad_input"), got, ref, strict=True):
        assert _rel(o, r) <= 1e-5, f"{name}: relative error {_rel(o, r):.2e}"
