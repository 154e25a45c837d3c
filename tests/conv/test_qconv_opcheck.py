"""The ops' registration: ``torch.library.opcheck`` (schema, fake impl, autograd, AOT dispatch) and
``torch.compile(fullgraph=True)`` of the public functions, forward and backward, against eager."""

from __future__ import annotations

import pytest
import torch

import aqcf_kernels  # noqa: F401  (registers torch.ops.aqcf)
from aqcf_kernels import functional as qF
from aqcf_kernels.ops import conv as conv_ops
from aqcf_kernels.params import ConvParams, conv_output_shape

# Tiny convs only: one intra-op thread runs them faster (see tests/conv/conftest.py).
pytestmark = pytest.mark.usefixtures("single_threaded")


def _conv_args(name: str, qrand):
    """Positional arguments of ``aqcf::qconv`` for a few argument sets (requires_grad: autograd is checked)."""
    if name == "2d conv":
        x = qrand(2, 8, 5, 4, seed=20, requires_grad=True)
        w = qrand(4, 2, 2, 3, 3, dim=0, seed=21, requires_grad=True)
        b = qrand(8, dim=0, seed=22, requires_grad=True)
        return (x, w, b, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, "hamilton")
    if name == "3d transposed, groups=2":
        x = qrand(1, 8, 3, 2, 3, seed=23, requires_grad=True)
        w = qrand(4, 2, 1, 2, 2, 1, dim=0, seed=24, requires_grad=True)  # (4, Cq_in, Cq_out/G, *k)
        b = qrand(8, dim=0, seed=25, requires_grad=True)
        return (x, w, b, [2, 1, 2], [0, 1, 0], [1, 1, 1], True, [1, 0, 0], 2, "fast8")
    assert name == "1d conv, no bias"
    x = qrand(2, 12, 7, seed=26, requires_grad=True)
    w = qrand(4, 2, 3, 3, dim=0, seed=27, requires_grad=True)
    return (x, w, None, [2], [1], [2], False, [0], 1, "fast8")


def _skip_unless_served(backend, op_args, served):
    x, w, _, stride, padding, dilation, transposed, output_padding, groups, algorithm = op_args
    kwargs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    if transposed:
        kwargs.update(transposed=True, output_padding=output_padding)
    served(backend, x, w, algorithm, **kwargs)


ARG_SETS = ["2d conv", "3d transposed, groups=2", "1d conv, no bias"]


@pytest.mark.parametrize("args", ARG_SETS)
def test_opcheck_qconv(backend, args, qrand, served):
    op_args = _conv_args(args, qrand)
    _skip_unless_served(backend, op_args, served)
    torch.library.opcheck(torch.ops.aqcf.qconv.default, op_args)


@pytest.mark.parametrize("args", ARG_SETS)
def test_opcheck_qconv_weight_grad(backend, args, qrand, served):
    op_args = _conv_args(args, qrand)
    _skip_unless_served(backend, op_args, served)
    x, w, _, *conv_params = op_args
    p = ConvParams.from_op_args(w.dim() - 3, *conv_params[:-1])
    grad_output = qrand(*conv_output_shape(x.shape, w.shape, p), seed=28, requires_grad=True)
    torch.library.opcheck(torch.ops.aqcf.qconv_weight_grad.default, (x, grad_output, list(w.shape), *conv_params))


def test_torch_compile_fullgraph_matches_eager(monkeypatch, qrand):
    # Default backend selection (what users get); both algorithms, a conv and a transposed conv.
    monkeypatch.delenv("AQCF_BACKEND", raising=False)

    def f(x, w1, b1, w2):
        h = torch.tanh(qF.quaternion_conv2d(x, w1, b1, padding=1, algorithm="hamilton"))
        return qF.quaternion_conv_transpose2d(h, w2, stride=2, output_padding=1, groups=2, algorithm="fast8")

    def leaves():
        return (
            qrand(2, 8, 5, 3, seed=30, dtype=torch.float32, requires_grad=True),
            qrand(4, 4, 2, 3, 3, dim=0, seed=31, dtype=torch.float32, requires_grad=True),
            qrand(16, dim=0, seed=32, dtype=torch.float32, requires_grad=True),
            qrand(4, 4, 1, 3, 2, dim=0, seed=33, dtype=torch.float32, requires_grad=True),
        )

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    eager_in, compiled_in = leaves(), leaves()
    y_eager, y_compiled = f(*eager_in), compiled(*compiled_in)
    torch.testing.assert_close(y_compiled, y_eager)
    g = qrand(*y_eager.shape, seed=34, dtype=torch.float32)
    y_eager.backward(g)
    y_compiled.backward(g)
    for name, a, b in zip(("input", "weight1", "bias1", "weight2"), compiled_in, eager_in, strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=lambda m, name=name: f"{name} gradient: {m}")


# --------------------------------------------------------------------------------------------
# aqcf::activation_grad_bias: dL/dz of a fused activation and the bias gradient from one pass
# --------------------------------------------------------------------------------------------

# (activation, negative_slope): a negative slope, like GELU, makes the gate the pre-activation
GATES = [("relu", 0.01), ("leaky_relu", 0.2), ("leaky_relu", -0.3), ("gelu", 0.01)]
# (shape, memory format of y / z)
GATE_LAYOUTS = [
    ((2, 12, 7), torch.contiguous_format),
    ((3, 8, 5, 4), torch.contiguous_format),
    ((3, 8, 5, 4), torch.channels_last),
    ((2, 4, 3, 2, 5), torch.channels_last_3d),
]


def _gate_inputs(shape, memory_format, activation, slope, qrand, dtype=torch.float64):
    z = qrand(*shape, seed=40, dtype=dtype).contiguous(memory_format=memory_format)
    F = torch.nn.functional
    y = F.gelu(z) if activation == "gelu" else F.leaky_relu(z, slope if activation == "leaky_relu" else 0.0)
    keep = conv_ops.stores_preactivation(activation, slope)
    grad = qrand(*shape, seed=41, dtype=dtype)  # contiguous: another layout than y's where y is channels_last
    return grad, y, (z if keep else z.new_empty(0))


@pytest.mark.parametrize("activation,slope", GATES)
@pytest.mark.parametrize("shape,memory_format", GATE_LAYOUTS)
def test_activation_grad_bias_is_the_activation_backward_and_its_channel_sums(
    shape, memory_format, activation, slope, qrand
):
    from aqcf_kernels.ops.conv import activation_gate, activation_grad

    grad, y, pre = _gate_inputs(shape, memory_format, activation, slope, qrand)
    gz, gb = torch.ops.aqcf.activation_grad_bias(grad, y, pre, activation, slope)
    want = activation_grad(grad, y, pre, activation, slope)
    torch.testing.assert_close(gz, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gb, want.sum(dim=[0, *range(2, want.dim())]), rtol=1e-12, atol=1e-12)
    assert gz.stride() == activation_gate(y, pre, activation, slope).stride()  # the layout the fake promises
    assert gz.abs().sum() > 0 and gb.abs().sum() > 0


@pytest.mark.parametrize("activation,slope", GATES)
def test_opcheck_activation_grad_bias(activation, slope, qrand):
    for shape, memory_format in GATE_LAYOUTS[1:3]:
        args = (*_gate_inputs(shape, memory_format, activation, slope, qrand), activation, slope)
        # no autograd formula: the backward calls it only when the gradient need not be differentiable
        tests = ("test_schema", "test_faketensor", "test_aot_dispatch_static", "test_aot_dispatch_dynamic")
        torch.library.opcheck(torch.ops.aqcf.activation_grad_bias.default, args, test_utils=tests)


def _calls_of(fn, *names: str) -> list[int]:
    """How many times ``fn`` called each op ``aqcf::<name>`` (profiler)."""
    with torch.autograd.profiler.profile() as prof:
        fn()
    return [sum(e.name == f"aqcf::{name}" for e in prof.function_events) for name in names]


def _assert_grads_within_fp32_contract(compiled_in, eager_in, names=("input", "weight", "bias")) -> None:
    # eager may measure its way to another backend than compile's heuristic: the fp32 contract (1e-5)
    for name, a, b in zip(names, compiled_in, eager_in, strict=True):
        err = ((a.grad - b.grad).norm() / b.grad.norm()).item()
        assert err <= 1e-5, f"{name} gradient: relative error {err:.2e}"


@pytest.mark.parametrize("activation,slope", [("relu", 0.01), ("gelu", 0.01)])
def test_the_backward_takes_the_bias_gradient_from_the_activation_pass(activation, slope, qrand):
    """One activation_grad_bias call in a plain backward with a bias; none where the gradient must be
    differentiable (create_graph) or without a bias; the gradients equal the two-pass ones either way."""
    x = qrand(2, 8, 5, 4, seed=42, requires_grad=True)
    w = qrand(4, 3, 2, 3, 3, dim=0, seed=43, requires_grad=True)
    b = qrand(12, dim=0, seed=44, requires_grad=True)
    g = qrand(2, 12, 5, 4, seed=45)

    def grads(bias, create_graph):
        y = qF.quaternion_conv2d(x, w, bias, padding=1, activation=activation, negative_slope=slope)
        leaves = (x, w) if bias is None else (x, w, bias)
        return torch.autograd.grad(y, leaves, g, create_graph=create_graph)

    assert _calls_of(lambda: grads(b, False), "activation_grad_bias") == [1]
    assert _calls_of(lambda: grads(b, True), "activation_grad_bias") == [0]
    assert _calls_of(lambda: grads(None, False), "activation_grad_bias") == [0]
    for one_pass, differentiable in zip(grads(b, False), grads(b, True), strict=True):
        torch.testing.assert_close(one_pass, differentiable.detach(), rtol=1e-12, atol=1e-12)


def test_torch_compile_conv_bias_activation_backward_matches_eager(monkeypatch, qrand):
    monkeypatch.delenv("AQCF_BACKEND", raising=False)

    def f(x, w, b):
        return qF.quaternion_conv2d(x, w, b, padding=1, activation="gelu", algorithm="hamilton")

    def leaves():
        return (
            qrand(2, 8, 5, 3, seed=46, dtype=torch.float32, requires_grad=True),
            qrand(4, 4, 2, 3, 3, dim=0, seed=47, dtype=torch.float32, requires_grad=True),
            qrand(16, dim=0, seed=48, dtype=torch.float32, requires_grad=True),
        )

    torch._dynamo.reset()
    eager_in, compiled_in = leaves(), leaves()
    y_eager, y_compiled = f(*eager_in), torch.compile(f, fullgraph=True)(*compiled_in)
    torch.testing.assert_close(y_compiled, y_eager)
    g = qrand(*y_eager.shape, seed=49, dtype=torch.float32)
    y_eager.backward(g)
    y_compiled.backward(g)
    _assert_grads_within_fp32_contract(compiled_in, eager_in)


@pytest.mark.parametrize("outputs_used", ["y", "pre", "both"])
def test_gradients_of_whichever_outputs_reach_the_loss(outputs_used, qrand):
    """qconv's outputs (y, z) get no materialised zero gradient: the loss reaching y, z or both gives the
    reference's gradients (GELU keeps z)."""
    from aqcf_kernels import reference

    x = qrand(2, 8, 5, seed=50, requires_grad=True)
    w = qrand(4, 3, 2, 3, dim=0, seed=51, requires_grad=True)
    b = qrand(12, dim=0, seed=52, requires_grad=True)
    gy, gz = qrand(2, 12, 5, seed=53), qrand(2, 12, 5, seed=54)
    y, z = torch.ops.aqcf.qconv(x, w, b, [1], [1], [1], False, [0], 1, "hamilton", "gelu", 0.01)
    z_ref = reference.quaternion_conv_expanded(x, w, b, padding=1)
    y_ref = torch.nn.functional.gelu(z_ref)
    pick = {"y": ([y], [y_ref], [gy]), "pre": ([z], [z_ref], [gz]), "both": ([y, z], [y_ref, z_ref], [gy, gz])}
    outs, refs, grads = pick[outputs_used]
    got = torch.autograd.grad(outs, (x, w, b), grads)
    want = torch.autograd.grad(refs, (x, w, b), grads)
    for name, a, e in zip(("input", "weight", "bias"), got, want, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}")


# --------------------------------------------------------------------------------------------
# aqcf::qconv_weight_bias_grad: the weight and bias gradients, from one launch where a backend can
# --------------------------------------------------------------------------------------------


def _weight_bias_grad_args(backend, name, qrand, served):
    """``(reference gradients (weight, bias), op arguments)`` of one argument set, the gradient a fresh one."""
    from aqcf_kernels import reference

    op_args = _conv_args(name, qrand)
    _skip_unless_served(backend, op_args, served)
    x, w, _, stride, padding, dilation, transposed, output_padding, groups, algorithm = op_args
    b = qrand(w.shape[2 if transposed else 1] * 4 * (groups if transposed else 1), dim=0, seed=29)
    w_ref, b_ref = w.detach().requires_grad_(), b.requires_grad_()
    kwargs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    y = reference.quaternion_conv_expanded(
        x.detach(), w_ref, b_ref, transposed=transposed, output_padding=output_padding, **kwargs
    )
    grad_output = qrand(*y.shape, seed=28)
    want = torch.autograd.grad(y, (w_ref, b_ref), grad_output)
    return want, (x.detach(), grad_output, list(w.shape), *op_args[3:])


@pytest.mark.parametrize("args", ARG_SETS)
def test_qconv_weight_bias_grad_is_the_weight_gradient_and_the_channel_sums(backend, args, qrand, served):
    (want_w, want_b), op_args = _weight_bias_grad_args(backend, args, qrand, served)
    gw, gb = torch.ops.aqcf.qconv_weight_bias_grad(*op_args)
    torch.testing.assert_close(gw, want_w, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gb, want_b, rtol=1e-10, atol=1e-10)
    assert gw.is_contiguous() and gb.abs().sum() > 0


@pytest.mark.parametrize("args", ARG_SETS[:2])
def test_opcheck_qconv_weight_bias_grad(backend, args, qrand, served):
    _, op_args = _weight_bias_grad_args(backend, args, qrand, served)
    # no autograd formula: the backward calls it only when the gradient need not be differentiable
    tests = ("test_schema", "test_faketensor", "test_aot_dispatch_static", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.aqcf.qconv_weight_bias_grad.default, op_args, test_utils=tests)


def test_the_backward_takes_the_bias_gradient_from_the_weight_gradient_call(qrand):
    """One qconv_weight_bias_grad call (and no qconv_weight_grad) in a plain backward with a bias and a weight
    gradient; none where the gradient must be differentiable (create_graph), without a bias, with a frozen
    weight, or where the activation's pass gave the bias gradient; the gradients equal either way."""
    x = qrand(2, 8, 5, 4, seed=55, requires_grad=True)
    w = qrand(4, 3, 2, 3, 3, dim=0, seed=56, requires_grad=True)
    b = qrand(12, dim=0, seed=57, requires_grad=True)
    g = qrand(2, 12, 5, 4, seed=58)

    def grads(leaves, bias=b, create_graph=False, activation=None):
        weight = w if any(t is w for t in leaves) else w.detach()  # Python autograd: needs_input_grad = requires_grad
        y = qF.quaternion_conv2d(x, weight, bias, padding=1, activation=activation)
        return torch.autograd.grad(y, leaves, g, create_graph=create_graph)

    def calls(*args, **kwargs):
        return _calls_of(lambda: grads(*args, **kwargs), "qconv_weight_bias_grad", "qconv_weight_grad")

    assert calls((x, w, b)) == [1, 0]
    assert calls((w, b)) == [1, 0]
    assert calls((x, w, b), create_graph=True) == [0, 1]
    assert calls((x, w), bias=None) == [0, 1]
    assert calls((x, b)) == [0, 0]
    assert calls((x, w, b), activation="relu") == [0, 1]  # activation_grad_bias gave it
    for one_call, differentiable in zip(grads((x, w, b)), grads((x, w, b), create_graph=True), strict=True):
        torch.testing.assert_close(one_call, differentiable.detach(), rtol=1e-12, atol=1e-12)


def test_torch_compile_conv_bias_backward_calls_the_weight_bias_grad(monkeypatch, qrand):
    """The compiled backward of a conv with a bias calls qconv_weight_bias_grad too (its fake serves the trace),
    with the gradients of eager."""
    monkeypatch.delenv("AQCF_BACKEND", raising=False)

    def f(x, w, b):
        return qF.quaternion_conv_transpose2d(x, w, b, stride=2, padding=1, algorithm="hamilton")

    def leaves():
        return (
            qrand(2, 8, 5, 3, seed=59, dtype=torch.float32, requires_grad=True),
            qrand(4, 2, 3, 3, 3, dim=0, seed=60, dtype=torch.float32, requires_grad=True),
            qrand(12, dim=0, seed=61, dtype=torch.float32, requires_grad=True),
        )

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    eager_in, compiled_in = leaves(), leaves()
    y_eager = f(*eager_in)
    g = qrand(*y_eager.shape, seed=62, dtype=torch.float32)
    y_eager.backward(g)
    compiled(*leaves()).backward(g)  # compiles the backward (lazily, on its first call) outside the count
    y_compiled = compiled(*compiled_in)
    assert _calls_of(lambda: y_compiled.backward(g), "qconv_weight_bias_grad") == [1]
    _assert_grads_within_fp32_contract(compiled_in, eager_in)
