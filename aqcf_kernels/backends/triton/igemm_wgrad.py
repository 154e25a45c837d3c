"""Weight (and bias) gradient of the implicit-GEMM quaternion conv: one GEMM with split-K over pixels,
then one small kernel that reduces the splits and folds the Hamilton blocks (issue 13, second design).

A module of its own rather than more of :mod:`.igemm`: it is the same concept (the GEMM on the packed,
expanded weight, on channels_last activations) seen from the other side, and it shares igemm's
boundary helpers and packing layout, but its loop runs over pixels, not over (tap, channel), so the
two kernels have nothing else in common.

**The GEMM.** :func:`.igemm.pack_weight` stores per group the expanded weight K-major,
``E[g] = [4·Cg_out, taps·4·Cg_in]`` (row ``c·Cg_out + o``, column ``tap·4·Cg_in + a·Cg_in + i``), and
the forward is ``y = im2col(x) · E[g]ᵀ``. Its gradient is therefore one GEMM per group::

    dE[g] = gyᵀ · im2col(x)          M = output channels, N = (tap, input channel), K = pixels N·spatial

* **Split-K over pixels** (grid axis 1): split s reduces a contiguous pixel range into its own fp32
  partial buffer ``[splits, G, 4·Cg_out, taps·4·Cg_in]`` — no atomics, so the result is deterministic
  (bit-identical from run to run for a given tile config) and the autotuner needs no reset. The split
  count is each tile config's own (:func:`config_splits`: two programs an SM), read by the kernel from
  its grid; the buffers are sized for the tuned config's, or for the most any config takes while the
  autotuner tries them, and the fold sums those of the config that ran.
* **A column block never crosses a tap** (nor, with groups, a component): it is BLOCK_N contiguous
  channels of one tap, so the x tile of a step is BLOCK_K pixels × BLOCK_N contiguous channels (16-byte
  vector loads, async copies when pipelined), and the tap's spatial offset ``k·dil − pad`` is a
  scalar computed once per program. A program takes ``RUNS`` consecutive column blocks (1, 2 or 4), one
  x tile and one dot each on the step's one gy tile: where a tap's run is 64 channels (16q; fast8 at 64q)
  no block is wider than 64, and one 64×64 block a program issued 186 instructions a step for 128
  tensor-core clocks (sm_90, 4 warps), four 434 for 512. The gy tile is BLOCK_K pixels × BLOCK_M
  contiguous channels. One ``tl.dot`` per step and block: ``acc += tl.trans(gy_tile) · x_tile`` (both
  operands pixel-major in memory, i.e. MN-major: wgmma reads 16-bit MN-major operands from shared memory
  directly; compiled for sm_90 by triton 3.6, TF32 gets wgmma in flight too:
  ``tools/triton_resources.py --wgrad``).
* **Per-pixel coordinates without a division in the loop**: the pixel coordinates (n, od, oh, ow) of a
  step are those of the previous step plus BLOCK_K written in the mixed radix (OW, OH, OD): digits
  computed once, then an add and a conditional subtract per digit (each digit's carry is 0 or 1). A
  runtime ``//`` and ``%`` per pixel and step (what the old kernel does) costs more issue slots than
  the wgmma it feeds.
* **Bias gradient from the same launch**: with ``HAS_BIAS`` the grid has a few more programs that sum
  the conv's output gradient over their split's pixels (``[splits, C]`` fp32 partial sums); they read
  the same pixel range the GEMM programs of that split read, while those run. A conv's backward with a
  bias asks for it through ``aqcf::qconv_weight_bias_grad`` (the backend's ``conv_weight_bias_grad``).
* Groups: the group is grid axis 2; with groups each component of a group is its own run of channels
  (``GROUPED``), as in igemm. Geometry: 1d/2d/3d as 3d with size-1 dims (launch-time specialisation
  makes them constants). A transposed conv's weight gradient is the conv's with input and
  grad_output swapped (the transposed conv is the conv's adjoint with the same weight), so the GEMM
  always reads through the conv's index map; its bias gradient is then the sum of the *x* operand.

**The fold** (:func:`qconv_wgrad_fold_kernel`): ``gW_p = Σ_s Σ_{c,a} T[p, c, a] · dE_s[c, a]`` with
``T = quaternion.hamilton_table`` — the adjoint of the expansion (each block (c, a) of E is ±W_p) — read
as a 4×16 table, so no quaternion algebra is written out in the kernel. Splits are summed in a fixed
order; the result is cast to the input dtype. The same launch reduces the bias partial sums.

**fast8** (``gW = gy ⊗ conj(x)`` with 8 products): the same GEMM on the combinations of gy and conj(x)
(:func:`.fast8.combine_activation`), each product of each group one run of Cg channels on both sides
(``FAST8``: the product-groups ``m·G + g`` are the group axis, 8·G of them), so 8 GEMMs of a sixteenth
of the hamilton GEMM's size each; the fold applies the butterfly (:func:`.fast8.fold_table`) instead of
the Hamilton table. A program may take the same tile of four products (``FAST8_PRODUCTS`` 4: products
4·h..4·h+3 of one group, 2·G programs on the group axis): four gy tiles, four x tiles and four dots a
step, the products' runs ``Cq_out`` / ``Cq_in`` channels apart, on one set of pixel counters and one tap's
masks (sm_90: 356 instructions a step for four 64×64×64 dots on 4 warps, issue share 0.70, against 434
and 0.85 for four column blocks of one product).

**Why a conv + activation's dL/dz is not formed here** (issue 13 asked for the activation's gradient
applied while loading gy). Tried on 2026-12-04 and compiled for sm_90 by triton 3.6: with gy's tile
multiplied by ``act'(gate)`` as it is loaded (a gate tile copied like gy's), gy and its gate went
through plain loads, not async copies, at 199–255 registers, with 224 B spilled at 128×64×64. On a
transposed conv's weight gradient, where the gate belongs to the x operand, the three copies stayed
async but the wgmma were waited on with 0 in flight. The input-gradient GEMM (:mod:`.igemm`) took the
same change without loss: three async copies, wgmma in flight, 0 spills. But it saves nothing on its
own, because this GEMM needs dL/dz as well. So dL/dz is written once, for both GEMMs to read, by one
pass that also sums the bias gradient from its registers (``aqcf::activation_grad_bias``, on CUDA the
kernel of :mod:`.activation_grad`); the GEMMs' loads stay as they are.

Accumulation is fp32 throughout; inputs fp16 / bf16 / fp32 (see :func:`common.dot_config`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...params import ConvParams
from ...quaternion import hamilton_table
from . import common
from .channels import chan_align, said_multiple
from .conv_kernels import _unflatten_pixels
from .fast8 import PRODUCTS, combine_activation, fold_table
from .igemm import INT32_LIMIT, _channels_last_5d, _spatial3, operand_buffers_fit

# --------------------------------------------------------------------------------------------
# the GEMM kernel
# --------------------------------------------------------------------------------------------


@triton.jit
def carry_digit(digit, add, size):
    """``(digit + add) mod size`` and the carry out (0 or 1), for ``digit < size`` and ``add <= size``: a
    mixed-radix counter's digit advanced without a division."""
    digit += add
    carry = digit >= size
    return tl.where(carry, digit - size, digit), carry.to(tl.int32)


@triton.jit
def _split_range(P, split, SPLITS, BLOCK_K: tl.constexpr):
    """``[start, end)`` of split ``split`` over ``P`` pixels: a whole number of BLOCK_K steps each (trailing
    splits may be empty: their programs write zeros)."""
    per_split = tl.cdiv(tl.cdiv(P, SPLITS), BLOCK_K) * BLOCK_K
    start = split * per_split
    return start, tl.minimum(start + per_split, P)


@triton.jit
def _wgrad_gemm_tile(
    x_ptr, gy_ptr, part_ptr, tile, split, g, G,
    M, C_Y, K_TAP, N_G, CQ_IN, CG_IN, CQ_OUT, CG_OUT,
    ID, IH, IW, OD, OH, OW, KD, KH, KW,
    s_xn, s_xd, s_xh, s_xw, SD, SH, SW, PD, PH, PW, DD, DH, DW, SPLITS,
    DIMS: tl.constexpr, P_EVEN: tl.constexpr, GROUPED: tl.constexpr, FAST8: tl.constexpr,
    CHAN_ALIGN: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, RUNS: tl.constexpr, FAST8_PRODUCTS: tl.constexpr,
):  # fmt: skip
    """``RUNS`` [BLOCK_M, BLOCK_N] tiles (consecutive column blocks, one dot each on the same gy tile) of split
    ``split``'s partial dE of group g (FAST8: of product-group g; with ``FAST8_PRODUCTS`` 4, the same tile of
    four products' GEMMs, one gy tile, x tile and dot each a step: program g takes products 4·(g // groups)
    to 4·(g // groups) + 3 of group g % groups)."""
    if FAST8:
        if FAST8_PRODUCTS == 4:  # from here on g is product-group (first product)·groups + group, G all of them
            tl.static_assert(RUNS == 1, "four products a program take one column block each")
            groups = CQ_OUT // CG_OUT
            g = (g // groups) * 4 * groups + g % groups
            G = 4 * G
    # Rows (output channels) and columns (one tap's input channels) come in runs of contiguous
    # channels: one run of 4·Cg without groups, one per component with them. (Without groups the run
    # offsets are literal 0s: an unhinted runtime term would cost the tiles their 16-byte alignment.)
    if FAST8:  # product-group g = m·G + group: one run of Cg channels of each combined operand
        rseg_len = CG_OUT
        rseg_stride = 0
        y_chan = g * CG_OUT
        n_rseg = 1
        cseg_len = CG_IN
        cseg_stride = 0
        x_chan = g * CG_IN
        n_cseg = 1
    elif GROUPED:
        rseg_len = CG_OUT
        rseg_stride = CQ_OUT
        y_chan = g * CG_OUT
        n_rseg = 4
        cseg_len = CG_IN
        cseg_stride = CQ_IN
        x_chan = g * CG_IN
        n_cseg = 4
    else:
        rseg_len = N_G
        rseg_stride = 0
        y_chan = 0
        n_rseg = 1
        cseg_len = K_TAP
        cseg_stride = 0
        x_chan = 0
        n_cseg = 1
    # Every run's length, hence where each run starts and the pixel strides of gy and x, is a multiple of
    # CHAN_ALIGN: said to the compiler, so that the masks are constant over aligned groups of channels and
    # the copies stay 16 bytes wide where launch-time specialisation alone cannot tell (runs of 40).
    rseg_len = said_multiple(rseg_len, CHAN_ALIGN)
    cseg_len = said_multiple(cseg_len, CHAN_ALIGN)
    c_y = said_multiple(C_Y, CHAN_ALIGN)
    y_next = said_multiple(CQ_OUT, CHAN_ALIGN)  # fast8: from one product's gy run to the next's
    x_next = said_multiple(CQ_IN, CHAN_ALIGN)  # and x's
    rblocks = tl.cdiv(rseg_len, BLOCK_M)
    n_rows = n_rseg * rblocks
    row_tile = tile % n_rows  # consecutive programs share the x tiles (same columns), differ in gy rows
    col_tile = tile // n_rows
    rseg = row_tile // rblocks
    ro = (row_tile - rseg * rblocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = ro < rseg_len
    gy_cols = said_multiple(y_chan + rseg * rseg_stride, CHAN_ALIGN) + ro
    # the program's RUNS column blocks: consecutive (tap, run, channel block) triples, each with its tap's
    # offset into the input hoisted (input = output · stride + (k · dil − pad))
    cblocks = tl.cdiv(cseg_len, BLOCK_N)
    per_tap = n_cseg * cblocks
    # fmt: off
    td0, th0, tw0, xc0, kok0, oc0 = _column_block(
        col_tile * RUNS, per_tap, cblocks, x_chan, cseg_stride, cseg_len, K_TAP, KD, KH, KW, DD, DH, DW, PD, PH, PW,
        CHAN_ALIGN, BLOCK_N)
    if RUNS >= 2:
        td1, th1, tw1, xc1, kok1, oc1 = _column_block(
            col_tile * RUNS + 1, per_tap, cblocks, x_chan, cseg_stride, cseg_len, K_TAP, KD, KH, KW, DD, DH, DW,
            PD, PH, PW, CHAN_ALIGN, BLOCK_N)
    if RUNS == 4:
        td2, th2, tw2, xc2, kok2, oc2 = _column_block(
            col_tile * RUNS + 2, per_tap, cblocks, x_chan, cseg_stride, cseg_len, K_TAP, KD, KH, KW, DD, DH, DW,
            PD, PH, PW, CHAN_ALIGN, BLOCK_N)
        td3, th3, tw3, xc3, kok3, oc3 = _column_block(
            col_tile * RUNS + 3, per_tap, cblocks, x_chan, cseg_stride, cseg_len, K_TAP, KD, KH, KW, DD, DH, DW,
            PD, PH, PW, CHAN_ALIGN, BLOCK_N)
    # fmt: on

    p_start, p_end = _split_range(M, split, SPLITS, BLOCK_K)
    # Pixel coordinates of the first step (the only division per pixel), and BLOCK_K in the mixed
    # radix (OW, OH, OD, N): each step adds these digits, carrying at most 1 into the next digit.
    offs_p = p_start + tl.arange(0, BLOCK_K)
    nb, od, oh, ow = _unflatten_pixels(offs_p, OD, OH, OW)
    step_n, step_d, step_h, step_w = _unflatten_pixels(BLOCK_K, OD, OH, OW)

    acc0 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc1 = acc0
    acc2 = acc0
    acc3 = acc0
    for p0 in range(p_start, p_end, BLOCK_K):
        offs_p = p0 + tl.arange(0, BLOCK_K)
        p_ok = offs_p < p_end
        gy_tile = gy_ptr + offs_p[:, None] * c_y + gy_cols[None, :]
        a = _gy_operand(gy_tile, r_ok, p_ok, P_EVEN, DOT_DTYPE)
        # one dot per column block, on the same gy tile
        # fmt: off
        b = _x_tile(x_ptr, nb, od, oh, ow, td0, th0, tw0, xc0, kok0, p_ok, ID, IH, IW, s_xn, s_xd, s_xh, s_xw, SD,
                    SH, SW, DIMS, P_EVEN, CHAN_ALIGN)
        acc0 = tl.dot(a, b.to(DOT_DTYPE), acc0, input_precision=PRECISION)
        if FAST8:
            if FAST8_PRODUCTS == 4:  # the next products: their runs start CQ_OUT / CQ_IN channels on
                for j in tl.static_range(1, 4):
                    a = _gy_operand(gy_tile + j * y_next, r_ok, p_ok, P_EVEN, DOT_DTYPE)
                    b = _x_tile(x_ptr, nb, od, oh, ow, td0, th0, tw0, xc0 + j * x_next, kok0, p_ok, ID, IH, IW,
                                s_xn, s_xd, s_xh, s_xw, SD, SH, SW, DIMS, P_EVEN, CHAN_ALIGN)
                    if j == 1:
                        acc1 = tl.dot(a, b.to(DOT_DTYPE), acc1, input_precision=PRECISION)
                    elif j == 2:
                        acc2 = tl.dot(a, b.to(DOT_DTYPE), acc2, input_precision=PRECISION)
                    else:
                        acc3 = tl.dot(a, b.to(DOT_DTYPE), acc3, input_precision=PRECISION)
        if RUNS >= 2:
            b = _x_tile(x_ptr, nb, od, oh, ow, td1, th1, tw1, xc1, kok1, p_ok, ID, IH, IW, s_xn, s_xd, s_xh, s_xw,
                        SD, SH, SW, DIMS, P_EVEN, CHAN_ALIGN)
            acc1 = tl.dot(a, b.to(DOT_DTYPE), acc1, input_precision=PRECISION)
        if RUNS == 4:
            b = _x_tile(x_ptr, nb, od, oh, ow, td2, th2, tw2, xc2, kok2, p_ok, ID, IH, IW, s_xn, s_xd, s_xh, s_xw,
                        SD, SH, SW, DIMS, P_EVEN, CHAN_ALIGN)
            acc2 = tl.dot(a, b.to(DOT_DTYPE), acc2, input_precision=PRECISION)
            b = _x_tile(x_ptr, nb, od, oh, ow, td3, th3, tw3, xc3, kok3, p_ok, ID, IH, IW, s_xn, s_xd, s_xh, s_xw,
                        SD, SH, SW, DIMS, P_EVEN, CHAN_ALIGN)
            acc3 = tl.dot(a, b.to(DOT_DTYPE), acc3, input_precision=PRECISION)
        # fmt: on
        ow, carry = carry_digit(ow, step_w, OW)
        if DIMS >= 2:
            oh, carry = carry_digit(oh, step_h + carry, OH)
        if DIMS == 3:
            od, carry = carry_digit(od, step_d + carry, OD)
        nb += step_n + carry

    # partial dE of (split, group): row rseg·rseg_len + o, column tap·K_TAP + cseg·cseg_len + channel
    rows = (split * G + g) * N_G + rseg * rseg_len + ro
    out = part_ptr + rows[:, None] * (KD * KH * KW * K_TAP)
    tl.store(out + oc0[None, :], acc0, mask=r_ok[:, None] & kok0[None, :])
    if FAST8:
        if FAST8_PRODUCTS == 4:  # product j's partial: product-group g + j·groups
            step = groups * N_G * (KD * KH * KW * K_TAP)
            tl.store(out + step + oc0[None, :], acc1, mask=r_ok[:, None] & kok0[None, :])
            tl.store(out + 2 * step + oc0[None, :], acc2, mask=r_ok[:, None] & kok0[None, :])
            tl.store(out + 3 * step + oc0[None, :], acc3, mask=r_ok[:, None] & kok0[None, :])
    if RUNS >= 2:
        tl.store(out + oc1[None, :], acc1, mask=r_ok[:, None] & kok1[None, :])
    if RUNS == 4:
        tl.store(out + oc2[None, :], acc2, mask=r_ok[:, None] & kok2[None, :])
        tl.store(out + oc3[None, :], acc3, mask=r_ok[:, None] & kok3[None, :])


@triton.jit
def _gy_operand(gy_tile, r_ok, p_ok, P_EVEN: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """A step's gy tile (pixels x output channels at ``gy_tile``) as the dot's left operand: transposed."""
    if P_EVEN:  # every step of every split is BLOCK_K whole pixels
        a = tl.load(gy_tile, mask=r_ok[None, :], other=0.0)
    else:
        a = tl.load(gy_tile, mask=p_ok[:, None] & r_ok[None, :], other=0.0)
    return tl.trans(a.to(DOT_DTYPE))


@triton.jit
def _column_block(
    b, per_tap, cblocks, x_chan, cseg_stride, cseg_len, K_TAP, KD, KH, KW, DD, DH, DW, PD, PH, PW,
    CHAN_ALIGN: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Column block ``b`` of the GEMM, the ``(tap, run, channel block)`` of its index: ``(td, th, tw)``, its
    tap's offset into the input; x's channels of the block; which of them exist (none past the last tap: a
    program's last blocks may run past it); and their columns in the partial dE."""
    tap = b // per_tap
    rc = b - tap * per_tap
    cseg = rc // cblocks
    ck = (rc - cseg * cblocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok = ck < tl.where(tap < KD * KH * KW, cseg_len, 0)
    x_cols = said_multiple(x_chan + cseg * cseg_stride, CHAN_ALIGN) + ck
    td = (tap // (KW * KH)) * DD - PD
    th = ((tap // KW) % KH) * DH - PH
    tw = (tap % KW) * DW - PW
    return td, th, tw, x_cols, k_ok, tap * K_TAP + cseg * cseg_len + ck


@triton.jit
def _x_tile(
    x_ptr, nb, od, oh, ow, td, th, tw, x_cols, k_ok, p_ok, ID, IH, IW, s_xn, s_xd, s_xh, s_xw, SD, SH, SW,
    DIMS: tl.constexpr, P_EVEN: tl.constexpr, CHAN_ALIGN: tl.constexpr,
):  # fmt: skip
    """A step's x tile of one column block: its pixels' inputs through the block's tap (zero outside the
    input), its channels.

    Only the last DIMS of (d, h, w) are real dims (1d and 2d convs run as 3d with size-1 dims): the others
    are neither checked nor carried. A coordinate is in bounds when it is below the size as an unsigned
    number (negative ones wrap above it): one compare per dim. Each of these is an instruction per pixel a
    thread holds, every step, in a loop that must issue less than its wgmma takes."""
    iw = ow * SW + tw
    ok = iw.to(tl.uint32, bitcast=True) < IW
    x_rows = nb * s_xn + iw * s_xw
    if DIMS >= 2:
        ih = oh * SH + th
        ok = ok & (ih.to(tl.uint32, bitcast=True) < IH)
        x_rows += ih * s_xh
    if DIMS == 3:
        idd = od * SD + td
        ok = ok & (idd.to(tl.uint32, bitcast=True) < ID)
        x_rows += idd * s_xd
    x_tile = x_ptr + tl.multiple_of(x_rows, CHAN_ALIGN)[:, None] + x_cols[None, :]
    if P_EVEN:
        return tl.load(x_tile, mask=ok[:, None] & k_ok[None, :], other=0.0)
    else:
        return tl.load(x_tile, mask=(p_ok & ok)[:, None] & k_ok[None, :], other=0.0)


@triton.jit
def _bias_partial_tile(
    src_ptr, bpart_ptr, tile, split, P, C, SPLITS, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr
):  # fmt: skip
    """``bpart[split, c] = Σ src[p, c]`` over the split's pixels, for BLOCK_C channels (src (P, C) contiguous)."""
    cols = tile * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cols < C
    p_start, p_end = _split_range(P, split, SPLITS, BLOCK_P)
    # element-wise fp32 sums in registers, one cross-thread reduction at the end
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for p0 in range(p_start, p_end, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        v_ok = (offs_p < p_end)[:, None] & c_ok[None, :]
        acc += tl.load(src_ptr + offs_p[:, None] * C + cols[None, :], mask=v_ok, other=0.0).to(tl.float32)
    tl.store(bpart_ptr + split * C + cols, tl.sum(acc, axis=0), mask=c_ok)


@triton.jit
def qconv_wgrad_igemm_kernel(
    x_ptr,  # (N, ID, IH, IW, C_X) channels_last, contiguous: the conv's input
    gy_ptr,  # (M, C_Y) channels_last, contiguous: the gradient of the conv's output
    part_ptr,  # (≥ SPLITS, G, N_G, KD*KH*KW*K_TAP) fp32: partial dE per split
    bsrc_ptr,  # (MB, C_B) contiguous: the tensor whose pixel sums are the bias gradient (HAS_BIAS)
    bpart_ptr,  # (≥ SPLITS, C_B) fp32: partial bias sums (HAS_BIAS)
    M,  # N * OD * OH * OW: output pixels, the reduction dim
    C_Y,  # 4 * CQ_OUT: channels of gy (FAST8: 8 * CQ_OUT, its combinations)
    K_TAP,  # 4 * CG_IN: input channels of a group per tap
    N_G,  # 4 * CG_OUT: output channels of a group (GEMM M)
    CQ_IN,
    CG_IN,
    CQ_OUT,
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
    s_xd,
    s_xh,
    s_xw,
    SD,
    SH,
    SW,
    PD,
    PH,
    PW,
    DD,
    DH,
    DW,
    MB,  # pixels of the bias source
    C_B,  # channels of the bias source
    DIMS: tl.constexpr,  # spatial dims of the conv: the last DIMS of (D, H, W) have extent
    P_EVEN: tl.constexpr,  # M a multiple of P_ALIGN: no step of any split is partial
    CHAN_ALIGN: tl.constexpr,  # a power of two dividing the runs of both operands (igemm.chan_align)
    GROUPED: tl.constexpr,
    FAST8: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    RUNS: tl.constexpr,  # column blocks per program (1, 2 or 4), one dot each on the step's gy tile
    FAST8_PRODUCTS: tl.constexpr,  # fast8's products per program (1 or 4; with RUNS 1); ignored without FAST8
):
    """Grid ``(GEMM tiles [+ bias tiles per group], SPLITS, G)``; see the module docstring. The split count is
    the grid's: each tile config gets its own (:func:`config_splits`)."""
    tile = tl.program_id(0)
    split = tl.program_id(1)
    SPLITS = tl.num_programs(1)
    g = tl.program_id(2)
    G = tl.num_programs(2)
    n_seg = 4 if GROUPED and not FAST8 else 1
    row_len = CG_OUT if GROUPED or FAST8 else N_G
    col_len = CG_IN if GROUPED or FAST8 else K_TAP
    gemm_tiles = n_seg * tl.cdiv(row_len, BLOCK_M) * tl.cdiv(KD * KH * KW * n_seg * tl.cdiv(col_len, BLOCK_N), RUNS)
    # (the GEMM call is written once per constexpr branch: only one of them is compiled)
    if HAS_BIAS:
        if tile >= gemm_tiles:  # the bias programs: channel tiles dealt over the groups' grid axis
            _bias_partial_tile(
                bsrc_ptr, bpart_ptr, (tile - gemm_tiles) * G + g, split, MB, C_B, SPLITS, BLOCK_M, BLOCK_K
            )
        else:
            _wgrad_gemm_tile(
                x_ptr, gy_ptr, part_ptr, tile, split, g, G, M, C_Y, K_TAP, N_G, CQ_IN, CG_IN, CQ_OUT, CG_OUT,
                ID, IH, IW, OD, OH, OW, KD, KH, KW, s_xn, s_xd, s_xh, s_xw, SD, SH, SW, PD, PH, PW, DD, DH, DW,
                SPLITS, DIMS, P_EVEN, GROUPED, FAST8, CHAN_ALIGN, DOT_DTYPE, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
                RUNS, FAST8_PRODUCTS,
            )  # fmt: skip
    else:
        _wgrad_gemm_tile(
            x_ptr, gy_ptr, part_ptr, tile, split, g, G, M, C_Y, K_TAP, N_G, CQ_IN, CG_IN, CQ_OUT, CG_OUT,
            ID, IH, IW, OD, OH, OW, KD, KH, KW, s_xn, s_xd, s_xh, s_xw, SD, SH, SW, PD, PH, PW, DD, DH, DW,
            SPLITS, DIMS, P_EVEN, GROUPED, FAST8, CHAN_ALIGN, DOT_DTYPE, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
            RUNS, FAST8_PRODUCTS,
        )  # fmt: skip


# --------------------------------------------------------------------------------------------
# the reduce-and-fold kernel
# --------------------------------------------------------------------------------------------


@triton.jit
def qconv_wgrad_fold_kernel(
    part_ptr,  # (SPLITS, G, N_G, TAPS*K_TAP) fp32; fast8: (SPLITS, 8·G, CG_OUT, TAPS*CG_IN), product-major
    t_ptr,  # (4, NB) fp32: gW_p = Σ_b t[p, b] · block b
    gw_ptr,  # (4, CQ_OUT, CG_IN, TAPS) in the weight's dtype
    bpart_ptr,  # (SPLITS, C_B) fp32 (HAS_BIAS)
    gb_ptr,  # (C_B,) in the bias gradient's dtype (HAS_BIAS)
    Q,  # CQ_OUT * CG_IN * TAPS: positions of one component of gW
    SPLIT_STRIDE,  # elements of one split's partial dE
    SPLITS,
    N_G,  # partial rows per group: 4·CG_OUT (fast8: CG_OUT)
    K_TAP,  # partial columns per tap: 4·CG_IN (fast8: CG_IN)
    PRODUCT_STRIDE,  # fast8: elements of one product's partial, G·CG_OUT·TAPS·CG_IN
    CG_OUT,
    CG_IN,
    TAPS,
    C_B,
    NB: tl.constexpr,  # blocks folded per position: 16 (hamilton's (c, a) blocks) or 8 (fast8's products)
    HAS_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``gW[p, go, i, tap] = Σ_s Σ_b t[p, b] · dE_s[block b of position (go, i, tap)]``, then (trailing
    programs) ``gb = Σ_s bpart[s]``. Hamilton: block ``(c, a)`` is row ``c·Cg_out + o``, column ``a·Cg_in + i``
    of the tap, ``t = quaternion.hamilton_table`` (the adjoint of the expansion: each block of E is ±W_p);
    fast8: block m is product m's partial, ``t = fast8.fold_table`` (the butterfly)."""
    pid = tl.program_id(0)
    w_programs = tl.cdiv(Q, BLOCK)
    if pid < w_programs:
        q = pid * BLOCK + tl.arange(0, BLOCK)
        q_ok = q < Q
        tap = q % TAPS
        r = q // TAPS
        i = r % CG_IN
        go = r // CG_IN
        g = go // CG_OUT
        o = go - g * CG_OUT
        tk = TAPS * K_TAP
        # the NB blocks of position q, as rows of a [NB, BLOCK] tile
        b = tl.arange(0, NB)
        if NB == 16:
            blocks = (b // 4) * CG_OUT * tk + (b % 4) * CG_IN
        else:
            blocks = b * PRODUCT_STRIDE
        offs = blocks[:, None] + ((g * N_G + o) * tk + tap * K_TAP + i)[None, :]
        e = tl.zeros((NB, BLOCK), dtype=tl.float32)
        for s in range(0, SPLITS):  # fixed order: deterministic
            e += tl.load(part_ptr + s * SPLIT_STRIDE + offs, mask=q_ok[None, :], other=0.0)
        comps = tl.arange(0, 4)
        table = tl.load(t_ptr + comps[:, None] * NB + b[None, :])  # [4, NB]
        gw = tl.sum(table[:, :, None] * e[None, :, :], axis=1)  # [4, BLOCK]
        tl.store(gw_ptr + comps[:, None] * Q + q[None, :], gw.to(gw_ptr.dtype.element_ty), mask=q_ok[None, :])
    else:
        if HAS_BIAS:
            cols = (pid - w_programs) * BLOCK + tl.arange(0, BLOCK)
            c_ok = cols < C_B
            acc = tl.zeros((BLOCK,), dtype=tl.float32)
            for s in range(0, SPLITS):
                acc += tl.load(bpart_ptr + s * C_B + cols, mask=c_ok, other=0.0)
            tl.store(gb_ptr + cols, acc.to(gb_ptr.dtype.element_ty), mask=c_ok)


# --------------------------------------------------------------------------------------------
# launcher
# --------------------------------------------------------------------------------------------

#: Interpreted programs cost per program and step, whatever their tiles, so the interpreter takes 128
#: pixels per step (4x fewer steps than 32; tests/triton_kernels/test_igemm_wgrad.py passes smaller
#: configs itself for cases with several row, column and pixel blocks and partial ones).
INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 128, "RUNS": 1, "FAST8_PRODUCTS": 1}

#: Every config's BLOCK_K (pixels per step, the interpreter's included) divides it: with M a multiple of
#: it, every split is whole steps (``P_EVEN``) and the loop has no pixel mask.
P_ALIGN = 128

#: fold-kernel positions per program
FOLD_BLOCK = 128

#: split-K policy on a GPU: about this many programs per SM, at least this many pixels per split (the
#: pipelined loop needs steps to fill), at most this many splits and bytes of partial buffers
PROGRAMS_PER_SM = 2
MIN_PIXELS_PER_SPLIT = 2048
MAX_SPLITS = 64
PARTIAL_BYTES = 64 << 20


def gpu_configs() -> list:
    """The autotune set on a GPU: (BLOCK_M out-channels, BLOCK_N tap-channels, BLOCK_K pixels, warps, stages,
    RUNS column blocks per program).

    ≥ 64 in M and N for wgmma (one warpgroup covers 64 rows), 256×128, 128×256 and 128×128 with 8 warps
    for wide layers, narrow tiles for 8q–16q layers and grouped ones (runs of Cg channels);
    :func:`prune_configs` drops tiles wider than the layer's runs or the shared memory. The widest tiles
    because every warp issues the whole loop each step (compiled for sm_90, 2d 64q bf16: 186 SASS
    instructions per step at 128×128×64, 215 at 256×128×64, for twice the tensor-core work; see
    :func:`.igemm.gpu_configs`). Where a run is 64 channels (16q; fast8 at 64q) no block is wider than
    64×64, so a program takes 2 or 4 of them (consecutive taps) on one gy tile: at 64×64×64 on 4 warps
    186 instructions per step for one block, 251 for two, 434 for four (issue shares 1.45, 0.98, 0.85).
    fast8's GEMMs, one per product, have those runs at 64q too: there a program may instead take one block
    of each of four products (``FAST8_PRODUCTS``), four gy tiles, four x tiles and four dots a step that
    share the step's pixel bookkeeping and tap masks (the last tuple entry; kept only for fast8).
    """
    # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, RUNS[, FAST8_PRODUCTS])
    shapes = [
        (256, 128, 64, 8, 3, 1),
        (128, 256, 64, 8, 3, 1),
        (128, 128, 64, 8, 3, 1),
        (128, 128, 32, 8, 4, 1),
        (128, 64, 64, 4, 3, 1),
        (64, 128, 64, 4, 3, 1),
        (64, 64, 64, 4, 4, 4),
        (64, 64, 32, 4, 4, 4),  # (82 KB of stages: two programs an SM, where 64-wide K allows one)
        (64, 64, 64, 4, 4, 2),
        (64, 64, 64, 4, 4, 1),
        (64, 64, 32, 4, 3, 1),
        (64, 32, 64, 4, 4, 1),
        (32, 64, 64, 4, 4, 1),
        (32, 32, 64, 4, 4, 1),
        (64, 64, 64, 4, 3, 1, 4),  # (192 KB of stages: one program an SM)
        (64, 64, 32, 4, 3, 1, 4),  # (96 KB: two)
        (128, 64, 64, 8, 2, 1, 4),
    ]
    return [
        triton.Config(
            {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "RUNS": r, "FAST8_PRODUCTS": p[0] if p else 1},
            num_warps=w,
            num_stages=s,
        )
        for m, n, k, w, s, r, *p in shapes
    ]


def prune_configs(configs: list, named_args: dict, **kwargs) -> list:
    """Drop configs wider than the layer's contiguous runs (rows: ``N_G``, or ``CG_OUT`` with groups;
    columns: ``K_TAP``, or ``CG_IN``), each rounded up to a power of two ≥ 32, those with several column
    blocks a program unless a block is a whole run (narrow layers), four fast8 products a program except for
    fast8, and those whose pipeline buffers exceed :data:`.igemm.SHARED_BYTES` (fp32 operands at 256×128×64;
    four products hold four tiles of each operand). In IEEE fp32 the dot runs on
    FMAs with the accumulator *and both operands* in registers: keep tiles with BLOCK_M·BLOCK_N·BLOCK_K
    ≤ 32³ per warp (compiled for sm_90, 64×64×64 with 4 warps spills 16 B; the kept ones do not)."""
    fast8 = bool(kwargs.get("FAST8", False))
    grouped = kwargs.get("GROUPED", named_args.get("GROUPED", False)) or fast8
    widest_m = max(32, common.next_power_of_2(named_args["CG_OUT"] if grouped else named_args["N_G"]))
    widest_n = max(32, common.next_power_of_2(named_args["CG_IN"] if grouped else named_args["K_TAP"]))

    def products(c) -> int:
        return c.kwargs.get("FAST8_PRODUCTS", 1) if fast8 else 1

    kept = [
        c
        for c in configs
        if c.kwargs["BLOCK_M"] <= widest_m
        and c.kwargs["BLOCK_N"] <= widest_n
        and (c.kwargs["RUNS"] == 1 or c.kwargs["BLOCK_N"] == widest_n)
        and (fast8 or c.kwargs.get("FAST8_PRODUCTS", 1) == 1)  # (elsewhere a copy of its one-product config)
        and operand_buffers_fit(c, kwargs.get("DOT_DTYPE"), m_tiles=products(c), n_tiles=c.kwargs["RUNS"] * products(c))
    ]
    if kwargs.get("PRECISION") == "ieee" and kwargs.get("DOT_DTYPE") == tl.float32:
        tile = ("BLOCK_M", "BLOCK_N", "BLOCK_K")
        fma = [c for c in kept or configs if math.prod(c.kwargs[k] for k in tile) <= 32**3 * c.num_warps]
        kept = fma or kept
    return kept or configs


# Each program writes (never accumulates into) its own partial tile: autotuning trials need no reset.
_wgrad_igemm = common.autotuned(
    qconv_wgrad_igemm_kernel,
    gpu_configs=gpu_configs(),
    interpreter_config=INTERPRETER_CONFIG,
    key=["M", "K_TAP", "N_G", "KD", "KH", "KW", "SD", "SH", "SW", "GROUPED", "FAST8", "HAS_BIAS"],
    prune=prune_configs,
)


def _operands(input: Tensor, grad_output: Tensor, p: ConvParams) -> tuple[Tensor, Tensor]:
    """``(x, gy)`` of the conv whose weight gradient this is (a transposed conv swaps them)."""
    return (grad_output, input) if p.transposed else (input, grad_output)


def gemm_tiles(
    cq_in: int, cq_out: int, groups: int, taps: int, block_m: int, block_n: int, fast8: bool = False, runs: int = 1
) -> int:
    """Programs of one split and group of the GEMM (rows and columns come in runs; see the kernel), each
    ``block_m`` rows by ``runs`` column blocks of ``block_n``; fast8: of one split and product-group."""
    if fast8 or groups > 1:  # runs of Cg channels: per product, or per component of a group
        seg, cg_in, cg_out = (1 if fast8 else 4), cq_in // groups, cq_out // groups
    else:
        seg, cg_in, cg_out = 1, 4 * cq_in, 4 * cq_out
    return seg * common.cdiv(cg_out, block_m) * common.cdiv(taps * seg * common.cdiv(cg_in, block_n), runs)


def split_programs(cq_in: int, cq_out: int, groups: int, taps: int, fast8: bool, config: dict) -> int:
    """Programs of one split with tile ``config`` (its ``BLOCK_M``, ``BLOCK_N``, ``RUNS``, ``FAST8_PRODUCTS``):
    :func:`gemm_tiles` per program on the group axis (``groups``; fast8 ``8·groups`` product-groups, four a
    program with ``FAST8_PRODUCTS`` 4). The bias programs, a few, are not counted."""
    tiles = gemm_tiles(cq_in, cq_out, groups, taps, config["BLOCK_M"], config["BLOCK_N"], fast8, config["RUNS"])
    return tiles * group_programs(groups, fast8, config)


def group_programs(groups: int, fast8: bool, config: dict) -> int:
    """Programs on the grid's group axis: one per group, fast8 one per product-group or per four."""
    return PRODUCTS * groups // config["FAST8_PRODUCTS"] if fast8 else groups


def config_splits(pixels: int, programs: int, partial_bytes: int, sms: int) -> int:
    """How many pixel ranges a launch splits its reduction into: enough programs to fill the GPU
    (:data:`PROGRAMS_PER_SM` per SM of ``sms``, with ``programs`` programs per split: the tile config's own
    count), bounded by :data:`MIN_PIXELS_PER_SPLIT`, :data:`MAX_SPLITS` and :data:`PARTIAL_BYTES` (of
    ``partial_bytes`` a split).

    Per config, because programs per split range over 16x between the autotune set's configs: at 16q
    (runs of 64 channels) a program of four 64×64 blocks covers four taps, and with the split count of
    one-block programs the GPU suite's 16q layer ran 90 programs of them on 132 SMs, fast8's 64q weight
    gradient 72 programs of four products."""
    splits = min(common.cdiv(PROGRAMS_PER_SM * sms, max(1, programs)), pixels // MIN_PIXELS_PER_SPLIT, MAX_SPLITS)
    return max(1, min(splits, PARTIAL_BYTES // max(1, partial_bytes)))


def gpu_sms(device: torch.device) -> int | None:
    """The SM count of a CUDA ``device`` (``None`` elsewhere: the interpreter runs one split)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else None


def cannot_serve(
    input: Tensor, grad_output: Tensor, algorithm: str = "hamilton", weight_shape: Sequence[int] | None = None
) -> str | None:
    """Why :func:`conv_weight_grad_igemm` cannot take this call (``None`` if it can)."""
    combined = 2 if algorithm == "fast8" else 1  # fast8 reads the 8 combinations of each operand
    if combined * max(input.numel(), grad_output.numel()) >= INT32_LIMIT:
        return "a tensor of 2**31 elements or more (the implicit GEMM's offsets are int32)"
    # one split's partial sums: the 16 blocks of the expanded weight (fast8: its 8 products' 2 per component)
    if weight_shape is not None and (2 if algorithm == "fast8" else 4) * math.prod(weight_shape) >= INT32_LIMIT - 1:
        return "a weight gradient whose partial sums reach 2**31 elements (the implicit GEMM's offsets are int32)"
    return None


def conv_weight_grad_igemm(
    input: Tensor,
    grad_output: Tensor,
    weight_shape,
    p: ConvParams,
    with_bias: bool = False,
    splits: int | None = None,
    config: dict | None = None,
    algorithm: str = "hamilton",
) -> tuple[Tensor, Tensor | None]:
    """``(grad_weight, grad_bias or None)`` of ``qconv(input, W) (+ bias)``, in ``input``'s dtype.

    ``hamilton``: one GEMM per group on the operands; ``fast8``: ``gW = gy ⊗ conj(x)`` as 8 GEMMs per group
    on the combinations of gy and conj(x) (:mod:`.fast8`; the product-groups ``m·G + g`` are the grid's
    group axis), the butterfly in the fold. ``input`` and ``grad_output`` in any layout (converted to
    channels_last at the boundary, one copy each if they are not). ``splits``: pixel ranges of the split-K
    reduction (default: each tile config's own, :func:`config_splits`); ``config``: ``{"BLOCK_M",
    "BLOCK_N", "BLOCK_K"}`` (+ ``RUNS`` and ``FAST8_PRODUCTS``, default 1, ``num_warps``, ``num_stages``) to
    run one tile config instead of the autotuned set (tests, tools).
    """
    x, gy = _operands(input, grad_output, p)
    n = p.spatial_dims
    x5, g5 = _channels_last_5d(x), _channels_last_5d(gy)
    # the bias belongs to the output of the call: the conv's gy, or (transposed) the conv's x
    bsrc = x5 if p.transposed else g5
    fast8 = algorithm == "fast8"
    ks = _spatial3(weight_shape[3:], n, 1)
    taps = math.prod(ks)
    groups = p.groups
    cq_in, cq_out = x.shape[1] // 4, gy.shape[1] // 4
    cg_in, cg_out = cq_in // groups, cq_out // groups
    m = math.prod(g5.shape[:4])
    if fast8:  # one run of Cg channels per product-group on each side
        x5, g5 = combine_activation(x5, "right", conjugate=True), combine_activation(g5, "left")
        grid_groups, k_tap, n_g, blocks = PRODUCTS * groups, cg_in, cg_out, PRODUCTS
    else:
        grid_groups, k_tap, n_g, blocks = groups, 4 * cg_in, 4 * cg_out, 16
    tk = taps * k_tap
    part_numel = grid_groups * n_g * tk
    c_b = bsrc.shape[-1]
    sms = gpu_sms(x.device)
    most_splits = (INT32_LIMIT - 1) // part_numel  # (the partials' int32 offsets)

    def launch_splits(meta: dict | None) -> int:  # the split count of a launch with tile config ``meta``
        if splits is not None or sms is None:
            return max(1, min(splits or 1, most_splits))
        # meta None: any config, the most splits one may take (a program per split)
        per_split = 1 if meta is None else split_programs(cq_in, cq_out, groups, taps, fast8, meta)
        return min(config_splits(m, per_split, 4 * part_numel, sms), most_splits)

    def grid(meta):
        tiles = gemm_tiles(cq_in, cq_out, groups, taps, meta["BLOCK_M"], meta["BLOCK_N"], fast8, meta["RUNS"])
        axis = group_programs(groups, fast8, meta)
        if with_bias:
            tiles += common.cdiv(common.cdiv(c_b, meta["BLOCK_M"]), axis)
        return tiles, launch_splits(meta), axis

    def launch_args(part: Tensor, bpart: Tensor) -> tuple:
        return (
            x5, g5, part, bsrc, bpart, m, g5.shape[-1], k_tap, n_g, cq_in, cg_in, cq_out, cg_out,
            *x5.shape[1:4], *g5.shape[1:4], *ks, *x5.stride()[:4],
            *_spatial3(p.stride, n, 1), *_spatial3(p.padding, n, 0), *_spatial3(p.dilation, n, 1),
            math.prod(bsrc.shape[:4]), c_b,
        )  # fmt: skip

    if config is not None:
        config = {"RUNS": 1, "FAST8_PRODUCTS": 1, **config}
    whole_steps = m % P_ALIGN == 0 and (config is None or P_ALIGN % config["BLOCK_K"] == 0)
    consts = dict(DIMS=n, P_EVEN=whole_steps, GROUPED=groups > 1, FAST8=fast8, HAS_BIAS=with_bias)
    runs = (cg_out, cg_in) if fast8 or groups > 1 else (n_g, k_tap)  # gy's and x's contiguous channel runs
    consts.update(CHAN_ALIGN=chan_align(*runs))
    dot_dtype, precision = common.dot_config(x.dtype)
    consts.update(DOT_DTYPE=dot_dtype, PRECISION=precision)
    # Partial buffers for the launch's splits: the tuned config's where this shape is tuned (the key reads the
    # buffers' dtype only), else as many as any config may take (autotuning runs them all)
    if config is None:
        fp32 = torch.empty(0, dtype=torch.float32, device=x.device)
        tuned = _wgrad_igemm.tuned_config(launch_args(fp32, fp32), consts)
        rows = launch_splits(tuned.kwargs if tuned is not None else None)
    else:
        rows = launch_splits(config)
    part = torch.empty((rows, grid_groups, n_g, tk), dtype=torch.float32, device=x.device)
    bpart = torch.empty((rows, c_b), dtype=torch.float32, device=x.device) if with_bias else part
    table = fold_table(like=part) if fast8 else hamilton_table(like=part)
    args = launch_args(part, bpart)
    used = rows  # the launch's splits: the tuned config's, or (tuning) those of the config it chose
    if config is None:
        _wgrad_igemm[grid](*args, **consts)
        if tuned is None:
            used = launch_splits(_wgrad_igemm.tuned_config(args, consts).kwargs)
    else:
        qconv_wgrad_igemm_kernel[grid](*args, **consts, **config)

    gw = torch.empty((4, weight_shape[1], weight_shape[2], taps), dtype=x.dtype, device=x.device)
    gb = torch.empty(c_b, dtype=x.dtype, device=x.device) if with_bias else None
    q = weight_shape[1] * weight_shape[2] * taps
    fold_programs = common.cdiv(q, FOLD_BLOCK) + (common.cdiv(c_b, FOLD_BLOCK) if with_bias else 0)
    qconv_wgrad_fold_kernel[(fold_programs,)](
        part, table, gw, bpart, gb if gb is not None else gw,
        q, part_numel, used, n_g, k_tap, groups * cg_out * tk, cg_out, cg_in, taps, c_b,
        NB=blocks, HAS_BIAS=with_bias, BLOCK=FOLD_BLOCK,
    )  # fmt: skip
    return gw.reshape(weight_shape), gb
