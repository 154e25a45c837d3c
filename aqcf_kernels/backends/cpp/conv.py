"""The ``cpp`` conv backend: the compiled CPU extension ``aqcf_kernels._C`` (csrc/cpu)."""

from __future__ import annotations

from torch import Tensor

from ...params import ConvParams
from .._extension import _C
from .._extension import IMPORT_ERROR as _IMPORT_ERROR
from ..base import ConvBackend


class CppConvBackend(ConvBackend):
    name = "cpp"
    device_types = ("cpu",)

    def unavailable(self) -> str | None:
        return _IMPORT_ERROR

    def cannot_serve(self, input: Tensor, weight: Tensor, params: ConvParams, algorithm: str) -> str | None:
        return None

    def serves_natively(self) -> bool:
        """Whether the extension's op kernels compute what this backend's methods do (not when a test has
        replaced them), so a call this backend served may skip Python next time (ops/conv.py)."""
        own = CppConvBackend
        return (
            getattr(self.conv, "__func__", None) is own.conv
            and getattr(self.conv_weight_grad, "__func__", None) is own.conv_weight_grad
        )

    # Pointwise hamilton convs are one GEMM in the extension too (csrc/cpu/conv.cpp: conv_pointwise).
    def conv(self, input: Tensor, weight: Tensor, bias: Tensor | None, p: ConvParams, algorithm: str) -> Tensor:
        return _C.conv(input, weight, bias, *p.as_op_args(), algorithm == "fast8")

    def conv_weight_grad(
        self, input: Tensor, grad_output: Tensor, weight_shape: list[int], p: ConvParams, algorithm: str
    ) -> Tensor:
        return _C.conv_weight_grad(input, grad_output, list(weight_shape), *p.as_op_args(), algorithm == "fast8")
