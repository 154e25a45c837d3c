"""Quaternion rotation ("spinor") conv and linear maps: ``y = W ⊗ x ⊗ W⁻¹`` on the pure part of ``x``.

Parcollet's ``quaternion_conv_rotation`` / ``quaternion_linear_rotation``
(Pytorch-Quaternion-Neural-Networks, ``core_qnn/quaternion_ops.py``) and speechbrain's
``quaternion_conv_rotation_op`` (``speechbrain/nnet/quaternion_networks/q_ops.py``, the ``spinor=True``
layers) compute, for every weight quaternion ``w = (r, i, j, k)`` (one per output channel, input
channel and kernel tap):

    q = w / sqrt(|w|² + ε),   ε = 1e-4,

and the 3x3 matrix of the rotation by ``q`` (Wikipedia, "Quaternions and spatial rotation"), written
with ``1 - 2(...)`` on the diagonal:

    R(q) = [[1 - 2(q_j² + q_k²),  2(q_i q_j - q_r q_k), 2(q_i q_k + q_r q_j)],
            [2(q_i q_j + q_r q_k), 1 - 2(q_i² + q_k²),  2(q_j q_k - q_r q_i)],
            [2(q_i q_k - q_r q_j), 2(q_j q_k + q_r q_i), 1 - 2(q_i² + q_j²)]],

optionally times a learnt per-weight ``scale`` (their ``scale_param``), and apply it to the
``[i|j|k]`` blocks of the input. The real input block is ignored and the real output block is zero
(plus the bias) with ``quaternion_format=True`` (both libraries' default); with
``quaternion_format=False`` input and output are ``[i|j|k]`` tensors of three blocks.

Because ``|q| < 1`` (the ε), the diagonal's ``1 - ...`` is not ``q_r² + q_i² - q_j² - q_k²``: the
map is exactly ``(w ⊗ v ⊗ w* + ε v) / (|w|² + ε)`` for a pure ``v``, a rotation by ``w`` (any
non-zero modulus) up to a relative ``O(ε / |w|²)``. ``eps=0`` gives the exact rotation.

The map is linear in ``x`` for each weight quaternion, so the conv is ONE real (transposed) conv of
the three pure blocks with a derived ``(3A, 3B, *k)`` weight; it is built in a few vectorised
tensor expressions and autograd differentiates through it (``weight``, ``scale``). Groups keep the
library's meaning (each group holds all components): the pure blocks are reordered group-major
around the real conv, as the expanded-weight conv does.

speechbrain's ``quaternion_linear_rotation_op`` (``QLinear(spinor=True)``) is the one original that
differs: its block matrix applies ``R(q)ᵀ`` (the rotation by ``q*``) and it normalises by
``|w| + 1e-4``; :func:`quaternion_rotation_linear` follows Parcollet's linear, which applies ``R(q)``.

A transposed rotation conv is the adjoint of the rotation conv with the same weight (the library's
definition of every transposed conv): per tap it applies ``R(q)ᵀ = R(q*)``, the inverse rotation.
Parcollet's ``quaternion_transpose_conv_rotation`` builds this same kernel but then convolves with
an undefined name, so there is no original to compare with.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backends.torch.conv import real_conv
from ..params import IntOrSeq, check_conv_args

#: Parcollet's and speechbrain's conv normalisation ``w / sqrt(|w|² + 1e-4)``.
ROTATION_EPS = 1e-4


def rotation_channel_blocks(quaternion_format: bool) -> int:
    """How many blocks a rotation layer's tensors have: 4 (``[r|i|j|k]``) or 3 (``[i|j|k]``)."""
    return 4 if quaternion_format else 3


def rotation_matrices(weight: Tensor, scale: Tensor | None = None, eps: float = ROTATION_EPS) -> Tensor:
    """The ``(3, 3, *weight.shape[1:])`` rotation matrices of the quaternions of ``weight`` (4 first).

    Entry ``[c, a]`` maps pure input component ``a`` (0 = i, 1 = j, 2 = k) to output component ``c``;
    ``scale`` (the shape of one component) multiplies every matrix.
    """
    q = weight * torch.rsqrt((weight * weight).sum(0, keepdim=True) + eps)
    r, i, j, k = q.unbind(0)
    rows = (
        (1 - 2 * (j * j + k * k), 2 * (i * j - r * k), 2 * (i * k + r * j)),
        (2 * (i * j + r * k), 1 - 2 * (i * i + k * k), 2 * (j * k - r * i)),
        (2 * (i * k - r * j), 2 * (j * k + r * i), 1 - 2 * (i * i + j * j)),
    )
    m = torch.stack([torch.stack(row) for row in rows])
    return m if scale is None else m * scale


def rotation_real_weight(
    weight: Tensor, scale: Tensor | None = None, groups: int = 1, eps: float = ROTATION_EPS
) -> Tensor:
    """``(4, G*A, B, *k)`` -> the ``(G*3*A, 3*B, *k)`` real weight of the rotation conv, group-major.

    Per group ``g`` rows ``[c, o]`` and columns ``[a, b]`` hold ``R(q_{o,b})[c, a]``: the weight of one
    real conv with ``groups=G`` on the group-major pure blocks (also read as torch's ``(in, out/G)``
    weight of the transposed conv, the adjoint).
    """
    _, ga, b, *ks = weight.shape
    m = rotation_matrices(weight, scale, eps).reshape(3, 3, groups, ga // groups, b, *ks)
    return m.permute(2, 0, 3, 1, 4, *range(5, m.dim())).reshape(3 * ga, 3 * b, *ks)


def _pure_group_major(x: Tensor, groups: int) -> Tensor:
    """Three blocked ``[i|j|k]`` blocks (each split in groups) -> ``[g0: i j k | g1: ...]``."""
    if groups == 1:
        return x
    n, c = x.shape[:2]
    return x.reshape(n, 3, groups, c // 3 // groups, *x.shape[2:]).transpose(1, 2).reshape(n, c, *x.shape[2:])


def _pure_from_group_major(x: Tensor, groups: int) -> Tensor:
    if groups == 1:
        return x
    n, c = x.shape[:2]
    return x.reshape(n, groups, 3, c // 3 // groups, *x.shape[2:]).transpose(1, 2).reshape(n, c, *x.shape[2:])


def _check_scale(kind: str, scale: Tensor | None, weight: Tensor) -> None:
    if scale is None:
        return
    if not isinstance(scale, Tensor):
        raise TypeError(f"{kind}: scale must be a Tensor or None, got {type(scale).__name__}")
    if scale.shape != weight.shape[1:]:
        raise ValueError(
            f"{kind}: scale must have the shape of one weight component {tuple(weight.shape[1:])}, "
            f"got {tuple(scale.shape)}"
        )
    if scale.dtype != weight.dtype or scale.device != weight.device:
        raise ValueError(
            f"{kind}: scale is {scale.dtype} on {scale.device} but weight is {weight.dtype} on {weight.device}"
        )


def _check_eps(kind: str, eps: float) -> None:
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"{kind}: eps must be a finite number >= 0, got {eps!r}")


def quaternion_rotation_conv(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: IntOrSeq = 1,
    padding: IntOrSeq | str = 0,
    dilation: IntOrSeq = 1,
    groups: int = 1,
    *,
    transposed: bool = False,
    output_padding: IntOrSeq = 0,
    scale: Tensor | None = None,
    quaternion_format: bool = True,
    eps: float = ROTATION_EPS,
) -> Tensor:
    """Rotation (spinor) conv of any spatial rank: ``y_o = Σ_{i, tap} scale · R(W_{o,i}) x_i`` on the pure part.

    Arguments as :func:`aqcf_kernels.functional.quaternion_conv` (weight ``(4, out/n, in/n/groups, *k)``,
    transposed ``(4, in/n, out/n/groups, *k)``, n the number of blocks), plus ``scale`` (one value per
    weight quaternion, the shape of ``weight[0]``, or None), ``quaternion_format`` (True: ``[r|i|j|k]``
    in and out, the real input block ignored and the real output block zero before the bias; False:
    ``[i|j|k]`` in and out, channels multiples of 3) and ``eps`` (see the module docstring).
    """
    blocks = rotation_channel_blocks(quaternion_format)
    spatial_dims = weight.dim() - 3 if isinstance(weight, Tensor) else 0
    kind = f"quaternion_rotation_conv{'_transpose' if transposed else ''}{spatial_dims}d"
    if not isinstance(weight, Tensor) or spatial_dims not in (1, 2, 3):
        shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"{kind}: weight must be a (4, A, B, *kernel) tensor with 1 to 3 kernel dims, got {shape}")
    _check_scale(kind, scale, weight)
    _check_eps(kind, eps)
    if not isinstance(input, Tensor):
        raise TypeError(f"{kind}: input must be a Tensor, got {type(input).__name__}")
    if input.dim() != spatial_dims + 2:
        raise ValueError(f"{kind}: input must be {spatial_dims + 2}-D (N, C, *spatial), got shape {tuple(input.shape)}")
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"{kind}: groups must be a positive int, got {groups!r}")
    channels = input.shape[1]
    if channels % (blocks * groups):
        layout = "[r|i|j|k]" if quaternion_format else "[i|j|k] (quaternion_format=False)"
        raise ValueError(
            f"{kind}: input has {channels} channels, not a multiple of {blocks} * groups = {blocks * groups} "
            f"(a blocked {layout} tensor whose blocks groups split)"
        )
    cq_in = channels // blocks
    out_q = weight.shape[2] * groups if transposed else weight.shape[1]
    if bias is not None and (not isinstance(bias, Tensor) or bias.shape != (blocks * out_q,)):
        shape = tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__
        raise ValueError(f"{kind}: bias must have shape ({blocks * out_q},), got {shape}")
    if bias is not None and (bias.dtype != input.dtype or bias.device != input.device):
        raise ValueError(f"{kind}: bias is {bias.dtype} on {bias.device} but input is {input.dtype} on {input.device}")
    # Everything else (weight fit, dtypes, devices, geometry, 'same') is the plain conv's check, run
    # on a zero-batch stand-in with the four-block channel count.
    stand_in = input.new_empty((0, 4 * cq_in, *input.shape[2:]))
    p, extra = check_conv_args(
        stand_in, weight, None, spatial_dims, stride, padding, dilation, groups, transposed, output_padding, "auto"
    )
    if any(extra):  # 'same' with an even effective kernel, or output_padding >= stride (check_conv_args)
        input = F.pad(input, [v for e in reversed(extra) for v in (0, e)])

    pure = input[:, cq_in:] if quaternion_format else input
    w = rotation_real_weight(weight, scale, groups, eps)
    y = _pure_from_group_major(real_conv(_pure_group_major(pure, groups), w, p), groups)
    if quaternion_format:
        y = torch.cat([y.new_zeros((y.shape[0], out_q, *y.shape[2:])), y], dim=1)
    if bias is not None:
        y = y + bias.view(1, -1, *([1] * spatial_dims)).to(y.dtype)  # (under autocast y is in its dtype)
    return y


def quaternion_rotation_linear(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    scale: Tensor | None = None,
    quaternion_format: bool = True,
    eps: float = ROTATION_EPS,
) -> Tensor:
    """Rotation (spinor) linear map over the last dim; ``weight`` ``(4, out/n, in/n)``, n the number of blocks.

    ``y_o = Σ_i scale_{o,i} · R(W_{o,i}) x_i`` on the pure part, options as :func:`quaternion_rotation_conv`:
    Parcollet's ``quaternion_linear_rotation``.
    """
    kind = "quaternion_rotation_linear"
    blocks = rotation_channel_blocks(quaternion_format)
    if not isinstance(weight, Tensor) or weight.dim() != 3 or weight.shape[0] != 4:
        shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"{kind}: weight must have shape (4, out/{blocks}, in/{blocks}), got {shape}")
    _check_scale(kind, scale, weight)
    _check_eps(kind, eps)
    if not isinstance(input, Tensor) or input.dim() < 1:
        raise ValueError(f"{kind}: input must be a Tensor with at least 1 dim (..., in_features)")
    if input.shape[-1] != blocks * weight.shape[2]:
        raise ValueError(f"{kind}: input has {input.shape[-1]} features, weight expects {blocks * weight.shape[2]}")
    out_q = weight.shape[1]
    if bias is not None and (not isinstance(bias, Tensor) or bias.shape != (blocks * out_q,)):
        shape = tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__
        raise ValueError(f"{kind}: bias must have shape ({blocks * out_q},), got {shape}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.dtype != input.dtype or t.device != input.device):
            raise ValueError(f"{kind}: {name} is {t.dtype} on {t.device} but input is {input.dtype} on {input.device}")
    pure = input[..., weight.shape[2] :] if quaternion_format else input
    y = F.linear(pure, rotation_real_weight(weight, scale, 1, eps))
    if quaternion_format:
        y = torch.cat([y.new_zeros((*y.shape[:-1], out_q)), y], dim=-1)
    return y if bias is None else y + bias


__all__ = [
    "ROTATION_EPS",
    "quaternion_rotation_conv",
    "quaternion_rotation_linear",
    "rotation_channel_blocks",
    "rotation_matrices",
    "rotation_real_weight",
]
