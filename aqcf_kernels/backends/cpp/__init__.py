"""The ``cpp`` backends: the compiled CPU extension ``aqcf_kernels._C`` (csrc/cpu), as called, on
channels_last copies (``cpp_cl``) and with PyTorch's own real-conv kernels (``cpp_im2col``); conv family only."""

from ..registry import register
from .conv import CppChannelsLastConvBackend, CppConvBackend, CppIm2colConvBackend

register(CppConvBackend(), family="conv")
register(CppChannelsLastConvBackend(), family="conv")
register(CppIm2colConvBackend(), family="conv")

__all__ = ["CppChannelsLastConvBackend", "CppConvBackend", "CppIm2colConvBackend"]
