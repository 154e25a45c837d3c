"""Argument checking and shape arithmetic for quaternion convolutions.

Everything a caller can get wrong is caught here, before any kernel runs, with an error that
names the argument. The ops receive a fully resolved :class:`ConvParams`; ``algorithm='auto'`` is
only checked here, and resolved by the backend that serves the call (``aqcf_kernels.backends``).
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .quaternion import check_algorithm

IntOrSeq = int | Sequence[int]


@dataclass(frozen=True)
class ConvParams:
    """Resolved hyper-parameters of one quaternion (transposed) convolution."""

    spatial_dims: int
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    transposed: bool
    output_padding: tuple[int, ...]
    groups: int

    def as_op_args(self) -> tuple:
        return (
            list(self.stride),
            list(self.padding),
            list(self.dilation),
            self.transposed,
            list(self.output_padding),
            self.groups,
        )

    @staticmethod
    def from_op_args(spatial_dims, stride, padding, dilation, transposed, output_padding, groups):
        return ConvParams(
            spatial_dims,
            tuple(stride),
            tuple(padding),
            tuple(dilation),
            bool(transposed),
            tuple(output_padding),
            int(groups),
        )


def _int_like(value: object) -> int | None:
    """``value`` as an int if it is one scalar integer (an int, numpy's, a 0-d integer tensor: what ``F.conv2d``
    accepts for ``stride=``), else None; a bool is not one."""
    if isinstance(value, bool) or (isinstance(value, Tensor) and (value.dim() != 0 or value.dtype == torch.bool)):
        return None
    if type(value).__name__ == "bool_":  # numpy's bool: an index only in old numpy
        return None
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        return None


def int_tuple(owner: str, name: str, value: IntOrSeq, n: int, minimum: int | None = None) -> tuple[int, ...]:
    """The one parser of int-or-sequence arguments (``stride=2``, ``kernel_size=(3, 5)``) for an ``n``-d op.

    An int, or a sequence of ``n`` ints (or of one, repeated, as ``F.conv2d`` accepts); with
    ``minimum``, every element must be at least that. Errors name ``owner`` and the argument.
    """
    scalar = _int_like(value)
    if scalar is not None:
        out: tuple[int, ...] = (scalar,) * n
    else:
        try:
            if isinstance(value, (str, bytes)) or any(isinstance(v, bool) for v in value):  # type: ignore[union-attr]
                raise TypeError
            # operator.index, not int(): an int-like (numpy's, a 0-d integer tensor) passes; 1.5 or '2' is
            # refused, as torch refuses it, instead of truncated
            out = tuple(operator.index(v) for v in value)  # type: ignore[union-attr]
        except TypeError:
            raise TypeError(f"{owner}: {name} must be an int or a sequence of {n} ints, got {value!r}") from None
        if len(out) == 1:
            out = out * n
        if len(out) != n:
            raise ValueError(f"{owner}: {name} must have {n} elements for a {n}d op, got {value!r}")
    if minimum is not None and any(v < minimum for v in out):
        raise ValueError(f"{owner}: {name} must be >= {minimum}, got {value!r}")
    return out


def conv_output_size(in_size: Sequence[int], kernel: Sequence[int], p: ConvParams) -> list[int]:
    out = []
    for i, k, s, pad, d, op in zip(in_size, kernel, p.stride, p.padding, p.dilation, p.output_padding, strict=True):
        if p.transposed:
            out.append((i - 1) * s - 2 * pad + d * (k - 1) + op + 1)
        else:
            out.append((i + 2 * pad - d * (k - 1) - 1) // s + 1)
    return out


def conv_output_shape(input_shape: Sequence[int], weight_shape: Sequence[int], p: ConvParams) -> list[int]:
    """Shape of ``qconv(input, weight)``; the weight is ``(4, A, B, *k)``."""
    out_q = weight_shape[2] * p.groups if p.transposed else weight_shape[1]
    return [input_shape[0], 4 * out_q, *conv_output_size(input_shape[2:], weight_shape[3:], p)]


def same_padding(kernel: Sequence[int], dilation: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """torch's ``padding='same'``: total ``d*(k-1)`` per dim, the odd element on the right.

    Returns ``(symmetric, extra_right)``; a non-zero ``extra_right`` is applied with ``F.pad``
    before the conv, exactly as ``torch.nn.functional.conv2d`` does it.
    """
    total = [d * (k - 1) for k, d in zip(kernel, dilation, strict=True)]
    left = tuple(t // 2 for t in total)
    return left, tuple(t - lft for t, lft in zip(total, left, strict=True))


#: (the tensors' shapes, dtypes and devices, the geometry, ...) -> check_conv_args' result, for calls
#: that passed every check: a layer repeats the same call every step
_CHECKED: dict[tuple, tuple[ConvParams, tuple[int, ...]]] = {}
_CHECKED_MAX = 4096


def _checked_key(input, weight, bias, spatial_dims, stride, padding, dilation, groups, transposed, output_padding,
                 algorithm) -> tuple | None:  # fmt: skip
    """Everything :func:`check_conv_args` reads, as a dict key; None where a value is not plain (then the
    call is checked in full, uncached)."""
    if not (isinstance(input, Tensor) and isinstance(weight, Tensor)) or torch.compiler.is_compiling():
        return None
    if bias is not None and not isinstance(bias, Tensor):
        return None
    if type(groups) is not int or type(transposed) is not bool or type(algorithm) is not str:
        return None
    geometry = (_plain(stride), _plain(padding), _plain(dilation), _plain(output_padding))
    if None in geometry:
        return None
    dtype, device = input.dtype, input.device
    tensors = (input.shape, dtype, device, weight.shape, weight.dtype, weight.device)
    if bias is not None:
        tensors += (bias.shape, bias.dtype, bias.device)
    # dtypes that differ pass only under autocast (same_dtype_under_autocast)
    mixed = weight.dtype != dtype or (bias is not None and bias.dtype != dtype)
    autocast = torch.is_autocast_enabled(device.type) if mixed and device.type in ("cpu", "cuda") else None
    return (*tensors, spatial_dims, *geometry, groups, transposed, algorithm, autocast)


def check_conv_args(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    spatial_dims: int,
    stride: IntOrSeq,
    padding: IntOrSeq | str,
    dilation: IntOrSeq,
    groups: int,
    transposed: bool,
    output_padding: IntOrSeq,
    algorithm: str,
) -> tuple[ConvParams, tuple[int, ...]]:
    """Validate everything and resolve ``padding``.

    Returns the params and the extra right-side padding of the input the call needs (zeros otherwise):
    ``padding='same'`` with an even effective kernel, or a transposed conv's ``output_padding`` of a
    stride or more (then reduced modulo the stride in the params). A call like one that passed before
    (same shapes, dtypes, devices and geometry) returns that call's result: the checks cost ~5 µs a
    call, a quarter of a small layer's host time.
    """
    args = (input, weight, bias, spatial_dims, stride, padding, dilation, groups, transposed, output_padding, algorithm)
    key = _checked_key(*args)
    checked = _CHECKED.get(key) if key is not None else None
    if checked is None:
        checked = _check_conv_args(*args)
        if key is not None and len(_CHECKED) < _CHECKED_MAX:
            _CHECKED[key] = checked
    return checked


def _check_conv_args(input, weight, bias, spatial_dims, stride, padding, dilation, groups, transposed, output_padding,
                     algorithm) -> tuple[ConvParams, tuple[int, ...]]:  # fmt: skip
    """:func:`check_conv_args` (the same arguments), every check run."""
    kind = f"quaternion_conv{'_transpose' if transposed else ''}{spatial_dims}d"
    if not isinstance(input, Tensor):
        raise TypeError(f"{kind}: input must be a Tensor, got {type(input).__name__}")
    if not isinstance(weight, Tensor):
        raise TypeError(f"{kind}: weight must be a Tensor, got {type(weight).__name__}")
    if input.dim() != spatial_dims + 2:
        raise ValueError(
            f"{kind}: input must be {spatial_dims + 2}-D (N, C, {'*' * spatial_dims}) or {spatial_dims + 1}-D (one "
            f"unbatched sample), got shape {tuple(input.shape)}"
        )
    if weight.dim() != spatial_dims + 3 or weight.shape[0] != 4:
        io = "in/4, out/4/groups" if transposed else "out/4, in/4/groups"
        raise ValueError(
            f"{kind}: weight must have shape (4, {io}, *kernel_size) with {spatial_dims} kernel "
            f"dims, got {tuple(weight.shape)}"
        )
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"{kind}: groups must be a positive int, got {groups!r}")
    if bias is not None and not isinstance(bias, Tensor):
        raise TypeError(f"{kind}: bias must be a Tensor or None, got {type(bias).__name__}")
    if 0 in weight.shape[3:]:
        raise ValueError(f"{kind}: weight has a zero-size kernel {tuple(weight.shape[3:])}")
    check_algorithm(kind, algorithm)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if not same_dtype_under_autocast(t, input):
            raise TypeError(f"{kind}: {name} dtype {t.dtype} does not match input dtype {input.dtype}")
        if t.device != input.device:
            raise ValueError(f"{kind}: {name} is on {t.device} but input is on {input.device}")
    if not input.is_floating_point():
        raise TypeError(f"{kind}: input must be a floating-point tensor, got {input.dtype}")

    channels = input.shape[1]
    if input.shape[0] and channels and 0 in input.shape[2:]:  # (torch's convs refuse these too)
        raise ValueError(
            f"{kind}: input has a zero-size spatial dim, shape {tuple(input.shape)}: only an empty batch is supported"
        )
    if channels % (4 * groups):
        raise ValueError(
            f"{kind}: input has {channels} channels, not a multiple of 4 * groups = {4 * groups} "
            "(quaternion tensors are blocked [r|i|j|k] and groups split each block)"
        )
    cq_in = channels // 4
    a, b = weight.shape[1], weight.shape[2]
    if transposed:
        ok = a == cq_in and a % groups == 0
        expected = f"(4, {cq_in}, out/4/groups, ...)"
    else:
        ok = b * groups == cq_in and a % groups == 0
        expected = f"(4, out/4 (a multiple of groups={groups}), {cq_in // groups}, ...)"
    if not ok:
        raise ValueError(
            f"{kind}: weight shape {tuple(weight.shape)} does not fit input with {channels} "
            f"channels and groups={groups}; expected {expected}"
        )
    out_channels = 4 * (b * groups if transposed else a)
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != out_channels):
        raise ValueError(f"{kind}: bias must have shape ({out_channels},), got {tuple(bias.shape)}")

    kernel = tuple(weight.shape[3:])
    key = tuple(_plain(v) for v in (stride, padding, dilation, output_padding))
    if None not in key:
        stride, padding, dilation, output_padding = key
    # Not plain ints (a bool, a float, a tensor...): checked, and refused, without the cache.
    # (Under torch.compile too: dynamo traces through the function and warns about the cache.)
    uncached = None in key or torch.compiler.is_compiling()
    geometry = _conv_geometry.__wrapped__ if uncached else _conv_geometry
    p, extra = geometry(kind, spatial_dims, kernel, stride, padding, dilation, output_padding, transposed, groups)
    padded = [i + e for i, e in zip(input.shape[2:], extra, strict=True)]
    if any(o < 1 for o in conv_output_size(padded, kernel, p)):
        raise ValueError(
            f"{kind}: input spatial size {tuple(input.shape[2:])} is too small for kernel {kernel} "
            f"with padding={p.padding}, dilation={p.dilation}, stride={p.stride}"
        )
    return p, extra


def autocast_casts(t: Tensor) -> bool:
    """Whether ``torch.autocast``, on for ``t``'s device, casts ``t``: floating and not float64, as aten's
    autocast and the aqcf ops' autocast kernels (:mod:`aqcf_kernels.ops.autocast`) decide."""
    return (
        t.is_floating_point()
        and t.dtype != torch.float64
        and t.device.type in ("cpu", "cuda")
        and torch.is_autocast_enabled(t.device.type)
    )


def same_dtype_under_autocast(a: Tensor, b: Tensor) -> bool:
    """``a`` and ``b`` have one dtype, or will have when an op that autocast casts receives them."""
    return a.dtype == b.dtype or (autocast_casts(a) and autocast_casts(b))


def _plain(value: object) -> object:
    """``value`` as a hashable cache key if it is an int or a list/tuple of ints (``bool`` excluded:
    ``True == 1`` would share a cache entry with ``1``), else ``None``."""
    kind = type(value)
    if kind is tuple or kind is list:
        for v in value:  # (a loop: all() over a generator costs twice as much on these 1-3 element tuples)
            if type(v) is not int:
                return None
        return value if kind is tuple else tuple(value)
    if kind is int or kind is str:
        return value
    return None


@functools.lru_cache(maxsize=4096)
def _conv_geometry(
    kind: str,
    spatial_dims: int,
    kernel: tuple[int, ...],
    stride: IntOrSeq,
    padding: IntOrSeq | str,
    dilation: IntOrSeq,
    output_padding: IntOrSeq,
    transposed: bool,
    groups: int,
) -> tuple[ConvParams, tuple[int, ...]]:
    """The geometry half of :func:`check_conv_args` (no tensors): memoised, layers repeat it every call."""
    stride_t = int_tuple(kind, "stride", stride, spatial_dims)
    dilation_t = int_tuple(kind, "dilation", dilation, spatial_dims)
    out_pad = int_tuple(kind, "output_padding", output_padding, spatial_dims)
    if any(s < 1 for s in stride_t):
        raise ValueError(f"{kind}: stride must be positive, got {stride}")
    if any(d < 1 for d in dilation_t):
        raise ValueError(f"{kind}: dilation must be positive, got {dilation}")
    extra = (0,) * spatial_dims
    if isinstance(padding, str):
        if transposed:
            raise ValueError(f"{kind}: padding={padding!r} is only supported for non-transposed convs")
        if padding == "valid":
            pad_t = (0,) * spatial_dims
        elif padding == "same":
            if any(s != 1 for s in stride_t):
                raise ValueError(f"{kind}: padding='same' needs stride 1, got stride={stride}")
            pad_t, extra = same_padding(kernel, dilation_t)
            extra = tuple(e - p for e, p in zip(extra, pad_t, strict=True))
        else:
            raise ValueError(f"{kind}: padding must be an int, a sequence, 'same' or 'valid', got {padding!r}")
    else:
        pad_t = int_tuple(kind, "padding", padding, spatial_dims)
    if any(p < 0 for p in pad_t):
        raise ValueError(f"{kind}: padding must be non-negative, got {padding}")
    if transposed:
        # torch's rule (nn.ConvTranspose*d, F.conv_transpose*d): below the stride or the dilation
        if any(op < 0 or op >= max(s, d) for op, s, d in zip(out_pad, stride_t, dilation_t, strict=True)):
            raise ValueError(
                f"{kind}: output_padding must be in [0, max(stride, dilation)), got {output_padding} "
                f"(stride={stride}, dilation={dilation})"
            )
        # One of a stride or more (only a dilation above the stride allows it) is the same transposed conv
        # of the input with op // stride zero rows more on the right: the op and every backend's adjoint
        # geometry then keep output_padding < stride (the conv of grad_output lands on the input's size).
        extra = tuple(op // s for op, s in zip(out_pad, stride_t, strict=True))
        out_pad = tuple(op % s for op, s in zip(out_pad, stride_t, strict=True))
    elif any(out_pad):
        raise ValueError(f"{kind}: output_padding is only meaningful for transposed convs")

    return ConvParams(spatial_dims, stride_t, pad_t, dilation_t, transposed, out_pad, groups), extra


def is_pointwise(weight_shape: Sequence[int], p: ConvParams) -> bool:
    """A 1×1 conv (or transposed conv) with unit stride, no padding and one group: a GEMM over tokens."""
    return (
        all(k == 1 for k in weight_shape[3:])
        and all(s == 1 for s in p.stride)
        and all(q == 0 for q in p.padding)
        and all(o == 0 for o in p.output_padding)
        and p.groups == 1
    )
