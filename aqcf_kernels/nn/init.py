"""Quaternion weight initialisation (Parcollet's three schemes), vectorised and reproducible.

Parcollet et al., "Quaternion Recurrent Neural Networks" (ICLR 2019), §3.4 and
``quaternion_ops.quaternion_init`` of Pytorch-Quaternion-Neural-Networks: every quaternion weight is

    w = |w| (cos θ + u sin θ),  |w| ~ σ · Chi(4),  θ ~ U[-π, π],  u a random unit pure quaternion,

so ``E|w|^2 = 4σ^2`` — the quaternion analogue of Glorot/He with ``σ = 1/sqrt(2 (fan_in + fan_out))``
('glorot') or ``σ = 1/sqrt(2 fan_in)`` ('he'), fans counted in quaternion units.

The layers take ``init='quaternion' | 'unitary' | 'random'`` (the names of ``quaternion_init``,
``unitary_init`` and ``random_init`` there) next to ``init_criterion='glorot' | 'he'``; see
:func:`init_quaternion_` for the dispatch and :func:`unitary_init_` / :func:`random_init_` for how each
one differs from the original code.
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


# --------------------------------------------------------------------------------------------
# The other two schemes of Pytorch-Quaternion-Neural-Networks (``unitary_init``, ``random_init``)
# and the one entry point the layers call (``init=`` x ``init_criterion=``).
# --------------------------------------------------------------------------------------------

#: What ``init=`` accepts, named as Parcollet's ``quaternion_ops`` names its init functions.
INITS = ("quaternion", "unitary", "random")


def check_init(owner: str, init: object, criterion: object) -> None:
    """The one check of an ``init`` / ``init_criterion`` pair; ``owner`` names the caller in the error."""
    if init not in INITS:
        raise ValueError(f"{owner}: init must be one of {INITS}, got {init!r}")
    if criterion not in CRITERIA:
        raise ValueError(f"{owner}: init_criterion must be one of {CRITERIA}, got {criterion!r}")


def _draw_kwargs(weight: Tensor, generator: torch.Generator | None) -> dict:
    # As quaternion_init_: draw on the generator's device, in at least float32.
    device = generator.device if generator is not None else weight.device
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    return {"device": device, "dtype": dtype}


@torch.no_grad()
def unitary_init_(weight: Tensor, criterion: str = "glorot", generator: torch.Generator | None = None) -> Tensor:
    """Fill a ``(4, A, B, *kernel)`` weight in place with unit quaternions (Parcollet's ``unitary_init``); returns it.

    Each quaternion is a vector of four ``U[-1, 1]`` draws divided by its norm, as in Parcollet's
    and speechbrain's code (not uniform on the 3-sphere: the cube's corners are favoured, kept for
    fidelity). ``|w| = 1`` whatever the layer's size: ``criterion`` is checked but, as in both of
    those libraries, does not scale anything (their ``unitary_init`` computes the fans and ignores
    them). Meant for layers that normalise their weight anyway (rotation / spinor layers).
    """
    quaternion_sigma(weight, criterion)  # validates the shape and the criterion
    if weight.numel() == 0:
        return weight
    v = torch.empty((4, *weight.shape[1:]), **_draw_kwargs(weight, generator)).uniform_(-1.0, 1.0, generator=generator)
    # Guard the (measure-zero) zero vector instead of Parcollet's +1e-4 on every norm.
    v /= torch.linalg.vector_norm(v, dim=0).clamp_min(torch.finfo(v.dtype).tiny)
    weight.copy_(v)
    return weight


@torch.no_grad()
def random_init_(weight: Tensor, criterion: str = "glorot", generator: torch.Generator | None = None) -> Tensor:
    """Fill a ``(4, A, B, *kernel)`` weight in place with independent uniform components; returns it.

    Parcollet's ``random_init``: the four components of every quaternion drawn independently and
    uniformly, with no polar structure. Difference: his code computes the criterion's ``σ`` and then
    returns ``U[-1, 1]`` unscaled (a variance of 1/3 per component whatever the fans, which makes deep
    or wide layers explode); here each component is ``U[-√3 σ, √3 σ]``, so ``E|w|² = 4σ²``, the same
    expected squared modulus as the ``'quaternion'`` init with the same ``criterion``.
    """
    sigma = quaternion_sigma(weight, criterion)
    if weight.numel() == 0:
        return weight
    bound = math.sqrt(3.0) * sigma
    weight.copy_(
        torch.empty(weight.shape, **_draw_kwargs(weight, generator)).uniform_(-bound, bound, generator=generator)
    )
    return weight


_INIT_FUNCTIONS = {"quaternion": quaternion_init_, "unitary": unitary_init_, "random": random_init_}


def init_quaternion_(
    weight: Tensor, init: str = "quaternion", criterion: str = "glorot", generator: torch.Generator | None = None
) -> Tensor:
    """Fill a ``(4, A, B, *kernel)`` quaternion weight in place with scheme ``init`` and ``criterion``; returns it.

    ``init``: ``'quaternion'`` (:func:`quaternion_init_`, the default of every layer), ``'unitary'``
    (:func:`unitary_init_`) or ``'random'`` (:func:`random_init_`); ``criterion``: ``'glorot'`` or ``'he'``.
    Vectorised (no Python loop over weights) and reproducible: draws come from ``generator`` or,
    without one, from torch's global RNG.
    """
    check_init("init_quaternion_", init, criterion)
    return _INIT_FUNCTIONS[init](weight, criterion, generator)
