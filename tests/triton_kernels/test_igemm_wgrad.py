"""The weight-gradient GEMM of the implicit-GEMM conv (aqcf_kernels/backends/triton/igemm_wgrad.py)
against reference.py.

Run by triton's interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU): the weight
and bias gradients of convs and transposed convs, 1d/2d/3d, groups, stride, padding, dilation, against
autograd through ``reference.quaternion_conv_naive`` in float64 — fp32 within the hamilton contract
(≤ 1e-5), fp16 within 2x the expanded-weight conv's error in fp16. Every case has odd channel counts and
partial tiles; the first has two row tiles, two column blocks per tap and 3 pixel steps with the
interpreter's tiles (igemm_wgrad.INTERPRETER_CONFIG), and is also run with several split counts (one
that divides nothing, one with empty splits) and another tile config. Determinism: two runs are
bit-identical. fast8 (8 GEMMs on the combinations of gy and conj(x), the butterfly in the fold) within its
contract: fp32 ≤ 5e-4, fp16 within 2x the expanded conv's error on balanced components. The backend test
goes through the public op with the triton backend forced.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from aqcf_kernels import functional as QF
from aqcf_kernels import reference
from aqcf_kernels.backends import registered
from aqcf_kernels.params import ConvParams

from .test_igemm import _kwargs, _make, _rel

TRITON = registered()["triton"]
pytestmark = pytest.mark.skipif(
    TRITON.unavailable() is not None, reason=f"triton backend unavailable: {TRITON.unavailable()}"
)
if TRITON.unavailable() is None:
    from aqcf_kernels.backends.triton import igemm_wgrad
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (spatial_dims, transposed, groups, stride, padding, dilation, output_padding, cq_in, cq_out, spatial, kernel)
CASES = [
    # 2 row tiles (36 rows) x 2 column blocks per tap (40 channels) x 6 taps, 84 pixels (one step of the
    # interpreter's 128; test_wgrad_other_tiles runs it in 6 steps of 16)
    (2, False, 1, 1, 1, 1, 0, 10, 9, (7, 6), (3, 2)),
    (2, False, 2, 2, 0, (1, 2), 0, 6, 10, (7, 6), (1, 2)),
    (2, True, 1, 2, 1, 1, 1, 3, 5, (5, 4), (3, 2)),
    (2, True, 2, (1, 2), 0, 2, 0, 6, 2, (3, 3), (1, 2)),
    (3, False, 1, 2, 1, 1, 0, 3, 5, (5, 4, 3), (2, 3, 2)),
    (3, True, 1, 2, 0, 1, (1, 0, 1), 2, 6, (2, 3, 2), (2, 1, 2)),
    (1, False, 2, 2, 1, 2, 0, 4, 6, (11,), (2,)),
    (1, True, 1, 3, 1, 1, 2, 5, 3, (5,), (3,)),
]
IDS = [f"{c[0]}d-{'T' if c[1] else 'conv'}-g{c[2]}-s{c[3]}-p{c[4]}-d{c[5]}" for c in CASES]
#: few taps, so that split counts are cheap to interpret: 2 row tiles x 2 column blocks x 2 taps, 84 pixels
SPLIT_CASE = (2, False, 1, 1, 1, 1, 0, 10, 9, (7, 6), (1, 2))


def _params(case) -> ConvParams:
    n, transposed, groups, stride, padding, dilation, output_padding, *_ = case

    def tup(v):
        return tuple(v) if isinstance(v, tuple) else (v,) * n

    return ConvParams(n, tup(stride), tup(padding), tup(dilation), transposed, tup(output_padding), groups)


def _reference_grads(fn, case, x, w, b, gy_seed: int):
    """``(grad_weight, grad_bias, gy)`` of ``<gy, fn(x, w, b)>`` by autograd."""
    w, b = w.detach().requires_grad_(), b.detach().requires_grad_()
    y = fn(x, w, b, **_kwargs(case))
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(gy_seed), dtype=torch.float64)
    y.backward(gy.to(y.dtype))
    return w.grad, b.grad, gy


def _ours(case, x, gy, w_shape, splits=None, config=None, algorithm="hamilton"):
    return igemm_wgrad.conv_weight_grad_igemm(x, gy, w_shape, _params(case), True, splits, config, algorithm)


def _seed(case) -> int:
    return zlib.crc32(repr(case).encode())


def _check_fp32(case, splits=None, config=None, x_view=None, gy_view=None, algorithm="hamilton"):
    x, w, b = _make(case, torch.Generator().manual_seed(_seed(case)))
    rw, rb, gy = _reference_grads(reference.quaternion_conv_naive, case, x, w, b, gy_seed=1)
    to = dict(dtype=torch.float32, device=DEVICE)
    xf, gyf = x.to(**to), gy.to(**to)
    xf, gyf = (x_view or (lambda t: t))(xf), (gy_view or (lambda t: t))(gyf)
    gw, gb = _ours(case, xf, gyf, w.shape, splits, config, algorithm)
    tol = 1e-5 if algorithm == "hamilton" else 5e-4
    for name, o, r in (("grad_weight", gw, rw), ("grad_bias", gb, rb)):
        assert o.dtype == torch.float32 and o.shape == r.shape, name
        assert _rel(o, r) <= tol, f"{name}: relative error {_rel(o, r):.2e}"
    return gw, gb


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_wgrad_fp32_weight_and_bias(case):
    # grouped cases interpret 16 programs per tap, group and split (one per pair of component runs): one split
    _check_fp32(case, splits=1 if case[2] > 1 else 2)


@pytest.mark.parametrize("splits", [1, 5], ids=lambda s: f"splits{s}")
def test_wgrad_split_counts(splits):
    """1 (3 steps: carries across rows and images) and 5 (84 pixels: 32 + 32 + 20, then two empty splits
    that write zeros), with 32-pixel steps (the interpreter's default takes 128)."""
    _check_fp32(SPLIT_CASE, splits=splits, config={"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32})


def test_wgrad_other_tiles():
    """Tiles wider than the layer's runs (partial 64-wide blocks) and 16-pixel steps (carries across rows)."""
    _check_fp32(CASES[0], splits=2, config={"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 16})
    _check_fp32(CASES[4], splits=1, config={"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 64})


#: several column blocks a program (RUNS, the narrow layers' configs): 16-channel blocks of runs of 40
#: (three a tap, the last partial), so a program's blocks cross channel blocks, taps and (grouped) component
#: runs, and its last blocks run past the last tap (6 taps: 18 blocks, 5 programs of 4 a row tile)
RUNS_CASES = [
    (CASES[0], 4, "hamilton"),
    (CASES[0], 2, "hamilton"),
    (CASES[1], 4, "hamilton"),
    (CASES[2], 4, "hamilton"),
    (CASES[0], 4, "fast8"),
]


@pytest.mark.parametrize("case, runs, algorithm", RUNS_CASES, ids=["2d-4", "2d-2", "2d-g2-4", "2d-T-4", "2d-fast8-4"])
def test_wgrad_several_column_blocks_per_program(case, runs, algorithm):
    config = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "RUNS": runs}
    _check_fp32(case, splits=2, config=config, algorithm=algorithm)


def test_gemm_tiles_counts_programs_of_several_blocks():
    """The grid's GEMM programs (the bias programs follow them): CASES[0] (runs of 36 rows and 40 columns, 6
    taps) in 16x16 blocks is 3 row tiles by 18 column blocks; 4 blocks a program make 5 a row tile (the last
    with 2), 2 make 9. Per group of a grouped conv (2 groups of 6 quaternion channels), 4 component runs a
    side: 4 row tiles by 6 taps * 4 runs = 24 column blocks, 6 programs of 4."""
    assert igemm_wgrad.gemm_tiles(10, 9, 1, 6, 16, 16) == 3 * 18
    assert igemm_wgrad.gemm_tiles(10, 9, 1, 6, 16, 16, runs=4) == 3 * 5
    assert igemm_wgrad.gemm_tiles(10, 9, 1, 6, 16, 16, runs=2) == 3 * 9
    assert igemm_wgrad.gemm_tiles(12, 12, 2, 6, 16, 16, runs=4) == 4 * 6


def test_each_config_gets_its_own_split_count_on_an_h100():
    """``config_splits`` fills 132 SMs (2 programs each) with each config's own programs: at 16q (runs of 64
    channels, 9 taps, N32 64²) a 64x64 one-block program covers one tap and a four-block program four, so the
    four-block config takes more splits (it ran 90 programs with the one-block count); fast8 at 64q likewise
    with four products a program (72 programs before). Every config reaches 264 programs or a bound."""
    pixels, sms, target = 32 * 64 * 64, 132, 2 * 132
    for cq, fast8, groups_axis, bytes_per_split in ((16, False, 1, 4 * 64 * 576), (64, True, 8, 4 * 8 * 64 * 576)):
        for runs, products in ((1, 1), (2, 1), (4, 1), (1, 4)):
            if products > 1 and not fast8:
                continue
            per_split = igemm_wgrad.gemm_tiles(cq, cq, 1, 9, 64, 64, fast8, runs) * groups_axis // products
            splits = igemm_wgrad.config_splits(pixels, per_split, bytes_per_split, sms)
            bound = min(igemm_wgrad.MAX_SPLITS, igemm_wgrad.PARTIAL_BYTES // bytes_per_split)
            assert splits * per_split >= target or splits == bound, (cq, runs, products, splits, per_split)
    one, four = (igemm_wgrad.gemm_tiles(16, 16, 1, 9, 64, 64, False, r) for r in (1, 4))
    assert igemm_wgrad.config_splits(pixels, four, 4 * 64 * 576, sms) > igemm_wgrad.config_splits(
        pixels, one, 4 * 64 * 576, sms
    )


@pytest.mark.parametrize("runs, products, algorithm", [(1, 1, "hamilton"), (4, 1, "hamilton"), (1, 4, "fast8")])
def test_wgrad_split_count_follows_the_config(runs, products, algorithm, monkeypatch):
    """With a (pretend) GPU of 64 SMs and 16-pixel splits allowed, the launch takes its config's own split count
    (fewer programs a split, more splits: 3 for one-block programs, 6 for four blocks or four products, the
    bound of 98 output pixels in 16-pixel splits), sizes its partial buffers for it and the fold sums exactly
    those: the result matches the reference whatever the count."""
    monkeypatch.setattr(igemm_wgrad, "gpu_sms", lambda device: 64)
    monkeypatch.setattr(igemm_wgrad, "MIN_PIXELS_PER_SPLIT", 16)
    folded = []
    fold = igemm_wgrad.qconv_wgrad_fold_kernel

    class RecordingFold:
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                folded.append((args[0].shape[0], args[7]))  # (partial rows, splits summed)
                return fold[grid](*args, **kwargs)

            return run

    monkeypatch.setattr(igemm_wgrad, "qconv_wgrad_fold_kernel", RecordingFold())
    config = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "RUNS": runs, "FAST8_PRODUCTS": products}
    _check_fp32(CASES[0], config=config, algorithm=algorithm)
    (rows, summed), *_ = folded
    per_split = igemm_wgrad.gemm_tiles(10, 9, 1, 6, 16, 16, algorithm == "fast8", runs) * (
        8 // products if algorithm == "fast8" else 1
    )
    blocks = 8 if algorithm == "fast8" else 16
    want = igemm_wgrad.config_splits(2 * 7 * 7, per_split, 4 * blocks * 9 * 10 * 6, 64)
    assert rows == summed == want == (3 if runs * products == 1 else 6), (rows, summed, want)


def test_wgrad_non_contiguous_inputs():
    """A spatially strided x and a gy view with permuted strides (converted at the boundary)."""

    def strided(t):  # the same values, read through a view with non-unit spatial strides
        big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        big[..., ::2] = t
        return big[..., ::2]

    def permuted(t):
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)

    _check_fp32(SPLIT_CASE, splits=2, x_view=strided, gy_view=permuted)
    _check_fp32(CASES[2], splits=2, x_view=permuted, gy_view=strided)


def test_wgrad_deterministic():
    case = SPLIT_CASE
    x, w, b = _make(case, torch.Generator().manual_seed(4))
    gy = _reference_grads(reference.quaternion_conv_naive, case, x, w, b, gy_seed=5)[2]
    runs = [_ours(case, x.float(), gy.float(), w.shape, splits=2) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("case", CASES[:6:2], ids=IDS[:6:2])
def test_wgrad_fp16_within_twice_expanded_error(case):
    x, w, b = _make(case, torch.Generator().manual_seed(6))
    rw, rb, gy = _reference_grads(reference.quaternion_conv_naive, case, x, w, b, gy_seed=2)
    to = dict(dtype=torch.float16, device=DEVICE)
    ew, eb, _ = _reference_grads(reference.quaternion_conv_expanded, case, x.to(**to), w.to(**to), b.to(**to), 2)
    gw, gb = _ours(case, x.to(**to), gy.to(**to), w.shape, splits=1)
    for name, o, e, r in (("grad_weight", gw, ew, rw), ("grad_bias", gb, eb, rb)):
        assert o.dtype == torch.float16
        # floor: when the expanded conv happens to be near-exact, allow a few fp16 ulps
        assert _rel(o, r) <= max(2 * _rel(e, r), 2e-3), f"{name}: {_rel(o, r):.2e} vs expanded {_rel(e, r):.2e}"


#: fast8 interprets 8 product-groups per group: a grouped conv, a transposed one, 3d, 1d
FAST8_CASES = [CASES[0], CASES[3], CASES[4], CASES[6]]


@pytest.mark.parametrize("case", FAST8_CASES, ids=[IDS[CASES.index(c)] for c in FAST8_CASES])
def test_wgrad_fast8_fp32_weight_and_bias(case):
    _check_fp32(case, splits=2 if case[2] == 1 else 1, algorithm="fast8")


def test_wgrad_fast8_other_tiles_and_splits():
    """Several row, column and pixel blocks per product (16-pixel steps, 3 splits)."""
    _check_fp32(CASES[0], splits=3, config={"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}, algorithm="fast8")


@pytest.mark.parametrize("case", FAST8_CASES, ids=[IDS[CASES.index(c)] for c in FAST8_CASES])
def test_wgrad_fast8_four_products_per_program(case, launch_constexprs):
    """``FAST8_PRODUCTS`` 4: a program computes one tile of four products' GEMMs (products 0-3, then 4-7, of
    each group: with groups, a program's products are not consecutive product-groups), with partial row,
    column and pixel blocks, several splits and the bias programs dealt over half as many programs."""
    launches = launch_constexprs(igemm_wgrad, "qconv_wgrad_igemm_kernel")
    config = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "FAST8_PRODUCTS": 4}
    _check_fp32(case, splits=2 if case[2] == 1 else 1, config=config, algorithm="fast8")
    assert [k["FAST8_PRODUCTS"] for k in launches] == [4]


def test_wgrad_four_products_config_is_one_product_for_hamilton():
    """The autotune set's four-product configs run hamilton as one product a program (the GPU config tests run
    every config with both algorithms): same result."""
    config = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "FAST8_PRODUCTS": 4}
    _check_fp32(CASES[1], splits=1, config=config)


@pytest.mark.parametrize("case", FAST8_CASES[:2], ids=[IDS[CASES.index(c)] for c in FAST8_CASES[:2]])
def test_wgrad_fast8_fp16_balanced_within_twice_expanded_error(case):
    """Opt-in fast8 in half precision (combinations rounded to fp16 once), balanced components."""
    x, w, b = _make(case, torch.Generator().manual_seed(16))
    rw, rb, gy = _reference_grads(reference.quaternion_conv_naive, case, x, w, b, gy_seed=2)
    to = dict(dtype=torch.float16, device=DEVICE)
    ew, eb, _ = _reference_grads(reference.quaternion_conv_expanded, case, x.to(**to), w.to(**to), b.to(**to), 2)
    gw, gb = _ours(case, x.to(**to), gy.to(**to), w.shape, splits=1, algorithm="fast8")
    for name, o, e, r in (("grad_weight", gw, ew, rw), ("grad_bias", gb, eb, rb)):
        assert o.dtype == torch.float16
        assert _rel(o, r) <= max(2 * _rel(e, r), 2e-3), f"{name}: {_rel(o, r):.2e} vs expanded {_rel(e, r):.2e}"


@pytest.fixture
def wgrad_calls(monkeypatch):
    """Force the triton backend and count the new kernel's launches (so a fallback can't pass silently)."""
    monkeypatch.setenv("AQCF_BACKEND", "triton")
    calls = []
    real = igemm_wgrad.conv_weight_grad_igemm

    def counting(*args, **kwargs):
        with_bias = kwargs.get("with_bias", args[4] if len(args) > 4 else False)
        calls.append((args[3].transposed, kwargs.get("algorithm", "hamilton"), with_bias))
        return real(*args, **kwargs)

    monkeypatch.setattr(igemm_wgrad, "conv_weight_grad_igemm", counting)
    return calls


@pytest.mark.parametrize("case", [CASES[2], CASES[7]], ids=[IDS[2], IDS[7]])
def test_backend_weight_grad_uses_the_gemm_kernel(case, wgrad_calls, python_kernels_on_cpu):
    """Through the public op: autograd's weight and bias gradients come from one launch of the split-K GEMM
    (``aqcf::qconv_weight_bias_grad``, served by its Python implementation as on a GPU), with either
    algorithm."""
    x, w, b = _make(case, torch.Generator().manual_seed(8))
    rw, rb, gy = _reference_grads(reference.quaternion_conv_naive, case, x, w, b, gy_seed=3)
    for algorithm in ("hamilton", "fast8"):
        wf = w.float().to(DEVICE).requires_grad_()
        bf = b.float().to(DEVICE).requires_grad_()
        y = QF.quaternion_conv(x.float().to(DEVICE), wf, bf, algorithm=algorithm, **_kwargs(case))
        y.backward(gy.float().to(DEVICE))
        assert _rel(wf.grad, rw) <= (1e-5 if algorithm == "hamilton" else 5e-4)
        assert _rel(bf.grad, rb) <= 1e-5
        assert wgrad_calls == [(case[1], algorithm, True)], algorithm
        wgrad_calls.clear()


def test_backend_weight_grad_without_a_bias_sums_none(wgrad_calls, python_kernels_on_cpu):
    """Without a bias the backward asks the GEMM for the weight gradient only (``aqcf::qconv_weight_grad``)."""
    case = CASES[7]
    x, w, b = _make(case, torch.Generator().manual_seed(9))
    wf = w.float().to(DEVICE).requires_grad_()
    y = QF.quaternion_conv(x.float().to(DEVICE), wf, None, algorithm="hamilton", **_kwargs(case))
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    y.backward(gy.float().to(DEVICE))
    rw = _reference_grads(reference.quaternion_conv_naive, case, x, w, b, gy_seed=4)[0]
    assert _rel(wf.grad, rw) <= 1e-5
    assert wgrad_calls == [(case[1], "hamilton", False)]


#: N·OD·OH·OW a multiple of igemm_wgrad.P_ALIGN (128 output pixels): every split is whole steps and the
#: loop has no pixel mask (P_EVEN); in 1d, 2d and 3d, with 1 and 2 splits (the second one empty here). With
#: each, the alignment said of both operands' channel runs (CHAN_ALIGN): runs of 36 and 40 channels (9 and 10
#: quaternion channels) start at multiples of 4, of 24 and 16 at multiples of 8, of 20 and 12 of 4.
EVEN_PIXEL_CASES = [
    ((2, False, 1, 1, 1, 1, 0, 10, 9, (8, 8), (3, 3)), 4),
    ((1, False, 1, 1, 1, 1, 0, 4, 6, (64,), (3,)), 8),
    ((3, False, 1, 1, 1, 1, 0, 3, 5, (4, 4, 4), (3, 3, 3)), 4),
]


@pytest.mark.parametrize("splits", [1, 2], ids=lambda s: f"splits{s}")
@pytest.mark.parametrize("case, align", EVEN_PIXEL_CASES, ids=["2d", "1d", "3d"])
def test_wgrad_whole_pixel_steps_without_pixel_mask(case, align, splits, launch_constexprs):
    launches = launch_constexprs(igemm_wgrad, "_wgrad_igemm")
    _check_fp32(case, splits=splits)
    assert [(c["P_EVEN"], c["DIMS"], c["CHAN_ALIGN"]) for c in launches] == [(True, case[0], align)]
