"""The ``cuda`` conv backend: the CUDA kernels of the compiled extension ``aqcf_kernels._C`` (csrc/cuda).

The extension carries them only when it was built against a CUDA torch (setup.py adds csrc/cuda and
``-DAQCF_WITH_CUDA``); a CPU-only build has ``conv`` but no ``cuda_conv``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...params import ConvParams
from .._extension import _C
from .._extension import IMPORT_ERROR as _IMPORT_ERROR
from ..base import ConvBackend


class CudaConvBackend(ConvBackend):
    name = "cuda"
    device_types = ("cuda",)

    def unavailable(self) -> str | None:
        if _IMPORT_ERROR:
            return _IMPORT_ERROR
        if not hasattr(_C, "cuda_conv"):
            return (
                "aqcf_kernels._C was built without CUDA kernels (needs a CUDA torch at build time and "
                "AQCF_NO_CUDA unset; rebuild with `pip install -e . --no-build-isolation`)"
            )
        if not torch.cuda.is_available():
            return "no CUDA device"
        return None

    def cannot_serve(self, input: Tensor, weight: Tensor, params: ConvParams, algorithm: str) -> str | None:
        if input.dtype not in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
            return f"no kernel for {input.dtype} (float64/float32/float16/bfloat16 only)"
        return None

    def conv(self, input: Tensor, weight: Tensor, bias: Tensor | None, p: ConvParams, algorithm: str) -> Tensor:
        return _C.cuda_conv(input, weight, bias, *p.as_op_args(), algorithm == "fast8")

    def conv_weight_grad(
        self, input: Tensor, grad_output: Tensor, weight_shape: list[int], p: ConvParams, algorithm: str
    ) -> Tensor:
        return _C.cuda_conv_weight_grad(input, grad_output, list(weight_shape), *p.as_op_args(), algorithm == "fast8")
