"""aqcf-kernels: fast quaternion layers for PyTorch."""

from . import backends, functional, models, nn, ops, reference

__all__ = ["backends", "functional", "models", "nn", "ops", "reference"]
__version__ = "0.1.0"
