"""Parcollet's quaternion weight initialisation, vectorised and reproducible.

Parcollet et al., "Quaternion Recurrent Neural Networks" (ICLR 2019), §3.4 and
``quaternion_ops.quaternion_init`` of Pytorch-Quaternion-Neural-Networks: every quaternion weight is

    w = |w| (cos θ + u sin θ),  |w| ~ σ · Chi(4),  θ ~ U[-π, π],  u a random unit pure quaternion,

so ``E|w|^2 = 4σ^2`` — the quaternion analogue of Glorot/He with ``σ = 1/sqrt(2 (fan_in + fan_out))``
('glorot') or ``σ = 1/sqrt(2 fan_in)`` ('he'), fans counted in quaternion units.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

CRITERIA = ("glorot", "he")


def quaternion_fans(weight: Tensor) -> tuple[int, int]:
    """``(fan_in, fan_out)`` in quaternion units of a ``(4, A, B, *kernel)`` weight.

    Like ``torch.nn.init`` and Parcollet's ``affect_init_conv``, read from the shape: dim 2 (B) is
    the fan-in and dim 1 (A) the fan-out, each times the receptive field. For a conv that is
    ``fan_in = in/4/groups * prod(k)``, ``fan_out = out/4 * prod(k)``; for a transposed conv
    (weight ``(4, in/4, out/4/groups, *k)``) it is torch's and Parcollet's convention
    ``fan_in = out/4/groups * prod(k)``; for a linear weight ``(4, out/4, in/4)`` it is in/4.
    """
    if weight.dim() < 3 or weight.shape[0] != 4:
        raise ValueError(f"quaternion weight must have shape (4, A, B, *kernel), got {tuple(weight.shape)}")
    receptive_field = math.prod(weight.shape[3:])
    return weight.shape[2] * receptive_field, weight.shape[1] * receptive_field


def quaternion_sigma(weight: Tensor, criterion: str = "glorot") -> float:
    """Parcollet's σ for ``weight``; the expected squared modulus of each quaternion is ``4σ^2``."""
    fan_in, fan_out = quaternion_fans(weight)
    if criterion == "glorot":
        return 1.0 / math.sqrt(2 * (fan_in + fan_out))
    if criterion == "he":
        return 1.0 / math.sqrt(2 * fan_in)
    raise ValueError(f"init criterion must be one of {CRITERIA}, got {criterion!r}")


@torch.no_grad()
def quaternion_init_(weight: Tensor, criterion: str = "glorot", generator: torch.Generator | None = None) -> Tensor:
    """Fill a ``(4, A, B, *kernel)`` quaternion weight in place with Parcollet's init; returns it.

    Draws come from ``generator`` (on its device; the result is copied to the weight's device)
    or, without one, from torch's global RNG, so ``torch.manual_seed`` makes it reproducible.
    The unit axis is a uniform vector in ``[-1, 1]^3`` normalised, as in Parcollet's code.
    """
    sigma = quaternion_sigma(weight, criterion)
    if weight.numel() == 0:
        return weight
    shape = weight.shape[1:]
    device = generator.device if generator is not None else weight.device
    # Draw in at least float32: half-precision uniforms/normals are too coarse for the tails.
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    kw = dict(device=device, dtype=dtype)
    # Chi with 4 degrees of freedom = norm of a 4-d standard normal vector.
    modulus = torch.linalg.vector_norm(torch.randn((4, *shape), generator=generator, **kw), dim=0).mul_(sigma)
    phase = torch.empty(shape, **kw).uniform_(-math.pi, math.pi, generator=generator)
    axis = torch.empty((3, *shape), **kw).uniform_(-1.0, 1.0, generator=generator)
    # Guard the (measure-zero) zero vector instead of Parcollet's +1e-4 bias on every norm.
    axis /= torch.linalg.vector_norm(axis, dim=0).clamp_min(torch.finfo(dtype).tiny)
    w = torch.cat([(modulus * phase.cos()).unsqueeze(0), axis * (modulus * phase.sin())], dim=0)
    weight.copy_(w)
    return weight
