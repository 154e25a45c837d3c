"""Triton implicit-GEMM quaternion convolution kernels (2D and 3D; 1D as a 3D conv with D=H=1).

Two kernels serve the whole op family, because every piece of it is a Hamilton product
(see ``aqcf_kernels.quaternion``):

* ``qconv_kernel``: ``y = W ⊗ x`` for a conv, ``y = conj(W) ⊗ x`` for a transposed conv (the
  adjoint, gathered: output pixel o reads input pixel (o + pad − k·dil) / stride when that divides).
  It is the forward of both and the input gradient of both (dgrad of a conv is a transposed conv
  with the same weight and vice versa).
* ``qconv_wgrad_kernel``: ``gW = gy ⊗ conj(x)`` for a (non-transposed) conv, split over pixels
  with fp32 atomics; the transposed conv's weight gradient swaps x and gy.

The four component tiles of the weight (or of gy) are loaded once per K step and the Hamilton
structure is applied in registers: the 16-block expanded weight is never written to memory.
``FAST8`` forms Howell & Lafon's 8 operand combinations at tile-load time (8 dots instead of
16) and undoes them in the epilogue, with the bias.

Only plain pointer arithmetic (``tl.make_block_ptr`` is gone in triton 3.9; GPUs here run 3.6).
Element offsets into x, y and gy are int64 (:func:`_pixel_offset`): these kernels serve the tensors of
2**31 elements or more, which the implicit GEMMs refuse. Pixel indices (``M``, ``P``) stay int32.
Loads are upcast to fp32 at once: bf16 arithmetic is wrong under ``TRITON_INTERPRET=1``, and
the fast8 combinations must not be rounded to half precision before the dot.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _dot(a, b, acc, SWAP: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """acc += a·b, the real product of left operand a and right operand b.

    ``SWAP``: the tiles are laid out so the GEMM is ``b @ a`` (conv: x-tile @ w-tile while the
    algebra is W ⊗ x); which operand is "left" matters for the quaternion signs only.
    """
    # if/else, not an early return: triton's frontend also compiles what follows a returning
    # constexpr branch, and the swapped dot would not type-check there.
    if SWAP:
        out = tl.dot(b.to(DOT_DTYPE), a.to(DOT_DTYPE), acc, input_precision=PRECISION)
    else:
        out = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=PRECISION)
    return out


@triton.jit
def _hamilton_acc(
    acc_r,
    acc_i,
    acc_j,
    acc_k,
    ar,
    ai,
    aj,
    ak,
    br,
    bi,
    bj,
    bk,
    SWAP: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """acc += A ⊗ B for one tile, ``dot(a_p, b_q)`` being one real product (A left of B)."""
    # Z_r = A_r B_r - A_i B_i - A_j B_j - A_k B_k
    acc_r = _dot(ar, br, acc_r, SWAP, DOT_DTYPE, PRECISION)
    acc_r = _dot(-ai, bi, acc_r, SWAP, DOT_DTYPE, PRECISION)
    acc_r = _dot(-aj, bj, acc_r, SWAP, DOT_DTYPE, PRECISION)
    acc_r = _dot(-ak, bk, acc_r, SWAP, DOT_DTYPE, PRECISION)
    # Z_i = A_i B_r + A_r B_i - A_k B_j + A_j B_k
    acc_i = _dot(ai, br, acc_i, SWAP, DOT_DTYPE, PRECISION)
    acc_i = _dot(ar, bi, acc_i, SWAP, DOT_DTYPE, PRECISION)
    acc_i = _dot(-ak, bj, acc_i, SWAP, DOT_DTYPE, PRECISION)
    acc_i = _dot(aj, bk, acc_i, SWAP, DOT_DTYPE, PRECISION)
    # Z_j = A_j B_r + A_k B_i + A_r B_j - A_i B_k
    acc_j = _dot(aj, br, acc_j, SWAP, DOT_DTYPE, PRECISION)
    acc_j = _dot(ak, bi, acc_j, SWAP, DOT_DTYPE, PRECISION)
    acc_j = _dot(ar, bj, acc_j, SWAP, DOT_DTYPE, PRECISION)
    acc_j = _dot(-ai, bk, acc_j, SWAP, DOT_DTYPE, PRECISION)
    # Z_k = A_k B_r - A_j B_i + A_i B_j + A_r B_k
    acc_k = _dot(ak, br, acc_k, SWAP, DOT_DTYPE, PRECISION)
    acc_k = _dot(-aj, bi, acc_k, SWAP, DOT_DTYPE, PRECISION)
    acc_k = _dot(ai, bj, acc_k, SWAP, DOT_DTYPE, PRECISION)
    acc_k = _dot(ar, bk, acc_k, SWAP, DOT_DTYPE, PRECISION)
    return acc_r, acc_i, acc_j, acc_k


@triton.jit
def _fast8_acc(
    s1,
    s2,
    s3,
    s4,
    s5,
    s6,
    s7,
    s8,
    ar,
    ai,
    aj,
    ak,
    br,
    bi,
    bj,
    bk,
    SWAP: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """s_m += L_m(A) · R_m(B): the 8 products of quaternion.FAST8_LEFT / FAST8_RIGHT."""
    s1 = _dot(ak - aj, bj - bk, s1, SWAP, DOT_DTYPE, PRECISION)
    s2 = _dot(ar + ai, br + bi, s2, SWAP, DOT_DTYPE, PRECISION)
    s3 = _dot(ar - ai, bj + bk, s3, SWAP, DOT_DTYPE, PRECISION)
    s4 = _dot(aj + ak, br - bi, s4, SWAP, DOT_DTYPE, PRECISION)
    s5 = _dot(ak - ai, bi - bj, s5, SWAP, DOT_DTYPE, PRECISION)
    s6 = _dot(ak + ai, bi + bj, s6, SWAP, DOT_DTYPE, PRECISION)
    s7 = _dot(ar + aj, br - bk, s7, SWAP, DOT_DTYPE, PRECISION)
    s8 = _dot(ar - aj, br + bk, s8, SWAP, DOT_DTYPE, PRECISION)
    return s1, s2, s3, s4, s5, s6, s7, s8


@triton.jit
def _fast8_finish(s1, s2, s3, s4, s5, s6, s7, s8):
    """quaternion.FAST8_OUT: Z_c = s_c + butterfly(s5..s8)_c / 2."""
    u = s5 - s6
    w = s5 + s6
    v = s7 + s8
    z = s7 - s8
    return s1 + 0.5 * (u + v), s2 + 0.5 * (u - v), s3 + 0.5 * (w + z), s4 + 0.5 * (w - z)


@triton.jit
def _quaternion_mma(
    acc, a, b, FAST8: tl.constexpr, SWAP: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr
):
    """One K step of ``A ⊗ B`` into the 8 accumulators (``acc[4:]`` are fast8's s5..s8; unused,
    and compiled away, for hamilton). ``a``, ``b``: (r, i, j, k) tiles."""
    if FAST8:
        out = _fast8_acc(*acc, *a, *b, SWAP, DOT_DTYPE, PRECISION)
    else:
        r, i, j, k = _hamilton_acc(acc[0], acc[1], acc[2], acc[3], *a, *b, SWAP, DOT_DTYPE, PRECISION)
        out = r, i, j, k, acc[4], acc[5], acc[6], acc[7]
    return out


@triton.jit
def _zero_accumulators(BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr):
    z = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    return z, z, z, z, z, z, z, z


@triton.jit
def _load_quaternion(ptrs, comp_stride, mask):
    """The r, i, j, k tiles at ``ptrs + c * comp_stride``, upcast to fp32 at once."""
    r = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    i = tl.load(ptrs + comp_stride, mask=mask, other=0.0).to(tl.float32)
    j = tl.load(ptrs + 2 * comp_stride, mask=mask, other=0.0).to(tl.float32)
    k = tl.load(ptrs + 3 * comp_stride, mask=mask, other=0.0).to(tl.float32)
    return r, i, j, k


@triton.jit
def _unflatten_pixels(offs, OD, OH, OW):
    """Flat (n, d, h, w) pixel index -> its coordinates."""
    ow = offs % OW
    t = offs // OW
    oh = t % OH
    t = t // OH
    return t // OD, t % OD, oh, ow


@triton.jit
def _pixel_offset(n, d, h, w, s_n, s_d, s_h, s_w):
    """``n·s_n + d·s_d + h·s_h + w·s_w`` in int64. The coordinates are int32 (from program ids and aranges)
    and so is every stride argument below 2**31; their products would wrap in int32 past 2**31 elements
    (e.g. sample n of a batch of 3D volumes: ``n·s_n``), so each coordinate is widened where it meets its
    stride (a stride in [2**31, 2**32), passed as u32, is zero-extended by the promotion)."""
    return n.to(tl.int64) * s_n + d.to(tl.int64) * s_d + h.to(tl.int64) * s_h + w.to(tl.int64) * s_w


@triton.jit
def _activate(v, ACTIVATION: tl.constexpr, negative_slope):
    """Epilogue activation on the fp32 accumulator: 0 none, 1 ReLU, 2 LeakyReLU, 3 GELU (erf)."""
    if ACTIVATION == 1:
        out = tl.maximum(v, 0.0)
    elif ACTIVATION == 2:
        out = tl.where(v > 0, v, v * negative_slope)
    elif ACTIVATION == 3:
        out = 0.5 * v * (1.0 + tl.math.erf(v * 0.7071067811865476))
    else:
        out = v
    return out


@triton.jit
def qconv_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    M,  # N * OD * OH * OW: output pixels
    CQ_IN,
    CQ_OUT,  # quaternion channels of x and y
    CG_IN,
    CG_OUT,  # per group
    ID,
    IH,
    IW,
    OD,
    OH,
    OW,
    KD,
    KH,
    KW,
    s_xn,
    s_xc,
    s_xd,
    s_xh,
    s_xw,
    s_yn,
    s_yc,
    s_yd,
    s_yh,
    s_yw,
    # weight strides: component, along output channel, along input channel, kernel dims;
    # and the offset of one group along the weight's grouped dim
    s_wp,
    s_wo,
    s_wc,
    s_wd,
    s_wh,
    s_ww,
    w_group,
    SD,
    SH,
    SW,
    PD,
    PH,
    PW,
    DD,
    DH,
    DW,
    z_ptr,  # pre-activation output (written only when STORE_PRE)
    negative_slope,
    TRANSPOSED: tl.constexpr,
    FAST8: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACTIVATION: tl.constexpr = 0,  # see ACTIVATION_CODES in triton/conv.py
    STORE_PRE: tl.constexpr = False,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.program_id(2)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    n, od, oh, ow = _unflatten_pixels(offs_m, OD, OH, OW)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < CG_OUT

    acc = _zero_accumulators(BLOCK_M, BLOCK_N)

    x_comp = tl.cast(CQ_IN, tl.int64) * s_xc  # distance between the r, i, j, k blocks of x (int64)
    w_base = w_ptr + g * w_group + offs_n[None, :] * s_wo
    for kk in range(0, KD * KH * KW):
        kw = kk % KW
        kh = (kk // KW) % KH
        kd = kk // (KW * KH)
        if TRANSPOSED:
            # output o receives input i where i * stride = o + pad - k * dil
            nd = od + PD - kd * DD
            nh = oh + PH - kh * DH
            nw = ow + PW - kw * DW
            idd = nd // SD
            ih = nh // SH
            iw = nw // SW
            valid = (nd >= 0) & (nh >= 0) & (nw >= 0) & (nd % SD == 0) & (nh % SH == 0) & (nw % SW == 0)
        else:
            idd = od * SD - PD + kd * DD
            ih = oh * SH - PH + kh * DH
            iw = ow * SW - PW + kw * DW
            valid = (idd >= 0) & (ih >= 0) & (iw >= 0)
        valid = valid & (idd < ID) & (ih < IH) & (iw < IW) & m_mask
        x_pix = x_ptr + _pixel_offset(n, idd, ih, iw, s_xn, s_xd, s_xh, s_xw)
        w_k = w_base + kd * s_wd + kh * s_wh + kw * s_ww
        for c0 in range(0, CG_IN, BLOCK_K):
            offs_k = c0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < CG_IN
            x_off = x_pix[:, None] + (g * CG_IN + offs_k).to(tl.int64)[None, :] * s_xc
            x_msk = valid[:, None] & k_mask[None, :]
            xr, xi, xj, xk = _load_quaternion(x_off, x_comp, x_msk)
            w_off = w_k + offs_k[:, None] * s_wc
            w_msk = k_mask[:, None] & n_mask[None, :]
            wr, wi, wj, wk = _load_quaternion(w_off, s_wp, w_msk)
            if TRANSPOSED:  # the adjoint: conj(W) ⊗ x
                wi = -wi
                wj = -wj
                wk = -wk
            # The GEMM is x-tile @ w-tile, but the algebra is W ⊗ x: W is the left operand (SWAP).
            acc = _quaternion_mma(acc, (wr, wi, wj, wk), (xr, xi, xj, xk), FAST8, True, DOT_DTYPE, PRECISION)
    acc_r, acc_i, acc_j, acc_k = acc[0], acc[1], acc[2], acc[3]
    if FAST8:
        acc_r, acc_i, acc_j, acc_k = _fast8_finish(*acc)

    ch = g * CG_OUT + offs_n
    # z (when stored) has y's shape and strides: one offset serves both
    y_rel = _pixel_offset(n, od, oh, ow, s_yn, s_yd, s_yh, s_yw)[:, None] + ch.to(tl.int64)[None, :] * s_yc
    y_off = y_ptr + y_rel
    y_msk = m_mask[:, None] & n_mask[None, :]
    y_comp = tl.cast(CQ_OUT, tl.int64) * s_yc
    if HAS_BIAS:
        acc_r += tl.load(b_ptr + ch, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        acc_i += tl.load(b_ptr + CQ_OUT + ch, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        acc_j += tl.load(b_ptr + 2 * CQ_OUT + ch, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        acc_k += tl.load(b_ptr + 3 * CQ_OUT + ch, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_ty = y_ptr.dtype.element_ty
    if STORE_PRE:  # the backward of GELU (or a negative slope) needs z itself
        z_off = z_ptr + y_rel
        tl.store(z_off, acc_r.to(out_ty), mask=y_msk)
        tl.store(z_off + y_comp, acc_i.to(out_ty), mask=y_msk)
        tl.store(z_off + 2 * y_comp, acc_j.to(out_ty), mask=y_msk)
        tl.store(z_off + 3 * y_comp, acc_k.to(out_ty), mask=y_msk)
    tl.store(y_off, _activate(acc_r, ACTIVATION, negative_slope).to(out_ty), mask=y_msk)
    tl.store(y_off + y_comp, _activate(acc_i, ACTIVATION, negative_slope).to(out_ty), mask=y_msk)
    tl.store(y_off + 2 * y_comp, _activate(acc_j, ACTIVATION, negative_slope).to(out_ty), mask=y_msk)
    tl.store(y_off + 3 * y_comp, _activate(acc_k, ACTIVATION, negative_slope).to(out_ty), mask=y_msk)


@triton.jit
def qconv_wgrad_kernel(
    x_ptr,
    gy_ptr,
    gw_ptr,
    P,  # N * OD * OH * OW: pixels of gy, the reduction dim
    SPLITS,  # the pixel reduction is split in SPLITS programs per (tile, tap, group)
    CQ_IN,
    CQ_OUT,
    CG_IN,
    CG_OUT,
    ID,
    IH,
    IW,
    OD,
    OH,
    OW,
    KD,
    KH,
    KW,
    s_xn,
    s_xc,
    s_xd,
    s_xh,
    s_xw,
    s_gn,
    s_gc,
    s_gd,
    s_gh,
    s_gw,
    SD,
    SH,
    SW,
    PD,
    PH,
    PW,
    DD,
    DH,
    DW,
    FAST8: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """gW (4, CQ_OUT, CG_IN, KD, KH, KW), fp32, zero-filled, += gy ⊗ conj(x) over one pixel split."""
    pid_oc = tl.program_id(0)
    kk = tl.program_id(1)
    pid_gs = tl.program_id(2)
    # Each split reduces a whole number of BLOCK_P slices (BLOCK_P is the autotuner's choice).
    per_split = tl.cdiv(tl.cdiv(P, SPLITS), BLOCK_P) * BLOCK_P
    g = pid_gs // SPLITS
    split = pid_gs % SPLITS
    n_cblk = tl.cdiv(CG_IN, BLOCK_C)
    offs_o = (pid_oc // n_cblk) * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_c = (pid_oc % n_cblk) * BLOCK_C + tl.arange(0, BLOCK_C)
    o_mask = offs_o < CG_OUT
    c_mask = offs_c < CG_IN
    kw = kk % KW
    kh = (kk // KW) % KH
    kd = kk // (KW * KH)

    acc = _zero_accumulators(BLOCK_O, BLOCK_C)

    g_comp = tl.cast(CQ_OUT, tl.int64) * s_gc
    x_comp = tl.cast(CQ_IN, tl.int64) * s_xc
    g_ch = (g * CG_OUT + offs_o).to(tl.int64) * s_gc
    x_ch = (g * CG_IN + offs_c).to(tl.int64) * s_xc
    p_start = split * per_split
    # The split count is the launcher's, the slice size the autotuner's: trailing splits can be
    # empty, and then skip the loop (their atomics add zeros).
    p_end = tl.minimum(p_start + per_split, P)
    for p0 in range(p_start, p_end, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        p_mask = offs_p < P
        n, od, oh, ow = _unflatten_pixels(offs_p, OD, OH, OW)
        idd = od * SD - PD + kd * DD
        ih = oh * SH - PH + kh * DH
        iw = ow * SW - PW + kw * DW
        valid = p_mask & (idd >= 0) & (ih >= 0) & (iw >= 0) & (idd < ID) & (ih < IH) & (iw < IW)
        # gy tiles as [BLOCK_O, BLOCK_P] (the left operand), x tiles as [BLOCK_P, BLOCK_C]
        g_off = g_ch[:, None] + _pixel_offset(n, od, oh, ow, s_gn, s_gd, s_gh, s_gw)[None, :]
        g_msk = o_mask[:, None] & p_mask[None, :]
        gr, gi, gj, gk = _load_quaternion(gy_ptr + g_off, g_comp, g_msk)
        x_off = _pixel_offset(n, idd, ih, iw, s_xn, s_xd, s_xh, s_xw)[:, None] + x_ch[None, :]
        x_msk = valid[:, None] & c_mask[None, :]
        xr, xi, xj, xk = _load_quaternion(x_ptr + x_off, x_comp, x_msk)
        # conj(x): the weight gradient is gy ⊗ conj(x)
        acc = _quaternion_mma(acc, (gr, gi, gj, gk), (xr, -xi, -xj, -xk), FAST8, False, DOT_DTYPE, PRECISION)
    acc_r, acc_i, acc_j, acc_k = acc[0], acc[1], acc[2], acc[3]
    if FAST8:
        acc_r, acc_i, acc_j, acc_k = _fast8_finish(*acc)

    kvol = KD * KH * KW
    s_o = CG_IN * kvol
    s_p = CQ_OUT * s_o
    gw_off = ((g * CG_OUT + offs_o) * s_o)[:, None] + (offs_c * kvol)[None, :] + kk
    gw_msk = o_mask[:, None] & c_mask[None, :]
    tl.atomic_add(gw_ptr + gw_off, acc_r, mask=gw_msk)
    tl.atomic_add(gw_ptr + gw_off + s_p, acc_i, mask=gw_msk)
    tl.atomic_add(gw_ptr + gw_off + 2 * s_p, acc_j, mask=gw_msk)
    tl.atomic_add(gw_ptr + gw_off + 3 * s_p, acc_k, mask=gw_msk)
