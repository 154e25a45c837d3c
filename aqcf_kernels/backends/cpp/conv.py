"""The ``cpp`` conv backends: the compiled CPU extension ``aqcf_kernels._C`` (csrc/cpu), as called
(``cpp``), on channels_last copies of channels-first operands (``cpp_cl``), and with its real convs on
PyTorch's own kernel choice (``cpp_im2col``)."""

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
    #: The extension's ConvParams::im2col: its real convs on PyTorch's own kernel choice (``cpp_im2col``),
    #: and the engine name its remembered calls are served by.
    _im2col = False
    _engine = "cpu"

    def unavailable(self) -> str | None:
        return _IMPORT_ERROR

    def cannot_serve(self, input: Tensor, weight: Tensor, params: ConvParams, algorithm: str) -> str | None:
        return None

    def native_engine(self) -> str | None:
        """``'cpu'`` (``'cpu_im2col'``): the extension's op kernels compute what this backend's methods do
        (not when a test or a subclass has replaced them), so a call this backend served may skip Python
        next time (ops/conv.py)."""
        own = ("conv", "conv_act", "conv_weight_grad", "_operand")
        return self._engine if has_own_methods(self, CppConvBackend, own) else None

    def _operand(self, t: Tensor) -> Tensor:
        """An activation or gradient as the extension is handed it (``cpp_cl``: a channels_last copy)."""
        return t

    # Pointwise hamilton convs are one GEMM in the extension too (csrc/cpu/conv.cpp: conv_pointwise).
    def conv(self, input: Tensor, weight: Tensor, bias: Tensor | None, p: ConvParams, algorithm: str) -> Tensor:
        return _C.conv(self._operand(input), weight, bias, *p.as_op_args(), algorithm == "fast8", im2col=self._im2col)

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
            z = _C.conv(x, weight, bias, *p.as_op_args(), fast8, im2col=self._im2col)
            return activate(z, activation, negative_slope), z
        return _C.conv(x, weight, bias, *p.as_op_args(), fast8, activation, negative_slope, im2col=self._im2col), None

    def conv_weight_grad(
        self, input: Tensor, grad_output: Tensor, weight_shape: list[int], p: ConvParams, algorithm: str
    ) -> Tensor:
        args = (input, grad_output, list(weight_shape), *p.as_op_args(), algorithm == "fast8")
        return _C.conv_weight_grad(*args, im2col=self._im2col)


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


class CppIm2colConvBackend(CppConvBackend):
    """The ``cpp`` engine with its real convs left to PyTorch's own kernel choice.

    PyTorch sends a float32 conv of one sample on few channels to its im2col kernels (``slow_conv2d``
    and kin) rather than oneDNN; the cpp engine routes those to oneDNN (csrc/cpu/real_conv.cpp), which was
    2-16x faster on the 3D model's convs. At the small end the order flips: oneDNN's cost per call is
    more than such a conv's work (A-QCF-Net at 2D 32² B1, features 8-32, AMD EPYC, 1 thread: a training
    step 29 ms with the route, 22 ms without). Where the crossover lies depends on the CPU, so this is
    one more candidate ``auto`` times wherever the two routes differ, never the rule's pick. The hamilton
    algorithm only: fast8's 8 products are smaller convs still, one more candidate pair to time where the
    expanded conv is the faster of the two anyway at these sizes (``policy.fast8_pays_off``).
    """

    name = "cpp_im2col"
    _im2col = True
    _engine = "cpu_im2col"

    def algorithms(self, input: Tensor) -> tuple[str, ...]:
        return ("hamilton",)

    def cannot_serve(self, input: Tensor, weight: Tensor, params: ConvParams, algorithm: str) -> str | None:
        if algorithm != "hamilton":
            return "runs the hamilton algorithm only"
        if input.dtype != torch.float32:
            return f"the cpp engine reroutes float32 real convs only: in {input.dtype} it runs PyTorch's choice already"
        if is_pointwise(weight.shape, params):
            return "a pointwise conv is one GEMM on the tokens in the cpp backend: no real conv to route"
        # The expanded conv's route; a weight gradient is asked about its forward conv's input (for a
        # transposed conv the correlation runs on the output gradient, of other sizes: an estimate).
        expanded = [4 * weight.shape[1], 4 * weight.shape[2], *weight.shape[3:]]
        if _C._real_conv_route(input, expanded, *params.as_op_args()) == "aten":
            return "PyTorch's own kernel choice is the cpp backend's here: nothing differs"
        return None
