"""Fixtures of the attention tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def single_threaded():
    """One intra-op thread: gradcheck/opcheck of tiny shapes only pays synchronisation for more."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
