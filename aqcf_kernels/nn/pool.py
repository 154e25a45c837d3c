"""Quaternion pooling and dropout: the four components of a quaternion are kept, or dropped, together.

* Max pooling keeps, in each window, the quaternion of largest squared modulus
  ``|q|² = r² + i² + j² + k²`` (all four components of that one quaternion). A per-component
  ``max_pool`` would instead assemble a new quaternion out of components of different positions.
* Average pooling is linear, so averaging quaternions IS averaging each component: plain ``avg_pool``,
  with the blocked-layout channel check.
* Dropout draws one Bernoulli variable per quaternion (per sample, quaternion channel and position),
  or per quaternion feature map with ``channelwise=True``, shared by its four components.

Signatures follow ``torch.nn.MaxPool*d``, ``AvgPool*d`` and ``Dropout``; unbatched inputs
``(C, *spatial)`` are accepted by the pools like torch's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._fx import fx_leaf
from ..layout import is_channels_last, quaternion_channels
from ..params import int_tuple

IntOrTuple = int | Sequence[int]

_MAX_POOL: dict[int, Callable[..., tuple[Tensor, Tensor]]] = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOL: dict[int, Callable[..., Tensor]] = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _batched(name: str, input: Tensor, spatial_dims: int) -> tuple[Tensor, bool]:
    """``input`` with a batch dim, and whether it had none; checks the rank and the blocked channels."""
    if not isinstance(input, Tensor):
        raise TypeError(f"{name}: input must be a Tensor, got {type(input).__name__}")
    n = spatial_dims
    if input.dim() not in (n + 1, n + 2):
        raise ValueError(
            f"{name}: expected {n + 1}D (unbatched) or {n + 2}D (batched) input (got {input.dim()}D input)"
        )
    unbatched = input.dim() == n + 1
    quaternion_channels(input, name=f"{name}: input", dim=0 if unbatched else 1)
    return (input.unsqueeze(0) if unbatched else input), unbatched


def quaternion_max_pool(
    input: Tensor,
    spatial_dims: int,
    kernel_size: IntOrTuple,
    stride: IntOrTuple | None = None,
    padding: IntOrTuple = 0,
    dilation: IntOrTuple = 1,
    ceil_mode: bool = False,
    return_indices: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Max pooling of whole quaternions by squared modulus ``r² + i² + j² + k²``.

    ``input`` is blocked ``(N, 4Cq, *S)`` or ``(4Cq, *S)`` with ``spatial_dims`` spatial dims; the
    window arguments are ``F.max_pool{spatial_dims}d``'s. The window maximum of the modulus picks one
    position per (sample, quaternion channel, output position); all four components are gathered from
    it, so the gradient flows to those four values only (summed where windows overlap, like
    ``max_pool``). Ties go to whichever position ``max_pool`` reports. ``return_indices`` gives flat
    spatial indices of shape of the output, equal across the four components, which is exactly
    what ``torch.nn.MaxUnpool*d`` expects to put every quaternion back whole.
    """
    args = (kernel_size, stride, padding, dilation, ceil_mode, return_indices)
    return _max_pool("quaternion_max_pool", input, spatial_dims, *args)


def _max_pool(
    name: str,
    input: Tensor,
    spatial_dims: int,
    kernel_size: IntOrTuple,
    stride: IntOrTuple | None,
    padding: IntOrTuple,
    dilation: IntOrTuple,
    ceil_mode: bool,
    return_indices: bool,
) -> Tensor | tuple[Tensor, Tensor]:
    x, unbatched = _batched(name, input, spatial_dims)
    _check_pool_output(name, input, spatial_dims, kernel_size, stride, padding, dilation, ceil_mode)
    n, c = x.shape[:2]
    x4 = x.unflatten(1, (4, c // 4))  # (N, 4, Cq, *S)
    with torch.no_grad():
        # The modulus only selects; no gradient flows through it. At least float32 so that fp16
        # squares neither overflow nor tie.
        modulus = x4.detach().to(torch.promote_types(x.dtype, torch.float32)).square().sum(1)  # (N, Cq, *S)
        _, index = _MAX_POOL[spatial_dims](
            modulus, kernel_size, stride, padding, dilation, ceil_mode=ceil_mode, return_indices=True
        )
    out_spatial = index.shape[2:]
    if is_channels_last(x):
        # gathered in (N, positions, 4, Cq) order, a view of x: the output is channels_last as torch's
        # max pool's is (a channels-first gather would cost a channels_last network a copy after each pool)
        index = index.flatten(2).transpose(1, 2).unsqueeze(2).expand(n, -1, 4, -1)  # (N, L_out, 4, Cq)
        y = x.movedim(1, -1).flatten(1, -2).unflatten(-1, (4, c // 4)).gather(1, index)
        y, idx = (t.reshape(n, *out_spatial, c).movedim(-1, 1) for t in (y, index))
    else:
        index = index.flatten(2).unsqueeze(1).expand(n, 4, -1, -1)  # (N, 4, Cq, L_out): same for the 4 components
        y = x4.flatten(3).gather(3, index).view(n, c, *out_spatial)
        idx = index.reshape(n, c, *out_spatial)
    if return_indices:
        return (y.squeeze(0), idx.squeeze(0)) if unbatched else (y, idx)
    return y.squeeze(0) if unbatched else y


def _check_pool_output(
    name: str,
    input: Tensor,
    spatial_dims: int,
    kernel_size: IntOrTuple,
    stride: IntOrTuple | None,
    padding: IntOrTuple,
    dilation: IntOrTuple,
    ceil_mode: bool,
) -> None:
    """torch's "output size is too small" check, made here (torch's own would describe the pooled modulus,
    one channel per quaternion, instead of the input), and one torch does not make: a window that holds no
    input element, only padding (a dilation with padding can make one), has no quaternion to select, where
    torch's max pool returns -inf with an index outside the input."""
    k = int_tuple(name, "kernel_size", kernel_size, spatial_dims, minimum=1)
    s = k if stride is None else int_tuple(name, "stride", stride, spatial_dims, minimum=1)
    p = int_tuple(name, "padding", padding, spatial_dims, minimum=0)
    d = int_tuple(name, "dilation", dilation, spatial_dims, minimum=1)
    geometry = [_pool_geometry(*dim, ceil_mode) for dim in zip(input.shape[-spatial_dims:], k, s, p, d, strict=True)]
    out = tuple(o for o, _ in geometry)
    where = f"input of shape {tuple(input.shape)} with kernel_size={k}, stride={s}, padding={p}, dilation={d}"
    if any(o < 1 for o in out):
        raise ValueError(f"{name}: {where} is too small: the output size would be {out}")
    if not all(every_window_reads_input for _, every_window_reads_input in geometry):
        raise ValueError(f"{name}: {where}: a pooling window holds only padding, no quaternion to select")


def _pool_geometry(size: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> tuple[int, bool]:
    """(output size along one dim, torch's formula; whether every window there reads an input element).

    Only a window starting in the left padding can miss the input (the last one starts before the end:
    torch's formula, and ceil_mode's rule), so only those ``ceil(p / s)`` are looked at: no loop over
    the output, whose length torch.compile would then fix to each input size's (a recompile per size
    under ``dynamic=True``). The same answers as every window's taps checked, on every size <= 13,
    kernel <= 5, stride and dilation <= 4, padding <= 3, ceil_mode both ways."""
    span = size + 2 * p - d * (k - 1) - 1
    out = (-(-span // s) if ceil_mode else span // s) + 1
    if ceil_mode and (out - 1) * s >= size + p:  # the last window must start inside the input or its left padding
        out -= 1
    reads = True
    for o in range(-(-p // s)):
        if o >= out:
            break
        start = o * s - p  # < 0
        first = -(start // d)  # the first tap at or after position 0: ceil(-start / d)
        reads = reads and first < k and start + first * d < size
    return out, reads


def quaternion_dropout(
    input: Tensor, p: float = 0.5, training: bool = True, inplace: bool = False, channelwise: bool = False
) -> Tensor:
    """Dropout of whole quaternions of a blocked ``(N, 4Cq, *S)`` tensor.

    One Bernoulli(1 − p) mask entry per (sample, quaternion channel, position), or per (sample,
    quaternion channel) with ``channelwise`` (as ``Dropout2d`` drops feature maps), multiplies all four
    components, scaled by ``1/(1 − p)`` so the expectation is unchanged. Identity when not training.
    """
    return _dropout("quaternion_dropout", input, p, training, inplace, channelwise)


def _dropout(name: str, input: Tensor, p: float, training: bool, inplace: bool, channelwise: bool) -> Tensor:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name}: dropout probability has to be between 0 and 1, but got {p}")
    if isinstance(input, Tensor) and input.dim() == 1:  # one unbatched vector (C,), as a linear layer takes
        quaternion_channels(input, name=f"{name}: input", dim=0)
        if not training or p == 0.0:
            return input
        out = _dropout(name, input.unsqueeze(0), p, training, inplace, channelwise)
        return input if inplace else out.squeeze(0)
    cq = quaternion_channels(input, name=f"{name}: input")
    if not training or p == 0.0:
        return input
    n = input.shape[0]
    spatial = input.shape[2:]
    mask_shape = (n, 1, cq, *((1,) * len(spatial) if channelwise else spatial))
    mask = torch.empty(mask_shape, dtype=input.dtype, device=input.device)
    if p == 1.0:
        mask.zero_()
    else:
        mask.bernoulli_(1.0 - p).div_(1.0 - p)
    x4 = input.unflatten(1, (4, cq))
    if inplace:
        x4.mul_(mask)
        return input
    return (x4 * mask).flatten(1, 2)


class _QuaternionMaxPoolNd(nn.Module):
    _spatial_dims: int

    def __init__(
        self,
        kernel_size: IntOrTuple,
        stride: IntOrTuple | None = None,
        padding: IntOrTuple = 0,
        dilation: IntOrTuple = 1,
        return_indices: bool = False,
        ceil_mode: bool = False,
    ) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride if stride is not None else kernel_size
        self.padding, self.dilation = padding, dilation
        self.return_indices, self.ceil_mode = return_indices, ceil_mode

    @fx_leaf
    def forward(self, input: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        return _max_pool(
            type(self).__name__,
            input,
            self._spatial_dims,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            self.ceil_mode,
            self.return_indices,
        )

    def extra_repr(self) -> str:
        return (
            f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
            f"dilation={self.dilation}, ceil_mode={self.ceil_mode}"
        )


class QuaternionMaxPool1d(_QuaternionMaxPoolNd):
    """Keeps the largest-modulus quaternion of each window; arguments as ``torch.nn.MaxPool1d``."""

    _spatial_dims = 1


class QuaternionMaxPool2d(_QuaternionMaxPoolNd):
    """Keeps the largest-modulus quaternion of each window; arguments as ``torch.nn.MaxPool2d``."""

    _spatial_dims = 2


class QuaternionMaxPool3d(_QuaternionMaxPoolNd):
    """Keeps the largest-modulus quaternion of each window; arguments as ``torch.nn.MaxPool3d``."""

    _spatial_dims = 3


class _QuaternionAvgPoolNd(nn.Module):
    _spatial_dims: int

    def __init__(
        self,
        kernel_size: IntOrTuple,
        stride: IntOrTuple | None = None,
        padding: IntOrTuple = 0,
        ceil_mode: bool = False,
        count_include_pad: bool = True,
        divisor_override: int | None = None,
    ) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride if stride is not None else kernel_size
        self.padding, self.ceil_mode = padding, ceil_mode
        self.count_include_pad, self.divisor_override = count_include_pad, divisor_override

    @fx_leaf
    def forward(self, input: Tensor) -> Tensor:
        # Averaging is linear, so the per-component average is the quaternion average.
        _batched(type(self).__name__, input, self._spatial_dims)
        args = (self.kernel_size, self.stride, self.padding, self.ceil_mode, self.count_include_pad)
        if self._spatial_dims == 1:
            return F.avg_pool1d(input, *args)
        pool = _AVG_POOL[self._spatial_dims]
        if self._spatial_dims == 3 and input.device.type == "cpu" and input.dtype in (torch.float16, torch.bfloat16):
            # PyTorch's CPU avg_pool3d has no fp16/bf16 kernel (torch 2.13: NotImplementedError, in either layout):
            # the average in float32, rounded once, as its 1d/2d half-precision kernels accumulate
            return pool(input.float(), *args, divisor_override=self.divisor_override).to(input.dtype)
        return pool(input, *args, divisor_override=self.divisor_override)

    def extra_repr(self) -> str:
        s = f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"
        if self.ceil_mode:
            s += ", ceil_mode=True"
        if not self.count_include_pad:
            s += ", count_include_pad=False"
        if self.divisor_override is not None:
            s += f", divisor_override={self.divisor_override}"
        return s


class QuaternionAvgPool1d(_QuaternionAvgPoolNd):
    """Component-wise average pooling with channel checks; arguments as ``torch.nn.AvgPool1d``."""

    _spatial_dims = 1

    def __init__(
        self,
        kernel_size: IntOrTuple,
        stride: IntOrTuple | None = None,
        padding: IntOrTuple = 0,
        ceil_mode: bool = False,
        count_include_pad: bool = True,
    ) -> None:
        super().__init__(kernel_size, stride, padding, ceil_mode, count_include_pad)


class QuaternionAvgPool2d(_QuaternionAvgPoolNd):
    """Component-wise average pooling with channel checks; arguments as ``torch.nn.AvgPool2d``."""

    _spatial_dims = 2


class QuaternionAvgPool3d(_QuaternionAvgPoolNd):
    """Component-wise average pooling with channel checks; arguments as ``torch.nn.AvgPool3d``."""

    _spatial_dims = 3


class QuaternionDropout(nn.Module):
    """Drops whole quaternions of a blocked ``(N, 4Cq, *S)`` tensor; see :func:`quaternion_dropout`.

    Arguments as ``torch.nn.Dropout``; ``channelwise=True`` drops whole quaternion feature maps
    (as ``torch.nn.Dropout2d`` does real ones).
    """

    def __init__(self, p: float = 0.5, inplace: bool = False, *, channelwise: bool = False) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"QuaternionDropout: dropout probability has to be between 0 and 1, but got {p}")
        self.p, self.inplace, self.channelwise = p, inplace, channelwise

    @fx_leaf
    def forward(self, input: Tensor) -> Tensor:
        return _dropout(type(self).__name__, input, self.p, self.training, self.inplace, self.channelwise)

    def extra_repr(self) -> str:
        return f"p={self.p}, inplace={self.inplace}" + (", channelwise=True" if self.channelwise else "")
