"""pytest-benchmark timings of the issue's target quaternion convs, per provider and mode.

Not part of the default ``pytest`` run (``testpaths = ["tests"]``); run explicitly::

    pytest benchmarks/                              # every target x provider x mode
    pytest benchmarks/ -k "2d-64q and fwdbwd"       # one target, one mode
    pytest benchmarks/ --benchmark-disable          # smoke run: each step once, no timing

Results are grouped by case and mode, so pytest-benchmark's table compares providers side by
side. Threads: ``AQCF_BENCH_THREADS`` (default 2); rounds: ``AQCF_BENCH_ROUNDS`` (default 5).
The ``aqcf-bench conv --grid targets`` command measures the same cases with ratios, IQR and peak memory.
"""

from __future__ import annotations

import os

import pytest
import torch

from .conv import CPU_PROVIDERS, MODES, PROVIDERS, TARGETS, make_inputs, make_step

pytestmark = pytest.mark.benchmark

ROUNDS = int(os.environ.get("AQCF_BENCH_ROUNDS", "5"))


@pytest.fixture(scope="module", params=list(TARGETS))
def target(request):
    """(name, case, inputs): built once per target case, shared by its providers and modes."""
    case = TARGETS[request.param]
    return request.param, case, make_inputs(case)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", CPU_PROVIDERS)
def test_conv(benchmark, target, provider: str, mode: str) -> None:
    name, case, inputs = target
    step = make_step(mode, PROVIDERS[provider].build(case), inputs, PROVIDERS[provider].scope)
    benchmark.group = f"{case.name} {mode}"
    benchmark.extra_info.update(
        case=case.name,
        mode=mode,
        gflop_fwd=case.gflop,
        served_by=PROVIDERS[provider].served_by(inputs, case),
        threads=torch.get_num_threads(),
    )
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=1, iterations=1)
