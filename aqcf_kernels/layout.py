"""Helpers for the blocked ``[r | i | j | k]`` channel layout.

Every split or join of quaternion channels (skip connections, heads, chunks) goes through here:
a plain ``torch.cat``/``reshape`` on dim 1 of a blocked tensor mixes the components.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._fx import fx_leaf_function


def quaternion_channels(x: Tensor, name: str = "input", dim: int = 1) -> int:
    """Number of quaternion channels of ``x`` along ``dim``; a clear error if it isn't blocked."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(x).__name__}")
    if x.dim() <= dim:
        raise ValueError(f"{name} must have a channel dim {dim}, got shape {tuple(x.shape)}")
    c = x.shape[dim]
    if c % 4 or c == 0:
        raise ValueError(
            f"{name} must have a positive multiple of 4 channels in dim {dim} (blocked [r|i|j|k] layout), "
            f"got {c} (shape {tuple(x.shape)})"
        )
    return c // 4


@fx_leaf_function
def as_components(x: Tensor, dim: int = 1) -> Tensor:
    """View ``(..., 4·Cq, ...)`` as ``(..., 4, Cq, ...)``: component axis at ``dim``, channels at ``dim + 1``."""
    cq = quaternion_channels(x, dim=dim)
    return x.unflatten(dim, (4, cq))


@fx_leaf_function
def from_components(x: Tensor, dim: int = 1) -> Tensor:
    """Inverse of :func:`as_components`."""
    return x.flatten(dim, dim + 1)


@fx_leaf_function
def qcat(tensors: Sequence[Tensor], dim: int = 1) -> Tensor:
    """Concatenate quaternion tensors per component: ``[r_a r_b | i_a i_b | j_a j_b | k_a k_b]``."""
    if len(tensors) == 0:
        raise ValueError("qcat: expected at least one tensor")
    _check_cat_shapes(tensors, _nonnegative_dim(tensors[0], dim))
    if dim == 1 and all(is_channels_last(t) for t in tensors):
        # Channels innermost: concatenate along the last axis of the (N, *spatial, C) view, so the
        # result is channels_last too (a cat of the (N, 4, Cq, *spatial) views would write a
        # channels-first tensor, strided, and every following op would convert it back).
        last = [t.movedim(1, -1) for t in tensors]
        joined = torch.cat([as_components(t, -1) for t in last], dim=-1)
        return from_components(joined, -2).movedim(-1, 1)
    dim = _nonnegative_dim(tensors[0], dim)
    parts = [as_components(t, dim) for t in tensors]
    return from_components(torch.cat(parts, dim=dim + 1), dim)


def _check_cat_shapes(tensors: Sequence[Tensor], dim: int) -> None:
    """Every tensor's shape equals the first's except along ``dim``, or a ValueError naming the tensor and the
    dimension in the caller's terms (torch.cat's own error would name a dimension of the component view)."""
    first = tensors[0]
    if not isinstance(first, Tensor) or not 0 <= dim < first.dim():
        return  # (dim out of range: as_components says so)
    for i, t in enumerate(tensors[1:], start=1):
        if not isinstance(t, Tensor):
            return
        if t.dim() != first.dim():
            where = "the number of dimensions"
        else:
            differ = [d for d in range(t.dim()) if d != dim and t.shape[d] != first.shape[d]]
            if not differ:
                continue
            where = f"dimension {differ[0]}"
        raise ValueError(
            f"qcat: tensor {i} has shape {tuple(t.shape)} and tensor 0 {tuple(first.shape)}: they differ in "
            f"{where}; sizes must match except along dim={dim}, the quaternion channels joined"
        )


def _nonnegative_dim(x: Tensor, dim: int) -> int:
    """``dim`` counted from the front (a negative one from the back, as torch counts): in the ``(..., 4, Cq, ...)``
    view of :func:`as_components` the channels are then at ``dim + 1``. Out of range stays as it is, for
    :func:`quaternion_channels` to refuse."""
    return dim + x.dim() if isinstance(x, Tensor) and -x.dim() <= dim < 0 else dim


def channels_last_format(x: Tensor) -> torch.memory_format | None:
    """``torch.channels_last`` for a 4-d tensor, ``torch.channels_last_3d`` for a 5-d one, else None."""
    return {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())


def is_vmapped(x: Tensor) -> bool:
    """Whether ``x`` is vmapped by torch.func: its memory format can be neither asked nor set per sample."""
    return torch._C._functorch.is_batchedtensor(x)


def is_channels_last(x: Tensor) -> bool:
    """Whether ``x`` is a 4-d/5-d tensor laid out channels_last(_3d) and not also channels-first (a
    tensor with one channel or one pixel is both, and counts as channels-first). A tensor vmapped by
    torch.func counts as channels-first: vmap cannot tell a sample's layout (and layout is only a hint)."""
    fmt = channels_last_format(x)
    if fmt is None or is_vmapped(x):
        return False
    return x.is_contiguous(memory_format=fmt) and not x.is_contiguous()


def like_layout(x: Tensor, reference: Tensor) -> Tensor:
    """``x`` in ``reference``'s layout: channels_last(_3d) if ``reference`` is (a copy only if ``x``
    isn't already), else ``x`` unchanged."""
    if is_channels_last(reference):
        return x.contiguous(memory_format=channels_last_format(reference))
    return x


@fx_leaf_function
def qsplit(x: Tensor, split_size_or_sections: int | Sequence[int], dim: int = 1) -> tuple[Tensor, ...]:
    """Split quaternion channels, each piece keeping all four components. Sizes count **quaternion**
    channels (``torch.split``'s, per component block): 16 real channels are 4 quaternions, split e.g. ``[1, 3]``."""
    dim = _nonnegative_dim(x, dim)
    comp = as_components(x, dim)
    quaternions = comp.shape[dim + 1]
    sizes = [split_size_or_sections] if isinstance(split_size_or_sections, int) else list(split_size_or_sections)
    if any(s < 0 for s in sizes) or (not isinstance(split_size_or_sections, int) and sum(sizes) != quaternions):
        raise ValueError(
            f"qsplit: split sizes count quaternion channels: the {x.shape[dim]} real channels of dim {dim} are "
            f"{quaternions} quaternions, got {split_size_or_sections!r}"
        )
    pieces = torch.split(comp, split_size_or_sections, dim=dim + 1)
    return tuple(from_components(p, dim) for p in pieces)


def split_heads(x: Tensor, heads: int) -> Tensor:
    """Tokens-last blocked ``(B, 4·Cq, N)`` → ``(B, H, N, 4·d)`` with ``d = Cq / H``.

    Head ``h`` owns quaternion channels ``[h·d, (h+1)·d)`` of every component block; its last
    axis is ``[r | i | j | k]`` of those ``d`` channels, so the real dot product of two such rows is
    ``Re(Σ q ⊗ conj(k))`` over the head.
    """
    b, c, n = x.shape
    d = c // 4 // heads
    return x.view(b, 4, heads, d, n).permute(0, 2, 4, 1, 3).reshape(b, heads, n, 4 * d)


def merge_heads(x: Tensor) -> Tensor:
    """Inverse of :func:`split_heads`: ``(B, H, N, 4·d)`` → ``(B, 4·H·d, N)``."""
    b, h, n, e = x.shape
    d = e // 4
    return x.view(b, h, n, 4, d).permute(0, 3, 1, 4, 2).reshape(b, 4 * h * d, n)
