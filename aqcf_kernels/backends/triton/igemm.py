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
  ``i·stride = o + pad − k·dil``), so a stride-s transposed conv masks (s^d − 1)/s^d of its rows per
  tap instead of multiplying zeros (a sub-pixel decomposition would avoid that; not done).
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
from ...quaternion import hamilton_table
from . import common
from .conv_kernels import _activate

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
    t = hamilton_table(like=weight)  # T[p, c, a]: sign of W_p from input comp a into output comp c
    if transposed:  # (4, G*Cg_in, Cg_out, *k): rows are input channels
        w = weight.reshape(4, groups, a_dim // groups, b_dim, *ks)
        packed = torch.einsum("pac,pgio...->gco...ai", t, w)
        cg_in, cg_out = a_dim // groups, b_dim
    else:  # (4, G*Cg_out, Cg_in, *k)
        w = weight.reshape(4, groups, a_dim // groups, b_dim, *ks)
        packed = torch.einsum("pca,pgoi...->gco...ai", t, w)
        cg_in, cg_out = b_dim, a_dim // groups
    taps = math.prod(ks)
    return packed.reshape(groups, 4 * cg_out, taps * 4 * cg_in).to(dtype or weight.dtype).contiguous()


# --------------------------------------------------------------------------------------------
# the kernel
# --------------------------------------------------------------------------------------------


@triton.jit
def qconv_igemm_kernel(
    x_ptr,  # (N, ID, IH, IW, C_X) channels_last, channel stride 1
    w_ptr,  # (G, N_G, KD*KH*KW*K_TAP) packed weight, K-major
    b_ptr,  # (4*CQ_OUT,) blocked bias (read when HAS_BIAS)
    y_ptr,  # (M, C_Y) channels_last output
    z_ptr,  # (M, C_Y) pre-activation (written when STORE_PRE)
    M,  # N * OD * OH * OW: output pixels (GEMM M)
    C_Y,  # real channels of y: its pixel stride
    K_TAP,  # 4 * CG_IN: real input channels of a group per tap
    N_G,  # 4 * CG_OUT: real output channels of a group (GEMM N)
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
    negative_slope,
    TRANSPOSED: tl.constexpr,
    GROUPED: tl.constexpr,
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
    m_mask = offs_m < M
    ow = offs_m % OW
    t = offs_m // OW
    oh = t % OH
    t = t // OH
    od = t % OD
    nb = t // OD
    # Per-row base coordinates, hoisted out of the K loop: a step adds its tap's scalar offset.
    if TRANSPOSED:  # input i feeds output o when i * stride = o + pad - k * dil
        bd = od + PD
        bh = oh + PH
        bw = ow + PW
    else:
        bd = od * SD - PD
        bh = oh * SH - PH
        bw = ow * SW - PW
    x_rows = x_ptr + nb * s_xn

    offs_k = tl.arange(0, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N_G
    k_all = KD * KH * KW * K_TAP
    w_base = w_ptr + g * N_G * k_all + offs_n[None, :] * k_all

    # K = taps × segments × channel blocks: one contiguous run of 4·Cq_in channels per tap without
    # groups, four runs (one per component) of Cg_in channels with them.
    # (Without groups the run's offset is a literal 0: an unhinted runtime term would cost the x
    # tile its 16-byte alignment, i.e. its vector loads and async copies.)
    if GROUPED:
        seg_len = CG_IN
        seg_stride = CQ_IN
        n_seg = 4
        x_chan = g * CG_IN
    else:
        seg_len = K_TAP
        seg_stride = 0
        n_seg = 1
        x_chan = 0
    blocks = tl.cdiv(seg_len, BLOCK_K)
    steps_per_tap = n_seg * blocks
    steps = KD * KH * KW * steps_per_tap

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in range(0, steps):
        tap = s // steps_per_tap
        r = s - tap * steps_per_tap
        seg = r // blocks
        c0 = (r - seg * blocks) * BLOCK_K
        kw = tap % KW
        kh = (tap // KW) % KH
        kd = tap // (KW * KH)
        if TRANSPOSED:
            nd = bd - kd * DD
            nh = bh - kh * DH
            nw = bw - kw * DW
            idd = nd // SD
            ih = nh // SH
            iw = nw // SW
            ok = (nd >= 0) & (nh >= 0) & (nw >= 0) & (nd % SD == 0) & (nh % SH == 0) & (nw % SW == 0)
        else:
            idd = bd + kd * DD
            ih = bh + kh * DH
            iw = bw + kw * DW
            ok = (idd >= 0) & (ih >= 0) & (iw >= 0)
        ok = ok & (idd < ID) & (ih < IH) & (iw < IW) & m_mask
        ck = c0 + offs_k
        k_ok = ck < seg_len
        x_tile = (x_rows + idd * s_xd + ih * s_xh + iw * s_xw)[:, None] + (x_chan + seg * seg_stride + ck)[None, :]
        a = tl.load(x_tile, mask=ok[:, None] & k_ok[None, :], other=0.0)
        w_tile = w_base + (tap * K_TAP + seg * seg_len + ck)[:, None]
        b = tl.load(w_tile, mask=k_ok[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=PRECISION)

    # column n = (component c, channel o) of the group -> blocked channel c·Cq_out + g·Cg_out + o
    if GROUPED:
        comp = offs_n // CG_OUT
        ch = comp * CQ_OUT + g * CG_OUT + (offs_n - comp * CG_OUT)
    else:
        ch = offs_n
    if HAS_BIAS:
        acc += tl.load(b_ptr + ch, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y_rel = offs_m[:, None] * C_Y + ch[None, :]
    y_msk = m_mask[:, None] & n_mask[None, :]
    out_ty = y_ptr.dtype.element_ty
    if STORE_PRE:
        tl.store(z_ptr + y_rel, acc.to(out_ty), mask=y_msk)
    tl.store(y_ptr + y_rel, _activate(acc, ACTIVATION, negative_slope).to(out_ty), mask=y_msk)


# --------------------------------------------------------------------------------------------
# launcher
# --------------------------------------------------------------------------------------------

#: Interpreted programs cost per program and step, whatever their tiles: one config with big tiles
#: (tests/triton_kernels/test_igemm.py has a case with several M, N and K blocks and a partial band).
INTERPRETER_CONFIG = {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 2}


def gpu_configs() -> list:
    """The autotune set on a GPU: (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages), BLOCK_K 32–64, 3–4 stages.

    128×128 with 8 warps for wide layers, 128×64 / 64×128 with 4, and narrow N for 8q–16q layers
    (4·Cg_out = 32–64 columns); :func:`prune_configs` drops tiles wider than the layer.
    """
    shapes = [
        (128, 128, 64, 8, 3),
        (128, 128, 32, 8, 4),
        (128, 64, 64, 4, 3),
        (64, 128, 64, 4, 3),
        (128, 64, 32, 4, 4),
        (64, 64, 64, 4, 3),
        (128, 32, 64, 4, 4),
        (128, 32, 32, 4, 4),
    ]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for m, n, k, w, s in shapes
    ]


def prune_configs(configs: list, named_args: dict, **kwargs) -> list:
    """Drop configs whose N tile is wider than the layer (``N_G`` columns) or whose K tile is wider than a
    contiguous channel run (``K_TAP``, or ``CG_IN`` with groups), each rounded up to a power of two ≥ 32.

    In IEEE fp32 the dot runs on FMAs with the accumulator in registers: only tiles of ≤ 32 accumulators
    per thread are kept (compiled for sm_90, the bigger ones spill 64-168 B; see test_igemm_static.py).
    """
    grouped = kwargs.get("GROUPED", named_args.get("GROUPED", False))
    widest_n = max(32, triton.next_power_of_2(named_args["N_G"]))
    widest_k = max(32, triton.next_power_of_2(named_args["CG_IN"] if grouped else named_args["K_TAP"]))
    kept = [c for c in configs if c.kwargs["BLOCK_N"] <= widest_n and c.kwargs["BLOCK_K"] <= widest_k]
    if kwargs.get("PRECISION") == "ieee" and kwargs.get("DOT_DTYPE") == tl.float32:
        fma = [c for c in kept or configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 32 * 32 * c.num_warps]
        kept = fma or kept
    return kept or configs


_igemm = triton.autotune(
    configs=[triton.Config(INTERPRETER_CONFIG)] if common.INTERPRET else gpu_configs(),
    key=["M", "K_TAP", "N_G", "KD", "KH", "KW", "SD", "SH", "SW", "TRANSPOSED", "GROUPED", "HAS_BIAS", "ACTIVATION"],
    prune_configs_by=None if common.INTERPRET else {"early_config_prune": prune_configs},
)(qconv_igemm_kernel)


def _spatial3(values, n: int, fill: int) -> tuple[int, int, int]:
    return (fill,) * (3 - n) + tuple(values)


def _channels_last_5d(t: Tensor) -> Tensor:
    """``(N, C, *S)`` -> a ``(N, D, H, W, C)`` view with channel stride 1 (one copy if ``t`` had another)."""
    n = t.dim() - 2
    cl = t.movedim(1, -1)
    if cl.stride(-1) != 1 or not cl.is_contiguous():
        cl = cl.contiguous()
    return cl.reshape(t.shape[0], *_spatial3(t.shape[2:], n, 1), t.shape[1])


def cannot_serve(input: Tensor, weight: Tensor, p: ConvParams) -> str | None:
    """Why :func:`conv_igemm` cannot take this call (``None`` if it can)."""
    out = conv_output_shape(input.shape, weight.shape, p)
    if max(input.numel(), math.prod(out)) >= INT32_LIMIT:
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
) -> tuple[Tensor, Tensor | None]:
    """``(act(W ⊗ x + b), W ⊗ x + b or None)`` (transposed: the adjoint) as one implicit GEMM.

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
    packed = pack_weight(weight, p.groups, p.transposed, input.dtype)
    ks = _spatial3(weight.shape[3:], n, 1)
    m = shape[0] * math.prod(out_spatial)
    dot_dtype, precision = common.dot_config(input.dtype)

    def grid(meta):
        return triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(4 * cg_out, meta["BLOCK_N"]), p.groups

    _igemm[grid](
        x5,
        packed,
        bias if bias is not None else packed,
        y5,
        z5,
        m,
        shape[1],
        4 * cg_in,
        4 * cg_out,
        cq_in,
        cg_in,
        cq_out,
        cg_out,
        *x5.shape[1:4],
        *out_spatial,
        *ks,
        *x5.stride()[:4],
        *_spatial3(p.stride, n, 1),
        *_spatial3(p.padding, n, 0),
        *_spatial3(p.dilation, n, 1),
        float(negative_slope),
        TRANSPOSED=p.transposed,
        GROUPED=p.groups > 1,
        HAS_BIAS=bias is not None,
        ACTIVATION=ACTIVATION_CODES[activation],
        STORE_PRE=keep_pre,
        DOT_DTYPE=dot_dtype,
        PRECISION=precision,
    )

    def blocked(t5: Tensor) -> Tensor:
        return t5.reshape(shape[0], *shape[2:], shape[1]).movedim(-1, 1)

    return blocked(y5), (blocked(z5) if keep_pre else None)
