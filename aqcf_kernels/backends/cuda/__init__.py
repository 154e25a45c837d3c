"""The ``cuda`` backend: the compiled extension's device-agnostic ATen host code on CUDA tensors (cuDNN under
``at::convolution``); conv family only."""

from ..registry import register
from .conv import CudaConvBackend

register(CudaConvBackend(), family="conv")

__all__ = ["CudaConvBackend"]
