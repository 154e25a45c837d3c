"""The A-QCF attention op family: ``aqcf.cross_attention`` and ``aqcf.gated_residual``.

``cross_attention(q_a, k_a, v_a, q_b, k_b, v_b, scale)`` computes BOTH directions of the block's
attention in one call (the Triton backend in one launch):

* ``out_a = softmax(q_a k_bᵀ · scale) v_b`` — stream a's queries read stream b's tokens;
* ``out_b = softmax(q_b k_aᵀ · scale) v_a`` — and the other way round;

with every tensor ``(B, H, N, E)`` (``E = 4·d``: a head's ``d`` quaternion channels, ``[r|i|j|k]``).
It also returns the log-sum-exp of each score row, which is all the backward needs to recompute
the probabilities: no ``N_a × N_b`` matrix is ever stored. The backward is an op of its own
(``cross_attention_backward``); like FlashAttention's, it has no derivative itself, so a backward that
must be differentiable (``create_graph=True``: gradient penalties, Hessian-vector products, double
backward) differentiates a composite attention instead (:func:`composite_attention_backward`), as the
norm's and the recurrent cell's do. The gate's backward op likewise (:func:`composite_gate_backward`).

``gated_residual(f, o, g, alpha) = f + alpha · sigmoid(g) ⊙ o`` is the block's epilogue, one fused
elementwise pass (``g`` may broadcast over tokens). Arguments reaching these ops are already checked
(``aqcf_kernels.functional``).

With the compiled extension the four ops are defined natively (csrc/cpu/attention_op.h), as the conv
ops are: their CPU and CUDA kernels call the functions below the first time they see a call signature,
and when the ``torch`` backend served it with PyTorch's own kernels (its flash and memory-efficient
attention, its gate's elementwise ops) they serve that signature's later calls in C++. The block is
host-bound at its small sizes, and the Python custom ops cost ~30 µs (cross_attention) and ~10 µs
(gated_residual) a call over their kernels. Without the extension the functions below are the ops.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import backends
from ..backends._extension import _C, NATIVE_DEVICES, define_ops
from ..backends.base import AttentionBackend, lse_dtype

#: the four ops are the extension's (csrc/cpu/attention_op.cpp), with the functions below as fallbacks
NATIVE = _C is not None and hasattr(_C, "_set_attention_fallbacks")


def _select_attention(q: Tensor) -> AttentionBackend:
    return backends.select_in(backends.ATTENTION, q.device.type, lambda b: b.cannot_serve_attention(q))


def _select_gate(f: Tensor, gate_logits: Tensor) -> AttentionBackend:
    return backends.select_in(backends.ATTENTION, f.device.type, lambda b: b.cannot_serve_gate(f, gate_logits))


def _native(t: Tensor) -> bool:
    return NATIVE and t.device.type in NATIVE_DEVICES


def _remember_attention(backend: AttentionBackend, q_a, k_a, v_a, q_b, k_b, v_b) -> None:
    """Let the extension serve later calls with these inputs' signature (and their backward) itself when
    both directions ran a PyTorch kernel it calls the same way
    (:meth:`~aqcf_kernels.backends.base.AttentionBackend.native_attention_kernel`)."""
    if not _native(q_a):
        return
    kernel_a = backend.native_attention_kernel(q_a, k_b, v_b)
    kernel_b = kernel_a and backend.native_attention_kernel(q_b, k_a, v_a)
    if kernel_a and kernel_b:
        _C._remember_attention_choice(q_a, k_a, v_a, q_b, k_b, v_b, kernel_a, kernel_b)


def _remember_gate(backend: AttentionBackend, f: Tensor, gate_logits: Tensor) -> None:
    if _native(f) and backend.native_gate():
        _C._remember_gate_choice(f, gate_logits)


def _lse_like(q: Tensor) -> Tensor:
    return q.new_empty(q.shape[:-1], dtype=lse_dtype(q.dtype))


def cross_attention(
    q_a: Tensor, k_a: Tensor, v_a: Tensor, q_b: Tensor, k_b: Tensor, v_b: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Both attention directions: ``(out_a, out_b, lse_a, lse_b)``."""
    backend = _select_attention(q_a)
    out_a, out_b, lse_a, lse_b = backend.cross_attention(q_a, k_a, v_a, q_b, k_b, v_b, scale)
    _remember_attention(backend, q_a, k_a, v_a, q_b, k_b, v_b)
    return out_a.contiguous(), out_b.contiguous(), lse_a.contiguous(), lse_b.contiguous()


def _dense_like(t: Tensor) -> Tensor:
    # The real ops return contiguous tensors whatever the inputs' strides (split_heads views are not).
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def _cross_attention_fake(q_a, k_a, v_a, q_b, k_b, v_b, scale):
    return _dense_like(q_a), _dense_like(q_b), _lse_like(q_a), _lse_like(q_b)


def cross_attention_backward(
    grad_a: Tensor,
    grad_b: Tensor,
    q_a: Tensor,
    k_a: Tensor,
    v_a: Tensor,
    q_b: Tensor,
    k_b: Tensor,
    v_b: Tensor,
    out_a: Tensor,
    out_b: Tensor,
    lse_a: Tensor,
    lse_b: Tensor,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients ``(dq_a, dk_a, dv_a, dq_b, dk_b, dv_b)`` from the saved outputs and log-sum-exps."""
    backend = _select_attention(q_a)
    grads = backend.cross_attention_backward(
        grad_a, grad_b, q_a, k_a, v_a, q_b, k_b, v_b, out_a, out_b, lse_a, lse_b, scale
    )
    _remember_attention(backend, q_a, k_a, v_a, q_b, k_b, v_b)
    return tuple(g.contiguous() for g in grads)


def _cross_attention_backward_fake(grad_a, grad_b, q_a, k_a, v_a, q_b, k_b, v_b, out_a, out_b, lse_a, lse_b, scale):
    return tuple(_dense_like(t) for t in (q_a, k_a, v_a, q_b, k_b, v_b))


def _attention_setup_context(ctx, inputs, output):
    q_a, k_a, v_a, q_b, k_b, v_b, scale = inputs
    out_a, out_b, lse_a, lse_b = output
    ctx.save_for_backward(q_a, k_a, v_a, q_b, k_b, v_b, out_a, out_b, lse_a, lse_b)
    ctx.scale = scale


def _attention_backward(ctx, grad_a, grad_b, _grad_lse_a, _grad_lse_b):
    q_a, k_a, v_a, q_b, k_b, v_b, out_a, out_b, lse_a, lse_b = ctx.saved_tensors
    # An output that did not reach the loss arrives as None: its direction contributes nothing.
    grad_a = torch.zeros_like(out_a) if grad_a is None else grad_a
    grad_b = torch.zeros_like(out_b) if grad_b is None else grad_b
    if torch.is_grad_enabled():  # create_graph=True: the gradient must itself be differentiable
        grads = composite_attention_backward(grad_a, grad_b, q_a, k_a, v_a, q_b, k_b, v_b, ctx.scale)
    else:
        grads = torch.ops.aqcf.cross_attention_backward(
            grad_a, grad_b, q_a, k_a, v_a, q_b, k_b, v_b, out_a, out_b, lse_a, lse_b, ctx.scale
        )
    return (*grads, None)


def _differentiable(t: Tensor) -> Tensor:
    """An alias of ``t`` in its graph, or a leaf where ``t`` is a constant (its gradient is asked for, and
    dropped by the caller's autograd). An alias per argument: the same tensor passed as two arguments
    (``o`` and ``gate_logits``, or ``k`` and ``v``) gets each argument's own gradient, not their sum."""
    return t.view_as(t) if t.requires_grad else t.detach().requires_grad_()


def composite_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """``softmax(q kᵀ · scale) v`` from differentiable torch ops, the scores materialised (in float32 for
    half-precision inputs); for a differentiable backward, whose graph keeps them anyway, and for torch.func's
    transforms (:mod:`.func`)."""
    compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    scores = (q.to(compute) @ k.to(compute).transpose(-1, -2)) * scale
    return (torch.softmax(scores, dim=-1) @ v.to(compute)).to(q.dtype)


def composite_attention_backward(grad_a: Tensor, grad_b: Tensor, q_a: Tensor, k_a: Tensor, v_a: Tensor, q_b: Tensor,
                                 k_b: Tensor, v_b: Tensor, scale: float) -> tuple[Tensor, ...]:  # fmt: skip
    """``(dq_a, dk_a, dv_a, dq_b, dk_b, dv_b)`` by differentiating the composite attention with
    ``create_graph=True``: gradients that are differentiable in the inputs and in ``grad_a, grad_b``
    (double backward works through them). Slower and ``N_a × N_b`` in memory per direction, so only the
    autograd formulas' ``create_graph=True`` path calls it (the extension's too)."""
    with torch.enable_grad():
        inputs = [_differentiable(t) for t in (q_a, k_a, v_a, q_b, k_b, v_b)]
        q_a, k_a, v_a, q_b, k_b, v_b = inputs
        outs = (composite_attention(q_a, k_b, v_b, scale), composite_attention(q_b, k_a, v_a, scale))
        return tuple(torch.autograd.grad(outs, inputs, (grad_a, grad_b), create_graph=True))


def gated_residual(f: Tensor, o: Tensor, gate_logits: Tensor, alpha: Tensor) -> Tensor:
    """``f + alpha · sigmoid(gate_logits) ⊙ o``."""
    backend = _select_gate(f, gate_logits)
    y = backend.gated_residual(f, o, gate_logits, alpha).contiguous()
    _remember_gate(backend, f, gate_logits)
    return y


def _gated_residual_fake(f, o, gate_logits, alpha):
    # The kernel's shape: every argument broadcast (alpha, one value, may have more dims than f).
    shape = torch.broadcast_shapes(f.shape, o.shape, gate_logits.shape, alpha.shape)
    return f.new_empty(shape)


def gated_residual_backward(
    grad: Tensor, o: Tensor, gate_logits: Tensor, alpha: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients ``(d_o, d_gate_logits, d_alpha)`` of :func:`gated_residual` (``d_f`` is ``grad``)."""
    backend = _select_gate(grad, gate_logits)
    d_o, d_g, d_alpha = backend.gated_residual_backward(grad, o, gate_logits, alpha)
    _remember_gate(backend, grad, gate_logits)
    return d_o.contiguous(), d_g.contiguous(), d_alpha.contiguous()


def _gated_residual_backward_fake(grad, o, gate_logits, alpha):
    return (
        torch.empty_like(o, memory_format=torch.contiguous_format),
        torch.empty_like(gate_logits, memory_format=torch.contiguous_format),
        torch.empty_like(alpha, memory_format=torch.contiguous_format),
    )


def _gate_setup_context(ctx, inputs, output):
    f, o, gate_logits, alpha = inputs
    ctx.save_for_backward(o, gate_logits, alpha)


def _gate_backward(ctx, grad):
    o, gate_logits, alpha = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True
        d_o, d_g, d_alpha = composite_gate_backward(grad, o, gate_logits, alpha)
    else:
        d_o, d_g, d_alpha = torch.ops.aqcf.gated_residual_backward(grad, o, gate_logits, alpha)
    return grad, d_o, d_g, d_alpha


def composite_gate_backward(
    grad: Tensor, o: Tensor, gate_logits: Tensor, alpha: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """``(d_o, d_gate_logits, d_alpha)`` of the gate by differentiating ``alpha · sigmoid(g) ⊙ o`` with
    ``create_graph=True`` (double backward works through them); the ``create_graph=True`` path of the
    autograd formulas (the extension's too). ``d_f`` is ``grad`` itself."""
    with torch.enable_grad():
        inputs = [_differentiable(t) for t in (o, gate_logits, alpha)]
        return tuple(torch.autograd.grad(composite_gate(*inputs), inputs, grad, create_graph=True))


def composite_gate(o: Tensor, gate_logits: Tensor, alpha: Tensor) -> Tensor:
    """The gate's term ``alpha · sigmoid(gate_logits) ⊙ o`` of :func:`gated_residual` from differentiable torch
    ops: for a differentiable backward and for torch.func's transforms (:mod:`.func`)."""
    return alpha * torch.sigmoid(gate_logits) * o


# --------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------

_OPS = (
    ("aqcf::cross_attention", cross_attention, _cross_attention_fake),
    ("aqcf::cross_attention_backward", cross_attention_backward, _cross_attention_backward_fake),
    ("aqcf::gated_residual", gated_residual, _gated_residual_fake),
    ("aqcf::gated_residual_backward", gated_residual_backward, _gated_residual_backward_fake),
)

if NATIVE:
    _C._set_attention_fallbacks(
        cross_attention,
        cross_attention_backward,
        gated_residual,
        gated_residual_backward,
        composite_attention_backward,
        composite_gate_backward,
    )
define_ops(
    _OPS,
    NATIVE,
    autograd={
        "aqcf::cross_attention": (_attention_backward, _attention_setup_context),
        "aqcf::gated_residual": (_gate_backward, _gate_setup_context),
    },
)
