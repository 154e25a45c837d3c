"""Every tile config the Triton conv kernels may be autotuned to, run against reference.py, and how
``AQCF_TRITON_AUTOTUNE`` chooses the configs of a call.

The static tests (test_*_static.py) prove that each config compiles for sm_90 without spilling; these
prove that each computes the right thing. Under triton's interpreter (CPU) the launchers otherwise run
one big-tile config, and on a GPU the autotuner runs whichever config is fastest, so without this
file most configs would never run anywhere before a user's call picks them. Each kernel of
``common.AUTOTUNED`` runs every GPU config (the set the autotuner is built with, before any pruning)
on a case with partial tiles in every dimension for tiles of 32 to 128 (126 output pixels, 36 real
channels in and out), hamilton and fast8, in fp32 against the float64 reference: the implicit GEMM's
forward, its weight gradient with the bias, and the first design's forward and weight gradient. The
GPU configs' grouped tile order (8 row tiles to a band) gets a case of its own with a partial band.
``benchmarks/gpu_suite.sh`` runs the GPU tests with ``AQCF_TRITON_AUTOTUNE=first`` (one config per
shape, untimed), so on a GPU too this is where every config runs.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from aqcf_kernels import reference
from aqcf_kernels.backends import registered
from aqcf_kernels.params import ConvParams

from .test_igemm import _rel

TRITON = registered()["triton"]
pytestmark = pytest.mark.skipif(
    TRITON.unavailable() is not None, reason=f"triton backend unavailable: {TRITON.unavailable()}"
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if TRITON.unavailable() is None:
    from aqcf_kernels.backends.triton import common, igemm, igemm_wgrad
    from aqcf_kernels.backends.triton import conv as conv_v1

    AUTOTUNED = dict(common.AUTOTUNED)
else:
    AUTOTUNED = {}

#: a 1x3 "same" conv, 9 quaternion channels in and out, 2 images of 9x7: 126 output pixels and 36 real
#: channels per side, partial for tiles of 32, 64 and 128 (fast8: 9 channels per product); 3 taps (the
#: interpreter's time grows with them, and no tile depends on their count)
PARAMS = ConvParams(2, (1, 1), (0, 1), (1, 1), False, (0, 0), 1)
CQ, SPATIAL, KERNEL = 9, (9, 7), (1, 3)
TOLERANCE = {"hamilton": 1e-5, "fast8": 5e-4}  # the fp32 contracts


def _inputs():
    g = torch.Generator().manual_seed(2026)
    x = torch.randn(2, 4 * CQ, *SPATIAL, generator=g, dtype=torch.float64)
    w = torch.randn(4, CQ, CQ, *KERNEL, generator=g, dtype=torch.float64) / 4
    b = torch.randn(4 * CQ, generator=g, dtype=torch.float64)
    gy = torch.randn(2, 4 * CQ, *SPATIAL, generator=g, dtype=torch.float64)
    return x, w, b, gy


def _reference(x, w, b, gy):
    """``(y, grad_weight, grad_bias)`` of the conv by autograd through the naive reference."""
    w, b = w.detach().requires_grad_(), b.detach().requires_grad_()
    y = reference.quaternion_conv_naive(x, w, b, padding=PARAMS.padding)
    y.backward(gy)
    return y.detach(), w.grad, b.grad


def _forward_igemm(x, w, b, gy, algorithm):
    return {"y": igemm.conv_igemm(x, w, b, PARAMS, algorithm=algorithm)[0]}


def _wgrad_igemm(x, w, b, gy, algorithm):
    gw, gb = igemm_wgrad.conv_weight_grad_igemm(x, gy, w.shape, PARAMS, True, splits=2, algorithm=algorithm)
    return {"grad_weight": gw, "grad_bias": gb}


def _forward_v1(x, w, b, gy, algorithm):
    return {"y": conv_v1.conv(x, w, b, PARAMS, algorithm)}


def _wgrad_v1(x, w, b, gy, algorithm):
    return {"grad_weight": conv_v1.conv_weight_grad(x, gy, w.shape, PARAMS, algorithm)}


#: the launcher that runs each autotuned kernel, and what it returns
LAUNCHERS = {
    "qconv_igemm_kernel": _forward_igemm,
    "qconv_wgrad_igemm_kernel": _wgrad_igemm,
    "qconv_kernel": _forward_v1,
    "qconv_wgrad_kernel": _wgrad_v1,
}


def _config_id(name: str, config) -> str:
    tiles = "x".join(str(v) for k, v in config.kwargs.items() if k.startswith("BLOCK"))
    return f"{name}-{tiles}-w{config.num_warps}-s{config.num_stages}"


CONFIG_CASES = [(name, i) for name, (_, configs) in AUTOTUNED.items() for i in range(len(configs))]
CONFIG_IDS = [_config_id(name, AUTOTUNED[name][1][i]) for name, i in CONFIG_CASES]


def test_every_autotuned_kernel_has_a_launcher_here():
    """A kernel added to the autotuned set without a launcher here would have its configs run nowhere."""
    assert set(AUTOTUNED) == set(LAUNCHERS)


@pytest.mark.parametrize("algorithm", ["hamilton", "fast8"])
@pytest.mark.parametrize(("name", "index"), CONFIG_CASES, ids=CONFIG_IDS)
def test_every_gpu_config_matches_the_reference(name, index, algorithm, monkeypatch):
    tuner, configs = AUTOTUNED[name]
    # one config left: the autotuner runs it without pruning or timing, on a GPU and in the interpreter
    monkeypatch.setattr(tuner, "configs", [configs[index]])
    x, w, b, gy = _inputs()
    y, gw, gb = _reference(x, w, b, gy)
    want = {"y": y, "grad_weight": gw, "grad_bias": gb}
    to = dict(dtype=torch.float32, device=DEVICE)
    got = LAUNCHERS[name](x.to(**to), w.to(**to), b.to(**to), gy.to(**to), algorithm)
    for key, out in got.items():
        assert out.dtype == torch.float32 and out.shape == want[key].shape, key
        err = _rel(out, want[key])
        assert err <= TOLERANCE[algorithm], f"{key}: relative error {err:.2e} with {configs[index]}"


def test_grouped_tile_order_with_a_partial_band_of_the_gpu_configs(monkeypatch):
    """10 row tiles of 32 (2 images of 15x10) with the GPU configs' GROUP_M = 8: a band of 8 and one of 2,
    each sweeping both column tiles."""
    tuner, configs = AUTOTUNED["qconv_igemm_kernel"]
    config = next(c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) == (32, 32))
    assert config.kwargs["GROUP_M"] == 8
    monkeypatch.setattr(tuner, "configs", [config])
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 4 * CQ, 15, 10, generator=g, dtype=torch.float64)
    w = torch.randn(4, CQ, CQ, *KERNEL, generator=g, dtype=torch.float64) / 4
    want = reference.quaternion_conv_naive(x, w, None, padding=PARAMS.padding)
    got = igemm.conv_igemm(x.to(DEVICE, torch.float32), w.to(DEVICE, torch.float32), None, PARAMS)[0]
    assert _rel(got, want) <= TOLERANCE["hamilton"]


# ------------------------------------------------------------------------------------------------
# AQCF_TRITON_AUTOTUNE: how the configs of a call are chosen
# ------------------------------------------------------------------------------------------------


def _gpu_tuner(monkeypatch, prune):
    """An autotuner built as on a GPU (the interpreter flag off; nothing compiles until a launch)."""
    import triton
    import triton.language as tl

    @triton.jit
    def scale_kernel(x_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, 2 * tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)

    monkeypatch.setattr(common, "INTERPRET", False)
    monkeypatch.setattr(common, "AUTOTUNED", {})
    configs = [triton.Config({"BLOCK": b}) for b in (32, 64, 128)]
    launcher = common.autotuned(
        scale_kernel, gpu_configs=configs, interpreter_config={"BLOCK": 32}, key=["n"], prune=prune
    )
    return launcher.tuner, configs


def _record_precompiles(monkeypatch) -> list:
    calls = []
    monkeypatch.setattr(common, "precompile", lambda kernel, configs, named_args, meta: calls.append(configs))
    return calls


def test_autotune_on_compiles_the_configs_that_fit_in_parallel_then_times_them(monkeypatch):
    monkeypatch.delenv("AQCF_TRITON_AUTOTUNE", raising=False)
    precompiled = _record_precompiles(monkeypatch)
    tuner, configs = _gpu_tuner(monkeypatch, prune=lambda configs, named_args, **meta: configs[1:])
    assert tuner.early_config_prune(configs, {"n": 100}) == configs[1:]
    assert precompiled == [configs[1:]]
    assert common.AUTOTUNED["scale_kernel"] == (tuner, configs)


def test_autotune_first_keeps_the_first_config_that_fits_and_times_nothing(monkeypatch):
    monkeypatch.setenv("AQCF_TRITON_AUTOTUNE", "first")
    seen = []

    def prune(configs, named_args, **meta):
        seen.append((named_args, meta))
        return configs[1:]

    precompiled = _record_precompiles(monkeypatch)
    tuner, configs = _gpu_tuner(monkeypatch, prune)
    assert tuner.early_config_prune(configs, {"n": 100}, BLOCK_HINT=1) == [configs[1]]
    assert seen == [({"n": 100}, {"BLOCK_HINT": 1})]  # the kernel's own pruning still decides what fits
    assert precompiled == []  # one config: compiled when it runs

    def launch():
        raise AssertionError("a lone config is not timed")

    assert tuner.do_bench(launch, quantiles=(0.5, 0.2, 0.8)) == [0.0, 0.0, 0.0]


def test_autotune_on_times_nothing_when_one_config_fits(monkeypatch):
    """A prune that keeps one config leaves nothing to compare: it is not timed (triton would, ~0.125 s a
    shape) nor precompiled; two kept are timed again."""
    import triton

    monkeypatch.delenv("AQCF_TRITON_AUTOTUNE", raising=False)
    precompiled = _record_precompiles(monkeypatch)
    tuner, configs = _gpu_tuner(monkeypatch, prune=lambda configs, named_args, **meta: configs[named_args["n"] :])
    timed = []
    benchmarker = SimpleNamespace(get_benchmarker=lambda: lambda call, quantiles: timed.append(1))
    monkeypatch.setattr(triton.runtime.driver, "_active", benchmarker)  # (what triton's active driver times with)

    def launch():
        raise AssertionError("a lone config is not launched to be timed")

    assert tuner.early_config_prune(configs, {"n": 2}) == configs[2:] and precompiled == []
    assert tuner.do_bench(launch, quantiles=(0.5, 0.2, 0.8)) == [0.0, 0.0, 0.0] and timed == []
    assert tuner.early_config_prune(configs, {"n": 1}) == configs[1:] and precompiled == [configs[1:]]
    tuner.do_bench(launch, quantiles=(0.5,))
    assert timed == [1]


class _LaunchRecorder:
    """Stands for the JIT kernel's launch: records each ``run`` (its arguments and keywords)."""

    def __init__(self):
        self.calls = []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))


def _launcher_without_a_gpu(monkeypatch, prune=lambda configs, named_args, **meta: configs[1:]):
    """A GPU-built launcher whose JIT launches are recorded, not run; ``first`` mode, so the autotuner
    chooses without timing anything."""
    monkeypatch.setenv("AQCF_TRITON_AUTOTUNE", "first")
    tuner, configs = _gpu_tuner(monkeypatch, prune)
    launches = _LaunchRecorder()
    monkeypatch.setattr(tuner.fn, "run", launches)
    return common.TunedLauncher(tuner), tuner, configs, launches


def _count_calls(monkeypatch, obj, name: str) -> list:
    calls, real = [], getattr(obj, name)

    def counted(*args, **kwargs):
        calls.append(kwargs.get("grid"))
        return real(*args, **kwargs)

    monkeypatch.setattr(obj, name, counted)
    return calls


def test_tuned_launcher_launches_a_tuned_key_with_the_autotuners_choice(monkeypatch):
    """The first call of a key goes through the autotuner; later ones launch its cached choice directly,
    with the same arguments, grid and config as the autotuner's own launch."""
    launcher, tuner, configs, launches = _launcher_without_a_gpu(monkeypatch)
    through_tuner = _count_calls(monkeypatch, tuner, "run")
    x = torch.ones(5)
    launcher[(3,)](x, 100, FLAG=True)
    assert through_tuner == [(3,)] and list(tuner.cache.values()) == [configs[1]]
    assert list(tuner.cache) == [launcher.key((x, 100), {"FLAG": True})]  # the autotuner's own key
    launcher[(4,)](x, 100, FLAG=True)
    assert through_tuner == [(3,)]  # not asked again
    (args0, kw0), (args1, kw1) = launches.calls
    assert args0 == args1 == (x, 100)
    assert kw1 == dict(kw0, grid=(4,)) and kw1["BLOCK"] == 64 and kw1["warmup"] is False


def test_tuned_launcher_key_is_the_autotuners_for_values_and_dtypes(monkeypatch):
    """The key holds the key arguments' values then every argument's dtype: another size or dtype is
    another key, tuned by the autotuner; the same ones are found in its cache."""
    launcher, tuner, _, launches = _launcher_without_a_gpu(monkeypatch)
    through_tuner = _count_calls(monkeypatch, tuner, "run")
    x32, x16 = torch.ones(5), torch.ones(5, dtype=torch.float16)
    for x, n in ((x32, 100), (x32, 101), (x16, 100), (x32, 100), (x16, 100), (x32, 101)):
        launcher[(1,)](x, n)
    assert len(through_tuner) == 3 and len(launches.calls) == 6
    assert set(tuner.cache) == {(100, "torch.float32"), (101, "torch.float32"), (100, "torch.float16")}
    assert launcher.key((x16, 100), {}) == (100, "torch.float16")


def test_tuned_launcher_follows_the_autotuners_cache_and_configs(monkeypatch):
    """What the autotuner would launch, launched: a cleared cache tunes again, a set patched to one config
    (as the GPU config tests do) runs that config, and a config with a pre_hook goes through the autotuner,
    which runs the hook."""
    import triton

    launcher, tuner, configs, launches = _launcher_without_a_gpu(monkeypatch)
    through_tuner = _count_calls(monkeypatch, tuner, "run")
    x = torch.ones(5)
    launcher[(1,)](x, 100)
    monkeypatch.setattr(tuner, "cache", {})
    launcher[(1,)](x, 100)
    assert len(through_tuner) == 2
    monkeypatch.setattr(tuner, "configs", [configs[2]])
    launcher[(1,)](x, 100)
    assert len(through_tuner) == 3 and launches.calls[-1][1]["BLOCK"] == 128
    hooked = []
    with_hook = triton.Config({"BLOCK": 32}, pre_hook=lambda nargs: hooked.append(nargs["n"]))
    monkeypatch.setattr(tuner, "configs", [with_hook, configs[1]])
    tuner.cache[launcher.key((x, 100), {})] = with_hook
    launcher[(1,)](x, 100)
    assert len(through_tuner) == 4 and hooked == [100] and launches.calls[-1][1]["BLOCK"] == 32


# ------------------------------------------------------------------------------------------------
# The autotuner's choices kept on disk for later processes (autotune_cache)
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def kept_choices(monkeypatch, tmp_path):
    """A GPU-built launcher in ``on`` mode whose trials rate ``BLOCK`` 128 fastest without a GPU (the JIT's
    launches and the precompiles recorded), its choices kept in a file of this test's, on a named GPU."""
    from aqcf_kernels.backends.triton import autotune_cache

    monkeypatch.setenv("AQCF_TRITON_AUTOTUNE", "on")
    path = tmp_path / "autotune.json"
    monkeypatch.setenv("AQCF_TRITON_AUTOTUNE_CACHE", str(path))
    monkeypatch.setattr(autotune_cache, "current_gpu", lambda: "NVIDIA H200/132sm/9.0")
    monkeypatch.setattr(autotune_cache, "_loaded", {})
    precompiled = _record_precompiles(monkeypatch)
    tuner, configs = _gpu_tuner(monkeypatch, prune=lambda configs, named_args, **meta: configs)
    launches = _LaunchRecorder()
    monkeypatch.setattr(tuner.fn, "run", launches)
    trials = []

    def do_bench(kernel_call, quantiles):  # the config being timed is the one its launch receives
        kernel_call()
        trials.append(launches.calls[-1][1]["BLOCK"])
        return [1.0 if trials[-1] == 128 else 2.0] * len(quantiles)

    monkeypatch.setattr(tuner, "do_bench", do_bench)

    def new_process():
        """What a later process has: the file, and an autotuner that has timed nothing."""
        monkeypatch.setattr(tuner, "cache", {})
        autotune_cache.forget()
        precompiled.clear(), trials.clear(), launches.calls.clear()

    return SimpleNamespace(
        launcher=common.TunedLauncher(tuner), tuner=tuner, configs=configs, path=path, trials=trials,
        precompiled=precompiled, launches=launches, new_process=new_process, cache=autotune_cache,
    )  # fmt: skip


def test_a_timed_choice_is_launched_by_a_later_process_without_timing(kept_choices):
    k = kept_choices
    x = torch.ones(5)
    assert k.launcher.tuned_config((x, 100), {}) is None
    k.launcher[(2,)](x, 100)
    assert sorted(k.trials) == [32, 64, 128] and k.precompiled == [k.configs]
    assert str(k.configs[2]) in k.path.read_text()
    k.new_process()
    assert k.launcher.tuned_config((x, 100), {}) is k.configs[2]  # (known before the launch: buffers sized by it)
    k.launcher[(2,)](x, 100)
    assert k.trials == [] and k.precompiled == []
    assert [kw["BLOCK"] for _, kw in k.launches.calls] == [128] and k.launches.calls[0][1]["grid"] == (2,)
    k.launcher[(2,)](x, 101)  # another shape is timed, and kept beside the first
    assert sorted(k.trials) == [32, 64, 128]
    assert len(json.loads(k.path.read_text())["choices"]) == 2


def test_a_kept_choice_serves_only_its_gpu_kernel_and_config_set(kept_choices, monkeypatch):
    k = kept_choices
    x = torch.ones(5)
    k.launcher[(1,)](x, 100)
    for change in (
        lambda: monkeypatch.setattr(k.cache, "current_gpu", lambda: "NVIDIA H100 80GB HBM3/132sm/9.0"),
        lambda: monkeypatch.setattr(k.tuner, "configs", k.configs[:2]),  # another config set
        lambda: monkeypatch.setattr(k.cache, "source_hash", lambda fn: "0" * 16),  # the kernel edited
    ):
        k.new_process()
        change()
        k.launcher[(1,)](x, 100)
        assert k.trials, "timed again"


def test_a_kept_config_the_set_lacks_is_timed_again(kept_choices):
    k = kept_choices
    k.launcher[(1,)](torch.ones(5), 100)
    k.path.write_text(k.path.read_text().replace("BLOCK: 128", "BLOCK: 256"))  # (an edited file)
    k.new_process()
    k.launcher[(1,)](torch.ones(5), 100)
    assert sorted(k.trials) == [32, 64, 128] and k.launches.calls[-1][1]["BLOCK"] == 128


def test_first_mode_neither_keeps_nor_reads_and_off_keeps_nothing(kept_choices, monkeypatch):
    k = kept_choices
    x = torch.ones(5)
    monkeypatch.setenv("AQCF_TRITON_AUTOTUNE", "first")  # an untimed pick is not a choice to keep
    k.launcher[(1,)](x, 100)
    assert not k.path.exists()
    k.new_process()
    monkeypatch.setenv("AQCF_TRITON_AUTOTUNE", "on")
    monkeypatch.setenv("AQCF_TRITON_AUTOTUNE_CACHE", "off")
    k.launcher[(1,)](x, 100)
    assert sorted(k.trials) == [32, 64, 128] and not k.path.exists()
    k.new_process()
    monkeypatch.setenv("AQCF_TRITON_AUTOTUNE_CACHE", str(k.path))
    k.launcher[(1,)](x, 100)  # timed and kept: 128
    k.new_process()
    monkeypatch.setenv("AQCF_TRITON_AUTOTUNE", "first")  # the first config that fits, as always
    k.launcher[(1,)](x, 100)
    assert [kw["BLOCK"] for _, kw in k.launches.calls] == [32]


def test_a_corrupt_file_is_ignored_with_a_warning_and_rewritten(kept_choices):
    k = kept_choices
    k.path.write_text("{not json")
    with pytest.warns(RuntimeWarning, match="ignoring the corrupt cache file"):
        k.launcher[(1,)](torch.ones(5), 100)
    assert sorted(k.trials) == [32, 64, 128]
    k.new_process()
    k.launcher[(1,)](torch.ones(5), 100)
    assert k.trials == []


def test_one_file_for_both_caches_keeps_both_kinds_of_entries(kept_choices):
    """``AQCF_TUNING_CACHE`` and ``AQCF_TRITON_AUTOTUNE_CACHE`` pointed at one file: each cache's writes keep
    the other's entries, and each reads its own kind."""
    from aqcf_kernels import tuning

    k = kept_choices
    k.launcher[(1,)](torch.ones(5), 100)
    tuning.write_cache_entry(k.path, "conv:signature", {"backend": "cpp", "algorithm": "fast8"})
    assert list(tuning.read_cache_file(k.path)) == ["conv:signature"]
    k.new_process()
    k.launcher[(1,)](torch.ones(5), 100)
    assert k.trials == []


def test_the_file_lives_in_tritons_cache_directory_by_default(monkeypatch, tmp_path):
    from aqcf_kernels import tuning
    from aqcf_kernels.backends.triton import autotune_cache

    monkeypatch.delenv("AQCF_TRITON_AUTOTUNE_CACHE", raising=False)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    path = autotune_cache.cache_path()
    assert path == tmp_path / "aqcf_kernels" / f"autotune-{tuning._fingerprint_hash()}.json"
    for off in ("off", "0", "none", ""):
        monkeypatch.setenv("AQCF_TRITON_AUTOTUNE_CACHE", off)
        assert autotune_cache.cache_path() is None


def test_every_triton_launcher_launches_through_a_tuned_launcher():
    """The launchers' autotuned kernels are :class:`common.TunedLauncher` s of the autotuners in
    ``common.AUTOTUNED`` (a launcher holding the bare autotuner would pay its per-call key again)."""
    launchers = [igemm._igemm, igemm_wgrad._wgrad_igemm, conv_v1._qconv_forward, conv_v1._qconv_wgrad]
    assert all(isinstance(launcher, common.TunedLauncher) for launcher in launchers)
    assert {id(launcher.tuner) for launcher in launchers} == {id(tuner) for tuner, _ in AUTOTUNED.values()}


def test_host_cdiv_and_next_power_of_2_match_triton():
    import triton

    for a in (0, 1, 63, 64, 65, 1000):
        for b in (1, 7, 64):
            assert common.cdiv(a, b) == triton.cdiv(a, b)
    for n in (0, 1, 2, 3, 9, 16, 17, 40, 64, 65, 1000, 2**20 + 1):
        assert common.next_power_of_2(n) == triton.next_power_of_2(n), n


def test_autotune_mode_names_the_variable_on_a_bad_value(monkeypatch):
    monkeypatch.setenv("AQCF_TRITON_AUTOTUNE", "fastest")
    with pytest.raises(ValueError, match=r"AQCF_TRITON_AUTOTUNE='fastest': expected one of on, first"):
        common.autotune_mode()


def test_compile_threads_default_to_the_cpus_of_this_process(monkeypatch):
    import os

    monkeypatch.delenv("AQCF_TRITON_COMPILE_THREADS", raising=False)
    assert common.compile_threads() == len(os.sched_getaffinity(0))
    monkeypatch.setenv("AQCF_TRITON_COMPILE_THREADS", "3")
    assert common.compile_threads() == 3
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("AQCF_TRITON_COMPILE_THREADS", bad)
        with pytest.raises(ValueError, match=f"AQCF_TRITON_COMPILE_THREADS='{bad}': expected a whole number"):
            common.compile_threads()


class _WarmupRecorder:
    """Stands for a JITFunction: records each ``warmup`` (compile, no launch) and whether triton's
    AsyncCompileMode was active (its compiles then go to the pool)."""

    def __init__(self, error: Exception | None = None):
        self.calls, self.async_modes, self.error = [], [], error
        self.fn = SimpleNamespace(__name__="recorded_kernel")

    def warmup(self, *args, **kwargs):
        from triton.runtime import _async_compile

        if self.error is not None:
            raise self.error
        self.calls.append((args, kwargs))
        self.async_modes.append(_async_compile.active_mode.get())


def _configs():
    import triton

    return [triton.Config({"BLOCK": b}, num_warps=w) for b, w in ((32, 4), (64, 4), (128, 8))]


def test_precompile_warms_each_config_with_the_call_arguments_under_async_compile(monkeypatch):
    monkeypatch.setenv("AQCF_TRITON_COMPILE_THREADS", "4")
    kernel, configs, x = _WarmupRecorder(), _configs(), torch.ones(3)
    # the autotuner's run() passes the launch's grid and warmup flag with the constexprs: not for warmup
    common.precompile(kernel, configs, {"x_ptr": x, "n": 100}, {"FLAG": True, "grid": (7,), "warmup": False})
    assert [kw for _, kw in kernel.calls] == [dict(grid=(1,), FLAG=True, **c.all_kwargs()) for c in configs]
    assert all(args[0] is x and args[1:] == (100,) for args, _ in kernel.calls)
    assert all(mode is not None for mode in kernel.async_modes)


def test_precompile_leaves_one_config_or_one_thread_to_the_autotuner(monkeypatch):
    kernel = _WarmupRecorder()
    monkeypatch.setenv("AQCF_TRITON_COMPILE_THREADS", "4")
    common.precompile(kernel, _configs()[:1], {"n": 100}, {})
    monkeypatch.setenv("AQCF_TRITON_COMPILE_THREADS", "1")
    common.precompile(kernel, _configs(), {"n": 100}, {})
    assert kernel.calls == []


def test_precompile_that_fails_warms_nothing_and_says_so(monkeypatch):
    monkeypatch.setenv("AQCF_TRITON_COMPILE_THREADS", "4")
    kernel = _WarmupRecorder(error=RuntimeError("0 active drivers"))
    with pytest.warns(RuntimeWarning, match=r"compiling 3 configs of recorded_kernel in parallel failed .*0 active"):
        common.precompile(kernel, _configs(), {"n": 100}, {})


@pytest.mark.skipif(not torch.cuda.is_available() or common.INTERPRET, reason="a GPU launch (autotuning)")
def test_autotune_first_on_a_gpu_launch(monkeypatch):
    """A real call in ``first`` mode tries one config for a new shape; ``on`` compiles several in parallel
    (a failure there would only warn: here it is an error) and compares them."""
    import warnings

    tuner, _ = AUTOTUNED["qconv_igemm_kernel"]
    x, w, b, _ = _inputs()
    to = dict(dtype=torch.bfloat16, device=DEVICE)
    for mode, trials in (("first", lambda n: n == 1), ("on", lambda n: n > 1)):
        monkeypatch.setenv("AQCF_TRITON_AUTOTUNE", mode)
        monkeypatch.setenv("AQCF_TRITON_AUTOTUNE_CACHE", "off")  # (an earlier test's kept choice is no trial)
        monkeypatch.setattr(tuner, "cache", {})
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            igemm.conv_igemm(x.to(**to), w.to(**to), b.to(**to), PARAMS)
        assert trials(len(tuner.configs_timings)), (mode, tuner.configs_timings)


def test_every_block_k_divides_the_even_alignment():
    """``K_EVEN`` (igemm) and ``P_EVEN`` (igemm_wgrad) drop the K mask when a run or the pixel count is a
    multiple of K_ALIGN / P_ALIGN: sound only if every config's BLOCK_K, the interpreter's included, divides it."""
    for module, align in ((igemm, igemm.K_ALIGN), (igemm_wgrad, igemm_wgrad.P_ALIGN)):
        blocks = {c.kwargs["BLOCK_K"] for c in module.gpu_configs()} | {module.INTERPRETER_CONFIG["BLOCK_K"]}
        assert all(align % k == 0 for k in blocks), (module.__name__, align, blocks)


def test_weight_gradient_prune_counts_one_x_tile_per_column_block():
    """A stage of the weight gradient holds one gy tile (BLOCK_K x BLOCK_M) and RUNS x tiles (BLOCK_K x
    BLOCK_N): at 32 x 64 x 64 with 4 blocks, 7 stages of bf16 are 7 * (32 + 4 * 64) * 64 * 2 = 258048 B, over
    the 227 KiB an sm_90 program may hold (4 gy tiles and one x tile would be 172032 B); 6 stages, 221184 B,
    fit. The layer: runs of 64 channels each side (16q), so both tile widths and several blocks are allowed."""
    import triton.language as tl
    from triton import Config

    def config(stages):
        return Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "RUNS": 4}, num_warps=4, num_stages=stages)

    layer = {"N_G": 64, "K_TAP": 64, "CG_OUT": 16, "CG_IN": 16}
    fitting, over = config(6), config(7)
    kept = igemm_wgrad.prune_configs([fitting, over], layer, DOT_DTYPE=tl.bfloat16, PRECISION="ieee")
    assert kept == [fitting], [c.num_stages for c in kept]


def test_weight_gradient_prune_counts_four_products_tiles_and_keeps_them_for_fast8_only():
    """With ``FAST8_PRODUCTS`` 4 a stage holds four gy tiles and four x tiles: at 64 x 64 x 64 in bf16, 3 stages
    are 3 * (4 * 64 + 4 * 64) * 64 * 2 = 196608 B (fit), 4 stages 262144 B (over). hamilton never keeps them
    (it would run them as one product: a copy of a one-product config). fast8 at 64q: runs of 64 channels."""
    import triton.language as tl
    from triton import Config

    def config(stages, products=4):
        kwargs = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "RUNS": 1, "FAST8_PRODUCTS": products}
        return Config(kwargs, num_warps=4, num_stages=stages)

    fitting, over, one = config(3), config(4), config(4, products=1)
    layer = {"N_G": 64, "K_TAP": 64, "CG_OUT": 64, "CG_IN": 64}
    kept = igemm_wgrad.prune_configs([fitting, over, one], layer, DOT_DTYPE=tl.bfloat16, PRECISION="ieee", FAST8=True)
    assert kept == [fitting, one], [(c.num_stages, c.kwargs["FAST8_PRODUCTS"]) for c in kept]
    hamilton = {"N_G": 256, "K_TAP": 256, "CG_OUT": 64, "CG_IN": 64}
    kept = igemm_wgrad.prune_configs([fitting, one], hamilton, DOT_DTYPE=tl.bfloat16, PRECISION="ieee")
    assert kept == [one]
