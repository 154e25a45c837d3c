"""The fused quaternion norm op: ``aqcf::qnorm`` (shared variance, affine and activation in one pass).

``qnorm(input, weight, bias, running_mean, running_var, use_input_stats, per_sample, eps, activation,
negative_slope) -> (y, mean, var)`` normalises a blocked ``(N, 4Cq, *S)`` tensor with one variance per
quaternion channel (batch norm; instance norm with ``per_sample``), applies ``γ``/``β`` and the
activation, and returns the statistics it used: the mean per real channel ``(G, 4Cq)`` and the biased
shared variance ``(G, Cq)``, ``G = N`` for instance norm in training and 1 otherwise (the caller
updates the running statistics from them), in at least float32. Two implementations: the compiled
extension on CPU (csrc/cpu/norm.cpp: float32 and float64, NCHW and channels_last) and Triton kernels
on CUDA (backends/triton/norm.py: float16/bfloat16/float32/float64, statistics in float32 or
float64), which also serve CPU tensors under ``TRITON_INTERPRET=1`` when the ``triton`` backend is
forced (``AQCF_BACKEND=triton`` or ``backends.use("triton")``), as the conv kernels are proven without
a GPU. :func:`aqcf_kernels.nn.norm._quaternion_norm`'s composite path is the reference and serves
everything else.

Why fused: the composite path reads and writes the activation tensor ~6 times (statistics, centring,
scaling, shift, activation, dtype casts) and its backward more; this op reads it twice forward
(statistics, then normalise + affine + activation) and three times backward (sums, then the input
gradient), recomputing the pre-activation from the input instead of storing it.

Its backward is an op of its own (``qnorm_backward``) with no derivative; when the gradient must be
differentiable (``create_graph=True``), the backward differentiates the composite reference instead.

With the compiled extension both ops are defined natively (csrc/cpu/norm_op.h), as the conv ops are:
their CPU kernel asks the functions below the first time it sees a signature and serves its later
calls itself when the compiled kernels served it (the Python custom op cost ~10 µs a forward and
~80 µs a backward over those kernels); other devices get the functions below through the dispatcher.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..backends._extension import _C, define_ops
from ..layout import quaternion_channels
from .func import transforms_active

#: the ops are the extension's (csrc/cpu/norm_op.cpp), with the functions below as fallbacks
NATIVE = _C is not None and hasattr(_C, "_set_norm_fallbacks")


def available(input: Tensor, whiten: bool) -> bool:
    """Whether ``qnorm`` serves this call (else the composite path does: also under a torch.func transform,
    which differentiates and batches it, :mod:`.func`)."""
    if whiten or input.dim() < 3 or transforms_active():
        return False
    cpp = _C is not None and input.device.type == "cpu" and input.dtype in (torch.float32, torch.float64)
    return cpp or _triton_serves(input)


def _triton_serves(input: Tensor) -> bool:
    """Whether the Triton kernels take this call: CUDA tensors whenever triton imports; CPU tensors only
    under ``TRITON_INTERPRET=1`` with the ``triton`` backend forced (the compiled kernel serves CPU)."""
    from ..backends.triton import common

    if not common.serves_fused(input):
        return False
    from ..backends.triton import norm as triton_norm

    return triton_norm.serves(input)


def _stat_dtype(input: Tensor) -> torch.dtype:
    return torch.promote_types(input.dtype, torch.float32)


def _groups(input: Tensor, use_input_stats: bool, per_sample: bool) -> int:
    return input.shape[0] if (use_input_stats and per_sample) else 1


def _output_like(input: Tensor) -> Tensor:
    # The extension keeps channels_last (4d/5d) and makes everything else contiguous.
    if input.dim() in (4, 5):
        fmt = torch.channels_last if input.dim() == 4 else torch.channels_last_3d
        if not input.is_contiguous() and input.is_contiguous(memory_format=fmt):
            return torch.empty_like(input, memory_format=fmt)
    return torch.empty_like(input, memory_format=torch.contiguous_format)


def qnorm(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    use_input_stats: bool,
    per_sample: bool,
    eps: float,
    activation: str | None,
    negative_slope: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, mean, var)``: see the module docstring."""
    if _triton_serves(input):
        from ..backends.triton import norm as triton_norm

        return triton_norm.forward(
            input, weight, bias, running_mean, running_var, use_input_stats, per_sample, eps, activation, negative_slope
        )
    out = _C.qnorm_forward(
        input, weight, bias, running_mean, running_var, use_input_stats, per_sample, eps, activation, negative_slope
    )
    if NATIVE and input.device.type == "cpu":  # the extension's CPU kernel serves the next ones itself
        _C._remember_norm_choice(input)
    return out


def _qnorm_fake(input, weight, bias, running_mean, running_var, use_input_stats, per_sample, eps, activation,
                negative_slope):  # fmt: skip
    cq = quaternion_channels(input, name="qnorm: input")
    g = _groups(input, use_input_stats, per_sample)
    acc = _stat_dtype(input)
    return _output_like(input), input.new_empty(g, 4 * cq, dtype=acc), input.new_empty(g, cq, dtype=acc)


def qnorm_backward(
    grad_output: Tensor,
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    var: Tensor,
    use_input_stats: bool,
    per_sample: bool,
    eps: float,
    activation: str | None,
    negative_slope: float,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``qnorm``'s ``y`` w.r.t. input, weight and bias (empty tensors where not needed)."""
    if _triton_serves(input):
        from ..backends.triton import norm as triton_norm

        gx, gw, gb = triton_norm.backward(
            grad_output, input, weight, bias, mean, var, use_input_stats, per_sample, eps, activation, negative_slope,
            needs,
        )  # fmt: skip
        return tuple(g if g is not None else input.new_empty(0) for g in (gx, gw, gb))
    gx, gw, gb = _C.qnorm_backward(
        grad_output, input, weight, bias, mean, var, use_input_stats, per_sample, eps, activation, negative_slope,
        needs,
    )  # fmt: skip
    if NATIVE and input.device.type == "cpu":
        _C._remember_norm_choice(input)
    # a fresh empty tensor for each gradient not computed (outputs of a custom op may not alias)
    return tuple(g if g is not None else input.new_empty(0) for g in (gx, gw, gb))


def _qnorm_backward_fake(grad_output, input, weight, bias, mean, var, use_input_stats, per_sample, eps, activation,
                         slope, needs):  # fmt: skip
    gx = _output_like(input) if needs[0] else input.new_empty(0)
    gw = torch.empty_like(weight) if needs[1] and weight is not None else input.new_empty(0)
    gb = torch.empty_like(bias) if needs[2] and bias is not None else input.new_empty(0)
    return gx, gw, gb


def _setup_context(ctx, inputs, output):
    input, weight, bias, _, _, use_input_stats, per_sample, eps, activation, slope = inputs
    _, mean, var = output
    ctx.mark_non_differentiable(mean, var)
    ctx.save_for_backward(input, weight, bias, mean, var)
    ctx.options = (use_input_stats, per_sample, eps, activation, slope)
    # The statistics get None, not tensors of zeros (two launches per norm and step on a GPU)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_y, _grad_mean, _grad_var):
    if grad_y is None:  # y never reached the loss
        return (None,) * 10
    input, weight, bias, mean, var = ctx.saved_tensors
    needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
    if torch.is_grad_enabled():  # create_graph=True: the gradient must itself be differentiable
        gx, gw, gb = composite_backward(grad_y, input, weight, bias, mean, var, *ctx.options, needs)
    else:
        gx, gw, gb = torch.ops.aqcf.qnorm_backward(grad_y, input, weight, bias, mean, var, *ctx.options, needs)
    return (gx if needs[0] else None), (gw if needs[1] else None), (gb if needs[2] else None), *[None] * 7


def composite_backward(grad_y, input, weight, bias, mean, var, use_input_stats, per_sample, eps, activation, slope,
                       needs):  # fmt: skip
    """The gradients through the composite reference (double backward works through it): slower, only
    for ``create_graph=True`` (the extension's autograd formula asks it too). The statistics are
    recomputed from the input in training, and are the saved running ones in eval."""
    from ..nn.norm import _quaternion_norm  # (nn.norm imports this module)

    running = (None, None) if use_input_stats else (mean.reshape(-1), var.reshape(-1))
    wrt = [t for t, need in zip((input, weight, bias), needs, strict=True) if need and t is not None]
    y = _quaternion_norm(
        "qnorm", input, per_sample, *running, weight, bias, use_input_stats, 0.0, eps, False, activation, slope,
        fused=False,
    )  # fmt: skip
    grads = iter(torch.autograd.grad(y, wrt, grad_y, create_graph=True))
    return tuple(
        next(grads) if need and t is not None else None for t, need in zip((input, weight, bias), needs, strict=True)
    )


if NATIVE:
    _C._set_norm_fallbacks(qnorm, qnorm_backward, composite_backward)
define_ops(  # with the extension, Python serves CUDA (Triton) and the devices without a compiled kernel
    [("aqcf::qnorm", qnorm, _qnorm_fake), ("aqcf::qnorm_backward", qnorm_backward, _qnorm_backward_fake)],
    NATIVE,
    autograd={"aqcf::qnorm": (_backward, _setup_context)},
)
