"""Triton kernels of the A-QCF attention: flash-attention forward and backward over BOTH directions.

One launch covers both directions of the block: the grid's first axis enumerates the row tiles of
direction a (queries of a against keys/values of b) and then those of direction b, so a block
with ``N_a ≠ N_b`` wastes no program on the shorter side. Each program picks its direction's
pointers once (a runtime branch on a scalar) and is then an ordinary flash-attention program:

* forward: online softmax, fp32 accumulators, the log-sum-exp (natural log) stored per query row;
* backward, FlashAttention-2's split: ``dk, dv`` by key tile (looping over query tiles) and ``dq``
  by query tile (looping over key tiles), each recomputing ``P = exp(S − lse)``; no atomics.
  ``δ = rowsum(dO ⊙ O)`` is precomputed by the launcher.

Every kernel forms ``S`` the same way (``_scores``: ``q·kᵀ`` on the same tiles, in natural units) and
exponentiates ``(S − m)·log2 e`` (``_exp``), so the backward's ``P`` is the forward's bit for bit. With
large logits (``|S|`` ~ 1e4, a one-hot softmax) one ulp of ``S`` is ~1e-3 and ``P`` would move by that
much: a ``dk, dv`` kernel that formed ``Sᵀ = k·qᵀ`` (rounded in another order), or scores pre-scaled
by ``scale·log2 e`` against a natural-log ``lse`` (an extra rounding each way), gave ``dv`` 1e-3 off
where SDPA is 1e-7 (tests/attention/test_attention_robustness.py, in the interpreter on an AMD EPYC).

Tensors are contiguous ``(B, H, N, E)``; ``E`` (4·d reals per head) is padded to a power of two
``BLOCK_E`` by masking. Plain pointer arithmetic only (triton 3.6–3.9). ``DOT_DTYPE`` is the
operand dtype of ``tl.dot`` (fp32 under the interpreter, where bf16 arithmetic is wrong).
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _load_rows(base, offs_n, offs_e, n, E: tl.constexpr):
    mask = (offs_n[:, None] < n) & (offs_e[None, :] < E)
    return tl.load(base + offs_n[:, None] * E + offs_e[None, :], mask=mask, other=0.0)


@triton.jit
def _scores(q, k, scale, PRECISION: tl.constexpr):
    """``S = scale · q·kᵀ`` (queries × keys), formed the same way by the forward and both backward kernels."""
    return tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale


@triton.jit
def _exp(x):
    """``exp(x)`` as ``exp2(x·log2 e)``: the multiply comes after the subtraction of the row's max or lse."""
    return tl.exp2(x * LOG2E)


@triton.jit
def attention_fwd_kernel(
    qa_ptr,
    kb_ptr,
    vb_ptr,
    oa_ptr,
    la_ptr,
    qb_ptr,
    ka_ptr,
    va_ptr,
    ob_ptr,
    lb_ptr,
    n_qa,
    n_ka,
    n_qb,
    n_kb,
    tiles_a,
    scale,
    BH0,  # the first (batch, head) of this launch's slice of grid axis 1 (common.axis_slices)
    E: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    pid, bh = tl.program_id(0), (tl.program_id(1) + BH0).to(tl.int64)
    is_b = pid >= tiles_a
    if is_b:
        q_ptr, k_ptr, v_ptr, o_ptr, l_ptr = qb_ptr, ka_ptr, va_ptr, ob_ptr, lb_ptr
        n_q, n_k, tile = n_qb, n_ka, pid - tiles_a
    else:
        q_ptr, k_ptr, v_ptr, o_ptr, l_ptr = qa_ptr, kb_ptr, vb_ptr, oa_ptr, la_ptr
        n_q, n_k, tile = n_qa, n_kb, pid
    q_base, kv_base = q_ptr + bh * n_q * E, bh * n_k * E
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_e = tl.arange(0, BLOCK_E)
    q = _load_rows(q_base, offs_m, offs_e, n_q, E).to(DOT_DTYPE)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_E), tl.float32)
    for start in range(0, n_k, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        k = _load_rows(k_ptr + kv_base, offs_n, offs_e, n_k, E).to(DOT_DTYPE)
        s = tl.where(offs_n[None, :] < n_k, _scores(q, k, scale, PRECISION), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = _exp(s - m_new[:, None])
        rescale = _exp(m_i - m_new)
        l_i = l_i * rescale + tl.sum(p, 1)
        v = _load_rows(v_ptr + kv_base, offs_n, offs_e, n_k, E).to(DOT_DTYPE)
        acc = tl.dot(p.to(DOT_DTYPE), v, acc * rescale[:, None], input_precision=PRECISION)
        m_i = m_new
    acc = acc / l_i[:, None]
    mask = (offs_m[:, None] < n_q) & (offs_e[None, :] < E)
    tl.store(o_ptr + bh * n_q * E + offs_m[:, None] * E + offs_e[None, :], acc, mask=mask)
    tl.store(l_ptr + bh * n_q + offs_m, m_i + tl.log(l_i), mask=offs_m < n_q)


@triton.jit
def attention_bwd_dkdv_kernel(
    qa_ptr,
    kb_ptr,
    vb_ptr,
    doa_ptr,
    la_ptr,
    da_ptr,
    dkb_ptr,
    dvb_ptr,
    qb_ptr,
    ka_ptr,
    va_ptr,
    dob_ptr,
    lb_ptr,
    db_ptr,
    dka_ptr,
    dva_ptr,
    n_qa,
    n_ka,
    n_qb,
    n_kb,
    tiles_b,
    scale,
    BH0,  # the first (batch, head) of this launch's slice of grid axis 1 (common.axis_slices)
    E: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """Key tiles of b (direction a: queries of a) first, then key tiles of a (direction b)."""
    pid, bh = tl.program_id(0), (tl.program_id(1) + BH0).to(tl.int64)
    if pid >= tiles_b:
        q_ptr, k_ptr, v_ptr, do_ptr, l_ptr, d_ptr = qb_ptr, ka_ptr, va_ptr, dob_ptr, lb_ptr, db_ptr
        dk_ptr, dv_ptr = dka_ptr, dva_ptr
        n_q, n_k, tile = n_qb, n_ka, pid - tiles_b
    else:
        q_ptr, k_ptr, v_ptr, do_ptr, l_ptr, d_ptr = qa_ptr, kb_ptr, vb_ptr, doa_ptr, la_ptr, da_ptr
        dk_ptr, dv_ptr = dkb_ptr, dvb_ptr
        n_q, n_k, tile = n_qa, n_kb, pid
    q_base, kv_base = bh * n_q * E, bh * n_k * E
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_e = tl.arange(0, BLOCK_E)
    k = _load_rows(k_ptr + kv_base, offs_n, offs_e, n_k, E).to(DOT_DTYPE)
    v = _load_rows(v_ptr + kv_base, offs_n, offs_e, n_k, E).to(DOT_DTYPE)
    dk = tl.zeros((BLOCK_N, BLOCK_E), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_E), tl.float32)
    for start in range(0, n_q, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        row_ok = offs_m < n_q
        q = _load_rows(q_ptr + q_base, offs_m, offs_e, n_q, E).to(DOT_DTYPE)
        do = _load_rows(do_ptr + q_base, offs_m, offs_e, n_q, E).to(DOT_DTYPE)
        lse = tl.load(l_ptr + bh * n_q + offs_m, mask=row_ok, other=0.0)
        delta = tl.load(d_ptr + bh * n_q + offs_m, mask=row_ok, other=0.0)
        # P as the forward formed it (queries × keys), then transposed for the two products.
        p = _exp(_scores(q, k, scale, PRECISION) - lse[:, None])
        p = tl.where(row_ok[:, None] & (offs_n[None, :] < n_k), p, 0.0)
        dv = tl.dot(tl.trans(p).to(DOT_DTYPE), do, dv, input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dk = tl.dot(tl.trans(ds).to(DOT_DTYPE), q, dk, input_precision=PRECISION)
    mask = (offs_n[:, None] < n_k) & (offs_e[None, :] < E)
    out_offs = kv_base + offs_n[:, None] * E + offs_e[None, :]
    tl.store(dk_ptr + out_offs, dk * scale, mask=mask)
    tl.store(dv_ptr + out_offs, dv, mask=mask)


@triton.jit
def attention_bwd_dq_kernel(
    qa_ptr,
    kb_ptr,
    vb_ptr,
    doa_ptr,
    la_ptr,
    da_ptr,
    dqa_ptr,
    qb_ptr,
    ka_ptr,
    va_ptr,
    dob_ptr,
    lb_ptr,
    db_ptr,
    dqb_ptr,
    n_qa,
    n_ka,
    n_qb,
    n_kb,
    tiles_a,
    scale,
    BH0,  # the first (batch, head) of this launch's slice of grid axis 1 (common.axis_slices)
    E: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    pid, bh = tl.program_id(0), (tl.program_id(1) + BH0).to(tl.int64)
    if pid >= tiles_a:
        q_ptr, k_ptr, v_ptr, do_ptr, l_ptr, d_ptr, dq_ptr = qb_ptr, ka_ptr, va_ptr, dob_ptr, lb_ptr, db_ptr, dqb_ptr
        n_q, n_k, tile = n_qb, n_ka, pid - tiles_a
    else:
        q_ptr, k_ptr, v_ptr, do_ptr, l_ptr, d_ptr, dq_ptr = qa_ptr, kb_ptr, vb_ptr, doa_ptr, la_ptr, da_ptr, dqa_ptr
        n_q, n_k, tile = n_qa, n_kb, pid
    q_base, kv_base = bh * n_q * E, bh * n_k * E
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_e = tl.arange(0, BLOCK_E)
    row_ok = offs_m < n_q
    q = _load_rows(q_ptr + q_base, offs_m, offs_e, n_q, E).to(DOT_DTYPE)
    do = _load_rows(do_ptr + q_base, offs_m, offs_e, n_q, E).to(DOT_DTYPE)
    lse = tl.load(l_ptr + bh * n_q + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(d_ptr + bh * n_q + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros((BLOCK_M, BLOCK_E), tl.float32)
    for start in range(0, n_k, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        k = _load_rows(k_ptr + kv_base, offs_n, offs_e, n_k, E).to(DOT_DTYPE)
        v = _load_rows(v_ptr + kv_base, offs_n, offs_e, n_k, E).to(DOT_DTYPE)
        p = _exp(_scores(q, k, scale, PRECISION) - lse[:, None])
        p = tl.where(row_ok[:, None] & (offs_n[None, :] < n_k), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(DOT_DTYPE), k, dq, input_precision=PRECISION)
    mask = row_ok[:, None] & (offs_e[None, :] < E)
    tl.store(dq_ptr + q_base + offs_m[:, None] * E + offs_e[None, :], dq * scale, mask=mask)


@triton.jit
def gated_residual_fwd_kernel(f_ptr, o_ptr, g_ptr, alpha_ptr, y_ptr, numel, BLOCK: tl.constexpr):
    """y = f + α·sigmoid(g)·o, one pass; math in fp32 whatever the storage dtype."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    f = tl.load(f_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    o = tl.load(o_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    alpha = tl.load(alpha_ptr).to(tl.float32)
    tl.store(y_ptr + offs, f + alpha * tl.sigmoid(g) * o, mask=mask)


@triton.jit
def gated_residual_bwd_kernel(
    grad_ptr, o_ptr, g_ptr, alpha_ptr, do_ptr, dg_ptr, dalpha_partial_ptr, numel, BLOCK: tl.constexpr
):
    """d_o = α·s·grad, d_g = α·o·s(1−s)·grad; each program writes its partial sum of grad·s·o."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    grad = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    o = tl.load(o_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    alpha = tl.load(alpha_ptr).to(tl.float32)
    s = tl.sigmoid(g)
    tl.store(do_ptr + offs, alpha * s * grad, mask=mask)
    tl.store(dg_ptr + offs, alpha * o * s * (1.0 - s) * grad, mask=mask)
    tl.store(dalpha_partial_ptr + pid, tl.sum(grad * s * o, 0))
