"""Shared settings of the pytest-benchmark files: thread count and rounds from the environment."""

from __future__ import annotations

import os

import pytest
import torch

THREADS = int(os.environ.get("AQCF_BENCH_THREADS", "2"))


@pytest.fixture(scope="module", autouse=True)
def bench_threads():
    """Every benchmark module runs with ``AQCF_BENCH_THREADS`` intra-op threads (default 2)."""
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield THREADS
    torch.set_num_threads(before)
