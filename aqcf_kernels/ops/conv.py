"""The quaternion convolution op family: ``torch.ops.aqcf.qconv`` and ``aqcf.qconv_weight_grad``.

One schema covers 1d/2d/3d and transposed convs; the backend is picked per call (see
``aqcf_kernels.backends``) and never changes the schema. Backward is expressed with the same
two ops, so double backward, ``torch.compile`` and ``opcheck`` work:

* input gradient of a conv = the transposed conv of ``grad_output`` with the same weight
  (and vice versa) — a quaternion transposed conv is defined as the adjoint;
* weight gradient = ``qconv_weight_grad(input, grad_output)``;
* double backward of ``qconv_weight_grad`` (bilinear in input and grad_output) is again a
  conv and an input gradient, with the incoming gradient as weight.

Arguments reaching these ops are already checked (``aqcf_kernels.params``).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch._prims_common import suggest_memory_format

from .. import backends
from ..params import ConvParams, conv_output_shape


def _params(weight_dim, stride, padding, dilation, transposed, output_padding, groups) -> ConvParams:
    return ConvParams.from_op_args(weight_dim - 3, stride, padding, dilation, transposed, output_padding, groups)


def _empty_output(input: Tensor, shape) -> Tensor:
    # Outputs follow the input's memory format (channels_last in, channels_last out), like torch.
    return torch.empty(shape, dtype=input.dtype, device=input.device, memory_format=suggest_memory_format(input))


@torch.library.custom_op("aqcf::qconv", mutates_args=())
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
) -> Tensor:
    """Quaternion (transposed) convolution ``y = W ⊗ x`` (+ bias)."""
    p = _params(weight.dim(), stride, padding, dilation, transposed, output_padding, groups)
    backend = backends.select(input, weight, p, algorithm)  # even for empty inputs: a forced backend is checked
    out = _empty_output(input, conv_output_shape(input.shape, weight.shape, p))
    if input.numel() == 0 or out.numel() == 0:
        return out.zero_() if bias is None else out.copy_(bias.view(1, -1, *[1] * p.spatial_dims).expand_as(out))
    y = backend.conv(input, weight, bias, p, algorithm)
    return out.copy_(y) if y.stride() != out.stride() else y


@qconv.register_fake
def _(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups, algorithm):
    p = _params(weight.dim(), stride, padding, dilation, transposed, output_padding, groups)
    return _empty_output(input, conv_output_shape(input.shape, weight.shape, p))


@torch.library.custom_op("aqcf::qconv_weight_grad", mutates_args=())
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
    p = _params(len(weight_shape), stride, padding, dilation, transposed, output_padding, groups)
    backend = backends.select(input, input.new_empty(1).expand(weight_shape), p, algorithm)
    if input.numel() == 0 or grad_output.numel() == 0:
        return input.new_zeros(weight_shape)
    return backend.conv_weight_grad(input, grad_output, weight_shape, p, algorithm).contiguous()


@qconv_weight_grad.register_fake
def _(input, grad_output, weight_shape, stride, padding, dilation, transposed, output_padding, groups, algorithm):
    return input.new_empty(weight_shape)


def input_grad(grad_output: Tensor, weight: Tensor, input_shape, p: ConvParams, algorithm: str) -> Tensor:
    """Gradient w.r.t. the input of ``qconv(input, weight)``: the adjoint conv of grad_output."""
    n = p.spatial_dims
    if p.transposed:
        adjoint = ConvParams(n, p.stride, p.padding, p.dilation, False, (0,) * n, p.groups)
    else:
        # Choose output_padding so the transposed conv lands exactly on the input size (the
        # rows a strided conv never read get zero gradient).
        natural = conv_output_shape(
            grad_output.shape, weight.shape, ConvParams(n, p.stride, p.padding, p.dilation, True, (0,) * n, p.groups)
        )
        extra = tuple(int(i) - o for i, o in zip(input_shape[2:], natural[2:], strict=True))
        adjoint = ConvParams(n, p.stride, p.padding, p.dilation, True, extra, p.groups)
    return torch.ops.aqcf.qconv(grad_output, weight, None, *adjoint.as_op_args(), algorithm)


def _qconv_setup_context(ctx, inputs, output):
    input, weight, bias, stride, padding, dilation, transposed, output_padding, groups, algorithm = inputs
    ctx.save_for_backward(input, weight)
    ctx.params = _params(weight.dim(), stride, padding, dilation, transposed, output_padding, groups)
    ctx.algorithm = algorithm
    ctx.has_bias = bias is not None


def _qconv_backward(ctx, grad_output):
    input, weight = ctx.saved_tensors
    return _conv_grads(ctx, input, weight, grad_output)


def _conv_grads(ctx, input, weight, grad_output):
    """(grad_input, grad_weight, grad_bias, None...) of a qconv, as qconv/qconv_weight_grad calls."""
    p, algorithm = ctx.params, ctx.algorithm
    grad_input = grad_weight = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_input = input_grad(grad_output, weight, input.shape, p, algorithm)
    if ctx.needs_input_grad[1]:
        grad_weight = torch.ops.aqcf.qconv_weight_grad(
            input, grad_output, list(weight.shape), *p.as_op_args(), algorithm
        )
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_bias = grad_output.sum(dim=[0, *range(2, grad_output.dim())])
    return grad_input, grad_weight, grad_bias, None, None, None, None, None, None, None


qconv.register_autograd(_qconv_backward, setup_context=_qconv_setup_context)


def _weight_grad_setup_context(ctx, inputs, output):
    input, grad_output, weight_shape, stride, padding, dilation, transposed, output_padding, groups, algorithm = inputs
    ctx.save_for_backward(input, grad_output)
    ctx.params = _params(len(weight_shape), stride, padding, dilation, transposed, output_padding, groups)
    ctx.algorithm = algorithm


def _weight_grad_backward(ctx, grad_grad_weight):
    # qconv_weight_grad(x, gy) is bilinear: <H, wgrad(x, gy)> = <gy, qconv(x, H)>.
    input, grad_output = ctx.saved_tensors
    p, algorithm = ctx.params, ctx.algorithm
    g_input = g_grad_output = None
    if ctx.needs_input_grad[0]:
        g_input = input_grad(grad_output, grad_grad_weight, input.shape, p, algorithm)
    if ctx.needs_input_grad[1]:
        g_grad_output = torch.ops.aqcf.qconv(input, grad_grad_weight, None, *p.as_op_args(), algorithm)
    return g_input, g_grad_output, None, None, None, None, None, None, None, None


qconv_weight_grad.register_autograd(_weight_grad_backward, setup_context=_weight_grad_setup_context)


# --------------------------------------------------------------------------------------------
# Conv with a fused activation: aqcf.qconv_act
# --------------------------------------------------------------------------------------------

ACTIVATIONS = ("relu", "leaky_relu", "gelu")


def stores_preactivation(activation: str, negative_slope: float) -> bool:
    """Whether the backward needs the pre-activation ``z``: ReLU and LeakyReLU (slope ≥ 0) read the
    sign of z off the output (``y > 0 ⇔ z > 0``), so only GELU and a negative slope keep z."""
    return activation == "gelu" or (activation == "leaky_relu" and negative_slope < 0)


def activate(z: Tensor, activation: str, negative_slope: float) -> Tensor:
    if activation == "relu":
        return torch.relu(z)
    if activation == "leaky_relu":
        return torch.nn.functional.leaky_relu(z, negative_slope)
    return torch.nn.functional.gelu(z)


def activation_grad(grad: Tensor, y: Tensor, pre: Tensor, activation: str, negative_slope: float) -> Tensor:
    """``dL/dz`` from ``dL/dy``; differentiable (double backward goes through it)."""
    if activation == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(pre * 0.7071067811865476))
        pdf = torch.exp(-0.5 * pre * pre) * 0.3989422804014327
        return grad * (cdf + pre * pdf)
    positive = (pre > 0) if stores_preactivation(activation, negative_slope) else (y > 0)
    slope = 0.0 if activation == "relu" else negative_slope
    return torch.where(positive, grad, grad * slope)


def _no_preactivation(input: Tensor) -> Tensor:
    return input.new_empty(0)


@torch.library.custom_op("aqcf::qconv_act", mutates_args=())
def qconv_act(
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
    activation: str,
    negative_slope: float,
) -> tuple[Tensor, Tensor]:
    """``(act(W ⊗ x + b), z)``: z is the pre-activation where the backward needs it, else empty.

    The Triton backend applies the activation in the kernel's epilogue; other backends run the conv
    and then the activation.
    """
    p = _params(weight.dim(), stride, padding, dilation, transposed, output_padding, groups)
    backend = backends.select(input, weight, p, algorithm)
    keep = stores_preactivation(activation, negative_slope)
    fused = getattr(backend, "conv_act", None)
    if fused is None or input.numel() == 0:
        z = qconv(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups, algorithm)
        return activate(z, activation, negative_slope), (z if keep else _no_preactivation(input))
    y, z = fused(input, weight, bias, p, algorithm, activation, negative_slope, keep)
    # Outputs follow the input's memory format, as qconv's (and the fake's) do.
    like = _empty_output(input, y.shape)
    if y.stride() != like.stride():
        y, z = like.copy_(y), (torch.empty_like(like).copy_(z) if keep else None)
    return y, (z if keep else _no_preactivation(input))


@qconv_act.register_fake
def _(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups, algorithm, activation, slope):
    p = _params(weight.dim(), stride, padding, dilation, transposed, output_padding, groups)
    y = _empty_output(input, conv_output_shape(input.shape, weight.shape, p))
    return y, (torch.empty_like(y) if stores_preactivation(activation, slope) else _no_preactivation(input))


def _qconv_act_setup_context(ctx, inputs, output):
    input, weight, bias, stride, padding, dilation, transposed, output_padding, groups, algorithm, act, slope = inputs
    y, pre = output
    ctx.save_for_backward(input, weight, y, pre)
    ctx.params = _params(weight.dim(), stride, padding, dilation, transposed, output_padding, groups)
    ctx.algorithm, ctx.activation, ctx.negative_slope = algorithm, act, slope
    ctx.has_bias = bias is not None


def _qconv_act_backward(ctx, grad_y, grad_pre):
    input, weight, y, pre = ctx.saved_tensors
    grad_z = activation_grad(grad_y, y, pre, ctx.activation, ctx.negative_slope)
    if grad_pre is not None and grad_pre.numel():  # z itself reached the loss (double backward)
        grad_z = grad_z + grad_pre
    return (*_conv_grads(ctx, input, weight, grad_z), None, None)


qconv_act.register_autograd(_qconv_act_backward, setup_context=_qconv_act_setup_context)
