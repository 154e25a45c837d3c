"""fast8 on the implicit-GEMM kernels: Howell & Lafon's 8 products as 8 GEMMs of one ``tl.dot`` per K step.

``Z = A ⊗ B`` with fast8 is 8 real products ``s_m = L_m(A) · R_m(B)`` of operand combinations
(``quaternion.FAST8_LEFT`` / ``FAST8_RIGHT``: each one component plus or minus another) and a butterfly
(``quaternion.FAST8_OUT``). On the GEMM kernels each product is a GEMM of a quarter of the hamilton GEMM's
size, so fast8 does half the multiply-adds. What this module provides:

* **The combinations of an activation, formed in a pre-pass** (:func:`combine_activation`, one Triton kernel
  reading the four components once and writing the eight combinations; twice the activation's size,
  channels_last). Forming them at load time would put an add between the load and the dot, so the tiles
  could no longer be copied asynchronously into shared memory and fed to the MMA as they are (what
  issue 13 found wrong with the old kernel). Channel ``m·Cq + c`` of the result is combination ``m`` of
  quaternion channel ``c``: with groups, product m of group g is one contiguous run of ``Cg`` channels at
  ``m·Cq + g·Cg``, the same shape of operand as one component of a hamilton group.
* **The combinations of a weight** (:func:`combine_weight`, in PyTorch: a weight is small) and their
  K-major packing for the forward GEMM (:func:`pack_weight`, the layout of :func:`.igemm.pack_weight`
  with 8 products of one component in place of 4 components).
* **The butterfly of the weight gradient** as a fold table (:func:`fold_table`); the forward's butterfly
  runs in the GEMM's epilogue (:mod:`.igemm`).

In half precision the combinations are rounded to the input dtype once (formed in fp32): fast8 is opt-in
there, within 2x the expanded conv's error on balanced components (DESIGN.md's contract).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...quaternion import FAST8_LEFT, FAST8_OUT, FAST8_RIGHT
from . import common
from .channels import chan_align, component, said_multiple

#: products of fast8
PRODUCTS = 8

#: the combination tables by operand side
SIDES = {"left": FAST8_LEFT, "right": FAST8_RIGHT}


def combination_matrix(side: str, conjugate: bool = False) -> list[list[int]]:
    """``M[m][p]``: combination m of the ``side`` operand is ``Σ_p M[m][p] · q_p`` (of ``conj(q)`` if
    ``conjugate``)."""
    flip = (1, -1, -1, -1) if conjugate else (1, 1, 1, 1)
    rows = []
    for p, q, sign in SIDES[side]:
        row = [0, 0, 0, 0]
        row[p] += flip[p]
        row[q] += sign * flip[q]
        rows.append(row)
    return rows


def combination_codes(side: str, conjugate: bool) -> dict[str, int]:
    """The combination table as four constexpr ints: per product two component indices (2 bits each) and
    whether each enters negated (1 bit each)."""
    codes = dict(FIRST=0, SECOND=0, NEG_FIRST=0, NEG_SECOND=0)
    for m, row in enumerate(combination_matrix(side, conjugate)):
        (p, sp), (q, sq) = [(c, s) for c, s in enumerate(row) if s]
        codes["FIRST"] |= p << (2 * m)
        codes["SECOND"] |= q << (2 * m)
        codes["NEG_FIRST"] |= (sp < 0) << m
        codes["NEG_SECOND"] |= (sq < 0) << m
    return codes


@triton.jit
def combine_kernel(
    src_ptr,  # (P, 4*CQ) contiguous: blocked [r|i|j|k] channels per pixel
    dst_ptr,  # (P, 8*CQ) contiguous: the 8 combinations per pixel
    P,
    CQ,
    FIRST: tl.constexpr,
    SECOND: tl.constexpr,
    NEG_FIRST: tl.constexpr,
    NEG_SECOND: tl.constexpr,
    CHAN_ALIGN: tl.constexpr,  # a power of two dividing CQ (channels.chan_align): the runs' 16-byte loads
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """``dst[p, m·CQ + c] = ±src[p, FIRST_m·CQ + c] ± src[p, SECOND_m·CQ + c]`` (fp32, rounded once).

    Each component tile is loaded once, in the input dtype, and each combination picks its two: loaded per
    combination instead, the compiler reloaded each component four times (the stores in between may alias
    for all it knows: 64 16-byte loads a thread in bf16 for 16 distinct ones)."""
    CQ = said_multiple(CQ, CHAN_ALIGN)
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = (offs_p < P)[:, None] & (offs_c < CQ)[None, :]
    src = src_ptr + offs_p[:, None] * (4 * CQ) + offs_c[None, :]
    dst = dst_ptr + offs_p[:, None] * (8 * CQ) + offs_c[None, :]
    r = tl.load(src, mask=ok, other=0.0)
    i = tl.load(src + CQ, mask=ok, other=0.0)
    j = tl.load(src + 2 * CQ, mask=ok, other=0.0)
    k = tl.load(src + 3 * CQ, mask=ok, other=0.0)
    for m in tl.static_range(8):
        a = component((FIRST >> (2 * m)) & 3, r, i, j, k).to(tl.float32)
        b = component((SECOND >> (2 * m)) & 3, r, i, j, k).to(tl.float32)
        if (NEG_FIRST >> m) & 1:
            a = -a
        if (NEG_SECOND >> m) & 1:
            b = -b
        tl.store(dst + m * CQ, (a + b).to(dst_ptr.dtype.element_ty), mask=ok)


#: elements of a pre-pass program's tile (pixels x quaternion channels): 8 a thread on 4 warps, one 16-byte
#: load of each component in half precision
COMBINE_TILE = 1024


def combine_blocks(cq: int) -> tuple[int, int]:
    """``(BLOCK_P, BLOCK_C)`` of the pre-pass for ``cq`` quaternion channels: channels up to 64 a tile (16 at
    least), as few of them past ``cq`` as a power of two allows, and pixels for the rest of the tile."""
    block_c = min(64, max(16, common.next_power_of_2(cq)))
    return COMBINE_TILE // block_c, block_c


def combine_activation(x5: Tensor, side: str, conjugate: bool = False) -> Tensor:
    """The 8 combinations of a channels_last activation ``(N, D, H, W, 4·Cq)`` (contiguous):
    ``(N, D, H, W, 8·Cq)``, channel ``m·Cq + c`` = combination m of the ``side`` operand (of its conjugate
    if ``conjugate``) at quaternion channel c."""
    *lead, c4 = x5.shape
    cq = c4 // 4
    out = torch.empty((*lead, 2 * c4), dtype=x5.dtype, device=x5.device)
    pixels = math.prod(lead)
    block_p, block_c = combine_blocks(cq)
    grid = (common.cdiv(pixels, block_p), common.cdiv(cq, block_c))
    codes = combination_codes(side, conjugate)
    combine_kernel[grid](x5, out, pixels, cq, **codes, CHAN_ALIGN=chan_align(cq), BLOCK_P=block_p, BLOCK_C=block_c)
    return out


def combine_weight(weight: Tensor, side: str, conjugate: bool = False, rounded: bool = True) -> Tensor:
    """``(4, A, B, *k)`` -> ``(8, A, B, *k)``: the 8 combinations of the ``side`` operand (formed in fp32 or
    wider, returned in the weight's dtype, or as formed if not ``rounded``: for a caller that rounds them on
    its own copy)."""
    wide = torch.promote_types(weight.dtype, torch.float32)
    m = _combination_table(side, conjugate, wide, weight.device)
    combined = torch.mm(m, weight.to(wide).reshape(4, -1)).view(PRODUCTS, *weight.shape[1:])
    return combined.to(weight.dtype) if rounded else combined


@functools.lru_cache(maxsize=64)
def _combination_table(side: str, conjugate: bool, dtype: torch.dtype, device: torch.device) -> Tensor:
    """:func:`combination_matrix` as an ``(8, 4)`` tensor on ``device``, cached (read-only): built per call,
    ``torch.tensor(..., device='cuda')`` is a blocking host-to-device copy, i.e. a wait for every kernel
    queued before it, in each fast8 conv and input gradient."""
    return torch.tensor(combination_matrix(side, conjugate), dtype=dtype).to(device)


def pack_weight(weight: Tensor, groups: int, transposed: bool, dtype: torch.dtype | None = None) -> Tensor:
    """The 8 products' B operands of the forward GEMM, K-major: ``(G, 8·Cg_out, taps·Cg_in)``; row
    ``m·Cg_out + o`` is product m's output channel o, column ``tap·Cg_in + i`` its input channel i.

    The left operand of ``y = W ⊗ x`` is W, that of the transposed conv ``y = conj(W) ⊗ x`` (the adjoint) is
    ``conj(W)``, read as torch's ``(in, out)`` weight through the transposed index map (no flip), as in
    :func:`.igemm.pack_weight`.
    """
    four, a_dim, b_dim, *ks = weight.shape
    taps = math.prod(ks)
    # the combinations in fp32 (or wider), permuted into place and rounded by one copy
    w8 = combine_weight(weight, "left", transposed, rounded=False).view(PRODUCTS, groups, a_dim // groups, b_dim, taps)
    if transposed:  # (8, G, Cg_in, Cg_out, taps)
        packed = w8.permute(1, 0, 3, 4, 2)
        cg_in, cg_out = a_dim // groups, b_dim
    else:  # (8, G, Cg_out, Cg_in, taps)
        packed = w8.permute(1, 0, 2, 4, 3)
        cg_in, cg_out = b_dim, a_dim // groups
    out = torch.empty(packed.shape, dtype=dtype or weight.dtype, device=weight.device).copy_(packed)
    return out.view(groups, PRODUCTS * cg_out, taps * cg_in)


@functools.lru_cache(maxsize=16)
def _fold_table(device: torch.device) -> Tensor:
    t = torch.zeros(4, PRODUCTS, dtype=torch.float32)
    for c in range(4):
        t[c, c] = 1.0
        for m, sign in enumerate(FAST8_OUT[c]):
            t[c, 4 + m] = 0.5 * sign
    return t.to(device)


def fold_table(like: Tensor) -> Tensor:
    """``F[c, m]``: ``Z_c = Σ_m F[c, m] · s_m`` (``quaternion.FAST8_OUT`` as a 4x8 table, fp32), cached per
    device of ``like``: read-only."""
    return _fold_table(like.device)
