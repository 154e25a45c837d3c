"""The compiled extension ``aqcf_kernels._C``, shared by the ``cpp`` and ``cuda`` backends.

Imported once; when it is missing (not built) both backends report the same reason.
"""

from __future__ import annotations

import importlib
from types import ModuleType

try:
    _C: ModuleType | None = importlib.import_module("aqcf_kernels._C")
    IMPORT_ERROR: str | None = None
except ImportError as e:  # not built: `pip install -e . --no-build-isolation` (or `make ext`) builds it
    _C = None
    IMPORT_ERROR = f"extension aqcf_kernels._C not importable ({e}); build it with `make ext`"
