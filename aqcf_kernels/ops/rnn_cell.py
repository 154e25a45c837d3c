"""The fused recurrent op: ``aqcf::rnn_sequence``, one direction of a recurrent layer over a whole sequence.

``rnn_sequence(proj, h0, c0, weight, mode, nonlinearity, negative_slope, reverse) -> (output, cells, saved)``
runs ``gates_t = proj_t + h_{t−1} Wᵀ`` and the cell of ``mode`` for every step (from the last to the
first with ``reverse``):

* ``proj`` ``(T, B, G·H)``: the input projection of every step (biases and, for the LiGRU, the batch
  norm already applied); ``weight`` ``(4, G·H/4, H/4)``: the quaternion recurrent weight, ``W ⊗ h`` over
  the blocked last dim; ``h0`` ``(B, H)``; ``c0`` ``(B, H)``, the LSTM only;
* ``mode`` 'rnn' (``h = act(gates)``, act tanh or relu), 'lstm' (gates ``[i | f | o | g]``) or 'ligru'
  (gates ``[a | z]``, ``h = σ(z) h + (1 − σ(z)) act(a)``, act relu, leaky_relu or tanh): the cells of
  :func:`rnn_cell`, :func:`lstm_cell` and :func:`ligru_cell`, the composite reference;
* ``output`` ``(T, B, H)`` every ``h_t``; ``cells`` ``(T, B, H)`` every ``c_t`` (LSTM; else empty);
  ``saved``: what the backward reads (not differentiable).

On CPU float32/float64 with the compiled extension it runs csrc/cpu/rnn_cell.cpp: per step one GEMM of
the stacked components of ``h`` with the four weight components (reading the quaternion weight, 1/4 of
the expanded one: at batch 8 a step is bound by reading the weight) and one fused element-wise pass
(Hamilton signs, gates, cell); a backward through time in C++ that keeps the gates' gradients (they ARE
the gradient of ``proj``) and forms the weight gradient in one GEMM at the end.
On CUDA (float16/bfloat16/float32/float64, every tensor of one dtype) with triton importable it runs
backends/triton/rnn_cell.py: per step the recurrent GEMM on cuBLAS and ONE Triton launch for the
``proj`` add and the whole cell (math in float32, float64 for float64), the same backward through time
with one Triton launch per step for the gates' gradient. Those kernels also serve CPU tensors under
``TRITON_INTERPRET=1`` when the ``triton`` backend is forced (``AQCF_BACKEND=triton``), to prove them
without a GPU (the norm's rule: :func:`aqcf_kernels.backends.triton.common.serves_fused`).
Elsewhere (``AQCF_NO_EXTENSION=1``, other devices or dtypes) the same op runs the composite cells in a
Python loop and differentiates them with autograd. When the gradient must itself be differentiable
(``create_graph=True``) the backward differentiates the composite loop too.

Why a whole sequence per call: per step the GEMM has only the batch as rows, so dispatching a composite
cell (6-9 ops) and its autograd nodes costs as much as the arithmetic, and autograd's backward
computes and adds one full ``(G·H, H)`` weight gradient per step (see the module's measurements in
nn/recurrent.py's docstring).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backends._extension import _C
from ..quaternion import HAMILTON
from .func import transforms_active

GATES = {"rnn": 1, "lstm": 4, "ligru": 2}


# ---------------------------------------------------------------------------------------------
# The composite cells (the reference of the fused kernel; the layers use them for packed sequences)
# ---------------------------------------------------------------------------------------------


def rnn_cell(gates: Tensor, nonlinearity: str) -> Tensor:
    """Elman cell: ``h_t = act(gates)``, ``gates = W_ih ⊗ x_t + b_ih + W_hh ⊗ h_{t−1} + b_hh``."""
    return torch.tanh(gates) if nonlinearity == "tanh" else torch.relu(gates)


def lstm_cell(gates: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """LSTM cell on gates ``[i | f | o | g]`` (speechbrain's order): returns ``(h_t, c_t)``.

    ``c_t = σ(f) c_{t−1} + σ(i) tanh(g)``, ``h_t = σ(o) tanh(c_t)``, element-wise on every real
    component (as speechbrain's ``QLSTM``). One sigmoid call serves the three gates.
    """
    hidden = gates.shape[-1] // 4
    i, f, o = torch.sigmoid(gates[..., : 3 * hidden]).chunk(3, dim=-1)
    c = torch.addcmul(f * c, i, torch.tanh(gates[..., 3 * hidden :]))
    return o * torch.tanh(c), c


def _ligru_candidate(a: Tensor, nonlinearity: str, negative_slope: float) -> Tensor:
    if nonlinearity == "relu":
        return torch.relu(a)
    if nonlinearity == "leaky_relu":
        return F.leaky_relu(a, negative_slope)
    return torch.tanh(a)


def ligru_cell(gates: Tensor, h: Tensor, nonlinearity: str, negative_slope: float) -> Tensor:
    """Light GRU cell on gates ``[a | z]``: ``h_t = z h_{t−1} + (1 − z) act(a)`` with ``z = σ(z)``."""
    a, z = gates.chunk(2, dim=-1)
    candidate = _ligru_candidate(a, nonlinearity, negative_slope)
    return torch.lerp(candidate, h, torch.sigmoid(z))  # candidate + z (h − candidate)


# ---------------------------------------------------------------------------------------------
# The op
# ---------------------------------------------------------------------------------------------


def expanded_weight(weight: Tensor) -> Tensor:
    """The real ``(4A, 4B)`` matrix of a ``(4, A, B)`` quaternion weight: block ``(c, a)`` is ``±W_p``
    (:data:`aqcf_kernels.quaternion.HAMILTON`), so ``h @ E.T`` is ``W ⊗ h`` over the last dim.

    Built with ``torch.cat`` (its backward is slicing, and it traces under ``torch.compile`` without the
    cached sign table of :func:`~aqcf_kernels.quaternion.expand_weight_grouped`)."""
    rows = [torch.cat([weight[p] if sign > 0 else -weight[p] for p, sign in row], dim=1) for row in HAMILTON]
    return torch.cat(rows, dim=0)


def _cpp_serves(proj: Tensor) -> bool:
    return _C is not None and proj.device.type == "cpu" and proj.dtype in (torch.float32, torch.float64)


def _triton_serves(*tensors: Tensor | None) -> bool:
    """Whether the Triton kernels (backends/triton/rnn_cell.py) take this call: the device rule of every
    fused op (:func:`aqcf_kernels.backends.triton.common.serves_fused`: CUDA whenever triton imports, CPU
    only under ``TRITON_INTERPRET=1`` with the ``triton`` backend forced), and one dtype and device for all
    the tensors."""
    from ..backends.triton import common

    if not common.serves_fused(tensors[0]):
        return False
    from ..backends.triton import rnn_cell as triton_rnn

    return triton_rnn.serves(*tensors)


def available(proj: Tensor, *others: Tensor | None) -> bool:
    """Whether a fused kernel (Triton, or the compiled C++ one on CPU) serves ``rnn_sequence`` for this
    input (else the composite loop does: also under a torch.func transform, :mod:`.func`); ``others`` (h0,
    c0, weight), if given, must match ``proj``."""
    return not transforms_active() and (_triton_serves(proj, *others) or _cpp_serves(proj))


def _step(
    proj_t: Tensor,
    h: Tensor,
    c: Tensor | None,
    weight_t: Tensor,
    mode: str,
    nonlinearity: str,
    negative_slope: float,
    keep_saved: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """One step of the composite cells: ``(h, c, saved)``, ``c`` None but for the LSTM, ``saved`` None unless
    ``keep_saved`` and the mode keeps anything for its backward (the kernel's ``saved`` of that step)."""
    gates = torch.addmm(proj_t, h, weight_t)
    saved = None
    if mode == "lstm":
        h, c = lstm_cell(gates, c)
        if keep_saved:
            hidden = h.shape[-1]
            saved = torch.cat([torch.sigmoid(gates[:, : 3 * hidden]), torch.tanh(gates[:, 3 * hidden :])], -1)
    elif mode == "ligru":
        h = ligru_cell(gates, h, nonlinearity, negative_slope)
        if keep_saved:
            a, z = gates.chunk(2, dim=-1)
            saved = torch.cat([a, torch.sigmoid(z)], -1)
    else:
        h = rnn_cell(gates, nonlinearity)
    return h, c, saved


def _composite(
    proj: Tensor,
    h0: Tensor,
    c0: Tensor | None,
    weight: Tensor,
    mode: str,
    nonlinearity: str,
    negative_slope: float,
    reverse: bool,
    keep_saved: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """The op by the composite cells, differentiable: ``(output, cells, saved)`` as the kernel's."""
    steps = proj.shape[0]
    weight_t = expanded_weight(weight).t()
    h, c = h0, c0
    outputs: list[Tensor] = [h0] * steps
    cells: list[Tensor] = [h0] * steps
    saved: list[Tensor] = [h0] * steps
    for t in range(steps - 1, -1, -1) if reverse else range(steps):
        h, c, saved_t = _step(proj[t], h, c, weight_t, mode, nonlinearity, negative_slope, keep_saved)
        outputs[t] = h
        if c is not None:
            cells[t] = c
        if saved_t is not None:
            saved[t] = saved_t

    def stacked(steps_: list[Tensor], row: torch.Size) -> Tensor:
        return torch.stack(steps_) if steps else proj.new_empty(0, *row)  # (no steps: the kernel's (0, ...) shape)

    empty = proj.new_empty(0)
    return (
        stacked(outputs, h0.shape),
        stacked(cells, h0.shape) if mode == "lstm" else empty.clone(),
        stacked(saved, proj.shape[1:]) if mode != "rnn" and keep_saved else empty.clone(),
    )


def _scanned(
    proj: Tensor,
    h0: Tensor,
    c0: Tensor | None,
    weight: Tensor,
    mode: str,
    nonlinearity: str,
    negative_slope: float,
    reverse: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_composite` (with ``saved``) as one ``scan`` over the steps, for a tracer: the traced graph keeps
    the sequence length symbolic (ONNX gets a ``Scan``), where the loop would be unrolled over the example's.

    Calls torch's ``scan`` operator itself, not ``torch._higher_order_ops.scan.scan``: that wrapper traces
    through ``torch.compile``, whose state across calls made a second export in one process, of another
    recurrent mode, lose the metadata of the body's inputs ("Node.meta arg3_1 is missing val field", torch
    2.13). The operator under a tracer traces the body directly; the weight is an explicit input of the body."""
    from torch._higher_order_ops.scan import scan_op

    lstm = mode == "lstm"

    def body(*args: Tensor) -> list[Tensor]:  # (h[, c], proj_t, weight_t) -> [h[, c], h[, c], saved]
        c = args[1] if lstm else None
        h, c, saved = _step(args[-2], args[0], c, args[-1], mode, nonlinearity, negative_slope, keep_saved=True)
        carry = [h, c] if lstm else [h]
        out = [t.clone() for t in carry] + ([saved] if saved is not None else [])
        return carry + out

    # copies: scan refuses inputs that alias each other, and a layer's h0 and c0 may be views of one tensor
    init = [h0.clone(), c0.clone()] if lstm else [h0]
    flat = scan_op(body, init, [proj.flip(0) if reverse else proj], (expanded_weight(weight).t(),))
    ys = [y.flip(0) if reverse else y for y in flat[len(init) :]]
    empty = proj.new_empty(0)
    return ys[0], (ys[1] if lstm else empty.clone()), (ys[-1] if mode != "rnn" else empty.clone())


def _check(proj: Tensor, h0: Tensor, c0: Tensor | None, weight: Tensor, mode: str) -> None:
    if mode not in GATES:
        raise ValueError(f"rnn_sequence: mode must be one of {sorted(GATES)}, got {mode!r}")
    steps, batch, gates_h = proj.shape
    hidden = h0.shape[-1]
    if gates_h != GATES[mode] * hidden or tuple(h0.shape) != (batch, hidden):
        raise ValueError(f"rnn_sequence: proj {tuple(proj.shape)} and h0 {tuple(h0.shape)} disagree for {mode!r}")
    if hidden % 4 or tuple(weight.shape) != (4, gates_h // 4, hidden // 4):
        raise ValueError(f"rnn_sequence: weight must be {(4, gates_h // 4, hidden // 4)}, got {tuple(weight.shape)}")
    if (mode == "lstm") != (c0 is not None):
        raise ValueError("rnn_sequence: c0 is given for (and only for) the LSTM")


@torch.library.custom_op("aqcf::rnn_sequence", mutates_args=())
def rnn_sequence(
    proj: Tensor,
    h0: Tensor,
    c0: Tensor | None,
    weight: Tensor,
    mode: str,
    nonlinearity: str,
    negative_slope: float,
    reverse: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(output, cells, saved)``: see the module docstring."""
    _check(proj, h0, c0, weight, mode)
    if _triton_serves(proj, h0, c0, weight):
        from ..backends.triton import rnn_cell as triton_rnn

        return triton_rnn.forward(proj, h0, c0, weight, mode, nonlinearity, negative_slope, reverse)
    if _cpp_serves(proj):
        return torch.ops.aqcf._rnn_sequence_forward_cpu(
            proj, h0, c0, weight, mode, nonlinearity, negative_slope, reverse
        )
    with torch.no_grad():
        return _composite(proj, h0, c0, weight, mode, nonlinearity, negative_slope, reverse, keep_saved=True)


@rnn_sequence.register_fake
def _rnn_sequence_fake(proj, h0, c0, weight, mode, nonlinearity, negative_slope, reverse):
    steps, batch, gates_h = proj.shape
    hidden = h0.shape[-1]
    output = proj.new_empty(steps, batch, hidden)
    cells = proj.new_empty(steps, batch, hidden) if mode == "lstm" else proj.new_empty(0)
    saved = proj.new_empty(steps, batch, gates_h) if mode != "rnn" else proj.new_empty(0)
    return output, cells, saved


@torch.library.custom_op("aqcf::rnn_sequence_backward", mutates_args=())
def rnn_sequence_backward(
    grad_output: Tensor | None,
    grad_cells: Tensor | None,
    output: Tensor,
    cells: Tensor,
    saved: Tensor,
    h0: Tensor,
    c0: Tensor | None,
    weight: Tensor,
    mode: str,
    nonlinearity: str,
    negative_slope: float,
    reverse: bool,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of ``rnn_sequence`` w.r.t. proj, h0, c0 and weight (empty tensors where not needed).

    The fused kernels only (Triton, or the compiled one on CPU): the composite path differentiates the
    composite loop instead (it needs ``proj``, which this op does not take)."""
    if _triton_serves(output, saved if saved.numel() else None, h0, c0, weight):
        from ..backends.triton import rnn_cell as triton_rnn

        return triton_rnn.backward(
            grad_output, grad_cells, output, cells, saved, h0, c0, weight, mode, nonlinearity, negative_slope,
            reverse, needs,
        )  # fmt: skip
    if not _cpp_serves(output):
        raise NotImplementedError(
            "aqcf::rnn_sequence_backward: the Triton kernels (CUDA) or the compiled extension (CPU float32/64) only"
        )
    return torch.ops.aqcf._rnn_sequence_backward_cpu(
        grad_output, grad_cells, output, cells, saved, h0, c0, weight, mode, nonlinearity, negative_slope, reverse,
        needs,
    )  # fmt: skip


@rnn_sequence_backward.register_fake
def _(grad_output, grad_cells, output, cells, saved, h0, c0, weight, mode, nonlinearity, slope, reverse, needs):
    steps, batch, hidden = output.shape
    empty = output.new_empty(0)
    return (
        output.new_empty(steps, batch, GATES[mode] * hidden) if needs[0] else empty,
        output.new_empty(batch, hidden) if needs[1] else empty.clone(),
        output.new_empty(batch, hidden) if needs[2] and c0 is not None else empty.clone(),
        torch.empty_like(weight, memory_format=torch.contiguous_format) if needs[3] else empty.clone(),
    )


def _setup_context(ctx, inputs, output):
    proj, h0, c0, weight, mode, nonlinearity, negative_slope, reverse = inputs
    out, cells, saved = output
    ctx.mark_non_differentiable(saved)
    ctx.save_for_backward(proj, h0, c0, weight, out, cells, saved)
    ctx.options = (mode, nonlinearity, negative_slope, reverse)


def _backward(ctx, grad_output, grad_cells, _grad_saved):
    proj, h0, c0, weight, out, cells, saved = ctx.saved_tensors
    needs = [ctx.needs_input_grad[i] for i in range(4)]
    needs[2] = needs[2] and c0 is not None
    if torch.is_grad_enabled() or not available(proj, h0, c0, weight):
        # create_graph=True (the gradient must be differentiable) or no kernel: differentiate the loop
        grads = _composite_backward(grad_output, grad_cells, proj, h0, c0, weight, ctx.options, needs)
    else:
        grads = torch.ops.aqcf.rnn_sequence_backward(
            grad_output, grad_cells, out, cells, saved, h0, c0, weight, *ctx.options, needs
        )
    proj_grad, h0_grad, c0_grad, weight_grad = [g if need else None for g, need in zip(grads, needs, strict=True)]
    return proj_grad, h0_grad, c0_grad, weight_grad, None, None, None, None


def _composite_backward(grad_output, grad_cells, proj, h0, c0, weight, options, needs):
    """The gradients through the composite loop, recomputed (double backward works through it)."""
    inputs = [
        t.detach().requires_grad_() if need and not t.requires_grad else t
        for t, need in zip((proj, h0, c0, weight), needs, strict=True)
    ]
    wrt = [t for t, need in zip(inputs, needs, strict=True) if need]
    if not wrt:
        return None, None, None, None
    with torch.enable_grad():
        out, cells, _ = _composite(*inputs, *options, keep_saved=False)
        outputs, grads = [out], [grad_output]
        if cells.numel() and grad_cells is not None:
            outputs.append(cells)
            grads.append(grad_cells)
        found = iter(torch.autograd.grad(outputs, wrt, grads, create_graph=torch.is_grad_enabled(), allow_unused=True))
    result = []
    for t, need in zip(inputs, needs, strict=True):
        g = next(found) if need else None
        result.append(torch.zeros_like(t) if need and g is None else g)
    return tuple(result)


rnn_sequence.register_autograd(_backward, setup_context=_setup_context)
