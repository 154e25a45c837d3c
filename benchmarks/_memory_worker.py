"""Peak-memory worker: ``python -m benchmarks._memory_worker MODULE OUT.json < payload.json``.

Pins glibc's mmap threshold before anything imports torch, then writes
``MODULE.measure_memory(payload, pinned)`` as JSON to OUT.json. Started by
:func:`benchmarks.common.measure_memory_in_subprocess`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import importlib
import json
import sys
from pathlib import Path

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD = 128 * 1024  # glibc's default starting value


def pin_mmap_threshold() -> bool:
    """Pin glibc's mmap threshold at 128 KiB; ``False`` where that is impossible (not glibc).

    Every buffer from 128 KiB up then gets its own mapping, given back to the kernel when freed,
    so the RSS follows the live buffers. With glibc's default *dynamic* threshold, big buffers
    land on the heap once one was freed, and the RSS growth of one step varied up to 2x from rep
    to rep. It must happen before torch allocates anything (setting it later left the heap's
    free chunks in play, and the noise), cannot be undone and slows allocation (a page fault per
    fresh page): hence a process of its own, after the timing.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False


def main() -> int:
    pinned = pin_mmap_threshold()
    module_name, out = sys.argv[1], Path(sys.argv[2])
    payload = json.loads(sys.stdin.read())
    module = importlib.import_module(module_name)
    # What the imports made lives as long as the process: frozen, the full collection before each
    # measured step scans only what the steps left (~0.1 s a collection with torch loaded, 15 of them
    # for one case of five providers).
    gc.freeze()
    result = module.measure_memory(payload, pinned)
    # Frozen objects are never collected, not even at exit, where triton's nanobind bindings then
    # print ~60 lines of "leaked instances/types/functions" to stderr: thawed, shutdown frees them.
    gc.unfreeze()
    out.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
