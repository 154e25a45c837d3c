"""What the Triton launchers of both op families share: the optional import of triton, the interpreter
flag, the dtypes ``tl.dot`` takes and its configuration per dtype, and the refusals both backends give.

The launchers read these as ``common.NAME`` at call time (never ``from .common import NAME``), so a
test that patches ``common.INTERPRET`` changes what every launcher and backend sees.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

#: Run the kernels in triton's interpreter, on CPU tensors. Read once: the interpreter must be chosen
#: before triton compiles anything, so set ``TRITON_INTERPRET=1`` before importing ``aqcf_kernels``.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

try:
    import triton
    import triton.language as tl

    IMPORT_ERROR: str | None = None
except ImportError as e:  # triton is optional (the `dev` extra, or a CUDA torch, brings it)
    triton = None
    tl = None
    IMPORT_ERROR = f"triton not importable ({e})"

#: The input dtypes the kernels take (``tl.dot`` has no float64).
DOT_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def dot_config(dtype: torch.dtype) -> tuple[object, str]:
    """``(DOT_DTYPE, PRECISION)`` of the kernels' ``tl.dot`` for inputs of ``dtype``."""
    if INTERPRET:  # bf16 arithmetic is wrong in the interpreter: dot in fp32 there
        return tl.float32, "ieee"
    if dtype == torch.float32:
        # TF32 only on request (torch.backends.cuda.matmul.allow_tf32, off by default), not on
        # cudnn.allow_tf32: that one defaults to True and would cost fp32 callers three digits.
        return tl.float32, "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return (tl.float16 if dtype == torch.float16 else tl.bfloat16), "ieee"


def unavailable() -> str | None:
    """Why the Triton kernels cannot run on this machine (``None`` if they can)."""
    if IMPORT_ERROR:
        return IMPORT_ERROR
    if not INTERPRET and not torch.cuda.is_available():
        return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU)"
    return None


def cannot_serve_tensor(t: Tensor) -> str | None:
    """Why the kernels cannot take tensors like ``t`` (its device or dtype), ``None`` if they can."""
    if t.device.type == "cpu" and not INTERPRET:
        return "serves CPU tensors only under TRITON_INTERPRET=1"
    if t.dtype not in DOT_DTYPES:
        return f"no tl.dot in {t.dtype} (fp32/fp16/bf16 only)"
    return None


def serves_fused(t: Tensor) -> bool:
    """Whether the Triton kernels of a fused op that dispatches outside the backend registry (the norm
    ``aqcf::qnorm``, the recurrence ``aqcf::rnn_sequence``) take tensors on ``t``'s device: CUDA tensors
    whenever triton imports; CPU tensors only under ``TRITON_INTERPRET=1`` with the ``triton`` backend
    forced (``AQCF_BACKEND=triton`` or ``backends.use("triton")``), since the compiled C++ kernels serve
    CPU otherwise and the interpreter is only there to prove the kernels without a GPU. Each op adds its
    own dtype and shape conditions."""
    if IMPORT_ERROR is not None:
        return False
    if t.device.type == "cuda":
        return not INTERPRET
    if t.device.type != "cpu" or not INTERPRET:
        return False
    from ..registry import forced  # (the registry imports the backends: not at module level)

    return forced() == "triton"
