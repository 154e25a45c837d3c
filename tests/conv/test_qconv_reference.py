"""Every backend and algorithm against ``reference.quaternion_conv_naive`` (the 16-conv ground truth).

float64 over a hypothesis-driven grid of conv hyper-parameters and input layouts: forward and the
input, weight and bias gradients. The extension's float32 routes (oneDNN where PyTorch would take its own
kernels: csrc/cpu/real_conv.cpp, float32 only) on the same grid, against the float64 reference within the
float32 contract; the CPU backends in bf16 and fp16 within the half-precision one (at most 2x the expanded conv's
error in the same dtype). The two reference baselines are checked against each other on
the same grid, and the naive conv against an element-wise Hamilton product for 1x1 kernels (the
one case where "y = W ⊗ x" can be written without any convolution at all), and the library's Hamilton
table against the reference's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, reject, settings
from hypothesis import strategies as st

from aqcf_kernels import backends, reference
from aqcf_kernels import functional as qF
from aqcf_kernels.backends.base import activate
from aqcf_kernels.backends.registry import BackendError, registered

from .test_qconv_accuracy import FP32_TOLERANCE  # the float32 contract

# Tiny convs only: one intra-op thread runs them faster (see tests/conv/conftest.py).
pytestmark = pytest.mark.usefixtures("single_threaded")


@dataclass(frozen=True)
class ConvConfig:
    spatial_dims: int
    transposed: bool
    batch: int
    cq_in: int
    cq_out: int
    groups: int
    spatial: tuple[int, ...]
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...] | int | str
    dilation: tuple[int, ...]
    output_padding: tuple[int, ...]
    bias: bool
    layout: str  # input: contiguous | strided (a slice) | transposed-view | channels_last
    weight_layout: str  # contiguous | transposed-view (dims 1 and 2 swapped in memory)
    grad_layout: str  # grad_output: contiguous | strided
    seed: int

    @property
    def weight_shape(self) -> tuple[int, ...]:
        if self.transposed:  # (4, Cq_in, Cq_out/G, *k)
            return (4, self.cq_in, self.cq_out // self.groups, *self.kernel)
        return (4, self.cq_out, self.cq_in // self.groups, *self.kernel)

    def kwargs(self) -> dict:
        kw = dict(stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups)
        if self.transposed:
            kw.update(transposed=True, output_padding=self.output_padding)
        return kw


def _output_sizes(c: ConvConfig) -> list[int]:
    """torch's output-size rule (the shape contract of F.conv*/F.conv_transpose*)."""
    if c.padding == "same":
        return list(c.spatial)
    pad = (0,) * c.spatial_dims if c.padding == "valid" else c.padding
    pad = (pad,) * c.spatial_dims if isinstance(pad, int) else pad
    out = []
    for i, k, s, p, d, op in zip(c.spatial, c.kernel, c.stride, pad, c.dilation, c.output_padding, strict=True):
        if c.transposed:
            out.append((i - 1) * s - 2 * p + d * (k - 1) + op + 1)
        else:
            out.append((i + 2 * p - d * (k - 1) - 1) // s + 1)
    return out


@st.composite
def conv_configs(draw, min_size: int = 1) -> ConvConfig:
    """``min_size``: the smallest spatial size of the input."""
    n = draw(st.sampled_from([1, 2, 3]))
    transposed = draw(st.booleans())
    groups = draw(st.sampled_from([1, 1, 2]))
    cq_in = groups * draw(st.integers(1, 2))
    cq_out = groups * draw(st.integers(1, 2))

    def per_dim(values):
        return draw(st.tuples(*[values] * n))

    kernel = per_dim(st.integers(1, 3))
    stride = per_dim(st.integers(1, 2))
    dilation = per_dim(st.integers(1, 2))
    int_padding = st.one_of(st.integers(0, 2), st.tuples(*[st.integers(0, 2)] * n))
    if transposed:
        padding = draw(int_padding)
        # torch's rule: below the stride or the dilation (a stride of 1 with a dilation of 2 allows 1)
        output_padding = tuple(draw(st.integers(0, max(s, d) - 1)) for s, d in zip(stride, dilation, strict=True))
    else:
        strings = ["valid", "same"] if all(s == 1 for s in stride) else ["valid"]
        padding = draw(st.one_of(int_padding, st.sampled_from(strings)))
        output_padding = (0,) * n
    # Odd and partial sizes; 3d stays smaller so each example costs milliseconds.
    spatial = per_dim(st.integers(min_size, (9, 6, 4)[n - 1]))
    layouts = ["contiguous", "strided", "transposed-view"] + (["channels_last"] if n > 1 else [])
    config = ConvConfig(
        spatial_dims=n,
        transposed=transposed,
        batch=draw(st.sampled_from([1, 1, 2, 3])),
        cq_in=cq_in,
        cq_out=cq_out,
        groups=groups,
        spatial=spatial,
        kernel=kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        output_padding=output_padding,
        bias=draw(st.booleans()),
        layout=draw(st.sampled_from(layouts)),
        weight_layout=draw(st.sampled_from(["contiguous", "transposed-view"])),
        grad_layout=draw(st.sampled_from(["contiguous", "strided"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )
    assume(all(o >= 1 for o in _output_sizes(config)))
    return config


def _with_layout(shape, layout: str, seed: int, qrand, dim: int = 1, dtype=torch.float64) -> torch.Tensor:
    """A ``dtype`` tensor with the given memory layout (values differ per layout; irrelevant)."""
    if layout == "contiguous":
        t = qrand(*shape, dim=dim, seed=seed, dtype=dtype)
    elif layout == "strided":  # every other element of a wider tensor: last-dim stride 2
        t = qrand(*shape[:-1], 2 * shape[-1], dim=dim, seed=seed, dtype=dtype)[..., ::2]
    elif layout == "transposed-view":  # two dims swapped in memory: dims 1, 2 of a weight, else the last two
        a, b = (1, 2) if dim == 0 else (-2, -1)
        swapped = list(shape)
        swapped[a], swapped[b] = shape[b], shape[a]
        t = qrand(*swapped, dim=dim, seed=seed, dtype=dtype).transpose(a, b)
    else:
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        t = qrand(*shape, seed=seed, dtype=dtype).contiguous(memory_format=fmt)
    assert t.shape == tuple(shape)
    return t.detach()  # a leaf with the view's strides


def _leaves(c: ConvConfig, qrand, dtype=torch.float64):
    x = _with_layout((c.batch, 4 * c.cq_in, *c.spatial), c.layout, c.seed, qrand, dtype=dtype).requires_grad_(True)
    w = _with_layout(c.weight_shape, c.weight_layout, c.seed + 1, qrand, dim=0, dtype=dtype).requires_grad_(True)
    b = qrand(4 * c.cq_out, dim=0, seed=c.seed + 2, dtype=dtype, requires_grad=True) if c.bias else None
    return x, w, b


def _forward_and_grads(fn, x, w, b, c: ConvConfig, qrand, grad_dtype=None, grad_mask=None):
    """Output and the gradients of <g, out> w.r.t. (input, weight, bias) for a fixed random g: drawn in float64,
    rounded to ``grad_dtype`` (default: x's dtype), times ``grad_mask`` if given, in x's dtype. In c.grad_layout
    where that is x's dtype (a cast of the strided view would have made it contiguous)."""
    y = fn(x, w, b)
    g = _with_layout(y.shape, c.grad_layout, c.seed + 3, qrand, dtype=grad_dtype or x.dtype)
    if grad_mask is not None:
        g.mul_(grad_mask)  # (in place: the view keeps its strides)
    g = g.to(x.dtype)
    leaves = [t for t in (x, w, b) if t is not None]
    return y, torch.autograd.grad(y, leaves, g)


def _fresh(*tensors):
    """Contiguous float64 copies as new leaves, so the reference sees plain inputs."""
    return [None if t is None else t.detach().contiguous().requires_grad_(True) for t in tensors]


GRID = settings(
    max_examples=120,
    deadline=None,
    # The `backend` fixture only sets AQCF_BACKEND, which holds for every example of the test.
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


# torch warns that 'same' with an even kernel copies the input: expected, and not our concern here.
@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("algorithm", ["hamilton", "fast8"])
@GRID
@given(c=conv_configs())
def test_matches_naive_reference_forward_and_grads(backend, algorithm, c, qrand, served):
    x, w, b = _leaves(c, qrand)
    served(backend, x, w, algorithm, **c.kwargs())  # a declared limitation (e.g. no float64) skips visibly
    y, grads = _forward_and_grads(
        lambda x, w, b: qF.quaternion_conv(x, w, b, **c.kwargs(), algorithm=algorithm), x, w, b, c, qrand
    )
    y_ref, grads_ref = _forward_and_grads(
        lambda x, w, b: reference.quaternion_conv_naive(x, w, b, **c.kwargs()), *_fresh(x, w, b), c, qrand
    )
    torch.testing.assert_close(y, y_ref, msg=lambda m: f"forward: {m}")
    assert len(grads) == len(grads_ref)
    for name, got, want in zip(("input", "weight", "bias"), grads, grads_ref, strict=False):  # no bias: 2 grads
        torch.testing.assert_close(got, want, msg=lambda m, name=name: f"{name} gradient: {m}")
    if c.layout == "channels_last" and not x.is_contiguous():
        # Outputs follow the input's memory format, like torch's convs (an input that is both
        # contiguous and channels_last, e.g. 1x1 spatial, is contiguous to torch too).
        fmt = torch.channels_last if c.spatial_dims == 2 else torch.channels_last_3d
        assert y.is_contiguous(memory_format=fmt)


# The compiled CPU backends and the algorithms each runs; their float32 routes are what this grid adds (torch's
# float32 convs are PyTorch's own).
FLOAT32_BACKENDS = [("cpp", "hamilton"), ("cpp", "fast8"), ("cpp_cl", "hamilton"), ("cpp_im2col", "hamilton")]


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize(("name", "algorithm"), FLOAT32_BACKENDS)
@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much],  # (calls declined)
)
# Inputs of at least 2 per spatial dim: PyTorch's own float32 conv (oneDNN's BRGEMM kernel) segfaults on some with a
# size-1 spatial dim in a strided layout (pytorch/pytorch#195394, open; here F.conv2d of a channels_last
# (1, 16, 2, 1) input, groups 2, stride (1, 2), dilation 2, with a bias, on an AMD EPYC). Not this grid's subject,
# and a crash ends the run; the float64 grid above, off oneDNN, keeps size 1. (With AQCF_TEST_THREADS=2 this grid
# can also reach a oneDNN crash of PyTorch's own, 2026-12-07, AMD EPYC: the 1x1 weight gradient of 4 channels, stride
# 2, batch 3, channels_last, on 2 threads, `aten.convolution_backward` alone reproduces it; CI runs it on 1 thread.)
@given(c=conv_configs(min_size=2), activation=st.sampled_from([None, "relu", "leaky_relu", "gelu"]))
def test_float32_routes_match_the_naive_reference(name, algorithm, c, activation, qrand):
    """One thread (this module's fixture), as fast8's products always run: a single-threaded 1x1 conv of several
    samples once took a one-sample route and got sample 0's weight gradient alone. With a fused activation (oneDNN's
    post-op on float32 forward convs, fast8's output pass) or none. Calls a backend declines (cpp_cl has no 1d,
    cpp_im2col no pointwise conv) are not examples."""
    if registered("conv")[name].unavailable() is not None:
        pytest.skip(f"{name}: {registered('conv')[name].unavailable()}")
    x, w, b = _leaves(c, qrand, torch.float32)
    try:
        with backends.use(name):
            y, grads = _forward_and_grads(
                lambda x, w, b: qF.quaternion_conv(
                    x, w, b, **c.kwargs(), algorithm=algorithm, activation=activation, negative_slope=0.1
                ),
                x, w, b, c, qrand,
            )  # fmt: skip
    except BackendError:
        reject()

    def act(z):
        return z if activation is None else activate(z, activation, 0.1)

    leaves64 = _fresh(*(None if t is None else t.double() for t in (x, w, b)))
    y_ref, grads_ref = _forward_and_grads(
        lambda x, w, b: act(reference.quaternion_conv_naive(x, w, b, **c.kwargs())), *leaves64, c, qrand
    )
    tolerance = FP32_TOLERANCE[algorithm]
    names = ("forward", "input grad", "weight grad", "bias grad")  # (no bias: no bias grad)
    for what, got, want in zip(names, (y, *grads), (y_ref, *grads_ref), strict=False):
        error = ((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item()
        bound = tolerance * (_gelu_condition(leaves64, c) if what == "forward" and activation == "gelu" else 1.0)
        assert error < bound, f"{name}/{algorithm} {what}: relative error {error:.1e}, bound {bound:.1e} ({c})"


def _gelu_condition(leaves64, c: ConvConfig) -> float:
    """GELU's norm-wise relative condition number at the conv's float64 output z, ``max|gelu'(z)| ||z|| / ||gelu(z)||``
    (at least 1): the factor by which the conv's relative error in z may grow through it. Where every z of a small map
    lies in GELU's negative tail (z ~ -3: gelu(z) = -0.004, gelu'(z) = -0.01) it is ~10, and a conv within the
    contract gave GELU outputs 1.7e-5 off (cpp_im2col, hamilton, one example in a thousand)."""
    with torch.no_grad():
        z = reference.quaternion_conv_naive(*leaves64, **c.kwargs())
        normal = torch.distributions.Normal(0.0, 1.0)
        slope = normal.cdf(z) + z * normal.log_prob(z).exp()
        condition = slope.abs().max() * z.norm() / F.gelu(z).norm().clamp_min(1e-300)
    return max(1.0, condition.item())


# Half precision on CPU: PyTorch's own kernels run every real conv (csrc/cpu/real_conv.cpp reroutes float32 only;
# cpp_im2col, which differs from cpp by that route alone, declines), so what this grid holds to the contract is the
# extension's and the torch backend's own work around them: the expanded weight and its gradient's fold, the
# group-major channel order, the pointwise GEMMs, the transposed conv's weight gradient with the roles swapped, the
# activation and bias, cpp_cl's channels_last copies.
HALF_BACKENDS = ["torch", "cpp", "cpp_cl", "cpp_im2col"]
# The bound on a half-precision result's relative error (norm-wise, over the whole tensor), in units of the dtype's eps:
# the contract's 2x the expanded conv's error in the same dtype, but not below HALF_FLOOR eps nor above HALF_CEILING
# eps. Every result is rounded to the dtype at least once (up to eps/2 an element) and PyTorch's CPU kernels round a few
# times more (a GEMM's output before col2im's or the bias's sums, the expanded weight gradient's blocks before their
# fold): on this grid (1,000 examples a dtype and backend, 3,400 results) ours and the expanded conv's errors were all
# below 1.6 eps, and on a tensor of 4 elements the expanded conv's can be lucky (0.2 eps where ours was 0.6: a ratio of
# 3 with nothing wrong). The floor of 4 eps (3% in bf16, 0.4% in fp16) leaves those alone and still fails any wrong
# route: a lost sample, group, sign or window row is an O(1) error in the elements it touches, above 10% of the norm
# even where that is one element in a hundred. The ceiling, 10x the largest error seen, fails a result where PyTorch's
# kernel is wrong in the expanded conv too, which would pass as "no worse than the expanded conv" (bf16 oneDNN weight
# gradients: a conv3d's is garbage where the kernel is deeper than the input, e.g. a channels_last (3, 8, 2, 2, 2)
# input, a (4, 8, 3, 3, 2) weight, padding 1; torch 2.13, AMD EPYC: this grid found it, through cpp_cl's
# channels_last copies of contiguous inputs too, and the backends now take those gradients in float32,
# test_real_conv_routes.py). Not on GELU's gradients: its slope vanishes at
# z=-0.75 and in its tail, so where every z of a small map is there, the gradient's relative error is large for ours and
# the expanded conv alike (ill-conditioned, not wrong).
HALF_FLOOR, HALF_CEILING = 4.0, 16.0
# ReLU's and leaky ReLU's gradients jump where the pre-activation z crosses 0: one rounded within its error of 0 may
# take the other slope, an O(1) error in that element that is no fault of the conv (fp16 channels_last transposed
# convs round partial sums: a z of 1.4e-3 came out 0.0 through cpp_cl; the expanded conv, contiguous, kept its sign).
# So the output gradient is zeroed where |z| < HALF_KINK eps s, for s an upper bound (within 2x) on the root sum of
# squares of the products z adds: the elements whose rounding error can reach 0 (|z_half - z| < 1.3 eps s on the
# grid, ours and the expanded conv's alike). 5% of the elements in bf16, 0.7% in fp16: the gradients of <g, y> are
# still compared in full, for a g a little sparser.
HALF_KINK = 4.0


def _error_scale(x, w, b, c: ConvConfig) -> torch.Tensor:
    """Per output element, sqrt(sum of the squares of the products the conv adds) within a factor 2 above: each
    output component adds 4 of the 16 component products, so all 16 bound it, the naive conv of sum(x_a^2) in every
    input component with sum(w_p^2) in the weight's real part (whose products all come with a plus sign)."""
    x2 = x.detach().double().square().unflatten(1, (4, -1)).sum(1).repeat(1, 4, *[1] * c.spatial_dims)
    w2 = torch.zeros(w.shape, dtype=torch.float64)
    w2[0] = w.detach().double().square().sum(0)
    b2 = None if b is None else b.detach().double().square()
    return reference.quaternion_conv_naive(x2, w2, b2, **c.kwargs()).sqrt()


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", HALF_BACKENDS)
@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much],  # (calls declined)
)
# Sizes of at least 2 per spatial dim in the input, as the float32 grid, and in the output too: PyTorch's bf16
# oneDNN conv segfaults on a channels_last map with a size-1 dim that a stride and a dilation of 2 step over
# (F.conv2d of a channels_last (1, 4, 2, 1) bf16 input, a (4, 4, 1, 1) weight, stride (1, 2), padding (0, 1),
# dilation (1, 2); torch 2.13, AMD EPYC, 1 or 2 threads; fine in float32, fp16, contiguous or without oneDNN). The
# backward of a transposed conv with a size-1 output runs such a conv on its output gradient, which cpp_cl makes
# channels_last.
@given(
    c=conv_configs(min_size=2).filter(lambda c: min(_output_sizes(c)) >= 2),
    activation=st.sampled_from([None, "relu", "leaky_relu", "gelu"]),
)
def test_half_precision_routes_match_the_naive_reference(name, dtype, c, activation, qrand, served):
    """The hamilton algorithm in bf16 and fp16, forward and every gradient, with a fused activation or none, against
    the float64 naive reference on the same rounded inputs and output gradient: each result's relative error within
    2x the expanded conv's (Parcollet's: one PyTorch conv on the expanded weight, in the same dtype, on the same
    operands in the same layouts), and between HALF_FLOOR and HALF_CEILING eps (see those; a ReLU's output gradient
    spares the elements at its kink). Calls a backend declines (cpp_cl: 1d, channels_last inputs, pointwise convs) are
    not examples."""
    if registered("conv")[name].unavailable() is not None:
        pytest.skip(f"{name}: {registered('conv')[name].unavailable()}")
    # A call every CPU backend serves in float32: a backend that declines it here declines the dtype (cpp_im2col).
    served(name, torch.ones(1, 8, 5, 5, dtype=dtype), torch.ones(4, 2, 2, 3, 3, dtype=dtype), "hamilton")
    x, w, b = _leaves(c, qrand, dtype)
    eps = torch.finfo(dtype).eps
    x64, w64, b64 = _fresh(*(None if t is None else t.double() for t in (x, w, b)))
    mask = None
    if activation in ("relu", "leaky_relu"):
        with torch.no_grad():
            z = reference.quaternion_conv_naive(x64, w64, b64, **c.kwargs())
            mask = (z.abs() >= HALF_KINK * eps * _error_scale(x, w, b, c)).to(dtype)

    def act(z):
        return z if activation is None else activate(z, activation, 0.1)

    try:
        with backends.use(name):
            y, grads = _forward_and_grads(
                lambda x, w, b: qF.quaternion_conv(
                    x, w, b, **c.kwargs(), algorithm="hamilton", activation=activation, negative_slope=0.1
                ),
                x, w, b, c, qrand, grad_mask=mask,
            )  # fmt: skip
    except BackendError:
        reject()
    y_exp, grads_exp = _forward_and_grads(
        lambda x, w, b: act(reference.quaternion_conv_expanded(x, w, b, **c.kwargs())),
        x, w, b, c, qrand, grad_mask=mask,
    )  # fmt: skip
    y_ref, grads_ref = _forward_and_grads(
        lambda x, w, b: act(reference.quaternion_conv_naive(x, w, b, **c.kwargs())),
        x64, w64, b64, c, qrand, grad_dtype=dtype, grad_mask=mask,
    )  # fmt: skip
    names = ("forward", "input grad", "weight grad", "bias grad")  # (no bias: no bias grad)
    for what, got, exp, want in zip(names, (y, *grads), (y_exp, *grads_exp), (y_ref, *grads_ref), strict=False):
        scale = want.norm().clamp_min(1e-30)
        error, exp_error = (((t.double() - want).norm() / scale).item() / eps for t in (got, exp))
        bound = max(2 * exp_error, HALF_FLOOR) if math.isfinite(exp_error) else HALF_FLOOR  # (NaN: PyTorch's)
        if what == "forward" or activation != "gelu":
            bound = min(bound, HALF_CEILING)
        assert error <= bound, (
            f"{name} {dtype} {what}: relative error {error:.3g} eps, the expanded conv's {exp_error:.3g} eps "
            f"(bound {bound:.3g} eps, eps = {eps:.3g}; activation {activation}; {c})"
        )


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@settings(max_examples=100, deadline=None)
@given(c=conv_configs())
def test_expanded_reference_agrees_with_naive_reference(c, qrand):
    # The benchmark baseline (one conv on Parcollet's expanded weight) and the ground truth must
    # agree, including groups (where a plain torch `groups` would mix components across groups).
    x, w, b = _leaves(c, qrand)
    y, grads = _forward_and_grads(
        lambda x, w, b: reference.quaternion_conv_expanded(x, w, b, **c.kwargs()), x, w, b, c, qrand
    )
    y_ref, grads_ref = _forward_and_grads(
        lambda x, w, b: reference.quaternion_conv_naive(x, w, b, **c.kwargs()), *_fresh(x, w, b), c, qrand
    )
    torch.testing.assert_close(y, y_ref)
    for got, want in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got, want)


@settings(max_examples=30, deadline=None)
@given(
    spatial_dims=st.sampled_from([1, 2, 3]),
    transposed=st.booleans(),
    cq_in=st.integers(1, 3),
    cq_out=st.integers(1, 3),
    batch=st.integers(1, 2),
    seed=st.integers(0, 2**31 - 1),
)
def test_naive_reference_with_1x1_kernel_is_the_hamilton_product(
    spatial_dims, transposed, cq_in, cq_out, batch, seed, qrand
):
    # With a 1x1 kernel, y_o(pixel) = sum_i W[o, i] ⊗ x_i(pixel) (a transposed conv is the adjoint:
    # y_o = sum_i conj(W[i, o]) ⊗ x_i), which reference.hamilton_product computes with no conv at all.
    spatial = (5, 3, 2)[:spatial_dims]
    x = qrand(batch, 4 * cq_in, *spatial, seed=seed)
    ones = (1,) * spatial_dims
    w = qrand(4, *((cq_in, cq_out) if transposed else (cq_out, cq_in)), *ones, dim=0, seed=seed + 1)
    y = reference.quaternion_conv_naive(x, w, transposed=transposed)

    w2 = w.reshape(4, *w.shape[1:3])  # (4, A, B)
    if transposed:  # (4, in, out) -> conj, as (4, out, in)
        w2 = reference.conjugate(w2, dim=0).transpose(1, 2)
    # Broadcast to (N, 4, out, in, *spatial): blocked along dim 1 with one channel per block.
    q = w2.reshape(1, 4, cq_out, cq_in, *ones)
    p = x.reshape(batch, 4, 1, cq_in, *spatial)
    expected = reference.hamilton_product(q, p, dim=1).sum(dim=3).reshape(batch, 4 * cq_out, *spatial)
    torch.testing.assert_close(y, expected)


def test_library_hamilton_table_is_the_references():
    # The library derives its table from Hamilton's rules (aqcf_kernels.quaternion.unit_product); the
    # oracle writes it out by hand. Every backend's signs come from the former, every test's from the latter.
    from aqcf_kernels import quaternion

    assert quaternion.HAMILTON == reference.HAMILTON


@settings(max_examples=40, deadline=None)
@given(
    kernel=st.sampled_from([(), (3,), (2, 3), (3, 1, 2)]),
    groups=st.integers(1, 3),
    a_per_group=st.integers(1, 3),
    b=st.integers(1, 3),
    seed=st.integers(0, 2**31 - 1),
)
def test_weight_expansion_is_the_references_and_folding_its_adjoint(kernel, groups, a_per_group, b, seed):
    # The torch backend's hamilton algorithm runs one conv on quaternion.expand_weight_grouped and folds
    # the expanded weight gradient with fold_weight_grad_grouped: the first must be Parcollet's weight
    # per group (reference.expand_weight), the second its adjoint, <expand(W), G> = <W, fold(G)>.
    from aqcf_kernels import quaternion

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(4, groups * a_per_group, b, *kernel, generator=g, dtype=torch.float64)
    expected = torch.cat([reference.expand_weight(wg) for wg in w.chunk(groups, dim=1)], dim=0)
    e = quaternion.expand_weight_grouped(w, groups)
    assert torch.equal(e, expected)
    grad = torch.randn(e.shape, generator=g, dtype=torch.float64)
    folded = quaternion.fold_weight_grad_grouped(grad, groups)
    assert folded.shape == w.shape
    torch.testing.assert_close((e * grad).sum(), (w * folded).sum(), rtol=1e-12, atol=1e-12)
    # and fold(G) is exactly the gradient autograd finds through the reference expansion
    w.requires_grad_(True)
    (auto_grad,) = torch.autograd.grad(
        torch.cat([reference.expand_weight(wg) for wg in w.chunk(groups, dim=1)], dim=0), w, grad
    )
    torch.testing.assert_close(folded, auto_grad, rtol=0, atol=1e-14)
