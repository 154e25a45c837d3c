"""What every benchmark family shares: interleaved timing, peak memory, environment, output files.

Timing runs the providers of one case interleaved (every rep calls each once, in a fresh shuffled
order), so slow drift of a shared machine hits every provider alike, and
reports the median and interquartile range of the reps after warmup (wall clock on CPU, CUDA
events with the L2 flushed before each call on a GPU: :class:`StepClock`).

Peak memory: on CUDA, the caching allocator's peak; on CPU (no allocator statistics), the growth
of the process's peak resident set size over one step: ``malloc_trim(0)`` returns freed heap
pages to the kernel, writing ``5`` to ``/proc/self/clear_refs`` resets ``VmHWM`` to the current
RSS, and after the step ``VmHWM - RSS before`` is the peak. This runs after the timing, in a
fresh process whose glibc mmap threshold is pinned (``benchmarks._memory_worker``), which makes it
repeatable to a few hundred KiB. Where that is impossible (no writable ``clear_refs``), peaks are
reported as ``None`` ("n/a").
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import datetime
import gc
import json
import math
import os
import platform
import random
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from aqcf_kernels import tuning
from aqcf_kernels.data.outputs import OutputError, check_folder
from aqcf_kernels.pipeline.allocator import MALLOC_CHOICES, apply_malloc_choice

REPO_ROOT = Path(__file__).resolve().parent.parent
MiB = 2**20

Step = Callable[[], object]


# ---------------------------------------------------------------------------------------------
# Command-line options every family takes
# ---------------------------------------------------------------------------------------------

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}

#: ``--load`` spins at most this many processes per core: each takes a whole core, so beyond a few per
#: core more only starves the machine (999 of them took the load average to ~205) and models no real load
MAX_LOAD_PER_CORE = 2


# argparse types: a bad value is refused while parsing, as ``argument --reps: ...`` and exit 2, before
# any work starts, instead of a traceback from deep inside the run (or after it, for ``--out``).


def _int_at_least(text: str, low: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"{value}: must be {what}")
    return value


def positive_int(text: str) -> int:
    """An int >= 1 (a count: reps, threads, channels, tokens...)."""
    return _int_at_least(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """An int >= 0 (warmup rounds, busy processes)."""
    return _int_at_least(text, 0, "0 or more")


def positive_ints(text: str) -> list[int]:
    """Comma-separated ints >= 1 (``--tokens 256,1024``)."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated positive integers")
    return [positive_int(t) for t in items]


def non_negative_float(text: str) -> float:
    """A finite float >= 0 (seconds, GiB)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text}: must be a finite number, 0 or more")
    return value


def load_processes(text: str) -> int:
    """``--load``: busy processes, at most :data:`MAX_LOAD_PER_CORE` per core of this machine."""
    value = non_negative_int(text)
    cores = os.cpu_count() or 1
    limit = MAX_LOAD_PER_CORE * cores
    if value > limit:
        raise argparse.ArgumentTypeError(
            f"{value} busy processes on {cores} cores: at most {limit} ({MAX_LOAD_PER_CORE} per core); each "
            "spins a whole core, so more only starves the machine"
        )
    return value


def device_name(text: str) -> str:
    """A torch device the benchmarks can time (cpu, or cuda where torch has a CUDA device), as torch spells it."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    # StepClock and PeakMemory know how to time and measure only these two
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r}: the benchmarks run on cpu or cuda, not {device.type}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "sees no CUDA device" if torch.version.cuda else "is built without CUDA"
            raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available here (torch {torch.__version__} {why})")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {count} CUDA device(s)")
    return str(device)


def forced_backend_refusal(family: str, name: str, device: torch.device) -> str | None:
    """Why the ``family`` backend ``name``, forced for a provider, cannot run on ``device`` here (``None``: it
    can): the benchmark says so up front, naming the provider, instead of a BackendError traceback mid-run."""
    from aqcf_kernels.backends import registered

    backend = registered(family).get(name)
    if backend is None:
        return "it is not registered"
    if device.type not in backend.device_types:
        return f"it runs on {', '.join(backend.device_types)} tensors, this run's device is {device}"
    return backend.unavailable()


def usage_error(args: argparse.Namespace, message: str) -> int:
    """A value the parser could not judge alone (it depends on another option), refused as argparse refuses
    one: ``aqcf-bench conv: error: ...`` on stderr; returns the exit status, 2."""
    print(f"{getattr(args, 'prog', 'aqcf-bench')}: error: {message}", file=sys.stderr)
    return 2


def output_folder(text: str) -> Path:
    """A folder the run can write its files into, checked (not created) when parsing: the run
    creates it only once the benchmark is done, and a bad path must not cost the benchmark. The
    pipeline's check (:func:`aqcf_kernels.data.outputs.check_folder`): a folder made and removed
    there, as permission bits pass /proc or a read-only mount for root."""
    try:
        check_folder(text, text)  # argparse names the option: "argument --out: PATH: ..."
    except OutputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return Path(text)


def add_common_arguments(parser: argparse.ArgumentParser, default_out: str = "bench-out") -> None:
    """Options shared by every family: threads, reps, warmup, dtype, device, output folder."""
    g = parser.add_argument_group("measurement")
    g.add_argument("--threads", type=positive_int, default=2, help="torch.set_num_threads (CPU); default 2")
    g.add_argument("--reps", type=positive_int, default=7, help="timed reps per provider and case (default 7)")
    g.add_argument(
        "--warmup", type=non_negative_int, default=2, help="untimed reps per provider and case first (default 2)"
    )
    g.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="default float32")
    g.add_argument("--device", type=device_name, default="cpu", help="torch device, e.g. cpu (default) or cuda")
    g.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    # (a Path default skips the type: cli.main checks the default folder, unless the run only lists its cases)
    g.add_argument(
        "--out", type=output_folder, default=Path(default_out), help=f"output folder (default {default_out}/)"
    )
    g.add_argument(
        "--load",
        type=load_processes,
        default=0,
        metavar="N",
        help="keep N other processes busy (one spinning core each, like `yes > /dev/null`) while timing: "
        f"how the providers hold up on a machine that is not idle. At most {MAX_LOAD_PER_CORE} per core; default 0",
    )
    g.add_argument(
        "--malloc",
        choices=MALLOC_CHOICES,
        default="default",
        help="keep: glibc's malloc keeps freed memory (aqcf-predict's --malloc keep), so no provider pays page "
        "faults for fresh pages that depend on what the provider timed before it left in the heap; "
        "default (the default): the C library's own behaviour",
    )


# What --malloc did in this process, for the report (set by apply_malloc).
_malloc_setting = "default"


def apply_malloc(choice: str) -> None:
    """``--malloc``, as ``aqcf-predict`` applies it, to this process (timing only: the peak-memory
    workers are fresh processes with their own pinned setting); where ``keep`` cannot be applied,
    says why on stderr and the report says ``default``."""
    global _malloc_setting
    problem = apply_malloc_choice(choice)
    if problem is not None:
        print(f"--malloc keep not applied: {problem}", file=sys.stderr)
    _malloc_setting = "default" if problem is not None else choice


def configure_torch(threads: int) -> None:
    torch.set_num_threads(threads)


#: set by :func:`fresh_tuning_cache` (and inherited by the memory pass's process): the folder of
#: this run's tuning caches, one per workload (:func:`workload_tuning`)
TUNING_DIR_ENV = "AQCF_BENCH_TUNING_DIR"


@contextlib.contextmanager
def fresh_tuning_cache() -> Iterator[None]:
    """Make ``auto`` measure in this run: temporary tuning caches for the block, unless ``AQCF_TUNING_CACHE``
    is set. The folder is removed when the block ends, error or not, and the environment restored.

    A cache written earlier (idle, or by another load) would replay that run's choices; the
    benchmark shows what ``auto`` picks under the conditions it measures.
    """
    if "AQCF_TUNING_CACHE" in os.environ:
        yield
        return
    before = {name: os.environ.get(name) for name in (TUNING_DIR_ENV, "AQCF_TUNING_CACHE")}
    folder = Path(tempfile.mkdtemp(prefix="aqcf-bench-tuning-"))
    os.environ[TUNING_DIR_ENV] = str(folder)
    os.environ["AQCF_TUNING_CACHE"] = str(folder / "tuning.json")
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def workload_tuning(workload: str) -> Iterator[None]:
    """``auto`` chooses afresh for ``workload`` (a case and mode), as a process running only it would.

    Where a choice is made matters on CPU under glibc's default malloc: which computation is
    fastest depends on the page faults of the whole step (glibc returns freed memory at the top
    of the heap to the kernel once it exceeds twice its mmap threshold, and the next step faults it
    in again). On the AMD EPYC (2026-12-04), the 1d 16q N8 1024 conv's ``fwdbwd`` step ran with the
    choices the ``bwd`` workload had made before it (there fast8's weight gradient timed 1.5-1.6x
    faster than hamilton's) at 0.84x and 0.94x of all-hamilton's speed in two runs; choosing in
    ``fwdbwd`` itself, ``auto`` was within 3% of the best provider in two runs. So each workload
    measures with its own cache file in this run's folder, and the memory pass replays that file.
    Without that folder (``AQCF_TUNING_CACHE`` set by the caller) the workloads share the caller's
    cache, as a process doing them all in turn would.
    """
    folder = os.environ.get(TUNING_DIR_ENV)
    if folder is None:
        yield
        return
    before = os.environ["AQCF_TUNING_CACHE"]
    os.environ["AQCF_TUNING_CACHE"] = str(Path(folder) / f"tuning-{re.sub(r'[^A-Za-z0-9]+', '-', workload)}.json")
    tuning.clear(memory=True)
    try:
        yield
    finally:
        os.environ["AQCF_TUNING_CACHE"] = before
        tuning.clear(memory=True)


_SPIN = "while True: pass"


@contextlib.contextmanager
def background_load(processes: int) -> Iterator[None]:
    """``processes`` busy-looping child processes for the duration of the block (0: nothing).

    The machine of a real user is rarely idle (data-loader workers, other jobs): this reproduces
    the simplest such load, one core taken by another process, as ``yes > /dev/null`` does.
    """
    if processes <= 0:
        yield
        return
    children = [subprocess.Popen([sys.executable, "-c", _SPIN]) for _ in range(processes)]
    try:
        time.sleep(0.2)  # let them get scheduled before the first timed call
        yield
    finally:
        for child in children:
            child.kill()
        for child in children:
            child.wait()


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


class StepClock:
    """Times one call of a step, in seconds.

    CPU: wall clock around the call. CUDA: a pair of CUDA events around the call (device time,
    not host time), each call preceded, outside the timed region, by writing a 256 MiB buffer: that
    evicts the 50 MB L2 as ``triton.testing.do_bench`` does, so a step never reads inputs the
    previous one left in cache (the same effect as rotating input sets, at no extra memory per case).
    """

    FLUSH_BYTES = 256 * MiB

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self._flush = torch.empty(self.FLUSH_BYTES // 4, dtype=torch.int32, device=device) if self.cuda else None
        self._pending: list[tuple[str, Any, Any]] = []

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def time(self, name: str, step: Step, times: dict[str, list[float]]) -> None:
        """Run ``step`` once and append its time to ``times[name]`` (on CUDA, at :meth:`collect`)."""
        if not self.cuda:
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
            return
        self._flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        self._pending.append((name, start, end))

    def collect(self, times: dict[str, list[float]]) -> None:
        self.sync()
        for name, start, end in self._pending:
            times[name].append(start.elapsed_time(end) / 1e3)
        self._pending.clear()


def settle_choices(steps: Mapping[str, Step]) -> int:
    """Call the steps round by round, each round in a shuffled order as :func:`time_interleaved` does,
    until ``algorithm='auto'`` has remembered every choice they made; the rounds it took.

    Benchmarks time a build's steady state: a cold first call (measuring) or a provisional choice
    (refining) inside the timed reps would bill measuring to the build. The first round calls every
    step; later rounds those whose first call opened or settled a choice and the quickest of the
    others, in turn, so refining calls have other work between them as the timed ones will (a conv
    refined on back-to-back calls of itself, its operands hot in cache, chose ``fast8`` for a 2 ms
    1d conv that loses to ``hamilton`` once other work runs in between), without re-running costly
    references (``naive16``) a dozen times. What measuring costs is reported on its own
    (``tools/tuning_cost.py``, README)."""
    elsewhere = tuning.provisional()  # left open by other code: these steps may never call them
    order = random.Random(ORDER_SEED)
    active = list(steps)
    for rounds in range(1, SETTLE_LIMIT + 1):
        measuring, seconds = [], {}
        for name in order.sample(active, len(active)):
            before, start = tuning.provisional(), time.perf_counter()
            steps[name]()
            seconds[name] = time.perf_counter() - start
            if tuning.provisional() != before:
                measuring.append(name)
        if not tuning.provisional() - elsewhere:
            return rounds
        if rounds == 1:
            others = [name for name in steps if name not in measuring]
            active = measuring + ([min(others, key=seconds.__getitem__)] if others else [])
    raise RuntimeError(f"auto's choices still provisional after {SETTLE_LIMIT} rounds of the steps")


#: more rounds than refining a choice can take (each call times one candidate of each open choice)
SETTLE_LIMIT = tuning.max_provisional_calls(4) + 2


def dense_products(n: int, dtype: torch.dtype, device: torch.device | str) -> dict[str, Callable[[], torch.Tensor]]:
    """The same ``n × n × n`` product (``2 n³`` FLOPs) through the two dense kernels a conv can run on: the
    BLAS matmul (``torch.mm``) and a 1×1 conv (oneDNN on CPU, cuDNN on CUDA), whose output channels and
    pixels are the product's rows and columns."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    pixels = b.view(1, n, 32, n // 32)  # b's rows as input channels, its columns as 32 × n/32 pixels
    weight = a.view(n, n, 1, 1)
    return {"mm": lambda: torch.mm(a, b), "conv1x1": lambda: torch.nn.functional.conv2d(pixels, weight)}


#: the most seconds the next size's product may be expected to take when :func:`dense_size` doubles it
DENSE_SIZE_BUDGET_S = 0.1


def dense_size(cap: int, seconds_of: Callable[[int], float], budget_s: float = DENSE_SIZE_BUDGET_S) -> int:
    """The size of the dense peak's products: from 256, doubled up to ``cap`` while the next size's product
    (8x the work) is expected within ``budget_s`` (``seconds_of(n)``: one product of size ``n``). A dtype the
    device has no fast kernel for stays small: float16 on a CPU without one ran 1-3 GFLOP/s, and 22 products of
    2048 took minutes before a model benchmark printed anything."""
    n = 256
    while n < cap and 8 * seconds_of(n) <= budget_s:
        n *= 2
    return n


def _one_product_seconds(n: int, dtype: torch.dtype, device: torch.device) -> float:
    """Seconds of one ``torch.mm`` of size ``n`` in ``dtype`` (its second call: the first pays for set-up)."""
    a = torch.randn(n, n, device=device).to(dtype)
    clock = StepClock(device)
    times: dict[str, list[float]] = {"mm": []}
    for _ in range(2):
        clock.time("mm", lambda: torch.mm(a, a), times)
        clock.collect(times)
    return times["mm"][-1]


def dense_peak_gflops(
    dtype: torch.dtype, device: torch.device | str, reps: int = 10, n: int | None = None
) -> dict[str, float]:
    """This device's dense throughput in ``dtype``, GFLOP/s, per kernel of :func:`dense_products` (square
    products of ``n``, by default :func:`dense_size`'s, at most 2048 on CPU and 8192 on CUDA; the best of
    ``reps`` calls after an untimed one), and their best as ``"peak"``: the roofline a conv cannot beat. Both
    kernels, because neither leads everywhere: on AMD EPYC (2 threads, fp32) one run measured MKL's matmul at
    172 GFLOP/s and oneDNN's 1×1 conv at 193, while a model step's convs ran 187, above that matmul-only peak;
    three later runs 190-191 against 180-186; in bf16 the matmul led, 423 against 326."""
    device = torch.device(device)
    if n is None:
        n = dense_size(8192 if device.type == "cuda" else 2048, lambda size: _one_product_seconds(size, dtype, device))
    products = dense_products(n, dtype, device)
    clock = StepClock(device)
    times: dict[str, list[float]] = {name: [] for name in products}
    for _ in range(reps + 1):
        for name, product in products.items():
            clock.time(name, product, times)
        clock.collect(times)
    rates = {name: 2 * n**3 / min(seconds[1:]) / 1e9 for name, seconds in times.items()}
    return {**rates, "peak": max(rates.values())}


#: the most reps ``min_time`` may ask for
MAX_REPS = 200
#: seeds the order of the providers within each rep (:func:`time_interleaved`)
ORDER_SEED = 0


def time_interleaved(
    steps: Mapping[str, Step], reps: int, warmup: int, device: torch.device | str = "cpu", min_time: float = 0.0
) -> dict[str, list[float]]:
    """Seconds of ``reps`` calls of every step, interleaved, after ``warmup`` rounds.

    Each rep calls every step once, in an order shuffled afresh (seeded, so runs repeat), so each
    provider runs after each other one about equally often, and first as often as any. Rotating
    one fixed order would only change who starts: a provider would still almost always follow
    the same neighbour, and inherit what it leaves behind (the cache, the allocator's trimmed or
    grown heap). See :class:`StepClock` for what is timed on each device.

    ``min_time``: more reps (up to :data:`MAX_REPS`) until each provider gets about this many seconds
    of timed calls, judged from the last warmup round (without warmup, from the first timed rep). On the
    2-core CPU machine the medians of 7 or 15 reps of a 5-10 ms step moved by ±10% between runs, even for two
    providers running the same code, which is as large as the differences a 5% target asks about.
    """
    clock = StepClock(torch.device(device))
    names = list(steps)
    started = time.perf_counter()
    for _ in range(warmup):
        started = time.perf_counter()
        for name in names:
            steps[name]()
    clock.sync()
    if min_time > 0 and warmup > 0 and names:
        per_call = (time.perf_counter() - started) / len(names)
        reps = max(reps, min(MAX_REPS, math.ceil(min_time / max(per_call, 1e-6))))
    times: dict[str, list[float]] = {name: [] for name in names}
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        order = random.Random(ORDER_SEED)
        rep = 0
        while rep < reps:
            for name in order.sample(names, len(names)):
                clock.time(name, steps[name], times)
            clock.collect(times)
            rep += 1
            if rep == 1 and min_time > 0 and warmup == 0 and names:  # no warmup round to judge from
                per_call = sum(times[name][0] for name in names) / len(names)
                reps = max(reps, min(MAX_REPS, math.ceil(min_time / max(per_call, 1e-6))))
    finally:
        if gc_was_enabled:
            gc.enable()
    return times


@dataclass
class Timing:
    median: float
    q1: float
    q3: float
    samples: list[float] = field(repr=False)

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    @staticmethod
    def of(samples: Sequence[float]) -> Timing:
        s = list(samples)
        if len(s) == 1:
            return Timing(s[0], s[0], s[0], s)
        q1, median, q3 = statistics.quantiles(s, n=4, method="inclusive")
        return Timing(median, q1, q3, s)


# ---------------------------------------------------------------------------------------------
# Peak memory
# ---------------------------------------------------------------------------------------------


def _read_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


class PeakMemory:
    """Peak memory one step adds on top of what is live before it, in bytes (``None`` = n/a)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.unavailable: str | None = None
        self._malloc_trim = None
        if device.type == "cuda":
            return
        if device.type != "cpu":
            self.unavailable = f"no peak-memory measurement for {device.type}"
            return
        try:
            self._malloc_trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc: still measured, just noisier
            self._malloc_trim = None
        try:
            self._reset_hwm()
            _read_status_kib("VmHWM")
            _read_status_kib("VmRSS")
        except (OSError, KeyError) as e:
            self.unavailable = f"cannot reset or read the peak RSS ({e})"

    def method(self, pinned: bool) -> str:
        if self.unavailable:
            return f"n/a: {self.unavailable}"
        if self.device.type == "cuda":
            return "torch.cuda.max_memory_allocated growth over one step"
        parts = ["mmap threshold pinned at 128 KiB" if pinned else "dynamic mmap threshold (not glibc)"]
        parts += ["malloc_trim(0)"] if self._malloc_trim is not None else []
        parts += ["/proc/self/clear_refs=5, one step, VmHWM - VmRSS before"]
        return ", ".join(parts)

    @staticmethod
    def _reset_hwm() -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def measure(self, step: Step) -> int | None:
        if self.unavailable:
            return None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
            step()
            torch.cuda.synchronize(self.device)
            return max(0, torch.cuda.max_memory_allocated(self.device) - before)
        if self._malloc_trim is not None:
            self._malloc_trim(0)
        self._reset_hwm()
        before = _read_status_kib("VmRSS")
        step()
        return max(0, _read_status_kib("VmHWM") - before) * 1024


def measure_builds_memory(
    payload: Mapping[str, Any],
    pinned: bool,
    cases: Sequence[Any],
    make_inputs: Callable[[Any, torch.dtype, torch.device], Any],
    make_build: Callable[[str, Any, torch.dtype, torch.device], Any],
    make_step: Callable[[str, Any, Any], Step],
) -> dict[str, Any]:
    """The memory pass of a benchmark whose providers are builds of one model (``aqcf-bench model``,
    ``rnn``), run in a fresh worker process: per case, each build made once, each mode's step run once
    (kernels, caches, gradient buffers) and then measured."""
    configure_torch(payload["threads"])
    device, dtype = torch.device(payload["device"]), DTYPES[payload["dtype"]]
    meter = PeakMemory(device)
    peaks = []
    for case in cases:
        inputs = make_inputs(case, dtype, device)
        rows = {mode: dict.fromkeys(payload["providers"]) for mode in payload["modes"]}
        for name in payload["providers"]:
            build = make_build(name, case, dtype, device)
            for mode in payload["modes"]:
                step = make_step(mode, build, inputs)
                settle_choices({name: step})  # and the first call's caches
                rows[mode][name] = meter.measure(step)
                del step
            del build
        peaks += [rows[mode] for mode in payload["modes"]]
    return {"peaks": peaks, "method": meter.method(pinned)}


def measure_memory_in_subprocess(module: str, payload: Mapping[str, Any]) -> Any | None:
    """``module.measure_memory(payload, pinned)`` in a fresh Python (``benchmarks._memory_worker``)
    whose mmap threshold is pinned before torch loads; its JSON result, or ``None`` on failure."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "memory.json"
        cmd = [sys.executable, "-m", f"{__package__}._memory_worker", module, str(out)]
        proc = subprocess.run(cmd, input=json.dumps(payload), text=True, env=env)
        if proc.returncode != 0 or not out.exists():
            print(f"WARNING: peak-memory worker failed (exit {proc.returncode}): peaks are n/a", file=sys.stderr)
            return None
        return json.loads(out.read_text())


# ---------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------


def command_line() -> str:
    """How this benchmark was started, as one would type it again."""
    prog = Path(sys.argv[0])
    if prog.suffix == ".py" and prog.parent == Path(__file__).parent:  # python -m <package>.<module>
        head = ["python", "-m", f"{__package__}.{'cli' if prog.name == '__main__.py' else prog.stem}"]
    else:
        head = [prog.name]
    return shlex.join([*head, *sys.argv[1:]])


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - a broken optional install must not stop a benchmark
        return None


def environment(device: torch.device, threads: int, load: int = 0) -> dict[str, Any]:
    """Machine, software, commit and command line, for the JSON next to every table."""
    commit = _git("rev-parse", "--short", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_model": tuning.cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads() if device.type == "cpu" else threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "numpy": _version("numpy"),
        "git_commit": commit,
        "git_dirty": None if status is None else bool(status),
        "device": str(device),
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "background_load": load,
        "malloc": _malloc_setting,
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    try:
        from aqcf_kernels import backends

        table = backends()
        try:  # a list of statuses (name, device_types, reason)
            env["backends"] = {
                s.name: {"devices": list(s.device_types), "unavailable": s.reason}
                for s in table  # type: ignore
            }
        except (AttributeError, TypeError):
            env["backends"] = str(table)
    except Exception as e:  # noqa: BLE001
        env["backends"] = f"unavailable: {e}"
    return env


def warn_if_busy(env: Mapping[str, Any]) -> None:
    """A CPU benchmark on a machine already busy measures the other jobs (and OpenMP barriers
    spinning against them: 2 threads on a loaded 2-core machine can be 10x+ slower)."""
    load, cores = env.get("loadavg_start"), env.get("cpu_count")
    if env.get("background_load"):
        print(f"timing with {env['background_load']} busy process(es) started by --load", file=sys.stderr)
        return
    if load and cores and env.get("device") == "cpu" and load[0] > 0.5 * cores:
        print(
            f"WARNING: 1-minute load average {load[0]:.1f} on {cores} cores before the run: "
            "timings will be noisy (the JSON records the load)",
            file=sys.stderr,
        )


def environment_line(env: Mapping[str, Any]) -> str:
    dirty = "+dirty" if env.get("git_dirty") else ""
    where = env.get("gpu") or env["cpu_model"]
    return (
        f"{where}, {env['threads']} thread{'s' if env['threads'] != 1 else ''}, "
        f"torch {env['torch']}, triton {env['triton']}, "
        f"commit {env['git_commit']}{dirty}, {env['date']}"
        + (f", {env['background_load']} busy process(es) (--load)" if env.get("background_load") else "")
        + (", --malloc keep" if env.get("malloc") == "keep" else "")
    )


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def progress(i: int, n: int, label: str, started: float) -> None:
    print(f"[{i}/{n}] {label}  ({time.perf_counter() - started:.0f}s elapsed)", file=sys.stderr, flush=True)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]], align_left: int = 1) -> str:
    """A GitHub markdown table; the first ``align_left`` columns left-aligned, the rest right."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def fmt(row: list[str]) -> str:
        return (
            "| "
            + " | ".join(
                c.ljust(w) if i < align_left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
            + " |"
        )

    rule = (
        "|"
        + "|".join(":" + "-" * (w + 1) if i < align_left else "-" * (w + 1) + ":" for i, w in enumerate(widths))
        + "|"
    )
    return "\n".join([fmt(cells[0]), rule, *(fmt(r) for r in cells[1:])])


def write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2, allow_nan=False, default=str) + "\n")


def wrap_title(text: str, fig_width: float, fontsize: float) -> str:
    """``text`` broken into lines that fit a figure ``fig_width`` inches wide at ``fontsize`` points (a
    character ~0.6 em): the environment line is wider than a small figure, and was cut at both ends."""
    import textwrap

    return textwrap.fill(text, width=max(20, int(fig_width * 72 / (0.6 * fontsize))))


def grouped_bars(
    path: Path,
    groups: Sequence[str],
    panels: Sequence[tuple[str, str, Mapping[str, Sequence[float | None]]]],
    suptitle: str,
) -> None:
    """One PNG: per panel ``(title, ylabel, {series: value per group})``, bars grouped by group,
    a dashed line at 1.0 (the baseline). Missing values (``None``) leave a gap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_series = max((len(series) for _, _, series in panels), default=1)
    width = min(0.8 / max(n_series, 1), 0.25)
    fig_w = max(8.0, 0.28 * len(groups) * max(n_series, 1) + 2.0)
    fig, axes = plt.subplots(len(panels), 1, figsize=(fig_w, 3.6 * len(panels)), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, ylabel, series) in zip(axes[:, 0], panels, strict=True):
        for s, (name, values) in enumerate(series.items()):
            xs = [g + (s - (len(series) - 1) / 2) * width for g in range(len(groups))]
            pts = [(x, v) for x, v in zip(xs, values, strict=True) if v is not None]
            if not pts:
                continue
            bars = ax.bar([p[0] for p in pts], [p[1] for p in pts], width, label=name, color=colors[s % len(colors)])
            if len(groups) <= 16:
                ax.bar_label(bars, fmt="%.2f", fontsize=6, padding=1)
        top = max((v for vs in series.values() for v in vs if v is not None), default=1.0)
        ax.set_ylim(0, max(top, 1.0) * 1.22)  # headroom for the legend and labels
        ax.axhline(1.0, color="black", linestyle="--", linewidth=0.8)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(groups, rotation=30, ha="right", fontsize=7)
        ax.set_xlim(-0.6, len(groups) - 0.4)
        ax.grid(axis="y", alpha=0.3)
        # (empty: e.g. a run of the baseline alone)
        legend_or_note(ax, "nothing measured to compare", fontsize=7, ncols=min(len(series), 6), loc="upper left")
    title = wrap_title(suptitle, fig_w, fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()  # (which keeps the panels clear of the suptitle's lines)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def legend_or_note(ax: Any, note: str, **legend: Any) -> None:
    """``ax.legend(**legend)``, or ``note`` in the middle of a panel that has nothing labelled to show (rather
    than matplotlib's "No artists with labels found" warning and an empty legend box)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**legend)
    else:
        ax.text(0.5, 0.5, note, transform=ax.transAxes, ha="center", va="center")


def plot_ratios(path: Path, results: Sequence[Any], baseline: str, title: str) -> None:
    """Speedup and peak-memory ratio against ``baseline``, bars per case and mode (results with
    ``timings``, ``speedup`` and ``peak_ratio``, as :class:`ProviderRatios`)."""
    providers = [p for p in (list(results[0].timings) if results else []) if p != baseline]
    groups = [f"{r.case.name} {r.mode}" for r in results]
    panels = [
        (
            f"speedup vs {baseline} (t_{baseline} / t per rep, median)",
            "x",
            {p: [r.speedup(p) for r in results] for p in providers},
        ),
        (f"peak memory / {baseline}'s", "ratio", {p: [r.peak_ratio(p) for r in results] for p in providers}),
    ]
    grouped_bars(path, groups, panels, title)


def time_cell(timing: Timing | None, speedup: float | None, baseline: bool, digits: int = 1) -> str:
    """A table cell: median ms, with the speedup over the baseline unless this is the baseline."""
    if timing is None:
        return "skipped"
    text = f"{timing.median * 1e3:.{digits}f}"
    return text if baseline or speedup is None else f"{text} ({speedup:.2f}x)"


def memory_cell(peak: int | None, ratio: float | None, baseline: bool, digits: int = 1) -> str:
    """A table cell: peak MiB, with the ratio to the baseline's peak unless this is the baseline."""
    if peak is None:
        return "n/a"
    text = f"{peak / MiB:.{digits}f}"
    return text if baseline or ratio is None else f"{text} ({ratio:.3f}x)"


def skipped_outside(
    checks: Sequence[dict[str, Any]],
    dtype: torch.dtype,
    device_type: str,
    stated_dtype: torch.dtype = torch.float32,
    stated_device: str = "cpu",
) -> list[dict[str, Any]]:
    """``checks`` as they are, or each a SKIP saying why where the run's dtype or device is not the one the
    targets are stated for (a float64 run's ratios are in its tables, not a verdict on an fp32 target)."""
    if dtype == stated_dtype and device_type == stated_device:
        return list(checks)
    why = f"stated for {stated_dtype} on {stated_device}; this run is {dtype} on {device_type}"
    return [{"target": c["target"], "status": "SKIP", "value": None, "detail": why} for c in checks]


def target_verdict(label: str, value: float | None, ok: Callable[[float], bool]) -> dict[str, Any]:
    """PASS / FAIL, or SKIP when the run did not measure it."""
    status = "SKIP" if value is None else ("PASS" if ok(value) else "FAIL")
    detail = "not measured in this run" if value is None else f"{value:.3f}"
    return {"target": label, "status": status, "value": value, "detail": detail}


def paired_ratio(over: Timing, provider: Timing) -> float:
    """``t_over / t_provider``: the median over reps of the ratio of the two calls made in one rep, when
    both have one sample per rep (:func:`time_interleaved`'s, in rep order), else the ratio of the medians.

    A rep runs every provider once, side by side, so the ratio of one rep cancels what the machine did
    to that rep as a whole (a descheduled core, a neighbour's burst, a trimmed heap); two medians
    taken apart each pick their own reps and do not. Measured on the 13 conv full grids committed before
    this statistic (two CPUs, ``benchmarks/results/conv-cpu-*-full*.json``), over the cases where auto ran
    exactly one provider's computations (the same computations timed twice): this ratio's spread around 1 was
    smaller than the ratio of medians' in 10 runs, equal (to 0.001) in 2 and 0.001 larger in 1; on the
    noisy days it was half (standard deviation 0.081 -> 0.041, 0.062 -> 0.028). It does not hide a real
    difference: the choices auto missed in those runs are below 0.95x by it too.
    """
    a, b = over.samples, provider.samples
    if len(a) != len(b) or len(a) < 2:
        return over.median / provider.median
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


class ProviderRatios:
    """Speedup and memory ratio of a provider over the baseline, for result rows holding
    ``timings`` and ``peaks`` per provider (the class sets ``baseline``)."""

    baseline: str
    timings: Mapping[str, Timing | None]
    peaks: Mapping[str, int | None]

    def speedup(self, name: str, over: str | None = None) -> float | None:
        a, b = self.timings.get(over or self.baseline), self.timings.get(name)
        return None if a is None or b is None else paired_ratio(a, b)

    def peak_ratio(self, name: str, over: str | None = None) -> float | None:
        a, b = self.peaks.get(over or self.baseline), self.peaks.get(name)
        return None if not a or b is None else b / a


def memory_payload(cases, modes, providers, dtype: torch.dtype, device: torch.device, **extra: Any) -> dict[str, Any]:
    """What a family's ``measure_memory`` worker needs to rebuild the run (see ``benchmarks._memory_worker``)."""
    return {
        "cases": [asdict(c) for c in cases],
        "modes": list(modes),
        "providers": list(providers),
        "dtype": str(dtype).removeprefix("torch."),
        "device": str(device),
        "threads": torch.get_num_threads(),
        **extra,
    }


def targets_lines(checks: Sequence[Mapping[str, Any]] | None) -> list[str]:
    """The "## Targets" section of a report (nothing if no targets were checked)."""
    if not checks:
        return []
    return ["", "## Targets", "", "```", *(f"{c['status']:<4}  {c['target']}: {c['detail']}" for c in checks), "```"]
