"""Quaternion max and average pooling and quaternion dropout over a hypothesis grid, against naive references.

tests/nn/test_pool.py holds them to their definitions on fixed cases; this grid draws (see :func:`pool_configs`,
:func:`dropout_configs`) the pool (max or average), 1d/2d/3d, batched (1-3) or unbatched ``(C, *S)``, 1-3 quaternion
channels, spatial sizes 1-7, kernel 1-3, the stride (default: the kernel, or 1-3), padding up to torch's limit (half
the kernel), dilation 1-3 (max), ceil_mode, return_indices (max), count_include_pad and divisor_override
(avg: 2d/3d, as torch's AvgPool1d has none), the input's memory layout (contiguous, channels_last, a strided view
whose gaps hold NaN, a transposed view) and the output gradient's, float64 / float32 / bfloat16 / float16, and the
values: normal, small integers (exact ties of the modulus between different quaternions, and components that tie
within one), or one large outlier per window row. For dropout: 0-3 spatial dims (0: ``(N, C)`` rows) or one
unbatched vector ``(C,)``, p in [0, 1] (0 and 1 included), channelwise or not, inplace or not, train or eval.

References, written plainly:

* max pool (:func:`reference_max_pool`): for each output position, the window's taps (``start + t·d`` inside the
  input), each quaternion's squared modulus ``r² + i² + j² + k²`` in float64, the first of the largest. The module
  takes its modulus in at least float32 (nn/pool.py), so where another tap's float64 modulus is within TIE (relative)
  of the largest, it may pick that one: the reference accepts the module's pick among those (exact ties included:
  "ties go to whichever position max_pool reports") and takes the gradient through it. A window that reads only
  padding must raise (nn/pool.py's own check).
* avg pool (:func:`reference_avg_pool`): for each output position the window's sum (torch's divisor rules written
  out: the window clipped to ``size + padding`` counts with count_include_pad, clipped to the input without; a
  divisor_override replaces both).
* dropout: the mask is random (the global generator seeded per example), so its structure is checked, not its
  values: the four components of a quaternion kept or dropped together, a channelwise mask constant over space, the
  kept values ``x / (1 − p)``, the gradient through the same mask, the share kept within 6 sigma of ``1 − p``, eval
  and ``p = 0`` the identity, ``p = 1`` all zeros, inplace writing into the input, the same seed the same output.

Criteria (``‖got − want‖ / ‖want‖`` over the whole tensor below float64): max pool outputs are selections, equal
exactly in every dtype, and the indices (return_indices) the picks, equal over the four components; float64
``torch.testing.assert_close`` defaults elsewhere; float32 the library's contract 1e-5; bfloat16 / float16 at most
twice the error of the same reference run in that dtype, with a floor of one rounding of the result (HALF_FLOOR eps:
on a few elements the reference in the dtype can be exact by chance). The average pools are ``F.avg_pool``: they
inherit torch's CPU limits (an input at least the kernel, padding aside) but one: torch's CPU avg_pool3d has no
float16 / bfloat16 kernel, and the 3d layer averages those in float32 (it raised torch's NotImplementedError). A
channels_last input gives a channels_last max pool output (nn/pool.py gathers it so, as torch's max pool does).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import pytest
import torch
from _grid import grid
from hypothesis import HealthCheck, assume, given
from hypothesis import strategies as st

from aqcf_kernels.nn import (
    QuaternionAvgPool1d,
    QuaternionAvgPool2d,
    QuaternionAvgPool3d,
    QuaternionDropout,
    QuaternionMaxPool1d,
    QuaternionMaxPool2d,
    QuaternionMaxPool3d,
)

from .test_norm_grid import _in_layout

pytestmark = pytest.mark.usefixtures("single_threaded")

F64 = torch.float64
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
MAXPOOL = {1: QuaternionMaxPool1d, 2: QuaternionMaxPool2d, 3: QuaternionMaxPool3d}
AVGPOOL = {1: QuaternionAvgPool1d, 2: QuaternionAvgPool2d, 3: QuaternionAvgPool3d}
#: float32's contract (README "Accuracy contract")
FP32_TOLERANCE = 1e-5
#: half precision: twice the reference's error in the dtype, at least one rounding (eps) norm-wise
HALF_FACTOR, HALF_FLOOR = 2.0, 1.0
#: the module's modulus is at least float32 (rounded squares and sums: a few float32 eps relative); taps whose float64
#: moduli are within TIE of the window's largest may be picked instead (float64 inputs: float64 moduli)
TIE = {torch.float64: 8 * torch.finfo(F64).eps}
TIE_LOW = 8 * torch.finfo(torch.float32).eps


@dataclass(frozen=True)
class PoolConfig:
    kind: str  # max | avg
    dims: int
    unbatched: bool
    batch: int
    cq: int
    spatial: tuple[int, ...]
    kernel: tuple[int, ...]
    stride: tuple[int, ...] | None  # None: the kernel (the modules' default)
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    ceil_mode: bool
    return_indices: bool
    count_include_pad: bool
    divisor_override: int | None
    layout: str
    grad_layout: str
    values: str  # normal | integers | outlier
    seed: int

    @property
    def shape(self) -> tuple[int, ...]:
        return (*(() if self.unbatched else (self.batch,)), 4 * self.cq, *self.spatial)

    @property
    def strides(self) -> tuple[int, ...]:
        return self.kernel if self.stride is None else self.stride

    def out_sizes(self) -> tuple[int, ...]:
        """torch's output size per dim (ceil_mode: the last window must start inside the input or its left padding)."""
        out = []
        for size, k, s, p, d in zip(self.spatial, self.kernel, self.strides, self.padding, self.dilation, strict=True):
            span = size + 2 * p - d * (k - 1) - 1
            o = (-(-span // s) if self.ceil_mode else span // s) + 1
            if self.ceil_mode and (o - 1) * s >= size + p:
                o -= 1
            out.append(o)
        return tuple(out)

    def module(self) -> torch.nn.Module:
        if self.kind == "max":
            return MAXPOOL[self.dims](
                self.kernel, self.stride, self.padding, self.dilation, self.return_indices, self.ceil_mode
            )
        if self.dims == 1:
            return AVGPOOL[1](self.kernel, self.stride, self.padding, self.ceil_mode, self.count_include_pad)
        return AVGPOOL[self.dims](
            self.kernel, self.stride, self.padding, self.ceil_mode, self.count_include_pad, self.divisor_override
        )


@st.composite
def pool_configs(draw) -> PoolConfig:
    kind = draw(st.sampled_from(["max", "avg"]))
    dims = draw(st.sampled_from([1, 2, 3]))
    unbatched = draw(st.booleans()) and draw(st.booleans())
    tup = lambda s: draw(st.tuples(*[s] * dims))  # noqa: E731
    kernel = tup(st.integers(1, 3))
    stride = None if draw(st.booleans()) else tup(st.integers(1, 3))
    dilation = tup(st.integers(1, 3)) if kind == "max" else (1,) * dims
    # torch's limit: padding at most half the kernel (whatever the dilation)
    padding = tuple(draw(st.integers(0, k // 2)) for k in kernel)
    layouts = ["contiguous", "strided", "transposed"] + (["channels_last"] if dims > 1 and not unbatched else [])
    c = PoolConfig(
        kind=kind, dims=dims, unbatched=unbatched, batch=draw(st.integers(1, 3)), cq=draw(st.integers(1, 3)),
        spatial=tup(st.integers(1, 7)), kernel=kernel, stride=stride, padding=padding, dilation=dilation,
        ceil_mode=draw(st.booleans()), return_indices=kind == "max" and draw(st.booleans()),
        count_include_pad=draw(st.booleans()),
        divisor_override=draw(st.sampled_from([None, None, 1, 3, 5])) if kind == "avg" and dims > 1 else None,
        layout=draw(st.sampled_from(layouts)), grad_layout=draw(st.sampled_from(["contiguous", "strided"])),
        values=draw(st.sampled_from(["normal", "integers", "outlier"])), seed=draw(st.integers(0, 2**31 - 1)),
    )  # fmt: skip
    assume(all(o >= 1 for o in c.out_sizes()))
    if kind == "avg" and dims == 3:  # torch's avg_pool3d also wants the input at least the kernel, padding aside
        assume(all(s >= k for s, k in zip(c.spatial, c.kernel, strict=True)))
    return c


def _input(c: PoolConfig, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(c.seed)
    batched = (c.batch if not c.unbatched else 1, 4 * c.cq, *c.spatial)
    if c.values == "integers":  # exact ties of the modulus, in every dtype
        x = torch.randint(-2, 3, batched, generator=g).to(F64)
    else:
        x = torch.randn(batched, generator=g, dtype=F64)
        if c.values == "outlier":  # one large quaternion per row of the last dim
            where = torch.randint(0, c.spatial[-1], (*batched[:-1], 1), generator=g)
            x = x + 30 * torch.zeros_like(x).scatter_(-1, where, 1.0)
    x = x[0] if c.unbatched else x
    return _in_layout(x.to(dtype), c.layout, c.unbatched)


def _output_grad(c: PoolConfig, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    g = torch.randn(shape, generator=torch.Generator().manual_seed(c.seed + 7), dtype=F64)
    return _in_layout(g.to(dtype), c.grad_layout)


# --------------------------------------------------------------------------------------------------
# References: one output position at a time
# --------------------------------------------------------------------------------------------------


def _windows(c: PoolConfig):
    """For each output position (row-major), the taps of its window inside the input, as flat spatial indices, and
    per dim the window's (start, end) clipped to ``size + padding`` and to the input (the avg pool's divisors)."""
    strides = [math.prod(c.spatial[d + 1 :]) for d in range(c.dims)]
    for out in itertools.product(*[range(o) for o in c.out_sizes()]):
        taps_per_dim, spans = [], []
        for d, o in enumerate(out):
            start = o * c.strides[d] - c.padding[d]
            taps = [start + t * c.dilation[d] for t in range(c.kernel[d])]
            taps_per_dim.append([t for t in taps if 0 <= t < c.spatial[d]])
            end = min(start + c.kernel[d], c.spatial[d] + c.padding[d])
            spans.append((end - start, min(end, c.spatial[d]) - max(start, 0)))
        flat = [sum(i * s for i, s in zip(pos, strides, strict=True)) for pos in itertools.product(*taps_per_dim)]
        yield out, flat, spans


def reference_avg_pool(c: PoolConfig, x: torch.Tensor) -> torch.Tensor:
    """``x`` batched ``(N, C, *S)``: each window's sum over its taps divided by torch's divisor, in x's dtype."""
    n, ch = x.shape[:2]
    flat = x.flatten(2)
    outs = []
    for _, taps, spans in _windows(c):
        if c.divisor_override is not None:
            divisor = c.divisor_override
        elif c.count_include_pad:
            divisor = math.prod(full for full, _ in spans)
        else:
            divisor = math.prod(inside for _, inside in spans)
        outs.append(flat[:, :, taps].sum(-1) / divisor)
    return torch.stack(outs, -1).view(n, ch, *c.out_sizes())


def reference_max_pool(
    c: PoolConfig, x: torch.Tensor, got: torch.Tensor, tie: float
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The quaternion of largest float64 modulus of each window of a batched ``x``, gathered from ``x`` (its
    gradient scatters to the picks), and the picks (flat spatial indices, ``(N, C, *out)``, equal over the four
    components). Of the taps whose modulus is within ``tie`` (relative) of the largest, the one that the module's
    output ``got`` holds (the first such), else the first of the largest. None: a window reads only padding."""
    n, ch = x.shape[:2]
    cq = ch // 4
    x4 = x.flatten(2).unflatten(1, (4, cq))  # (N, 4, Cq, L)
    modulus = x4.detach().double().square().sum(1)  # (N, Cq, L)
    got4 = got.detach().flatten(2).unflatten(1, (4, cq))
    picks = []
    for o, (_, taps, _) in enumerate(_windows(c)):
        if not taps:
            return None
        m = modulus[:, :, taps]  # (N, Cq, P)
        best = m.max(-1, keepdim=True).values
        candidate = m >= best * (1 - tie)
        holds = (x4[:, :, :, taps].detach() == got4[:, :, :, o : o + 1]).all(1)  # (N, Cq, P)
        ok = candidate & holds
        first_ok = ok.int().argmax(-1)
        first_best = (m == best).int().argmax(-1)
        pick = torch.where(ok.any(-1), first_ok, first_best)
        picks.append(torch.tensor(taps)[pick])
    index = torch.stack(picks, -1)  # (N, Cq, L_out)
    y = x4.gather(3, index.unsqueeze(1).expand(n, 4, cq, -1))
    return y.reshape(n, ch, *c.out_sizes()), index.unsqueeze(1).expand(n, 4, cq, -1).reshape(n, ch, *c.out_sizes())


# --------------------------------------------------------------------------------------------------
# The pool grid
# --------------------------------------------------------------------------------------------------

# Examples per test sized for CI; a longer hunt multiplies them: AQCF_GRID_SCALE=20 pytest <this file>.
GRID = grid(750, HealthCheck.filter_too_much)


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    diff = (got - want).norm().item()
    return 0.0 if diff == 0 else diff / max(want.norm().item(), 1e-300)


def _check_close(got: torch.Tensor, want64: torch.Tensor, want_lo: torch.Tensor, what: str, c) -> None:
    """float64 element-wise, below it norm-wise: float32 the contract, half precision twice the reference's error in
    the dtype (at least one rounding)."""
    dtype = got.dtype
    assert got.shape == want64.shape, (what, got.shape, want64.shape, c)
    if dtype == F64:
        torch.testing.assert_close(got, want64, msg=lambda m: f"{what}: {m} ({c})")
        return
    error, lo_error = _rel(got, want64), _rel(want_lo, want64)
    if not math.isfinite(lo_error):  # the reference in the dtype overflowed where nothing was kept: no bound from it
        lo_error = 0.0
    if dtype == torch.float32:
        bound = FP32_TOLERANCE
    else:
        bound = max(HALF_FACTOR * lo_error, HALF_FLOOR * torch.finfo(dtype).eps)
    assert error <= bound, (
        f"{dtype} {what}: relative error {error:.3g}, the reference's in the dtype {lo_error:.3g} ({c})"
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp64", "fp32", "bf16", "fp16"])
@GRID
@given(c=pool_configs())
def test_pool_matches_the_naive_reference(dtype, c):
    layer = c.module()
    x = _input(c, dtype).requires_grad_()
    xb = x.unsqueeze(0) if c.unbatched else x
    if c.kind == "max":
        # a window of padding only must raise
        if any(not taps for _, taps, _ in _windows(c)):
            with pytest.raises(ValueError, match="a pooling window holds only padding"):
                layer(x)
            return
    out = layer(x)
    y, idx = out if c.kind == "max" and c.return_indices else (out, None)
    assert y.dtype == dtype and y.shape == (*c.shape[: 2 - c.unbatched], *c.out_sizes())
    gy = _output_grad(c, tuple(y.shape), dtype)
    (gx,) = torch.autograd.grad(y, x, gy)
    assert gx.shape == x.shape and gx.dtype == dtype
    yb = y.unsqueeze(0) if c.unbatched else y
    gyb = gy.unsqueeze(0) if c.unbatched else gy

    def ref(ref_dtype):
        xr = xb.detach().to(ref_dtype).contiguous().requires_grad_()
        if c.kind == "max":
            tie = TIE.get(dtype, TIE_LOW)
            yr, picks = reference_max_pool(c, xr, yb, tie)
        else:
            yr, picks = reference_avg_pool(c, xr), None
        (gr,) = torch.autograd.grad(yr, xr, gyb.to(ref_dtype))
        return yr.detach(), gr, picks

    y64, g64, picks = ref(F64)
    y_lo, g_lo, _ = ref(dtype)
    if c.unbatched:
        y64, g64, y_lo, g_lo = y64[0], g64[0], y_lo[0], g_lo[0]
        picks = None if picks is None else picks[0]
    if c.kind == "max":
        # a selection: the very values, in every dtype
        assert torch.equal(y.detach().double(), y64), f"max pool output: {(y.double() - y64).abs().max()} ({c})"
        if idx is not None:
            assert idx.dtype == torch.int64 and torch.equal(idx, picks), f"indices differ from the picks ({c})"
        if c.layout == "channels_last" and not x.is_contiguous():
            fmt = torch.channels_last if c.dims == 2 else torch.channels_last_3d
            assert y.is_contiguous(memory_format=fmt), f"a channels_last input gives a channels_last output ({c})"
    else:
        _check_close(y, y64, y_lo, "forward", c)
    _check_close(gx, g64, g_lo, "input gradient", c)


# --------------------------------------------------------------------------------------------------
# Dropout: the mask's structure
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DropoutConfig:
    dims: int  # spatial dims; -1: one unbatched vector (C,)
    batch: int
    cq: int
    spatial: tuple[int, ...]
    p: float
    channelwise: bool
    inplace: bool
    training: bool
    layout: str
    seed: int

    @property
    def shape(self) -> tuple[int, ...]:
        if self.dims < 0:
            return (4 * self.cq,)
        return (self.batch, 4 * self.cq, *self.spatial)


@st.composite
def dropout_configs(draw) -> DropoutConfig:
    dims = draw(st.sampled_from([-1, 0, 1, 2, 3]))
    spatial = draw(st.tuples(*[st.integers(1, 7)] * max(dims, 0)))
    layouts = (
        ["contiguous"] + (["strided", "transposed"] if dims >= 0 else []) + (["channels_last"] if dims > 1 else [])
    )
    return DropoutConfig(
        dims=dims, batch=draw(st.integers(1, 3)), cq=draw(st.integers(1, 4)), spatial=spatial,
        p=draw(st.one_of(st.sampled_from([0.0, 1.0, 0.5, 0.1, 0.9]), st.floats(0.0, 1.0))),
        channelwise=draw(st.booleans()), inplace=draw(st.booleans()),
        training=draw(st.sampled_from([True, True, False])),
        layout=draw(st.sampled_from(layouts)), seed=draw(st.integers(0, 2**31 - 1)),
    )  # fmt: skip


def _dropout_input(c: DropoutConfig, dtype: torch.dtype) -> torch.Tensor:
    """Values of size 0.5-2.5 with random signs: a dropped element is exactly the zeros in the output."""
    g = torch.Generator().manual_seed(c.seed)
    x = (0.5 + 2 * torch.rand(c.shape, generator=g, dtype=F64)) * torch.randint(0, 2, c.shape, generator=g).mul(2).sub(
        1
    )
    if c.layout == "transposed" and x.dim() < 2:
        return x.to(dtype)
    return _in_layout(x.to(dtype), c.layout)


def _run_dropout(c: DropoutConfig, dtype: torch.dtype, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's output and the gradient of ``<g, y>`` with respect to ``x``, under the example's seed. An inplace
    layer writes into a non-leaf copy of ``x`` (what autograd allows)."""
    layer = QuaternionDropout(c.p, inplace=c.inplace, channelwise=c.channelwise).train(c.training)
    leaf = x.detach().clone().requires_grad_()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(c.seed)
        inp = leaf * 1 if c.inplace else leaf
        before = inp.data_ptr()
        y = layer(inp)
    if c.inplace:
        assert y.data_ptr() == before, "inplace: the output is not the input"
    gy = torch.randn(c.shape, generator=torch.Generator().manual_seed(c.seed + 7), dtype=F64).to(dtype)
    (gx,) = torch.autograd.grad(y, leaf, gy)
    return y.detach(), gx, gy


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp64", "fp32", "bf16", "fp16"])
@grid(300, HealthCheck.filter_too_much)
@given(c=dropout_configs())
def test_dropout_drops_whole_quaternions(dtype, c):
    x = _dropout_input(c, dtype)
    y, gx, gy = _run_dropout(c, dtype, x)
    assert y.shape == x.shape and y.dtype == dtype and gx.dtype == dtype
    if not c.training or c.p == 0.0:
        assert torch.equal(y, x) and torch.equal(gx, gy), f"not the identity ({c})"
        return
    if c.p == 1.0:
        assert not y.any() and not gx.any(), f"p = 1 keeps something ({c})"
        return
    # the same seed, the same mask
    y2, _, _ = _run_dropout(c, dtype, x)
    assert torch.equal(y, y2), f"the same seed gave another mask ({c})"
    rows = (1, *c.shape) if c.dims < 0 else c.shape
    kept = (y != 0).reshape(rows).unflatten(1, (4, c.cq))  # (N, 4, Cq, *S)
    assert torch.equal(kept.all(1), kept.any(1)), f"a quaternion's components dropped apart ({c})"
    mask = kept[:, 0]  # (N, Cq, *S)
    if c.channelwise and mask.dim() > 2:
        flat = mask.flatten(2)
        assert torch.equal(flat.all(-1), flat.any(-1)), f"channelwise: a feature map dropped in part ({c})"
        mask = flat[..., 0]
    assert torch.equal(gx != 0, y != 0), f"the gradient's mask is not the output's ({c})"
    # the share kept: a binomial count of the independent draws, within 6 sigma
    m = mask.numel()
    sigma = math.sqrt(m * c.p * (1 - c.p))
    assert abs(mask.sum().item() - m * (1 - c.p)) <= 6 * sigma + 1, (mask.sum().item(), m, c)
    # kept values and gradients: x / (1 − p), g / (1 − p)
    keep = (y != 0).to(F64)
    scale = 1.0 / (1.0 - c.p)
    if (
        scale * 2.5 > torch.finfo(dtype).max
    ):  # x / (1 − p) does not fit the dtype (fp16, p > 0.9999): nothing to compare
        return
    for what, got, src in (("output", y, x), ("input gradient", gx, gy)):
        want64 = src.double() * scale * keep
        want_lo = (src * scale).double() * keep  # the scaling in the dtype: one rounding
        _check_close(got.double() * keep if dtype == F64 else got, want64, want_lo, what, c)
