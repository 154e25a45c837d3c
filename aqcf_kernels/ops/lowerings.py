"""Every forward ``aqcf`` op as plain PyTorch ops: its decomposition, for exporters that need standard ops.

``torch.onnx.export(model, args)`` (the dynamo exporter, torch's default) captures a model with
``torch.export`` and then decomposes every op ONNX has no function for through
``torch._decomp.decomposition_table``; an op with no entry there fails the export ("No ONNX function
found for aqcf.qconv"). :func:`register` puts these lowerings in that table when ``aqcf_kernels.ops`` is
imported, so a model built from the layers exports to ONNX as torch.nn's layers do, with no call to
this package (``aqcf-export`` and :func:`aqcf_kernels.pipeline.export.lower_custom_ops` pass the same
functions to ``ExportedProgram.run_decompositions`` explicitly).

What else reads that table, checked on torch 2.13:

* FakeTensorMode, when it computes an op's output shapes with symbolic sizes (``torch.compile`` with
  dynamic shapes, ``torch.export`` with ``dynamic_shapes``), prefers a table entry to the op's fake
  implementation. A lowering there would add its own guards (the recurrent lowering's Python loop fixes
  the sequence length), so each entry gives the op's fake implementation back while FakeTensorMode alone
  is asking (:func:`_propagating_metadata`), and the lowering to a tracer (its proxy mode is active:
  ``run_decompositions``, the ONNX exporter's decomposition step) and to anyone else;
* torch's own default decompositions (``torch.export.default_decompositions``, Inductor's) are explicit
  lists of aten ops, so neither ``torch.compile`` nor a plain ``torch.export`` lowers the ops (they keep
  their kernels);
* DTensor's sharding propagation may run an op's decomposition on meta tensors to place its outputs.

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
import torch._decomp
from torch import Tensor

__all__ = ["lowerings", "register"]


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
    return y, running_mean.reshape(1, 4 * cq).clone(), running_var.reshape(1, cq).clone()


def _attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    # What scaled_dot_product_attention computes, spelled out so ONNX gets MatMul/Softmax/MatMul.
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    return torch.matmul(torch.softmax(scores, dim=-1), v), torch.logsumexp(scores.float(), dim=-1)


def cross_attention_lowering(q_a, k_a, v_a, q_b, k_b, v_b, scale):
    """``aqcf::cross_attention``: stream a attends to b and b to a, with each direction's log-sum-exp."""
    from ..backends.base import lse_dtype

    out_a, lse_a = _attention(q_a, k_b, v_b, scale)
    out_b, lse_b = _attention(q_b, k_a, v_a, scale)
    return out_a, out_b, lse_a.to(lse_dtype(q_a.dtype)), lse_b.to(lse_dtype(q_b.dtype))


def gated_residual_lowering(f, o, gate_logits, alpha):
    """``aqcf::gated_residual``: ``f + α σ(g) o``."""
    return f + alpha * torch.sigmoid(gate_logits) * o


def rnn_sequence_lowering(proj, h0, c0, weight, mode, nonlinearity, negative_slope, reverse):
    """``aqcf::rnn_sequence``: the composite cells over the sequence, unrolled for a fixed length
    (:func:`.rnn_cell._composite`), one ``scan`` for a symbolic one (:func:`.rnn_cell._scanned`): unrolling
    would fix a symbolic length to the example's without a word (a decomposition's guards are not checked)."""
    from .rnn_cell import _composite, _scanned

    if isinstance(proj.shape[0], torch.SymInt):
        return _scanned(proj, h0, c0, weight, mode, nonlinearity, negative_slope, reverse)
    return _composite(proj, h0, c0, weight, mode, nonlinearity, negative_slope, reverse, keep_saved=True)


def _entries() -> dict[Any, tuple[Callable[..., Any], Callable[..., Any]]]:
    """``aqcf`` op overload -> (its lowering, its fake implementation)."""
    from .attention import _cross_attention_fake, _gated_residual_fake
    from .conv import _qconv_fake
    from .norm import _qnorm_fake
    from .rnn_cell import _rnn_sequence_fake

    ops = torch.ops.aqcf
    return {
        ops.qconv.default: (qconv_lowering, _qconv_fake),
        ops.qnorm.default: (qnorm_lowering, _qnorm_fake),
        ops.cross_attention.default: (cross_attention_lowering, _cross_attention_fake),
        ops.gated_residual.default: (gated_residual_lowering, _gated_residual_fake),
        ops.rnn_sequence.default: (rnn_sequence_lowering, _rnn_sequence_fake),
    }


def lowerings() -> dict[Any, Callable[..., Any]]:
    """``aqcf`` op overload -> its plain-PyTorch lowering (a decomposition for ``run_decompositions``)."""
    return {op: lowering for op, (lowering, _) in _entries().items()}


def _propagating_metadata() -> bool:
    """Whether FakeTensorMode is computing an op's outputs' metadata (it has entered itself to call a table
    entry), rather than a tracer decomposing the op (whose proxy mode is then on the mode stack)."""
    key = torch._C._TorchDispatchModeKey
    return torch._C._get_dispatch_mode(key.FAKE) is not None and torch._C._get_dispatch_mode(key.PROXY) is None


def _table_entry(lowering: Callable[..., Any], fake: Callable[..., Any]) -> Callable[..., Any]:
    def decomposition(*args: Any, **kwargs: Any) -> Any:
        return (fake if _propagating_metadata() else lowering)(*args, **kwargs)

    decomposition.__name__ = decomposition.__qualname__ = lowering.__name__
    return decomposition


def register(table: dict[Any, Callable[..., Any]] | None = None) -> bool:
    """Put :func:`lowerings` in ``table`` (default: torch's global decomposition table, what
    ``torch.onnx.export`` decomposes with), each behind :func:`_table_entry`; whether it did. An entry already
    there is left alone: someone registered their own on purpose. Nothing is registered on a torch without
    the table or the dispatch-mode queries the entries need (private APIs): the package still imports, and
    the explicit paths (``aqcf-export``) still lower."""
    table = getattr(torch._decomp, "decomposition_table", None) if table is None else table
    modes = getattr(torch._C, "_TorchDispatchModeKey", None)
    if table is None or not hasattr(torch._C, "_get_dispatch_mode") or not hasattr(modes, "PROXY"):
        return False
    for op, (lowering, fake) in _entries().items():
        table.setdefault(op, _table_entry(lowering, fake))
    return True
