"""pytest-benchmark timings of the quaternion LiGRU / LSTM stacks (the ``aqcf-bench rnn`` cases), per provider.

Not part of the default ``pytest`` run (``testpaths = ["tests"]``); run explicitly::

    pytest benchmarks/test_bench_rnn.py                          # quick cases x providers
    AQCF_BENCH_RNN_GRID=targets pytest benchmarks/test_bench_rnn.py -k lstm
    pytest benchmarks/test_bench_rnn.py --benchmark-disable      # smoke run: each step once

Threads: ``AQCF_BENCH_THREADS`` (default 2); rounds: ``AQCF_BENCH_ROUNDS`` (default 3). The
``aqcf-bench rnn`` command measures the same cases with ratios, IQR and peak memory.
"""

from __future__ import annotations

import os

import pytest
import torch

from .conftest import THREADS
from .rnn import GRIDS, PROVIDERS, make_inputs, make_model, make_step

pytestmark = pytest.mark.benchmark

ROUNDS = int(os.environ.get("AQCF_BENCH_ROUNDS", "3"))
CASES = GRIDS[os.environ.get("AQCF_BENCH_RNN_GRID", "quick")]()


@pytest.fixture(scope="module", params=CASES, ids=[c.name.replace(" ", "-") for c in CASES])
def case_inputs(request):
    """(case, inputs): built once per case, shared by its providers."""
    case = request.param
    return case, make_inputs(case, torch.float32, torch.device("cpu"))


@pytest.mark.parametrize("provider", PROVIDERS)
def test_rnn_step(benchmark, case_inputs, provider: str) -> None:
    case, inputs = case_inputs
    model = make_model(provider, case, torch.float32, torch.device("cpu"))
    benchmark.group = f"{case.name} fwdbwd"
    benchmark.extra_info.update(case=case.name, provider=provider, threads=THREADS)
    benchmark.pedantic(make_step("fwdbwd", model, inputs), rounds=ROUNDS, warmup_rounds=1, iterations=1)
