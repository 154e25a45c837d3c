"""pytest-benchmark timings of one A-QCF-Net training step (the ``aqcf-bench model`` cases), per provider.

Not part of the default ``pytest`` run (``testpaths = ["tests"]``); run explicitly::

    pytest benchmarks/test_bench_model.py                        # quick cases x providers
    AQCF_BENCH_MODEL_GRID=targets pytest benchmarks/test_bench_model.py -k 2d
    pytest benchmarks/test_bench_model.py --benchmark-disable    # smoke run: each step once

Results are grouped by case, so pytest-benchmark's table compares providers side by side.
Threads: ``AQCF_BENCH_THREADS`` (default 2); rounds: ``AQCF_BENCH_ROUNDS`` (default 3). The
``aqcf-bench model`` command measures the same cases with ratios, IQR and peak memory.
"""

from __future__ import annotations

import os

import pytest
import torch

from .conftest import THREADS
from .model import GRIDS, PROVIDERS, make_inputs, make_model, make_step

pytestmark = pytest.mark.benchmark


ROUNDS = int(os.environ.get("AQCF_BENCH_ROUNDS", "3"))
CASES = GRIDS[os.environ.get("AQCF_BENCH_MODEL_GRID", "quick")]()


@pytest.fixture(scope="module", params=CASES, ids=[c.name.replace(" ", "-") for c in CASES])
def case_inputs(request):
    """(case, inputs): built once per case, shared by its providers."""
    case = request.param
    return case, make_inputs(case, torch.float32, torch.device("cpu"))


@pytest.mark.parametrize("provider", PROVIDERS)
def test_model_step(benchmark, case_inputs, provider: str) -> None:
    case, inputs = case_inputs
    model = make_model(provider, case, torch.float32, torch.device("cpu"))
    step = make_step("fwdbwd", model, inputs)
    benchmark.group = f"{case.name} fwdbwd"
    benchmark.extra_info.update(
        case=case.name, provider=provider, parameters=sum(p.numel() for p in model.parameters()), threads=THREADS
    )
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=1, iterations=1)
