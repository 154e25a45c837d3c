"""The conv benchmark measures what it says: a provider that forces a backend gets it for the
backward too (autograd picks the backward ops' backend when they run, outside the forward call), and
``auto``'s report names what served each of its three computations."""

from __future__ import annotations

import time

import pytest
import torch

from aqcf_kernels import backends, tuning
from benchmarks.conv import MODES, PROVIDERS, Case, Provider, make_inputs, make_step


@pytest.mark.parametrize("mode", MODES)
def test_forced_backend_serves_every_op_of_the_step(mode, monkeypatch):
    forced = backends.registered()["torch"]  # on CPU, auto would pick cpp
    calls = []
    for method in ("conv", "conv_weight_grad"):
        original = getattr(forced, method)

        def spy(*args, _original=original, _method=method, **kwargs):
            calls.append(_method)
            return _original(*args, **kwargs)

        monkeypatch.setattr(forced, method, spy)
    case = Case(dims=2, channels=4, size=6, batch=2)
    provider = Provider("torch/hamilton", algorithm="hamilton", backend="torch")
    inputs = make_inputs(case, torch.float32)
    step = make_step(mode, provider.build(case), inputs, provider.scope)
    calls.clear()  # the bwd step runs its forward when built
    step()
    # fwd: one conv; bwd: input grad (a conv) and weight grad; fwdbwd: all three
    expected = {"fwd": ["conv"], "bwd": ["conv", "conv_weight_grad"], "fwdbwd": ["conv", "conv", "conv_weight_grad"]}
    assert sorted(calls) == expected[mode]


def test_auto_reports_the_choice_of_each_computation(monkeypatch):
    """Forward and input gradient measured fastest with hamilton, the weight gradient with fast8: the
    report says so, from the very signatures the step's calls settled (the input gradient's is the
    adjoint conv's, so a wrong geometry would ask about a signature nobody measured)."""
    monkeypatch.setenv("AQCF_TUNING_CACHE", "off")
    monkeypatch.setattr(tuning, "mode", "measure")
    tuning.clear()
    impl = backends.select_in(backends.CONV, "cpu", lambda b: None)
    conv, wgrad = type(impl).conv, type(impl).conv_weight_grad

    def slow_fast8_conv(self, input, weight, bias, p, algorithm):
        if algorithm == "fast8":
            time.sleep(0.05)
        return conv(self, input, weight, bias, p, algorithm)

    def slow_hamilton_wgrad(self, input, grad_output, weight_shape, p, algorithm):
        if algorithm == "hamilton":
            time.sleep(0.05)
        return wgrad(self, input, grad_output, weight_shape, p, algorithm)

    monkeypatch.setattr(type(impl), "conv", slow_fast8_conv)
    monkeypatch.setattr(type(impl), "conv_weight_grad", slow_hamilton_wgrad)
    asked: list[str] = []
    lookup = tuning.lookup
    monkeypatch.setattr(tuning, "lookup", lambda key: asked.append(key) or lookup(key))
    case = Case(dims=2, channels=8, size=9, batch=2)
    inputs = make_inputs(case, torch.float32)
    step = make_step("fwdbwd", PROVIDERS["auto"].build(case), inputs)
    try:
        for _ in range(2 + 2 * tuning.REFINE_SAMPLES):
            step()
        assert not tuning._pending, "still refining"
        settled = dict(tuning._memory)
        asked.clear()
        tuning._recent.clear()  # the choices by their cheap keys: the report must find them by signature
        report = PROVIDERS["auto"].served_by(inputs, case)
    finally:
        tuning.clear()
    assert sorted(asked) == sorted(settled), "the report asked about other signatures than the step measured"
    assert report == f"{impl.name}/hamilton (dw {impl.name}/fast8)"


def test_a_provider_served_by_one_pair_reports_it_once():
    case = Case(dims=2, channels=4, size=6, batch=2)
    inputs = make_inputs(case, torch.float32)
    provider = Provider("torch/hamilton", algorithm="hamilton", backend="torch")
    assert provider.served_by(inputs, case) == "torch/hamilton"
    assert PROVIDERS["expanded"].served_by(inputs, case) == "reference"
