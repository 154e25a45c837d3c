"""The ``triton`` backend: Triton kernels for both op families (GPU; CPU under ``TRITON_INTERPRET=1``).

``conv_kernels.py`` / ``attention_kernels.py`` hold the ``@triton.jit`` kernels, ``conv.py`` /
``attention.py`` their launchers and the backend classes, ``common.py`` what both share. Without
triton installed the package still imports and registers both backends, which then report why they
are unavailable.
"""

from ..registry import register
from .attention import TritonAttentionBackend
from .conv import TritonConvBackend

register(TritonConvBackend(), family="conv")
register(TritonAttentionBackend(), family="attention")

__all__ = ["TritonAttentionBackend", "TritonConvBackend"]
