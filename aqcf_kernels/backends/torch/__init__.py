"""The ``torch`` backend: composite PyTorch for both op families, any device, any floating dtype.

Always available; the registry's last resort on every device (``registry.FALLBACK``).
"""

from ..registry import register
from .attention import TorchAttentionBackend
from .conv import TorchConvBackend

register(TorchConvBackend(), family="conv")
register(TorchAttentionBackend(), family="attention")

__all__ = ["TorchAttentionBackend", "TorchConvBackend"]
