"""How the pipeline's inference commands ask the C library to manage memory (``--malloc``).

glibc's malloc gives every allocation above its mmap threshold (which grows to 32 MiB at most) fresh
pages from the kernel and hands them back on free, so each large feature map pays a page fault per
4 KiB page on its first write, every time: on an Intel Xeon, allocating and filling a
1×64×64³ float tensor took 14.8 ms, the fill alone 1.4 ms. Sliding-window inference allocates maps
of that size for every window. ``keep`` tells malloc to serve everything from its heap and never
return freed memory to the kernel (``mallopt(M_MMAP_MAX, 0)``, ``mallopt(M_TRIM_THRESHOLD, 2 GiB)``;
the same as the environment variables ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647``, and
what jemalloc or tcmalloc preloaded by PyTorch's ``torch.backends.xeon.run_cpu`` launcher are for):
``aqcf-predict`` on a LiTS-sized CT went from 62.5 to 52.1 s, peak RSS 1539 → 1803 MiB. A training
step barely changes (2D 128² B4: 720 vs 729 ms), so ``aqcf-train`` leaves the allocator alone.

The setting is process-wide and cannot be undone for memory already kept; the library itself never
changes it: only the commands do, when asked (their default), and a program may call
:func:`keep_freed_memory` itself.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import platform
import sys

log = logging.getLogger(__name__)

MALLOC_CHOICES = ("keep", "default")
MALLOC_HELP = (
    "keep (default): the C library keeps freed memory for reuse, so large feature maps stop paying page "
    "faults (glibc on Linux; ~17%% faster CPU inference, ~15%% more peak memory); default: its own behaviour"
)

# glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_KEEP_UP_TO = 2**31 - 1  # bytes of free memory at the top of the heap kept instead of trimmed


def keep_freed_memory() -> str | None:
    """Make glibc's malloc serve every allocation from its heap and keep freed memory (see the module
    docstring). Returns None when set, else why it could not be (not glibc, ``mallopt`` refused)."""
    if not sys.platform.startswith("linux"):
        return f"the allocator setting is for glibc on Linux, not {sys.platform}"
    libc_name, _ = platform.libc_ver()
    if libc_name != "glibc":
        return f"the C library is {libc_name or 'not identified'}, not glibc"
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process runs on
    except (OSError, AttributeError) as e:
        return f"mallopt is not available: {e}"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(_M_MMAP_MAX, 0) != 1 or mallopt(_M_TRIM_THRESHOLD, _KEEP_UP_TO) != 1:
        return "mallopt refused the setting"
    return None


def add_malloc_argument(parser: argparse.ArgumentParser) -> None:
    """``--malloc keep|default`` (default keep) on an inference command's parser."""
    parser.add_argument("--malloc", choices=MALLOC_CHOICES, default="keep", help=MALLOC_HELP)


def apply_malloc_choice(choice: str) -> str | None:
    """What ``--malloc`` asks for; ``keep`` where it cannot be set is logged (debug) and ignored.
    Returns why ``keep`` could not be set (None when it was, or for ``default``)."""
    if choice not in MALLOC_CHOICES:
        raise ValueError(f"--malloc must be one of {', '.join(MALLOC_CHOICES)}, got {choice!r}")
    if choice != "keep":
        return None
    problem = keep_freed_memory()
    if problem is not None:
        log.debug("--malloc keep not applied: %s", problem)
    return problem


__all__ = ["MALLOC_CHOICES", "add_malloc_argument", "apply_malloc_choice", "keep_freed_memory"]
