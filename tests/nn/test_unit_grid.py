"""``QuaternionConvNormAct`` over a hypothesis grid, against the reference conv, a naive norm and the activation.

tests/nn/test_unit.py holds the unit to ``nn.Sequential(conv, norm)`` on fixed shapes; this grid draws (see
:func:`unit_configs`) the conv's spatial rank (1d/2d/3d), transposed or not, 1-3 quaternion channels in and out per
group, groups 1-2, kernel 1-3, stride 1-2, padding 0-2 or 'same' / 'valid', dilation 1-2, output_padding (transposed),
bias or not, padding_mode (zeros, reflect, replicate, circular), the algorithm ('hamilton', 'fast8', 'auto'); the
norm: batch or instance, affine or not, shared variance or whitening, running statistics tracked or not, momentum,
0-2 training steps before the checked call, train or eval, the fused norm or the composite one (``fused = False``:
never folded), eps, a fused activation (ReLU, leaky ReLU of a positive or negative slope, GELU) or none; one input
or two (``unit(a, b)``, the quaternion concatenation ``qcat([a, b])`` convolved one slice of the weight at a time, or
concatenated first with ``concatenates_inputs``),
batched (1-3) or unbatched (instance norm); spatial sizes 1-7 (odd ones more often); each input's memory layout
(contiguous, channels_last, a strided view whose gaps hold NaN, a transposed view) and the output gradient's. In eval
with running statistics and the fused shared-variance norm the unit folds the norm into the conv (a spy checks that
it does exactly then).

Each example checks the output, the gradients of ``<g, y>`` with respect to every input, the conv's weight and bias
and the norm's weight and bias, the running statistics and the batch count, against the reference: the 16 real
convs of ``aqcf_kernels.reference.quaternion_conv_naive`` (non-zero padding modes and 'same' by an explicit
``F.pad``, as torch's convs do), then tests/nn/test_norm_grid.py's :func:`reference_norm` (one statistic group and
one quaternion channel at a time) and its :func:`reference_running` on the reference conv's outputs of the training
batches, with the activation; the whole chain differentiated by autograd. In eval, as in the norm grid, the
reference normalises with the module's running buffers (themselves checked against the reference's running
statistics), so that a buffer's rounding is not counted twice.

Criteria (``‖got − want‖ / ‖want‖`` over the whole tensor below float64):

* float64: ``torch.testing.assert_close`` defaults (rtol 1e-7, atol 1e-7) element-wise against the reference.
* float32: at most the largest of

  - the conv algorithm's contract ``tol`` (README "Accuracy contract": hamilton 1e-5, fast8 and auto 5e-4), times
    ``‖Σ|terms|‖ / ‖Σ terms‖`` for the gradients that are sums (:func:`_terms`: under a norm that uses the input's
    statistics the conv bias gradient is exactly 0 and the weight gradient of an offset input cancels, so a bound
    relative to the result alone would measure the cancellation, not the implementation);
  - SENS_FACTOR x how far a conv error of the contract's size moves the result (:func:`_sensitivity`: the norm's
    centring and its division by σ, or a whitening of a near-singular covariance, amplify the conv's error; in float64,
    so it is the problem's sensitivity, not an implementation's);
  - FP32_FACTOR x the error of the same reference chain run in float32 (the norm grid's rule: where the problem is
    ill-conditioned any float32 computation is off);
  - with whitening, the norm grid's WHITEN_FACTOR float32 eps x κ(V + eps·I) (times the terms' ratio for a sum: the
    whitening's error is relative to each term ``g_h``, and the SCALE=10 hunt found a conv bias gradient, exactly 0,
    under the whitening of two values, κ ~ 1e5, 2.3e-4 of its terms off).

  On ~2,500 float32 results (300 examples) the errors were at most 0.18 of their bounds (a conv bias gradient under a
  training norm, exactly 0, measured against its terms), mostly below 0.01; the largest bounds (1e2-1e5 x tol) are
  whitenings of the covariance of 2-4 values (rank-deficient: κ ~ 1e5), where the float32 reference itself was 6% off.

ReLU / leaky ReLU below float64: the output gradient is zeroed where the float64 pre-activation is within KINK times
the contract's error of its terms of 0 (the norm grid does the same): a conv output that close to 0 may take the other
slope, an O(1) error in that element that is no fault of the unit.

The grid found two faults, fixed: ``unit(a, b)`` in eval with a leaky ReLU of negative slope activated the sum of
its per-input convs in place, and torch refuses that backward (its fixed case at the end); and the cpp backend's float32
hamilton conv segfaulted (oneDNN, called directly) on a channels_last input with a bias and a one-tap kernel dilated in
a dim where every output reads only padding (tests/conv/test_real_conv_routes.py has its case, in a subprocess).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from _grid import grid
from hypothesis import HealthCheck, assume, given
from hypothesis import strategies as st

from aqcf_kernels import nn as qnn
from aqcf_kernels import reference

from ._conv_geometry import draw_geometry, output_size
from .test_norm_grid import MODULES as NORMS
from .test_norm_grid import NormConfig, _in_layout, _randomise, _sum_conditions, reference_norm, reference_running

pytestmark = pytest.mark.usefixtures("single_threaded")

F64 = torch.float64
CONVS = {
    (1, False): qnn.QuaternionConv1d,
    (2, False): qnn.QuaternionConv2d,
    (3, False): qnn.QuaternionConv3d,
    (1, True): qnn.QuaternionConvTranspose1d,
    (2, True): qnn.QuaternionConvTranspose2d,
    (3, True): qnn.QuaternionConvTranspose3d,
}
ACTIVATIONS = [(None, 0.01), ("relu", 0.01), ("leaky_relu", 0.2), ("leaky_relu", -0.3), ("gelu", 0.01)]
#: the float32 contract of each algorithm (README "Accuracy contract"; 'auto' may pick fast8)
CONTRACT = {"hamilton": 1e-5, "fast8": 5e-4, "auto": 5e-4}


@dataclass(frozen=True)
class UnitConfig:
    dims: int
    transposed: bool
    groups: int
    cin: int  # quaternion channels in (all inputs together)
    cout: int  # quaternion channels out
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    output_padding: tuple[int, ...]
    bias: bool
    padding_mode: str
    algorithm: str
    split: tuple[int, ...]  # quaternion channels of each input (one input: (cin,))
    concatenates: bool  # unit.concatenates_inputs (the benchmarks' baseline: qcat, then one conv)
    unbatched: bool  # instance norm only: (C, *S)
    batch: int
    spatial: tuple[int, ...]
    layouts: tuple[str, ...]  # each input's
    grad_layout: str
    kind: str  # batch | instance
    affine: bool
    whiten: bool
    track: bool
    momentum: float | None
    steps: int
    training: bool
    fused: bool  # the norm's fused kernels (False: the composite norm, never folded)
    activation: str | None
    slope: float
    eps: float
    seed: int

    @property
    def out_spatial(self) -> tuple[int, ...]:
        return output_size(
            self.spatial, self.transposed, self.kernel, self.stride, self.padding, self.dilation, self.output_padding
        )

    @property
    def count(self) -> int:
        """Values per statistic (of each real channel) of the norm."""
        return math.prod(self.out_spatial) * (1 if self.kind == "instance" else self.batch)

    @property
    def uses_input_stats(self) -> bool:
        return self.training or not self.track

    @property
    def folds(self) -> bool:
        return not self.training and self.track and not self.whiten and self.fused and not self.transposed

    def norm_config(self) -> NormConfig:
        """The norm grid's config of this unit's norm (what its reference functions read)."""
        return NormConfig(
            kind=self.kind, dims=self.dims, unbatched=self.unbatched, batch=self.batch, cq=self.cout,
            spatial=self.out_spatial, layout="contiguous", grad_layout=self.grad_layout, training=self.training,
            track=self.track, momentum=self.momentum, steps=self.steps, affine=self.affine, whiten=self.whiten,
            activation=self.activation, slope=self.slope, eps=self.eps, offset=0.0, create_graph=False,
            seed=self.seed,
        )  # fmt: skip

    def input_shapes(self) -> list[tuple[int, ...]]:
        lead = () if self.unbatched else (self.batch,)
        return [(*lead, 4 * cq, *self.spatial) for cq in self.split]

    def output_shape(self) -> tuple[int, ...]:
        lead = () if self.unbatched else (self.batch,)
        return (*lead, 4 * self.cout, *self.out_spatial)

    def unit(self, dtype: torch.dtype) -> qnn.QuaternionConvNormAct:
        kw = dict(
            kernel_size=self.kernel, stride=self.stride, padding=self.padding, dilation=self.dilation,
            groups=self.groups, bias=self.bias, padding_mode=self.padding_mode, dtype=dtype, algorithm=self.algorithm,
        )  # fmt: skip
        if self.transposed:
            kw["output_padding"] = self.output_padding
        conv = CONVS[(self.dims, self.transposed)](4 * self.cin, 4 * self.cout, **kw)
        g = torch.Generator().manual_seed(self.seed + 200)
        with torch.no_grad():  # weights of size ~1/sqrt(fan-in) and a bias, drawn (not the module's global RNG)
            fan_in = self.cin // self.groups * 4 * math.prod(self.kernel)
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g, dtype=F64) / math.sqrt(fan_in))
            if self.bias:
                conv.bias.copy_(torch.randn(conv.bias.shape, generator=g, dtype=F64))
        norm = NORMS[(self.kind, self.dims)](
            4 * self.cout, eps=self.eps, momentum=self.momentum, affine=self.affine, track_running_stats=self.track,
            dtype=dtype, whiten=self.whiten, activation=self.activation, negative_slope=self.slope,
        )  # fmt: skip
        _randomise(norm, self.norm_config())
        norm.fused = self.fused
        unit = qnn.QuaternionConvNormAct(conv, norm)
        unit.concatenates_inputs = self.concatenates
        return unit


SIZES = st.sampled_from([1, 2, 3, 3, 4, 5, 5, 7])


@st.composite
def unit_configs(draw) -> UnitConfig:
    dims = draw(st.sampled_from([1, 2, 3]))
    transposed = draw(st.booleans()) and draw(st.booleans())  # a quarter of the examples
    groups = draw(st.sampled_from([1, 1, 2]))
    cin = groups * draw(st.integers(1, 3 if groups == 1 else 2))
    cout = groups * draw(st.integers(1, 3 if groups == 1 else 2))
    tup = lambda s: draw(st.tuples(*[s] * dims))  # noqa: E731
    geometry = draw_geometry(draw, dims, transposed, max_kernel=3)
    kind = draw(st.sampled_from(["batch", "instance"]))
    unbatched = kind == "instance" and draw(st.booleans()) and draw(st.booleans())
    split = (cin,)
    if not unbatched and cin >= 2 and draw(st.booleans()):
        first = draw(st.integers(1, cin - 1))
        split = (first, cin - first)
    layouts = ["contiguous", "strided", "transposed"] + (["channels_last"] if dims > 1 and not unbatched else [])
    activation, slope = draw(st.sampled_from(ACTIVATIONS))
    c = UnitConfig(
        dims=dims, transposed=transposed, groups=groups, cin=cin, cout=cout, **geometry.__dict__,
        bias=draw(st.booleans()), algorithm=draw(st.sampled_from(["hamilton", "fast8", "auto"])), split=split,
        concatenates=len(split) > 1 and draw(st.booleans()),
        unbatched=unbatched, batch=1 if unbatched else draw(st.integers(1, 3)), spatial=tup(SIZES),
        layouts=tuple(draw(st.sampled_from(layouts)) for _ in split),
        grad_layout=draw(st.sampled_from(["contiguous", "strided"])), kind=kind, affine=draw(st.booleans()),
        whiten=draw(st.booleans()) and draw(st.booleans()), track=draw(st.booleans()),
        momentum=draw(st.sampled_from([None, 0.1, 0.6])), steps=draw(st.integers(0, 2)), training=draw(st.booleans()),
        fused=draw(st.sampled_from([True, True, False])), activation=activation, slope=slope,
        eps=draw(st.sampled_from([1e-5, 1e-3])), seed=draw(st.integers(0, 2**31 - 1)),
    )  # fmt: skip
    # A geometry torch accepts: an output of at least one element per dim; reflect padding below the size,
    # circular at most the size (torch's rules for F.pad).
    assume(all(s >= 1 for s in c.out_spatial))
    if c.padding_mode != "zeros" and isinstance(c.padding, tuple):
        limit = (lambda p, s: p < s) if c.padding_mode == "reflect" else (lambda p, s: p <= s)
        assume(all(limit(p, s) for p, s in zip(c.padding, c.spatial, strict=True)))
    if c.padding_mode != "zeros" and c.padding == "same":
        pads = [d * (k - 1) for d, k in zip(c.dilation, c.kernel, strict=True)]
        limit = (lambda p, s: p < s) if c.padding_mode == "reflect" else (lambda p, s: p <= s)
        assume(all(limit(p - p // 2, s) for p, s in zip(pads, c.spatial, strict=True)))
    if c.count <= 1:
        c = UnitConfig(**{**c.__dict__, "steps": 0})  # a training step would raise (checked below)
    return c


# --------------------------------------------------------------------------------------------------
# Data and the reference
# --------------------------------------------------------------------------------------------------


def _inputs(c: UnitConfig, dtype: torch.dtype, step: int) -> list[torch.Tensor]:
    """Batch ``step``'s inputs (the checked call's is step ``c.steps``), iid normal plus a per-real-channel offset
    (so that the norm's centring matters), in ``dtype`` and each input's layout."""
    g = torch.Generator().manual_seed(c.seed + 1 + step)
    out = []
    for shape, layout in zip(c.input_shapes(), c.layouts, strict=True):
        ch = 0 if c.unbatched else 1
        offset = torch.randn(shape[ch], generator=g, dtype=F64).view(-1, *[1] * (len(shape) - ch - 1))
        x = (torch.randn(shape, generator=g, dtype=F64) + offset).to(dtype)
        out.append(_in_layout(x, layout, c.unbatched))
    return out


def _output_grad(c: UnitConfig, dtype: torch.dtype, mask: torch.Tensor | None = None) -> torch.Tensor:
    g = torch.randn(c.output_shape(), generator=torch.Generator().manual_seed(c.seed + 7), dtype=F64)
    if mask is not None:
        g = g * mask
    return _in_layout(g.to(dtype), c.grad_layout)


def reference_qcat(parts: list[torch.Tensor]) -> torch.Tensor:
    """``[r_a r_b | i_a i_b | j_a j_b | k_a k_b]`` of batched blocked tensors, written out."""
    comps = [p.chunk(4, dim=1) for p in parts]
    return torch.cat([torch.cat([cs[a] for cs in comps], dim=1) for a in range(4)], dim=1)


def reference_conv(c: UnitConfig, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The 16 real convs of ``reference.quaternion_conv_naive`` on a batched ``x``: a padding mode other than
    zeros, and 'same', pad explicitly first (torch puts the odd element of ``d·(k − 1)`` on the right)."""
    if c.transposed:
        return reference.quaternion_conv_naive(
            x, weight, bias, c.stride, c.padding, c.dilation, c.groups, transposed=True,
            output_padding=c.output_padding,
        )  # fmt: skip
    if c.padding == "valid":
        pads = [(0, 0)] * c.dims
    elif c.padding == "same":
        pads = [(d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2) for d, k in zip(c.dilation, c.kernel, strict=True)]
    else:
        pads = [(p, p) for p in c.padding]
    flat = [p for pair in reversed(pads) for p in pair]  # F.pad lists the last dim first
    mode = "constant" if c.padding_mode == "zeros" else c.padding_mode
    x = F.pad(x, flat, mode=mode)
    return reference.quaternion_conv_naive(x, weight, bias, c.stride, 0, c.dilation, c.groups)


@dataclass
class Chain:
    """A run of the reference: the leaves (with graph), the conv output ``h``, the norm's :class:`Reference`."""

    leaves: dict[str, torch.Tensor]
    h_graph: torch.Tensor
    ref: object  # test_norm_grid.Reference
    stats: dict[str, torch.Tensor] | None
    unbatched: bool

    @property
    def y(self) -> torch.Tensor:
        return self.ref.y.detach()[0] if self.unbatched else self.ref.y.detach()

    def grads(self, gy: torch.Tensor) -> dict[str, torch.Tensor]:
        g = gy.to(self.ref.y.dtype)
        g = g.unsqueeze(0) if self.unbatched else g
        out = torch.autograd.grad(self.ref.y, list(self.leaves.values()), g, retain_graph=True, allow_unused=True)
        out = {k: (torch.zeros_like(self.leaves[k]) if v is None else v) for k, v in zip(self.leaves, out, strict=True)}
        return out


def run_reference(
    c: UnitConfig,
    unit: qnn.QuaternionConvNormAct,
    buffers: dict[str, torch.Tensor],
    dtype: torch.dtype,
    h_noise: torch.Tensor | None = None,
) -> Chain:
    """The reference in ``dtype`` on the unit's (rounded) inputs and parameters; in eval with running statistics,
    on the unit's running ``buffers``. ``h_noise`` is added to the conv's output (:func:`_sensitivity`)."""
    conv, norm = unit
    module_dtype = conv.weight.dtype
    leaves = {}
    xs = []
    for i, x in enumerate(_inputs(c, module_dtype, c.steps)):
        x = x.detach().to(dtype).contiguous().requires_grad_()
        leaves[f"input {i}"] = x
        xs.append(x.unsqueeze(0) if c.unbatched else x)
    params = {
        name: p.detach().to(dtype).requires_grad_()
        for name, p in [("conv weight", conv.weight), ("conv bias", conv.bias), ("norm weight", norm.weight),
                        ("norm bias", norm.bias)]
        if p is not None
    }  # fmt: skip
    leaves.update(params)
    w, b = params["conv weight"], params.get("conv bias")

    def chain_conv(parts):
        return reference_conv(c, parts[0] if len(parts) == 1 else reference_qcat(parts), w, b)

    h = chain_conv(xs)
    if h_noise is not None:
        h = h + h_noise.to(dtype)
    nc = c.norm_config()
    running = stored = None
    if not c.uses_input_stats:
        running = tuple(buffers[k].to(dtype) for k in ("running_mean", "running_var"))
        stored = buffers["running_var"].dtype
    stats = None
    if c.track:
        with torch.no_grad():
            batches = []
            for step in range(c.steps + c.training):
                parts = [x.to(dtype) for x in _inputs(c, module_dtype, step)]
                parts = [p.unsqueeze(0) if c.unbatched else p for p in parts]
                batches.append(chain_conv(parts))
        stats = dict(zip(("running_mean", "running_var"), reference_running(batches, nc, dtype), strict=True))
    ref = reference_norm(h, params.get("norm weight"), params.get("norm bias"), nc, running, None, stored)
    return Chain(leaves, h, ref, stats, c.unbatched)


# --------------------------------------------------------------------------------------------------
# The unit
# --------------------------------------------------------------------------------------------------


@dataclass
class Run:
    unit: qnn.QuaternionConvNormAct
    y: torch.Tensor
    leaves: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    batches_tracked: int | None
    norm_calls: int

    def grads(self, gy: torch.Tensor) -> dict[str, torch.Tensor]:
        out = torch.autograd.grad(self.y, list(self.leaves.values()), gy, retain_graph=True, allow_unused=True)
        return {
            k: (torch.zeros_like(self.leaves[k]) if v is None else v) for k, v in zip(self.leaves, out, strict=True)
        }


def run_unit(c: UnitConfig, dtype: torch.dtype) -> Run | None:
    """Trains ``c.steps`` steps (no grad), then makes the checked call; None when that call raised the norm's error
    for a single value per statistic (checked here)."""
    unit = c.unit(dtype)
    conv, norm = unit
    calls = [0]
    norm.register_forward_hook(lambda *args: calls.__setitem__(0, calls[0] + 1))
    with torch.no_grad():
        unit.train()
        for step in range(c.steps):
            unit(*_inputs(c, dtype, step))
    unit.train(c.training)
    assert unit.folds == c.folds, f"folds: {unit.folds}, expected {c.folds} ({c})"
    xs = [x.requires_grad_() for x in _inputs(c, dtype, c.steps)]
    calls[0] = 0
    if c.uses_input_stats and c.count <= 1:
        what = "spatial element" if c.kind == "instance" else "value per channel"
        with pytest.raises(ValueError, match=f"expected more than 1 {what} when training"):
            unit(*xs)
        return None
    y = unit(*xs)
    leaves = {f"input {i}": x for i, x in enumerate(xs)}
    for name, p in [("conv weight", conv.weight), ("conv bias", conv.bias), ("norm weight", norm.weight),
                    ("norm bias", norm.bias)]:  # fmt: skip
        if p is not None:
            leaves[name] = p
    buffers = {}
    if c.track:
        buffers = {"running_mean": norm.running_mean, "running_var": getattr(norm, norm._var_name)}
    batches = None if norm.num_batches_tracked is None else norm.num_batches_tracked.item()
    return Run(unit, y, leaves, {k: v.detach().clone() for k, v in buffers.items()}, batches, calls[0])


def _check_common(c: UnitConfig, dtype: torch.dtype, run: Run, grads: dict[str, torch.Tensor]) -> None:
    assert run.y.shape == c.output_shape() and run.y.dtype == dtype, (run.y.shape, c)
    for name, g in grads.items():
        assert g.dtype == dtype and g.shape == run.leaves[name].shape, name
    assert run.batches_tracked == (c.steps + c.training if c.track else None)
    # Folded: the norm module does not run (its pass is gone); otherwise it runs once.
    assert run.norm_calls == (0 if c.folds and not c.unbatched else 1), (run.norm_calls, c)


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    diff = (got - want).norm().item()
    return 0.0 if diff == 0 else diff / max(want.norm().item(), 1e-300)


def _abs_conv(c: UnitConfig, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """The reference conv with every Hamilton sign +1 (on ``|x|``, ``|W|``, ``|b|``: the sum of its terms' sizes)."""
    positive = tuple(tuple((p, 1) for p, _ in row) for row in reference.HAMILTON)
    with mock.patch.object(reference, "HAMILTON", positive):
        return reference_conv(c, x, w, b)


def _terms(c: UnitConfig, chain: Chain, gy: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """The float64 conv's terms ``|W| * |x| + |b|`` elementwise (its sums' sizes, what a rounding error of the conv
    is relative to), and for each gradient that is a sum, ``‖Σ |terms|‖ / ‖Σ terms‖`` (≥ 1): the conv's input, weight
    and bias gradients, sums of ``g_h`` (the gradient at the conv's output) times the weight or the input, are
    measured against the same sums of ``|g_h|`` times ``|W|`` or ``|x|`` (the sign-free conv's gradients); the norm's
    weight and bias gradients as the norm grid's :func:`_sum_conditions` does. Under a norm that uses the input's
    statistics ``g_h`` sums to 0 over each statistic's group (the centring's projection): the conv bias gradient is
    exactly 0 and the weight gradient of an offset input cancels, so a bound relative to the result alone would
    measure the cancellation, not the implementation (the standard bound on a sum's rounding error is relative to
    the sum of its terms' sizes)."""
    exact = chain.grads(gy)
    (g_h,) = torch.autograd.grad(chain.ref.y, chain.h_graph, gy.double().unsqueeze(0) if c.unbatched else gy.double(),
                                 retain_graph=True)  # fmt: skip
    leaves = {
        k: v.detach().double().abs().requires_grad_() for k, v in chain.leaves.items() if k.startswith(("in", "conv"))
    }
    xs = [leaves[f"input {i}"] for i in range(len(c.split))]
    xs = [x.unsqueeze(0) if c.unbatched else x for x in xs]
    x = xs[0] if len(xs) == 1 else reference_qcat(xs)
    h_abs = _abs_conv(c, x, leaves["conv weight"], leaves.get("conv bias"))
    sizes = torch.autograd.grad((h_abs * g_h.abs()).sum(), list(leaves.values()))
    out = {
        f"{name} gradient": size.norm().item() / max(exact[name].double().norm().item(), 1e-300)
        for name, size in zip(leaves, sizes, strict=True)
    }
    if c.affine:
        sums = _sum_conditions(c.norm_config(), chain, gy, {"weight": exact["norm weight"], "bias": exact["norm bias"]})
        out["norm weight gradient"], out["norm bias gradient"] = sums["weight gradient"], sums["bias gradient"]
    return h_abs.detach(), out


# --------------------------------------------------------------------------------------------------
# float64: element-wise against the reference
# --------------------------------------------------------------------------------------------------

# Examples per test sized for CI; a longer hunt multiplies them: AQCF_GRID_SCALE=20 pytest <this file>.
GRID = grid(750, HealthCheck.filter_too_much)


@GRID
@given(c=unit_configs())
def test_float64_matches_the_reference(c):
    run = run_unit(c, F64)
    if run is None:
        return
    gy = _output_grad(c, F64)
    grads = run.grads(gy)
    _check_common(c, F64, run, grads)
    chain = run_reference(c, run.unit, run.buffers, F64)
    torch.testing.assert_close(run.y, chain.y, msg=lambda m: f"forward: {m} ({c})")
    want = chain.grads(gy)
    assert grads.keys() == want.keys()
    for name, got in grads.items():
        torch.testing.assert_close(got, want[name], msg=lambda m, name=name: f"{name} gradient: {m} ({c})")
    for name, got in run.buffers.items():
        torch.testing.assert_close(got, chain.stats[name], msg=lambda m, name=name: f"{name}: {m} ({c})")


# --------------------------------------------------------------------------------------------------
# float32: norm-wise, within the conv algorithm's contract as the chain carries it
# --------------------------------------------------------------------------------------------------

#: A conv error of the contract's size moves each result by :func:`_sensitivity` (one random draw of it, in
#: float64); the implementation's own error points in no special direction, but one draw can be lucky: 4x.
SENS_FACTOR = 4.0
#: Above the contract: 4x the error of the reference chain run in float32 (the norm grid's FP32_FACTOR: where the
#: problem is ill-conditioned, any float32 computation is off, the library's and the textbook's alike).
FP32_FACTOR = 4.0
#: The norm grid's whitening allowance: WHITEN_FACTOR float32 eps times κ(V + eps·I) (see test_norm_grid.py).
WHITEN_FACTOR = 8.0
#: ReLU's and leaky ReLU's gradients jump at z = 0: the output gradient is zeroed where the float64 pre-activation is
#: within KINK times the contract's error of the conv's terms (carried through the norm's scale) of 0.
KINK = 8.0


def _sensitivity(
    c: UnitConfig, run: Run, chain64: Chain, h_abs: torch.Tensor, tol: float, gy: torch.Tensor
) -> dict[str, float]:
    """How much each float64 result moves when the conv's output is off by a random error of the contract's size
    relative to its terms (``tol · (|W| * |x| + |b|)`` times a standard normal, elementwise): the error that an
    implementation within the contract carries into the norm, whose centring (a mean offset large against the
    spread) and division by σ amplify it, and into the gradients that depend on the forward values."""
    noise = tol * h_abs * torch.randn(h_abs.shape, generator=torch.Generator().manual_seed(c.seed + 17), dtype=F64)
    noisy = run_reference(c, run.unit, run.buffers, F64, h_noise=noise)
    out = {"forward": _rel(noisy.y, chain64.y)}
    exact = chain64.grads(gy)
    for name, grad in noisy.grads(gy).items():
        out[f"{name} gradient"] = _rel(grad, exact[name])
    for name, stat in (noisy.stats or {}).items():
        out[name] = _rel(stat, chain64.stats[name])
    return out


def _float32(c: UnitConfig) -> list[tuple[str, float, float, float]]:
    dtype, eps32 = torch.float32, torch.finfo(torch.float32).eps
    run = run_unit(c, dtype)
    if run is None:
        return []
    tol = CONTRACT[c.algorithm]
    ref64 = run_reference(c, run.unit, run.buffers, F64)
    ref32 = run_reference(c, run.unit, run.buffers, dtype)
    mask = None
    if c.activation in ("relu", "leaky_relu"):
        # the conv's terms carried through the norm: s (reference_norm's bound on z's terms) grows with them
        z, s = ref64.ref.z, ref64.ref.s
        mask = (z.abs() >= KINK * tol * (s + s.pow(2).mean().sqrt())).to(F64)
        mask = mask[0] if c.unbatched else mask
    gy = _output_grad(c, dtype, mask)
    grads = run.grads(gy)
    _check_common(c, dtype, run, grads)
    h_abs, terms = _terms(c, ref64, gy)
    sens = _sensitivity(c, run, ref64, h_abs, tol, gy)
    got = {"forward": run.y, **{f"{k} gradient": v for k, v in grads.items()}, **run.buffers}
    want = {"forward": ref64.y, **{f"{k} gradient": v for k, v in ref64.grads(gy).items()}, **(ref64.stats or {})}
    lo = {"forward": ref32.y, **{f"{k} gradient": v for k, v in ref32.grads(gy).items()}, **(ref32.stats or {})}
    assert got.keys() == want.keys() == lo.keys()
    results = []
    for what in got:
        error, lo_error = _rel(got[what], want[what]), _rel(lo[what], want[what])
        assert math.isfinite(error), f"float32 {what}: not finite ({c})"
        bound = max(tol * terms.get(what, 1.0), SENS_FACTOR * sens[what], FP32_FACTOR * lo_error)
        if c.whiten and what != "running_mean":
            # relative to the terms where the result is a sum (a conv bias gradient under a training norm: 0)
            bound = max(bound, WHITEN_FACTOR * eps32 * ref64.ref.cond * max(1.0, terms.get(what, 1.0)))
        results.append((what, error, lo_error, bound))
        assert error <= bound, (
            f"float32 {what}: relative error {error:.3g}, the reference's in float32 {lo_error:.3g}, a contract-sized "
            f"conv error moves it {sens[what]:.3g}, terms/result {terms.get(what, 1.0):.3g} (bound {bound:.3g}; {c})"
        )
    return results


@grid(400, HealthCheck.filter_too_much)
@given(c=unit_configs())
def test_float32_within_the_contract(c):
    _float32(c)


# --------------------------------------------------------------------------------------------------
# A fault the grid found (the other, a segfault: tests/conv/test_real_conv_routes.py,
# test_a_dilated_single_tap_kernel_over_padding_only)
# --------------------------------------------------------------------------------------------------


def test_split_inputs_with_a_negative_slope_have_a_gradient():
    """Eval, two inputs convolved one by one (the folded unit), a leaky ReLU of negative slope: its gradient is
    nn.Sequential(conv, norm)'s on the concatenated inputs."""
    g = torch.Generator().manual_seed(0)
    conv = qnn.QuaternionConv2d(8, 4, 3, padding=1, dtype=F64)
    norm = qnn.QuaternionBatchNorm2d(4, activation="leaky_relu", negative_slope=-0.3, dtype=F64)
    unit = qnn.QuaternionConvNormAct(conv, norm).eval()
    a, b = (torch.randn(2, 4, 5, 5, generator=g, dtype=F64, requires_grad=True) for _ in range(2))
    y = unit(a, b)
    y.sum().backward()  # was RuntimeError: In-place leakyReLu backward calculation ... with a negative slope
    a_grad = a.grad.clone()
    a.grad = None
    torch.nn.Sequential(conv, norm)(reference_qcat([a, b])).sum().backward()
    torch.testing.assert_close(a_grad, a.grad)
