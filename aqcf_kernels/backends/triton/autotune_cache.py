"""The Triton autotuner's choices kept on disk, so that a new process launches a tuned shape's config at once.

Triton's autotuner remembers what it timed for the life of a process. Each new process on a GPU then
times every config that fits each new shape again: one trial is triton's ``do_bench`` (25 ms of warm-up,
100 ms of repetitions), and the launchers compile all kept configs before timing them (``common.precompile``),
so a training run, a resumed one, each fold and each ``aqcf-predict`` paid seconds per shape before its
first step (and each stage of ``benchmarks/gpu_suite.sh`` paid it again). This file keeps, for each
autotuned kernel and key, the config its timing chose; :class:`.common.TunedLauncher` looks a new key up
here before tuning it, and writes what it tuned.

An entry is only valid for what its choice depended on:

* the file is one per :func:`aqcf_kernels.tuning.fingerprint` (torch, triton and package versions);
* its key names the kernel, the hash of its source and of the functions it calls (the JIT's
  ``cache_key``), the GPU (name, SM count, compute capability), the hash of the kernel's whole config
  set, and the autotuner's own key of the call (the key arguments' values and the dtypes);
* it stores the chosen config as triton prints it; a config no longer in the set is not used.

Where: ``AQCF_TRITON_AUTOTUNE_CACHE`` (a file, or ``off``), by default ``aqcf_kernels/autotune-<fingerprint>.json``
under triton's own cache directory (``TRITON_CACHE_DIR``, default ``~/.triton/cache``), beside the compiled
kernels whose timings it holds: clearing one clears both. Writes are the tuning cache's (atomic, locked).
Only ``AQCF_TRITON_AUTOTUNE=on`` reads or writes it; ``first`` chooses without timing and keeps nothing.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
from pathlib import Path
from typing import Any

from ... import tuning

#: path -> the file's entries as read (one read per path and process; our own writes are added to it).
_loaded: dict[Path, dict[str, dict[str, Any]]] = {}
#: ``(id(tuner), key)`` of each choice this process took from the file rather than timed (reports say which)
from_disk: set[tuple[int, tuple]] = set()


def _is_config_entry(entry: Any) -> bool:
    return isinstance(entry, dict) and isinstance(entry.get("config"), str)


def cache_path() -> Path | None:
    """The file of kept configs (``None``: none)."""
    configured = tuning.configured_cache_path("AQCF_TRITON_AUTOTUNE_CACHE")
    if configured is not False:
        return configured
    import triton

    return Path(triton.knobs.cache.dir) / "aqcf_kernels" / f"autotune-{tuning._fingerprint_hash()}.json"


@functools.cache
def _gpu(device_index: int) -> str:
    """The GPU a choice was timed on: its name, SM count and compute capability."""
    import torch

    props = torch.cuda.get_device_properties(device_index)
    return f"{props.name}/{props.multi_processor_count}sm/{props.major}.{props.minor}"


def source_hash(fn) -> str:
    """The hash of a kernel's source: triton's JIT ``cache_key`` (its source and the functions it calls), or
    under the interpreter (tests build GPU autotuners there) the hash of the Python function's source."""
    key = getattr(fn, "cache_key", None)
    if key is None:
        key = hashlib.sha256(inspect.getsource(fn.fn).encode()).hexdigest()
    return key[:16]


def _kernel_identity(tuner) -> str:
    """The kernel's name, the hash of its source, and that of its config set."""
    configs = hashlib.sha256("\n".join(str(c) for c in tuner.configs).encode()).hexdigest()[:16]
    return f"{tuner.fn.fn.__name__}:{source_hash(tuner.fn)}:{configs}"


def current_gpu() -> str:
    """The GPU that triton launches on now (its current device)."""
    import triton

    return _gpu(triton.runtime.driver.active.get_current_device())


def entry_key(tuner, key: tuple) -> str:
    """The file's key for the autotuner's ``key`` of a call, on the current GPU."""
    # (hashed at each new key, ~10 µs: the config set may change, as tests patch it)
    return f"triton:{_kernel_identity(tuner)}:{current_gpu()}:{key!r}"


def _entries(path: Path) -> dict[str, dict[str, Any]]:
    if path not in _loaded:
        _loaded[path] = tuning.read_cache_file(path, _is_config_entry)
    return _loaded[path]


def load(tuner, key: tuple):
    """The config kept for ``key`` by an earlier process (a member of ``tuner.configs``), or ``None``."""
    path = cache_path()
    if path is None:
        return None
    entry = _entries(path).get(entry_key(tuner, key))
    if entry is None:
        return None
    config = next((c for c in tuner.configs if str(c) == entry["config"]), None)
    if config is not None:
        from_disk.add((id(tuner), key))
    return config


def store(tuner, key: tuple, config) -> None:
    """Keep ``config``, which the autotuner's timing chose for ``key``."""
    path = cache_path()
    if path is None or config.pre_hook is not None:  # (a hook is code: not kept, as triton's own disk cache)
        return
    name, entry = entry_key(tuner, key), {"config": str(config)}
    tuning.write_cache_entry(path, name, entry)
    _entries(path)[name] = entry


def forget() -> None:
    """Drop what this process read from the files (the next lookup reads them again)."""
    _loaded.clear()
    from_disk.clear()
