"""The ``cuda`` backend: the CUDA kernels of the compiled extension ``aqcf_kernels._C`` (csrc/cuda);
conv family only."""

from ..registry import register
from .conv import CudaConvBackend

register(CudaConvBackend(), family="conv")

__all__ = ["CudaConvBackend"]
