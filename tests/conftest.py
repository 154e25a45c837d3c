"""Shared test helpers: random quaternion tensors, relative errors, and backend forcing.

The helpers are handed out as session-scoped fixtures (factories) rather than imported, so every
test package can use them without depending on how pytest names this module.
"""

# ruff: noqa: E402  (aqcf_kernels is imported after the environment below is set: triton reads it at import)
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from _threads import intra_op_threads

# Without a GPU, run the Triton kernels in triton's interpreter on CPU tensors. It must be set
# before triton decorates any kernel, i.e. before aqcf_kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

    # ...and there check what it cannot see: alignment hints, accesses outside the tensors
    # (tests/_interpreter_checks.py); and patch triton.language once a launch, not again on each
    # call of a @triton.jit helper (tests/_interpreter_patch_once.py: a fifth of the interpreter's time)
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.path.insert(0, str(Path(__file__).parent))
        import _interpreter_checks
        import _interpreter_patch_once

        _interpreter_checks.install()
        _interpreter_patch_once.install()

# 'auto' measures and remembers its choices (aqcf_kernels.tuning): the suite keeps them in a cache
# file of its own, never in the user's ~/.cache, and child processes (torchrun tests) share it; so are
# the Triton autotuner's timed choices (aqcf_kernels/backends/triton/autotune_cache.py), and
# torch.compile's compiled graphs (Inductor's caches, /tmp/torchinductor_$USER by default): a graph that an
# earlier run cached, from older code, skips Inductor's lowering, where a custom op can fail. The CI
# machine's cache so passed every torch.compile test while an uncached compile failed (make_fallback
# under CI=1, tests/nn/test_aot_inductor.py). Likewise Triton's compiled kernels (~/.triton/cache by
# default; the static tests compile every kernel for sm_90 with triton 3.6): a warm cache from earlier runs
# made the suite ~2x faster there than on a fresh machine (tools/triton_resources.py --igemm: 33 s warm,
# 67 s cold, 2026-12-07), so its times on a developer's machine were not CI's. The folders this process
# makes are removed when its session ends (pytest_sessionfinish); a pytest-xdist worker that inherited the
# variables makes none.
_SUITE_FOLDERS: list[str] = []
if "AQCF_TUNING_CACHE" not in os.environ:
    _SUITE_FOLDERS.append(tempfile.mkdtemp(prefix="aqcf-tests-tuning-"))
    os.environ["AQCF_TUNING_CACHE"] = os.path.join(_SUITE_FOLDERS[-1], "tuning.json")
if "AQCF_TRITON_AUTOTUNE_CACHE" not in os.environ:
    _SUITE_FOLDERS.append(tempfile.mkdtemp(prefix="aqcf-tests-autotune-"))
    os.environ["AQCF_TRITON_AUTOTUNE_CACHE"] = os.path.join(_SUITE_FOLDERS[-1], "autotune.json")
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    _SUITE_FOLDERS.append(tempfile.mkdtemp(prefix="aqcf-tests-inductor-"))
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = _SUITE_FOLDERS[-1]
if "TRITON_CACHE_DIR" not in os.environ:
    _SUITE_FOLDERS.append(tempfile.mkdtemp(prefix="aqcf-tests-triton-"))
    os.environ["TRITON_CACHE_DIR"] = _SUITE_FOLDERS[-1]

from aqcf_kernels import tuning
from aqcf_kernels.backends import registered
from aqcf_kernels.backends._extension import _C
from aqcf_kernels.backends.registry import forget_choices
from aqcf_kernels.ops import conv as conv_ops
from aqcf_kernels.params import check_conv_args


def pytest_configure(config: pytest.Config) -> None:
    # The hunting aid of tests/_force_auto.py, for a whole run (not set in `make test`).
    forced = os.environ.get("AQCF_TEST_FORCE_AUTO", "").strip()
    if forced:
        from _force_auto import force_auto

        config.add_cleanup(_FORCED.close)
        _FORCED.enter_context(force_auto(forced))


_FORCED = contextlib.ExitStack()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    for folder in _SUITE_FOLDERS:
        shutil.rmtree(folder, ignore_errors=True)


#: Modules whose module-scoped fixture is costly (a compile of every kernel variant for sm_90, ~25 s; an
#: export of a trained run, ~9 s): under pytest-xdist each one's tests go to one worker, so that the fixture is
#: computed once instead of once per worker (both workers computed both compiles, ~50 s of a 2-core run).
ONE_WORKER_MODULES = (
    "tests/triton_kernels/test_igemm_static.py",
    "tests/triton_kernels/test_igemm_wgrad_static.py",
    "tests/triton_kernels/test_attention_static.py",
    "tests/pipeline/test_export.py",
)


#: Scheduled first, in this order (then everything else in collection order): the kept-whole modules and the
#: longest single tests (20-100 s each on the 2-core CPU). Collected last (tests/triton_kernels sorts after every
#: other folder), a kept module of ~2 minutes started when the rest of the queue was nearly done, and the other
#: worker waited for it; longest first leaves the short tests to even out the end.
RUN_FIRST = (
    *ONE_WORKER_MODULES,
    "tests/benchmarks/test_gpu_suite.py",
    "tests/models/test_aqcfnet.py",
    "tests/conv/test_native_ops.py",
    "tests/conv/test_func_transforms.py",
    "tests/triton_kernels/test_model_on_triton.py",
    # the reference grids: single hypothesis tests of 5-25 s
    "tests/attention/test_attention_grid.py",
    "tests/nn/test_recurrent_grid.py",
    "tests/nn/test_norm_grid.py",
    "tests/nn/test_unit_grid.py",
    "tests/nn/test_rotation_grid.py",
    "tests/nn/test_pool_grid.py",
    "tests/models/test_aqcfnet_grid.py",
    "tests/pipeline/test_lowerings_grid.py",
    "tests/data/test_data_grid.py",
    "tests/pipeline/test_inference_metrics_grid.py",
    "tests/conv/test_native_served_grid.py",
    "tests/nn/test_torch_nn_parity_grid.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """:data:`RUN_FIRST`'s modules to the front of the run, each keeping its tests' order (a stable sort)."""
    rank = {module: i for i, module in enumerate(RUN_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))


@pytest.hookimpl(optionalhook=True)  # (pytest-xdist's hook: without xdist there is nothing to schedule)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """``--dist load`` (what ``-n`` implies) with :data:`ONE_WORKER_MODULES` kept whole: xdist's scope
    scheduling, each other test a scope of its own (xdist's ``loadgroup`` would do it, but pytest 9.2 ignores
    the node ids it rewrites). Any other ``--dist`` is xdist's own."""
    if config.getoption("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ModuleFixtureScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return module if module in ONE_WORKER_MODULES else nodeid

        def remove_node(self, node):
            """A worker is gone: its unfinished tests go back to the queue but for the one it was running when it
            crashed, which xdist reports failed (as ``--dist load`` does; scope scheduling would run it again, and
            a test that crashes its worker, a segfault, would take down one worker after another)."""
            workload = self.assigned_work.pop(node)
            unfinished = [(scope, test) for scope, unit in workload.items() for test, done in unit.items() if not done]
            if not unfinished:
                return None
            scope, crashed = unfinished[0]
            workload[scope][crashed] = True
            self.workqueue.update((scope, unit) for scope, unit in workload.items() if not all(unit.values()))
            for other in self.assigned_work:
                self._reschedule(other)
            return crashed

    return ModuleFixtureScheduling(config, log)


#: Every registered backend, in a stable order; tests parametrise over all of them and the
#: ``backend`` fixture skips (with the backend's own reason) those that cannot run here.
BACKEND_NAMES = sorted(registered())


def cpp_required() -> bool:
    """CI sets ``AQCF_REQUIRE_CPP=1`` after building the extension: then a missing ``cpp`` is a failure."""
    return os.environ.get("AQCF_REQUIRE_CPP", "").strip() == "1"


def make_quaternion(
    *shape: int,
    dim: int = 1,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    real_dominant: bool = False,
    requires_grad: bool = False,
) -> torch.Tensor:
    """A fresh random (never zero) quaternion tensor, blocked ``[r | i | j | k]`` along ``dim``.

    Values are drawn in float64 from a private generator (so tests never depend on the global RNG
    or on each other) and only then cast: the same seed gives the same numbers in every dtype.
    With ``real_dominant`` the imaginary blocks are scaled by 0.01, the regime in which fast8's
    component-wise error is largest (its sums mix a big real part into small imaginary ones).
    """
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(*shape, generator=g, dtype=torch.float64)
    if real_dominant:
        blocks = t.unflatten(dim, (4, -1))  # (..., 4, Cq, ...): index 0 along `dim` is the real block
        blocks[(slice(None),) * dim + (slice(1, None),)] *= 0.01
        t = blocks.flatten(dim, dim + 1)
    return t.to(dtype).requires_grad_(requires_grad)


def rel_error(out: torch.Tensor, ref: torch.Tensor, dim: int = 1) -> dict[str, float]:
    """‖out − ref‖ / ‖ref‖ over the whole tensor ('all') and per component ('r', 'i', 'j', 'k').

    Computed in float64 so the measurement does not add error of its own; ``dim`` is the blocked
    quaternion dim (1 for feature maps, 0 for weights).
    """
    out, ref = out.detach().double(), ref.detach().double()
    assert out.shape == ref.shape, (out.shape, ref.shape)
    errors = {"all": ((out - ref).norm() / ref.norm()).item()}
    for name, o, r in zip("rijk", out.chunk(4, dim), ref.chunk(4, dim), strict=True):
        errors[name] = ((o - r).norm() / r.norm()).item()
    return errors


def skip_unless_served(backend: str, input: torch.Tensor, weight: torch.Tensor, algorithm: str, **conv_kwargs) -> None:
    """Skip, with the backend's own reason, a call the forced backend declares it cannot serve.

    Backends may decline calls (the triton backend has no float64, say); forcing one through
    ``AQCF_BACKEND`` then raises. That is a declared limitation, so the test is skipped visibly
    (``pytest -rs``) instead of failing, while everything the backend accepts is held to the contract.
    """
    kw = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1, "transposed": False, "output_padding": 0}
    p, _ = check_conv_args(
        input, weight, None, spatial_dims=weight.dim() - 3, algorithm=algorithm, **{**kw, **conv_kwargs}
    )
    resolved = "hamilton" if algorithm == "auto" else algorithm
    why = registered()[backend].cannot_serve(input, weight, p, resolved)
    if why is not None:
        pytest.skip(f"backend {backend!r} declines this call ({input.dtype}, {resolved}): {why}")


@pytest.fixture(scope="session")
def served():
    """Factory fixture: :func:`skip_unless_served`."""
    return skip_unless_served


@pytest.fixture(scope="session")
def qrand():
    """Factory fixture: :func:`make_quaternion`."""
    return make_quaternion


@pytest.fixture(scope="session")
def rel_errors():
    """Factory fixture: :func:`rel_error` (whole tensor and per component)."""
    return rel_error


@pytest.fixture(params=BACKEND_NAMES)
def backend(request, monkeypatch) -> str:
    """Force one registered backend through ``AQCF_BACKEND`` for the whole test.

    An unavailable backend is skipped with its own reason (visible in ``pytest -rs``), except ``cpp``,
    ``cpp_cl`` and ``cpp_im2col`` under ``AQCF_REQUIRE_CPP=1``, which fail: CI built it, so its absence is a bug.
    A backend that does not serve CPU tensors at all is skipped too: these are CPU tests.
    """
    name = request.param
    impl = registered()[name]
    why = impl.unavailable()
    if why is not None:
        if name in ("cpp", "cpp_cl", "cpp_im2col") and cpp_required():
            pytest.fail(f"AQCF_REQUIRE_CPP=1 but the cpp backend is unavailable: {why}")
        pytest.skip(f"backend {name!r} unavailable: {why}")
    if "cpu" not in impl.device_types:
        pytest.skip(f"backend {name!r} does not serve CPU tensors (serves {', '.join(impl.device_types)})")
    monkeypatch.setenv("AQCF_BACKEND", name)
    return name


# Thread count. Tiny tensors (gradcheck, the hypothesis grid, tiny models) gain nothing from
# intra-op threads and, on a 2-core machine shared with other jobs, each parallel op can stall on
# its second thread: gradcheck of a 1d conv took 23 s with 2 threads and 1.3 s with 1. Modules opt
# in with ``pytestmark = pytest.mark.usefixtures("single_threaded")``; realistically sized accuracy
# tests use ``all_threads`` so multi-threaded kernels are held to the contract too.
# ``AQCF_TEST_THREADS`` overrides the single thread.
_DEFAULT_THREADS = torch.get_num_threads()


# The tuning's state (tests/conv/test_tuning.py, tests/test_force_auto.py).


@pytest.fixture
def cache(tmp_path: Path, monkeypatch) -> Path:
    """A fresh, empty tuning cache file and an empty in-process memory, in 'measure' mode."""
    path = tmp_path / "tuning.json"
    monkeypatch.setenv("AQCF_TUNING_CACHE", str(path))
    monkeypatch.setattr(tuning, "mode", "measure")
    monkeypatch.setattr(tuning, "_warned", set())
    tuning.clear()
    yield path
    tuning.clear()


@pytest.fixture
def measured(monkeypatch) -> list[list[str]]:
    """Records the candidates of every measurement (one list per measured signature)."""
    calls: list[list[str]] = []
    real = tuning._measure

    def spy(candidates, run, device, prior):
        calls.append([str(c) for c in candidates])
        return real(candidates, run, device, prior)

    monkeypatch.setattr(tuning, "_measure", spy)
    return calls


@pytest.fixture
def single_threaded():
    """Run the test with one intra-op thread (or ``AQCF_TEST_THREADS``)."""
    n = int(os.environ.get("AQCF_TEST_THREADS", "1"))
    with intra_op_threads(n):
        yield n


@pytest.fixture
def all_threads():
    """Run the test with torch's default intra-op thread count (what users get)."""
    with intra_op_threads(_DEFAULT_THREADS):
        yield _DEFAULT_THREADS


@pytest.fixture
def fresh_dynamo():
    """torch.compile's state (compiled graphs, the sizes each code object has seen) reset before and after the
    test: dynamo keys that state by code object, so a test compiling a layer with dynamic shapes would make a
    later test's compile of the same layer class dynamic too ("automatic dynamic"), and the other way round."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def no_vmap_fallback():
    """torch.func.vmap raises where an op has no batching rule, instead of looping over the slices with a
    warning (to stderr, which no test reads)."""
    torch._C._functorch._set_vmap_fallback_enabled(False)
    try:
        yield
    finally:
        torch._C._functorch._set_vmap_fallback_enabled(True)


@pytest.fixture(autouse=True)
def _no_remembered_native_choices():
    """Each test starts with no conv candidates or choices remembered (by the registry, and by the compiled
    extension, csrc/cpu/op.h): a test that replaces a backend's methods must see its own replacement asked,
    not a choice another test made."""
    forget_choices()


class CountingFallbacks:
    """The Python implementations of the conv ops, counting how often the extension's kernels ask them
    (``weight_grad`` counts qconv_weight_grad and qconv_weight_bias_grad: each is the weight gradient)."""

    def __init__(self) -> None:
        self.conv = self.weight_grad = 0

    def qconv(self, *args):
        self.conv += 1
        return conv_ops.qconv(*args)

    def qconv_weight_grad(self, *args):
        self.weight_grad += 1
        return conv_ops.qconv_weight_grad(*args)

    def qconv_weight_bias_grad(self, *args):
        self.weight_grad += 1
        return conv_ops.qconv_weight_bias_grad(*args)


@pytest.fixture
def asked():
    """The extension's op kernels ask :class:`CountingFallbacks` instead of the Python implementations (so
    a test sees which calls left C++); no choice remembered at the start. Needs the compiled extension."""
    if not conv_ops.NATIVE:
        pytest.skip("aqcf_kernels._C is not built")
    counter = CountingFallbacks()
    _C._set_fallbacks(counter.qconv, counter.qconv_weight_grad, counter.qconv_weight_bias_grad)
    forget_choices()
    try:
        yield counter
    finally:
        _C._set_fallbacks(conv_ops.qconv, conv_ops.qconv_weight_grad, conv_ops.qconv_weight_bias_grad)
        forget_choices()


def _run_without_extension(*test_files: str, check: str | None = None) -> None:
    """Run ``test_files`` in a fresh interpreter with ``AQCF_NO_EXTENSION=1`` (the ops as Python defines
    them, on this machine that has the extension); ``check`` (Python source) runs first, to prove the
    switch took. Fails with the run's output unless every test passed or skipped and one passed."""
    env = {k: v for k, v in os.environ.items() if k != "AQCF_REQUIRE_CPP"}
    env["AQCF_NO_EXTENSION"] = "1"
    root = Path(__file__).resolve().parents[1]
    if check is not None:
        subprocess.run([sys.executable, "-c", check], env=env, cwd=root, check=True)
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-p", "no:xdist", *test_files],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout


@pytest.fixture(scope="session")
def without_extension():
    """Factory fixture: :func:`_run_without_extension`."""
    return _run_without_extension


@contextlib.contextmanager
def _counting_fallbacks(set_fallbacks, module, names, *others):
    """The extension's op kernels ask counting wrappers of ``module``'s functions ``names`` (passed to
    ``set_fallbacks`` in that order, then ``others`` as they are) for as long as the context lasts;
    nothing is remembered at its start and end. Yields ``{name: times asked}``."""
    asked = dict.fromkeys(names, 0)

    def counted(name):
        def call(*args):
            asked[name] += 1
            return getattr(module, name)(*args)

        return call

    set_fallbacks(*(counted(name) for name in names), *others)
    forget_choices()
    try:
        yield asked
    finally:
        set_fallbacks(*(getattr(module, name) for name in names), *others)
        forget_choices()


@pytest.fixture(scope="session")
def counting_fallbacks():
    """Factory fixture: :func:`_counting_fallbacks`."""
    return _counting_fallbacks


@pytest.fixture
def poisoned_allocations():
    """Every tensor made without values (``torch.empty`` and kin: the launchers' outputs and partial
    buffers) starts as NaN (integers at their maximum), PyTorch's own ``fill_uninitialized_memory`` under
    deterministic mode: a kernel that reads an element no launch wrote fails its test here, where fresh
    host memory would often read as zeros and pass, while a GPU's caching allocator hands back old data.
    (``warn_only``: no aten op here raises for lacking a deterministic kernel.)"""
    was = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    assert torch.utils.deterministic.fill_uninitialized_memory
    yield
    torch.use_deterministic_algorithms(was[0], warn_only=was[1])
