"""The ``cpp`` conv backend: the compiled CPU extension ``aqcf_kernels._C`` (csrc/cpu)."""

from __future__ import annotations

from torch import Tensor

from ...params import ConvParams, is_pointwise
from .._extension import _C
from .._extension import IMPORT_ERROR as _IMPORT_ERROR
from ..base import ConvBackend
from ..torch.conv import pointwise_conv, pointwise_weight_grad


class CppConvBackend(ConvBackend):
    name = "cpp"
    device_types = ("cpu",)

    def unavailable(self) -> str | None:
        return _IMPORT_ERROR

    def cannot_serve(self, input: Tensor, weight: Tensor, params: ConvParams, algorithm: str) -> str | None:
        return None

    # Pointwise hamilton convs are one MKL GEMM (see backends/torch/conv.py, pointwise_conv): the extension's
    # hamilton would call the same oneDNN 1x1 conv that is slower on these shapes.
    def conv(self, input: Tensor, weight: Tensor, bias: Tensor | None, p: ConvParams, algorithm: str) -> Tensor:
        if algorithm == "hamilton" and is_pointwise(weight.shape, p):
            return pointwise_conv(input, weight, bias, p)
        return _C.conv(input, weight, bias, *p.as_op_args(), algorithm == "fast8")

    def conv_weight_grad(
        self, input: Tensor, grad_output: Tensor, weight_shape: list[int], p: ConvParams, algorithm: str
    ) -> Tensor:
        if algorithm == "hamilton" and is_pointwise(weight_shape, p):
            x, gy = (grad_output, input) if p.transposed else (input, grad_output)
            return pointwise_weight_grad(x, gy, weight_shape)
        return _C.conv_weight_grad(input, grad_output, list(weight_shape), *p.as_op_args(), algorithm == "fast8")
