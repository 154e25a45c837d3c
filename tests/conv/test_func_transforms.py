"""torch.func through the quaternion conv ops (``aqcf_kernels.ops.func``): ``grad``, ``jvp``, ``vmap``, per-sample
gradients and second derivatives, each against the same transform of the plain-PyTorch reference (float64).

Before, every transform failed through the ops ("cannot use C++ torch::autograd::Function with functorch
transforms"; without the extension, the custom op's generated Function lacked ``setup_context``) and
``vmap`` ran a per-slice loop. The vmap rules fold the vmapped dim into the conv's batch or groups, so the
cases below have groups, strides, a transposed conv with output padding, and vmapped dims other than 0.
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwad
from torch.func import grad, jacfwd, jacrev, jvp, vmap
from torch.testing import assert_close

from aqcf_kernels import functional as qF
from aqcf_kernels import reference
from aqcf_kernels.backends.base import activate
from aqcf_kernels.ops import conv as conv_ops
from aqcf_kernels.ops.conv import NATIVE
from aqcf_kernels.ops.func import transforms_active

# every vmap below must be served by a batching rule (the ops' own), not a loop over slices
pytestmark = pytest.mark.usefixtures("single_threaded", "no_vmap_fallback")

# (input shape, weight shape, geometry): groups, strides, padding, dilation, transposed with output padding
CASES = {
    "conv1d": ((2, 8, 7), (4, 2, 1, 3), dict(stride=2, padding=1, groups=2)),
    "conv2d": ((2, 4, 5, 4), (4, 2, 1, 3, 2), dict(stride=(2, 1), padding=(1, 0), dilation=(1, 2))),
    "conv_transpose2d": (
        (1, 8, 3, 2),
        (4, 2, 1, 3, 2),
        dict(stride=2, padding=1, output_padding=1, groups=2, transposed=True),
    ),
    "conv3d": ((1, 4, 3, 4, 3), (4, 3, 1, 2, 2, 2), dict(padding=1)),
}
# (activation, negative_slope): none, one whose gradient reads y, two that keep the pre-activation
ACTIVATIONS = {"none": (None, 0.01), "relu": ("relu", 0.01), "gelu": ("gelu", 0.01), "leaky-neg": ("leaky_relu", -0.3)}
DOUBLE = dict(dtype=torch.float64)


def _out_channels(weight_shape, geometry) -> int:
    if geometry.get("transposed"):
        return 4 * weight_shape[2] * geometry.get("groups", 1)
    return 4 * weight_shape[1]


def _convs(case: str, algorithm: str, act: str):
    """``(ours, ref, x, w, b)``: the op and the reference as functions of ``(x, w, b)``, fresh inputs."""
    input_shape, weight_shape, geometry = CASES[case]
    activation, slope = ACTIVATIONS[act]

    def ours(x, w, b):
        return qF.quaternion_conv(x, w, b, **geometry, algorithm=algorithm, activation=activation, negative_slope=slope)

    def ref(x, w, b):
        y = reference.quaternion_conv_expanded(x, w, b, **geometry)
        return y if activation is None else activate(y, activation, slope)

    x = torch.randn(input_shape, **DOUBLE)
    w = torch.randn(weight_shape, **DOUBLE)
    b = torch.randn(_out_channels(weight_shape, geometry), **DOUBLE)
    return ours, ref, x, w, b


def _both(transform, ours, ref, *args):
    return transform(ours)(*args), transform(ref)(*args)


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("algorithm", ["hamilton", "fast8"])
@pytest.mark.parametrize("case", CASES)
def test_grad_matches_reference(case, algorithm, act):
    ours, ref, x, w, b = _convs(case, algorithm, act)
    u = torch.randn_like(ref(x, w, b))

    def loss(conv):
        return lambda x, w, b: (conv(x, w, b) * u).sum()

    got, want = _both(lambda f: grad(loss(f), argnums=(0, 1, 2)), ours, ref, x, w, b)
    assert_close(got, want)


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("case", CASES)
def test_jvp_matches_reference(case, act):
    ours, ref, x, w, b = _convs(case, "hamilton", act)
    dx, dw, db = torch.randn_like(x), torch.randn_like(w), torch.randn_like(b)
    for primals, tangents, fix in [
        ((x, w, b), (dx, dw, db), lambda f: f),
        ((w,), (dw,), lambda f: lambda w: f(x, w, b)),  # no input tangent
        ((b,), (db,), lambda f: lambda b: f(x, w, b)),  # a bias tangent alone
        ((x,), (dx,), lambda f: lambda x: f(x, w, None)),  # no bias
    ]:
        got, want = jvp(fix(ours), primals, tangents), jvp(fix(ref), primals, tangents)
        assert_close(got, want)


@pytest.mark.parametrize("algorithm", ["hamilton", "fast8"])
@pytest.mark.parametrize("case", CASES)
def test_vmap_over_inputs(case, algorithm):
    ours, ref, x, w, b = _convs(case, algorithm, "relu")
    xs = torch.stack([torch.randn_like(x) for _ in range(3)], dim=1)  # vmapped dim 1
    got = vmap(ours, in_dims=(1, None, None))(xs, w, b)
    want = torch.stack([ref(xs[:, i], w, b) for i in range(3)])
    assert_close(got, want)


@pytest.mark.parametrize("vmapped", ["weight+bias", "all", "weight", "bias", "input+bias"])
@pytest.mark.parametrize("case", CASES)
def test_vmap_over_weights_folds_into_groups(case, vmapped):
    """Per-slice weights (model ensembles, MAML inner loops): one grouped conv."""
    ours, ref, x, w, b = _convs(case, "hamilton", "gelu")
    n = 3
    slices = {
        "input": torch.stack([torch.randn_like(x) for _ in range(n)]),
        "weight": torch.stack([torch.randn_like(w) for _ in range(n)]),
        "bias": torch.stack([torch.randn_like(b) for _ in range(n)]),
    }
    names = ("input", "weight", "bias")
    batched = set(names) if vmapped == "all" else set(vmapped.split("+"))
    args = [slices[k] if k in batched else v for k, v in zip(names, (x, w, b), strict=True)]
    in_dims = tuple(0 if k in batched else None for k in names)
    got = vmap(ours, in_dims=in_dims)(*args)
    want = torch.stack([ref(*(a[i] if d == 0 else a for a, d in zip(args, in_dims, strict=True))) for i in range(n)])
    assert_close(got, want)


@pytest.mark.parametrize("act", ["none", "leaky-neg"])
@pytest.mark.parametrize("algorithm", ["hamilton", "fast8"])
@pytest.mark.parametrize("case", CASES)
def test_per_sample_gradients(case, algorithm, act):
    """``vmap(grad(loss))`` over samples (DP-SGD, Opacus' functorch path): the weight gradient vmapped in
    its input and output gradient, the input gradient's conv vmapped in its input."""
    ours, ref, x, w, b = _convs(case, algorithm, act)
    target = torch.randn_like(ref(x, w, b))

    def loss(conv):
        return lambda w, b, x, t: (conv(x[None], w, b)[0] - t).square().sum()

    got = vmap(grad(loss(ours), argnums=(0, 1)), in_dims=(None, None, 0, 0))(w, b, x, target)
    want = [grad(loss(ref), argnums=(0, 1))(w, b, x[i], target[i]) for i in range(x.shape[0])]
    assert_close(got, tuple(torch.stack(g) for g in zip(*want, strict=True)))


# How many slices one call folds (``ops.conv.fold_chunk``): one (every slice its own call, on its own tensors),
# two of three (the last call holds one), all (one folded call)
CHUNKS = {"each": 1, "two": 2, "all": None}


@pytest.fixture(params=CHUNKS)
def fold_in_chunks(request, monkeypatch):
    chunk = CHUNKS[request.param]
    if chunk is not None:
        monkeypatch.setattr(conv_ops, "fold_chunk", lambda slice_bytes, size, device: min(size, chunk))
    return request.param


@pytest.mark.parametrize("case", CASES)
def test_per_sample_gradients_in_chunks(case, fold_in_chunks):
    """Three samples' gradients folded in one call, in calls of two and one, or one call per sample."""
    ours, ref, x, w, b = _convs(case, "fast8", "relu")
    x = torch.cat([x, torch.randn_like(x)])[:3]
    target = torch.randn(x.shape[0], *ref(x[:1], w, b).shape[1:], **DOUBLE)

    def loss(conv):
        return lambda w, b, x, t: (conv(x[None], w, b)[0] - t).square().sum()

    got = vmap(grad(loss(ours), argnums=(0, 1)), in_dims=(None, None, 0, 0))(w, b, x, target)
    want = [grad(loss(ref), argnums=(0, 1))(w, b, x[i], target[i]) for i in range(x.shape[0])]
    assert_close(got, tuple(torch.stack(g) for g in zip(*want, strict=True)))


@pytest.mark.parametrize("vmapped", ["weight+bias", "all"])
@pytest.mark.parametrize("act", ["gelu", "none"])
def test_vmap_over_weights_in_chunks(vmapped, act, fold_in_chunks):
    """Three per-slice weights (an ensemble) in one grouped conv, in calls of two and one, or one each."""
    ours, ref, x, w, b = _convs("conv_transpose2d", "hamilton", act)
    n = 3
    args = [torch.stack([torch.randn_like(t) for _ in range(n)]) for t in (x, w, b)]
    in_dims = (0 if vmapped == "all" else None, 0, 0)
    if in_dims[0] is None:
        args[0] = x
    got = vmap(ours, in_dims=in_dims)(*args)
    want = torch.stack([ref(*(a[i] if d == 0 else a for a, d in zip(args, in_dims, strict=True))) for i in range(n)])
    assert_close(got, want)


def test_fold_chunk_bounds_the_copies(monkeypatch):
    """Slices of 0.3 MiB: three to a 1 MiB call; slices over the budget one each; no budget, one call."""
    monkeypatch.setattr(conv_ops, "FOLD_BYTES", {"cpu": 1 << 20})
    cpu, meta = torch.device("cpu"), torch.device("meta")
    assert conv_ops.fold_chunk(300 << 10, 8, cpu) == 3
    assert conv_ops.fold_chunk(300 << 10, 2, cpu) == 2
    assert conv_ops.fold_chunk(3 << 20, 8, cpu) == 1
    assert conv_ops.fold_chunk(0, 8, cpu) == 8
    assert conv_ops.fold_chunk(3 << 20, 8, meta) == 8  # no budget for that device: one folded call


def test_a_large_samples_weight_gradient_reads_the_callers_tensor(monkeypatch):
    """Per-sample gradients of samples larger than the fold budget: each sample's weight gradient is a call
    on a view of the caller's input, not on a folded copy (the copies were most of the peak memory)."""
    monkeypatch.setattr(conv_ops, "FOLD_BYTES", {"cpu": 1 << 10})
    x, w = torch.randn(3, 8, 9, 7, **DOUBLE), torch.randn(4, 2, 2, 3, 3, **DOUBLE)
    seen = []
    original = conv_ops.call_qconv_weight_grad

    def spy(input, *args):
        if not transforms_active():  # the op's own call, inside the vmap rule: plain tensors
            seen.append((input.shape, input.untyped_storage().data_ptr()))
        return original(input, *args)

    monkeypatch.setattr(conv_ops, "call_qconv_weight_grad", spy)

    def loss(w, x):
        return qF.quaternion_conv2d(x[None], w, None, padding=1, algorithm="hamilton").square().sum()

    got = vmap(grad(loss), in_dims=(None, 0))(w, x)
    assert [shape for shape, _ in seen] == [(1, 8, 9, 7)] * 3
    assert all(ptr == x.untyped_storage().data_ptr() for _, ptr in seen)
    want = torch.stack([grad(loss)(w, x[i]) for i in range(3)])
    assert_close(got, want)


@pytest.mark.parametrize("case", CASES)
def test_second_derivatives(case):
    """Forward-over-reverse Hessian-vector products (jvp of grad: the weight gradient's and the input
    gradient's forward-mode rules) and reverse-over-reverse, against the reference's."""
    ours, ref, x, w, b = _convs(case, "hamilton", "gelu")
    u = torch.randn_like(ref(x, w, b))
    tangents = (torch.randn_like(x), torch.randn_like(w), torch.randn_like(b))

    def loss(conv):
        return lambda x, w, b: (conv(x, w, b) * u).square().sum()

    def hvp(conv):
        return jvp(grad(loss(conv), argnums=(0, 1, 2)), (x, w, b), tangents)[1]

    assert_close(hvp(ours), hvp(ref))

    def reverse_reverse(conv):
        g = grad(loss(conv), argnums=1)
        return grad(lambda w: (g(x, w, b) * tangents[1]).sum())(w)

    assert_close(reverse_reverse(ours), reverse_reverse(ref))


def test_jacobians_forward_and_reverse():
    ours, ref, x, w, b = _convs("conv1d", "fast8", "relu")
    want = jacrev(ref, argnums=1)(x, w, b)
    assert_close(jacrev(ours, argnums=1)(x, w, b), want)
    assert_close(jacfwd(ours, argnums=1)(x, w, b), want)


def test_quaternion_linear():
    """The linear map runs one 1x1 conv with the rows as its length: vmapped rows and weights."""
    x, w, b = torch.randn(5, 3, 8, **DOUBLE), torch.randn(4, 2, 2, **DOUBLE), torch.randn(8, **DOUBLE)
    ws = torch.randn(4, *w.shape, **DOUBLE)
    got = vmap(qF.quaternion_linear, in_dims=(None, 0, None))(x, ws, b)
    assert_close(got, torch.stack([reference.quaternion_linear_expanded(x, wi, b) for wi in ws]))

    def loss(f):
        return lambda w, x: f(x, w, b).sin().sum()

    got = vmap(grad(loss(qF.quaternion_linear)), in_dims=(None, 0))(w, x)
    want = torch.stack([grad(loss(reference.quaternion_linear_expanded))(w, xi) for xi in x])
    assert_close(got, want)


@pytest.mark.skipif(not NATIVE, reason="without the extension the whole suite tests the Python definitions")
def test_the_python_definitions_pass_these_tests(without_extension):
    """Without the extension the ops are torch.library custom ops, whose own autograd functorch refuses."""
    check = "import aqcf_kernels.ops.conv as c; assert not c.NATIVE, 'the extension defines the ops'"
    without_extension(__file__, "tests/nn/test_func_transforms.py", check=check)


@pytest.mark.parametrize("act", ["none", "leaky-neg"])
def test_forward_mode_ad_with_dual_tensors(act):
    """``torch.autograd.forward_ad`` (no functorch): the same forward-mode rule, against the reference's."""
    ours, ref, x, w, b = _convs("conv_transpose2d", "fast8", act)
    tangents = (torch.randn_like(x), torch.randn_like(w), torch.randn_like(b))
    with fwad.dual_level():
        duals = [fwad.make_dual(p, t) for p, t in zip((x, w, b), tangents, strict=True)]
        got = fwad.unpack_dual(ours(*duals)).tangent
    assert_close(got, jvp(ref, (x, w, b), tangents)[1])
