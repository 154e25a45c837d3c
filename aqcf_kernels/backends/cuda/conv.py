"""The ``cuda`` conv backend: the compiled extension's ATen host code on CUDA tensors (Triton-free).

``aqcf_kernels._C.conv_aten`` / ``conv_weight_grad_aten`` (csrc/cpu/conv.cpp) are written in ATen ops only,
so on CUDA tensors they run cuDNN under ``at::convolution`` and cuBLAS for the small GEMMs: ``hamilton``
is the expanded-weight conv (the weight expanded by one GEMM with the Hamilton sign matrix, the weight
gradient folded back by its transpose), ``fast8`` its 8 cuDNN convs on the operand combinations, one
after the other, and the butterfly. The same code runs on CPU tensors in the tests
(tests/conv/test_aten_path.py). It replaced hand-written CUDA kernels that ran at 0.08x of cuDNN on the
expanded weight (H100/H200, bf16, README): the fallback where Triton is missing is now cuDNN's speed,
and Python is left for the op layer only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...params import ConvParams
from .._extension import _C
from .._extension import IMPORT_ERROR as _IMPORT_ERROR
from ..base import ConvBackend, has_own_methods


class CudaConvBackend(ConvBackend):
    name = "cuda"
    device_types = ("cuda",)

    def unavailable(self) -> str | None:
        if _IMPORT_ERROR:
            return _IMPORT_ERROR
        if not torch.cuda.is_available():
            return "no CUDA device"
        return None

    def cannot_serve(self, input: Tensor, weight: Tensor, params: ConvParams, algorithm: str) -> str | None:
        if input.device.type != "cuda":
            return f"serves CUDA tensors, got {input.device.type}"
        if input.dtype not in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
            return f"no kernel for {input.dtype} (float64/float32/float16/bfloat16 only)"
        return None

    def native_engine(self) -> str | None:
        """``'aten'``: the extension's op kernels (registered for CUDA too) run the same ``conv_aten`` and
        ``conv_weight_grad_aten``, so a signature this backend served never leaves C++ again (unless a test or
        a subclass replaced its methods)."""
        own = ("conv", "conv_weight_grad", "conv_weight_bias_grad")
        return "aten" if has_own_methods(self, CudaConvBackend, own) else None

    def conv(self, input: Tensor, weight: Tensor, bias: Tensor | None, p: ConvParams, algorithm: str) -> Tensor:
        return _C.conv_aten(input, weight, bias, *p.as_op_args(), algorithm == "fast8")

    def conv_weight_grad(
        self, input: Tensor, grad_output: Tensor, weight_shape: list[int], p: ConvParams, algorithm: str
    ) -> Tensor:
        return _C.conv_weight_grad_aten(input, grad_output, list(weight_shape), *p.as_op_args(), algorithm == "fast8")
