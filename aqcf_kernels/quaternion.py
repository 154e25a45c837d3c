"""Quaternion algebra shared by every backend.

A quaternion conv, its input gradient and its weight gradient are all Hamilton products
``Z = A ⊗ B`` in which each scalar product ``A_p * B_a`` is a real bilinear map (a conv, a
transposed conv, or a weight-gradient correlation):

* forward            ``y  = W ⊗ x``             product = conv
* transposed forward ``y  = conj(W) ⊗ x``       product = conv_transpose (the adjoint)
* weight gradient    ``gW = gy ⊗ conj(x)``      product = weight-gradient correlation

so two algorithms serve all of them:

* ``hamilton``: the 16 products (fused into one dense GEMM/conv on the expanded weight);
* ``fast8``: Howell & Lafon's 8-multiplication product, valid for non-commuting blocks.

``FAST8_LEFT[m] = (p, q, sign)`` means the left operand of product m is ``A_p + sign * A_q``;
``FAST8_RIGHT`` likewise for B. The outputs are recovered with :data:`FAST8_OUT`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

ALGORITHMS = ("hamilton", "fast8")
#: What callers may pass: an algorithm, or 'auto' (the backend picks one per call, see aqcf_kernels.tuning).
ALGORITHM_CHOICES = ("auto", *ALGORITHMS)


def check_algorithm(owner: str, algorithm: object) -> str:
    """The one check of an ``algorithm`` argument; ``owner`` names the caller in the error."""
    if algorithm not in ALGORITHM_CHOICES:
        raise ValueError(f"{owner}: unknown algorithm {algorithm!r}; algorithm must be one of {ALGORITHM_CHOICES}")
    return algorithm  # type: ignore[return-value]


R, I, J, K = 0, 1, 2, 3


def unit_product(p: int, a: int) -> tuple[int, int]:
    """``e_p ⊗ e_a = sign · e_c`` for the units ``e_0 = 1, e_1 = i, e_2 = j, e_3 = k``: returns ``(c, sign)``.

    Hamilton's rules: 1 is the identity, ``i² = j² = k² = −1``, and the product of two different
    imaginary units is the third, positive in cyclic order (``ij = k, jk = i, ki = j``), negative
    against it (``ji = −k``, ...).
    """
    if p == R:
        return a, +1
    if a == R:
        return p, +1
    if p == a:
        return R, -1
    third = I + J + K - p - a
    return third, (+1 if (a - p) % 3 == 1 else -1)


def _hamilton_rows() -> tuple[tuple[tuple[int, int], ...], ...]:
    rows: list[list[tuple[int, int]]] = [[(R, 0)] * 4 for _ in range(4)]
    for p in range(4):
        for a in range(4):
            c, sign = unit_product(p, a)
            rows[c][a] = (p, sign)
    return tuple(tuple(row) for row in rows)


#: ``HAMILTON[c][a] = (p, sign)``: in ``y = W ⊗ x``, output component c receives ``sign * (W_p * x_a)``
#: (row c of Parcollet's expanded weight). Derived from :func:`unit_product`; the test oracle
#: ``aqcf_kernels.reference`` writes the same table out by hand.
HAMILTON: tuple[tuple[tuple[int, int], ...], ...] = _hamilton_rows()

# Howell & Lafon, with A = (a1, b1, c1, d1) and B = (a2, b2, c2, d2):
# s1=(d1-c1)(c2-d2) s2=(a1+b1)(a2+b2) s3=(a1-b1)(c2+d2) s4=(c1+d1)(a2-b2)
# s5=(d1-b1)(b2-c2) s6=(d1+b1)(b2+c2) s7=(a1+c1)(a2-d2) s8=(a1-c1)(a2+d2)
FAST8_LEFT: tuple[tuple[int, int, int], ...] = (
    (K, J, -1),
    (R, I, +1),
    (R, I, -1),
    (J, K, +1),
    (K, I, -1),
    (K, I, +1),
    (R, J, +1),
    (R, J, -1),
)
FAST8_RIGHT: tuple[tuple[int, int, int], ...] = (
    (J, K, -1),
    (R, I, +1),
    (J, K, +1),
    (R, I, -1),
    (I, J, -1),
    (I, J, +1),
    (R, K, -1),
    (R, K, +1),
)
# s9 = s6+s7+s8, t = (s5+s9)/2, Z = (s1+t-s6, s2+t-s9, s3+t-s8, s4+t-s7). Expanded:
# Z_c = s_c + 1/2 * sum_m FAST8_OUT[c][m] * s_{5+m}
FAST8_OUT: tuple[tuple[int, int, int, int], ...] = (
    (+1, -1, +1, +1),
    (+1, -1, -1, -1),
    (+1, +1, +1, -1),
    (+1, +1, -1, +1),
)


@functools.lru_cache(maxsize=64)
def _hamilton_table(dtype: torch.dtype, device: torch.device) -> Tensor:
    t = torch.zeros(4, 4, 4, dtype=dtype)
    for c in range(4):
        for a in range(4):
            p, sign = HAMILTON[c][a]
            t[p, c, a] = sign
    return t.to(device)


def hamilton_table(like: Tensor) -> Tensor:
    """``T[p, c, a]`` = sign with which ``W_p`` maps input component a to output component c.

    ``expand(W)[c, a] = sum_p T[p, c, a] W_p`` and the weight gradient folds back with the same
    table (a transposed conv reads the same matrix as torch's ``(in, out)`` weight). Cached per
    dtype and device of ``like``, since every hamilton-algorithm call needs it: read-only.
    """
    return _hamilton_table(like.dtype, like.device)


def hamilton_blocks(weight: Tensor, groups: int, adjoint: bool = False) -> Tensor:
    """``(4, G*A, B, *k)`` -> ``(4, 4, G, A, B, *k)``: block ``[c, a]`` is the signed component
    ``Σ_p T[p, c, a] W_p`` that maps input component a to output component c (``adjoint``: ``T[p, a, c]``,
    the conjugate transpose's blocks, for the weight of a transposed conv read as ``(in, out)``).

    One GEMM with the ``(16, 4)`` sign matrix; callers permute the result into their layout with one copy.
    (torch.einsum took twice the host time, ~20 µs a call on CPU, where a small layer's conv takes a few,
    and packing runs every step.)
    """
    t = hamilton_table(like=weight)
    t = (t.transpose(1, 2) if adjoint else t).reshape(4, 16).t()
    four, ga, b, *ks = weight.shape
    return torch.mm(t, weight.reshape(4, -1)).view(4, 4, groups, ga // groups, b, *ks)


def expand_weight_grouped(weight: Tensor, groups: int) -> Tensor:
    """``(4, G*A, B, *k)`` -> ``(G*4*A, 4*B, *k)``: per group the expanded weight, stacked
    group-major — the weight of one real conv with ``groups=G`` on a group-major tensor."""
    four, ga, b, *ks = weight.shape
    e = hamilton_blocks(weight, groups)  # (c, a, g, x, y, *k)
    kernel_dims = range(5, 5 + len(ks))
    return e.permute(2, 0, 3, 1, 4, *kernel_dims).reshape(ga * 4, 4 * b, *ks)


def fold_weight_grad_grouped(grad_expanded: Tensor, groups: int) -> Tensor:
    """Adjoint of :func:`expand_weight_grouped`: ``(G*4*A, 4*B, *k)`` -> ``(4, G*A, B, *k)``."""
    g4a, b4, *ks = grad_expanded.shape
    a, b = g4a // groups // 4, b4 // 4
    t = hamilton_table(like=grad_expanded).reshape(4, 16)
    kernel_dims = range(5, 5 + len(ks))
    e = grad_expanded.reshape(groups, 4, a, 4, b, *ks).permute(1, 3, 0, 2, 4, *kernel_dims)  # (c, a, g, x, y, *k)
    return torch.mm(t, e.reshape(16, -1)).view(4, groups * a, b, *ks)


def to_group_major(x: Tensor, groups: int) -> Tensor:
    """Blocked ``[r|i|j|k]`` (each block split in groups) -> ``[g0: r i j k | g1: ...]``."""
    if groups == 1:
        return x
    n, c = x.shape[:2]
    return x.reshape(n, 4, groups, c // 4 // groups, *x.shape[2:]).transpose(1, 2).reshape(x.shape)


def from_group_major(x: Tensor, groups: int) -> Tensor:
    if groups == 1:
        return x
    n, c = x.shape[:2]
    return x.reshape(n, groups, 4, c // 4 // groups, *x.shape[2:]).transpose(1, 2).reshape(x.shape)


def component_balance(t: Tensor, dim: int = 1, sample: int = 2**16) -> float:
    """How evenly the four components of ``t`` (blocked ``[r|i|j|k]`` along ``dim``) are scaled: the smallest
    component's RMS over the largest's (1.0 for equal scales; 1.0 for an all-zero tensor).

    Read on a strided sample of about ``sample`` values per component, the same number of positions along
    every other dim (a view: no copy, in any memory format), so it costs a small fraction of one pass over
    ``t``; the result is a Python float, so on a GPU it waits for the device.
    """
    v = t.unflatten(dim, (4, -1))
    comp = dim % t.dim()
    per_dim = max(2, round(sample ** (1 / max(1, v.dim() - 1))))
    picks = tuple(
        slice(None) if d == comp else slice(None, None, -(-size // per_dim)) for d, size in enumerate(v.shape)
    )
    others = [d for d in range(v.dim()) if d != comp]
    rms = v[picks].float().square().mean(dim=others).sqrt()
    top = float(rms.max())
    return 1.0 if top == 0.0 else float(rms.min()) / top


def conjugate_components(q: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return q[0], -q[1], -q[2], -q[3]


def fast8_product(
    left: Sequence[Tensor],
    right: Sequence[Tensor],
    product: Callable[[Tensor, Tensor], Tensor],
) -> list[Tensor]:
    """Hamilton product ``left ⊗ right`` with 8 calls of the bilinear ``product``.

    Streams one product at a time so at most one transformed operand pair and the four
    accumulated ``s5..s8`` contributions are alive: the transformed copies never outlive the
    call (peak memory close to the expanded conv's).
    """
    s = []
    for (lp, lq, ls), (rp, rq, rs) in zip(FAST8_LEFT, FAST8_RIGHT, strict=True):
        s.append(product(torch.add(left[lp], left[lq], alpha=ls), torch.add(right[rp], right[rq], alpha=rs)))
    u = s[4] - s[5]  # butterfly of s5..s8 (Z_r = s1 + (u + v)/2, Z_i = s1 + (u - v)/2, ...)
    w = s[4] + s[5]
    v = s[6] + s[7]
    z = s[6] - s[7]
    return [
        torch.add(s[0], u + v, alpha=0.5),
        torch.add(s[1], u - v, alpha=0.5),
        torch.add(s[2], w + z, alpha=0.5),
        torch.add(s[3], w - z, alpha=0.5),
    ]
