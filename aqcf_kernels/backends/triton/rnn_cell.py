"""Triton kernels and launchers of the fused recurrence ``aqcf::rnn_sequence`` (one direction of a
quaternion RNN / LSTM / LiGRU over a whole sequence) and of its backward through time.

The CUDA implementation of :mod:`aqcf_kernels.ops.rnn_cell` (and, under ``TRITON_INTERPRET=1`` with the
``triton`` backend forced, a CPU one that proves the kernels without a GPU). Same semantics as the C++
CPU kernel (csrc/cpu/rnn_cell.cpp) and the composite loop (``ops.rnn_cell._composite``):

* forward, per step: the recurrent GEMM ``h_{t−1} Eᵀ`` on cuBLAS (``torch.mm`` into a ``(B, G·H)``
  scratch; ``E`` the expanded ``(G·H, H)`` real weight, built once per call) and ONE Triton launch
  that adds ``proj_t`` (read through its strides: a transposed or sliced projection is not copied),
  applies the cell of the mode and writes ``h_t`` into ``output[t]``, ``c_t`` into ``cells[t]`` (LSTM)
  and what the backward reads into ``saved[t]`` (LSTM ``[σ(i) | σ(f) | σ(o) | tanh(g)]``, LiGRU
  ``[a | σ(z)]``, as the C++ kernel and the composite define it);
* backward, per step from the last one processed to the first: ONE Triton launch turns the gradient
  reaching ``h_t`` (+ ``grad_output[t]``; for the LSTM the carried gradient of ``c_t`` + ``grad_cells[t]``)
  into the gates' gradient, written straight into the gradient of ``proj`` (they are the same tensor),
  carries ``dc`` to ``c_{t−1}`` (LSTM) and leaves the direct part ``z · dh`` of ``h_{t−1}``'s gradient
  (LiGRU); then ``torch.mm``/``addmm_`` adds the GEMM part ``g_gates E``. The weight gradient is one
  GEMM over every step at the end, ``Σ_t g_gatesᵀ h_{t−1}``, folded onto the four quaternion components
  (:func:`aqcf_kernels.quaternion.fold_weight_grad_grouped`, the adjoint of the expansion used here).

Why the GEMM stays on cuBLAS: its only row count is the batch (8-64), so a Triton ``tl.dot`` tile
would be mostly padding, and cuBLAS picks a split-K kernel for such skinny products; what fusion
removes is the composite cell's 6-9 element-wise launches and autograd nodes per step (two launches
per step remain, the GEMM and the cell).

Arithmetic is float32 for float16/bfloat16/float32 inputs (loads upcast at once: bf16 arithmetic is
wrong in the interpreter) and float64 for float64; stores cast back to the tensors' dtype. The LSTM's
carried ``dc`` stays in that accumulation dtype between steps. ``tanh`` is ``(1 − e)/(1 + e)`` with
``e = exp(−2|x|)`` (no ``tanh`` in ``tl`` the interpreter runs; libdevice's is not interpretable) and an
odd Taylor polynomial near 0, where that form cancels (as csrc/cpu/rnn_cell.cpp does). The LiGRU's
``negative_slope`` reaches the kernels as two float32 scalars, its float32 rounding and the rest
(:func:`split_slope`; triton types Python floats as float32), added in the accumulation dtype: float64 runs see
the slope to 2^-48, where one float32 scalar made the backward's ``act'(a)`` 2e-8 off while the forward, under
the interpreter, multiplied by the exact Python float.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl
from torch import Tensor

from ...quaternion import expand_weight_grouped, fold_weight_grad_grouped
from . import common

#: gates per mode, and the codes the kernels take
GATES = {"rnn": 1, "lstm": 4, "ligru": 2}
MODE_CODES = {"rnn": 0, "lstm": 1, "ligru": 2}
ACTIVATION_CODES = {"tanh": 0, "relu": 1, "leaky_relu": 2}
#: the input dtypes the kernels serve, and the dtype they compute in
ACC_DTYPES = {torch.float32: torch.float32, torch.float16: torch.float32, torch.bfloat16: torch.float32}
ACC_DTYPES[torch.float64] = torch.float64

# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------


@triton.jit
def _step_tile(B, H, MODE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """This program's ``(BLOCK_B, BLOCK_H)`` tile of (batch, hidden unit), its mask, and the gates' row
    length ``G·H`` of ``MODE`` (program (h block, b block), in the forward and the backward alike)."""
    offs_j = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask = (offs_b[:, None] < B) & (offs_j[None, :] < H)
    if MODE == 1:
        GH = 4 * H
    elif MODE == 2:
        GH = 2 * H
    else:
        GH = H
    return offs_b, offs_j, mask, GH


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x, SMALL: tl.constexpr):
    """tanh: ``(1 − e)/(1 + e)``, ``e = e^{−2|x|}``, and below ``|x| = SMALL`` (where ``1 − e`` loses
    digits) the odd Taylor polynomial to x⁹: SMALL = 0.25 for float32 (first omitted term < 1e-9
    relative), 0.02 for float64 (< 1e-19)."""
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    big = (1.0 - e) / (1.0 + e)
    x2 = ax * ax
    small = ax * (
        1.0
        + x2
        * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * (-0.05396825396825397 + x2 * 0.021869488536155203)))
    )
    t = tl.where(ax < SMALL, small, big)
    return tl.where(x < 0, -t, t)


@triton.jit
def _activate(a, ACT: tl.constexpr, negative_slope, SMALL: tl.constexpr):
    """The cell's nonlinearity: 0 tanh, 1 ReLU, 2 LeakyReLU."""
    if ACT == 0:
        out = _tanh(a, SMALL)
    elif ACT == 1:
        out = tl.maximum(a, 0.0)
    else:
        out = tl.where(a > 0, a, a * negative_slope)
    return out


@triton.jit
def _activation_slope(a, v, ACT: tl.constexpr, negative_slope):
    """``act'(a)`` from the pre-activation ``a`` and ``v = act(a)`` (torch's: ReLU's derivative at 0 is 0)."""
    if ACT == 0:
        out = 1.0 - v * v
    elif ACT == 1:
        out = tl.where(a > 0, 1.0, 0.0)
    else:
        out = tl.where(a > 0, 1.0, negative_slope)
    return out


@triton.jit
def _gate(p, m, k, H, stride_pj, mask, ACC: tl.constexpr):
    """Pre-activation of gate ``k``: ``proj_t + (h_{t−1} Eᵀ)`` over the tile (``p``/``m`` point at gate 0)."""
    pre = tl.load(p + k * H * stride_pj, mask=mask, other=0.0).to(ACC)
    return pre + tl.load(m + k * H, mask=mask, other=0.0).to(ACC)


@triton.jit
def rnn_cell_fwd_kernel(
    proj_ptr,  # proj[t]: (B, G·H), strides (stride_pb, stride_pj)
    mm_ptr,  # (B, G·H) contiguous: h_{t−1} Eᵀ
    h_prev_ptr,  # (B, H) contiguous: h_{t−1} (LiGRU)
    c_prev_ptr,  # (B, H) contiguous: c_{t−1} (LSTM)
    h_ptr,  # (B, H) contiguous: output[t]
    c_ptr,  # (B, H) contiguous: cells[t] (LSTM)
    saved_ptr,  # (B, G·H) contiguous: saved[t] (LSTM, LiGRU)
    B,
    H,
    stride_pb,
    stride_pj,
    slope_hi,  # negative_slope = slope_hi + slope_lo (split_slope)
    slope_lo,
    MODE: tl.constexpr,  # 0 rnn, 1 lstm, 2 ligru
    ACT: tl.constexpr,
    ACC: tl.constexpr,
    SMALL: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """One forward step of the cell for a ``(BLOCK_B, BLOCK_H)`` tile of hidden units; program (h block, b block)."""
    negative_slope = tl.cast(slope_hi, ACC) + tl.cast(slope_lo, ACC)
    offs_b, offs_j, mask, GH = _step_tile(B, H, MODE, BLOCK_B, BLOCK_H)
    p = proj_ptr + offs_b[:, None] * stride_pb + offs_j[None, :] * stride_pj
    gate_offs = offs_b[:, None] * GH + offs_j[None, :]
    m = mm_ptr + gate_offs
    s = saved_ptr + gate_offs
    hc = offs_b[:, None] * H + offs_j[None, :]
    if MODE == 1:
        i = _sigmoid(_gate(p, m, 0, H, stride_pj, mask, ACC))
        f = _sigmoid(_gate(p, m, 1, H, stride_pj, mask, ACC))
        o = _sigmoid(_gate(p, m, 2, H, stride_pj, mask, ACC))
        g = _tanh(_gate(p, m, 3, H, stride_pj, mask, ACC), SMALL)
        c = f * tl.load(c_prev_ptr + hc, mask=mask, other=0.0).to(ACC) + i * g
        out_ty = saved_ptr.dtype.element_ty
        tl.store(s, i.to(out_ty), mask=mask)
        tl.store(s + H, f.to(out_ty), mask=mask)
        tl.store(s + 2 * H, o.to(out_ty), mask=mask)
        tl.store(s + 3 * H, g.to(out_ty), mask=mask)
        tl.store(c_ptr + hc, c.to(c_ptr.dtype.element_ty), mask=mask)
        h = o * _tanh(c, SMALL)
    elif MODE == 2:
        a = _gate(p, m, 0, H, stride_pj, mask, ACC)
        z = _sigmoid(_gate(p, m, 1, H, stride_pj, mask, ACC))
        cand = _activate(a, ACT, negative_slope, SMALL)
        h_prev = tl.load(h_prev_ptr + hc, mask=mask, other=0.0).to(ACC)
        tl.store(s, a.to(saved_ptr.dtype.element_ty), mask=mask)
        tl.store(s + H, z.to(saved_ptr.dtype.element_ty), mask=mask)
        h = cand + z * (h_prev - cand)  # torch.lerp(cand, h_prev, z), as the composite cell
    else:
        h = _activate(_gate(p, m, 0, H, stride_pj, mask, ACC), ACT, negative_slope, SMALL)
    tl.store(h_ptr + hc, h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def rnn_cell_bwd_kernel(
    go_ptr,  # (B, H) contiguous: grad_output[t] (HAS_GO)
    gc_ptr,  # (B, H) contiguous: grad_cells[t] (HAS_GC)
    dh_ptr,  # (B, H): in, the gradient reaching h_t through the recurrence; out (LiGRU) z · (that + go)
    dc_ptr,  # (B, H), accumulation dtype (LSTM): in, the gradient of c_t through the recurrence; out, c_{t−1}'s
    saved_ptr,  # (B, G·H): saved[t]
    h_ptr,  # (B, H): output[t] (RNN)
    h_prev_ptr,  # (B, H): h_{t−1} (LiGRU)
    c_prev_ptr,  # (B, H): c_{t−1} (LSTM)
    c_ptr,  # (B, H): cells[t] (LSTM)
    dg_ptr,  # (B, G·H): the gates' gradient = the gradient of proj[t]
    B,
    H,
    slope_hi,  # negative_slope = slope_hi + slope_lo (split_slope)
    slope_lo,
    MODE: tl.constexpr,
    ACT: tl.constexpr,
    HAS_GO: tl.constexpr,
    HAS_GC: tl.constexpr,
    ACC: tl.constexpr,
    SMALL: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """One backward step of the cell for a tile of hidden units; program (h block, b block) as the forward's."""
    negative_slope = tl.cast(slope_hi, ACC) + tl.cast(slope_lo, ACC)
    offs_b, offs_j, mask, GH = _step_tile(B, H, MODE, BLOCK_B, BLOCK_H)
    hc = offs_b[:, None] * H + offs_j[None, :]
    gate_offs = offs_b[:, None] * GH + offs_j[None, :]
    s = saved_ptr + gate_offs
    dg = dg_ptr + gate_offs
    out_ty = dg_ptr.dtype.element_ty
    dht = tl.load(dh_ptr + hc, mask=mask, other=0.0).to(ACC)
    if HAS_GO:
        dht += tl.load(go_ptr + hc, mask=mask, other=0.0).to(ACC)
    if MODE == 1:
        i = tl.load(s, mask=mask, other=0.0).to(ACC)
        f = tl.load(s + H, mask=mask, other=0.0).to(ACC)
        o = tl.load(s + 2 * H, mask=mask, other=0.0).to(ACC)
        g = tl.load(s + 3 * H, mask=mask, other=0.0).to(ACC)
        c_prev = tl.load(c_prev_ptr + hc, mask=mask, other=0.0).to(ACC)
        tc = _tanh(tl.load(c_ptr + hc, mask=mask, other=0.0).to(ACC), SMALL)
        dct = tl.load(dc_ptr + hc, mask=mask, other=0.0).to(ACC)
        if HAS_GC:
            dct += tl.load(gc_ptr + hc, mask=mask, other=0.0).to(ACC)
        dct += dht * o * (1.0 - tc * tc)
        tl.store(dg, (dct * g * i * (1.0 - i)).to(out_ty), mask=mask)
        tl.store(dg + H, (dct * c_prev * f * (1.0 - f)).to(out_ty), mask=mask)
        tl.store(dg + 2 * H, (dht * tc * o * (1.0 - o)).to(out_ty), mask=mask)
        tl.store(dg + 3 * H, (dct * i * (1.0 - g * g)).to(out_ty), mask=mask)
        tl.store(dc_ptr + hc, (dct * f).to(dc_ptr.dtype.element_ty), mask=mask)
    elif MODE == 2:
        a = tl.load(s, mask=mask, other=0.0).to(ACC)
        z = tl.load(s + H, mask=mask, other=0.0).to(ACC)
        cand = _activate(a, ACT, negative_slope, SMALL)
        h_prev = tl.load(h_prev_ptr + hc, mask=mask, other=0.0).to(ACC)
        tl.store(dg, (dht * (1.0 - z) * _activation_slope(a, cand, ACT, negative_slope)).to(out_ty), mask=mask)
        tl.store(dg + H, (dht * (h_prev - cand) * z * (1.0 - z)).to(out_ty), mask=mask)
        # the direct part of h_{t−1}'s gradient; the launcher adds the GEMM part g_gates E
        tl.store(dh_ptr + hc, (dht * z).to(dh_ptr.dtype.element_ty), mask=mask)
    else:
        # act'(a) from h = act(a): tanh' = 1 − h², and a > 0 exactly where relu(a) = h > 0
        h = tl.load(h_ptr + hc, mask=mask, other=0.0).to(ACC)
        tl.store(dg, (dht * _activation_slope(h, h, ACT, negative_slope)).to(out_ty), mask=mask)


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------

#: a tile of at most 512 hidden units on a GPU (4 warps x 32 threads x 4 values: 16-byte float32 accesses
#: along H, and the LSTM's ~25 live values per element stay in registers); a step of batch 8 at 512
#: hidden is 8 such tiles: the step is latency bound, more programs would not shorten it
GPU_TILE, GPU_BLOCK_H, GPU_WARPS = 512, 128, 4
#: the interpreter pays per program: small tiles still, so the tests' odd shapes cross tile edges in both dims
INTERPRETER_BLOCK_B, INTERPRETER_BLOCK_H = 2, 8


def _interpret() -> bool:
    from . import common

    return common.INTERPRET


def serves(*tensors: Tensor | None) -> bool:
    """Whether the kernels take these tensors (dtype, one device and dtype for all, a step's values within
    32-bit offsets); which DEVICE may be served is :func:`aqcf_kernels.backends.triton.common.serves_fused`'s
    rule, the caller's to apply. A sequence whose step (batch x gates) reaches 2**31 values goes to the
    composite loop: the kernels index a step in int32."""
    first = tensors[0]
    if first.dtype not in ACC_DTYPES:
        return False
    if any(t is not None and t.dim() == 3 and t.shape[1] * t.shape[2] >= 2**31 for t in tensors):
        return False  # (the sequences, (steps, batch, features); _check says why to a direct call)
    return all(t is None or (t.dtype == first.dtype and t.device == first.device) for t in tensors)


def _blocks(batch: int, hidden: int) -> tuple[int, int]:
    if _interpret():
        return INTERPRETER_BLOCK_B, INTERPRETER_BLOCK_H
    block_h = min(common.next_power_of_2(hidden), GPU_BLOCK_H)
    return min(common.next_power_of_2(batch), GPU_TILE // block_h), block_h


def _constants(dtype: torch.dtype, mode: str, nonlinearity: str, batch: int, hidden: int) -> dict:
    acc = ACC_DTYPES[dtype]
    block_b, block_h = _blocks(batch, hidden)
    consts = dict(
        MODE=MODE_CODES[mode],
        ACT=0 if mode == "lstm" else ACTIVATION_CODES[nonlinearity],
        ACC=tl.float64 if acc == torch.float64 else tl.float32,
        SMALL=0.02 if acc == torch.float64 else 0.25,
        BLOCK_B=block_b,
        BLOCK_H=block_h,
    )
    if not _interpret():
        consts["num_warps"] = GPU_WARPS
    return consts


def split_slope(negative_slope: float) -> tuple[float, float]:
    """``(hi, lo)``: ``hi`` the float32 rounding of ``negative_slope``, ``lo`` the float32 rounding of the rest, so
    that ``hi + lo`` added in float64 is the slope to 2^-48 (the kernels take float32 scalars)."""
    hi = float(np.float32(negative_slope))
    return hi, float(np.float32(negative_slope - hi))


def _check(mode: str, nonlinearity: str, hidden: int, batch: int, gates_h: int) -> None:
    allowed = {"rnn": ("tanh", "relu"), "lstm": (nonlinearity,), "ligru": ("relu", "leaky_relu", "tanh")}[mode]
    if nonlinearity not in allowed:
        raise ValueError(f"rnn_sequence (triton): nonlinearity {nonlinearity!r} is not one of {mode!r}'s {allowed}")
    if batch * gates_h >= 2**31:
        raise ValueError(f"rnn_sequence (triton): a step of {batch} x {gates_h} values exceeds 32-bit offsets")


def forward(
    proj: Tensor,
    h0: Tensor,
    c0: Tensor | None,
    weight: Tensor,
    mode: str,
    nonlinearity: str,
    negative_slope: float,
    reverse: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``aqcf::rnn_sequence`` on these kernels: ``(output, cells, saved)`` as the C++ kernel's."""
    steps, batch, gates_h = proj.shape
    hidden = h0.shape[-1]
    _check(mode, nonlinearity, hidden, batch, gates_h)
    lstm = mode == "lstm"
    output = proj.new_empty(steps, batch, hidden)
    cells = proj.new_empty(steps, batch, hidden) if lstm else proj.new_empty(0)
    saved = proj.new_empty(steps, batch, gates_h) if mode != "rnn" else proj.new_empty(0)
    if steps == 0 or batch == 0:
        return output, cells, saved
    weight_t = expand_weight_grouped(weight, 1).t()  # h Eᵀ = W ⊗ h over the blocked last dim
    scratch = proj.new_empty(batch, gates_h)
    h_prev = h0.contiguous()
    c_prev = c0.contiguous() if lstm else h_prev
    consts = _constants(proj.dtype, mode, nonlinearity, batch, hidden)
    grid = (common.cdiv(hidden, consts["BLOCK_H"]), common.cdiv(batch, consts["BLOCK_B"]))
    slope = split_slope(negative_slope)
    for t in range(steps - 1, -1, -1) if reverse else range(steps):
        torch.mm(h_prev, weight_t, out=scratch)
        p, h = proj[t], output[t]
        c = cells[t] if lstm else h
        s = saved[t] if mode != "rnn" else h
        rnn_cell_fwd_kernel[grid](
            p, scratch, h_prev, c_prev, h, c, s, batch, hidden, p.stride(0), p.stride(1), *slope, **consts
        )
        h_prev, c_prev = h, c
    return output, cells, saved


def backward(
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
    """``aqcf::rnn_sequence_backward`` on these kernels: the gradients of proj, h0, c0 and weight (a fresh
    empty tensor where ``needs`` says no)."""
    steps, batch, hidden = output.shape
    gates_h = GATES[mode] * hidden
    _check(mode, nonlinearity, hidden, batch, gates_h)
    lstm, ligru = mode == "lstm", mode == "ligru"
    acc = ACC_DTYPES[output.dtype]
    expanded = expand_weight_grouped(weight, 1).contiguous()  # (G·H, H): dh_{t−1} = g_gates E
    grad_gates = output.new_empty(steps, batch, gates_h)
    dh = output.new_zeros(batch, hidden)
    dc = torch.zeros(batch, hidden, dtype=acc, device=output.device) if lstm else dh
    go = grad_output.contiguous() if grad_output is not None else None
    gc = grad_cells.contiguous() if lstm and grad_cells is not None and grad_cells.numel() else None
    h0c = h0.contiguous()
    c0c = c0.contiguous() if lstm else h0c
    order = list(range(steps - 1, -1, -1) if reverse else range(steps))
    if batch:
        consts = _constants(output.dtype, mode, nonlinearity, batch, hidden)
        grid = (common.cdiv(hidden, consts["BLOCK_H"]), common.cdiv(batch, consts["BLOCK_B"]))
        slope = split_slope(negative_slope)
        for step in range(steps - 1, -1, -1):
            t = order[step]
            h_prev = output[order[step - 1]] if step else h0c
            c_prev = (cells[order[step - 1]] if step else c0c) if lstm else h_prev
            dg = grad_gates[t]
            rnn_cell_bwd_kernel[grid](
                go[t] if go is not None else dh, gc[t] if gc is not None else dh, dh, dc,
                saved[t] if mode != "rnn" else dh, output[t], h_prev, c_prev, cells[t] if lstm else dh, dg,
                batch, hidden, *slope, HAS_GO=go is not None, HAS_GC=gc is not None, **consts,
            )  # fmt: skip
            if step or needs[1]:  # the GEMM part of h_{t−1}'s gradient (the LiGRU's kernel left the direct part)
                if ligru:
                    dh.addmm_(dg, expanded)
                else:
                    torch.mm(dg, expanded, out=dh)
    empty = output.new_empty(0)
    grad_weight = empty.clone()
    if needs[3]:
        # Σ_t g_gates,tᵀ h_{t−1} as the expanded (G·H, H) gradient in one GEMM over the later steps plus the
        # first step's (it reads h0), folded onto the four quaternion components
        grad_expanded = output.new_zeros(gates_h, hidden)
        if steps:
            torch.mm(grad_gates[order[0]].t(), h0c, out=grad_expanded)
        if steps > 1:
            later = grad_gates[:-1] if reverse else grad_gates[1:]
            h_prev = output[1:] if reverse else output[:-1]
            grad_expanded.addmm_(later.reshape(-1, gates_h).t(), h_prev.reshape(-1, hidden))
        grad_weight = fold_weight_grad_grouped(grad_expanded, 1).contiguous()
    return (
        grad_gates if needs[0] else empty,
        dh if needs[1] else empty.clone(),
        dc.to(output.dtype) if needs[2] and lstm else empty.clone(),
        grad_weight,
    )
