"""Fixtures of the Triton kernel tests."""

from __future__ import annotations

import warnings

import pytest
import torch

from aqcf_kernels.ops import conv as conv_ops


@pytest.fixture
def python_kernels_on_cpu():
    """The Python implementations of the ops without a derivative that a backward calls
    (``aqcf::activation_grad_bias``, ``aqcf::qconv_weight_bias_grad``) registered as their CPU kernels, as
    they are the CUDA kernels on a GPU: here the compiled extension's CPU kernels would serve instead, and
    the Triton kernels behind them (interpreted) would not run. The extension's come back after."""
    lib = torch.library.Library("aqcf", "IMPL")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Overriding a previously registered kernel": that is the point
        lib.impl("activation_grad_bias", conv_ops.activation_grad_bias, "CPU")
        lib.impl("qconv_weight_bias_grad", conv_ops.qconv_weight_bias_grad, "CPU")
    yield
    lib._destroy()


@pytest.fixture
def launch_constexprs(monkeypatch):
    """``record(module, name)`` wraps the autotuned kernel ``module.name`` so that each launch's keyword
    arguments (its constexprs) are appended to the list it returns: proof that a test ran the variant it
    is about."""

    def record(module, name: str) -> list[dict]:
        seen: list[dict] = []
        tuner = getattr(module, name)

        class Recording:
            def __getattr__(self, name):  # the rest of the launcher's interface (e.g. tuned_config)
                return getattr(tuner, name)

            def __getitem__(self, grid):
                launch = tuner[grid]

                def run(*args, **kwargs):
                    seen.append(dict(kwargs))
                    return launch(*args, **kwargs)

                return run

        monkeypatch.setattr(module, name, Recording())
        return seen

    return record


@pytest.fixture(autouse=True)
def _poisoned(poisoned_allocations):
    """Every Triton kernel test runs with poisoned allocations (tests/conftest.py)."""
