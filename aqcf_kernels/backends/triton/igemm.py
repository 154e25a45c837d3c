"""Implicit-GEMM quaternion convolution on channels_last activations: one ``tl.dot`` per K step.

The forward of a conv and of a transposed conv, hence also the input gradient of both (the input
gradient of a conv is the transposed conv of ``grad_output`` with the same weight, and vice versa),
for the ``hamilton`` algorithm (issue 13, second design). The kernel is a plain GEMM::

    y[pixel, n] = sum_K  x_im2col[pixel, K] · B[K, n]        K = (tap, input component, channel)

* **B is the expanded real weight, pre-packed per call** (:func:`pack_weight`): per group the
  ``[taps · 4·Cg_in, 4·Cg_out]`` matrix stored K-major (``[N, K]``, K contiguous: what wgmma needs for
  TF32, whose operands cannot be transposed in shared memory), Hamilton signs folded in, so the
  main loop holds no quaternion algebra at all: one load of an x tile, one load of a B tile, one dot.
  For a transposed conv B is the *transpose* of the conv's expanded matrix, i.e. the expansion of the
  conjugate transpose of the quaternion weight (Parcollet's matrix read as torch's ``(in, out)``
  weight). No kernel flip and no zero insertion are materialised: the kernel reads the taps through
  the gradient-of-conv index map (output pixel o gathers input pixel i where
  ``i·stride = o + pad − k·dil``).
* **Sub-pixel transposed convs**: that map links tap k to output o only when ``k·dil ≡ o + pad (mod
  stride)``, which depends on o's phase ``o mod stride`` alone. So a transposed conv (and the input
  gradient of every strided conv) runs one grid slice per phase (``stride^d`` of them), whose rows are
  that phase's outputs and whose K loop runs only the taps that feed them (:func:`_phase_taps`):
  ``1/stride^d`` of the taps on average, where a loop over all taps would mask ``(s^d − 1)/s^d`` of each
  tile's rows and still multiply them. Within a phase a tap's input coordinate is a per-row base plus a
  scalar, as in the forward conv: no division and no stride test in the loop.
* **Activations channels_last** (NDHWC; 1d and 2d run as 3d with size-1 dims, which launch-time
  specialisation turns into constants): a K step reads BLOCK_K contiguous channels of BLOCK_M
  pixels — 16-byte vector loads, async copies (``cp.async``) when the loop is pipelined. NCHW callers
  are converted at the boundary (one copy in, one out).
* **One flattened K loop** over taps × component segments × channel blocks. With one group the four
  components of a pixel are adjacent ``[r|i|j|k]`` channels, so a tap is one contiguous run of
  ``4·Cq_in`` channels; with groups each component of the group is its own run of ``Cg_in`` channels
  (``GROUPED``) and the group is a grid axis. The per-row spatial coordinates are computed once,
  before the loop; a step only adds the tap's scalar offset and compares.
* **Grouped tile order** (``GROUP_M`` row tiles share the B tiles they read) for L2 reuse.
* **Epilogue**: bias, then relu / leaky_relu / gelu (``ACTIVATION``, constexpr) on the fp32
  accumulator; the pre-activation is written too when the backward needs it (``STORE_PRE``).
* **fast8** (``FAST8``): x is replaced by its 8 operand combinations and B by the 8 combinations of the
  weight (:mod:`.fast8`, pre-passes), and a program runs two K loops over the same output tile, each the
  loop above with one run of Cg_in channels per tap and four dots a step, one per product (half the
  hamilton loop's multiply-adds in all): s5..s8, then s1..s4. The four products' tiles of a step differ
  only by a channel offset (x) and a row offset (B), so the step's counters, bounds and masks serve four
  MMAs (compiled for sm_90: 273 SASS instructions a step for four 128×64×64 dots on 8 warps, issue share
  0.53; as eight loops of one dot it was 120 for one, 0.94, plus eight pipeline fills a tile). The
  butterfly happens in registers between the loops: s5..s8 become the four outputs' halves, onto which
  s1..s4 accumulate, and the epilogue stores the four components. Four accumulators live at once, so
  fast8 takes tiles a quarter to a half the size of hamilton's (:data:`ACCUMULATOR_REGS`), and a stage
  holds four operand pairs. A grid axis over the products with the butterfly in a second pass would
  keep hamilton's tiles but write and read the 8 products in fp32: ~8x the output's bytes twice.

Accumulation is fp32; inputs fp16 / bf16 / fp32 (fp32 dots in IEEE fp32 unless TF32 is allowed,
see :func:`common.dot_config`). Offsets are int32: tensors of 2**31 elements or more are not served
here (:func:`cannot_serve` says so and the launcher falls back).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...params import ConvParams, conv_output_shape
from ...quaternion import hamilton_blocks
from . import common
from .channels import chan_align, component, said_multiple
from .conv_kernels import _activate
from .fast8 import combine_activation
from .fast8 import pack_weight as fast8_pack_weight

#: activation codes of the epilogue (the same as the old kernel's)
ACTIVATION_CODES = {None: 0, "relu": 1, "leaky_relu": 2, "gelu": 3}

INT32_LIMIT = 2**31


# --------------------------------------------------------------------------------------------
# weight packing
# --------------------------------------------------------------------------------------------


def pack_weight(weight: Tensor, groups: int, transposed: bool, dtype: torch.dtype | None = None) -> Tensor:
    """The GEMM's B operand stored K-major: ``(G, 4·Cg_out, taps·4·Cg_in)``, contiguous, in ``dtype``
    (default: the weight's); ``packed[g].T`` is the ``[K, N]`` matrix B of group g.

    K index ``tap·4·Cg_in + a·Cg_in + i`` (input component a, channel i of the group; taps in row-major
    order of the kernel dims), N index ``c·Cg_out + o`` (output component c, channel o):

    * conv, weight ``(4, Cq_out, Cg_in, *k)``: ``B = sign · W_p[g·Cg_out + o, i, tap]`` with
      ``(p, sign) = HAMILTON[c][a]`` — the transpose of Parcollet's expanded weight, per group;
    * transposed conv, weight ``(4, Cq_in, Cg_out, *k)``: ``B = sign · W_p[g·Cg_in + i, o, tap]`` with
      ``(p, sign) = HAMILTON[a][c]`` — Parcollet's matrix itself (the conjugate transpose of the conv's:
      the adjoint), which the kernel reads through the transposed index map (no flip needed).

    Each entry is one signed weight (the table's sum has a single non-zero term): exact in any dtype.
    """
    four, a_dim, b_dim, *ks = weight.shape
    blocks = hamilton_blocks(weight, groups, adjoint=transposed)  # (c, a, g, A, B, *k)
    kernel_dims = range(5, 5 + len(ks))
    if transposed:  # (4, G*Cg_in, Cg_out, *k): A are input channels
        packed = blocks.permute(2, 0, 4, *kernel_dims, 1, 3)  # (g, c, o, *k, a, i)
        cg_in, cg_out = a_dim // groups, b_dim
    else:  # (4, G*Cg_out, Cg_in, *k)
        packed = blocks.permute(2, 0, 3, *kernel_dims, 1, 4)
        cg_in, cg_out = b_dim, a_dim // groups
    # one copy into place, cast on the way
    out = torch.empty(packed.shape, dtype=dtype or weight.dtype, device=weight.device).copy_(packed)
    return out.view(groups, 4 * cg_out, math.prod(ks) * 4 * cg_in)


# --------------------------------------------------------------------------------------------
# the kernel
# --------------------------------------------------------------------------------------------


@triton.jit
def _phase_taps(ph, S, P, D, K, KSTEP):
    """The taps of one dim that feed the outputs ``o ≡ ph (mod S)`` of a transposed conv (sub-pixel phase ph).

    Input i feeds output o through tap k when ``i·S = o + P − k·D``, i.e. when ``k·D ≡ ph + P (mod S)``:
    ``k ≡ k0 (mod KSTEP)`` with ``KSTEP = S / gcd(S, D)``, or no k at all. Returns ``(k0, count, offset)``:
    the taps are ``k0 + j·KSTEP`` for ``j < count``, and output ``o = q·S + ph`` reads input
    ``q + offset − j·D/gcd(S, D)`` through the j-th.
    """
    k0 = KSTEP  # KSTEP: none found
    for k in range(0, KSTEP):
        k0 = tl.where(((ph + P - k * D) % S == 0) & (k0 == KSTEP), k, k0)
    count = tl.where(k0 < tl.minimum(K, KSTEP), (K - 1 - k0) // KSTEP + 1, 0)
    offset = (ph + P - k0 * D) // S  # exact when count > 0
    return k0, count, offset


@triton.jit
def _wrap_to_zero(digit, size):
    """A counter's digit just advanced: at or past ``size`` it restarts at 0 with a carry of 1, else it stays,
    with 0. (Restarting at 0, where ``igemm_wgrad.carry_digit`` subtracts ``size`` for digits that move by
    more, compiles to 8 fewer SASS instructions per step of this loop.)"""
    carry = digit >= size
    return tl.where(carry, 0, digit), carry.to(tl.int32)


@triton.jit
def _in_bounds(row_ok, bd, bh, bw, md, mh, mw, ID, IH, IW, DIMS: tl.constexpr):
    """``row_ok`` and whether each row's input coordinate ``b + m`` lies inside the input in each of the
    last ``DIMS`` dims: below the size as an unsigned number (a negative one wraps above it), one compare."""
    ok = row_ok & ((bw + mw).to(tl.uint32, bitcast=True) < IW)
    if DIMS >= 2:
        ok = ok & ((bh + mh).to(tl.uint32, bitcast=True) < IH)
    if DIMS == 3:
        ok = ok & ((bd + md).to(tl.uint32, bitcast=True) < ID)
    return ok


@triton.jit
def _tap_bits(row_ok, bd, bh, bw, TD, TH, TW, ed, eh, ew, ID, IH, IW, DIMS: tl.constexpr):
    """Per row, bit t set when the row's tap t (row-major over ``TD × TH × TW``, at most 32) reads inside
    the input: computed once per program, so that a K step tests one bit per row instead of a coordinate
    per dim (2d 64q bf16, sm_90: 156 -> 130 SASS instructions per step at 128×128×64, 232 -> 182 at 128×64)."""
    valid = tl.zeros_like(bw)
    for t in range(0, TD * TH * TW):
        ok = _in_bounds(row_ok, bd, bh, bw, (t // (TW * TH)) * ed, ((t // TW) % TH) * eh, (t % TW) * ew,
                        ID, IH, IW, DIMS)  # fmt: skip
        valid = valid | (ok.to(tl.int32) << t)
    return valid


@triton.jit
def _k_loop(
    acc, acc1, acc2, acc3, x_next, w_next, x_ptr, row_off, bd, bh, bw, row_ok, valid, w_cols, n_mask, x_chan,
    seg_len, seg_stride, n_seg, k_tap,
    TD, TH, TW, k0d, k0h, k0w, ksd, ksh, ksw, ed, eh, ew, ID, IH, IW, KH, KW, s_xd, s_xh, s_xw,
    DIMS: tl.constexpr, K_EVEN: tl.constexpr, TAP_BITS: tl.constexpr, CHAN_ALIGN: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_K: tl.constexpr, DOTS: tl.constexpr,
):  # fmt: skip
    """``acc += im2col(x)[rows, K] · B[K, cols]`` over K = taps × ``n_seg`` runs of ``seg_len`` channels
    (with ``DOTS = 4``, also ``acc_j`` += the same product on x's channels ``j·x_next`` further and B's
    elements ``j·w_next`` further, j = 1..3: fast8's four products of a phase on one step's positions);
    returns the four accumulators (``acc1..acc3`` unread and returned as they came when ``DOTS = 1``).

    The taps are ``TD × TH × TW``: the j-th of a dim is the weight's tap ``k0 + j·ks`` and moves the input
    coordinate by ``e`` (per row, from the base ``b``; x's offset of a row at its base is ``row_off``; with
    ``TAP_BITS`` bit t of ``valid`` says whether tap t of the row is inside the input). Run
    ``seg`` of a tap is x's channels ``x_chan + seg·seg_stride + [0, seg_len)`` and B's columns
    ``tap·k_tap + seg·seg_len + [0, seg_len)`` of the rows at ``w_cols``. Only the last ``DIMS`` dims of
    (d, h, w) are checked against the input's bounds (the others are size-1 dims of a 1d or 2d conv).

    Why the loop is written this way: on Hopper the K step of a 128×128×64 tile is 512 tensor-core cycles,
    and every instruction of the loop is issued by each of the program's warps. The step's position (which
    channel block of which segment of which tap) is carried from step to step as counters with carries,
    not recovered from the step index by division (six runtime divisions, ~120 of the loop's ~320 SASS
    instructions per warp), and a row's x offset is its base offset plus one scalar per step.
    """
    offs_k = tl.arange(0, BLOCK_K)
    # a run's length is a multiple of CHAN_ALIGN: said, so that the K mask is known to be constant over
    # aligned groups of channels and the masked copies stay 16 bytes wide
    seg_len = said_multiple(seg_len, CHAN_ALIGN)
    steps = TD * TH * TW * n_seg * tl.cdiv(seg_len, BLOCK_K)
    # x offsets of one tap step along each dim: scalars
    move_d = ed * s_xd
    move_h = eh * s_xh
    move_w = ew * s_xw
    c0 = 0
    seg = 0
    jd = 0
    jh = 0
    jw = 0
    tap_bit = 1
    for _ in range(0, steps):
        if TAP_BITS:
            ok = (valid & tap_bit) != 0
        else:
            ok = _in_bounds(row_ok, bd, bh, bw, jd * ed, jh * eh, jw * ew, ID, IH, IW, DIMS)
        # both operands' runs start at multiples of CHAN_ALIGN channels, and x's pixel strides are multiples
        # of a run: said, for their vector copies
        step_off = tl.multiple_of(jd * move_d + jh * move_h + jw * move_w + x_chan + seg * seg_stride + c0,
                                  CHAN_ALIGN)  # fmt: skip
        x_tile = x_ptr + (row_off + step_off)[:, None] + offs_k[None, :]
        ck = c0 + offs_k
        tap = ((k0d + jd * ksd) * KH + k0h + jh * ksh) * KW + k0w + jw * ksw
        w_tile = w_cols + (tl.multiple_of(tap * k_tap + seg * seg_len + c0, CHAN_ALIGN) + offs_k)[:, None]
        if K_EVEN:  # every channel block full: the masks are the rows' and the columns' alone
            a_mask = ok[:, None]
            b_mask = n_mask[None, :]
        else:
            k_ok = ck < seg_len
            a_mask = ok[:, None] & k_ok[None, :]
            b_mask = k_ok[:, None] & n_mask[None, :]
        acc = _dot_at(acc, x_tile, w_tile, a_mask, b_mask, DOT_DTYPE, PRECISION)
        if DOTS == 4:  # the step's counters, bounds and masks serve all four
            acc1 = _dot_at(acc1, x_tile + x_next, w_tile + w_next, a_mask, b_mask, DOT_DTYPE, PRECISION)
            acc2 = _dot_at(acc2, x_tile + 2 * x_next, w_tile + 2 * w_next, a_mask, b_mask, DOT_DTYPE, PRECISION)
            acc3 = _dot_at(acc3, x_tile + 3 * x_next, w_tile + 3 * w_next, a_mask, b_mask, DOT_DTYPE, PRECISION)
        # the next step: the next channel block (a partial last block restarts at 0), carrying into the
        # segment, then the taps (w, h, d)
        c0, carry = _wrap_to_zero(c0 + BLOCK_K, seg_len)
        seg, carry = _wrap_to_zero(seg + carry, n_seg)
        tap_bit <<= carry
        jw, carry = _wrap_to_zero(jw + carry, TW)
        jh, carry = _wrap_to_zero(jh + carry, TH)
        jd += carry
    return acc, acc1, acc2, acc3


@triton.jit
def _dot_at(acc, x_tile, w_tile, a_mask, b_mask, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """``acc`` + the x tile at ``x_tile`` times the B tile at ``w_tile`` (masked positions read 0)."""
    a = tl.load(x_tile, mask=a_mask, other=0.0)
    b = tl.load(w_tile, mask=b_mask, other=0.0)
    return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=PRECISION)


@triton.jit
def _epilogue(
    acc, ch, n_mask, y_rows, m_mask, b_ptr, y_ptr, z_ptr, C_Y, negative_slope,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, STORE_PRE: tl.constexpr,
):  # fmt: skip
    """Bias, activation, store of a tile of output channels ``ch`` at output pixels ``y_rows`` (and of the
    pre-activation if STORE_PRE)."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + ch, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y_rel = y_rows[:, None] * C_Y + ch[None, :]
    y_msk = m_mask[:, None] & n_mask[None, :]
    out_ty = y_ptr.dtype.element_ty
    if STORE_PRE:
        tl.store(z_ptr + y_rel, acc.to(out_ty), mask=y_msk)
    tl.store(y_ptr + y_rel, _activate(acc, ACTIVATION, negative_slope).to(out_ty), mask=y_msk)


@triton.jit
def qconv_igemm_kernel(
    x_ptr,  # (N, ID, IH, IW, C_X) channels_last, channel stride 1 (FAST8: the 8 combinations, C_X = 8·CQ_IN)
    w_ptr,  # (G, R, KD*KH*KW*K_TAP) packed weight, K-major (R = N_G; FAST8: 8·N_G, fast8.pack_weight)
    b_ptr,  # (4*CQ_OUT,) blocked bias (read when HAS_BIAS)
    y_ptr,  # (N*OD*OH*OW, C_Y) channels_last output
    z_ptr,  # (N*OD*OH*OW, C_Y) pre-activation (written when STORE_PRE)
    M,  # GEMM rows per phase: N*OD*OH*OW output pixels (TRANSPOSED: N * ⌈OD/SD⌉ * ⌈OH/SH⌉ * ⌈OW/SW⌉)
    C_Y,  # real channels of y: its pixel stride
    K_TAP,  # real input channels of a group per tap: 4 * CG_IN (FAST8: CG_IN, one product's)
    N_G,  # real output channels of a group (GEMM N): 4 * CG_OUT (FAST8: CG_OUT, one product's)
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
    KSD,  # TRANSPOSED: S / gcd(S, D) per dim, the step between the taps of one phase
    KSH,
    KSW,
    ESD,  # TRANSPOSED: D / gcd(S, D) per dim, the input step between them
    ESH,
    ESW,
    negative_slope,
    DIMS: tl.constexpr,  # spatial dims of the conv: the last DIMS of (D, H, W) have extent
    TAP_BITS: tl.constexpr,  # at most 32 taps: each row's in-bounds taps as bits, computed before the K loop
    K_EVEN: tl.constexpr,  # every contiguous channel run (K_TAP, or CG_IN with groups) a multiple of K_ALIGN
    CHAN_ALIGN: tl.constexpr,  # a power of two dividing that run's length (at most 16): where each run starts
    TRANSPOSED: tl.constexpr,
    GROUPED: tl.constexpr,
    FAST8: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    STORE_PRE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    g = tl.program_id(1)

    # grouped tile order: GROUP_M consecutive row tiles sweep the column tiles together (L2 reuse)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N_G, BLOCK_N)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    rows_here = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % rows_here
    pid_n = (pid % width) // rows_here

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if TRANSPOSED:
        # Sub-pixel: grid axis 2 is the output phase (o ≡ ph mod stride per dim); the program's rows are
        # outputs o = q·S + ph of that phase only, so each dim runs only the taps that feed it, with the
        # input coordinate a per-row base plus a scalar per tap (no division, no stride mask in the loop).
        phase = tl.program_id(2)
        ph_d = phase // (SW * SH)
        ph_h = (phase // SW) % SH
        ph_w = phase % SW
        k0d, TD, offd = _phase_taps(ph_d, SD, PD, DD, KD, KSD)
        k0h, TH, offh = _phase_taps(ph_h, SH, PH, DH, KH, KSH)
        k0w, TW, offw = _phase_taps(ph_w, SW, PW, DW, KW, KSW)
        QD = tl.cdiv(OD, SD)
        QH = tl.cdiv(OH, SH)
        QW = tl.cdiv(OW, SW)
        qw = offs_m % QW
        t = offs_m // QW
        qh = t % QH
        t = t // QH
        qd = t % QD
        nb = t // QD
        od = qd * SD + ph_d
        oh = qh * SH + ph_h
        ow = qw * SW + ph_w
        m_mask = (offs_m < M) & (od < OD) & (oh < OH) & (ow < OW)
        y_rows = ((nb * OD + od) * OH + oh) * OW + ow
        bd = qd + offd
        bh = qh + offh
        bw = qw + offw
        ed = -ESD
        eh = -ESH
        ew = -ESW
        ksd = KSD
        ksh = KSH
        ksw = KSW
    else:
        m_mask = offs_m < M
        y_rows = offs_m
        ow = offs_m % OW
        t = offs_m // OW
        oh = t % OH
        t = t // OH
        od = t % OD
        nb = t // OD
        # per-row base coordinates, hoisted out of the K loop: a step adds its tap's scalar offset
        bd = od * SD - PD
        bh = oh * SH - PH
        bw = ow * SW - PW
        TD = KD
        TH = KH
        TW = KW
        k0d = 0
        k0h = 0
        k0w = 0
        ksd = 1
        ksh = 1
        ksw = 1
        ed = DD
        eh = DH
        ew = DW
    # x's offset of each row at its base coordinates (a tap step adds a scalar to it)
    if DIMS == 3:
        row_off = nb * s_xn + bd * s_xd + bh * s_xh + bw * s_xw
    elif DIMS == 2:
        row_off = nb * s_xn + bh * s_xh + bw * s_xw
    else:
        row_off = nb * s_xn + bw * s_xw
    row_off = tl.multiple_of(row_off, CHAN_ALIGN)  # x's pixel strides are multiples of a channel run

    if TAP_BITS:
        valid = _tap_bits(m_mask, bd, bh, bw, TD, TH, TW, ed, eh, ew, ID, IH, IW, DIMS)
    else:
        valid = row_off  # (unread: each step checks the coordinates)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N_G
    k_all = said_multiple(KD * KH * KW * K_TAP, CHAN_ALIGN)  # B's row stride
    zero = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    if FAST8:
        # Product m of group g: x's run m·Cq_in + g·Cg_in, B's rows (g·8 + m)·Cg_out + o. Two K loops of four
        # dots a step, each dot one product (so the step's counters, bounds and masks serve four MMAs, and
        # four accumulators live at once): s5..s8 first, then the butterfly (quaternion.FAST8_OUT, computed
        # as quaternion.fast8_product does) makes them the four outputs' halves, onto which s1..s4 accumulate.
        w_group = w_ptr + (g * 8 * N_G + offs_n[None, :]) * k_all
        x_next = said_multiple(CQ_IN, CHAN_ALIGN)  # from one product's x run to the next's
        # fmt: off
        s5, s6, s7, s8 = _k_loop(zero, zero, zero, zero, x_next, N_G * k_all, x_ptr, row_off, bd, bh, bw, m_mask,
                                 valid, w_group + 4 * N_G * k_all, n_mask, 4 * CQ_IN + g * CG_IN, K_TAP, 0, 1, K_TAP,
                                 TD, TH, TW, k0d, k0h, k0w, ksd, ksh, ksw, ed, eh, ew, ID, IH, IW, KH, KW, s_xd, s_xh,
                                 s_xw, DIMS, K_EVEN, TAP_BITS, CHAN_ALIGN, DOT_DTYPE, PRECISION, BLOCK_K, 4)
        u = s5 - s6
        w = s5 + s6
        v = s7 + s8
        z = s7 - s8
        out_r, out_i, out_j, out_k = _k_loop(
            0.5 * (u + v), 0.5 * (u - v), 0.5 * (w + z), 0.5 * (w - z), x_next, N_G * k_all, x_ptr, row_off, bd, bh,
            bw, m_mask, valid, w_group, n_mask, g * CG_IN, K_TAP, 0, 1, K_TAP, TD, TH, TW, k0d, k0h, k0w, ksd, ksh,
            ksw, ed, eh, ew, ID, IH, IW, KH, KW, s_xd, s_xh, s_xw, DIMS, K_EVEN, TAP_BITS, CHAN_ALIGN, DOT_DTYPE,
            PRECISION, BLOCK_K, 4)
        # fmt: on
        for c in tl.static_range(4):
            _epilogue(component(c, out_r, out_i, out_j, out_k), c * CQ_OUT + g * CG_OUT + offs_n, n_mask, y_rows,
                      m_mask, b_ptr, y_ptr, z_ptr, C_Y, negative_slope, HAS_BIAS, ACTIVATION, STORE_PRE)  # fmt: skip
    else:
        # K = taps × segments × channel blocks: one contiguous run of 4·Cq_in channels per tap without
        # groups, four runs (one per component) of Cg_in channels with them.
        # (Without groups the run's offset is a literal 0: an unhinted runtime term would cost the x
        # tile its 16-byte alignment, i.e. its vector loads and async copies.)
        w_cols = w_ptr + (g * N_G + offs_n[None, :]) * k_all
        if GROUPED:
            # fmt: off
            acc, _, _, _ = _k_loop(zero, zero, zero, zero, 0, 0, x_ptr, row_off, bd, bh, bw, m_mask, valid, w_cols,
                                   n_mask, g * CG_IN, CG_IN, CQ_IN, 4, K_TAP, TD, TH, TW, k0d, k0h, k0w, ksd, ksh, ksw,
                                   ed, eh, ew, ID, IH, IW, KH, KW, s_xd, s_xh, s_xw, DIMS, K_EVEN, TAP_BITS,
                                   CHAN_ALIGN, DOT_DTYPE, PRECISION, BLOCK_K, 1)
            # fmt: on
            # column n = (component c, channel o) of the group -> blocked channel c·Cq_out + g·Cg_out + o
            comp = offs_n // CG_OUT
            ch = comp * CQ_OUT + g * CG_OUT + (offs_n - comp * CG_OUT)
        else:
            # fmt: off
            acc, _, _, _ = _k_loop(zero, zero, zero, zero, 0, 0, x_ptr, row_off, bd, bh, bw, m_mask, valid, w_cols,
                                   n_mask, 0, K_TAP, 0, 1, K_TAP, TD, TH, TW, k0d, k0h, k0w, ksd, ksh, ksw, ed, eh, ew,
                                   ID, IH, IW, KH, KW, s_xd, s_xh, s_xw, DIMS, K_EVEN, TAP_BITS, CHAN_ALIGN, DOT_DTYPE,
                                   PRECISION, BLOCK_K, 1)
            # fmt: on
            ch = offs_n
        _epilogue(acc, ch, n_mask, y_rows, m_mask, b_ptr, y_ptr, z_ptr, C_Y, negative_slope, HAS_BIAS, ACTIVATION,
                  STORE_PRE)  # fmt: skip


# --------------------------------------------------------------------------------------------
# launcher
# --------------------------------------------------------------------------------------------

#: Every config's BLOCK_K divides it (test_autotune_configs.py): a layer whose contiguous channel runs
#: are multiples of it has no partial K block in any config, and its kernel no K mask (``K_EVEN``).
K_ALIGN = 64

#: Taps (per sub-pixel phase) up to which each row's in-bounds taps are the bits of one int32 (``TAP_BITS``).
TAP_BITS_MAX = 32


def loop_constexprs(seg_len: int, taps: int) -> dict:
    """The K loop's constexprs that follow from the layer: ``K_EVEN`` for contiguous channel runs of
    ``seg_len`` (whole K blocks in every config), ``TAP_BITS`` for ``taps`` taps, and ``CHAN_ALIGN``, the
    largest power of two up to :data:`.channels.CHAN_ALIGN_MAX` dividing ``seg_len``.

    Every run of x and of B starts at a multiple of ``seg_len`` (x's at ``m·Cq_in + g·Cg_in`` or ``seg·Cq_in``
    plus whole K blocks, B's at ``tap·K_TAP + seg·seg_len``), but the compiler knows only what launch-time
    specialisation tells it of the arguments (divisible by 16, or not): at 40 quaternion channels fast8's
    runs start 16-byte aligned without its knowing, and its K loops copied 2 bytes at a time (192–384
    scalar loads per step, no cp.async) until the launcher said so."""
    return {"K_EVEN": seg_len % K_ALIGN == 0, "TAP_BITS": taps <= TAP_BITS_MAX, "CHAN_ALIGN": chan_align(seg_len)}


#: Interpreted programs cost per program and step, whatever their tiles: one config with big tiles
#: (tests/triton_kernels/test_igemm.py has a case with several M, N and K blocks and a partial band).
INTERPRETER_CONFIG = {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 2}


def gpu_configs() -> list:
    """The autotune set on a GPU: (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages), BLOCK_K 32–64, 3–4 stages.

    hamilton: 128×256, 256×128 and 128×128 with 8 warps for wide layers, 128×64 / 64×128 with 4, and
    narrow N for 8q–16q layers (4·Cg_out = 32–64 columns). fast8 holds four accumulator tiles (the
    butterfly's) and stages four operand pairs, so its tiles are a quarter to a half of those: 128×64 and
    64×128 with 8 warps (128 registers a thread) where its channel runs are whole K blocks, 64×64 with 8,
    64×32 with 4.
    :func:`prune_configs` keeps for each call the tiles that fit its width and its accumulators.

    Why the widest tiles: every warp issues the whole loop each K step, and the loop's cost in issue slots
    barely grows with the tile (SASS per step, compiled for sm_90: 130 at 128×128×64, 153 at 128×256×64),
    while the tensor cores' time doubles. The Triton GEMM tutorial's Hopper tile is 128×256×64 for the same
    reason. ``tools/triton_resources.py --igemm`` prints each config's share (``issue``).
    """
    shapes = [
        (128, 256, 64, 8, 3),
        (256, 128, 64, 8, 3),
        (128, 128, 64, 8, 3),
        (128, 128, 32, 8, 4),
        (128, 64, 64, 4, 3),
        (64, 128, 64, 4, 3),
        (128, 64, 32, 4, 4),
        (64, 64, 64, 4, 3),
        (128, 32, 64, 4, 4),
        (128, 32, 32, 4, 4),
        (128, 32, 64, 8, 3),
        (64, 32, 32, 4, 4),  # (not 8 warps: a 32x32 half-precision B tile is 8 bytes per thread, no 16-byte copies)
        (64, 64, 64, 8, 3),
        (128, 64, 64, 8, 2),  # fast8's widest (four accumulator tiles, 128 registers a thread; four operand
        (64, 128, 64, 8, 2),  # pairs a stage: 2 stages of 64-wide K, 3 of 32, fit in shared memory)
        (128, 64, 32, 8, 3),
        (64, 128, 32, 8, 3),
        (64, 32, 64, 4, 3),
        (32, 32, 32, 4, 3),  # fast8 in IEEE fp32: four accumulators on FMAs
    ]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for m, n, k, w, s in shapes
    ]


#: fp32 accumulator registers per thread (all of a program's accumulator tiles: fast8 holds four) that
#: the kept tiles have, by the program's warps, compiled for sm_90 by triton 3.6. On tensor cores (wgmma)
#: hamilton's one tile may take 128 (128×256 and 256×128 on 8 warps: 192–246 registers, no spill, with
#: ReLU, leaky ReLU or the pre-activation stored), but 64 under a GELU epilogue (its erf's temporaries:
#: 40–160 B spilled at 128); on 8 warps at least 64 (an 8-warp tile of 32 issues each K step on twice the
#: warps of the 4-warp tile of the same size). fast8's four may take 128 on 8 warps where its channel runs
#: are whole K blocks (128×64 and 64×128: 198–255 registers, no spill, with every epilogue, transposed,
#: grouped, 1d to 3d), else 64: with a K mask 128×64 spills 64–72 B (40q), and on 4 warps 128×32×32 spills
#: 24 B (transposed). Fewer than 32 only add autotuning trials. On FMAs (IEEE fp32) 32 (the bigger hamilton
#: tiles spill 64–168 B, and even 128×32 on 8 warps, 16 a thread, spills 8 B), in tiles at most 32 wide
#: (64×64×64 keeps two values on the stack across its loop: 8 B). See test_igemm_static.py.
ACCUMULATOR_REGS = {
    "tensor cores": {4: (32, 128), 8: (64, 128)},
    "tensor cores, gelu": {4: (32, 64), 8: (64, 64)},
    "tensor cores, fast8": {4: (32, 64), 8: (64, 128)},
    "tensor cores, fast8, K mask": {4: (32, 64), 8: (64, 64)},
    "fma": {4: (32, 32), 8: (32, 32)},
}
FMA_WIDEST_N = 32

#: Shared memory one program may hold on sm_90 (227 KiB): the pipeline's operand tiles, ``num_stages ×
#: (BLOCK_M + BLOCK_N) × BLOCK_K`` elements, must fit (fp32 operands at 128×256×64 need 288 KiB).
SHARED_BYTES = 227 * 1024


def operand_buffers_fit(config, dot_dtype, m_tiles: int = 1, n_tiles: int = 1) -> bool:
    """Whether ``config``'s pipelined operand tiles fit :data:`SHARED_BYTES` with ``dot_dtype`` operands
    (this kernel's and the weight gradient's: each stage holds ``m_tiles`` BLOCK_M-side tiles and ``n_tiles``
    BLOCK_N-side tiles of BLOCK_K: fast8's forward four of each, the weight gradient one gy tile and one x
    tile per column block)."""
    item = 4 if dot_dtype == tl.float32 else 2
    m, n, k = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.kwargs["BLOCK_K"]
    return config.num_stages * (m_tiles * m + n_tiles * n) * k * item <= SHARED_BYTES


def prune_configs(configs: list, named_args: dict, **kwargs) -> list:
    """Drop configs whose N tile is wider than the layer (``N_G`` columns) or whose K tile is wider than a
    contiguous channel run (``K_TAP``, or ``CG_IN`` with groups), each rounded up to a power of two ≥ 32,
    then those whose operand buffers exceed :data:`SHARED_BYTES`, and those outside
    :data:`ACCUMULATOR_REGS` (and, on tensor cores, narrower than a warpgroup's 64 rows; on FMAs, wider
    than :data:`FMA_WIDEST_N`).
    """
    grouped = kwargs.get("GROUPED", named_args.get("GROUPED", False))
    widest_n = max(32, common.next_power_of_2(named_args["N_G"]))
    widest_k = max(32, common.next_power_of_2(named_args["CG_IN"] if grouped else named_args["K_TAP"]))
    kept = [c for c in configs if c.kwargs["BLOCK_N"] <= widest_n and c.kwargs["BLOCK_K"] <= widest_k] or configs
    fma = kwargs.get("PRECISION") == "ieee" and kwargs.get("DOT_DTYPE") == tl.float32
    fast8 = bool(kwargs.get("FAST8"))
    if fma:
        kind = "fma"
    elif fast8:
        kind = "tensor cores, fast8" if kwargs.get("K_EVEN") else "tensor cores, fast8, K mask"
    elif kwargs.get("ACTIVATION") == ACTIVATION_CODES["gelu"]:
        kind = "tensor cores, gelu"
    else:
        kind = "tensor cores"
    tiles = 4 if fast8 else 1

    def fits(c) -> bool:
        if not operand_buffers_fit(c, kwargs.get("DOT_DTYPE"), m_tiles=tiles, n_tiles=tiles):
            return False
        low, high = ACCUMULATOR_REGS[kind][c.num_warps]
        regs = tiles * c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] // (32 * c.num_warps)
        if fma:
            return low <= regs <= high and c.kwargs["BLOCK_N"] <= FMA_WIDEST_N
        return low <= regs <= high and c.kwargs["BLOCK_M"] >= 64

    return [c for c in kept if fits(c)] or kept


_igemm = common.autotuned(
    qconv_igemm_kernel,
    gpu_configs=gpu_configs(),
    interpreter_config=INTERPRETER_CONFIG,
    key=[
        "M",
        "K_TAP",
        "N_G",
        "KD",
        "KH",
        "KW",
        "SD",
        "SH",
        "SW",
        "DIMS",
        "TRANSPOSED",
        "GROUPED",
        "FAST8",
        "HAS_BIAS",
        "ACTIVATION",
    ],
    prune=prune_configs,
)


def _spatial3(values, n: int, fill: int) -> tuple[int, int, int]:
    return (fill,) * (3 - n) + tuple(values)


def _channels_last_5d(t: Tensor) -> Tensor:
    """``(N, C, *S)`` -> a ``(N, D, H, W, C)`` view with channel stride 1 (one copy if ``t`` had another)."""
    n = t.dim() - 2
    cl = t.movedim(1, -1)
    if cl.stride(-1) != 1 or not cl.is_contiguous():
        cl = cl.contiguous()
    return cl.reshape(t.shape[0], *_spatial3(t.shape[2:], n, 1), t.shape[1])


def cannot_serve(input: Tensor, weight: Tensor, p: ConvParams, algorithm: str = "hamilton") -> str | None:
    """Why :func:`conv_igemm` cannot take this call (``None`` if it can)."""
    out = conv_output_shape(input.shape, weight.shape, p)
    operand = input.numel() * (2 if algorithm == "fast8" else 1)  # fast8 reads the 8 combinations of x
    if max(operand, math.prod(out)) >= INT32_LIMIT:
        return "a tensor of 2**31 elements or more (the implicit GEMM's offsets are int32)"
    return None


def conv_igemm(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    p: ConvParams,
    activation: str | None = None,
    negative_slope: float = 0.0,
    keep_pre: bool = False,
    algorithm: str = "hamilton",
) -> tuple[Tensor, Tensor | None]:
    """``(act(W ⊗ x + b), W ⊗ x + b or None)`` (transposed: the adjoint) as one implicit GEMM (``hamilton``)
    or 8 (``fast8``: on the combinations of x and W, :mod:`.fast8`, with the butterfly in the epilogue).

    ``input`` ``(N, 4·Cq_in, *S)`` in any layout; outputs are channels_last (strides of
    ``torch.channels_last`` / ``channels_last_3d``; 1d outputs ``(N, C, L)`` with channel stride 1).
    """
    n = p.spatial_dims
    shape = conv_output_shape(input.shape, weight.shape, p)
    x5 = _channels_last_5d(input)
    out_spatial = _spatial3(shape[2:], n, 1)
    y5 = torch.empty((shape[0], *out_spatial, shape[1]), dtype=input.dtype, device=input.device)
    z5 = torch.empty_like(y5) if keep_pre else y5
    cq_in, cq_out = input.shape[1] // 4, shape[1] // 4
    cg_in, cg_out = cq_in // p.groups, cq_out // p.groups
    fast8 = algorithm == "fast8"
    if fast8:  # each product: Cg_in channels of its x combination per tap into Cg_out columns
        x5 = combine_activation(x5, "right")
        packed = fast8_pack_weight(weight, p.groups, p.transposed, input.dtype)
        k_tap, n_g = cg_in, cg_out
    else:
        packed = pack_weight(weight, p.groups, p.transposed, input.dtype)
        k_tap, n_g = 4 * cg_in, 4 * cg_out
    seg_len = cg_in if fast8 or p.groups > 1 else 4 * cg_in  # a contiguous channel run of a tap
    ks = _spatial3(weight.shape[3:], n, 1)
    strides, dilations = _spatial3(p.stride, n, 1), _spatial3(p.dilation, n, 1)
    if p.transposed:  # one grid slice per sub-pixel phase, each over its ⌈O/S⌉ outputs per dim
        phases = math.prod(strides)
        m = shape[0] * math.prod(-(-o // s) for o, s in zip(out_spatial, strides, strict=True))
        common_steps = [math.gcd(s, d) for s, d in zip(strides, dilations, strict=True)]
        tap_steps = [s // c for s, c in zip(strides, common_steps, strict=True)]
        input_steps = [d // c for d, c in zip(dilations, common_steps, strict=True)]
    else:
        phases, m = 1, shape[0] * math.prod(out_spatial)
        tap_steps = input_steps = [1, 1, 1]
    dot_dtype, precision = common.dot_config(input.dtype)

    def grid(meta):
        return common.cdiv(m, meta["BLOCK_M"]) * common.cdiv(n_g, meta["BLOCK_N"]), p.groups, phases

    _igemm[grid](
        x5,
        packed,
        bias if bias is not None else packed,
        y5,
        z5,
        m,
        shape[1],
        k_tap,
        n_g,
        cq_in,
        cg_in,
        cq_out,
        cg_out,
        *x5.shape[1:4],
        *out_spatial,
        *ks,
        *x5.stride()[:4],
        *strides,
        *_spatial3(p.padding, n, 0),
        *dilations,
        *tap_steps,
        *input_steps,
        float(negative_slope),
        DIMS=n,
        **loop_constexprs(seg_len, math.prod(ks)),
        TRANSPOSED=p.transposed,
        GROUPED=p.groups > 1,
        FAST8=fast8,
        HAS_BIAS=bias is not None,
        ACTIVATION=ACTIVATION_CODES[activation],
        STORE_PRE=keep_pre,
        DOT_DTYPE=dot_dtype,
        PRECISION=precision,
    )

    def blocked(t5: Tensor) -> Tensor:
        return t5.reshape(shape[0], *shape[2:], shape[1]).movedim(-1, 1)

    return blocked(y5), (blocked(z5) if keep_pre else None)
