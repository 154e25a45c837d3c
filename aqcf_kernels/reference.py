"""Ground truth for every quaternion op, in plain, readable PyTorch.

Nothing here is fast on purpose. Tests compare every backend and algorithm to these functions,
and the benchmarks use two of them as the baselines a user would otherwise run:

* :func:`quaternion_conv_naive` — 16 real convolutions, one per Hamilton-product term;
* :func:`quaternion_conv_expanded` — the 4x4 block real weight of Parcollet et al.
  (``torch.cat`` of signed component kernels) and one real convolution, which is what
  Pytorch-Quaternion-Neural-Networks, speechbrain, hTorch and HyperNets all do.

Conventions (see README): quaternion tensors are blocked ``[r | i | j | k]`` along dim 1; a
quaternion conv computes ``y = W ⊗ x`` (weight on the left); the weight is one tensor of shape
``(4, out/4, in/4/groups, *kernel)`` (transposed: ``(4, in/4, out/4/groups, *kernel)``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# HAMILTON[c][a] = (p, sign): output component c receives sign * (W_p * x_a).
# Row c of Parcollet's expanded weight is [sign * W_p for a in r, i, j, k].
R, I, J, K = 0, 1, 2, 3
HAMILTON: tuple[tuple[tuple[int, int], ...], ...] = (
    ((R, +1), (I, -1), (J, -1), (K, -1)),  # y_r = W_r x_r - W_i x_i - W_j x_j - W_k x_k
    ((I, +1), (R, +1), (K, -1), (J, +1)),  # y_i = W_i x_r + W_r x_i - W_k x_j + W_j x_k
    ((J, +1), (K, +1), (R, +1), (I, -1)),  # y_j = W_j x_r + W_k x_i + W_r x_j - W_i x_k
    ((K, +1), (J, -1), (I, +1), (R, +1)),  # y_k = W_k x_r - W_j x_i + W_i x_j + W_r x_k
)


def split_components(x: Tensor, dim: int = 1) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Split a blocked ``[r | i | j | k]`` tensor into its four components along ``dim``."""
    if x.shape[dim] % 4:
        raise ValueError(f"dimension {dim} has size {x.shape[dim]}, not a multiple of 4")
    return tuple(x.chunk(4, dim=dim))  # type: ignore[return-value]


def hamilton_product(q: Tensor, p: Tensor, dim: int = 1) -> Tensor:
    """Element-wise Hamilton product ``q ⊗ p`` of two blocked quaternion tensors."""
    qc, pc = split_components(q, dim), split_components(p, dim)
    out = []
    for row in HAMILTON:
        terms = [sign * qc[comp] * pc[a] for a, (comp, sign) in enumerate(row)]
        out.append(terms[0] + terms[1] + terms[2] + terms[3])
    return torch.cat(out, dim=dim)


def conjugate(q: Tensor, dim: int = 1) -> Tensor:
    """Quaternion conjugate ``(r, -i, -j, -k)`` of a blocked tensor."""
    r, i, j, k = split_components(q, dim)
    return torch.cat([r, -i, -j, -k], dim=dim)


def expand_weight(weight: Tensor) -> Tensor:
    """Parcollet's real block weight: ``(4, A, B, *k)`` -> ``(4A, 4B, *k)``.

    Exactly the ``torch.cat`` construction of Pytorch-Quaternion-Neural-Networks::

        [[r, -i, -j, -k],
         [i,  r, -k,  j],
         [j,  k,  r, -i],
         [k, -j,  i,  r]]

    For a conv, A = out/4 and B = in/4; for a transposed conv, A = in/4 and B = out/4 (the
    same matrix, read as torch's ``(in, out)`` transposed-conv weight).
    """
    r, i, j, k = weight.unbind(0)
    return torch.cat(
        [
            torch.cat([r, -i, -j, -k], dim=1),
            torch.cat([i, r, -k, j], dim=1),
            torch.cat([j, k, r, -i], dim=1),
            torch.cat([k, -j, i, r], dim=1),
        ],
        dim=0,
    )


def _conv_fn(spatial_dims: int, transposed: bool):
    if transposed:
        return (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[spatial_dims - 1]
    return (F.conv1d, F.conv2d, F.conv3d)[spatial_dims - 1]


def _real_conv(x, w, spatial_dims, transposed, stride, padding, dilation, groups, output_padding):
    fn = _conv_fn(spatial_dims, transposed)
    if transposed:
        return fn(x, w, None, stride, padding, output_padding, groups, dilation)
    return fn(x, w, None, stride, padding, dilation, groups)


def quaternion_conv_naive(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    *,
    transposed: bool = False,
    output_padding=0,
) -> Tensor:
    """Quaternion (transposed) convolution as 16 real (transposed) convolutions.

    ``groups`` partitions the quaternion channels; inside one component block that is exactly
    torch's own ``groups``, so each of the 16 products is a plain grouped real conv.
    A transposed conv is the adjoint of the conv with the same weight: output component c
    collects the products of column c of the Hamilton matrix.
    """
    spatial_dims = weight.dim() - 3
    xs = split_components(input)
    outs = []
    for c in range(4):
        y = None
        for a in range(4):
            p, sign = HAMILTON[a][c] if transposed else HAMILTON[c][a]
            term = sign * _real_conv(
                xs[a],
                weight[p],
                spatial_dims,
                transposed,
                stride,
                padding,
                dilation,
                groups,
                output_padding,
            )
            y = term if y is None else y + term
        outs.append(y)
    y = torch.cat(outs, dim=1)
    if bias is not None:
        y = y + bias.view(1, -1, *([1] * spatial_dims))
    return y


def _to_group_major(x: Tensor, groups: int) -> Tensor:
    """``[r|i|j|k]`` with each block split in ``groups`` -> ``[g0: r i j k | g1: r i j k | ...]``."""
    n, c = x.shape[:2]
    return x.reshape(n, 4, groups, c // 4 // groups, *x.shape[2:]).transpose(1, 2).reshape(x.shape)


def _from_group_major(x: Tensor, groups: int) -> Tensor:
    n, c = x.shape[:2]
    return x.reshape(n, groups, 4, c // 4 // groups, *x.shape[2:]).transpose(1, 2).reshape(x.shape)


def quaternion_conv_expanded(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    *,
    transposed: bool = False,
    output_padding=0,
) -> Tensor:
    """Quaternion (transposed) convolution as ONE real conv on Parcollet's expanded weight.

    With ``groups > 1`` the expanded weight of each group is built separately and the channels
    are reordered group-major around the conv, because torch's ``groups`` on a blocked tensor
    would pair r-channels of one group with i-channels of another (the speechbrain bug).
    """
    spatial_dims = weight.dim() - 3
    per_group = weight.chunk(groups, dim=1)
    w = torch.cat([expand_weight(wg) for wg in per_group], dim=0)
    x = _to_group_major(input, groups) if groups > 1 else input
    y = _real_conv(x, w, spatial_dims, transposed, stride, padding, dilation, groups, output_padding)
    if groups > 1:
        y = _from_group_major(y, groups)
    if bias is not None:
        y = y + bias.view(1, -1, *([1] * spatial_dims))
    return y


# --------------------------------------------------------------------------------------------
# A-QCF cross-attention (see aqcf_kernels.nn.attention for the block this is part of)
# --------------------------------------------------------------------------------------------


def attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Materialised ``softmax(q kᵀ · scale) v`` and the log-sum-exp of each score row.

    ``q`` is ``(B, H, Nq, E)``, ``k`` and ``v`` are ``(B, H, Nk, E)``. With a head's ``E = 4·d``
    reals laid out ``[r | i | j | k]``, the real dot product ``q·k`` is ``Re(Σ_c q_c ⊗ conj(k_c))``
    over the head's ``d`` quaternion channels, so this is the quaternion score of the A-QCF block.
    """
    scores = (q @ k.transpose(-1, -2)) * scale
    return torch.softmax(scores, dim=-1) @ v, torch.logsumexp(scores, dim=-1)


def cross_attention(
    q_a: Tensor, k_a: Tensor, v_a: Tensor, q_b: Tensor, k_b: Tensor, v_b: Tensor, scale: float
) -> tuple[Tensor, Tensor]:
    """Both directions of the A-QCF attention: a's queries read b's keys/values and vice versa."""
    return attention(q_a, k_b, v_b, scale)[0], attention(q_b, k_a, v_a, scale)[0]


def gated_residual(f: Tensor, o: Tensor, gate_logits: Tensor, alpha: Tensor) -> Tensor:
    """``f + α · sigmoid(g) ⊙ o``: the A-QCF block's gate-and-residual epilogue."""
    return f + alpha * torch.sigmoid(gate_logits) * o
