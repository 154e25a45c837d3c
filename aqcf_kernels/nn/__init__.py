"""Quaternion ``torch.nn`` layers: parameters, init and repr; ``forward`` calls :mod:`aqcf_kernels.functional`."""

from ..layout import qcat, qsplit
from .attention import AQCFBlock
from .conv import (
    QuaternionConv1d,
    QuaternionConv2d,
    QuaternionConv3d,
    QuaternionConvTranspose1d,
    QuaternionConvTranspose2d,
    QuaternionConvTranspose3d,
)
from .init import init_quaternion_, quaternion_init_, random_init_, unitary_init_
from .linear import QuaternionLinear
from .norm import (
    QuaternionBatchNorm1d,
    QuaternionBatchNorm2d,
    QuaternionBatchNorm3d,
    QuaternionInstanceNorm1d,
    QuaternionInstanceNorm2d,
    QuaternionInstanceNorm3d,
    quaternion_batch_norm,
    quaternion_instance_norm,
)
from .pool import (
    QuaternionAvgPool1d,
    QuaternionAvgPool2d,
    QuaternionAvgPool3d,
    QuaternionDropout,
    QuaternionMaxPool1d,
    QuaternionMaxPool2d,
    QuaternionMaxPool3d,
    quaternion_dropout,
    quaternion_max_pool,
)
from .recurrent import QuaternionLiGRU, QuaternionLSTM, QuaternionRNN
from .unit import QuaternionConvNormAct

__all__ = [
    "AQCFBlock",
    "QuaternionConv1d",
    "QuaternionConv2d",
    "QuaternionConv3d",
    "QuaternionConvNormAct",
    "QuaternionConvTranspose1d",
    "QuaternionConvTranspose2d",
    "QuaternionConvTranspose3d",
    "QuaternionLinear",
    "quaternion_init_",
    "unitary_init_",
    "random_init_",
    "init_quaternion_",
    "QuaternionRNN",
    "QuaternionLSTM",
    "QuaternionLiGRU",
    "QuaternionBatchNorm1d",
    "QuaternionBatchNorm2d",
    "QuaternionBatchNorm3d",
    "QuaternionInstanceNorm1d",
    "QuaternionInstanceNorm2d",
    "QuaternionInstanceNorm3d",
    "quaternion_batch_norm",
    "quaternion_instance_norm",
    "QuaternionMaxPool1d",
    "QuaternionMaxPool2d",
    "QuaternionMaxPool3d",
    "QuaternionAvgPool1d",
    "QuaternionAvgPool2d",
    "QuaternionAvgPool3d",
    "QuaternionDropout",
    "quaternion_max_pool",
    "quaternion_dropout",
    "qcat",
    "qsplit",
]
