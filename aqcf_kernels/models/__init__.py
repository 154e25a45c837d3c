"""Networks built from :mod:`aqcf_kernels.nn`: the A-QCF-Net liver-tumour segmentation model (arXiv 2512.21760)."""

from .aqcfnet import AQCFNet
from .layers import RealAQCFBlock
from .options import AQCFNetOptions, ArchitectureOptions

__all__ = ["AQCFNet", "AQCFNetOptions", "ArchitectureOptions", "RealAQCFBlock"]
