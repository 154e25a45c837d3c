"""Every forward ``aqcf`` op as plain PyTorch ops: its lowering, for exporters that need standard ops.

``torch.onnx.export(model, args)`` (the dynamo exporter, torch's default) captures a model with
``torch.export`` and fails on an op ONNX has no function for ("No ONNX function found for aqcf.qconv").
While it captures (:func:`exporting_to_onnx`), the callers of the ops call these lowerings
instead, so a model built from the layers exports to ONNX as torch.nn's layers do, with no call to this
package (``aqcf-export`` hands its folded model to the same exporter). An ``ExportedProgram`` captured
outside an ONNX export keeps the ops: :func:`lowerings` are their decompositions for
``run_decompositions`` (:func:`aqcf_kernels.pipeline.export.lower_custom_ops`).

Not in torch's global decomposition table, where the exporter would also find them: Inductor asserts, when
the ``CI`` environment variable is set, that an op with an entry there is never a fallback kernel
("make_fallback(aqcf.qconv.default): a decomposition exists"), so ``torch.compile`` failed in every CI job
of a user's; and FakeTensorMode prefers a table entry to an op's fake implementation when sizes are
symbolic, which fixed a dynamic sequence length through the recurrent lowering's loop.

Each lowering returns exactly the op's outputs (shapes, dtypes), including those only training reads
(the norm's batch statistics, the recurrent op's saved gates), so a graph that uses them stays valid:

* ``qconv``: one real conv on the expanded weight (the 16 signed blocks of the Hamilton product, built
  from slices of the weight in the graph: ONNX Runtime folds them once at load), bias, activation;
* ``qnorm``: the composite norm of :mod:`aqcf_kernels.nn.norm` (a whitening norm's Cholesky is unrolled
  into elementwise ops during an ONNX export: :func:`aqcf_kernels.nn.norm._whitening_matrix`);
* ``cross_attention``: ``MatMul``/``Softmax``/``MatMul`` per direction, and its log-sum-exp;
* ``gated_residual``: ``f + α σ(g) o``;
* ``rnn_sequence``: the composite cells, one step after another: unrolled over a fixed sequence length,
  one ``scan`` (ONNX ``Scan``) over a dynamic one.

The backward ops (``*_backward``, ``qconv_weight_grad`` ...) have none: an inference graph has no
backward, and a training graph is not what ONNX export takes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["exporting_to_onnx", "lowerings"]


def exporting_to_onnx() -> bool:
    """Whether ``torch.onnx.export`` is capturing a model: the layers then call these lowerings. Asked on
    every op call, so ``torch.compiler.is_exporting()`` (a flag read, true while the exporter's
    ``torch.export`` traces) comes first: ``torch.onnx.is_in_onnx_export()`` alone costs ~1 µs a call (it
    imports two modules each time)."""
    return torch.compiler.is_exporting() and torch.onnx.is_in_onnx_export()


def _expanded_weight(weight: Tensor, groups: int) -> Tensor:
    """:func:`~aqcf_kernels.quaternion.expand_weight_grouped` from signed slices of ``weight`` (no constant
    tensor: a traced lowering may not create one) — the same matrix, ``(G*4*A, 4*B, *k)``."""
    from ..quaternion import HAMILTON

    _, ga, b, *kernel = weight.shape
    w = weight.reshape(4, groups, ga // groups, b, *kernel)
    rows = [torch.stack([w[p] if sign > 0 else -w[p] for p, sign in HAMILTON[c]], dim=2) for c in range(4)]
    return torch.stack(rows, dim=1).reshape(ga * 4, 4 * b, *kernel)


def qconv_lowering(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups, algorithm,
                   activation=None, negative_slope=0.01, kind="forward"):  # fmt: skip
    """``aqcf::qconv``: the expanded-weight real conv, then bias and activation (and the pre-activation
    the op returns where the activation's backward reads it)."""
    from ..backends.base import activate
    from ..backends.torch.conv import add_bias, real_conv
    from ..params import ConvParams
    from ..quaternion import from_group_major, to_group_major
    from .conv import stores_preactivation

    p = ConvParams.from_op_args(weight.dim() - 3, stride, padding, dilation, transposed, output_padding, groups)
    z = real_conv(to_group_major(input, p.groups), _expanded_weight(weight, p.groups), p)
    z = add_bias(from_group_major(z, p.groups), bias)
    if activation is None:
        return z, input.new_empty(0)
    y = activate(z, activation, negative_slope)
    return y, (z if stores_preactivation(activation, negative_slope) else input.new_empty(0))


def qnorm_lowering(input, weight, bias, running_mean, running_var, use_input_stats, per_sample, eps, activation,
                   negative_slope):  # fmt: skip
    """``aqcf::qnorm``: the composite norm + activation, and the statistics outputs (training reads them to
    update the running averages), computed as the op computes them."""
    from ..nn.norm import _quaternion_norm
    from .norm import _stat_dtype

    y = _quaternion_norm("qnorm", input, per_sample, running_mean, running_var, weight, bias, use_input_stats, 0.0,
                         eps, False, activation, negative_slope, fused=False)  # fmt: skip
    cq = input.shape[1] // 4
    x = input.unflatten(1, (4, cq))
    if use_input_stats:
        reduce = tuple(range(3, x.dim())) if per_sample else (0, *range(3, x.dim()))
        mean = x.mean(reduce, keepdim=True)
        var = (x - mean).square().mean(reduce, keepdim=True).sum(1)
        groups = input.shape[0] if per_sample else 1
        return y, mean.reshape(groups, 4 * cq), var.reshape(groups, cq)
    acc = _stat_dtype(input)  # (the op's, whatever the buffers' dtype)
    return y, running_mean.reshape(1, 4 * cq).to(acc, copy=True), running_var.reshape(1, cq).to(acc, copy=True)


def _attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    # What scaled_dot_product_attention computes, spelled out so ONNX gets MatMul/Softmax/MatMul; the log-sum-exp in
    # the op's dtype for it (float32, float64 for float64 inputs).
    from ..backends.base import lse_dtype

    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    return torch.matmul(torch.softmax(scores, dim=-1), v), torch.logsumexp(scores.to(lse_dtype(q.dtype)), dim=-1)


def cross_attention_lowering(q_a, k_a, v_a, q_b, k_b, v_b, scale):
    """``aqcf::cross_attention``: stream a attends to b and b to a, with each direction's log-sum-exp."""
    out_a, lse_a = _attention(q_a, k_b, v_b, scale)
    out_b, lse_b = _attention(q_b, k_a, v_a, scale)
    return out_a, out_b, lse_a, lse_b


def gated_residual_lowering(f, o, gate_logits, alpha):
    """``aqcf::gated_residual``: ``f + α σ(g) o``."""
    from .attention import composite_gate

    return f + composite_gate(o, gate_logits, alpha)


def rnn_sequence_lowering(proj, h0, c0, weight, mode, nonlinearity, negative_slope, reverse):
    """``aqcf::rnn_sequence``: the composite cells over the sequence, unrolled for a fixed length
    (:func:`.rnn_cell._composite`), one ``scan`` for a symbolic one (:func:`.rnn_cell._scanned`): unrolling
    would fix a symbolic length to the example's (silently in ``run_decompositions``, whose guards are not
    checked; an export that declared the length dynamic would fail)."""
    from .rnn_cell import _composite, _scanned

    if isinstance(proj.shape[0], torch.SymInt):
        return _scanned(proj, h0, c0, weight, mode, nonlinearity, negative_slope, reverse)
    return _composite(proj, h0, c0, weight, mode, nonlinearity, negative_slope, reverse, keep_saved=True)


def lowerings() -> dict[Any, Callable[..., Any]]:
    """``aqcf`` op overload -> its plain-PyTorch lowering (a decomposition for ``run_decompositions``)."""
    ops = torch.ops.aqcf
    return {
        ops.qconv.default: qconv_lowering,
        ops.qnorm.default: qnorm_lowering,
        ops.cross_attention.default: cross_attention_lowering,
        ops.gated_residual.default: gated_residual_lowering,
        ops.rnn_sequence.default: rnn_sequence_lowering,
    }
