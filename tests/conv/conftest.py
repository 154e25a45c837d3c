"""Thread count for the conv op tests.

The op tests run thousands of tiny convs (gradcheck, the hypothesis grid), where intra-op threads
only add synchronisation: on this 2-core machine shared with other jobs, gradcheck of a 1d conv
took 23 s with 2 threads and 1.3 s with 1. Those modules opt in to ``single_threaded`` (not
autouse, so other test files here keep torch's default); the realistically sized accuracy tests
use ``all_threads`` so multi-threaded kernels are held to the contract too.
``AQCF_TEST_THREADS`` overrides the single thread.
"""

from __future__ import annotations

import os

import pytest
import torch

_DEFAULT_THREADS = torch.get_num_threads()


def _with_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def single_threaded():
    """Run the test with one intra-op thread (or ``AQCF_TEST_THREADS``)."""
    yield from _with_threads(int(os.environ.get("AQCF_TEST_THREADS", "1")))


@pytest.fixture
def all_threads():
    """Run the test with torch's default intra-op thread count (what users get)."""
    yield from _with_threads(_DEFAULT_THREADS)
