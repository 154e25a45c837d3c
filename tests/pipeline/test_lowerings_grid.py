"""Every plain-PyTorch lowering of :func:`aqcf_kernels.ops.lowerings.lowerings` against the ``aqcf`` op it lowers,
over a hypothesis grid, and ``torch.export`` programs of small layers against the eager layers once
:func:`aqcf_kernels.pipeline.export.lower_custom_ops` replaced their ops.

The op grids call ``lowering(*args)`` and ``torch.ops.aqcf.<op>(*args)`` eagerly on the same arguments, drawn as
the layers of :mod:`aqcf_kernels.nn` pass them (a conv's geometry goes through
:func:`aqcf_kernels.params.check_conv_args`, the function the layers call, so the op gets exactly the resolved
geometry and the extra padding a layer gives it):

* ``qconv``: 1d/2d/3d, plain or transposed, groups 1-3, stride/dilation 1-2, int/``'same'``/``'valid'`` padding,
  output padding under torch's rule, bias or not, activation None/relu/leaky_relu (slopes negative, zero, positive,
  above 1)/gelu, algorithm auto/hamilton/fast8, kind forward/input_grad;
* ``qnorm``: 1-3 spatial dims, batch or per-sample (instance) statistics, training (input statistics, running
  statistics passed or not) or eval (running statistics, in the input's dtype or the other one), weight and bias
  each present or not, eps, activations, per-real-channel offsets;
* ``cross_attention``: batch, heads, head width, a query and a key/value token count per stream (single tokens,
  and counts that differ per side), the default ``1/sqrt(E)`` scale or another, sharp and flat softmaxes;
* ``gated_residual``: inputs of rank 1-4 with every gate shape that broadcasts to them (the block's token gate
  ``(B, C, N)`` and channel gate ``(B, C, 1)`` among them), ``alpha`` of rank 0 up to two more than the input's
  (the op's fake shape checked too);
* ``rnn_sequence``: rnn (tanh, relu), lstm, ligru (relu, tanh, leaky_relu with negative, zero and positive
  slopes), forward or reverse, sequence lengths from 0, zero initial states (a layer's ``hx=None``, with ``c0``
  the same tensor as ``h0`` as the layers pass it) or random ones;

in float64 and float32 (every op serves both on CPU), from fresh random values (never zeros), with inputs
contiguous, channels_last, strided over NaN-filled gaps (a kernel that reads the wrong strides poisons its
output), transposed in memory, or expanded (a stride-0 batch, the block's shared batch-1 stream).

Each output of the lowering is held to the op's: the same number of outputs, the same shapes (so an auxiliary
output that is an empty placeholder in one is empty in the other), dtypes and device, and values within
:data:`TOL` (norm-wise relative error as the design's numerical contract measures it, over the whole tensor and
per quaternion component where an output is blocked ``[r|i|j|k]``).

The export grid exports a small layer (conv, conv+norm+act unit, norms in training and eval mode, the A-QCF
block, the recurrent layers), lowers it with ``lower_custom_ops``, checks that no ``aqcf`` op is left in any graph
of the program (nested ones included) and that the lowered program's outputs, and in training mode the running
statistics it updates (the graph reads the norm's statistics outputs for them), equal the eager layer's.

``rnn_sequence``'s lowering has a second form, one ``scan``, for a symbolic sequence length (what an export with
a dynamic length gives it; never an eager call): two small grids export the op itself (all three outputs) and
bidirectional recurrent layers with an initial state, with a dynamic length, lower them with
``lower_custom_ops``, and compare with the op and the layer at lengths other than the traced one.

Faults the grid found, all fixed, are kept as fixed cases at the end of the module: the float64 log-sum-exp of the
attention lowering (float32-accurate), ``lower_custom_ops`` refusing the scan, the lowerings' outputs for an empty
sequence and for eval-mode statistics in another dtype, and two faults of the ops themselves met on the way (a
strided conv bias read as dense memory by the compiled CPU conv engine, the gate's fake shape). The grids now draw
over them: float64 log-sum-exps held to float64's tolerance, the conv bias in strided layouts, empty sequences,
running statistics of the other dtype, alphas of more dims than the input, the dynamic-length grids through
``lower_custom_ops``.

Examples per test are sized for the default run (~30 s on one core); ``AQCF_GRID_SCALE=8`` multiplies them for
a longer hunt.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from _grid import grid
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nn._conv_geometry import draw_geometry, output_size  # (tests/nn: pytest puts tests/ on sys.path)
from torch import Tensor, nn
from torch.export import Dim
from torch.utils._pytree import tree_leaves

from aqcf_kernels import nn as qnn
from aqcf_kernels.layout import split_heads
from aqcf_kernels.ops.lowerings import lowerings
from aqcf_kernels.params import check_conv_args
from aqcf_kernels.pipeline.export import lower_custom_ops

F64, F32 = torch.float64, torch.float32
DTYPES = pytest.mark.parametrize("dtype", [F64, F32], ids=["fp64", "fp32"])
OPS = torch.ops.aqcf
LOWERING = lowerings()

#: Norm-wise relative error allowed between a lowering's output and the op's.
#: float64: both sides are sums of at most a few hundred products, each ~1e-16 relative; what they do differently
#: is the order of those sums (expanded-weight conv vs Hamilton blocks or fast8's transforms, a composite norm vs
#: the fused pass's corrected two-pass variance, SDPA vs matmul/softmax/matmul, the C++ recurrence vs addmm):
#: measured up to ~4e-16. 1e-12 leaves four orders of magnitude for that, while a wrong term (a sign, a missing
#: activation, a wrong statistic, a step out of order) is O(1).
#: float32: the contract (DESIGN.md) holds every path to 1e-5 of the float64 truth; the op and its lowering
#: are two such paths, so they may be 2e-5 apart (measured ~1e-7).
TOL = {F64: 1e-12, F32: 2e-5}
#: fast8 in float32 is held to 5e-4 of the truth by the contract (its transforms add and subtract components
#: before multiplying); the lowering (the expanded-weight conv) to 1e-5.
FAST8_TOL32 = 5e-4 + 1e-5
#: A component block whose norm is below this share of the whole output's is not measured on its own scale (a
#: ReLU can leave one nearly empty: one element of 1e-9 that one side rounds to 0 is not an error of 100%).
COMPONENT_FLOOR = 0.1


# Examples per test sized for the default run; a longer hunt multiplies them: AQCF_GRID_SCALE=8 pytest <this file>.
def _grid(examples: int) -> settings:
    return grid(examples, HealthCheck.filter_too_much, HealthCheck.data_too_large)


pytestmark = pytest.mark.usefixtures("single_threaded")


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def _random(shape: tuple[int, ...], seed: int, dtype: torch.dtype, scale: float = 1.0, offset: float = 0.0) -> Tensor:
    """Normal values drawn in float64 from ``seed`` (the same values, rounded, in every dtype): never zeros."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=F64) * scale + offset).to(dtype)


def _in_layout(t: Tensor, layout: str) -> Tensor:
    """``t``'s values in a tensor of the given memory layout. ``strided``: every other element of a buffer whose
    gaps hold NaN; ``transposed``: the last two dims swapped in memory; ``channels_last`` for 4-D/5-D tensors
    (others stay contiguous)."""
    if layout == "channels_last" and t.dim() in (4, 5):
        out = t.contiguous(memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d).clone()
    elif layout == "strided" and t.dim() >= 1:
        wide = torch.full((*t.shape[:-1], 2 * t.shape[-1]), float("nan"), dtype=t.dtype)
        out = wide[..., ::2]
        out.copy_(t)
    elif layout == "transposed" and t.dim() >= 2:
        out = torch.empty((*t.shape[:-2], t.shape[-1], t.shape[-2]), dtype=t.dtype).transpose(-1, -2)
        out.copy_(t)
    else:
        out = t.contiguous().clone()
    assert out.shape == t.shape and torch.equal(out, t)
    return out


def _rel(got: Tensor, want: Tensor, size: Tensor | None = None) -> float:
    """‖got − want‖ / ‖size‖ (``size`` defaults to ``want``) in float64: 0 for equal tensors, inf where the size is
    0 and they differ."""
    diff = (got.double() - want.double()).norm().item()
    norm = (want if size is None else size).double().norm().item()
    return 0.0 if diff == 0 else diff / norm if norm > 0 else math.inf


def _check_outputs(
    got: Any,
    want: Any,
    tol: float | dict[int, float],
    blocked: dict[int, int] | None = None,
    magnitude: dict[int, Tensor] | None = None,
) -> None:
    """Every output of the lowering (``got``) against the op's (``want``): count, shapes, dtypes, devices, values.

    ``tol``: the relative error allowed, or per output index. ``blocked``: output index -> its ``[r|i|j|k]``
    dim, measured per component too (the contract's per-component error). ``magnitude``: output index -> the
    size its error is relative to, where that is not the output's own (a sum whose terms may cancel)."""
    got_t = (got,) if isinstance(got, Tensor) else tuple(got)
    want_t = (want,) if isinstance(want, Tensor) else tuple(want)
    assert len(got_t) == len(want_t), f"the lowering returns {len(got_t)} outputs, the op {len(want_t)}"
    for i, (g, w) in enumerate(zip(got_t, want_t, strict=True)):
        assert isinstance(g, Tensor), f"output {i}: the lowering returns {type(g).__name__}"
        assert g.shape == w.shape, f"output {i}: shape {tuple(g.shape)}, the op's {tuple(w.shape)}"
        assert g.dtype == w.dtype, f"output {i}: dtype {g.dtype}, the op's {w.dtype}"
        assert g.device == w.device, f"output {i}: device {g.device}, the op's {w.device}"
        if w.numel() == 0:
            continue
        # Finite inputs of moderate size: the op's outputs must be finite (then NaN in the lowering's is an error).
        assert torch.isfinite(w).all(), f"output {i}: the op's output is not finite"
        limit = tol[i] if isinstance(tol, dict) else tol
        size = (magnitude or {}).get(i, w)
        err = _rel(g, w, size)
        assert err <= limit, f"output {i}: relative error {err:.3g} > {limit:.1g}"
        dim = (blocked or {}).get(i)
        if dim is not None:
            whole = w.double().norm().item()
            for c, (gc, wc) in enumerate(zip(g.chunk(4, dim), w.chunk(4, dim), strict=True)):
                diff = (gc.double() - wc.double()).norm().item()
                scale = max(wc.double().norm().item(), COMPONENT_FLOOR * whole)
                assert diff <= limit * scale, (
                    f"output {i}, component {'rijk'[c]}: error {diff / scale:.3g} > {limit:.1g}"
                )


def _lowering(op: Any) -> Any:
    return LOWERING[op.default]


def test_the_grid_covers_every_lowering() -> None:
    """The op grids below test exactly the ops ``lowerings()`` lowers: a lowering added without a grid fails here."""
    assert set(LOWERING) == {
        OPS.qconv.default,
        OPS.qnorm.default,
        OPS.cross_attention.default,
        OPS.gated_residual.default,
        OPS.rnn_sequence.default,
    }


# --------------------------------------------------------------------------------------------------
# qconv
# --------------------------------------------------------------------------------------------------

ACTIVATIONS = [
    (None, 0.01),
    ("relu", 0.01),
    ("leaky_relu", 0.01),
    ("leaky_relu", 0.2),
    ("leaky_relu", 0.0),  # ReLU's values through leaky_relu; y > 0 still iff z > 0: no pre-activation kept
    ("leaky_relu", -0.3),  # a negative slope: the op keeps the pre-activation
    ("leaky_relu", 1.5),
    ("gelu", 0.01),
]


@dataclasses.dataclass(frozen=True)
class ConvCase:
    dims: int
    transposed: bool
    groups: int
    cin: int  # quaternion input channels per group
    cout: int  # quaternion output channels per group
    batch: int
    spatial: tuple[int, ...]
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    output_padding: tuple[int, ...]
    bias: bool
    activation: str | None
    slope: float
    algorithm: str
    kind: str
    layout: str
    weight_layout: str
    bias_layout: str
    seed: int

    def args(self, dtype: torch.dtype) -> tuple:
        """The op's 13 arguments as a layer passes them: geometry resolved by ``check_conv_args`` (``'same'``
        with an even kernel, output padding of a stride or more: the extra right padding applied to the input)."""
        g = self.groups
        x = _random((self.batch, 4 * g * self.cin, *self.spatial), self.seed, dtype)
        wshape = (4, g * self.cin, self.cout) if self.transposed else (4, g * self.cout, self.cin)
        fan = self.cin * math.prod(self.kernel)
        w = _random((*wshape, *self.kernel), self.seed + 1, dtype, scale=fan**-0.5)
        b = _random((4 * g * self.cout,), self.seed + 2, dtype, scale=0.5) if self.bias else None
        geometry = (self.stride, self.padding, self.dilation, g, self.transposed, self.output_padding)
        p, extra = check_conv_args(x, w, b, self.dims, *geometry, self.algorithm)
        if any(extra):  # what the functional conv does before calling the op
            x = F.pad(x, [v for e in reversed(extra) for v in (0, e)])
        x, w = _in_layout(x, self.layout), _in_layout(w, self.weight_layout)
        b = None if b is None else _in_layout(b, self.bias_layout)  # (1-D: contiguous or strided over NaN gaps)
        return (x, w, b, *p.as_op_args(), self.algorithm, self.activation, self.slope, self.kind)


@st.composite
def conv_cases(draw) -> ConvCase:
    dims = draw(st.integers(1, 3))
    transposed = draw(st.booleans())
    # The layer grids' geometry; its padding mode is left out: a layer pads in its mode before calling the op, which
    # pads with zeros only.
    geo = draw_geometry(draw, dims, transposed, max_kernel=3 if dims < 3 else 2)
    kernel, stride, dilation, padding, output_padding = (
        geo.kernel, geo.stride, geo.dilation, geo.padding, geo.output_padding
    )  # fmt: skip
    # The smallest input with an output in every dim, then 0-3 more (0-1 in 3d).
    spatial = [1] * dims
    for i in range(dims):
        while output_size(spatial, transposed, kernel, stride, padding, dilation, output_padding)[i] < 1:
            spatial[i] += 1
    spatial = [s + draw(st.integers(0, 1 if dims == 3 else 3)) for s in spatial]
    activation, slope = draw(st.sampled_from(ACTIVATIONS))
    layouts = ["contiguous", "strided", "transposed"] + (["channels_last"] if dims > 1 else [])
    return ConvCase(
        dims=dims,
        transposed=transposed,
        groups=draw(st.integers(1, 3)),
        cin=draw(st.integers(1, 2)),
        cout=draw(st.integers(1, 2)),
        batch=draw(st.integers(1, 2)),
        spatial=tuple(spatial),
        kernel=kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        output_padding=output_padding,
        bias=draw(st.booleans()),
        activation=activation,
        slope=slope,
        algorithm=draw(st.sampled_from(["auto", "hamilton", "fast8"])),
        kind=draw(st.sampled_from(["forward", "forward", "input_grad"])),
        layout=draw(st.sampled_from(layouts)),
        weight_layout=draw(st.sampled_from(["contiguous", "contiguous", "strided", "transposed"])),
        bias_layout=draw(st.sampled_from(["contiguous", "strided"])),
        seed=draw(st.integers(0, 2**20)),
    )


@DTYPES
@_grid(400)
@given(c=conv_cases())
def test_qconv_lowering_matches_the_op(dtype: torch.dtype, c: ConvCase) -> None:
    """``(y, pre)``: ``pre`` the pre-activation where the op keeps it (GELU, a negative slope), else empty in both."""
    args = c.args(dtype)
    want = OPS.qconv(*args)
    got = _lowering(OPS.qconv)(*args)
    tol = FAST8_TOL32 if c.algorithm == "fast8" and dtype == F32 else TOL[dtype]
    _check_outputs(got, want, tol, blocked={0: 1, 1: 1})


# --------------------------------------------------------------------------------------------------
# qnorm
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class NormCase:
    batch: int
    cq: int
    spatial: tuple[int, ...]
    per_sample: bool
    use_input_stats: bool
    running: bool  # running statistics passed (always in eval)
    weight: bool
    bias: bool
    eps: float
    activation: str | None
    slope: float
    offset: float
    layout: str
    stats_dtype: str  # the running statistics' dtype: same (the input's) | other (a layer of the other dtype)
    seed: int

    def args(self, dtype: torch.dtype) -> tuple:
        cq = self.cq
        x = _random((self.batch, 4 * cq, *self.spatial), self.seed, dtype)
        # per-real-channel offsets and scales, so centring and the shared variance matter
        shift = _random((1, 4 * cq, *[1] * len(self.spatial)), self.seed + 1, dtype, scale=self.offset)
        x = x * (1 + _random(shift.shape, self.seed + 2, dtype, scale=0.3).abs()) + shift
        weight = _random((cq,), self.seed + 3, dtype, offset=1.0) if self.weight else None
        bias = _random((4 * cq,), self.seed + 4, dtype, scale=0.5) if self.bias else None
        mean = var = None
        if self.running:
            sdt = dtype if self.stats_dtype == "same" else (F32 if dtype == F64 else F64)
            mean = _random((4 * cq,), self.seed + 5, sdt, scale=0.5)
            var = _random((cq,), self.seed + 6, sdt).abs() + 0.5  # a variance: positive
        return (
            _in_layout(x, self.layout), weight, bias, mean, var, self.use_input_stats, self.per_sample, self.eps,
            self.activation, self.slope,
        )  # fmt: skip


@st.composite
def norm_cases(draw) -> NormCase:
    dims = draw(st.integers(1, 3))
    spatial = list(draw(st.tuples(*[st.integers(1, 5 if dims < 3 else 3)] * dims)))
    batch, per_sample, use_input_stats = draw(st.integers(1, 3)), draw(st.booleans()), draw(st.booleans())
    count = math.prod(spatial) * (1 if per_sample else batch)
    if use_input_stats and count <= 1:  # training needs more than one value per statistic (the layers refuse it)
        spatial[0] = 2
    activation, slope = draw(st.sampled_from(ACTIVATIONS))
    return NormCase(
        batch=batch,
        cq=draw(st.integers(1, 3)),
        spatial=tuple(spatial),
        per_sample=per_sample,
        use_input_stats=use_input_stats,
        # in training the layers pass no running statistics (they update them from the op's outputs); the schema
        # takes them, and the op must ignore them then
        running=not use_input_stats or draw(st.booleans()),
        weight=draw(st.booleans()),
        bias=draw(st.booleans()),
        eps=draw(st.sampled_from([1e-5, 1e-3, 0.1])),
        activation=activation,
        slope=slope,
        offset=draw(st.sampled_from([0.0, 1.0, 3.0])),
        layout=draw(st.sampled_from(["contiguous", "channels_last", "strided", "transposed"])),
        stats_dtype=draw(st.sampled_from(["same", "same", "other"])),
        seed=draw(st.integers(0, 2**20)),
    )


@DTYPES
@_grid(300)
@given(c=norm_cases())
def test_qnorm_lowering_matches_the_op(dtype: torch.dtype, c: NormCase) -> None:
    """``(y, mean, var)``: the statistics used, ``(G, 4Cq)`` and ``(G, Cq)`` (``G`` the batch for per-sample input
    statistics, else 1), the input's in training and the running ones in eval. The running statistics passed
    in training are not written to."""
    args = c.args(dtype)
    running = [None if t is None else t.clone() for t in args[3:5]]
    want = OPS.qnorm(*args)
    got = _lowering(OPS.qnorm)(*args)
    _check_outputs(got, want, TOL[dtype], blocked={0: 1, 1: 1})
    for before, after in zip(running, args[3:5], strict=True):
        assert before is None or torch.equal(before, after), "the lowering wrote to the running statistics"


# --------------------------------------------------------------------------------------------------
# cross_attention
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AttentionCase:
    batch: int
    heads: int
    d: int  # quaternion channels per head: E = 4·d
    tokens: tuple[int, int, int, int]  # queries a, keys/values a, queries b, keys/values b
    scale: float | None  # None: the functional's default 1/sqrt(E)
    spread: float  # the scores' size: sharp or flat softmaxes
    layout: str  # contiguous | heads (split_heads of a blocked (B, 4·H·d, N)) | strided | transposed | broadcast
    seed: int

    def args(self, dtype: torch.dtype) -> tuple:
        e = 4 * self.d
        out = []
        for i, n in enumerate((self.tokens[0], self.tokens[1], self.tokens[1], self.tokens[2], self.tokens[3],
                               self.tokens[3])):  # fmt: skip
            stream_b = i >= 3
            batch = 1 if self.layout == "broadcast" and stream_b else self.batch
            if self.layout == "heads":  # the block's path: a blocked token tensor, split per head
                t = split_heads(_random((batch, e * self.heads, n), self.seed + i, dtype, self.spread), self.heads)
            else:
                t = _in_layout(_random((batch, self.heads, n, e), self.seed + i, dtype, self.spread), self.layout)
            if batch != self.batch:  # a shared batch-1 stream (the block with f_b of batch 1): stride-0 views
                t = t.expand(self.batch, -1, -1, -1)
            out.append(t)
        scale = e**-0.5 if self.scale is None else self.scale
        return (*out, scale)


@st.composite
def attention_cases(draw) -> AttentionCase:
    return AttentionCase(
        batch=draw(st.integers(1, 2)),
        heads=draw(st.integers(1, 3)),
        d=draw(st.integers(1, 3)),
        tokens=draw(st.tuples(*[st.integers(1, 6)] * 4)),
        scale=draw(st.sampled_from([None, None, 0.05, 1.0])),
        spread=draw(st.sampled_from([0.3, 1.0, 3.0])),
        layout=draw(st.sampled_from(["contiguous", "heads", "strided", "transposed", "broadcast"])),
        seed=draw(st.integers(0, 2**20)),
    )


@DTYPES
@_grid(250)
@given(c=attention_cases())
def test_cross_attention_lowering_matches_the_op(dtype: torch.dtype, c: AttentionCase) -> None:
    """``(out_a, out_b, lse_a, lse_b)``: each direction's output and the log-sum-exp of its score rows, in float32
    (float64 for float64 inputs)."""
    args = c.args(dtype)
    want = OPS.cross_attention(*args)
    got = _lowering(OPS.cross_attention)(*args)
    # A log-sum-exp is measured against the size of the scores it sums, not its own: its error is a weighted mean of
    # the scores' errors, each a rounding of a dot product of size (|q|·|k|)·scale, and a row's log-sum-exp may be
    # ~0 where those are O(1) (one key token whose score is nearly 0).
    q_a, k_a, _, q_b, k_b, _ = (t.double() for t in args[:6])
    scale = args[6]

    def scores_size(q: Tensor, k: Tensor, lse: Tensor) -> Tensor:
        return (q.abs() @ k.abs().transpose(-1, -2)).amax(-1) * scale + lse.double().abs()

    magnitude = {2: scores_size(q_a, k_b, want[2]), 3: scores_size(q_b, k_a, want[3])}
    _check_outputs(got, want, TOL[dtype], magnitude=magnitude)


# --------------------------------------------------------------------------------------------------
# gated_residual
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GateCase:
    shape: tuple[int, ...]
    gate_shape: tuple[int, ...]
    alpha_rank: int
    layout: str
    gate_layout: str
    seed: int

    def args(self, dtype: torch.dtype) -> tuple:
        f = _in_layout(_random(self.shape, self.seed, dtype), self.layout)
        o = _in_layout(_random(self.shape, self.seed + 1, dtype), self.layout)
        g = _in_layout(_random(self.gate_shape, self.seed + 2, dtype, scale=2.0), self.gate_layout)
        alpha = _random((1,) * self.alpha_rank, self.seed + 3, dtype)
        return f, o, g, alpha


@st.composite
def gate_cases(draw) -> GateCase:
    shape = draw(st.lists(st.integers(1, 5), min_size=1, max_size=4).map(tuple))
    kind = draw(st.sampled_from(["token", "channel", "any"]))
    if kind == "token":  # the block's 'token' gate: f's shape
        gate_shape = shape
    elif kind == "channel" and len(shape) >= 2:  # 'channel': (B, C, 1), one gate per channel over the tokens
        gate_shape = (*shape[:-1], 1)
    else:  # any shape that broadcasts to f: leading dims dropped, others 1
        lead = draw(st.integers(0, len(shape)))
        gate_shape = tuple(s if draw(st.booleans()) else 1 for s in shape[lead:])
    return GateCase(
        shape=shape,
        gate_shape=gate_shape,
        # a scalar parameter as the block's alphas, or one value of any rank, up to two more than f's (the
        # functional takes it; the output then has alpha's rank)
        alpha_rank=draw(st.integers(0, len(shape) + 2)),
        layout=draw(st.sampled_from(["contiguous", "strided", "transposed"])),
        gate_layout=draw(st.sampled_from(["contiguous", "strided", "transposed"])),
        seed=draw(st.integers(0, 2**20)),
    )


@DTYPES
@_grid(150)
@given(c=gate_cases())
def test_gated_residual_lowering_matches_the_op(dtype: torch.dtype, c: GateCase) -> None:
    """``f + α σ(g) o``: one output, of f's shape broadcast with alpha's (f's where alpha has no more dims); the
    op's fake gives the kernel's shape."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = c.args(dtype)
    want = OPS.gated_residual(*args)
    got = _lowering(OPS.gated_residual)(*args)
    assert want.shape == torch.broadcast_shapes(c.shape, (1,) * c.alpha_rank)
    with FakeTensorMode() as mode:
        fake = OPS.gated_residual(*(mode.from_tensor(t) for t in args))
    assert fake.shape == want.shape and fake.dtype == want.dtype
    # The error of a sum is relative to its terms' size: where f and the gate's term nearly cancel (one element
    # of f = -α σ(g) o), float32 rounding of either term is large next to the result itself.
    f, o, g, alpha = (t.double() for t in args)
    terms = f.abs() + (alpha * torch.sigmoid(g) * o).abs()
    _check_outputs(got, want, TOL[dtype], magnitude={0: terms})


# --------------------------------------------------------------------------------------------------
# rnn_sequence
# --------------------------------------------------------------------------------------------------

#: (mode, nonlinearity, negative_slope) as the layers pass them (nn/recurrent.py ``_sequence_args``)
RNN_MODES = [
    ("rnn", "tanh", 0.0),
    ("rnn", "relu", 0.0),
    ("lstm", "tanh", 0.0),
    ("ligru", "relu", 0.01),
    ("ligru", "tanh", 0.01),
    ("ligru", "leaky_relu", 0.01),
    ("ligru", "leaky_relu", 0.3),
    ("ligru", "leaky_relu", 0.0),
    ("ligru", "leaky_relu", -0.5),
]
GATES = {"rnn": 1, "lstm": 4, "ligru": 2}


@dataclasses.dataclass(frozen=True)
class RnnCase:
    mode: str
    nonlinearity: str
    slope: float
    steps: int
    batch: int
    hq: int  # quaternion hidden units: H = 4·hq
    reverse: bool
    state: str  # zeros (a layer's hx=None) | random
    layout: str  # contiguous | batch_first (proj a transposed view) | strided
    weight_scale: float
    seed: int

    def args(self, dtype: torch.dtype) -> tuple:
        hidden = 4 * self.hq
        gates = GATES[self.mode] * hidden
        proj = _random((self.batch, self.steps, gates), self.seed, dtype)
        proj = proj.transpose(0, 1) if self.layout == "batch_first" else _in_layout(proj.transpose(0, 1), self.layout)
        # weight (4, G·H/4, H/4): scaled so a step's recurrent term is O(1) (no exploding or dying state)
        weight = _random((4, gates // 4, self.hq), self.seed + 1, dtype, scale=self.weight_scale / hidden**0.5)
        if self.state == "zeros":
            # the layers' hx=None: one zeros tensor for h0 and c0 (views of the same memory)
            zeros = proj.new_zeros(1, self.batch, hidden)
            h0, c0 = zeros[0], (zeros[0] if self.mode == "lstm" else None)
        else:
            h0 = _in_layout(_random((self.batch, hidden), self.seed + 2, dtype), self.layout)
            c0 = _random((self.batch, hidden), self.seed + 3, dtype) if self.mode == "lstm" else None
        return proj, h0, c0, weight, self.mode, self.nonlinearity, self.slope, self.reverse


@st.composite
def rnn_cases(draw) -> RnnCase:
    mode, nonlinearity, slope = draw(st.sampled_from(RNN_MODES))
    return RnnCase(
        mode=mode,
        nonlinearity=nonlinearity,
        slope=slope,
        steps=draw(st.integers(0, 6)),  # 0: an empty sequence (the layers refuse it, a direct call does not)
        batch=draw(st.integers(1, 3)),
        hq=draw(st.integers(1, 3)),
        reverse=draw(st.booleans()),
        state=draw(st.sampled_from(["zeros", "random"])),
        layout=draw(st.sampled_from(["contiguous", "batch_first", "strided"])),
        weight_scale=draw(st.sampled_from([0.5, 1.0, 2.0])),
        seed=draw(st.integers(0, 2**20)),
    )


@DTYPES
@_grid(250)
@given(c=rnn_cases())
def test_rnn_sequence_lowering_matches_the_op(dtype: torch.dtype, c: RnnCase) -> None:
    """``(output, cells, saved)``: every ``h_t``; every ``c_t`` (LSTM, else empty); the gates the backward reads
    (LSTM: ``[σ(i), σ(f), σ(o), tanh(g)]``, LiGRU: ``[a, σ(z)]``; the Elman cell: empty). The docstring of
    ``lowerings`` says the lowering returns those too, "so a graph that uses them stays valid": held to the op's."""
    args = c.args(dtype)
    want = OPS.rnn_sequence(*args)
    got = _lowering(OPS.rnn_sequence)(*args)
    _check_outputs(got, want, TOL[dtype])


# --------------------------------------------------------------------------------------------------
# Exported layers, lowered
# --------------------------------------------------------------------------------------------------


class _Holder(nn.Module):
    """A model around one layer, ``forward(*inputs)``."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, *inputs: Tensor) -> Any:
        return self.layer(*inputs)


#: name -> (factory, input shapes, the aqcf ops its program holds before lowering)
LAYERS: dict[str, tuple[Any, list[tuple[int, ...]], set[str]]] = {
    "conv1d_grouped_strided": (
        lambda: qnn.QuaternionConv1d(8, 16, 3, stride=2, padding=1, groups=2),
        [(2, 8, 9)],
        {"qconv"},
    ),
    "conv2d_same_dilated_fast8": (
        lambda: qnn.QuaternionConv2d(8, 8, 2, padding="same", dilation=2, algorithm="fast8"),
        [(1, 8, 5, 4)],
        {"qconv"},
    ),
    "conv_transpose2d": (
        lambda: qnn.QuaternionConvTranspose2d(8, 4, 3, stride=2, padding=1, output_padding=1),
        [(2, 8, 3, 4)],
        {"qconv"},
    ),
    "conv_transpose3d_grouped": (
        lambda: qnn.QuaternionConvTranspose3d(8, 8, 2, stride=2, groups=2, bias=False),
        [(1, 8, 2, 3, 2)],
        {"qconv"},
    ),
    # in eval the norm folds into the conv, whose activation the op applies: qconv's (y, pre) in the graph
    "conv_norm_leaky": (
        lambda: qnn.QuaternionConvNormAct(
            qnn.QuaternionConv2d(8, 8, 3, padding=1),
            qnn.QuaternionBatchNorm2d(8, activation="leaky_relu", negative_slope=-0.2),
        ),
        [(2, 8, 5, 4)],
        {"qconv"},
    ),
    "conv_norm_gelu": (
        lambda: qnn.QuaternionConvNormAct(
            qnn.QuaternionConv1d(8, 8, 3, padding=1), qnn.QuaternionInstanceNorm1d(8, affine=True, activation="gelu")
        ),
        [(2, 8, 6)],
        {"qconv"},
    ),
    "batch_norm2d_relu": (lambda: qnn.QuaternionBatchNorm2d(8, activation="relu"), [(3, 8, 4, 3)], {"qnorm"}),
    "batch_norm3d_affine_less": (lambda: qnn.QuaternionBatchNorm3d(4, affine=False), [(2, 4, 2, 3, 2)], {"qnorm"}),
    "instance_norm1d_running": (
        lambda: qnn.QuaternionInstanceNorm1d(8, affine=True, track_running_stats=True, activation="leaky_relu"),
        [(3, 8, 5)],
        {"qnorm"},
    ),
    "instance_norm2d": (lambda: qnn.QuaternionInstanceNorm2d(8), [(2, 8, 3, 4)], {"qnorm"}),
    "aqcf_block_token": (
        lambda: qnn.AQCFBlock(16, heads=2),
        [(2, 16, 5), (2, 16, 3, 2)],
        {"qconv", "cross_attention", "gated_residual"},
    ),
    "aqcf_block_channel_pooled_shared": (
        lambda: qnn.AQCFBlock(8, heads=2, gate="channel", kv_pool=3),
        [(2, 8, 2, 3), (1, 8, 1)],
        {"qconv", "cross_attention", "gated_residual"},
    ),
    "rnn_relu_bidirectional": (
        lambda: qnn.QuaternionRNN(8, 8, nonlinearity="relu", bidirectional=True),
        [(4, 2, 8)],
        {"qconv", "rnn_sequence"},
    ),
    "lstm_two_layers_batch_first": (
        lambda: qnn.QuaternionLSTM(8, 8, num_layers=2, batch_first=True),
        [(2, 3, 8)],
        {"qconv", "rnn_sequence"},
    ),
    "lstm_single_step_bidirectional": (
        lambda: qnn.QuaternionLSTM(4, 8, bidirectional=True),
        [(1, 2, 4)],
        {"qconv", "rnn_sequence"},
    ),
    "ligru_leaky_bidirectional": (
        lambda: qnn.QuaternionLiGRU(8, 8, nonlinearity="leaky_relu", negative_slope=-0.1, bidirectional=True),
        [(3, 2, 8)],
        {"qconv", "rnn_sequence"},
    ),
}


def _called(program: torch.export.ExportedProgram) -> list[tuple[str | None, str]]:
    """``(namespace, name)`` of every function called anywhere in ``program``: its graph and every nested graph
    (a scan's body)."""
    found = []
    for module in program.graph_module.modules():
        if isinstance(module, torch.fx.GraphModule):
            for node in module.graph.nodes:
                if node.op == "call_function":
                    found.append((getattr(node.target, "namespace", None), str(node.target)))
    return found


def _aqcf_ops(program: torch.export.ExportedProgram) -> set[str]:
    """The ``aqcf`` ops called anywhere in ``program`` (``'qconv'``...)."""
    return {name.split(".")[1] for namespace, name in _called(program) if namespace == "aqcf"}


def _trained_layer(name: str, dtype: torch.dtype, seed: int) -> tuple[nn.Module, list[tuple[int, ...]], set[str]]:
    """The layer in ``dtype`` with every parameter moved off its initial value (the block's alphas start at 0,
    a norm's γ at 1) and, for norms, running statistics from two training batches (a fresh layer's are the
    identity's)."""
    factory, shapes, ops = LAYERS[name]
    torch.manual_seed(seed)
    layer = _Holder(factory().to(dtype))
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn(p.shape, dtype=dtype) * 0.3)
        for _ in range(2):
            layer.train()(*[torch.randn(s, dtype=dtype) + 0.5 for s in shapes])
    return layer, shapes, ops


@st.composite
def export_cases(draw) -> tuple[str, bool, torch.dtype, int]:
    return (
        draw(st.sampled_from(sorted(LAYERS))),
        draw(st.booleans()),  # training mode: the norms' statistics outputs feed the running averages
        draw(st.sampled_from([F64, F32])),
        draw(st.integers(0, 2**20)),
    )


@_grid(13)
@given(case=export_cases())
def test_lowered_program_matches_the_layer(case: tuple[str, bool, torch.dtype, int]) -> None:
    """``torch.export`` of the layer holds its ``aqcf`` ops; ``lower_custom_ops`` leaves none, anywhere; the lowered
    program's outputs on new inputs, and in training mode the running statistics it updates, equal the eager
    layer's."""
    name, training, dtype, seed = case
    layer, shapes, ops = _trained_layer(name, dtype, seed)
    layer.train(training)
    g = torch.Generator().manual_seed(seed)
    example = tuple(torch.randn(s, generator=g, dtype=dtype) for s in shapes)
    program = torch.export.export(copy.deepcopy(layer), example)
    assert ops <= _aqcf_ops(program), f"the exported {name} holds {_aqcf_ops(program)}, expected {ops}"
    lowered = lower_custom_ops(program)
    assert _aqcf_ops(lowered) == set()
    inputs = tuple(torch.randn(s, generator=g, dtype=dtype) + 0.3 for s in shapes)  # not the traced example
    module = lowered.module()
    with torch.no_grad():
        got, want = module(*inputs), layer(*inputs)
    got_leaves, want_leaves = tree_leaves(got), tree_leaves(want)
    assert len(got_leaves) == len(want_leaves)
    # the lowered program runs every op's lowering where eager runs the ops: TOL per op, a few ops deep
    for g_, w_ in zip(got_leaves, want_leaves, strict=True):
        _check_outputs(g_, w_, 10 * TOL[dtype])
    if training:
        buffers = dict(module.named_buffers())
        for key, value in layer.named_buffers():
            _check_outputs(buffers[key], value, 10 * TOL[dtype])


#: Bidirectional, so the reverse direction (the scan over the flipped sequence) is in every example.
RECURRENT = {
    "rnn_tanh": lambda: qnn.QuaternionRNN(4, 8, bidirectional=True),
    "rnn_relu_batch_first": lambda: qnn.QuaternionRNN(4, 8, nonlinearity="relu", bidirectional=True, batch_first=True),
    "lstm_two_layers": lambda: qnn.QuaternionLSTM(4, 8, num_layers=2, bidirectional=True),
    "lstm_batch_first": lambda: qnn.QuaternionLSTM(8, 4, bidirectional=True, batch_first=True),
    "ligru_relu": lambda: qnn.QuaternionLiGRU(4, 8, bidirectional=True),
    "ligru_leaky": lambda: qnn.QuaternionLiGRU(
        4, 8, nonlinearity="leaky_relu", negative_slope=-0.1, bidirectional=True
    ),
    "ligru_tanh_batch_first": lambda: qnn.QuaternionLiGRU(
        4, 4, nonlinearity="tanh", bidirectional=True, batch_first=True
    ),
}


@_grid(3)
@given(
    name=st.sampled_from(sorted(RECURRENT)),
    dtype=st.sampled_from([F64, F32]),
    length=st.integers(3, 7),
    seed=st.integers(0, 2**20),
)
def test_dynamic_length_lowering_matches_the_layer(name: str, dtype: torch.dtype, length: int, seed: int) -> None:
    """A recurrent layer exported with a dynamic sequence length and an initial state: ``rnn_sequence``'s lowering
    is then one ``scan`` (the length stays symbolic), with no ``aqcf`` op in it, and the program equals the eager
    layer at lengths 1, 2 and another than the traced one. Lowered by ``lower_custom_ops``, which lets the scan
    through (test_recurrent_layer_with_a_dynamic_length_lowers)."""
    torch.manual_seed(seed)
    layer = RECURRENT[name]().to(dtype).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn(p.shape, dtype=dtype) * 0.3)
    time_dim = 1 if layer.batch_first else 0
    state_shape = (layer.num_layers * 2, 2, layer.hidden_size)
    lstm = isinstance(layer, qnn.QuaternionLSTM)

    def inputs(steps: int) -> tuple[Tensor, Any]:
        """A sequence of ``steps`` and a random initial state (``hx=None`` would be zeros: h0 untested)."""
        shape = [2, 2, layer.input_size]
        shape[time_dim] = steps
        h0 = torch.randn(state_shape, dtype=dtype)
        hx = (h0, torch.randn(state_shape, dtype=dtype)) if lstm else h0
        return torch.randn(shape, dtype=dtype), hx

    dynamic = ({time_dim: Dim("T", min=1)}, (None, None) if lstm else None)
    program = torch.export.export(_Holder(layer), inputs(3), dynamic_shapes=(dynamic,))
    assert "rnn_sequence" in _aqcf_ops(program)
    lowered = lower_custom_ops(program)
    assert _aqcf_ops(lowered) == set()
    assert any("scan" in called for _, called in _called(lowered)), "the lowering was unrolled over the example"
    module = lowered.module()
    for steps in (1, 2, length):
        args = inputs(steps)
        with torch.no_grad():
            for g_, w_ in zip(tree_leaves(module(*args)), tree_leaves(layer(*args)), strict=True):
                _check_outputs(g_, w_, 10 * TOL[dtype])


class _Sequence(nn.Module):
    """``rnn_sequence`` itself, every output returned (a layer reads only ``output``, and ``cells`` for the LSTM)."""

    def __init__(self, mode: str, nonlinearity: str, slope: float, reverse: bool) -> None:
        super().__init__()
        self.options = (mode, nonlinearity, slope, reverse)

    def forward(self, proj: Tensor, h0: Tensor, c0: Tensor | None, weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return OPS.rnn_sequence(proj, h0, c0, weight, *self.options)


@DTYPES
@_grid(2)
@given(c=rnn_cases(), length=st.integers(3, 7))
def test_scanned_lowering_matches_the_op(dtype: torch.dtype, c: RnnCase, length: int) -> None:
    """The op exported with a dynamic sequence length, lowered (``rnn_sequence_lowering`` sees a symbolic length:
    its ``scan``): all three outputs, ``saved`` included, equal the op's at lengths 1, 2 and another than the
    traced one (lowered by ``lower_custom_ops``)."""
    op = _Sequence(c.mode, c.nonlinearity, c.slope, c.reverse)
    example = dataclasses.replace(c, steps=3).args(dtype)[:4]
    dynamic = ({0: Dim("T", min=1)}, None, None, None)
    lowered = lower_custom_ops(torch.export.export(op, example, dynamic_shapes=dynamic))
    assert _aqcf_ops(lowered) == set()
    assert any("scan" in called for _, called in _called(lowered)), "the lowering was unrolled over the example"
    module = lowered.module()
    for steps in (1, 2, length):
        args = dataclasses.replace(c, steps=steps).args(dtype)[:4]
        _check_outputs(module(*args), op(*args), TOL[dtype])


# --------------------------------------------------------------------------------------------------
# Faults found by the grids, fixed (minimal fixed cases)
# --------------------------------------------------------------------------------------------------


def test_float64_log_sum_exp_is_float64_accurate() -> None:
    """The attention lowering's float64 log-sum-exps are float64-accurate, held to float64's tolerance.

    A fault the grid found, fixed: cross_attention_lowering took the log-sum-exp of float32 scores
    (``scores.float()``) for float64 inputs, float64 tensors of float32 accuracy (~4e-8 relative)."""
    q = [_random((1, 1, n, 4), seed, F64) for seed, n in enumerate((2, 3, 3, 2, 2, 2))]
    want = OPS.cross_attention(*q, 0.5)
    got = _lowering(OPS.cross_attention)(*q, 0.5)
    _check_outputs(got, want, TOL[F64])


def test_qconv_reads_a_strided_bias_by_its_strides() -> None:
    """aqcf.qconv on CPU reads a strided bias by its strides, on every call of a signature, as the lowering does.

    A fault the grid found, fixed: the compiled CPU conv engine (csrc/cpu/real_conv.cpp) handed the bias to oneDNN,
    which reads it as dense memory whatever its strides, so a strided view's gaps were added as bias values, on
    every call that engine served (the extension's remembered calls among them), where PyTorch's own conv (and the
    lowering) read it by its strides."""
    x, w = _random((1, 4, 5), 0, F32), _random((4, 1, 1, 3), 1, F32)
    bias = torch.full((8,), 100.0)[::2]  # every other element of a buffer whose gaps hold 100
    bias.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    args = (x, w, bias, [1], [0], [1], False, [0], 1, "hamilton", None, 0.01, "forward")
    want = _lowering(OPS.qconv)(*args)
    for _ in range(3):  # the first call of the signature (Python) reads the strides; the next (C++) does not
        _check_outputs(want, OPS.qconv(*args), TOL[F32])


def test_recurrent_layer_with_a_dynamic_length_lowers() -> None:
    """lower_custom_ops lowers a recurrent layer exported with a dynamic sequence length (its ``scan``).

    A fault the grid found, fixed: the lowering of rnn_sequence over a dynamic length is a ``scan`` (higher_order
    namespace), which _custom_ops counted as a custom op without a lowering, so lower_custom_ops raised
    ExportError ('no ONNX lowering for the custom op(s) scan')."""
    layer = qnn.QuaternionLSTM(4, 4).eval()
    program = torch.export.export(_Holder(layer), (torch.randn(3, 1, 4),), dynamic_shapes=(({0: Dim("T", min=2)},),))
    lowered = lower_custom_ops(program)
    assert _aqcf_ops(lowered) == set()
    x = torch.randn(5, 1, 4)  # another length than the traced one: the scan keeps it symbolic
    with torch.no_grad():
        for g_, w_ in zip(tree_leaves(lowered.module()(x)), tree_leaves(layer(x)), strict=True):
            _check_outputs(g_, w_, 10 * TOL[F32])


def test_empty_sequence_lowering_matches_the_op() -> None:
    """For an empty sequence the lowering returns the op's shapes: (0, B, H) cells (LSTM), (0, B, G*H) saved gates.

    A fault the grid found, fixed: rnn_sequence_lowering (rnn_cell._composite) returned empty (0,) ``cells`` and
    ``saved`` (the layers refuse T=0, a direct call of the op does not)."""
    args = (_random((0, 2, 32), 0, F32), _random((2, 8), 1, F32), _random((2, 8), 2, F32), _random((4, 8, 2), 3, F32))
    _check_outputs(
        _lowering(OPS.rnn_sequence)(*args, "lstm", "tanh", 0.0, False),
        OPS.rnn_sequence(*args, "lstm", "tanh", 0.0, False),
        TOL[F32],
    )


def test_eval_statistics_have_the_op_dtype() -> None:
    """qnorm's lowering returns eval-mode statistics in the op's dtype (a float64 layer fed float32 included).

    A fault the grid found, fixed: qnorm_lowering returned them in the running buffers' dtype
    (``running_mean.clone()``), the op (and its fake) in its statistics dtype."""
    x = _random((2, 8, 3), 0, F32)
    running = _random((8,), 1, F64), _random((2,), 2, F64).abs() + 0.5  # a float64 layer's buffers
    args = (x, None, None, *running, False, False, 1e-5, None, 0.01)
    _check_outputs(_lowering(OPS.qnorm)(*args), OPS.qnorm(*args), TOL[F32])


def test_gated_residual_fake_has_the_kernel_shape_for_any_alpha() -> None:
    """aqcf.gated_residual's fake has its kernel's (and the lowering's) shape when alpha has more dims than f.

    A fault found on the way, fixed: the fake gave f's shape, (5,) where the kernel gives (1, 5) (alpha is one
    value, all the functional checks)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = (_random((5,), 0, F32), _random((5,), 1, F32), _random((5,), 2, F32), _random((1, 1), 3, F32))
    real = OPS.gated_residual(*args)
    with FakeTensorMode() as mode:
        fake = OPS.gated_residual(*(mode.from_tensor(t) for t in args))
    assert fake.shape == real.shape == _lowering(OPS.gated_residual)(*args).shape
