"""Quaternion (transposed) convolution layers with ``torch.nn.Conv*d`` / ``ConvTranspose*d`` signatures.

Channel counts are real channels of a blocked ``[r|i|j|k]`` tensor (multiples of 4 and of
4 * groups). The weight is ONE parameter ``(4, out/4, in/4/groups, *kernel_size)``
(transposed: ``(4, in/4, out/4/groups, *kernel_size)``); ``y = W ⊗ x``. All six classes share
:class:`_QuaternionConvNd`; the leaves only fix the spatial rank and the argument order. Every layer
also takes ``init`` ('quaternion', 'unitary', 'random') and ``init_criterion`` ('glorot', 'he'): see
:func:`aqcf_kernels.nn.init.init_quaternion_`.

``rotation=True`` makes any of them a rotation ("spinor") layer, Parcollet's ``QuaternionConv(rotation=True)``
and speechbrain's ``QConv1d/2d(spinor=True)``: ``y = W ⊗ x ⊗ W⁻¹`` on the pure part of ``x``, every
weight normalised first (see :mod:`aqcf_kernels.nn.rotation` for the exact formula and its ε). With it,
``scale=True`` adds their learnt per-weight ``scale_param`` (shape of one weight component, Xavier-uniform
init) and ``quaternion_format=False`` makes input and output ``[i|j|k]`` tensors (channels multiples of 3)
instead of ``[r|i|j|k]`` ones whose real input block is ignored and real output block is zero before the
bias. Their state dicts load (``zero_kernel`` is dropped). speechbrain's ``max_norm`` (an in-place
renorm of the weight before each call) is not offered: a rotation normalises the weight anyway.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._fx import fx_leaf
from ..backends.base import activate
from ..functional import _quaternion_conv
from ..params import int_tuple
from ._base import (
    QuaternionModule,
    check_layer_options,
    check_quaternion_channels,
    check_real_dtype,
    check_rotation_options,
)
from .rotation import quaternion_rotation_conv, rotation_channel_blocks

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
PADDING_STRINGS = ("same", "valid")

IntOrTuple = int | Sequence[int]


# How an unbatched input of each spatial rank is read, as torch's docs write it.
_UNBATCHED_LAYOUT = {1: "C, L", 2: "C, H, W", 3: "C, D, H, W"}


class _QuaternionConvNd(QuaternionModule):
    """Shared body of the quaternion (transposed) convs; ``_spatial_dims`` and ``_transposed`` select which."""

    _spatial_dims: int
    _transposed: bool

    def _setup(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrTuple,
        stride: IntOrTuple,
        padding: IntOrTuple | str,
        dilation: IntOrTuple,
        output_padding: IntOrTuple,
        groups: int,
        bias: bool,
        padding_mode: str,
        device: Any,
        dtype: Any,
        algorithm: str,
        init_criterion: str,
        init: str = "quaternion",
        rotation: bool = False,
        quaternion_format: bool = True,
        scale: bool = False,
    ) -> None:
        name, n = type(self).__name__, self._spatial_dims
        if not isinstance(groups, int) or isinstance(groups, bool) or groups <= 0:
            raise ValueError(f"{name}: groups must be a positive int, got {groups!r}")
        check_layer_options(name, algorithm, init_criterion, init)
        check_real_dtype(name, dtype)
        check_rotation_options(name, rotation, quaternion_format, scale, algorithm)
        blocks = rotation_channel_blocks(quaternion_format)
        in_channels = check_quaternion_channels(name, "in_channels", in_channels, groups, blocks)
        out_channels = check_quaternion_channels(name, "out_channels", out_channels, groups, blocks)
        kernel_size = int_tuple(name, "kernel_size", kernel_size, n, minimum=1)
        stride = int_tuple(name, "stride", stride, n, minimum=1)
        dilation = int_tuple(name, "dilation", dilation, n, minimum=1)
        output_padding = int_tuple(name, "output_padding", output_padding, n, minimum=0)
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"{name}: padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        if self._transposed and padding_mode != "zeros":
            # torch's ConvTranspose has the same restriction: padding a transposed conv's input
            # is not the adjoint of anything.
            raise ValueError(f"{name}: only padding_mode='zeros' is supported, got {padding_mode!r}")
        if isinstance(padding, str):
            if self._transposed:
                raise ValueError(f"{name}: padding must be an int or a tuple of ints, got {padding!r}")
            if padding not in PADDING_STRINGS:
                raise ValueError(f"{name}: padding string must be one of {PADDING_STRINGS}, got {padding!r}")
            if padding == "same" and any(s != 1 for s in stride):
                raise ValueError(f"{name}: padding='same' is not supported for strided convolutions")
        else:
            padding = int_tuple(name, "padding", padding, n, minimum=0)

        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.transposed, self.output_padding, self.groups = self._transposed, output_padding, groups
        self.padding_mode, self.algorithm, self.init_criterion = padding_mode, algorithm, init_criterion
        self.init = init
        self.rotation, self.quaternion_format, self.scale = rotation, quaternion_format, scale
        self._reversed_padding_repeated_twice = self._pad_for_f_pad()

        a, b = (in_channels, out_channels) if self._transposed else (out_channels, in_channels)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty((4, a // blocks, b // blocks // groups, *kernel_size), **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, **factory))
        else:
            self.register_parameter("bias", None)
        if scale:
            self.scale_param = nn.Parameter(torch.empty(self.weight.shape[1:], **factory))
        else:
            self.register_parameter("scale_param", None)
        self.reset_parameters()

    def _pad_for_f_pad(self) -> list[int]:
        """The ``F.pad`` argument for non-zero padding modes: torch's ``_reversed_padding_repeated_twice``.

        F.pad lists the last dim first; 'same' puts the odd element of ``d*(k-1)`` on the right.
        """
        n = self._spatial_dims
        if isinstance(self.padding, str):
            pads = [0, 0] * n
            if self.padding == "same":
                for i, (d, k) in enumerate(zip(self.dilation, self.kernel_size, strict=True)):
                    total = d * (k - 1)
                    pads[2 * (n - 1 - i)] = total // 2
                    pads[2 * (n - 1 - i) + 1] = total - total // 2
            return pads
        return [p for p in reversed(self.padding) for _ in range(2)]

    @classmethod
    def _args_from_component_shape(cls, shape: torch.Size, kwargs: dict[str, Any]) -> tuple:
        if len(shape) != cls._spatial_dims + 2:
            raise ValueError(
                f"{cls.__name__}.from_components: components must be {cls._spatial_dims + 2}-D "
                f"({'in/4, out/4/groups' if cls._transposed else 'out/4, in/4/groups'}, *kernel_size), "
                f"got shape {tuple(shape)}"
            )
        groups = kwargs.get("groups", 1)
        blocks = rotation_channel_blocks(kwargs.get("quaternion_format", True))
        a, b = blocks * shape[0], blocks * shape[1] * groups
        in_channels, out_channels = (a, b) if cls._transposed else (b, a)
        return in_channels, out_channels, tuple(shape[2:])

    def _conv_forward(
        self,
        input: Tensor,
        output_padding: Sequence[int],
        weight: Tensor | None = None,
        bias: Tensor | None = None,
        activation: str | None = None,
        negative_slope: float = 0.01,
    ) -> Tensor:
        """The conv with this module's geometry; ``weight`` and ``bias`` (when ``weight`` is given)
        replace the module's own (a norm folded in: :class:`~aqcf_kernels.nn.QuaternionConvNormAct`);
        ``activation`` as :func:`~aqcf_kernels.functional.quaternion_conv`'s (fused where the backend can)."""
        if weight is None:
            weight, bias = self.weight, self.bias
        padding = self.padding
        if self.padding_mode != "zeros":
            # Like torch: pad explicitly with the mode, then convolve without padding.
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        args = (input, weight, bias, self.stride, padding, self.dilation, self.groups)
        if self.rotation:
            y = quaternion_rotation_conv(
                *args, transposed=self._transposed, output_padding=output_padding, scale=self.scale_param,
                quaternion_format=self.quaternion_format,
            )  # fmt: skip
            return y if activation is None else activate(y, activation, negative_slope)
        # (the functional conv's body: this forward is the FX leaf)
        return _quaternion_conv(
            *args, self._transposed, output_padding, self.algorithm, activation, negative_slope
        )  # fmt: skip

    def _unbatched(self, input: Tensor) -> bool:
        """Whether ``input`` is one unbatched sample ``(C, *spatial)`` (torch's conv modules accept it;
        the functional ops want a batch dim). Checks the rank and channel count first, so the error
        says how the input was read."""
        if not isinstance(input, Tensor):
            return False  # the functional op names the argument
        n, name = self._spatial_dims, type(self).__name__
        if input.dim() not in (n + 1, n + 2):
            raise ValueError(
                f"{name}: expected {n + 1}D (unbatched) or {n + 2}D (batched) input, got {input.dim()}D input "
                f"of shape {tuple(input.shape)}"
            )
        unbatched = input.dim() == n + 1
        channels = input.shape[0 if unbatched else 1]
        if channels != self.in_channels:
            read_as = (
                f"was read as unbatched ({_UNBATCHED_LAYOUT[n]}) with {channels} channels"
                if unbatched
                else f"has {channels} channels (dim 1)"
            )
            raise ValueError(
                f"{name}: input of shape {tuple(input.shape)} {read_as}, but the layer expects "
                f"in_channels={self.in_channels}"
            )
        return unbatched

    def extra_repr(self) -> str:
        n = self._spatial_dims
        s = "{in_channels}, {out_channels}, kernel_size={kernel_size}, stride={stride}"
        if self.padding != (0,) * n:
            s += ", padding={padding!r}" if isinstance(self.padding, str) else ", padding={padding}"
        if self.dilation != (1,) * n:
            s += ", dilation={dilation}"
        if self.output_padding != (0,) * n:
            s += ", output_padding={output_padding}"
        if self.groups != 1:
            s += ", groups={groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += ", padding_mode={padding_mode!r}"
        return s.format(**self.__dict__) + self._options_repr()


class _QuaternionConv(_QuaternionConvNd):
    """``torch.nn.Conv*d`` signature; ``y = W ⊗ x`` with ``W`` of shape ``(4, out/4, in/4/groups, *k)``."""

    _transposed = False

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrTuple,
        stride: IntOrTuple = 1,
        padding: IntOrTuple | str = 0,
        dilation: IntOrTuple = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: Any = None,
        dtype: Any = None,
        *,
        algorithm: str = "auto",
        init_criterion: str = "glorot",
        init: str = "quaternion",
        rotation: bool = False,
        quaternion_format: bool = True,
        scale: bool = False,
    ) -> None:
        super().__init__()
        self._setup(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            0,
            groups,
            bias,
            padding_mode,
            device,
            dtype,
            algorithm,
            init_criterion,
            init,
            rotation,
            quaternion_format,
            scale,
        )

    @fx_leaf
    def forward(
        self,
        input: Tensor,
        *,
        weight: Tensor | None = None,
        bias: Tensor | None = None,
        activation: str | None = None,
        negative_slope: float = 0.01,
    ) -> Tensor:
        """``weight`` and ``bias`` (keyword only, with ``weight``; batched input) replace the module's own
        for this call: a unit that folds its norm in or convolves a slice of its input channels calls
        the conv through the module, so the module's hooks see the call
        (:class:`~aqcf_kernels.nn.QuaternionConvNormAct`). ``activation`` ('relu', 'leaky_relu' with
        ``negative_slope``, 'gelu'; keyword only) is applied to the output, in the conv's epilogue where
        the backend fuses it."""
        # (passed on only when given: a subclass overriding _conv_forward without them keeps working)
        act = {} if activation is None else {"activation": activation, "negative_slope": negative_slope}
        if weight is not None:  # a batched input, whose channels are the weight's (a slice of in_channels)
            return self._conv_forward(input, self.output_padding, weight, bias, **act)
        if self._unbatched(input):
            return self._conv_forward(input.unsqueeze(0), self.output_padding, **act).squeeze(0)
        return self._conv_forward(input, self.output_padding, **act)


class _QuaternionConvTranspose(_QuaternionConvNd):
    """``torch.nn.ConvTranspose*d`` signature: the adjoint of the conv with the same weight,
    ``W`` of shape ``(4, in/4, out/4/groups, *k)``."""

    _transposed = True

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrTuple,
        stride: IntOrTuple = 1,
        padding: IntOrTuple = 0,
        output_padding: IntOrTuple = 0,
        groups: int = 1,
        bias: bool = True,
        dilation: IntOrTuple = 1,
        padding_mode: str = "zeros",
        device: Any = None,
        dtype: Any = None,
        *,
        algorithm: str = "auto",
        init_criterion: str = "glorot",
        init: str = "quaternion",
        rotation: bool = False,
        quaternion_format: bool = True,
        scale: bool = False,
    ) -> None:
        super().__init__()
        self._setup(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            output_padding,
            groups,
            bias,
            padding_mode,
            device,
            dtype,
            algorithm,
            init_criterion,
            init,
            rotation,
            quaternion_format,
            scale,
        )

    def _output_padding(self, input: Tensor, output_size: Sequence[int] | None) -> tuple[int, ...]:
        """torch's ``ConvTranspose._output_padding``: the output_padding that reaches ``output_size``."""
        if output_size is None:
            return self.output_padding
        n = self._spatial_dims
        lead = input.dim() - n
        output_size = [int(s) for s in output_size]
        if len(output_size) == lead + n:
            output_size = output_size[lead:]
        if len(output_size) != n:
            raise ValueError(
                f"{type(self).__name__}: for {input.dim()}D input, output_size must have {n} or {lead + n} "
                f"elements (got {len(output_size)})"
            )
        min_sizes = [
            (input.shape[lead + d] - 1) * self.stride[d]
            - 2 * self.padding[d]
            + self.dilation[d] * (self.kernel_size[d] - 1)
            + 1
            for d in range(n)
        ]
        max_sizes = [m + s - 1 for m, s in zip(min_sizes, self.stride, strict=True)]
        if any(not lo <= size <= hi for size, lo, hi in zip(output_size, min_sizes, max_sizes, strict=True)):
            raise ValueError(
                f"{type(self).__name__}: requested an output size of {output_size}, but valid sizes range "
                f"from {min_sizes} to {max_sizes} (for an input of {list(input.shape[lead:])})"
            )
        return tuple(size - lo for size, lo in zip(output_size, min_sizes, strict=True))

    @fx_leaf
    def forward(self, input: Tensor, output_size: Sequence[int] | None = None) -> Tensor:
        output_padding = self._output_padding(input, output_size)
        if self._unbatched(input):
            return self._conv_forward(input.unsqueeze(0), output_padding).squeeze(0)
        return self._conv_forward(input, output_padding)


class QuaternionConv1d(_QuaternionConv):
    """Quaternion 1d conv; arguments as ``torch.nn.Conv1d`` + ``algorithm``, ``init``, ``rotation`` (see module)."""

    _spatial_dims = 1


class QuaternionConv2d(_QuaternionConv):
    """Quaternion 2d conv; arguments as ``torch.nn.Conv2d`` + ``algorithm``, ``init``, ``rotation`` (see module)."""

    _spatial_dims = 2


class QuaternionConv3d(_QuaternionConv):
    """Quaternion 3d conv; arguments as ``torch.nn.Conv3d`` + ``algorithm``, ``init``, ``rotation`` (see module)."""

    _spatial_dims = 3


class QuaternionConvTranspose1d(_QuaternionConvTranspose):
    """Quaternion 1d transposed conv; arguments as ``torch.nn.ConvTranspose1d`` + options (see module)."""

    _spatial_dims = 1


class QuaternionConvTranspose2d(_QuaternionConvTranspose):
    """Quaternion 2d transposed conv; arguments as ``torch.nn.ConvTranspose2d`` + options (see module)."""

    _spatial_dims = 2


class QuaternionConvTranspose3d(_QuaternionConvTranspose):
    """Quaternion 3d transposed conv; arguments as ``torch.nn.ConvTranspose3d`` + options (see module)."""

    _spatial_dims = 3
