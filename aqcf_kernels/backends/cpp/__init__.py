"""The ``cpp`` backend: the compiled CPU extension ``aqcf_kernels._C`` (csrc/cpu); conv family only."""

from ..registry import register
from .conv import CppConvBackend

register(CppConvBackend(), family="conv")

__all__ = ["CppConvBackend"]
