"""The fused quaternion norm + activation (``aqcf::qnorm``, csrc/cpu/norm.cpp) against the composite path.

The composite code of :func:`aqcf_kernels.nn.norm._quaternion_norm` (``fused=False``) is the reference
(tests/nn/test_norm.py holds it to the definitions); here the fused op must match it, forward, every
gradient and the running statistics, for batch and instance norm, training and eval, every activation,
NCHW and channels_last, 1d/2d/3d, and pass gradcheck in float64.
"""

from __future__ import annotations

import pytest
import torch

from aqcf_kernels import backends
from aqcf_kernels.backends._extension import _C
from aqcf_kernels.backends.registry import forget_choices
from aqcf_kernels.nn import QuaternionBatchNorm2d, QuaternionInstanceNorm3d
from aqcf_kernels.nn.norm import _quaternion_norm, _update_running
from aqcf_kernels.ops import norm as norm_ops

pytestmark = pytest.mark.skipif(norm_ops._C is None, reason="aqcf_kernels._C is not built")

ACTIVATIONS = [(None, 0.01), ("relu", 0.01), ("leaky_relu", 0.2), ("leaky_relu", -0.3), ("gelu", 0.01)]
SHAPES = {"1d": (3, 12, 7), "2d": (2, 8, 5, 3), "3d": (2, 8, 3, 2, 3)}


def _inputs(qrand, shape, dtype, channels_last=False, affine=True, seed=0):
    x = qrand(*shape, dtype=dtype, seed=seed)
    # an offset mean and unequal component scales: centring and the shared variance both matter
    x = (x * torch.linspace(0.5, 2.0, shape[1], dtype=dtype).view(1, -1, *[1] * (len(shape) - 2)) + 3.0).detach()
    if channels_last and x.dim() in (4, 5):
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    cq = shape[1] // 4
    w = (qrand(cq, dtype=dtype, seed=seed + 1) * 0.5 + 1.0) if affine else None
    b = qrand(shape[1], dtype=dtype, seed=seed + 2) if affine else None
    rm = qrand(shape[1], dtype=dtype, seed=seed + 3) * 0.1
    rv = qrand(cq, dtype=dtype, seed=seed + 4).abs() + 0.5
    return x, w, b, rm, rv


def _run(fused, x, w, b, rm, rv, per_sample, training, act, slope):
    x = x.detach().clone().requires_grad_()
    params = [t.detach().clone().requires_grad_() for t in (w, b) if t is not None]
    w_, b_ = (params + [None, None])[:2] if w is not None else (None, None)
    rm, rv = rm.clone(), rv.clone()
    y = _quaternion_norm("t", x, per_sample, rm, rv, w_, b_, training, 0.1, 1e-5, False, act, slope, fused=fused)
    # drawn in float64 whatever y's dtype, so float32 and float64 runs get the same gradient
    gy = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9)).to(y.dtype)
    grads = torch.autograd.grad(y, [x, *params], gy)
    return y, grads, rm, rv


@pytest.mark.parametrize("act,slope", ACTIVATIONS)
@pytest.mark.parametrize("per_sample", [False, True], ids=["batch", "instance"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dims", list(SHAPES))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_fused_matches_composite_float64(qrand, act, slope, per_sample, training, dims, channels_last) -> None:
    if channels_last and dims == "1d":
        pytest.skip("channels_last is a 4d/5d layout")
    x, w, b, rm, rv = _inputs(qrand, SHAPES[dims], torch.float64, channels_last)
    fused = _run(True, x, w, b, rm, rv, per_sample, training, act, slope)
    ref = _run(False, x, w, b, rm, rv, per_sample, training, act, slope)
    torch.testing.assert_close(fused[0], ref[0], rtol=1e-10, atol=1e-10)
    for g, r in zip(fused[1], ref[1], strict=True):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(fused[2], ref[2], rtol=1e-12, atol=1e-12)  # running mean
    torch.testing.assert_close(fused[3], ref[3], rtol=1e-12, atol=1e-12)  # running var
    if channels_last:
        assert fused[0].is_contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)


@pytest.mark.parametrize("per_sample", [False, True], ids=["batch", "instance"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_fused_float32_within_the_contract(qrand, per_sample, channels_last) -> None:
    """float32 ≤ 1e-5 relative to the float64 reference (forward and input gradient)."""
    shape = (4, 16, 33, 31)  # odd sizes: vector tails in both layouts
    x64, w, b, rm, rv = _inputs(qrand, shape, torch.float64, channels_last, seed=5)
    ref = _run(False, x64, w, b, rm, rv, per_sample, True, "gelu", 0.01)
    out = _run(True, x64.float(), w.float(), b.float(), rm.float(), rv.float(), per_sample, True, "gelu", 0.01)
    for o, r in zip((out[0], *out[1]), (ref[0], *ref[1]), strict=True):
        assert ((o.double() - r).norm() / r.norm()).item() < 1e-5


@pytest.mark.parametrize("act,slope", ACTIVATIONS)
@pytest.mark.parametrize("per_sample", [False, True], ids=["batch", "instance"])
def test_fused_gradcheck_float64(qrand, act, slope, per_sample) -> None:
    x, w, b, rm, rv = _inputs(qrand, (2, 8, 3, 4), torch.float64, seed=11)

    def f(x, w, b):
        return _quaternion_norm("t", x, per_sample, None, None, w, b, True, 0.1, 1e-5, False, act, slope)

    inputs = tuple(t.detach().requires_grad_() for t in (x, w, b))
    assert torch.autograd.gradcheck(f, inputs)


def test_fused_without_affine_and_non_contiguous_input(qrand) -> None:
    x, _, _, rm, rv = _inputs(qrand, (3, 8, 6, 5), torch.float64, affine=False, seed=3)
    x = x.transpose(2, 3)  # neither NCHW nor channels_last: made contiguous on the way in
    fused = _run(True, x, None, None, rm, rv, True, True, "relu", 0.01)
    ref = _run(False, x, None, None, rm, rv, True, True, "relu", 0.01)
    torch.testing.assert_close(fused[0], ref[0])
    torch.testing.assert_close(fused[1][0], ref[1][0])


def test_modules_take_an_activation_and_serve_it_fused(qrand, monkeypatch) -> None:
    calls = []
    real = torch.ops.aqcf.qnorm

    def spy(*args):
        calls.append(args[8])
        return real(*args)

    bn = QuaternionBatchNorm2d(8, activation="leaky_relu", negative_slope=0.1)
    x = qrand(2, 8, 4, 4, dtype=torch.float32, seed=21)
    ref = torch.nn.functional.leaky_relu(QuaternionBatchNorm2d(8)(x), 0.1)
    monkeypatch.setattr(torch.ops.aqcf, "qnorm", spy)
    torch.testing.assert_close(bn(x), ref)
    assert calls == ["leaky_relu"]
    assert "activation='leaky_relu', negative_slope=0.1" in repr(bn)
    inorm = QuaternionInstanceNorm3d(8, activation="gelu", affine=True)
    x3 = qrand(2, 8, 3, 4, 2, dtype=torch.float32, seed=22)
    torch.testing.assert_close(inorm(x3), torch.nn.functional.gelu(QuaternionInstanceNorm3d(8, affine=True)(x3)))
    with pytest.raises(ValueError, match="activation must be None or one of"):
        QuaternionBatchNorm2d(8, activation="tanh")


# ---- the ops as the extension defines them (csrc/cpu/norm_op.cpp): resolved in Python once, then native

native = pytest.mark.skipif(not norm_ops.NATIVE, reason="the extension does not define the norm ops")


def test_the_norm_schemas_are_those_python_infers() -> None:
    for name in ("qnorm", "qnorm_backward"):
        registered = str(getattr(torch.ops.aqcf, name).default._schema)
        assert registered == f"aqcf::{name}{torch.library.infer_schema(getattr(norm_ops, name), mutates_args=())}"


@pytest.fixture
def norm_asked(counting_fallbacks):
    """The extension's CPU norm kernels ask counting wrappers of the Python functions; nothing remembered."""
    names = ("qnorm", "qnorm_backward")
    with counting_fallbacks(_C._set_norm_fallbacks, norm_ops, names, norm_ops.composite_backward) as asked:
        yield asked


@native
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize(("per_sample", "training"), [(False, True), (True, True), (False, False)],
                         ids=["batch", "instance", "eval"])  # fmt: skip
@pytest.mark.parametrize("act,slope", [("relu", 0.01), ("gelu", 0.01), (None, 0.01)])
def test_a_signature_is_served_natively_after_python_with_identical_results(
    norm_asked, qrand, affine, per_sample, training, act, slope
) -> None:
    """The first call of a signature runs the Python implementation, which remembers it; later calls (forward
    and backward) never ask Python and give the same results, bit for bit, the weight's and the bias's
    gradients included whichever of them are given (autograd numbers only the tensors given)."""
    x, w, b, rm, rv = _inputs(qrand, SHAPES["2d"], torch.float64, affine=affine, seed=5)
    gy = qrand(*SHAPES["2d"], seed=9)

    def step(python_backward=False):
        leaves = [x.detach().requires_grad_()] + [t.detach().requires_grad_() for t in (w, b) if t is not None]
        weight, bias = (leaves[1], leaves[2]) if affine else (None, None)
        stats = (None, None) if training else (rm, rv)
        y, mean, var = torch.ops.aqcf.qnorm(leaves[0], weight, bias, *stats, training, per_sample, 1e-5, act, slope)
        if python_backward:
            forget_choices()
        return [y.detach(), mean, var, *torch.autograd.grad(y, leaves, gy)]

    first = step(python_backward=True)
    assert norm_asked == {"qnorm": 1, "qnorm_backward": 1} and _C._remembered_norm_choices() == 1
    again = step()
    assert norm_asked == {"qnorm": 1, "qnorm_backward": 1}
    for i, (g, e) in enumerate(zip(again, first, strict=True)):
        assert g.stride() == e.stride() and torch.equal(g, e), i


@native
def test_a_forced_backend_has_norm_choices_of_its_own(norm_asked, qrand) -> None:
    x, w, b, _, _ = _inputs(qrand, SHAPES["1d"], torch.float32, seed=6)

    def norm() -> None:
        torch.ops.aqcf.qnorm(x, w, b, None, None, True, False, 1e-5, None, 0.01)

    for _ in range(2):
        norm()
    assert norm_asked["qnorm"] == 1 and _C._remembered_norm_choices() == 1
    with backends.use("torch"):
        norm()  # not served by the choice made without forcing
    assert norm_asked["qnorm"] == 2
    norm()  # which still serves after the block
    assert norm_asked["qnorm"] == 2


@native
def test_the_norm_backward_op_has_no_derivative(qrand) -> None:
    """As the Python custom op: a gradient through the op itself is not differentiable (the module's path
    differentiates the composite reference for create_graph, tests/nn/test_norm.py's gradgradcheck)."""
    x, w, b, _, _ = _inputs(qrand, SHAPES["1d"], torch.float64, seed=7)
    args = [qrand(*SHAPES["1d"], seed=8), x, w, b, *torch.ops.aqcf.qnorm(x, w, b, None, None, True, False, 1e-5,
                                                                         None, 0.01)[1:]]  # fmt: skip
    grads = torch.ops.aqcf.qnorm_backward(args[0].requires_grad_(), *args[1:], True, False, 1e-5, None, 0.01,
                                          [True, True, True])  # fmt: skip
    with pytest.raises(RuntimeError, match="qnorm_backward"):
        grads[0].sum().backward()


@pytest.mark.parametrize("native_op", [True, False], ids=["extension", "python"])
def test_the_backward_makes_no_zero_gradients_for_the_statistics(qrand, native_op, monkeypatch) -> None:
    """mean and var are outputs without a gradient: autograd passes the backward None for them, and no
    tensor of zeros is made (on a GPU each would be a kernel launch per norm and step, two per norm)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    if native_op and not norm_ops.NATIVE:
        pytest.skip("the compiled extension is not built")
    x, w, b, _, _ = _inputs(qrand, SHAPES["2d"], torch.float64, seed=9)
    x, w, b = (t.detach().requires_grad_() for t in (x, w, b))
    if native_op:
        y = torch.ops.aqcf.qnorm(x, w, b, None, None, True, False, 1e-5, "relu", 0.01)[0]
    else:  # the Python op's autograd formula, as registered without the extension
        seen = {}
        real = norm_ops._backward

        def spy(ctx, grad_y, grad_mean, grad_var):
            seen["grads"] = (grad_mean, grad_var)
            return real(ctx, grad_y, grad_mean, grad_var)

        monkeypatch.setattr(norm_ops, "_backward", spy)
        y = _PythonQNorm.apply(x, w, b, None, None, True, False, 1e-5, "relu", 0.01)[0]

    class Factories(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.made = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in ("zeros", "zeros_like", "zero_", "fill_", "new_zeros"):
                self.made.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    with Factories() as factories:
        y.backward(qrand(*y.shape, seed=10))
    assert factories.made == [], factories.made
    assert x.grad is not None and w.grad is not None and b.grad is not None
    if not native_op:
        assert seen["grads"] == (None, None)


class _PythonQNorm(torch.autograd.Function):
    """``aqcf::qnorm`` with the Python op's autograd formula (what ``define_ops`` registers without the extension)."""

    @staticmethod
    def forward(*args):
        return tuple(torch.ops.aqcf.qnorm(*args))

    @staticmethod
    def setup_context(ctx, inputs, output):
        norm_ops._setup_context(ctx, inputs, output)

    @staticmethod
    def backward(ctx, *grads):
        return norm_ops._backward(ctx, *grads)


@pytest.mark.parametrize("groups", [1, 3], ids=["batch", "instance"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_the_native_running_update_is_the_python_one(groups, dtype) -> None:
    """``_C._update_running_stats`` (what the fused path's eager calls run) against the Python update (what the
    composite path and compiled graphs run): batch norm's one set of statistics, instance norm's per-sample ones
    averaged, a half-precision module's buffers with float32 statistics, statistics carrying a graph."""
    cq, count, momentum = 5, 37, 0.3
    g = torch.Generator().manual_seed(groups)
    stat_dtype = torch.promote_types(dtype, torch.float32)
    mean = (torch.randn(groups, 4, cq, 1, 1, generator=g, dtype=stat_dtype) * 3).requires_grad_()
    var = (torch.rand(groups, 1, cq, 1, 1, generator=g, dtype=stat_dtype) + 0.5).requires_grad_()
    rm = (torch.randn(4 * cq, generator=g, dtype=stat_dtype)).to(dtype)
    rv = (torch.rand(cq, generator=g, dtype=stat_dtype) + 0.5).to(dtype)
    want_m, want_v = rm.clone(), rv.clone()
    _update_running(want_m, want_v, mean, var, count, momentum, cq, False)
    _C._update_running_stats(rm, rv, mean, var, count, momentum)
    torch.testing.assert_close(rm, want_m)
    torch.testing.assert_close(rv, want_v)
    assert rm.dtype == rv.dtype == dtype
    assert not (rm.requires_grad or rv.requires_grad) and rm.grad_fn is None and rv.grad_fn is None


def test_the_native_running_update_refuses_statistics_of_another_size() -> None:
    rm, rv = torch.zeros(8), torch.ones(2)
    with pytest.raises(RuntimeError, match="statistics of 12 and 3 values for running statistics of 8 and 2"):
        _C._update_running_stats(rm, rv, torch.zeros(1, 4, 3), torch.ones(1, 1, 3), 10, 0.1)
    with pytest.raises(RuntimeError, match="count must be > 1, got 1"):
        _C._update_running_stats(rm, rv, torch.zeros(1, 4, 2), torch.ones(1, 1, 2), 1, 0.1)
    assert rm.eq(0).all() and rv.eq(1).all()
