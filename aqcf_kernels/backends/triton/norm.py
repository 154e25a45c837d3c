"""Triton kernels and launchers of the fused quaternion norm ``aqcf::qnorm`` (shared variance + affine + activation).

The CUDA implementation of :mod:`aqcf_kernels.ops.norm` (and, under ``TRITON_INTERPRET=1`` with the
``triton`` backend forced, a CPU one that proves the kernels without a GPU). Same semantics as the
C++ CPU kernel (csrc/cpu/norm.cpp) and the composite reference (``nn.norm._quaternion_norm``):

* statistics, one read of ``x``: each program reduces a chunk of one sample's spatial positions for a
  block of real channels into ``(mean, M2)`` by tiles, each tile's own mean and centred sum of squares
  merged with Chan's formula (no ``E[x²] − E[x]²`` cancellation). All of it runs on ``x − K`` with
  ``K`` one value of the channel (its first in the statistic group), so when ``|μ| ≫ σ`` the means
  being merged are ``O(σ)`` and keep float32's relative precision (unshifted, each merge of two means
  near ``μ`` would lose ``log10(|μ|/σ)`` digits); ``K`` is added back at the end. The per-chunk
  partials are pooled exactly (``M2 = Σ M2ₚ + Σ nₚ (μₚ − μ)²``) per statistic group (one sample for
  instance norm, the batch for batch norm), and the shared variance is the sum of the four components'
  ``M2 / count``;
* normalise + affine + activation, a second read: ``z = γ_q (x − μ_c) / sqrt(σ²_q + eps) + β_c``,
  ``y = act(z)`` with ``γ`` per quaternion channel ``(Cq,)`` and ``β`` per real channel ``(4Cq,)``;
* backward, two reads: pass 1 recomputes ``z`` from ``x`` and the statistics (nothing stored in the
  forward) and reduces ``Σ gz`` and ``Σ gz (x − μ)`` per real channel (``gz = act'(z) · gy``), which give
  ``dβ``, ``dγ`` and the coefficients of pass 2: ``dx = A gz + B (x − μ) + D``.

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
    PER_SAMPLE: tl.constexpr,  # K = x[n, c, 0] (instance norm) or x[0, c, 0] (batch norm)
    ACC: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """``(mean, M2)`` of ``x[n, c, k·CHUNK : (k+1)·CHUNK] − K`` for a block of real channels.

    Program (c block, n, k)."""
    n = tl.program_id(1).to(tl.int64)
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
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PER_SAMPLE: tl.constexpr,  # statistics per sample (G = N) or shared (G = 1)
    ACTIVATION: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """``y = act(γ (x − μ) / sqrt(σ² + eps) + β)`` for one tile; program (s block, c block, n)."""
    n = tl.program_id(2).to(tl.int64)
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
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PER_SAMPLE: tl.constexpr,
    ACTIVATION: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Backward pass 1: ``Σ gz`` and ``Σ gz (x − μ)`` over one chunk; program (c block, n, k) as the statistics."""
    n = tl.program_id(1).to(tl.int64)
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
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PER_SAMPLE: tl.constexpr,
    ACTIVATION: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Backward pass 2: ``dx`` for one tile; program (s block, c block, n) as the forward's."""
    n = tl.program_id(2).to(tl.int64)
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
    """Whether these kernels serve ``input`` here: triton importable, CUDA (or CPU under the interpreter)."""
    if common.IMPORT_ERROR is not None or input.dtype not in ACC_DTYPES or input.dim() < 3:
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
        qnorm_stats_kernel[(common.cdiv(c, block_c), n, splits)](
            x, pmean, pm2, c, s, chunk, sxn, sxc, sxs, PER_SAMPLE=per_sample,
            ACC=tl.float64 if acc == torch.float64 else tl.float32, BLOCK_C=block_c, BLOCK_S=block_s,
            **_launch_options(),
        )  # fmt: skip
        mean, var = _pool(pmean, pm2, s, chunk, per_sample)
        mean += x.flatten(2)[:, :, 0] if per_sample else x.flatten(2)[:1, :, 0]  # the kernel's shift K
    else:
        mean = running_mean.reshape(1, c).to(acc, copy=True)
        var = running_var.reshape(1, cq).to(acc, copy=True)
    y = torch.empty_like(x)
    _, (syn, syc, sys) = _ncs(y)
    qnorm_apply_kernel[(common.cdiv(s, block_s), common.cdiv(c, block_c), n)](
        x, y, mean, var, weight if weight is not None else mean, bias if bias is not None else mean,
        c, cq, s, sxn, sxc, sxs, syn, syc, sys, float(eps), float(negative_slope),
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, PER_SAMPLE=mean.shape[0] > 1,
        ACTIVATION=ACTIVATION_CODES[activation], BLOCK_C=block_c, BLOCK_S=block_s, **_launch_options(),
    )  # fmt: skip
    return y, mean, var


def _pool(pmean: Tensor, pm2: Tensor, s: int, chunk: int, per_sample: bool) -> tuple[Tensor, Tensor]:
    """Pool the per-chunk ``(mean, M2)`` exactly into ``(mean (G, C), shared var (G, Cq))`` (means still shifted)."""
    n, splits, c = pmean.shape
    counts = (s - chunk * torch.arange(splits, device=pmean.device)).clamp(max=chunk).to(pmean.dtype)
    if not per_sample:  # one statistic group: every sample's chunks
        pmean, pm2, counts = pmean.reshape(1, n * splits, c), pm2.reshape(1, n * splits, c), counts.repeat(n)
    total = s if per_sample else n * s
    counts = counts.view(1, -1, 1)
    mean = (pmean * counts).sum(1) / total
    m2 = pm2.sum(1) + ((pmean - mean.unsqueeze(1)).square() * counts).sum(1)
    return mean, (m2 / total).view(-1, 4, c // 4).sum(1)


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
    r = (var + eps).rsqrt()  # (G, Cq)
    gamma = weight.to(acc).view(1, cq) if weight is not None else torch.ones((1, cq), dtype=acc, device=x.device)
    coef_a = gamma * r
    grad_weight = grad_bias = None
    coefs = torch.zeros((3, groups, c), dtype=acc, device=x.device)
    coefs[0] = coef_a.repeat(1, 4)
    if use_input_stats or needs[1] or needs[2]:  # with running statistics, dx needs no sums
        chunk, splits = _chunking(n, c, s, block_c, block_s, x.device)
        psum_gz = torch.empty((n, splits, c), dtype=acc, device=x.device)
        psum_gzx = torch.empty_like(psum_gz)
        qnorm_bwd_sums_kernel[(common.cdiv(c, block_c), n, splits)](
            gy, x, mean, var, w, b, psum_gz, psum_gzx, c, cq, s, chunk,
            sxn, sxc, sxs, sgn, sgc, sgs, float(eps), float(negative_slope), **consts,
        )  # fmt: skip
        sum_gz, sum_gzx = psum_gz.sum(1), psum_gzx.sum(1)  # (N, C)
        if groups == 1:
            sum_gz, sum_gzx = sum_gz.sum(0, keepdim=True), sum_gzx.sum(0, keepdim=True)
        xhat_sum = sum_gzx.view(groups, 4, cq).sum(1) * r  # Σ gz · x̂ per (g, q)
        if needs[1] and weight is not None:
            grad_weight = xhat_sum.sum(0).to(weight.dtype)
        if needs[2] and bias is not None:
            grad_bias = sum_gz.sum(0).to(bias.dtype)
        if use_input_stats:
            count = s if per_sample else n * s
            coefs[1] = (-coef_a * r * xhat_sum / count).repeat(1, 4)
            coefs[2] = -(coef_a.unsqueeze(1) * sum_gz.view(groups, 4, cq)).reshape(groups, c) / count
    grad_input = None
    if needs[0]:
        grad_input = torch.empty_like(x)
        _, (sdn, sdc, sds) = _ncs(grad_input)
        qnorm_bwd_input_kernel[(common.cdiv(s, block_s), common.cdiv(c, block_c), n)](
            gy, x, grad_input, mean, var, w, b, coefs, c, cq, s, groups,
            sxn, sxc, sxs, sgn, sgc, sgs, sdn, sdc, sds, float(eps), float(negative_slope), **consts,
        )  # fmt: skip
    return grad_input, grad_weight, grad_bias
