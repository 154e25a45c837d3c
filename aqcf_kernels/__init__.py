"""aqcf-kernels: fast quaternion layers for PyTorch."""

from . import functional, ops, reference  # noqa: F401
from .backends import backends

__all__ = ["backends", "functional", "ops", "reference"]
__version__ = "0.1.0"
