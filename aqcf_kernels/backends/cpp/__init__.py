"""The ``cpp`` backends: the compiled CPU extension ``aqcf_kernels._C`` (csrc/cpu), as called and on
channels_last copies (``cpp_cl``); conv family only."""

from ..registry import register
from .conv import CppChannelsLastConvBackend, CppConvBackend

register(CppConvBackend(), family="conv")
register(CppChannelsLastConvBackend(), family="conv")

__all__ = ["CppChannelsLastConvBackend", "CppConvBackend"]
