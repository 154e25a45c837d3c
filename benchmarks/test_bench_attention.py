"""pytest-benchmark timings of the A-QCF block at the issue's CPU target size (4096 tokens, 64q, 4 heads).

Not part of the default ``pytest`` run; run explicitly::

    pytest benchmarks/test_bench_attention.py
    pytest benchmarks/test_bench_attention.py --benchmark-disable   # smoke run: each step once

Providers (naive, sdpa, ours) are grouped by mode so pytest-benchmark's table compares them side by
side. ``aqcf-bench attention --grid targets`` measures the same case with ratios and peak memory.
Threads: ``AQCF_BENCH_THREADS`` (default 2); rounds: ``AQCF_BENCH_ROUNDS`` (default 3).
"""

from __future__ import annotations

import os

import pytest
import torch

from .attention import CPU_PROVIDERS, MODES, TARGET_CASE, build, make_block, make_inputs, make_step
from .conftest import THREADS

pytestmark = pytest.mark.benchmark


ROUNDS = int(os.environ.get("AQCF_BENCH_ROUNDS", "3"))


@pytest.fixture(scope="module")
def setup():
    device = torch.device("cpu")
    return make_block(TARGET_CASE, torch.float32, device), make_inputs(TARGET_CASE, torch.float32, device)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", CPU_PROVIDERS)
def test_attention_block(benchmark, setup, provider: str, mode: str) -> None:
    block, inputs = setup
    step = make_step(mode, build(provider, block), block, inputs, provider)
    benchmark.group = f"{TARGET_CASE.name} {mode}"
    benchmark.extra_info.update(provider=provider, mode=mode, threads=THREADS)
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=1)
