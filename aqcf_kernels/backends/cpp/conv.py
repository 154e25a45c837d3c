"""The ``cpp`` conv backends: the compiled CPU extension ``aqcf_kernels._C`` (csrc/cpu), as called
(``cpp``) and on channels_last copies of channels-first operands (``cpp_cl``)."""

from __future__ import annotations

import torch
from torch import Tensor
from torch._prims_common import suggest_memory_format

from ...params import ConvParams, is_pointwise
from .._extension import _C
from .._extension import IMPORT_ERROR as _IMPORT_ERROR
from ..base import ConvBackend, activate, has_own_methods


class CppConvBackend(ConvBackend):
    name = "cpp"
    device_types = ("cpu",)
    # relu and leaky_relu (slope >= 0) run in the conv's epilogue: oneDNN's post-op on the expanded conv,
    # fast8's output pass; so the op writes the output once. Where the backward needs the
    # pre-activation (gelu, a negative slope), the conv's output is kept and activated after.
    fuses_activation = True

    def unavailable(self) -> str | None:
        return _IMPORT_ERROR

    def cannot_serve(self, input: Tensor, weight: Tensor, params: ConvParams, algorithm: str) -> str | None:
        return None

    def native_engine(self) -> str | None:
        """``'cpu'``: the extension's op kernels compute what this backend's methods do (not when a test or a
        subclass has replaced them), so a call this backend served may skip Python next time (ops/conv.py)."""
        own = ("conv", "conv_act", "conv_weight_grad", "_operand")
        return "cpu" if has_own_methods(self, CppConvBackend, own) else None

    def _operand(self, t: Tensor) -> Tensor:
        """An activation or gradient as the extension is handed it (``cpp_cl``: a channels_last copy)."""
        return t

    # Pointwise hamilton convs are one GEMM in the extension too (csrc/cpu/conv.cpp: conv_pointwise).
    def conv(self, input: Tensor, weight: Tensor, bias: Tensor | None, p: ConvParams, algorithm: str) -> Tensor:
        return _C.conv(self._operand(input), weight, bias, *p.as_op_args(), algorithm == "fast8")

    def conv_act(
        self,
        input: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        p: ConvParams,
        algorithm: str,
        activation: str,
        negative_slope: float,
        keep_pre: bool,
    ) -> tuple[Tensor, Tensor | None]:
        x, fast8 = self._operand(input), algorithm == "fast8"
        if keep_pre:  # the backward reads the pre-activation: write it, then activate a copy
            z = _C.conv(x, weight, bias, *p.as_op_args(), fast8)
            return activate(z, activation, negative_slope), z
        return _C.conv(x, weight, bias, *p.as_op_args(), fast8, activation, negative_slope), None

    def conv_weight_grad(
        self, input: Tensor, grad_output: Tensor, weight_shape: list[int], p: ConvParams, algorithm: str
    ) -> Tensor:
        return _C.conv_weight_grad(input, grad_output, list(weight_shape), *p.as_op_args(), algorithm == "fast8")


class CppChannelsLastConvBackend(CppConvBackend):
    """The ``cpp`` engine's hamilton conv run on channels_last copies of channels-first operands.

    oneDNN's real convs on few channels and many voxels are much faster channels_last, enough to pay
    for the copies there and not elsewhere (the measurements are with the rule that says where it is
    timed: ``policy.plausible``). One more candidate for ``algorithm='auto'``, never the rule's pick;
    the caller's memory format is kept, so a network stays channels-first. (Its methods are not the
    extension's op kernels, so ``native_engine`` is None: every call comes through Python.)
    """

    name = "cpp_cl"

    def algorithms(self, input: Tensor) -> tuple[str, ...]:
        return ("hamilton",)

    def cannot_serve(self, input: Tensor, weight: Tensor, params: ConvParams, algorithm: str) -> str | None:
        if algorithm != "hamilton":
            return "runs the hamilton algorithm only (fast8's component products are strided slices in channels_last)"
        if params.spatial_dims not in (2, 3):
            return "channels_last exists for 2d and 3d feature maps only"
        if suggest_memory_format(input) != torch.contiguous_format:
            return "the input is channels_last already: the cpp backend runs it as it is"
        if is_pointwise(weight.shape, params):
            return "a pointwise conv is one GEMM on the tokens in the cpp backend, whatever the layout"
        return None

    def _operand(self, t: Tensor) -> Tensor:
        return t.contiguous(memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d)

    # Its own methods (not the inherited ones), so measuring and tests treat the two backends apart.
    def conv(self, input: Tensor, weight: Tensor, bias: Tensor | None, p: ConvParams, algorithm: str) -> Tensor:
        return _C.conv(self._operand(input), weight, bias, *p.as_op_args(), False)

    def conv_weight_grad(
        self, input: Tensor, grad_output: Tensor, weight_shape: list[int], p: ConvParams, algorithm: str
    ) -> Tensor:
        x, gy = self._operand(input), self._operand(grad_output)
        return _C.conv_weight_grad(x, gy, list(weight_shape), *p.as_op_args(), False)
