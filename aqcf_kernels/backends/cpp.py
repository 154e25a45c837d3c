"""The ``cpp`` backend: the compiled CPU extension ``aqcf_kernels._C`` (csrc/cpu)."""

from __future__ import annotations

from torch import Tensor

from ..params import ConvParams
from ._extension import _C
from ._extension import IMPORT_ERROR as _IMPORT_ERROR


class CppBackend:
    name = "cpp"
    device_types = ("cpu",)

    def unavailable(self) -> str | None:
        return _IMPORT_ERROR

    def cannot_serve(self, input: Tensor, weight: Tensor, params: ConvParams, algorithm: str) -> str | None:
        return None

    def conv(self, input, weight, bias, p: ConvParams, algorithm: str) -> Tensor:
        return _C.conv(input, weight, bias, *p.as_op_args(), algorithm == "fast8")

    def conv_weight_grad(self, input, grad_output, weight_shape, p: ConvParams, algorithm: str) -> Tensor:
        return _C.conv_weight_grad(input, grad_output, list(weight_shape), *p.as_op_args(), algorithm == "fast8")
