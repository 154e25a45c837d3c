"""The backward of a conv's fused activation and bias in one pass: ``dL/dz`` and ``Σ dL/dz`` per channel.

``aqcf::qconv`` with an activation returns ``y = act(z)``, ``z = conv(x, W) + b``. Its backward needs
``gz = act'(z) · gy`` (the operand of both gradient GEMMs) and, with a bias, ``db = Σ_{n, s} gz``. aten
does that in two passes: the activation's backward kernel (reads gy and the gate, writes gz), then a
sum that reads gz again. This kernel writes gz and reduces its per-channel partial sums from the
registers it wrote them from, so the bias gradient costs no read of its own (issue 13: "the bias
gradient from the same pass").

Why not in the GEMMs' loads instead (what the issue asked first): see :mod:`.igemm_wgrad`'s docstring
— compiled for sm_90, the weight-gradient GEMM lost its async copies or its wgmma overlap with a gate
applied at load, so gz is formed once by this pass for both GEMMs to read.

Layout: the tensors are viewed ``(N, C, S)`` as the norm kernels view them (:func:`.norm._ncs`):
NCHW-contiguous or channels_last, the unit-stride dim along the long side of the tile, so loads and
stores are vectorised in both (triton specialises a stride equal to 1). Programs are the norm
statistics' (channel block, sample, chunk of S), each accumulating its chunk's sum in registers and
writing one fp32 partial per channel; the few partials are summed by torch. The gate is ``y`` for ReLU
and LeakyReLU with a non-negative slope (``y > 0 ⇔ z > 0``), ``z`` for GELU and a negative slope, as
aten's backward kernels read them (``ops.conv.activation_grad``).

Serves fp16 / bf16 / fp32 (fp32 arithmetic; the sum is of gz before it is rounded to the output
dtype), tensors of fewer than 2**31 elements; the caller runs aten's two passes for anything else.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...layout import is_channels_last
from . import common
from .norm import ACTIVATION_CODES, _activation_grad, _blocks, _chunking, _launch_options, _ncs

#: the dtypes the kernel serves (its arithmetic is fp32)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def activation_grad_bias_kernel(
    gy_ptr,  # dL/dy
    gate_ptr,  # y or z, as the activation's derivative reads it
    gz_ptr,  # dL/dz (output, gy's dtype)
    part_ptr,  # (N, SPLITS, C) fp32: Σ gz over each program's chunk
    C,
    S,
    CHUNK,  # spatial positions per program (a multiple of BLOCK_S)
    stride_n,  # the three tensors share one layout
    stride_c,
    stride_s,
    negative_slope,
    N0,  # the first sample of this launch's slice of the grid's sample axis (common.axis_slices)
    ACTIVATION: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """``gz = act'(gate) · gy`` over one chunk of one sample's channel block, and its sum per channel.

    Program (c block, n, k), as :func:`.norm.qnorm_stats_kernel`."""
    n = (tl.program_id(1) + N0).to(tl.int64)
    k = tl.program_id(2)
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    rows = n * stride_n + offs_c[:, None] * stride_c
    start = k * CHUNK
    end = tl.minimum(start + CHUNK, S)
    total = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for s0 in range(start, end, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        mask = c_mask[:, None] & (offs_s[None, :] < end)
        offs = rows + offs_s[None, :] * stride_s
        gy = tl.load(gy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        gate = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        gz = _activation_grad(gate, gy, ACTIVATION, negative_slope)  # 0 where masked: gy is 0 there
        tl.store(gz_ptr + offs, gz.to(gz_ptr.dtype.element_ty), mask=mask)
        total += tl.sum(gz, 1)
    tl.store(part_ptr + (n * tl.num_programs(2) + k) * C + offs_c, total, mask=c_mask)


def cannot_serve(grad: Tensor, gate: Tensor) -> str | None:
    """Why the kernel cannot take this pass (``None`` if it can); the caller then runs aten's two."""
    if grad.dtype not in DTYPES:
        return f"{grad.dtype} (fp16/bf16/fp32 only)"
    if grad.shape != gate.shape or grad.dtype != gate.dtype or grad.device != gate.device:
        return "grad and gate differ in shape, dtype or device"
    if grad.dim() < 3:
        return "fewer than 3 dims (no spatial dim)"
    if not (gate.is_contiguous() or is_channels_last(gate)):
        return "the gate is neither contiguous nor channels_last (the op's y and z always are)"
    if grad.numel() >= 2**31:
        return "2**31 elements or more (the kernel's offsets are int32)"
    return None


def activation_grad_bias(grad: Tensor, gate: Tensor, activation: str, negative_slope: float) -> tuple[Tensor, Tensor]:
    """``(gz, db)``: ``gz = act'(gate) · grad`` in the gate's layout and ``db = gz.sum(0, 2, ...)`` in grad's dtype."""
    gate, (stride_n, stride_c, stride_s) = _ncs(gate)  # as it is: NCHW or channels_last (cannot_serve)
    if grad.stride() != gate.stride():  # e.g. an expanded (stride-0) gradient: one copy into the gate's layout
        grad = torch.empty_like(gate).copy_(grad)
    gz = torch.empty_like(gate)
    n, c = gate.shape[:2]
    s = math.prod(gate.shape[2:])
    block_c, block_s = _blocks(c, s, stride_c == 1 and c > 1)
    chunk, splits = _chunking(n, c, s, block_c, block_s, gate.device)
    partials = torch.empty((n, splits, c), dtype=torch.float32, device=gate.device)
    for n0, count in common.axis_slices(n):
        activation_grad_bias_kernel[(common.cdiv(c, block_c), count, splits)](
            grad, gate, gz, partials, c, s, chunk, stride_n, stride_c, stride_s, float(negative_slope), n0,
            ACTIVATION=ACTIVATION_CODES[activation], BLOCK_C=block_c, BLOCK_S=block_s, **_launch_options(),
        )  # fmt: skip
    return gz, partials.sum((0, 1)).to(grad.dtype)
