"""The rotation ("spinor") conv and linear layers over a hypothesis grid, against a plain per-weight rotation.

tests/nn/test_rotation.py holds them to the block-matrix formula and to Parcollet's and speechbrain's code on fixed
cases; this grid draws (see :func:`conv_configs`, :func:`linear_configs`) every option the constructors accept with
``rotation=True``: the conv's spatial rank (1d/2d/3d), transposed or not, groups 1-2, 1-2 quaternion channels in and out
per group, kernel 1-3 (1-2 in 3d), stride 1-2, padding 0-2 or 'same' / 'valid', dilation 1-2, output_padding
(transposed), padding_mode (zeros, reflect, replicate, circular), bias, ``quaternion_format`` (``[r|i|j|k]`` or
``[i|j|k]`` tensors), ``scale`` (a learnt per-weight scale); the linear map's 1-4 quaternion features in and out and
0-2 leading dims; batched (1-3) or unbatched inputs, spatial sizes 1-6, the input's memory layout (contiguous,
channels_last, a strided view whose gaps hold NaN, a transposed view); the module or the functional op with its
``eps`` (the layers' 1e-4, 0: the exact rotation, or 1e-2); and the weights: normal, or with some weight quaternions
near zero norm (1e-2, 1e-4 or 1e-8 of the others) or exactly zero.

The reference (:func:`rotate`) is nn/rotation.py's documented map, written with the Hamilton product of
``aqcf_kernels/reference.py`` rather than its matrix: for each weight quaternion ``w`` and each position, a pure
``v`` goes to ``(w ⊗ v ⊗ w* + ε v) / (|w|² + ε)`` (with ``ε = 0`` the rotation by ``w``; with ``ε > 0`` it tends
to ``v`` as ``w → 0``: a zero weight is the identity, not a NaN), times the weight's scale, summed over the input
channels and kernel taps the conv's geometry sends to each output position (one tap's input slice at a time). A
transposed conv is the adjoint: the rotation by ``w*``, scattered to ``position·stride + tap·dilation − padding``.
With ``quaternion_format`` the real input block is ignored and the real output block is zero before the bias. ``eps
= 0`` with a zero weight is undefined (not drawn). Autograd differentiates the reference.

Checked: the output, and the gradients of ``<g, y>`` with respect to the input, weight, bias and scale. Criteria:
float64 ``torch.testing.assert_close`` defaults (rtol 1e-7, atol 1e-7) element-wise; float32 norm-wise
``‖got − want‖ / ‖want‖`` at most the library's contract 1e-5, FP32_FACTOR x the error of the same reference run in
float32 (the problem's own conditioning, as the norm grid's rule), or SENS_FACTOR x how far one float32 rounding of
the inputs, parameters and output gradient moves the float64 result (a gradient that is a short sum that cancels, where
the float32 reference can be lucky), whichever is largest; and for the scale and bias gradients (sums) at least
SUM_FACTOR float32 eps x ``‖Σ|terms|‖ / ‖Σ terms‖``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from _grid import grid
from hypothesis import HealthCheck, assume, given
from hypothesis import strategies as st

from aqcf_kernels import reference
from aqcf_kernels.nn import (
    QuaternionConv1d,
    QuaternionConv2d,
    QuaternionConv3d,
    QuaternionConvTranspose1d,
    QuaternionConvTranspose2d,
    QuaternionConvTranspose3d,
    QuaternionLinear,
)
from aqcf_kernels.nn.rotation import ROTATION_EPS, quaternion_rotation_conv, quaternion_rotation_linear

from ._conv_geometry import draw_geometry, explicit_padding, output_size
from .test_norm_grid import _in_layout

pytestmark = pytest.mark.usefixtures("single_threaded")

F64 = torch.float64
CONVS = {
    (1, False): QuaternionConv1d,
    (2, False): QuaternionConv2d,
    (3, False): QuaternionConv3d,
    (1, True): QuaternionConvTranspose1d,
    (2, True): QuaternionConvTranspose2d,
    (3, True): QuaternionConvTranspose3d,
}
#: the library's float32 contract (README "Accuracy contract")
FP32_TOLERANCE = 1e-5
#: above it, 4x the error of the reference run in float32 (tests/nn/test_norm_grid.py's FP32_FACTOR)
FP32_FACTOR = 4.0
#: and SENS_FACTOR x how far one rounding of the inputs moves the float64 result (:func:`_sensitivity`): where a
#: gradient is a short sum that cancels, the reference in float32 can be lucky (the SCALE=10 hunt: the scale gradient
#: of one weight, 9 products over a batch of 3, was 1.97e-5 off where the float32 reference was 4.2e-6 and one
#: rounding of the inputs moved it 4.7e-5); 4 leaves room for a few roundings per term
SENS_FACTOR = 4.0
#: The scale and bias gradients are sums over the batch and positions: at least SUM_FACTOR float32 eps times the
#: ratio of the sum of their terms' sizes to their size (tests/nn/test_norm_grid.py's SUM_FACTOR). The SCALE=10 hunt
#: found one weight's scale gradient of a single input vector, 3 products of ratio 168, 5.2e-5 (440 eps) off: the
#: rotation matrix's entries, ``1 − 2(q_j² + q_k²)`` and so on in float32, are 2 eps off, times 168
SUM_FACTOR = 8.0
WEIGHTS = ["normal", "normal", "small", "zero"]


# --------------------------------------------------------------------------------------------------
# The reference: one weight quaternion at a time
# --------------------------------------------------------------------------------------------------


def rotate(w: torch.Tensor, v: torch.Tensor, eps: float) -> torch.Tensor:
    """``(w ⊗ v ⊗ w* + ε v) / (|w|² + ε)`` for a pure ``v`` (3, ...) (its i, j, k) and a quaternion ``w`` (4, ...)
    that broadcasts against ``v``'s trailing dims; the pure part of the result."""
    vq = torch.cat([torch.zeros_like(v[:1]), v])
    wv = reference.hamilton_product(w, vq, dim=0)
    turned = reference.hamilton_product(wv, reference.conjugate(w, dim=0), dim=0)[1:]
    return (turned + eps * v) / ((w * w).sum(0) + eps)


_plain_rotate = rotate


def conjugate(w: torch.Tensor) -> torch.Tensor:
    return reference.conjugate(w, dim=0)


@dataclass(frozen=True)
class ConvConfig:
    dims: int
    transposed: bool
    groups: int
    cin: int  # quaternion channels in
    cout: int
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    output_padding: tuple[int, ...]
    padding_mode: str
    bias: bool
    quaternion_format: bool
    scale: bool
    unbatched: bool
    batch: int
    spatial: tuple[int, ...]
    layout: str
    functional: bool
    eps: float
    weights: str
    seed: int

    @property
    def blocks(self) -> int:
        return 4 if self.quaternion_format else 3

    def pads(self) -> list[tuple[int, int]]:
        """Explicit (left, right) padding per dim of the (non-transposed) conv."""
        return explicit_padding(self.padding, self.kernel, self.dilation)

    @property
    def out_spatial(self) -> tuple[int, ...]:
        return output_size(
            self.spatial, self.transposed, self.kernel, self.stride, self.padding, self.dilation, self.output_padding
        )

    @property
    def shape(self) -> tuple[int, ...]:
        return (*(() if self.unbatched else (self.batch,)), self.blocks * self.cin, *self.spatial)

    def weight_shape(self) -> tuple[int, ...]:
        a, b = (self.cin, self.cout) if self.transposed else (self.cout, self.cin)
        return (4, a, b // self.groups, *self.kernel)


@st.composite
def conv_configs(draw) -> ConvConfig:
    dims = draw(st.sampled_from([1, 2, 3]))
    transposed = draw(st.booleans()) and draw(st.booleans())
    groups = draw(st.sampled_from([1, 1, 2]))
    tup = lambda s: draw(st.tuples(*[s] * dims))  # noqa: E731
    geometry = draw_geometry(draw, dims, transposed, max_kernel=2 if dims == 3 else 3)
    unbatched = draw(st.booleans()) and draw(st.booleans())
    functional = draw(st.booleans())
    weights = draw(st.sampled_from(WEIGHTS))
    eps = draw(st.sampled_from([ROTATION_EPS, ROTATION_EPS, 0.0, 1e-2])) if functional else ROTATION_EPS
    layouts = ["contiguous", "strided", "transposed"] + (["channels_last"] if dims > 1 and not unbatched else [])
    c = ConvConfig(
        dims=dims, transposed=transposed, groups=groups, cin=groups * draw(st.integers(1, 2)),
        cout=groups * draw(st.integers(1, 2)), **geometry.__dict__, bias=draw(st.booleans()),
        quaternion_format=draw(st.booleans()), scale=draw(st.booleans()), unbatched=unbatched and not functional,
        batch=draw(st.integers(1, 3)), spatial=tup(st.integers(1, 6)), layout=draw(st.sampled_from(layouts)),
        functional=functional, eps=eps, weights=weights, seed=draw(st.integers(0, 2**31 - 1)),
    )  # fmt: skip
    assume(all(o >= 1 for o in c.out_spatial))
    assume(not (c.eps == 0.0 and c.weights == "zero"))  # undefined: a rotation by 0
    if c.padding_mode != "zeros":  # F.pad's rules: reflect below the size, circular at most the size
        ok = (lambda p, s: p < s) if c.padding_mode == "reflect" else (lambda p, s: p <= s)
        assume(all(ok(max(pair), s) for pair, s in zip(c.pads(), c.spatial, strict=True)))
    if c.functional and c.padding_mode != "zeros":  # the functional op pads with zeros only
        c = ConvConfig(**{**c.__dict__, "padding_mode": "zeros"})
    return c


def _weights(c, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight, bias and scale in float64: normal weights, some quaternions of which near zero norm or zero."""
    g = torch.Generator().manual_seed(c.seed + 100)
    w = torch.randn(shape, generator=g, dtype=F64)
    if c.weights != "normal":
        # about a third of the weight quaternions (all four components), scaled by 1e-2, 1e-4, 1e-8 or 0
        which = torch.rand(shape[1:], generator=g) < 0.4
        factors = torch.tensor([1e-2, 1e-4, 1e-8], dtype=F64)[torch.randint(0, 3, shape[1:], generator=g)]
        factor = torch.zeros_like(factors) if c.weights == "zero" else factors
        w = torch.where(which, w * factor, w)
    bias = torch.randn(c.blocks * c.cout, generator=g, dtype=F64)
    scale = torch.rand(shape[1:], generator=g, dtype=F64) * 2 - 1
    return w, bias, scale


def reference_rotation_conv(
    c: ConvConfig, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor | None
) -> torch.Tensor:
    """The rotation conv of a batched ``x`` (N, n·Cin, *S), one weight quaternion and one kernel tap at a time."""
    n = x.shape[0]
    pure = (x[:, c.cin :] if c.quaternion_format else x).unflatten(1, (3, c.cin)).movedim(1, 0)  # (3, N, Cin, *S)
    cin_g, cout_g = c.cin // c.groups, c.cout // c.groups
    taps = list(itertools.product(*[range(k) for k in c.kernel]))
    if not c.transposed:
        flat = [p for pair in reversed(c.pads()) for p in pair]
        mode = "constant" if c.padding_mode == "zeros" else c.padding_mode
        padded = F.pad(pure.flatten(0, 1), flat, mode=mode).unflatten(0, (3, n))
        out = c.out_spatial
        y = [torch.zeros((3, n, *out), dtype=x.dtype) for _ in range(c.cout)]
        for tap in taps:
            # the input each output position reads through this tap: start + tap·dilation, every stride-th
            window = tuple(
                slice(t * d, t * d + s * (o - 1) + 1, s)
                for t, d, s, o in zip(tap, c.dilation, c.stride, out, strict=True)
            )
            v = padded[(slice(None), slice(None), slice(None), *window)]  # (3, N, Cin, *out)
            for o in range(c.cout):
                g = o // cout_g
                for b in range(cin_g):
                    wq = w[(slice(None), o, b, *tap)].view(4, *[1] * (1 + c.dims))
                    term = rotate(wq, v[:, :, g * cin_g + b], c.eps)
                    y[o] = y[o] + (term if scale is None else scale[(o, b, *tap)] * term)
    else:
        # the adjoint: input position p sends the rotation by w* to p·stride + tap·dilation (before the padding crop)
        full = [
            (s - 1) * st_ + d * (k - 1) + 1 + op
            for s, st_, d, k, op in zip(c.spatial, c.stride, c.dilation, c.kernel, c.output_padding, strict=True)
        ]
        y = [torch.zeros((3, n, *full), dtype=x.dtype) for _ in range(c.cout)]
        for tap in taps:
            where = tuple(
                slice(t * d, t * d + st_ * (s - 1) + 1, st_)
                for t, d, st_, s in zip(tap, c.dilation, c.stride, c.spatial, strict=True)
            )
            for i in range(c.cin):
                g = i // cin_g
                for b in range(cout_g):
                    o = g * cout_g + b
                    wq = w[(slice(None), i, b, *tap)].view(4, *[1] * (1 + c.dims))
                    term = rotate(conjugate(wq), pure[:, :, i], c.eps)
                    term = term if scale is None else scale[(i, b, *tap)] * term
                    y[o] = _add_at(y[o], where, term)
        crop = tuple(slice(p, p + o) for p, o in zip(c.padding, c.out_spatial, strict=True))
        y = [t[(slice(None), slice(None), *crop)] for t in y]
    out = torch.stack(y, 2).movedim(0, 1).flatten(1, 2)  # (N, 3·Cout, *out): [i|j|k]
    if c.quaternion_format:
        out = torch.cat([torch.zeros_like(out[:, : c.cout]), out], 1)
    return out if bias is None else out + bias.view(1, -1, *[1] * c.dims)


def _add_at(t: torch.Tensor, where: tuple[slice, ...], term: torch.Tensor) -> torch.Tensor:
    """``t`` with ``term`` added at ``t[:, :, *where]``, out of place."""
    out = t.clone()
    out[(slice(None), slice(None), *where)] += term
    return out


# --------------------------------------------------------------------------------------------------
# Running the layer and the reference
# --------------------------------------------------------------------------------------------------


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    diff = (got - want).norm().item()
    return 0.0 if diff == 0 else diff / max(want.norm().item(), 1e-300)


def _compare(got: dict[str, torch.Tensor], want: dict, lo: dict, sens: dict, dtype: torch.dtype, c) -> None:
    assert got.keys() == want.keys() == lo.keys()
    for what, g in got.items():
        assert g.dtype == dtype and g.shape == want[what].shape, (what, g.shape, want[what].shape)
        if dtype == F64:
            torch.testing.assert_close(g, want[what], msg=lambda m, what=what: f"{what}: {m} ({c})")
            continue
        error, lo_error = _rel(g, want[what]), _rel(lo[what], want[what])
        bound = max(FP32_TOLERANCE, FP32_FACTOR * lo_error, SENS_FACTOR * sens[what])
        assert error <= bound, (
            f"float32 {what}: relative error {error:.3g}, the reference's {lo_error:.3g}, one rounding of the "
            f"inputs moves it {sens[what]:.3g} ({c})"
        )


def _input(c, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(c.seed), dtype=F64).to(dtype)
    unbatched = getattr(c, "unbatched", False)
    if c.layout == "transposed" and x.dim() < 2:
        return x
    return _in_layout(x, c.layout, unbatched).requires_grad_()


def _run(c, dtype: torch.dtype, make, ref_call, params64: dict[str, torch.Tensor], shape) -> None:
    """The layer (or op) that ``make(dtype, params64)`` returns, ``(call, params)`` with ``params`` its leaves holding
    ``params64``'s values, against ``ref_call(x, params)``, both with their gradients, in ``dtype``."""
    x = _input(c, dtype, shape).detach().requires_grad_()
    call, params = make(dtype, params64)
    y = call(x)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(c.seed + 7), dtype=F64).to(dtype)
    leaves = {"input": x, **params}
    grads = torch.autograd.grad(y, list(leaves.values()), gy)
    got = {"forward": y.detach(), **{f"{k} gradient": g for k, g in zip(leaves, grads, strict=True)}}

    def reference_in(ref_dtype):
        xr = x.detach().to(ref_dtype).contiguous().requires_grad_()
        pr = {k: v.detach().to(ref_dtype).requires_grad_() for k, v in params.items()}
        yr = ref_call(xr, pr)
        lv = {"input": xr, **pr}
        grads = torch.autograd.grad(yr, list(lv.values()), gy.to(ref_dtype))
        return {"forward": yr.detach(), **{f"{k} gradient": g for k, g in zip(lv, grads, strict=True)}}

    want = reference_in(F64)
    lo = reference_in(dtype) if dtype != F64 else want
    sens = {} if dtype == F64 else _sensitivity(c, x, params, gy, ref_call, want)
    if dtype != F64:
        for what, ratio in _sum_conditions(x, params, gy, ref_call, want).items():
            sens[what] = max(sens[what], SUM_FACTOR / SENS_FACTOR * torch.finfo(dtype).eps * ratio)
    for k, v in got.items():
        assert torch.isfinite(v).all(), f"{k}: not finite ({c})"
    _compare(got, want, lo, sens, dtype, c)


def _sum_conditions(x, params, gy, ref_call, want) -> dict[str, float]:
    """``‖Σ |terms|‖ / ‖Σ terms‖`` for the scale and bias gradients, sums over the batch, positions (and taps) of
    ``g · rotate(w, v)`` and ``g``: the reference run on the absolute values with every rotated term replaced by its
    absolute value (the output is linear in the scale and the bias, so their gradients are then the sums of the
    terms' sizes). The standard bound on the rounding error of a sum is relative to that, not to the sum."""
    names = [k for k in ("scale", "bias") if k in params]
    if not names:
        return {}
    with mock.patch(f"{__name__}.rotate", lambda w, v, eps: _plain_rotate(w, v, eps).abs()):
        xr = x.detach().double().abs()
        pr = {k: v.detach().double().abs().requires_grad_() for k, v in params.items()}
        yr = ref_call(xr, pr)
        sizes = torch.autograd.grad(yr, [pr[k] for k in names], gy.double().abs())
    return {
        f"{k} gradient": size.norm().item() / max(want[f"{k} gradient"].norm().item(), 1e-300)
        for k, size in zip(names, sizes, strict=True)
    }


def _sensitivity(c, x, params, gy, ref_call, want) -> dict[str, float]:
    """How far each float64 result moves when the input, every parameter and the output gradient are rounded once
    more (a random relative error of up to one float32 eps on each element): the least any float32 computation is
    off by. Large where a gradient is a sum that nearly cancels (the scale gradient of one weight, a sum of a few
    products ``g · R(w) x`` of both signs)."""
    eps = torch.finfo(torch.float32).eps
    g = torch.Generator().manual_seed(c.seed + 13)

    def jiggle(t):
        return t.detach().double() * (1 + eps * (2 * torch.rand(t.shape, generator=g, dtype=F64) - 1))

    xr = jiggle(x).requires_grad_()
    pr = {k: jiggle(v).requires_grad_() for k, v in params.items()}
    yr = ref_call(xr, pr)
    lv = {"input": xr, **pr}
    grads = torch.autograd.grad(yr, list(lv.values()), jiggle(gy))
    moved = {"forward": yr.detach(), **{f"{k} gradient": gr for k, gr in zip(lv, grads, strict=True)}}
    return {k: _rel(v, want[k]) for k, v in moved.items()}


def _module_params(layer: torch.nn.Module, params64: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The drawn values copied into the layer's parameters; the parameters (the gradients' leaves)."""
    names = {"weight": "weight", "bias": "bias", "scale": "scale_param"}
    out = {}
    with torch.no_grad():
        for k, v in params64.items():
            param = getattr(layer, names[k])
            param.copy_(v)
            out[k] = param
    return out


def _params64(c, weight_shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """The layer's float64 parameters by name: the weight, and the bias and scale where ``c`` has them."""
    w, bias, scale = _weights(c, weight_shape)
    params = {"weight": w}
    if c.bias:
        params["bias"] = bias
    if c.scale:
        params["scale"] = scale
    return params


def _conv_case(c: ConvConfig, dtype: torch.dtype) -> None:
    params64 = _params64(c, c.weight_shape())

    def make(dtype, params64):
        if c.functional:
            p = {k: v.to(dtype).requires_grad_() for k, v in params64.items()}
            return lambda x: quaternion_rotation_conv(
                x, p["weight"], p.get("bias"), c.stride, c.padding, c.dilation, c.groups,
                transposed=c.transposed, output_padding=c.output_padding, scale=p.get("scale"),
                quaternion_format=c.quaternion_format, eps=c.eps,
            ), p  # fmt: skip
        kw = dict(
            kernel_size=c.kernel, stride=c.stride, padding=c.padding, dilation=c.dilation, groups=c.groups,
            bias=c.bias, padding_mode=c.padding_mode, dtype=dtype, rotation=True,
            quaternion_format=c.quaternion_format, scale=c.scale,
        )  # fmt: skip
        if c.transposed:
            kw["output_padding"] = c.output_padding
        layer = CONVS[(c.dims, c.transposed)](c.blocks * c.cin, c.blocks * c.cout, **kw)
        return layer, _module_params(layer, params64)

    def ref_call(x, p):
        xb = x.unsqueeze(0) if c.unbatched else x
        y = reference_rotation_conv(c, xb, p["weight"], p.get("bias"), p.get("scale"))
        return y[0] if c.unbatched else y

    _run(c, dtype, make, ref_call, params64, c.shape)


# Examples per test sized for CI; a longer hunt multiplies them: AQCF_GRID_SCALE=20 pytest <this file>.
GRID = grid(250, HealthCheck.filter_too_much)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@GRID
@given(c=conv_configs())
def test_rotation_conv_matches_the_reference(dtype, c):
    _conv_case(c, dtype)


# --------------------------------------------------------------------------------------------------
# The linear map
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearConfig:
    cin: int
    cout: int
    lead: tuple[int, ...]
    bias: bool
    quaternion_format: bool
    scale: bool
    layout: str
    functional: bool
    eps: float
    weights: str
    seed: int

    @property
    def blocks(self) -> int:
        return 4 if self.quaternion_format else 3


@st.composite
def linear_configs(draw) -> LinearConfig:
    lead = draw(st.lists(st.integers(1, 4), min_size=0, max_size=2).map(tuple))
    functional = draw(st.booleans())
    weights = draw(st.sampled_from(WEIGHTS))
    eps = draw(st.sampled_from([ROTATION_EPS, ROTATION_EPS, 0.0, 1e-2])) if functional else ROTATION_EPS
    assume(not (eps == 0.0 and weights == "zero"))
    return LinearConfig(
        cin=draw(st.integers(1, 4)), cout=draw(st.integers(1, 4)), lead=lead, bias=draw(st.booleans()),
        quaternion_format=draw(st.booleans()), scale=draw(st.booleans()),
        layout=draw(st.sampled_from(["contiguous", "strided"] + (["transposed"] if lead else []))),
        functional=functional, eps=eps, weights=weights, seed=draw(st.integers(0, 2**31 - 1)),
    )  # fmt: skip


def reference_rotation_linear(
    c: LinearConfig, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor | None
) -> torch.Tensor:
    """``y_o = Σ_i scale_{o,i} · rotate(W_{o,i}, x_i)`` over the last dim, one weight quaternion at a time."""
    pure = (x[..., c.cin :] if c.quaternion_format else x).unflatten(-1, (3, c.cin)).movedim(-2, 0)  # (3, ..., Cin)
    ys = []
    for o in range(c.cout):
        y = torch.zeros_like(pure[..., 0])
        for i in range(c.cin):
            term = rotate(w[:, o, i].view(4, *[1] * len(c.lead)), pure[..., i], c.eps)
            y = y + (term if scale is None else scale[o, i] * term)
        ys.append(y)
    out = torch.stack(ys, -1).movedim(0, -2).flatten(-2)  # (..., 3·Cout)
    if c.quaternion_format:
        out = torch.cat([torch.zeros_like(out[..., : c.cout]), out], -1)
    return out if bias is None else out + bias


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@grid(300, HealthCheck.filter_too_much)
@given(c=linear_configs())
def test_rotation_linear_matches_the_reference(dtype, c):
    params64 = _params64(c, (4, c.cout, c.cin))

    def make(dtype, params64):
        if c.functional:
            p = {k: v.to(dtype).requires_grad_() for k, v in params64.items()}
            return lambda x: quaternion_rotation_linear(
                x, p["weight"], p.get("bias"), scale=p.get("scale"), quaternion_format=c.quaternion_format, eps=c.eps
            ), p  # fmt: skip
        layer = QuaternionLinear(
            c.blocks * c.cin, c.blocks * c.cout, bias=c.bias, dtype=dtype, rotation=True,
            quaternion_format=c.quaternion_format, scale=c.scale,
        )  # fmt: skip
        return layer, _module_params(layer, params64)

    _run(c, dtype, make, lambda x, p: reference_rotation_linear(c, x, p["weight"], p.get("bias"), p.get("scale")),
         params64, (*c.lead, c.blocks * c.cin))  # fmt: skip
