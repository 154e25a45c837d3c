"""The quaternion convolution op family: ``torch.ops.aqcf.qconv``, ``aqcf.qconv_weight_grad`` and the backward's
no-derivative helpers ``aqcf.qconv_weight_bias_grad`` and ``aqcf.activation_grad_bias``.

``qconv`` is the conv of any rank, plain or transposed, with an optional activation applied to every
real output channel; it returns ``(y, pre)``, where ``pre`` is the pre-activation when the backward
needs it (see :func:`stores_preactivation`) and an empty tensor otherwise (always, without an
activation). A backend that declares ``fuses_activation`` applies it in the conv's epilogue; for
the others the op applies it after the conv.

The backend, and for ``algorithm='auto'`` the algorithm, are resolved inside the op per call
(:func:`aqcf_kernels.backends.resolve_conv`) and never change the schema. Backward is expressed
with the same two ops, so double backward, ``torch.compile`` and ``opcheck`` work:

* input gradient of a conv = the transposed conv of ``grad_output`` with the same weight
  (and vice versa) — a quaternion transposed conv is defined as the adjoint;
* weight gradient = ``qconv_weight_grad(input, grad_output)``;
* bias gradient = ``grad_output`` summed over all dims but the channels; where the gradient need not be
  differentiable it comes with the weight gradient's, from ``qconv_weight_bias_grad`` (one launch on CUDA),
  or, after a fused activation, with dL/dz from ``activation_grad_bias`` (one pass on CUDA);
* double backward of ``qconv_weight_grad`` (bilinear in input and grad_output) is again a
  conv and an input gradient, with the incoming gradient as weight.

Autograd saves the caller's algorithm (``'auto'`` stays ``'auto'``), and ``qconv``'s ``kind``
argument says which of the three computations a call is, so each is resolved on its own.
Arguments reaching these ops are already checked (``aqcf_kernels.params``).

Where the compiled extension is built (:data:`NATIVE`), it defines both ops: schema, CPU and CUDA kernels
and autograd in C++ (csrc/cpu/op.cpp; the Python path cost ~0.2 ms a call, several times a small conv).
Its kernels ask the Python implementation here the first time they meet a call signature, and serve that
signature themselves afterwards when the answer was the extension's own code (:func:`_remember`: the
``cpp`` backend's CPU engine, or the ``cuda`` backend's ATen path, cuDNN on CUDA). Python keeps the fake
implementations and the kernels of other devices. Without the extension
these functions define the ops, with the same schemas, and the autograd formulas below.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from torch._prims_common import make_channels_last_strides_for, make_contiguous_strides_for, suggest_memory_format

from .. import backends
from ..backends._extension import _C, NATIVE_DEVICES, define_ops
from ..backends.base import activate, bias_grad
from ..params import ConvParams, conv_output_shape
from .autocast import cast_for_transforms
from .func import functorch_active, transforms_active
from .lowerings import exporting_to_onnx, qconv_lowering

#: Whether the compiled extension defines ``aqcf::qconv`` and ``aqcf::qconv_weight_grad`` (csrc/cpu/op.cpp).
NATIVE = _C is not None and hasattr(_C, "_set_fallbacks")

ACTIVATIONS = ("relu", "leaky_relu", "gelu")


class QConvArgs(NamedTuple):
    """The arguments of one ``aqcf::qconv`` call, the geometry resolved to :class:`ConvParams`."""

    input: Tensor
    weight: Tensor
    bias: Tensor | None
    params: ConvParams
    algorithm: str
    activation: str | None
    negative_slope: float
    kind: str


def qconv_args(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    transposed: bool,
    output_padding: Sequence[int],
    groups: int,
    algorithm: str,
    activation: str | None = None,
    negative_slope: float = 0.01,
    kind: str = "forward",
) -> QConvArgs:
    """``qconv``'s arguments as its impl, fake and autograd receive them (the fake gets them as the
    caller passed them: trailing defaults may be missing, or come as keywords)."""
    p = ConvParams.from_op_args(weight.dim() - 3, stride, padding, dilation, transposed, output_padding, groups)
    return QConvArgs(input, weight, bias, p, algorithm, activation, negative_slope, kind)


# --------------------------------------------------------------------------------------------
# Activations
# --------------------------------------------------------------------------------------------


def stores_preactivation(activation: str | None, negative_slope: float) -> bool:
    """Whether the backward needs the pre-activation ``z``: ReLU and LeakyReLU (slope ≥ 0) read the
    sign of z off the output (``y > 0 ⇔ z > 0``), so only GELU and a negative slope keep z."""
    return activation == "gelu" or (activation == "leaky_relu" and negative_slope < 0)


def activation_grad(
    grad: Tensor, y: Tensor, pre: Tensor, activation: str, negative_slope: float, out: Tensor | None = None
) -> Tensor:
    """``dL/dz`` from ``dL/dy``; differentiable (double backward goes through it) unless written into ``out``
    (aten's out= variant, in ``out``'s layout).

    Each is aten's own backward of that activation, one element-wise kernel that reads ``dL/dy`` and the gate
    (what torch.nn's ReLU, LeakyReLU and GELU run), where the formula written out in torch ops took 3 passes
    (ReLU: a mask, a product, a select) to 8 (GELU), each writing a full-size temporary."""
    gate = activation_gate(y, pre, activation, negative_slope)
    if activation == "gelu":
        op, args = torch.ops.aten.gelu_backward, (grad, gate)
    elif activation == "relu":
        op, args = torch.ops.aten.threshold_backward, (grad, gate, 0.0)
    else:  # leaky_relu: its gate is y (y's sign is z's) unless the slope is negative
        op, args = torch.ops.aten.leaky_relu_backward, (grad, gate, negative_slope, gate is y)
    return op(*args) if out is None else op.grad_input(*args, grad_input=out)


def activation_gate(y: Tensor, pre: Tensor, activation: str, negative_slope: float) -> Tensor:
    """The tensor an activation's derivative reads: ``y`` where its sign is z's, else the pre-activation."""
    return pre if stores_preactivation(activation, negative_slope) else y


def activation_grad_bias(
    grad: Tensor, y: Tensor, pre: Tensor, activation: str, negative_slope: float
) -> tuple[Tensor, Tensor]:
    """``aqcf::activation_grad_bias``: ``(dL/dz, bias gradient)`` of a conv with a fused activation.

    ``dL/dz`` as :func:`activation_grad` (in the gate's layout), and its sum over every dim but the
    channels. On CUDA one Triton pass (:mod:`..backends.triton.activation_grad`) writes dL/dz and sums it
    from registers; elsewhere aten's activation backward then a sum (on CPU the compiled extension's
    kernel, csrc/cpu/op.cpp). It has no derivative: the backward calls it only when the gradient need
    not be differentiable.
    """
    gate = activation_gate(y, pre, activation, negative_slope)
    if _triton_activation_serves(grad, gate):
        from ..backends.triton import activation_grad as triton_activation

        return triton_activation.activation_grad_bias(grad, gate, activation, negative_slope)
    # written straight into the gate's layout (what the fake says), whatever grad's layout
    grad_z = activation_grad(grad, y, pre, activation, negative_slope, out=torch.empty_like(gate))
    return grad_z, bias_grad(grad_z)


def _triton_activation_serves(grad: Tensor, gate: Tensor) -> bool:
    """Whether the Triton pass takes this call: CUDA tensors whenever triton imports (CPU ones under the
    interpreter with the ``triton`` backend forced), in a dtype, size and layout it serves."""
    from ..backends.triton import common

    if not common.serves_fused(grad):
        return False
    from ..backends.triton import activation_grad as triton_activation

    return triton_activation.cannot_serve(grad, gate) is None


def _activation_grad_bias_fake(grad, y, pre, activation, negative_slope):
    gate = activation_gate(y, pre, activation, negative_slope)
    return torch.empty_like(gate), grad.new_empty(grad.shape[1])


def _bias_from_activation_pass(ctx, pre_reached_loss: bool) -> bool:
    """Whether the backward takes the bias gradient from the activation's pass (``activation_grad_bias``):
    not when the gradient must be differentiable (that op has no derivative), nor when z itself
    reached the loss (its gradient adds to dL/dz)."""
    wants_bias = ctx.has_bias and ctx.needs_input_grad[2]
    return wants_bias and not differentiable_backward() and not pre_reached_loss


def differentiable_backward() -> bool:
    """Whether a backward must give differentiable gradients: under ``create_graph=True``, and under a
    torch.func transform (whose ops on the gradients a transform may trace: a batched backward under
    ``vmap``, ``jacfwd`` of ``jacrev``)."""
    return torch.is_grad_enabled() or transforms_active()


# --------------------------------------------------------------------------------------------
# aqcf::qconv
# --------------------------------------------------------------------------------------------


def _output_strides(input: Tensor, shape) -> tuple[int, ...]:
    """The strides of :func:`_empty_output`, computed without allocating anything.

    Cached by the input's shape and strides and the output's shape: torch's helpers (symbolic-shape
    aware) cost ~17 µs a call on CPU, the most of any step of a small conv's host time, and every call
    asks. Symbolic sizes (fake tensors under dynamic shapes) are not hashable and skip the cache.
    """
    try:
        key = (tuple(input.shape), input.stride(), tuple(shape))
        strides = _OUTPUT_STRIDES.get(key)
    except TypeError:
        return _output_strides_uncached(input, shape)
    if strides is None:
        if len(_OUTPUT_STRIDES) >= 4096:
            _OUTPUT_STRIDES.clear()
        strides = _OUTPUT_STRIDES[key] = _output_strides_uncached(input, shape)
    return strides


_OUTPUT_STRIDES: dict[tuple, tuple[int, ...]] = {}


def _output_strides_uncached(input: Tensor, shape) -> tuple[int, ...]:
    if suggest_memory_format(input) == torch.contiguous_format or len(shape) not in (4, 5):
        return tuple(make_contiguous_strides_for(shape))
    return tuple(make_channels_last_strides_for(shape))


def _in_output_format(input: Tensor, t: Tensor) -> Tensor:
    """``t``, or a copy of it with :func:`_empty_output`'s strides if it has others.

    The backend's own output is returned as it is when its layout is already the right one: an
    output tensor allocated up front and left unused cost a fresh multi-MiB allocation per call,
    whose first touch by the conv page-faults (measured ~1 ms per call on 2 MiB outputs).
    """
    if t.stride() == _output_strides(input, t.shape):
        return t
    return _empty_output(input, t.shape).copy_(t)


def _empty_output(input: Tensor, shape) -> Tensor:
    # Outputs follow the input's memory format (channels_last in, channels_last out), like torch.
    return torch.empty(shape, dtype=input.dtype, device=input.device, memory_format=suggest_memory_format(input))


def _no_preactivation(input: Tensor) -> Tensor:
    return input.new_empty(0)


def _remember(kind: str, algorithm: str, backend, chosen: str, input: Tensor, other: Tensor, weight_shape, p) -> None:
    """Let the extension serve later calls with this signature without asking Python again, when what
    served this one is the extension's own code (:meth:`~aqcf_kernels.backends.base.ConvBackend.native_engine`;
    not a test's stand-in for it) and the extension has a kernel for the device (CPU and CUDA), and what was on
    offer did not depend on the call's data (the signature does not hold it)."""
    if not NATIVE or input.device.type not in NATIVE_DEVICES:
        return
    if backends.registry.candidates_read_the_data(input, algorithm):
        return
    engine = backend.native_engine()
    if engine is not None:
        args = (kind, algorithm, input, other, list(weight_shape), *p.as_op_args(), chosen == "fast8", engine)
        _C._remember_conv_choice(*args)


def qconv(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    transposed: bool,
    output_padding: list[int],
    groups: int,
    algorithm: str,
    activation: str | None = None,
    negative_slope: float = 0.01,
    kind: str = "forward",
) -> tuple[Tensor, Tensor]:
    """Quaternion (transposed) convolution ``y = act(W ⊗ x + b)``: ``(y, pre)``, ``pre`` = ``W ⊗ x + b``
    where the backward needs it, else empty.

    ``activation``: None, 'relu', 'leaky_relu' (with ``negative_slope``) or 'gelu'. ``kind``: 'forward'
    for a user's call; autograd passes 'input_grad' for the adjoint conv that is an input gradient.
    """
    call = qconv_args(
        input, weight, bias, stride, padding, dilation, transposed, output_padding, groups, algorithm,
        activation, negative_slope, kind,
    )  # fmt: skip
    return _qconv(call)


def _qconv(call: QConvArgs) -> tuple[Tensor, Tensor]:
    input, weight, bias, p = call.input, call.weight, call.bias, call.params
    activation, slope = call.activation, call.negative_slope
    keep = stores_preactivation(activation, slope)
    shape = conv_output_shape(input.shape, weight.shape, p)
    empty = input.numel() == 0 or math.prod(shape) == 0

    def run(backend: backends.ConvBackend, algorithm: str) -> Tensor:
        # In the caller's memory format: a backend that computes in another (cpp_cl) is timed with
        # its conversion back, which the caller pays too.
        return _in_output_format(input, backend.conv(input, weight, bias, p, algorithm))

    # Resolved even for empty inputs: a forced backend that cannot serve is an error either way. A
    # first call of a signature under 'auto' may be measured: then `measured` is its conv output.
    backend, algorithm, measured, final = backends.resolve_conv(
        input, weight, p, call.algorithm, call.kind, run=None if empty else run
    )
    if empty:
        out = _empty_output(input, shape)
        z = out.zero_() if bias is None else out.copy_(bias.view(1, -1, *[1] * p.spatial_dims).expand_as(out))
    elif activation is not None and backend.fuses_activation:
        y, z = backend.conv_act(input, weight, bias, p, algorithm, activation, slope, keep)
        if final:
            _remember(call.kind, call.algorithm, backend, algorithm, input, weight, weight.shape, p)
        y = _in_output_format(input, y)  # the output's memory format, as the fake's
        return y, (_in_output_format(input, z) if keep else _no_preactivation(input))
    else:
        z = measured if measured is not None else run(backend, algorithm)
        if final:
            _remember(call.kind, call.algorithm, backend, algorithm, input, weight, weight.shape, p)
    if activation is None:
        return z, _no_preactivation(input)
    return activate(z, activation, slope), (z if keep else _no_preactivation(input))


def _qconv_fake(*args, **kwargs):
    call = qconv_args(*args, **kwargs)
    y = _empty_output(call.input, conv_output_shape(call.input.shape, call.weight.shape, call.params))
    keep = stores_preactivation(call.activation, call.negative_slope)
    return y, (torch.empty_like(y) if keep else _no_preactivation(call.input))


def conv(input: Tensor, weight: Tensor, bias: Tensor | None, p: ConvParams, algorithm: str, kind: str) -> Tensor:
    """``y`` of ``aqcf::qconv`` without activation (as autograd calls it)."""
    return call_qconv(input, weight, bias, *p.as_op_args(), algorithm, None, 0.01, kind)[0]


def adjoint_params(grad_output_shape, weight_shape, input_shape, p: ConvParams) -> ConvParams:
    """The geometry of the conv of ``grad_output`` with the same weight that is the input gradient of
    ``qconv(input, weight)`` with geometry ``p``: a conv's adjoint is the transposed conv, and back."""
    n = p.spatial_dims
    if p.transposed:
        return ConvParams(n, p.stride, p.padding, p.dilation, False, (0,) * n, p.groups)
    # Choose output_padding so the transposed conv lands exactly on the input size (the rows a
    # strided conv never read get zero gradient).
    natural = conv_output_shape(
        grad_output_shape, weight_shape, ConvParams(n, p.stride, p.padding, p.dilation, True, (0,) * n, p.groups)
    )
    extra = tuple(int(i) - o for i, o in zip(input_shape[2:], natural[2:], strict=True))
    return ConvParams(n, p.stride, p.padding, p.dilation, True, extra, p.groups)


def input_grad(grad_output: Tensor, weight: Tensor, input_shape, p: ConvParams, algorithm: str) -> Tensor:
    """Gradient w.r.t. the input of ``qconv(input, weight)``: the adjoint conv of grad_output."""
    adjoint = adjoint_params(grad_output.shape, weight.shape, input_shape, p)
    return conv(grad_output, weight, None, adjoint, algorithm, kind="input_grad")


def weight_grad(input: Tensor, grad_output: Tensor, weight_shape, p: ConvParams, algorithm: str) -> Tensor:
    """Gradient w.r.t. the weight of ``qconv(input, weight)``."""
    return call_qconv_weight_grad(input, grad_output, list(weight_shape), *p.as_op_args(), algorithm)


def weight_bias_grad(
    input: Tensor, grad_output: Tensor, weight_shape, p: ConvParams, algorithm: str
) -> tuple[Tensor, Tensor]:
    """Gradients w.r.t. the weight and the bias of ``qconv(input, weight, bias)``, not differentiable."""
    op = torch.ops.aqcf.qconv_weight_bias_grad
    return op(input, grad_output, list(weight_shape), *p.as_op_args(), algorithm)


def _qconv_setup_context(ctx, inputs, output):
    call = qconv_args(*inputs)
    y, pre = output
    # The activation's backward reads y (and the pre-activation, where kept); a plain conv needs neither.
    ctx.save_for_backward(call.input, call.weight, *(() if call.activation is None else (y, pre)))
    ctx.params, ctx.algorithm, ctx.has_bias = call.params, call.algorithm, call.bias is not None
    ctx.activation, ctx.negative_slope = call.activation, call.negative_slope
    ctx.num_inputs = len(inputs)
    # An output the loss never reached gets None, not zeros: z mostly does not, and adding zeros to
    # dL/dz would cost a pass and keep the bias gradient out of the activation's pass.
    ctx.set_materialize_grads(False)


def _qconv_backward(ctx, grad_y, grad_pre):
    input, weight, *activation_saved = ctx.saved_tensors
    pre_reached_loss = grad_pre is not None and grad_pre.numel() > 0  # z itself (double backward)
    grad_z, grad_bias = grad_y, None
    if grad_y is not None and ctx.activation is not None:
        y, pre = activation_saved
        if _bias_from_activation_pass(ctx, pre_reached_loss):
            op = torch.ops.aqcf.activation_grad_bias
            grad_z, grad_bias = op(grad_y, y, pre, ctx.activation, ctx.negative_slope)
        else:
            grad_z = activation_grad(grad_y, y, pre, ctx.activation, ctx.negative_slope)
    if pre_reached_loss:
        grad_z = grad_pre if grad_z is None else grad_z + grad_pre
    if grad_z is None:  # neither output reached the loss
        return (None,) * ctx.num_inputs
    p, algorithm = ctx.params, ctx.algorithm
    grad_input = grad_weight = None
    if ctx.needs_input_grad[0]:
        grad_input = input_grad(grad_z, weight, input.shape, p, algorithm)
    wants_bias = grad_bias is None and ctx.has_bias and ctx.needs_input_grad[2]
    if ctx.needs_input_grad[1] and wants_bias and not differentiable_backward():
        # the bias gradient from the weight gradient's launch where the backend can (that op has no derivative)
        grad_weight, grad_bias = weight_bias_grad(input, grad_z, weight.shape, p, algorithm)
    else:
        if ctx.needs_input_grad[1]:
            grad_weight = weight_grad(input, grad_z, weight.shape, p, algorithm)
        if wants_bias:
            grad_bias = bias_grad(grad_z)
    return grad_input, grad_weight, grad_bias, *[None] * (ctx.num_inputs - 3)


# --------------------------------------------------------------------------------------------
# aqcf::qconv_weight_grad
# --------------------------------------------------------------------------------------------


def qconv_weight_grad(
    input: Tensor,
    grad_output: Tensor,
    weight_shape: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    transposed: bool,
    output_padding: list[int],
    groups: int,
    algorithm: str,
) -> Tensor:
    """Gradient of ``<grad_output, qconv(input, W)>`` with respect to W."""
    p = ConvParams.from_op_args(len(weight_shape) - 3, stride, padding, dilation, transposed, output_padding, groups)
    return _weight_grad(input, grad_output, weight_shape, p, algorithm, with_bias=False)[0]


def qconv_weight_bias_grad(
    input: Tensor,
    grad_output: Tensor,
    weight_shape: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    transposed: bool,
    output_padding: list[int],
    groups: int,
    algorithm: str,
) -> tuple[Tensor, Tensor]:
    """``aqcf::qconv_weight_bias_grad``: ``(qconv_weight_grad(...), bias gradient)``, the bias gradient being
    ``grad_output`` summed over every dim but the channels.

    The backend is resolved as for ``qconv_weight_grad`` (the same measured choice); one whose weight-gradient
    kernel reads ``grad_output`` anyway sums the bias gradient in the same launch (Triton's implicit GEMM:
    one read of grad_output fewer), the others run the two one after the other
    (:meth:`~aqcf_kernels.backends.base.ConvBackend.conv_weight_bias_grad`). It has no derivative: the
    backward calls it only when the gradient need not be differentiable.
    """
    p = ConvParams.from_op_args(len(weight_shape) - 3, stride, padding, dilation, transposed, output_padding, groups)
    return _weight_grad(input, grad_output, weight_shape, p, algorithm, with_bias=True)


def _weight_grad(
    input: Tensor, grad_output: Tensor, weight_shape: list[int], p: ConvParams, algorithm: str, with_bias: bool
) -> tuple[Tensor, Tensor | None]:
    weight = input.new_empty(1).expand(weight_shape)  # its shape, dtype and device, without data
    empty = input.numel() == 0 or grad_output.numel() == 0

    def run(backend: backends.ConvBackend, algorithm: str) -> Tensor:
        return backend.conv_weight_grad(input, grad_output, weight_shape, p, algorithm)

    algorithm_asked = algorithm
    backend, algorithm, measured, final = backends.resolve_conv(
        input, weight, p, algorithm, "weight_grad", run=None if empty else run
    )
    if empty:
        return input.new_zeros(weight_shape), (bias_grad(grad_output) if with_bias else None)
    if with_bias and measured is None:
        gw, gb = backend.conv_weight_bias_grad(input, grad_output, weight_shape, p, algorithm)
    else:  # a first call measured under 'auto' has its weight gradient already
        gw = measured if measured is not None else run(backend, algorithm)
        gb = bias_grad(grad_output) if with_bias else None
    if final:
        _remember("weight_grad", algorithm_asked, backend, algorithm, input, grad_output, weight_shape, p)
    return gw.contiguous(), gb


def _weight_bias_grad_fake(input, grad_output, weight_shape, *geometry_and_algorithm):
    return input.new_empty(weight_shape), grad_output.new_empty(grad_output.shape[1])


def _weight_grad_fake(input, grad_output, weight_shape, *geometry_and_algorithm):
    return input.new_empty(weight_shape)


def _weight_grad_setup_context(ctx, inputs, output):
    input, grad_output, weight_shape, *geometry, algorithm = inputs
    ctx.save_for_backward(input, grad_output)
    ctx.params = ConvParams.from_op_args(len(weight_shape) - 3, *geometry)
    ctx.algorithm = algorithm
    ctx.num_inputs = len(inputs)


def _weight_grad_backward(ctx, grad_grad_weight):
    # qconv_weight_grad(x, gy) is bilinear: <H, wgrad(x, gy)> = <gy, qconv(x, H)>.
    input, grad_output = ctx.saved_tensors
    p, algorithm = ctx.params, ctx.algorithm
    g_input = g_grad_output = None
    if ctx.needs_input_grad[0]:
        g_input = input_grad(grad_output, grad_grad_weight, input.shape, p, algorithm)
    if ctx.needs_input_grad[1]:
        g_grad_output = conv(input, grad_grad_weight, None, p, algorithm, kind="forward")
    return g_input, g_grad_output, *[None] * (ctx.num_inputs - 2)


# --------------------------------------------------------------------------------------------
# torch.func: grad, vjp, jacrev, jvp, jacfwd, hessian, vmap (see .func)
# --------------------------------------------------------------------------------------------
# While a transform or a dual level is active the callers go through :class:`_QConvFunction` /
# :class:`_WeightGradFunction` (otherwise the op as before): the op's own autograd formulas,
# forward-mode formulas (the conv is bilinear in input and weight), and vmap rules that fold the
# vmapped dim into the conv's batch (only the input vmapped) or into its groups (per-sample weights,
# per-sample weight gradients: a grouped conv, as functorch's own rule for aten's conv does), so a
# vmapped conv is one conv, not a loop over slices; on CPU one conv per :data:`FOLD_BYTES` of copies
# the fold makes, a large slice's conv on its own tensors.


class _Static:
    """An op call's arguments after its tensors, as one pytree leaf: functorch flattens and unflattens a
    Function's arguments many times per transform level (each int of the geometry's lists a leaf of its own);
    ~340 pytree calls a conv under ``vmap(grad(...))`` cost more than a small conv itself."""

    __slots__ = ("args",)

    def __init__(self, args: Sequence) -> None:
        self.args = tuple(args)


def _packed(args: Sequence, tensors: int) -> tuple:
    """``args`` as ``(*tensors, _Static(rest))`` for a Function's ``apply``."""
    return (*args[:tensors], _Static(args[tensors:]))


def _unpacked(args: Sequence) -> tuple:
    """A Function's arguments as the op's: :func:`_packed` undone."""
    return (*args[:-1], *args[-1].args)


def call_qconv(*args) -> tuple[Tensor, Tensor]:
    """``torch.ops.aqcf.qconv(*args)``, the 13 arguments positional; through :class:`_QConvFunction` while
    a torch.func transform or a forward-mode AD dual level is active; its lowering (standard ops) while
    ``torch.onnx.export`` captures a model (see :mod:`.lowerings`)."""
    if exporting_to_onnx():
        return qconv_lowering(*args)
    if transforms_active():
        if torch.compiler.is_compiling():
            # torch.compile of a transformed function: dynamo inlines the Function's forward without popping
            # the transform's level, so the Function calls itself until the recursion limit (torch 2.13),
            # and a graph break here crashes dynamo inside grad (a torch.nn-only function with one does
            # too). The op's plain-PyTorch lowering (the expanded-weight conv) is what dynamo traces,
            # transforms included.
            return qconv_lowering(*cast_for_transforms(args))
        return _QConvFunction.apply(*_packed(cast_for_transforms(args), 3))
    return torch.ops.aqcf.qconv(*args)


def call_qconv_weight_grad(*args) -> Tensor:
    """``torch.ops.aqcf.qconv_weight_grad(*args)``, through :class:`_WeightGradFunction` while a torch.func
    transform or a forward-mode AD dual level is active."""
    if transforms_active():
        return _WeightGradFunction.apply(*_packed(args, 2))
    return torch.ops.aqcf.qconv_weight_grad(*args)


def _batch_first(t: Tensor, dim: int | None, size: int) -> Tensor:
    """A vmapped argument with its vmapped dim first; an unvmapped one repeated ``size`` times (a view)."""
    return t.movedim(dim, 0) if dim is not None else t.expand(size, *t.shape)


def _fold_channels(t: Tensor, dim: int) -> Tensor:
    """``t`` with its vmapped dim first and a blocked ``[r|i|j|k]`` channel dim ``dim``: that dim holds every
    vmapped slice's channels, each component's together (``[r: slice 0, slice 1, ...| i: ...]``), so slice
    ``b`` is group ``b`` of a grouped conv (groups partition each component block)."""
    t = t.unflatten(dim, (4, -1)).movedim(0, dim)  # (..., 4, slices, C, ...)
    return t.flatten(dim - 1, dim + 1)


def _unfold_channels(t: Tensor, dim: int, size: int) -> Tensor:
    """:func:`_fold_channels` undone, the vmapped dim first."""
    return t.unflatten(dim, (4, size, -1)).movedim(dim + 1, 0).flatten(dim + 1, dim + 2)


#: Per device type, the most bytes one call of a vmap rule below copies to fold slices into the conv's groups
#: (the slices' inputs, and for a weight gradient their output gradients too). More slices are served in
#: several calls, and a slice larger than this in a call of its own: its tensors as they are, no copy. The
#: copies were most of the peak memory of per-sample gradients, and each call costs ~0.2-0.4 ms on CPU.
#: Measured on CPU (Intel Xeon, 2 threads; vmap(grad) per-sample gradients of 2d 4-64q convs, batches of
#: 8-256, samples of 16 KiB-4 MiB; budgets of 0.25-8 MiB against one folded call): 4 MiB was within 7% of
#: the fastest budget on every case, 1.14-1.59x faster than one folded call on samples of 32² and 64²
#: and 0.94-0.96x on samples of 16² and 8²; 1 MiB was up to 1.2x slower than 4 MiB on small samples (more
#: calls). Other devices keep one folded call: there each call costs kernel launches, and no GPU has
#: measured the trade.
FOLD_BYTES: dict[str, int] = {"cpu": 4 << 20}


def fold_chunk(slice_bytes: int, size: int, device: torch.device) -> int:
    """How many of ``size`` vmapped slices, each copying ``slice_bytes`` when folded, one call of a vmap rule
    below folds into the conv's groups (:data:`FOLD_BYTES`); at least one."""
    budget = FOLD_BYTES.get(device.type)
    if budget is None:
        return size
    return max(1, min(size, budget // max(1, slice_bytes)))


def fold_bytes(*slices: Tensor) -> int:
    """What folding one vmapped slice copies: the bytes of its tensors (one slice each) that the fold moves."""
    return sum(t.numel() * t.element_size() for t in slices)


def _in_chunks(size: int, chunk: int, serve) -> list:
    """``serve(start, stop)`` for consecutive ranges of ``chunk`` slices covering ``size``."""
    return [serve(start, min(size, start + chunk)) for start in range(0, size, chunk)]


def _cat(parts: list[Tensor]) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _fold_weight(w: Tensor) -> Tensor:
    """Per-slice weights ``(slices, 4, A, B, *k)`` as one grouped conv's ``(4, slices·A, B, *k)``."""
    return w.movedim(0, 1).flatten(1, 2)


class _QConvFunction(torch.autograd.Function):
    """``aqcf::qconv`` under torch.func transforms (see above): backward as the op's, ``jvp``, ``vmap``."""

    @staticmethod
    def forward(*args):  # one transform level down: the Function again, or the op
        return _QConvFunction.apply(*args) if functorch_active() else torch.ops.aqcf.qconv(*_unpacked(args))

    @staticmethod
    def setup_context(ctx, inputs, output):
        args = _unpacked(inputs)
        _qconv_setup_context(ctx, args, output)
        ctx.num_inputs = len(inputs)  # the backward's gradients: one per argument of apply
        ctx.save_for_forward(inputs[0], inputs[1], *output)
        ctx.kind = qconv_args(*args).kind

    backward = staticmethod(_qconv_backward)

    @staticmethod
    def jvp(ctx, d_input, d_weight, d_bias, *_):
        input, weight, y, pre = ctx.saved_tensors
        p, algorithm = ctx.params, ctx.algorithm
        d_z = None  # W ⊗ dx + dW ⊗ x + db
        if d_input is not None:
            d_z = conv(d_input, weight, None, p, algorithm, ctx.kind)
        if d_weight is not None:
            term = conv(input, d_weight, None, p, algorithm, ctx.kind)
            d_z = term if d_z is None else d_z + term
        if d_bias is not None:
            term = d_bias.view(1, -1, *[1] * p.spatial_dims)
            d_z = term.expand_as(y) if d_z is None else d_z + term
        if ctx.activation is None:
            return d_z, torch.zeros_like(pre)
        d_y = activation_grad(d_z, y, pre, ctx.activation, ctx.negative_slope)
        return d_y, (d_z if stores_preactivation(ctx.activation, ctx.negative_slope) else torch.zeros_like(pre))

    @staticmethod
    def vmap(info, in_dims, *packed):
        args = _unpacked(packed)
        call = qconv_args(*args)
        size, (input_dim, weight_dim, bias_dim) = info.batch_size, in_dims[:3]
        keep = stores_preactivation(call.activation, call.negative_slope)
        if weight_dim is None and bias_dim is None:  # one weight: the slices are more samples
            x = call.input.movedim(input_dim, 0)
            y, pre = call_qconv(x.flatten(0, 1), *args[1:])
            y = y.unflatten(0, (size, x.shape[1]))
            return (y, pre.unflatten(0, (size, x.shape[1])) if keep else pre), (0, 0 if keep else None)
        x, weight = _batch_first(call.input, input_dim, size), _batch_first(call.weight, weight_dim, size)
        bias = None if call.bias is None else _batch_first(call.bias, bias_dim, size)
        geometry, groups, options = args[3:8], call.params.groups, args[9:]

        def outputs(start: int, stop: int) -> tuple[Tensor, Tensor]:  # slices [start, stop), one call
            n = stop - start
            if n == 1:  # its tensors as they are
                b = None if bias is None else bias[start]
                y, pre = call_qconv(x[start], weight[start], b, *geometry, groups, *options)
                return y[None], (pre[None] if keep else pre)
            b = None if bias is None else _fold_channels(bias[start:stop], 1)
            folded = _fold_channels(x[start:stop], 2), _fold_weight(weight[start:stop]), b
            y, pre = call_qconv(*folded, *geometry, groups * n, *options)
            return _unfold_channels(y, 1, n), (_unfold_channels(pre, 1, n) if keep else pre)

        ys, pres = zip(*_in_chunks(size, fold_chunk(fold_bytes(x[0]), size, x.device), outputs), strict=True)
        return (_cat(list(ys)), _cat(list(pres)) if keep else pres[0]), (0, 0 if keep else None)


class _WeightGradFunction(torch.autograd.Function):
    """``aqcf::qconv_weight_grad`` under torch.func transforms: backward as the op's, ``jvp``, ``vmap``."""

    @staticmethod
    def forward(*args):
        if functorch_active():
            return _WeightGradFunction.apply(*args)
        return torch.ops.aqcf.qconv_weight_grad(*_unpacked(args))

    @staticmethod
    def setup_context(ctx, inputs, output):
        args = _unpacked(inputs)
        _weight_grad_setup_context(ctx, args, output)
        ctx.num_inputs = len(inputs)
        ctx.save_for_forward(inputs[0], inputs[1])
        ctx.weight_shape = list(args[2])

    backward = staticmethod(_weight_grad_backward)

    @staticmethod
    def jvp(ctx, d_input, d_grad_output, *_):
        input, grad_output = ctx.saved_tensors
        p, algorithm, shape = ctx.params, ctx.algorithm, ctx.weight_shape
        terms = []  # bilinear in (input, grad_output)
        if d_input is not None:
            terms.append(weight_grad(d_input, grad_output, shape, p, algorithm))
        if d_grad_output is not None:
            terms.append(weight_grad(input, d_grad_output, shape, p, algorithm))
        return terms[0] if len(terms) == 1 else terms[0] + terms[1]

    @staticmethod
    def vmap(info, in_dims, input, grad_output, static):
        weight_shape, *geometry_and_algorithm = static.args
        size = info.batch_size
        x, gy = _batch_first(input, in_dims[0], size), _batch_first(grad_output, in_dims[1], size)
        *geometry, groups, algorithm = geometry_and_algorithm

        def grad_weight(start: int, stop: int) -> Tensor:  # slices [start, stop), one call
            n = stop - start
            if n == 1:  # per-sample gradients of large samples: the sample's tensors as they are
                return call_qconv_weight_grad(x[start], gy[start], weight_shape, *geometry, groups, algorithm)[None]
            shape = [4, n * weight_shape[1], *weight_shape[2:]]
            folded = _fold_channels(x[start:stop], 2), _fold_channels(gy[start:stop], 2)
            grad = call_qconv_weight_grad(*folded, shape, *geometry, groups * n, algorithm)
            return grad.unflatten(1, (n, -1)).movedim(1, 0)

        chunk = fold_chunk(fold_bytes(x[0], gy[0]), size, x.device)
        return _cat(_in_chunks(size, chunk, grad_weight)), 0


# --------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------

if NATIVE:
    _C._set_fallbacks(qconv, qconv_weight_grad, qconv_weight_bias_grad)
# The last two have no derivatives: with the extension its compiled kernels serve CPU (both) and CUDA
# (qconv_weight_bias_grad, asking Python for what it did not remember); the Python ones serve the other
# devices (activation_grad_bias: Triton on CUDA).
define_ops(
    [
        ("aqcf::qconv", qconv, _qconv_fake),
        ("aqcf::qconv_weight_grad", qconv_weight_grad, _weight_grad_fake),
        ("aqcf::activation_grad_bias", activation_grad_bias, _activation_grad_bias_fake),
        ("aqcf::qconv_weight_bias_grad", qconv_weight_bias_grad, _weight_bias_grad_fake),
    ],
    NATIVE,
    autograd={
        "aqcf::qconv": (_qconv_backward, _qconv_setup_context),
        "aqcf::qconv_weight_grad": (_weight_grad_backward, _weight_grad_setup_context),
    },
)
