"""Quaternion ``torch.nn`` layers: parameters, init and repr; ``forward`` calls :mod:`aqcf_kernels.functional`."""

from .attention import AQCFBlock
from .conv import (
    QuaternionConv1d,
    QuaternionConv2d,
    QuaternionConv3d,
    QuaternionConvTranspose1d,
    QuaternionConvTranspose2d,
    QuaternionConvTranspose3d,
)
from .init import quaternion_init_
from .linear import QuaternionLinear

__all__ = [
    "AQCFBlock",
    "QuaternionConv1d",
    "QuaternionConv2d",
    "QuaternionConv3d",
    "QuaternionConvTranspose1d",
    "QuaternionConvTranspose2d",
    "QuaternionConvTranspose3d",
    "QuaternionLinear",
    "quaternion_init_",
]
