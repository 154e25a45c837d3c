"""aqcf-kernels: fast quaternion layers for PyTorch."""

from . import backends, functional, nn, ops, reference

__all__ = ["backends", "functional", "nn", "ops", "reference"]
__version__ = "0.1.0"
