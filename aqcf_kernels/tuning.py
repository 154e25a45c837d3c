"""``algorithm='auto'`` by measurement: time the candidates once per call signature, keep the fastest.

cuDNN's ``benchmark`` mode, for our (backend, algorithm) pairs. The first call with a new
signature (the op kind — forward, input gradient or weight gradient —, the device and its model,
dtype, shapes, conv hyper-parameters, memory format and thread count) runs every candidate the
accuracy contract allows and the heuristic prior did not rule out, once, and returns the fastest's
result. A first run is cold, so that choice is provisional while a runner-up is within
:data:`CLEAR_LOSS` (or lost by less than :data:`CLEAR_LOSS_MIN_S`): the next calls of the signature are
computed by the candidates still in the running in turn, each timed (:data:`REFINE_SAMPLES` warm timings
for the leader and candidates within :data:`DOUBT_MARGIN` of it, one for the others), then the best
times decide. A close call
(a runner-up still within :data:`DOUBT_MARGIN`) is confirmed once the process is steady: the leader
computes the next :data:`CONFIRM_AFTER` calls, then the close candidates are timed again, in rounds
(each computes one call per round), until the median over rounds of each one's time over the
leader's in the same round is clear (:data:`CONFIRM_EVIDENCE`) or :data:`CONFIRM_MAX_ROUNDS` have
been taken: those paired ratios alone decide. Then the choice is remembered: in-process, and in an on-disk
cache keyed by a machine fingerprint (CPU model, torch, triton and package versions), so the next
process on the same machine measures nothing, unless a remembered winner's first call there runs
:data:`STALE_SPEEDUP` times faster than the time it was chosen with (it was measured beside another
job): that signature is measured again.
Those later calls do the layer's real work, so measuring costs only the other candidates' first
runs plus their difference to the winner on a few calls (``tools/tuning_cost.py``, README).

The switch: ``aqcf_kernels.tuning.mode = 'measure' | 'heuristic'`` (environment:
``AQCF_TUNING``); ``heuristic`` is the fixed rule of :mod:`aqcf_kernels.backends.policy`, which
is also used wherever nothing can be timed (fake tensors, CUDA graph capture) or results must not
depend on timing (``torch.use_deterministic_algorithms(True)``), and prunes hopeless candidates before
measuring. The cache file is ``AQCF_TUNING_CACHE`` (``off`` for none; default
``$XDG_CACHE_HOME/aqcf_kernels/tuning-<fingerprint>.json``). Writes are atomic (temporary file,
then rename, under a file lock where the OS has one), so concurrent processes and DDP ranks never
corrupt it; a corrupt or foreign file is ignored with one warning and rewritten.

Silent by default; ``logging.getLogger("aqcf_kernels.tuning").setLevel(logging.DEBUG)`` shows each
choice with its timings.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import types
import warnings
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

__all__ = [
    "MODES",
    "HALF_FAST8",
    "half_fast8",
    "half_fast8_allowed",
    "Candidate",
    "Choice",
    "mode",
    "choose",
    "lookup",
    "measuring",
    "recall",
    "steady_leader",
    "clear",
    "cache_path",
    "cpu_model",
    "fingerprint",
    "using",
]

MODES = ("measure", "heuristic")
log = logging.getLogger(__name__)
T = TypeVar("T")

#: 'measure' (default) or 'heuristic'; read from ``AQCF_TUNING`` at import.
mode: str = os.environ.get("AQCF_TUNING", "measure").strip().lower() or "measure"
if mode not in MODES:
    warnings.warn(f"AQCF_TUNING={mode!r} is not one of {MODES}; using 'measure'", stacklevel=1)
    mode = "measure"

#: Whether ``algorithm='auto'`` may consider fast8 in half precision (fp16/bf16), where its error is
#: bounded only on balanced components (DESIGN.md's contract): ``'never'`` (default) or ``'balanced'``: for
#: a call whose operands' component scales are within :data:`HALF_FAST8_MIN_BALANCE` of each other
#: (:func:`aqcf_kernels.quaternion.component_balance`, checked on every such call: a sampled reduction and,
#: on a GPU, one wait for the device per call; what it costs: README). Read from ``AQCF_FAST8_HALF``.
HALF_FAST8 = ("never", "balanced")
half_fast8: str = os.environ.get("AQCF_FAST8_HALF", "never").strip().lower() or "never"
if half_fast8 not in HALF_FAST8:
    warnings.warn(f"AQCF_FAST8_HALF={half_fast8!r} is not one of {HALF_FAST8}; using 'never'", stacklevel=1)
    half_fast8 = "never"
#: The smallest component RMS over the largest (of the input, and of the weight where it is an operand)
#: at which the guard lets fast8 run in half precision. Measured (64q 3x3, float64 reference, fast8's
#: kernel numerics: combinations rounded to the dtype once, fp32 accumulation, in bf16 and fp16 alike):
#: the worst component's error is 1.3x the expanded conv's at equal scales, 1.7x at 0.5, 2.0x at 0.4,
#: 2.6x at 0.3, 7x at 0.1 (whole-tensor error 1.3-1.5x throughout).
HALF_FAST8_MIN_BALANCE = 0.5

# A candidate more than this factor slower than the best on its first run is dropped; the others are
# timed again, warm, on later calls. The first run is cold (oneDNN primitive creation, first-touch
# page faults of new buffers): on small layers that alone made a candidate 1.4-1.6x slower than its
# warm self (1d 16q N8 1024: hamilton 6.5 ms cold, 3.0 ms warm), so a tighter factor dropped the
# faster candidate.
CLEAR_LOSS = 2.5
# ... and by more than this many seconds: a cold first run costs milliseconds whatever the layer's size,
# so on a small layer the cold pair loses by any factor. A 2d 4q N2 8x8 forward on the 2-core EPYC:
# hamilton's first run (oneDNN's primitive for a new shape) took over 3.4 ms, 2.5x fast8's cold
# 1.3 ms, and was dropped, while warm it takes 0.085 ms against fast8's 0.29: auto ran fast8 at 3.4x
# hamilton's time (2026-12-04). Below this, the loser gets its one warm re-check (under ~20 ms, once).
CLEAR_LOSS_MIN_S = 0.02

# A choice remembered on disk is checked on its first call in a process: the call is timed, and if the
# winner ran this many times faster than the time it was chosen with, that measurement was taken in
# other conditions and the signature is measured again (the call itself counts, cold as it is, so the
# check errs towards keeping). Another job on one of the two cores slows oneDNN's multi-threaded conv
# far more than fast8's item-scheduled products: on an Intel Xeon a 3d 8q 1x32³ forward measured beside
# a running test suite was remembered as fast8 16.0 ms against hamilton 30.9, and quiet it took fast8
# 7.9 against hamilton's 4.9 ms in every later process (2026-12-05).
STALE_SPEEDUP = 1.5

# Candidates whose best times are within this fraction of the fastest are a tie, and a tie goes to
# the prior (the heuristic's pick). Two timings per candidate cannot separate closer pairs on a
# machine that runs anything else: repeated measurements of the same 1d 16q layer flipped between
# hamilton and fast8 for the gradients (11.8 vs 12.0 ms), and a flip is not free inside a training
# step, where the algorithms' working sets meet (benchmarks/results, issue 12).
TIE_MARGIN = 0.05

# After the first runs, the candidates within CLEAR_LOSS are timed on the next calls of the
# signature, which they compute in turn (the leader most often): REFINE_SAMPLES warm timings for the
# leader and every candidate within DOUBT_MARGIN of it, one for the others (a re-check of a first
# run that may have been cold). Who is close is decided again after every warm timing, on the best
# times so far: a runner-up whose first run was cold and whose one warm re-check lands close to the
# leader gets the full REFINE_SAMPLES too, as does the leader. With one re-check each, a tiny layer's
# choice was one sample against one (2d 16q N8 16x16 input gradient on an Intel Xeon: fast8 0.93 ms
# cold-first, hamilton 2.05 cold then 0.72 warm; which won flipped between runs, and fast8 was 13%
# slower in the step). Then the best times decide (the tie rule above still applies) and the choice
# is remembered. Those calls do the layer's real work, so they cost only the difference
# between the candidates, not extra calls.
# Why several warm timings where candidates are close: a fresh process's first call is timed while
# threads, allocator and oneDNN's JIT are still warming up: on the 2-core EPYC the 1d 16q N8 1024
# forward picked fast8 in 8 of 8 fresh processes (hamilton measured 5.0-5.6 ms against its warm
# ~4 ms) and hamilton in 28 of 30 measurements later in one process, while a 40-rep A/B put fast8
# at 1.33x hamilton's time. Why not a second round on the first call, as before: it ran every
# candidate twice there, 3.1-4.4 calls of the layer on top of the call itself (2026-12-02).
DOUBT_MARGIN = 0.25
REFINE_SAMPLES = 3

# A close call (a runner-up within DOUBT_MARGIN after the warm timings) is decided again on fresh
# timings after the leader has computed this many more calls of the signature. The warm timings
# above are still taken in a process's first calls of a layer, while the allocator is settling:
# with glibc's default malloc (its mmap threshold grows as big buffers are freed) the 1d 16q N8
# 1024 forward kept fast8 (6.0 ms in the benchmark) against hamilton's 5.2 ms in the full grid on
# the EPYC and on the Xeon (2026-12-03), while with --malloc keep it chose hamilton on both. Only
# fresh timings decide then, not the best over all: a candidate's early best may be the one that
# the steady state no longer gives. It costs REFINE_SAMPLES runs of each runner-up, each within
# DOUBT_MARGIN of the leader's time, and, where the confirmation overturns the leader, the steady
# calls that the then slower pair computed.
CONFIRM_AFTER = 10

# The confirmation round's statistic and length. Each round times every close candidate once, in an
# order that rotates between rounds; a candidate's standing is the median over rounds of its time
# over the leader's in the same round (the benchmark's own statistic, benchmarks.common.paired_ratio).
# Why not the best time, as the warm timings use: a small layer's time under glibc's default malloc
# is skewed by page faults, and unevenly between algorithms (1d 16q N8 1024 forward on the EPYC,
# 200 reps: hamilton 1.6-2.1 ms, fast8 2.0-4.7 ms): fast8's best of three came out ahead of hamilton's
# although its median was 1.7x hamilton's, and auto ran fast8 at 0.87x of hamilton (2026-12-04).
# How many rounds: at least REFINE_SAMPLES, then until rounds * |ln(ratio)| reaches CONFIRM_EVIDENCE
# for every candidate, at most CONFIRM_MAX_ROUNDS. What a round costs over the winner's own call is
# its losers' excess (ratio - 1), so the round stops early where that is large: a loser at 1.25x is
# out after 3 rounds (0.75 calls, as the three best-time samples cost before), at 1.10x after 4 (0.4),
# at 1.05x after 7 (0.35); closer than 1.034x it runs all 9 (under 0.31) and a tie goes to the prior.
CONFIRM_EVIDENCE = 0.3
CONFIRM_MAX_ROUNDS = 9


def max_provisional_calls(candidates: int) -> int:
    """The most calls of a signature, after its first, that a measured choice among ``candidates``
    pairs stays provisional: every candidate's warm timings, the steady calls, the confirmation."""
    return 2 * candidates * REFINE_SAMPLES + CONFIRM_AFTER + candidates * CONFIRM_MAX_ROUNDS


@dataclass(frozen=True)
class Candidate:
    """One way to compute a call: a backend and an algorithm."""

    backend: str
    algorithm: str

    def __str__(self) -> str:
        return f"{self.backend}/{self.algorithm}"


@dataclass
class _Refining:
    """A provisional choice: the close candidates' best times so far and the samples still to take."""

    prior: Candidate
    best: dict[Candidate, float]  # (inf: no timing yet in this round)
    taken: dict[Candidate, int]  # warm timings taken so far (the first, maybe cold, run not counted)
    fast_key: Hashable | None
    steady_calls_left: int = 0  # calls the leader computes, untimed, before the confirmation round
    # who computes those calls: the warm timings' winner; set once the confirmation round is open
    leader: Candidate | None = None
    rounds: list[dict[Candidate, float]] | None = None  # the confirmation's rounds (None: not open)

    def left(self) -> dict[Candidate, int]:
        """The warm timings each candidate still needs, by who is close to the leader now."""
        leader = min(self.best, key=lambda c: self.best[c])
        return {c: n - self.taken[c] for c, n in _samples(self.best, leader).items() if n > self.taken[c]}


@dataclass(frozen=True)
class Choice:
    """What :func:`choose` decided, and how."""

    candidate: Candidate  # what computes this call
    # 'measured', 'refining' (provisional: later calls still time), 'outrun' (the last refining call,
    # computed by a candidate that lost: later calls run the winner), 'cached', 'stale' (a cached choice
    # that ran far faster than the time it was chosen with: later calls measure again, STALE_SPEEDUP),
    # 'heuristic', 'only'
    how: str
    timings_ms: dict[str, float] | None = None

    @property
    def final(self) -> bool:
        """Whether later calls of the signature run ``candidate`` too, so a caller may remember it."""
        return self.how not in ("refining", "outrun", "stale")


_listeners: list[Callable[[], None]] = []


def on_change(listener: Callable[[], None]) -> None:
    """Call ``listener()`` whenever a choice made so far may no longer hold: the mode changed or the
    remembered choices were cleared. (The compiled extension serves remembered choices without asking
    this module again; aqcf_kernels.backends listens to drop them.)"""
    _listeners.append(listener)


def _changed() -> None:
    for listener in _listeners:
        listener()


#: the module's settings, checked and announced on assignment: name -> (what the error calls it, choices)
_SETTINGS = {"mode": ("tuning mode", MODES), "half_fast8": ("tuning.half_fast8", HALF_FAST8)}


def _set(name: str, value: str) -> None:
    what, choices = _SETTINGS[name]
    if value not in choices:
        raise ValueError(f"{what} must be one of {choices}, got {value!r}")
    globals()[name] = value
    _changed()


def _set_mode(new_mode: str) -> None:
    _set("mode", new_mode)


def half_fast8_allowed(input: torch.Tensor, weight: torch.Tensor | None = None) -> bool:
    """Whether ``auto`` may consider fast8 for a half-precision call on these operands (``weight=None``: it
    is not an operand of the call, as for a weight gradient): :data:`half_fast8` is ``'balanced'``, the data
    can be read (not while tracing or capturing a graph) and every operand's components are balanced."""
    if half_fast8 != "balanced" or not can_time([input]):
        return False
    from .quaternion import component_balance

    balance = component_balance(input)
    if weight is not None:
        balance = min(balance, component_balance(weight, dim=0))
    return balance >= HALF_FAST8_MIN_BALANCE


@contextlib.contextmanager
def using(new_mode: str) -> Iterator[None]:
    """Run the block with ``tuning.mode = new_mode``."""
    old = mode
    _set_mode(new_mode)
    try:
        yield
    finally:
        _set_mode(old)


# ------------------------------------------------------------------------------------------------
# Machine fingerprint and the on-disk cache
# ------------------------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), as the cache fingerprint and the benchmarks record it."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


_FINGERPRINT: dict[str, Any] | None = None

#: The version of the measuring rules above: a cached choice made under other rules is measured again
#: (2: CLEAR_LOSS_MIN_S; choices cached before it may rest on a cold first run).
RULES = 2


def fingerprint() -> dict[str, Any]:
    """What a cached choice is only valid for: this CPU, these torch/triton/package versions, these rules."""
    global _FINGERPRINT
    if _FINGERPRINT is None:
        _FINGERPRINT = {
            "cpu": cpu_model(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "triton": _version("triton"),
            "aqcf_kernels": _version("aqcf-kernels"),
            "rules": RULES,
        }
    return _FINGERPRINT


def _fingerprint_hash() -> str:
    return hashlib.sha256(json.dumps(fingerprint(), sort_keys=True).encode()).hexdigest()[:12]


#: The values of a cache-file variable (``AQCF_TUNING_CACHE``, ``AQCF_TRITON_AUTOTUNE_CACHE``) that mean no file.
CACHE_OFF = ("", "off", "0", "none")


def configured_cache_path(variable: str) -> Path | None | bool:
    """The file named by environment ``variable``; ``None`` if it says none (:data:`CACHE_OFF`); ``False`` if unset."""
    configured = os.environ.get(variable)
    if configured is None:
        return False
    configured = configured.strip()
    return None if configured.lower() in CACHE_OFF else Path(configured).expanduser()


def cache_path() -> Path | None:
    """The cache file (``None``: no disk cache)."""
    configured = configured_cache_path("AQCF_TUNING_CACHE")
    if configured is not False:
        return configured
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "aqcf_kernels" / f"tuning-{_fingerprint_hash()}.json"


_lock = threading.Lock()
_memory: dict[str, Candidate] = {}
# Choices read from the disk cache and not yet timed in this process: the times (ms) they were chosen with.
_unverified: dict[str, dict[str, Any]] = {}
# The same choices under the callers' cheap hashable keys (tuples of shapes, dtypes, ...): a known
# signature is then found without formatting its string key, which cost more than a small conv.
_recent: dict[Hashable, Candidate] = {}
_pending: dict[str, _Refining] = {}  # signature -> a provisional choice still being timed
_steady: dict[Hashable, str] = {}  # cheap key -> signature, while its leader computes the steady calls
_disk: dict[str, dict[str, Any]] | None = None  # the file's entries as loaded (None: not read yet)
_disk_path: Path | None = None
_warned: set[str] = set()


def _warn_once(problem: str, message: str) -> None:
    """Warn about ``problem`` (e.g. 'corrupt:<path>') once per process, however often it recurs."""
    if problem not in _warned:
        _warned.add(problem)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _is_choice(entry: Any) -> bool:
    """Whether a cache file's entry is a remembered ``(backend, algorithm)`` choice."""
    return isinstance(entry, dict) and isinstance(entry.get("backend"), str) and isinstance(entry.get("algorithm"), str)


def read_cache_file(path: Path, valid: Callable[[Any], bool] = _is_choice) -> dict[str, dict[str, Any]]:
    """The entries of the cache file at ``path`` that ``valid`` accepts; ``{}`` (with one warning) if the file is
    corrupt or foreign (written for another fingerprint). Also the Triton autotuner's file of kept configs
    (``backends/triton/autotune_cache.py``)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as e:
        _warn_once(f"unreadable:{path}", f"aqcf_kernels.tuning: cannot read the cache {path} ({e}); measuring again")
        return {}
    try:
        payload = json.loads(text)
        if not isinstance(payload, dict) or not isinstance(payload.get("choices"), dict):
            raise ValueError("not a tuning cache")
    except ValueError as e:
        _warn_once(
            f"corrupt:{path}",
            f"aqcf_kernels.tuning: ignoring the corrupt cache file {path} ({e}); it will be rewritten",
        )
        return {}
    if payload.get("fingerprint") != fingerprint():
        _warn_once(
            f"foreign:{path}",
            f"aqcf_kernels.tuning: ignoring the cache file {path}, written for another machine or version "
            f"({payload.get('fingerprint')}); it will be rewritten",
        )
        return {}
    return {k: v for k, v in payload["choices"].items() if valid(v)}


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # no advisory locks here: the rename alone still keeps the file whole
        yield
        return
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def write_cache_entry(path: Path, key: str, entry: dict[str, Any]) -> None:
    """Merge one entry into the cache file at ``path``: read, add, write a temporary file, rename over it. The
    entries of every kind are kept (a file both caches were pointed at keeps both)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _file_lock(path):
            choices = read_cache_file(path, lambda entry: isinstance(entry, dict))
            choices[key] = entry
            payload = {"fingerprint": fingerprint(), "choices": choices}
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump(payload, f, indent=1, sort_keys=True)
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
    except OSError as e:  # a read-only home must not break the layer: the choice stays in memory
        _warn_once(
            f"unwritable:{path}",
            f"aqcf_kernels.tuning: cannot write the cache {path} ({e}); choices are kept in memory only",
        )


def _disk_entries() -> dict[str, dict[str, Any]]:
    global _disk, _disk_path
    path = cache_path()
    if path is None:
        return {}
    if _disk is None or _disk_path != path:
        _disk, _disk_path = read_cache_file(path), path
    return _disk


def clear(memory: bool = True, disk: bool = False) -> None:
    """Forget the choices made in this process (and, with ``disk``, delete the cache file)."""
    global _disk, _disk_path
    with _lock:
        if memory:
            _memory.clear()
            _unverified.clear()
            _recent.clear()
            _pending.clear()
            _steady.clear()
            _disk, _disk_path = None, None
            _changed()
        path = cache_path()
        if disk and path is not None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


# ------------------------------------------------------------------------------------------------
# Measuring
# ------------------------------------------------------------------------------------------------


def can_time(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether calls on these tensors can be timed now (not while tracing or capturing a graph)."""
    if torch.compiler.is_compiling():
        return False
    for t in tensors:
        if isinstance(t, torch._subclasses.FakeTensor) or t.device.type == "meta":
            return False
    if any(t.device.type == "cuda" for t in tensors) and torch.cuda.is_current_stream_capturing():
        return False
    return True


def _timer(device: torch.device) -> Callable[[], float]:
    if device.type == "cuda":

        def now() -> float:
            torch.cuda.synchronize(device)
            return time.perf_counter()

        return now
    return time.perf_counter


def _winner(best: dict[Candidate, float], prior: Candidate) -> Candidate:
    """The fastest best time, unless ``prior`` is within :data:`TIE_MARGIN` of it."""
    winner = min(best, key=lambda c: best[c])
    if prior in best and best[prior] <= (1 + TIE_MARGIN) * best[winner]:
        return prior
    return winner


def _measure(
    candidates: Sequence[Candidate], run: Callable[[Candidate], T], device: torch.device, prior: Candidate
) -> tuple[Candidate, T, dict[Candidate, float]]:
    """Run every candidate once; the fastest wins, unless ``prior`` is within :data:`TIE_MARGIN` of it.

    Returns the winner, the result of its run (so one of the runs is the call itself) and the time
    of each candidate still in the running (within :data:`CLEAR_LOSS` of the fastest).
    """
    now = _timer(device)
    first: dict[Candidate, float] = {}
    kept_output: dict[Candidate, T] = {}  # the fastest so far and the prior (a tie goes to it)
    for c in candidates:
        start = now()
        output = run(c)
        first[c] = now() - start
        leader = min(first, key=first.__getitem__)
        kept_output = {k: v for k, v in {**kept_output, c: output}.items() if k in (leader, prior)}
        del output
    fastest = min(first.values())
    kept = {c: t for c, t in first.items() if t <= CLEAR_LOSS * fastest or t - fastest <= CLEAR_LOSS_MIN_S}
    winner = _winner(kept, prior)
    return winner, kept_output[winner], kept


def _samples(best: dict[Candidate, float], leader: Candidate) -> dict[Candidate, int]:
    """The warm timings each candidate still in the running needs before the choice is remembered."""
    close = {c for c, t in best.items() if t <= (1 + DOUBT_MARGIN) * best[leader]}
    return {c: REFINE_SAMPLES if c in close and len(close) > 1 else 1 for c in best}


def _ms(best: dict[Candidate, float]) -> dict[str, float]:
    return {str(c): round(t * 1e3, 4) for c, t in best.items() if t != float("inf")}


def _settle(key: str, winner: Candidate, fast_key: Hashable | None, best: dict[Candidate, float]) -> None:
    """Remember ``winner`` for ``key`` in this process and in the disk cache."""
    with _lock:
        _memory[key] = winner
        _pending.pop(key, None)
        if fast_key is not None:
            _recent[fast_key] = winner
        path = cache_path()
        if path is not None:
            entry = {"backend": winner.backend, "algorithm": winner.algorithm, "ms": _ms(best)}
            write_cache_entry(path, key, entry)
            _disk_entries()[key] = entry


def _refine(key: str, state: _Refining, run: Callable[[Candidate], T], device: torch.device) -> tuple[Choice, T]:
    """Compute this call with the provisional choice's next candidate, timed; settle when done (or,
    after a close call, let the leader compute the steady calls before the confirmation round)."""
    if state.steady_calls_left > 0:
        state.steady_calls_left -= 1
        return Choice(state.leader, "refining", _ms(state.best)), run(state.leader)
    if state.rounds is not None:
        return _confirm(key, state, run, device)
    left = state.left()
    c = max(left, key=lambda c: left[c])  # the candidate with the most samples to take
    now = _timer(device)
    start = now()
    output = run(c)
    state.best[c] = min(state.best[c], now() - start)
    state.taken[c] += 1
    if state.left():
        return Choice(c, "refining", _ms(state.best)), output
    winner = _winner(state.best, state.prior)
    close = [k for k, n in _samples(state.best, winner).items() if n == REFINE_SAMPLES]
    if close and CONFIRM_AFTER > 0:  # (once open, the confirmation takes every later call: _confirm)
        log.debug("%s: %s for now (refined, ms: %s); confirming later", key, winner, _ms(state.best))
        state.steady_calls_left, state.leader = CONFIRM_AFTER, winner
        if state.fast_key is not None:
            _steady[state.fast_key] = key
        state.best = dict.fromkeys(close, float("inf"))  # the leader's too: the fresh rounds alone decide
        state.rounds = [{}]
        return Choice(c, "refining", _ms(state.best)), output
    log.debug("%s: %s (refined, ms: %s)", key, winner, _ms(state.best))
    _settle(key, winner, state.fast_key, state.best)
    return Choice(c, "measured" if c == winner else "outrun", _ms(state.best)), output


def _paired_ratios(rounds: Sequence[dict[Candidate, float]], leader: Candidate) -> dict[Candidate, float]:
    """Each candidate's median over ``rounds`` of its time over ``leader``'s in the same round (1 for
    the leader)."""
    return {c: statistics.median(r[c] / r[leader] for r in rounds) for c in rounds[0]}


def _confirmed(ratios: dict[Candidate, float], leader: Candidate, rounds: int) -> bool:
    """Whether ``rounds`` rounds with these paired ratios to ``leader`` decide the confirmation: every other
    candidate is clearly apart (:data:`CONFIRM_EVIDENCE`), or :data:`CONFIRM_MAX_ROUNDS` were taken."""
    if rounds >= CONFIRM_MAX_ROUNDS:
        return True
    others = [r for c, r in ratios.items() if c != leader]
    return rounds >= REFINE_SAMPLES and all(r > 0 and rounds * abs(math.log(r)) >= CONFIRM_EVIDENCE for r in others)


def _confirm(key: str, state: _Refining, run: Callable[[Candidate], T], device: torch.device) -> tuple[Choice, T]:
    """Compute this call with the confirmation round's next candidate, timed; settle once the paired
    ratios are clear (:data:`CONFIRM_EVIDENCE`)."""
    assert state.rounds is not None and state.leader is not None
    close = list(state.best)
    done = len(state.rounds) - 1
    order = close[done % len(close) :] + close[: done % len(close)]  # who goes first rotates
    c = next(k for k in order if k not in state.rounds[-1])
    now = _timer(device)
    start = now()
    output = run(c)
    state.rounds[-1][c] = now() - start
    if len(state.rounds[-1]) < len(close):
        return Choice(c, "refining", _ms(state.best)), output
    ratios = _paired_ratios(state.rounds, state.leader)
    state.best = {k: statistics.median(r[k] for r in state.rounds) for k in close}  # (reported)
    if not _confirmed(ratios, state.leader, len(state.rounds)):
        state.rounds.append({})
        return Choice(c, "refining", _ms(state.best)), output
    winner = _winner(ratios, state.prior)
    log.debug(
        "%s: %s (confirmed in %d rounds, median ms: %s, paired ratios to %s: %s)",
        key,
        winner,
        len(state.rounds),
        _ms(state.best),
        state.leader,
        {str(k): round(r, 3) for k, r in ratios.items()},
    )
    _settle(key, winner, state.fast_key, state.best)
    return Choice(c, "measured" if c == winner else "outrun", _ms(state.best)), output


def provisional() -> frozenset[str]:
    """The signatures whose measured choice is still provisional: their next calls time the
    candidates in turn (:data:`DOUBT_MARGIN`) before the choice is remembered."""
    with _lock:
        return frozenset(_pending)


def measuring() -> bool:
    """Whether choices are measured now: not in 'heuristic' mode, nor under deterministic algorithms (which
    :func:`choose` answers with the heuristic's pick, so a choice measured before they were switched on is not
    used while they are)."""
    return mode == "measure" and not torch.are_deterministic_algorithms_enabled()


def recall(fast_key: Hashable) -> Candidate | None:
    """The choice made in this process for a call whose cheap key is ``fast_key`` (see :func:`choose`)."""
    return _recent.get(fast_key) if measuring() else None


def steady_leader(fast_key: Hashable) -> Candidate | None:
    """The provisional leader that computes this call, if the call's signature (by its cheap key) is
    in its steady calls before a confirmation (:data:`CONFIRM_AFTER`); counts the call. Not final:
    the caller must not remember it. Cheap, like :func:`recall`: those calls skip the signature's
    string key and :func:`choose`, which cost more than a small conv."""
    key = _steady.get(fast_key) if measuring() else None
    if key is None:
        return None
    state = _pending.get(key)
    if state is None or state.steady_calls_left <= 0:
        _steady.pop(fast_key, None)
        return None
    state.steady_calls_left -= 1
    if state.steady_calls_left == 0:
        _steady.pop(fast_key, None)
    return state.leader


def lookup(key: str) -> Candidate | None:
    """The remembered choice for ``key`` (this process's, else the disk cache's), without measuring."""
    with _lock:
        cached = _memory.get(key)
        if cached is None:
            entry = _disk_entries().get(key)
            if entry is not None:
                cached = _memory[key] = Candidate(entry["backend"], entry["algorithm"])
                _unverified[key] = entry.get("ms") if isinstance(entry.get("ms"), dict) else {}
                log.debug("%s: %s (from %s)", key, cached, _disk_path)
    return cached


def choose(
    key: str,
    candidates: Sequence[Candidate],
    prior: Candidate,
    run: Callable[[Candidate], T],
    tensors: Sequence[torch.Tensor],
    fast_key: Hashable | None = None,
) -> tuple[Choice, T | None]:
    """The candidate for the call with signature ``key``, and that call's result if measuring computed it.

    ``candidates`` are the pairs that may serve (the accuracy contract and the prior already
    applied), ``prior`` the heuristic's pick (one of them). ``run(c)`` computes the call with
    candidate ``c``. A fresh measurement returns the winner's output (the call is not repeated);
    otherwise the second value is ``None`` and the caller runs the chosen candidate. ``fast_key``
    (optional, hashable, as specific as ``key``) makes the choice available to :func:`recall`.
    """
    if prior not in candidates:
        raise ValueError(f"the prior {prior} is not among the candidates {[str(c) for c in candidates]}")
    if len(candidates) == 1:
        return Choice(candidates[0], "only"), None
    # torch.use_deterministic_algorithms(True) asks for the same result every run: the heuristic's
    # pick is the same on every machine and process; a measurement's is not, and while refining, calls
    # of one signature are computed by different candidates (results that differ in the last bits).
    if not measuring() or not can_time(tensors):
        return Choice(prior, "heuristic"), None
    known = lookup(key)
    if known in candidates:  # (not if that backend is gone, e.g. triton uninstalled: measure again)
        chosen_with = _unverified.pop(key, {}).get(str(known))  # another process's choice: check it once
        if isinstance(chosen_with, (int, float)) and chosen_with > 0:
            return _check_remembered(key, known, chosen_with, run, _device(tensors), fast_key)
        if fast_key is not None:
            _recent[fast_key] = known
        return Choice(known, "cached"), None
    device = _device(tensors)
    state = _pending.get(key)
    if state is not None and set(state.best) <= set(candidates):
        return _refine(key, state, run, device)
    winner, output, best = _measure(candidates, run, device, prior)
    log.debug("%s: %s (first runs, ms: %s)", key, winner, _ms(best))
    if len(best) > 1:
        _pending[key] = _Refining(prior, best, dict.fromkeys(best, 0), fast_key)
        return Choice(winner, "refining", _ms(best)), output
    _settle(key, winner, fast_key, best)
    return Choice(winner, "measured", _ms(best)), output


def _device(tensors: Sequence[torch.Tensor]) -> torch.device:
    return next((t.device for t in tensors), torch.device("cpu"))


def _check_remembered(
    key: str,
    known: Candidate,
    chosen_with_ms: float,
    run: Callable[[Candidate], T],
    device: torch.device,
    fast_key: Hashable | None,
) -> tuple[Choice, T]:
    """Compute the first call of a choice another process remembered with ``known``, timed. If it ran
    :data:`STALE_SPEEDUP` times faster than the time it was chosen with, that measurement was taken in
    other conditions (another job on the cores): forget it, so the next call measures again."""
    now = _timer(device)
    start = now()
    output = run(known)
    took_ms = (now() - start) * 1e3
    if took_ms * STALE_SPEEDUP < chosen_with_ms:
        log.debug(
            "%s: %s was chosen at %.3f ms and now takes %.3f ms: measuring again", key, known, chosen_with_ms, took_ms
        )
        with _lock:  # the next call measures; the file's entry is rewritten then
            _memory.pop(key, None)
            _disk_entries().pop(key, None)
        return Choice(known, "stale"), output
    if fast_key is not None:
        _recent[fast_key] = known
    return Choice(known, "cached"), output


def _setting(name: str) -> property:
    return property(lambda self: globals()[name], lambda self, value: _set(name, value))


class _TuningModule(types.ModuleType):
    """``tuning.mode = ...`` (and ``tuning.half_fast8``) is checked and announced (:func:`on_change`), like
    :func:`using`."""

    mode = _setting("mode")
    half_fast8 = _setting("half_fast8")


_this = sys.modules.get(__name__)
if _this is not None and _this.__dict__ is globals():  # (not when a test executes this file on its own)
    _this.__class__ = _TuningModule
