"""aqcf-kernels: fast quaternion layers for PyTorch."""

from . import backends, functional, models, nn, ops

__all__ = ["backends", "functional", "models", "nn", "ops"]
__version__ = "0.1.0"
