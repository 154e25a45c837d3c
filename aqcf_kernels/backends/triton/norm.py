"""Triton kernels and launchers of the fused quaternion norm ``aqcf::qnorm`` (shared variance + affine + activation).

The CUDA implementation of :mod:`aqcf_kernels.ops.norm` (and, under ``TRITON_INTERPRET=1`` with the
``triton`` backend forced, a CPU one that proves the kernels without a GPU). Same semantics as the
C++ CPU kernel (csrc/cpu/norm.cpp) and the composite reference (``nn.norm._quaternion_norm``):

* statistics, one read of ``x``: each program reduces a chunk of one sample's spatial positions for a
  block of real channels into ``(mean, M2)`` by tiles, each tile's own mean and centred sum of squares
  merged with Chan's formula (no ``E[x²] − E[x]²`` cancellation). All of it runs on ``x − K`` with
  ``K`` one value of the channel (its first in the statistic group), so when ``|μ| ≫ σ`` the means
  being merged are ``O(σ)`` and keep float32's relative precision (unshifted, each merge of two means
  near ``μ`` would lose ``log10(|μ|/σ)`` digits); ``K`` is added back at the end. A second, small
  kernel pools the per-chunk partials exactly (``M2 = Σ M2ₚ + Σ nₚ (μₚ − μ)²``) per statistic group (one
  sample for instance norm, the batch for batch norm), and the shared variance is the sum of the four
  components' ``M2 / count``;
* normalise + affine + activation, a second read: ``z = γ_q (x − μ_c) / sqrt(σ²_q + eps) + β_c``,
  ``y = act(z)`` with ``γ`` per quaternion channel ``(Cq,)`` and ``β`` per real channel ``(4Cq,)``;
* backward, two reads: pass 1 recomputes ``z`` from ``x`` and the statistics (nothing stored in the
  forward) and reduces ``Σ gz`` and ``Σ gz (x − μ)`` per real channel (``gz = act'(z) · gy``), from which
  a small kernel computes ``dβ``, ``dγ`` and the coefficients of pass 2: ``dx = A gz + B (x − μ) + D``.

A training step is so six launches and no torch op between them. Why the small kernels: on a GPU every
torch op is a launch of its own, a small layer's norm is host-bound there, and the pooling and the
coefficients were ~45 torch ops on tensors of a few hundred values.

Tensors are viewed as ``(N, C, S)`` with ``S`` the flattened spatial dims: NCHW-contiguous
(``stride_s == 1``) or channels_last (``stride_c == 1``) as they come, anything else copied to
contiguous first. Tiles are ``(BLOCK_C, BLOCK_S)`` with the unit-stride dim long, so loads are
vectorised in both layouts (triton specialises a stride equal to 1). Accumulation is fp32 for
fp32/fp16/bf16 inputs (loads upcast at once: bf16 arithmetic is wrong in the interpreter) and fp64 for
fp64 inputs; the statistics come out in that dtype.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import common
from .conv_kernels import _activate

#: the input dtypes the kernels serve, and the dtype they accumulate and return the statistics in
ACC_DTYPES = {torch.float32: torch.float32, torch.float16: torch.float32, torch.bfloat16: torch.float32}
ACC_DTYPES[torch.float64] = torch.float64
ACTIVATION_CODES = {None: 0, "relu": 1, "leaky_relu": 2, "gelu": 3}

# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------


@triton.jit
def _activation_grad(z, g, ACTIVATION: tl.constexpr, negative_slope):
    """``act'(z) · g`` (0 none, 1 ReLU, 2 LeakyReLU, 3 GELU (erf)); ReLU's derivative at 0 is 0, as torch's."""
    if ACTIVATION == 1:
        out = tl.where(z > 0, g, 0.0)
    elif ACTIVATION == 2:
        out = tl.where(z > 0, g, g * negative_slope)
    elif ACTIVATION == 3:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        out = g * (cdf + z * tl.exp(-0.5 * z * z) * 0.3989422804014327)
    else:
        out = g
    return out


@triton.jit
def _normalisation(
    mean_ptr, var_ptr, w_ptr, b_ptr, g, offs_c, c_mask, C, CQ, eps, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr
):
    """``(μ_c, γ_q / sqrt(σ²_q + eps), β_c)`` of statistic group ``g`` for the real channels ``offs_c``."""
    q = offs_c % CQ
    mean = tl.load(mean_ptr + g * C + offs_c, mask=c_mask, other=0.0)
    var = tl.load(var_ptr + g * CQ + q, mask=c_mask, other=1.0)
    scale = 1.0 / tl.sqrt(var + eps)
    if HAS_WEIGHT:
        scale = scale * tl.load(w_ptr + q, mask=c_mask, other=0.0).to(mean.dtype)
    if HAS_BIAS:
        beta = tl.load(b_ptr + offs_c, mask=c_mask, other=0.0).to(mean.dtype)
    else:
        beta = tl.zeros_like(mean)
    return mean, scale, beta


@triton.jit
def qnorm_stats_kernel(
    x_ptr,
    pmean_ptr,  # (N, SPLITS, C) partial means of x − K, accumulation dtype
    pm2_ptr,  # (N, SPLITS, C) partial centred sums of squares
    C,
    S,
    CHUNK,  # spatial positions per program (a multiple of BLOCK_S)
    stride_n,
    stride_c,
    stride_s,
    N0,  # the first sample of this launch's slice of the grid's sample axis (common.axis_slices)
    PER_SAMPLE: tl.constexpr,  # K = x[n, c, 0] (instance norm) or x[0, c, 0] (batch norm)
    ACC: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """``(mean, M2)`` of ``x[n, c, k·CHUNK : (k+1)·CHUNK] − K`` for a block of real channels.

    Program (c block, n, k)."""
    n = (tl.program_id(1) + N0).to(tl.int64)
    k = tl.program_id(2)
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    rows = x_ptr + n * stride_n + offs_c[:, None] * stride_c
    if PER_SAMPLE:
        shift = tl.load(x_ptr + n * stride_n + offs_c * stride_c, mask=c_mask, other=0.0).to(ACC)
    else:
        shift = tl.load(x_ptr + offs_c * stride_c, mask=c_mask, other=0.0).to(ACC)
    start = k * CHUNK
    end = tl.minimum(start + CHUNK, S)
    mean = tl.zeros((BLOCK_C,), dtype=ACC)
    m2 = tl.zeros((BLOCK_C,), dtype=ACC)
    for s0 in range(start, end, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        s_mask = offs_s < end
        x = tl.load(rows + offs_s[None, :] * stride_s, mask=c_mask[:, None] & s_mask[None, :], other=0.0)
        x = tl.where(s_mask[None, :], x.to(ACC) - shift[:, None], 0.0)
        seen = (s0 - start).to(ACC)
        count = tl.minimum(end - s0, BLOCK_S).to(ACC)
        tile_mean = tl.sum(x, 1) / count
        centred = tl.where(s_mask[None, :], x - tile_mean[:, None], 0.0)
        # Chan et al.: merge (seen, mean, m2) with the tile's (count, tile_mean, Σ centred²)
        delta = tile_mean - mean
        total = seen + count
        mean += delta * (count / total)
        m2 += tl.sum(centred * centred, 1) + delta * delta * (seen * count / total)
    out = (n * tl.num_programs(2) + k) * C + offs_c
    tl.store(pmean_ptr + out, mean, mask=c_mask)
    tl.store(pm2_ptr + out, m2, mask=c_mask)


@triton.jit
def _group_rows(g, p0, PARTS, offs_c, c_mask, C, BLOCK_P: tl.constexpr):
    """Rows ``p0 + [0, BLOCK_P)`` of statistic group ``g``'s ``PARTS`` partial rows in a ``(rows, C)`` buffer, at the
    channels ``offs_c``: ``(row index in the group, offsets (BLOCK_P, *offs_c.shape), mask)``."""
    rows = p0 + tl.arange(0, BLOCK_P)
    at = (g * PARTS + rows)[:, None, None] * C + offs_c[None, :, :]
    return rows, at, (rows < PARTS)[:, None, None] & c_mask[None, :, :]


@triton.jit
def _chunk_counts(rows, CHUNK, SPLITS, S, ACC: tl.constexpr):
    """Positions in each row's chunk: row r is chunk ``k = r mod SPLITS`` of a sample, ``min(CHUNK, S − k·CHUNK)``."""
    return tl.minimum(CHUNK, S - (rows % SPLITS) * CHUNK).to(ACC)[:, None, None]


@triton.jit
def qnorm_stats_pool_kernel(
    pmean_ptr,  # (N, SPLITS, C) partial means of x − K
    pm2_ptr,  # (N, SPLITS, C) partial centred sums of squares
    x_ptr,  # the input: K = x[g or 0, c, 0] is added back to the mean
    mean_ptr,  # (G, C) out: the mean per real channel
    var_ptr,  # (G, CQ) out: the biased variance shared by each quaternion channel's four components
    C,
    CQ,
    S,
    CHUNK,
    SPLITS,
    PARTS,  # partial rows per statistic group: SPLITS (instance norm) or N·SPLITS (batch norm)
    stride_n,
    stride_c,
    G0,  # the first group of this launch's slice of the grid's group axis (common.axis_slices)
    PER_SAMPLE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Pool one statistic group's per-chunk ``(mean, M2)`` exactly (``M2 = Σ M2ₚ + Σ nₚ (μₚ − μ)²``) into its
    mean per real channel and its shared variance ``Σ_a M2_a / count`` per quaternion channel, for a block of
    quaternion channels and their four components; program (q block, g). One launch where this was ~12 torch
    ops (see the module docstring)."""
    g = tl.program_id(1) + G0
    q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_c = tl.arange(0, 4)[:, None] * CQ + q[None, :]  # (4, BLOCK_Q): component a of channel q
    c_mask = (q < CQ)[None, :] & (offs_c < C)
    # values per statistic, in ACC (a size equal to 1 arrives as a constexpr, and N·S may pass int32)
    total = tl.zeros((1,), ACC) + S
    if not PER_SAMPLE:
        total = total * (PARTS // SPLITS)
    mean = tl.zeros(offs_c.shape, dtype=ACC)
    m2 = tl.zeros(offs_c.shape, dtype=ACC)
    for p0 in range(0, PARTS, BLOCK_P):
        rows, at, mask = _group_rows(g, p0, PARTS, offs_c, c_mask, C, BLOCK_P)
        counts = _chunk_counts(rows, CHUNK, SPLITS, S, ACC)
        mean += tl.sum(counts * tl.load(pmean_ptr + at, mask=mask, other=0.0), 0)
        m2 += tl.sum(tl.load(pm2_ptr + at, mask=mask, other=0.0), 0)
    mean = mean / total
    # the chunks' spread about the pooled mean: a second read of the (small) partial means
    for p0 in range(0, PARTS, BLOCK_P):
        rows, at, mask = _group_rows(g, p0, PARTS, offs_c, c_mask, C, BLOCK_P)
        spread = tl.where(mask, tl.load(pmean_ptr + at, mask=mask, other=0.0) - mean[None, :, :], 0.0)
        m2 += tl.sum(_chunk_counts(rows, CHUNK, SPLITS, S, ACC) * spread * spread, 0)
    shift_n = g.to(tl.int64) * stride_n if PER_SAMPLE else 0
    shift = tl.load(x_ptr + shift_n + offs_c * stride_c, mask=c_mask, other=0.0).to(ACC)
    tl.store(mean_ptr + g * C + offs_c, mean + shift, mask=c_mask)
    tl.store(var_ptr + g * CQ + q, tl.sum(m2, 0) / total, mask=q < CQ)


@triton.jit
def qnorm_apply_kernel(
    x_ptr,
    y_ptr,
    mean_ptr,  # (G, C)
    var_ptr,  # (G, CQ) shared variance
    w_ptr,  # (CQ,) γ
    b_ptr,  # (C,) β
    C,
    CQ,
    S,
    sxn,
    sxc,
    sxs,
    syn,
    syc,
    sys,
    eps,
    negative_slope,
    N0,  # the first sample of this launch's slice of the grid's sample axis (common.axis_slices)
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PER_SAMPLE: tl.constexpr,  # statistics per sample (G = N) or shared (G = 1)
    ACTIVATION: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """``y = act(γ (x − μ) / sqrt(σ² + eps) + β)`` for one tile; program (s block, c block, n)."""
    n = (tl.program_id(2) + N0).to(tl.int64)
    offs_s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    mask = c_mask[:, None] & (offs_s[None, :] < S)
    g = n if PER_SAMPLE else 0
    mean, scale, beta = _normalisation(
        mean_ptr, var_ptr, w_ptr, b_ptr, g, offs_c, c_mask, C, CQ, eps, HAS_WEIGHT, HAS_BIAS
    )
    x = tl.load(x_ptr + n * sxn + offs_c[:, None] * sxc + offs_s[None, :] * sxs, mask=mask, other=0.0)
    z = (x.to(mean.dtype) - mean[:, None]) * scale[:, None] + beta[:, None]
    y = _activate(z, ACTIVATION, negative_slope)
    tl.store(y_ptr + n * syn + offs_c[:, None] * syc + offs_s[None, :] * sys, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def qnorm_bwd_sums_kernel(
    gy_ptr,
    x_ptr,
    mean_ptr,
    var_ptr,
    w_ptr,
    b_ptr,
    psum_gz_ptr,  # (N, SPLITS, C) partial Σ gz
    psum_gzx_ptr,  # (N, SPLITS, C) partial Σ gz (x − μ)
    C,
    CQ,
    S,
    CHUNK,
    sxn,
    sxc,
    sxs,
    sgn,
    sgc,
    sgs,
    eps,
    negative_slope,
    N0,  # the first sample of this launch's slice of the grid's sample axis (common.axis_slices)
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PER_SAMPLE: tl.constexpr,
    ACTIVATION: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Backward pass 1: ``Σ gz`` and ``Σ gz (x − μ)`` over one chunk; program (c block, n, k) as the statistics."""
    n = (tl.program_id(1) + N0).to(tl.int64)
    k = tl.program_id(2)
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    g = n if PER_SAMPLE else 0
    mean, scale, beta = _normalisation(
        mean_ptr, var_ptr, w_ptr, b_ptr, g, offs_c, c_mask, C, CQ, eps, HAS_WEIGHT, HAS_BIAS
    )
    x_rows = x_ptr + n * sxn + offs_c[:, None] * sxc
    g_rows = gy_ptr + n * sgn + offs_c[:, None] * sgc
    start = k * CHUNK
    end = tl.minimum(start + CHUNK, S)
    sum_gz = tl.zeros((BLOCK_C,), dtype=mean.dtype)
    sum_gzx = tl.zeros((BLOCK_C,), dtype=mean.dtype)
    for s0 in range(start, end, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        mask = c_mask[:, None] & (offs_s[None, :] < end)
        xc = tl.load(x_rows + offs_s[None, :] * sxs, mask=mask, other=0.0).to(mean.dtype) - mean[:, None]
        gy = tl.load(g_rows + offs_s[None, :] * sgs, mask=mask, other=0.0).to(mean.dtype)
        gz = _activation_grad(xc * scale[:, None] + beta[:, None], gy, ACTIVATION, negative_slope)
        gz = tl.where(mask, gz, 0.0)  # masked x is −μ, not 0: its gz may not be
        sum_gz += tl.sum(gz, 1)
        sum_gzx += tl.sum(gz * xc, 1)
    out = (n * tl.num_programs(2) + k) * C + offs_c
    tl.store(psum_gz_ptr + out, sum_gz, mask=c_mask)
    tl.store(psum_gzx_ptr + out, sum_gzx, mask=c_mask)


@triton.jit
def qnorm_bwd_coefficients_kernel(
    psum_gz_ptr,  # (N, SPLITS, C) partial Σ gz (read with input statistics, or for dγ / dβ)
    psum_gzx_ptr,  # (N, SPLITS, C) partial Σ gz (x − μ)
    var_ptr,  # (G, CQ)
    w_ptr,  # (CQ,) γ (read when HAS_WEIGHT)
    coef_ptr,  # (3, G, C) out: A, B, D of dx = A gz + B (x − μ) + D
    gw_ptr,  # (CQ,) out: dγ (written when WANT_GW)
    gb_ptr,  # (C,) out: dβ (written when WANT_GB)
    C,
    CQ,
    G,
    PARTS,  # partial rows per statistic group: SPLITS (instance norm) or N·SPLITS (batch norm)
    COUNT,  # values per statistic
    eps,
    G0,  # the first group of this launch's slice of the grid's group axis (common.axis_slices)
    HAS_WEIGHT: tl.constexpr,
    USE_INPUT_STATS: tl.constexpr,  # μ and σ² depend on x: the B and D terms
    WANT_GW: tl.constexpr,
    WANT_GB: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Between the backward's two passes: one statistic group's sums pooled from its chunks, then its
    coefficients of ``dx`` (``A = γ r``, ``B = −A r Σ gz x̂ / count``, ``D = −A Σ gz / count`` with
    ``r = 1/sqrt(σ² + eps)`` and ``Σ gz x̂`` summed over the quaternion channel's components); program
    (q block, g). The programs of group 0 then take ``dγ = Σ_g r_g Σ gz (x − μ)`` and ``dβ = Σ gz`` over
    every group's chunks in one more loop, each row scaled by its own group's ``r``. (With the groups in a
    loop of each program instead, the two nested loops made ptxas spill the values the final stores read,
    and an instance norm's groups ran one after the other.)

    One launch where this was ~25 torch ops (see the module docstring)."""
    g = tl.program_id(1) + G0
    q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_mask = q < CQ
    offs_c = tl.arange(0, 4)[:, None] * CQ + q[None, :]  # (4, BLOCK_Q): component a of channel q
    c_mask = q_mask[None, :] & (offs_c < C)
    inv_count = 1.0 / (tl.zeros((1,), ACC) + COUNT)
    if HAS_WEIGHT:
        gamma = tl.load(w_ptr + q, mask=q_mask, other=0.0).to(ACC)
    else:
        gamma = tl.full((BLOCK_Q,), 1.0, ACC)
    r = 1.0 / tl.sqrt(tl.load(var_ptr + g * CQ + q, mask=q_mask, other=1.0) + eps)
    coef_a = gamma * r
    coef_b = tl.zeros((BLOCK_Q,), dtype=ACC)
    coef_d = tl.zeros((4, BLOCK_Q), dtype=ACC)
    if USE_INPUT_STATS:  # (the sums pass ran)
        sum_gz = tl.zeros(offs_c.shape, dtype=ACC)
        sum_gzx = tl.zeros(offs_c.shape, dtype=ACC)
        for p0 in range(0, PARTS, BLOCK_P):
            _, at, mask = _group_rows(g, p0, PARTS, offs_c, c_mask, C, BLOCK_P)
            sum_gz += tl.sum(tl.load(psum_gz_ptr + at, mask=mask, other=0.0), 0)
            sum_gzx += tl.sum(tl.load(psum_gzx_ptr + at, mask=mask, other=0.0), 0)
        coef_b = -coef_a * r * (tl.sum(sum_gzx, 0) * r) * inv_count
        coef_d = -coef_a[None, :] * sum_gz * inv_count
    coef = coef_ptr + g * C + offs_c
    tl.store(coef, tl.zeros((4, BLOCK_Q), dtype=ACC) + coef_a[None, :], mask=c_mask)
    tl.store(coef + G * C, tl.zeros((4, BLOCK_Q), dtype=ACC) + coef_b[None, :], mask=c_mask)
    tl.store(coef + 2 * G * C, coef_d, mask=c_mask)
    if WANT_GW or WANT_GB:
        if g == 0:
            grad_weight = tl.zeros((BLOCK_Q,), dtype=ACC)
            grad_bias = tl.zeros((4, BLOCK_Q), dtype=ACC)
            for p0 in range(0, G * PARTS, BLOCK_P):  # every group's rows: group 0's rows extended to all
                rows, at, mask = _group_rows(0, p0, G * PARTS, offs_c, c_mask, C, BLOCK_P)
                if WANT_GW:
                    var_rows = tl.load(var_ptr + (rows // PARTS)[:, None] * CQ + q[None, :],
                                       mask=(rows < G * PARTS)[:, None] & q_mask[None, :], other=1.0)  # fmt: skip
                    gzx = tl.sum(tl.load(psum_gzx_ptr + at, mask=mask, other=0.0), 1)  # (BLOCK_P, BLOCK_Q)
                    grad_weight += tl.sum(gzx / tl.sqrt(var_rows + eps), 0)
                if WANT_GB:
                    grad_bias += tl.sum(tl.load(psum_gz_ptr + at, mask=mask, other=0.0), 0)
            if WANT_GW:
                tl.store(gw_ptr + q, grad_weight.to(gw_ptr.dtype.element_ty), mask=q_mask)
            if WANT_GB:
                tl.store(gb_ptr + offs_c, grad_bias.to(gb_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def qnorm_bwd_input_kernel(
    gy_ptr,
    x_ptr,
    dx_ptr,
    mean_ptr,
    var_ptr,
    w_ptr,
    b_ptr,
    coef_ptr,  # (3, G, C): A, B, D of dx = A gz + B (x − μ) + D
    C,
    CQ,
    S,
    G,
    sxn,
    sxc,
    sxs,
    sgn,
    sgc,
    sgs,
    sdn,
    sdc,
    sds,
    eps,
    negative_slope,
    N0,  # the first sample of this launch's slice of the grid's sample axis (common.axis_slices)
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PER_SAMPLE: tl.constexpr,
    ACTIVATION: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Backward pass 2: ``dx`` for one tile; program (s block, c block, n) as the forward's."""
    n = (tl.program_id(2) + N0).to(tl.int64)
    offs_s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    mask = c_mask[:, None] & (offs_s[None, :] < S)
    g = n if PER_SAMPLE else 0
    mean, scale, beta = _normalisation(
        mean_ptr, var_ptr, w_ptr, b_ptr, g, offs_c, c_mask, C, CQ, eps, HAS_WEIGHT, HAS_BIAS
    )
    coef = coef_ptr + g * C + offs_c
    coef_a = tl.load(coef, mask=c_mask, other=0.0)
    coef_b = tl.load(coef + G * C, mask=c_mask, other=0.0)
    coef_d = tl.load(coef + 2 * G * C, mask=c_mask, other=0.0)
    xc = tl.load(x_ptr + n * sxn + offs_c[:, None] * sxc + offs_s[None, :] * sxs, mask=mask, other=0.0)
    xc = xc.to(mean.dtype) - mean[:, None]
    gy = tl.load(gy_ptr + n * sgn + offs_c[:, None] * sgc + offs_s[None, :] * sgs, mask=mask, other=0.0)
    gz = _activation_grad(xc * scale[:, None] + beta[:, None], gy.to(mean.dtype), ACTIVATION, negative_slope)
    dx = coef_a[:, None] * gz + coef_b[:, None] * xc + coef_d[:, None]
    dx_ptrs = dx_ptr + n * sdn + offs_c[:, None] * sdc + offs_s[None, :] * sds
    tl.store(dx_ptrs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------

#: elements per tile on a GPU (4 warps × 32 threads × 16 values)
GPU_TILE, GPU_WARPS = 2048, 4
#: the interpreter pays per program and step (~30 ms), hardly per element: tiles of at most 16 x 16
#: keep the tests' tiny shapes at a few programs while they still cross tile and chunk edges
INTERPRETER_BLOCK = 16
#: programs the reductions aim for per SM (each reduces one chunk of one sample's channels)
PROGRAMS_PER_SM = 4


def serves(input: Tensor) -> bool:
    """Whether these kernels serve ``input`` here: triton importable, CUDA (or CPU under the interpreter), and
    one sample's offsets within int32 (else the composite path serves: it raised in :func:`_check_size`)."""
    if common.IMPORT_ERROR is not None or input.dtype not in ACC_DTYPES or input.dim() < 3:
        return False
    if math.prod(input.shape[1:]) >= 2**31:
        return False
    if input.device.type == "cuda":
        return not common.INTERPRET
    return input.device.type == "cpu" and common.INTERPRET


def _ncs(t: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
    """``t`` as ``(N, C, S)`` and its strides: NCHW-contiguous or channels_last as is, else a contiguous copy."""
    if t.dim() in (4, 5):
        fmt = torch.channels_last if t.dim() == 4 else torch.channels_last_3d
        if not t.is_contiguous() and t.is_contiguous(memory_format=fmt):
            n, c = t.shape[:2]
            return t, (t.stride(0), 1, c)
    t = t.contiguous()
    s = math.prod(t.shape[2:])
    return t, (t.shape[1] * s, s, 1)


def _blocks(c: int, s: int, channels_fast: bool) -> tuple[int, int]:
    """``(BLOCK_C, BLOCK_S)``: the unit-stride dim long (up to the whole tile), the other fills the tile."""
    if common.INTERPRET:
        return min(common.next_power_of_2(c), INTERPRETER_BLOCK), min(common.next_power_of_2(s), INTERPRETER_BLOCK)
    if channels_fast:
        block_c = min(common.next_power_of_2(c), 128)
        return block_c, GPU_TILE // block_c
    block_s = min(common.next_power_of_2(s), GPU_TILE)
    return GPU_TILE // block_s, block_s


def _chunking(n: int, c: int, s: int, block_c: int, block_s: int, device: torch.device) -> tuple[int, int]:
    """``(CHUNK, SPLITS)`` of the reductions: enough programs to fill the GPU, chunks whole tiles."""
    if common.INTERPRET:
        chunk = 2 * block_s  # several tiles per program and several programs per sample: both merges run
    else:
        target = PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
        splits = max(1, min(common.cdiv(s, block_s), target // max(1, n * common.cdiv(c, block_c))))
        chunk = common.cdiv(common.cdiv(s, splits), block_s) * block_s
    return chunk, common.cdiv(s, chunk)


def _pool_blocks(cq: int) -> tuple[int, int]:
    """``(BLOCK_Q, BLOCK_P)`` of the kernels that pool the partial rows: tiles of ``BLOCK_P`` rows by 4 components
    × ``BLOCK_Q`` quaternion channels. Narrow in channels, so that the ``Cq / BLOCK_Q`` programs spread over SMs,
    and long in rows, so that a batch norm's ~500 rows (the statistics pass fills the GPU) take a few steps of one
    program rather than dozens: these kernels are chains of dependent loads, and their latency is what they
    cost. (Compiled for sm_90, every variant at these tiles is spill-free; ``tools/triton_resources.py --norm``.)
    The interpreter's are small, so the tests' shapes cross both."""
    if common.INTERPRET:
        return min(common.next_power_of_2(cq), 2), 4
    return min(common.next_power_of_2(cq), 4), 128


def _tl_acc(acc: torch.dtype):
    return tl.float64 if acc == torch.float64 else tl.float32


def _launch_options() -> dict:
    return {} if common.INTERPRET else {"num_warps": GPU_WARPS}


def _check_size(n: int, c: int, s: int) -> None:
    if c * s >= 2**31:
        raise ValueError(f"qnorm (triton): one sample of {c} x {s} values exceeds the kernels' 32-bit offsets")


def forward(
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
    """``aqcf::qnorm`` on these kernels: ``(y, mean (G, C), var (G, Cq))``, statistics in the accumulation dtype."""
    x, (sxn, sxc, sxs) = _ncs(input)
    n, c = x.shape[:2]
    cq, s = c // 4, math.prod(x.shape[2:])
    _check_size(n, c, s)
    acc = ACC_DTYPES[x.dtype]
    block_c, block_s = _blocks(c, s, sxc == 1 and c > 1)
    if use_input_stats:
        chunk, splits = _chunking(n, c, s, block_c, block_s, x.device)
        pmean = torch.empty((n, splits, c), dtype=acc, device=x.device)
        pm2 = torch.empty_like(pmean)
        for n0, count in common.axis_slices(n):
            qnorm_stats_kernel[(common.cdiv(c, block_c), count, splits)](
                x, pmean, pm2, c, s, chunk, sxn, sxc, sxs, n0, PER_SAMPLE=per_sample, ACC=_tl_acc(acc),
                BLOCK_C=block_c, BLOCK_S=block_s, **_launch_options(),
            )  # fmt: skip
        groups = n if per_sample else 1
        mean = torch.empty((groups, c), dtype=acc, device=x.device)
        var = torch.empty((groups, cq), dtype=acc, device=x.device)
        block_q, block_p = _pool_blocks(cq)
        for g0, count in common.axis_slices(groups):
            qnorm_stats_pool_kernel[(common.cdiv(cq, block_q), count)](
                pmean, pm2, x, mean, var, c, cq, s, chunk, splits, n * splits // groups, sxn, sxc, g0,
                PER_SAMPLE=per_sample, ACC=_tl_acc(acc), BLOCK_Q=block_q, BLOCK_P=block_p, **_launch_options(),
            )  # fmt: skip
    else:
        mean = running_mean.reshape(1, c).to(acc, copy=True)
        var = running_var.reshape(1, cq).to(acc, copy=True)
    y = torch.empty_like(x)
    _, (syn, syc, sys) = _ncs(y)
    for n0, count in common.axis_slices(n):
        qnorm_apply_kernel[(common.cdiv(s, block_s), common.cdiv(c, block_c), count)](
            x, y, mean, var, weight if weight is not None else mean, bias if bias is not None else mean,
            c, cq, s, sxn, sxc, sxs, syn, syc, sys, float(eps), float(negative_slope), n0,
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, PER_SAMPLE=mean.shape[0] > 1,
            ACTIVATION=ACTIVATION_CODES[activation], BLOCK_C=block_c, BLOCK_S=block_s, **_launch_options(),
        )  # fmt: skip
    return y, mean, var


def backward(
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
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``aqcf::qnorm_backward`` on these kernels: ``(dx, dγ, dβ)``, ``None`` where not needed."""
    x, (sxn, sxc, sxs) = _ncs(input)
    gy, (sgn, sgc, sgs) = _ncs(grad_output)
    n, c = x.shape[:2]
    cq, s = c // 4, math.prod(x.shape[2:])
    _check_size(n, c, s)
    groups = mean.shape[0]
    mean, var = mean.contiguous(), var.contiguous()
    acc = mean.dtype
    block_c, block_s = _blocks(c, s, sxc == 1 and c > 1)
    consts = dict(
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, PER_SAMPLE=groups > 1,
        ACTIVATION=ACTIVATION_CODES[activation], BLOCK_C=block_c, BLOCK_S=block_s, **_launch_options(),
    )  # fmt: skip
    w = weight if weight is not None else mean
    b = bias if bias is not None else mean
    want_gw, want_gb = needs[1] and weight is not None, needs[2] and bias is not None
    if not (needs[0] or want_gw or want_gb):
        return None, None, None
    sums = use_input_stats or want_gw or want_gb  # with running statistics, dx needs no sums
    if sums:
        chunk, splits = _chunking(n, c, s, block_c, block_s, x.device)
        psum_gz = torch.empty((n, splits, c), dtype=acc, device=x.device)
        psum_gzx = torch.empty_like(psum_gz)
        for n0, count in common.axis_slices(n):
            qnorm_bwd_sums_kernel[(common.cdiv(c, block_c), count, splits)](
                gy, x, mean, var, w, b, psum_gz, psum_gzx, c, cq, s, chunk,
                sxn, sxc, sxs, sgn, sgc, sgs, float(eps), float(negative_slope), n0, **consts,
            )  # fmt: skip
    else:
        splits, psum_gz, psum_gzx = 1, var, var  # not read
    coefs = torch.empty((3, groups, c), dtype=acc, device=x.device)
    grad_weight = torch.empty(weight.shape, dtype=weight.dtype, device=x.device) if want_gw else None
    grad_bias = torch.empty(bias.shape, dtype=bias.dtype, device=x.device) if want_gb else None
    block_q, block_p = _pool_blocks(cq)
    for g0, count in common.axis_slices(groups):
        qnorm_bwd_coefficients_kernel[(common.cdiv(cq, block_q), count)](
            psum_gz, psum_gzx, var, w, coefs, grad_weight if want_gw else coefs, grad_bias if want_gb else coefs,
            c, cq, groups, n * splits // groups, (s if per_sample else n * s), float(eps), g0,
            HAS_WEIGHT=weight is not None, USE_INPUT_STATS=use_input_stats, WANT_GW=want_gw,
            WANT_GB=want_gb, ACC=_tl_acc(acc), BLOCK_Q=block_q, BLOCK_P=block_p, **_launch_options(),
        )  # fmt: skip
    grad_input = None
    if needs[0]:
        grad_input = torch.empty_like(x)
        _, (sdn, sdc, sds) = _ncs(grad_input)
        for n0, count in common.axis_slices(n):
            qnorm_bwd_input_kernel[(common.cdiv(s, block_s), common.cdiv(c, block_c), count)](
                gy, x, grad_input, mean, var, w, b, coefs, c, cq, s, groups,
                sxn, sxc, sxs, sgn, sgc, sgs, sdn, sdc, sds, float(eps), float(negative_slope), n0, **consts,
            )  # fmt: skip
    return grad_input, grad_weight, grad_bias
