"""What the Triton launchers of both op families share: the optional import of triton, the interpreter
flag, the dtypes ``tl.dot`` takes and its configuration per dtype, how kernels are autotuned, and the
refusals both backends give.

The launchers read these as ``common.NAME`` at call time (never ``from .common import NAME``), so a
test that patches ``common.INTERPRET`` changes what every launcher and backend sees.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

from . import autotune_cache

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


#: ``AQCF_TRITON_AUTOTUNE``: ``on`` (the default) times every config that fits a call once per shape and GPU
#: and keeps the fastest, for this process and on disk for later ones (:mod:`.autotune_cache`, where
#: ``AQCF_TRITON_AUTOTUNE_CACHE=off`` keeps it in memory only); ``first`` takes the first that fits, untimed: one
#: compile and no timing trials per shape (tests, short jobs), for a kernel that may be slower, and nothing kept.
AUTOTUNE_MODES = ("on", "first")


def autotune_mode() -> str:
    """``AQCF_TRITON_AUTOTUNE``, read whenever an autotuned kernel meets a new shape."""
    mode = os.environ.get("AQCF_TRITON_AUTOTUNE", "on")
    if mode not in AUTOTUNE_MODES:
        raise ValueError(f"AQCF_TRITON_AUTOTUNE={mode!r}: expected one of {', '.join(AUTOTUNE_MODES)}")
    return mode


def compile_threads() -> int:
    """``AQCF_TRITON_COMPILE_THREADS``, default the CPUs this process may run on: how many configs of a
    kernel :func:`autotuned` compiles at once for a new shape (1: one after the other, as triton does)."""
    value = os.environ.get("AQCF_TRITON_COMPILE_THREADS", "").strip()
    if not value:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"AQCF_TRITON_COMPILE_THREADS={value!r}: expected a whole number >= 1")
    return int(value)


def precompile(kernel, configs: list, named_args: dict, meta: dict) -> None:
    """Compile ``kernel`` for each of ``configs`` with the arguments of the call being tuned, on
    :func:`compile_threads` threads (triton's ``AsyncCompileMode``: its compiler passes and ptxas run
    outside the GIL), so that autotuning then times compiled kernels instead of compiling each in turn
    (about a second each). Nothing is launched. A config that fails to compile is left for the autotuner,
    which rates it as it always does; if the parallel compile itself fails, a warning says so and each
    config compiles when the autotuner first runs it."""
    threads = min(len(configs), compile_threads())
    if threads < 2:
        return
    try:
        from triton.runtime._async_compile import AsyncCompileMode

        args = list(named_args.values())  # the call's positional arguments, in order
        # the constexprs of the call (the autotuner's run() also gets the launch's grid and warmup flag)
        constexprs = {k: v for k, v in meta.items() if k not in ("grid", "warmup")}
        with ThreadPoolExecutor(threads) as pool, AsyncCompileMode(pool, ignore_errors=True):
            for config in configs:
                kernel.warmup(*args, grid=(1,), **constexprs, **config.all_kwargs())
    except Exception as e:  # noqa: BLE001  (an optimisation: the autotuner compiles what is missing)
        warnings.warn(
            f"aqcf_kernels: compiling {len(configs)} configs of {kernel.fn.__name__} in parallel failed ({e!r}); "
            "the autotuner compiles them one at a time",
            RuntimeWarning,
            stacklevel=2,
        )


#: Every kernel built by :func:`autotuned`, by the kernel's name: ``(its autotuner, its GPU configs)``
#: (tests/triton_kernels/test_autotune_configs.py runs each config of each).
AUTOTUNED: dict[str, tuple[object, list]] = {}


def autotuned(kernel, *, gpu_configs: list, interpreter_config: dict, key: list, prune=None, **kwargs):
    """``kernel`` behind ``triton.autotune``: over ``gpu_configs`` (those ``prune(configs, named_args,
    **meta)`` keeps for a call, all if ``None``) on a GPU, or one config of ``interpreter_config`` under the
    interpreter (interpreted programs cost per program, not per element: big tiles), so CPU tests run the
    launchers the GPU runs. The configs kept for a new shape are compiled in parallel first
    (:func:`precompile`); :func:`autotune_mode` ``first`` keeps the first fitting config and times
    nothing. ``kwargs`` go to ``triton.autotune`` (``reset_to_zero``).

    Returns a :class:`TunedLauncher` (launched as ``launcher[grid](*args, **constexprs)``, as the
    autotuner is); ``AUTOTUNED`` holds the autotuner itself."""
    if INTERPRET:
        tuner = triton.autotune(configs=[triton.Config(interpreter_config)], key=key, **kwargs)(kernel)
    else:
        tuner = _gpu_autotuned(kernel, gpu_configs, key, prune, **kwargs)
    AUTOTUNED[kernel.fn.__name__] = (tuner, gpu_configs)
    return TunedLauncher(tuner)


class TunedLauncher:
    """An autotuned kernel's launches: a call whose key the autotuner has already tuned (in this process, or
    in an earlier one: :mod:`.autotune_cache`) launches the JIT kernel with the config it chose; any other call
    (a new key, a one-config set) goes through the autotuner, and a choice it timed is kept on disk.

    Why: triton 3.6's ``Autotuner.run`` rebuilds its key on every launch by filtering all of the call's
    arguments against its list of argument names (quadratic in their number: the implicit GEMM has 58),
    ~30 µs a launch on a 2-core EPYC, as much again as the JIT's own launch path; a small layer's training
    step launches three autotuned kernels, and there the device's work is tens of microseconds.

    The key is the autotuner's own (the key arguments' values, then the dtype of each argument that has one,
    in the same order) and the choice its own ``cache``, so what runs is what ``tuner.run`` would launch:
    clearing or patching the autotuner's cache or configs (tests do) takes effect here too. A config with a
    ``pre_hook`` always goes through the autotuner, which runs the hook."""

    def __init__(self, tuner) -> None:
        self.tuner = tuner
        self._names = frozenset(tuner.arg_names)
        self._positions = {name: i for i, name in enumerate(tuner.arg_names)}

    def key(self, args: tuple, kwargs: dict) -> tuple:
        """The autotuner's cache key of a launch with ``args`` and ``kwargs`` (``Autotuner.run``'s: the key
        arguments' values, then the dtype of each argument that has one, positional ones first; each looked up
        by position rather than by building the autotuner's dict of all arguments: 2.8 µs instead of 5.3)."""
        names, count = self._names, len(args)
        values = []
        for name in self.tuner.keys:
            if name in kwargs and name in names:
                values.append(kwargs[name])
            elif self._positions.get(name, count) < count:
                values.append(args[self._positions[name]])
        values += [str(v.dtype) for v in args if hasattr(v, "dtype")]
        values += [str(v.dtype) for k, v in kwargs.items() if k in names and hasattr(v, "dtype")]
        return tuple(values)

    def tuned_config(self, args: tuple, kwargs: dict):
        """The config a launch with ``args`` and ``kwargs`` runs if its key is tuned (the only one of a
        one-config set), else ``None``: a launcher that sizes buffers by the config asks before launching and
        learns what ran after."""
        if len(self.tuner.configs) == 1:
            return self.tuner.configs[0]
        return self._chosen(self.key(args, kwargs))

    def _chosen(self, key: tuple):
        """The autotuner's choice for ``key``: in its cache, else (``on`` mode) kept on disk by an earlier
        process (:mod:`.autotune_cache`), which then goes into its cache; ``None`` if the key is untuned."""
        config = self.tuner.cache.get(key)
        if config is None and autotune_mode() == "on":
            config = autotune_cache.load(self.tuner, key)
            if config is not None:
                self.tuner.cache[key] = config
        return config

    def __getitem__(self, grid) -> Callable[..., object]:
        return lambda *args, **kwargs: self.run(grid, *args, **kwargs)

    def run(self, grid, *args, **kwargs) -> object:
        """Launch on ``grid`` (a tuple, or a function of the launch's arguments and config) with ``args`` and
        the constexprs ``kwargs``: what ``tuner[grid](*args, **kwargs)`` launches."""
        tuner = self.tuner
        if len(tuner.configs) == 1:
            return tuner.run(*args, grid=grid, warmup=False, **kwargs)
        key = self.key(args, kwargs)
        config = self._chosen(key)
        if config is not None and config.pre_hook is None:
            return tuner.fn.run(*args, grid=grid, warmup=False, **kwargs, **config.all_kwargs())
        result = tuner.run(*args, grid=grid, warmup=False, **kwargs)
        if config is None and autotune_mode() == "on" and key in tuner.cache:  # timed now: kept for later processes
            autotune_cache.store(tuner, key, tuner.cache[key])
        return result


#: CUDA's limit on a launch grid's second and third axes (the first may reach 2**31 - 1). Triton passes the
#: grid to cuLaunchKernel as it is, and the launch fails above it.
GRID_YZ_MAX = 65535


def axis_slices(total: int) -> list[tuple[int, int]]:
    """``(first, count)`` slices of a grid axis of ``total`` programs, none longer than :data:`GRID_YZ_MAX`:
    a launcher whose axis 1 or 2 runs over samples, statistic groups or (batch, head) pairs, which have no
    bound of their own (a batch norm on ``(N, C)`` features puts N there), launches once per slice and the
    kernel adds ``first`` to its program id. One slice, from 0, in every ordinary case (and for ``total``
    0, an empty launch as before)."""
    if total <= GRID_YZ_MAX:  # the usual case, without a range (a launch's host time counts)
        return [(0, total)]
    return [(first, min(GRID_YZ_MAX, total - first)) for first in range(0, total, GRID_YZ_MAX)]


def cdiv(a: int, b: int) -> int:
    """``⌈a / b⌉`` for the launchers' host code. ``triton.cdiv`` is a ``constexpr_function`` since triton 3.5:
    called from Python it unwraps its arguments first, ~1.6 µs a call against ~0.02 µs (2-core EPYC), and a
    training step's grids and splits take a few dozen."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two ``>= n`` (0 for ``n <= 0``, as triton's) for host code: ``triton.next_power_of_2``
    is a ``constexpr_function`` too (see :func:`cdiv`)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def _gpu_autotuned(kernel, gpu_configs: list, key: list, prune, **kwargs):
    """:func:`autotuned` on a GPU: the kept configs precompiled, then timed (neither in ``first`` mode)."""

    # whether the prune of the call being tuned (in this thread) kept one config: triton times it all the same
    # (a do_bench of ~0.125 s: 16q fast8's kernels at the GPU targets' shapes keep one each)
    pruned = threading.local()

    def early_config_prune(configs: list, named_args: dict, **meta) -> list:
        kept = prune(configs, named_args, **meta) if prune is not None else configs
        if autotune_mode() == "first":
            kept = kept[:1]
        pruned.lone = len(kept) == 1
        if not pruned.lone:
            precompile(kernel, kept, named_args, meta)
        return kept

    def do_bench(kernel_call, quantiles):
        if getattr(pruned, "lone", False):  # one config left: nothing to compare, nothing to launch
            return [0.0] * len(quantiles)
        return triton.runtime.driver.active.get_benchmarker()(kernel_call, quantiles=quantiles)

    return triton.autotune(
        configs=gpu_configs,
        key=key,
        prune_configs_by={"early_config_prune": early_config_prune},
        do_bench=do_bench,
        **kwargs,
    )(kernel)


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
