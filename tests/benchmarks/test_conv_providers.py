"""The conv benchmark measures what it says: a provider that forces a backend gets it for the
backward too (autograd picks the backward ops' backend when they run, outside the forward call), and
``auto``'s report names what served each of its three computations."""

from __future__ import annotations

import time

import pytest
import torch

from aqcf_kernels import backends, tuning
from benchmarks.conv import MODE_KINDS, MODES, PROVIDERS, Case, Provider, make_inputs, make_step


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
    # fwd: one conv; bwd: input grad (a conv) and weight grad; fwdbwd: all three; per-sample: the forward
    # and one weight gradient for every sample (the vmap rules fold them: one call each, not one a sample)
    expected = {
        "fwd": ["conv"],
        "bwd": ["conv", "conv_weight_grad"],
        "fwdbwd": ["conv", "conv", "conv_weight_grad"],
        "per-sample": ["conv", "conv_weight_grad"],
    }
    assert sorted(calls) == expected[mode]


def test_auto_reports_the_choice_of_each_computation(monkeypatch, single_threaded):
    """Forward and input gradient measured fastest with hamilton, the weight gradient with fast8: the
    report says so, from the very signatures the step's calls settled (the input gradient's is the
    adjoint conv's, so a wrong geometry would ask about a signature nobody measured). The slowed pairs take 0.25 s
    more, on one thread (tests/conv/test_tuning.py's deterministic-mode test: what a busy machine adds to a small
    conv on two threads)."""
    monkeypatch.setenv("AQCF_TUNING_CACHE", "off")
    monkeypatch.setattr(tuning, "mode", "measure")
    tuning.clear()
    impl = backends.select_in(backends.CONV, "cpu", lambda b: None)
    conv, wgrad = type(impl).conv, type(impl).conv_weight_grad

    def slow_fast8_conv(self, input, weight, bias, p, algorithm):
        if algorithm == "fast8":
            time.sleep(0.25)
        return conv(self, input, weight, bias, p, algorithm)

    def slow_hamilton_wgrad(self, input, grad_output, weight_shape, p, algorithm):
        if algorithm == "hamilton":
            time.sleep(0.25)
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
        for _ in range(2 + tuning.max_provisional_calls(2)):
            step()
        assert not tuning._pending, "still refining"
        settled = dict(tuning._memory)
        asked.clear()
        tuning._recent.clear()  # the choices by their cheap keys: the report must find them by signature
        report = PROVIDERS["auto"].served_by(inputs, case)
        asked_by_report = list(asked)
        by_mode = {mode: PROVIDERS["auto"].served_by(inputs, case, MODE_KINDS[mode]) for mode in MODES}
    finally:
        tuning.clear()
    assert sorted(asked_by_report) == sorted(settled), "the report asked about other signatures than the step measured"
    assert report == by_mode["fwdbwd"] == f"{impl.name}/hamilton (dw {impl.name}/fast8)"
    # each mode reports the computations it runs; without the forward, the first is tagged too
    assert by_mode["fwd"] == f"{impl.name}/hamilton"
    assert by_mode["bwd"] == f"dx {impl.name}/hamilton (dw {impl.name}/fast8)"


@pytest.mark.parametrize("provider", ["expanded", "naive16", "fast8", "auto"])
def test_per_sample_step_gives_each_samples_gradients(provider, monkeypatch):
    """The per-sample mode computes what it is named for (functorch's rules for the references, ours for
    the rest), and auto's report asks only about signatures its step settled (the folded weight gradient's)."""
    monkeypatch.setenv("AQCF_TUNING_CACHE", "off")
    monkeypatch.setattr(tuning, "mode", "measure")
    tuning.clear()
    case = Case(dims=2, channels=2, size=5, batch=3)
    inputs = make_inputs(case, torch.float64)
    fn = PROVIDERS[provider].build(case)
    seen = []
    vmap = torch.func.vmap

    def recording_vmap(f, in_dims):
        v = vmap(f, in_dims=in_dims)
        return lambda *args: seen.append(v(*args))

    monkeypatch.setattr(torch.func, "vmap", recording_vmap)
    step = make_step("per-sample", fn, inputs)
    asked: list[str] = []
    lookup = tuning.lookup
    try:
        for _ in range(2 + tuning.max_provisional_calls(2)):
            step()
        settled = dict(tuning._memory)
        tuning._recent.clear()  # the choices by their cheap keys: the report must find them by signature
        monkeypatch.setattr(tuning, "lookup", lambda key: asked.append(key) or lookup(key))
        report = PROVIDERS[provider].served_by(inputs, case, MODE_KINDS["per-sample"])
    finally:
        tuning.clear()
    assert set(asked) <= set(settled)
    assert bool(asked) == (provider == "auto")  # auto resolves by signature; a forced algorithm does not ask
    if provider == "auto":
        assert report.count("/") >= 1 and "unknown" not in report
    gw, gb = seen[-1]
    x, w, b = (t.detach() for t in inputs.leaves)
    for i in range(case.batch):
        leaves = [w.clone().requires_grad_(), b.clone().requires_grad_()]
        y = PROVIDERS["expanded"].build(case)(x[i : i + 1], *leaves)
        want = torch.autograd.grad(y, leaves, inputs.grad_out[i : i + 1])
        torch.testing.assert_close((gw[i], gb[i]), want)


def test_a_provider_served_by_one_pair_reports_it_once():
    case = Case(dims=2, channels=4, size=6, batch=2)
    inputs = make_inputs(case, torch.float32)
    provider = Provider("torch/hamilton", algorithm="hamilton", backend="torch")
    assert provider.served_by(inputs, case) == "torch/hamilton"
    assert PROVIDERS["expanded"].served_by(inputs, case) == "reference"


def test_channels_last_cases_feed_channels_last_activations():
    from dataclasses import replace

    case = replace(Case(dims=2, channels=2, size=5, batch=2), channels_last=True)
    inputs = make_inputs(case)
    assert case.name.endswith(" cl")
    assert inputs.x.is_contiguous(memory_format=torch.channels_last) and not inputs.x.is_contiguous()
    assert inputs.grad_out.is_contiguous(memory_format=torch.channels_last)
    assert inputs.w.is_contiguous()  # the weight keeps its layout
    three = make_inputs(replace(Case(dims=3, channels=1, size=3, batch=1), channels_last=True))
    assert three.x.is_contiguous(memory_format=torch.channels_last_3d)
    plain = make_inputs(Case(dims=2, channels=2, size=5, batch=2))
    assert torch.equal(plain.x, inputs.x)  # the same values, another layout


def test_relu_providers_are_the_conv_then_relu():
    """The reference pair applies torch.relu after the expanded conv; ours passes activation='relu' (fused)."""
    case = Case(dims=2, channels=2, size=5, batch=2)
    inputs = make_inputs(case)
    with torch.no_grad():
        conv = PROVIDERS["expanded"].build(case)(*inputs.leaves)
        ref = PROVIDERS["expanded+relu"].build(case)(*inputs.leaves)
        ours = PROVIDERS["hamilton"].build(case)
    assert (conv < 0).any() and torch.equal(ref, torch.relu(conv))
    fused = PROVIDERS["triton/hamilton+relu"].build(case)
    assert fused.keywords["activation"] == "relu" and "activation" not in ours.keywords


def _result(case, mode, seconds: dict):
    from benchmarks.common import Timing
    from benchmarks.conv import Result

    return Result(case, mode, {k: Timing.of([v]) for k, v in seconds.items()}, {}, {})


def test_gpu_targets_read_the_bf16_channels_last_cases():
    from dataclasses import replace

    from benchmarks.conv import GPU_SPEED_TARGETS, check_gpu_targets

    seconds: dict = {}
    for case, mode, provider, over, need in GPU_SPEED_TARGETS:
        row = seconds.setdefault((replace(case, channels_last=True), mode), {"expanded": 1.0, "auto": 1.0})
        # each provider just past its target, except the fast8 ones (just short of it)
        row[over] = 1.0
        row[provider] = 1.0 / need * (1.02 if provider == "triton/fast8" else 0.98)
    results = [_result(case, mode, row) for (case, mode), row in seconds.items()]
    checks = check_gpu_targets(results, torch.bfloat16)
    status = [c["status"] for c in checks]
    fast8 = ["triton/fast8" in c["target"] for c in checks[:-1]]
    assert status[:-1] == ["FAIL" if f else "PASS" for f in fast8]
    # auto at the expanded conv's time, while triton/hamilton was faster on some cases: below 0.95x the best
    assert status[-1] == "FAIL" and "best triton/hamilton" in checks[-1]["detail"]
    # another dtype, or the NCHW cases: nothing to judge
    assert all(c["status"] == "SKIP" for c in check_gpu_targets(results, torch.float32)[:-1])
    nchw = [_result(replace(r.case, channels_last=False), r.mode, {k: t.median for k, t in r.timings.items()})
            for r in results]  # fmt: skip
    assert all(c["status"] == "SKIP" for c in check_gpu_targets(nchw, torch.bfloat16)[:-1])


@pytest.mark.parametrize("fast8", ["triton/fast8", "cuda/fast8"])
def test_gpu_auto_is_judged_against_what_it_may_pick(fast8):
    """In bf16 fast8 is opt-in: a faster fast8 (Triton's or cuDNN's) does not count against auto; in fp32 it does."""
    from benchmarks.conv import check_gpu_targets

    case = Case(dims=2, channels=32, size=64, batch=32)
    r = _result(case, "fwdbwd", {"expanded": 1.0, "triton/hamilton": 1.2, fast8: 0.5, "auto": 1.0})
    assert check_gpu_targets([r], torch.bfloat16)[-1]["status"] == "PASS"
    assert check_gpu_targets([r], torch.float32)[-1]["status"] == "FAIL"


def test_the_auto_check_says_which_misses_ran_the_best_providers_own_pairs():
    """The verdict is the ratio's; the detail tells a miss of the choice from the same computation timed
    twice (auto ran exactly the best provider's pairs)."""
    from benchmarks import common
    from benchmarks.conv import Result, _auto_against_the_best

    def result(name: str, ms: dict, served: dict) -> Result:
        case = Case(dims=1, channels=int(name), size=8, batch=2)
        timings = {k: common.Timing.of([v / 1e3]) for k, v in ms.items()}
        return Result(case, "fwdbwd", timings, dict.fromkeys(ms), served)

    names = ("expanded", "hamilton", "fast8")
    fine = result(
        "4", {"expanded": 10, "hamilton": 10, "fast8": 8, "auto": 8.1}, {"fast8": "cpp/fast8", "auto": "cpp/fast8"}
    )
    noise = result(
        "8", {"expanded": 10, "hamilton": 10, "fast8": 8, "auto": 9}, {"fast8": "cpp/fast8", "auto": "cpp/fast8"}
    )
    choice = result(
        "16",
        {"expanded": 10, "hamilton": 9, "fast8": 8, "auto": 9},
        {"fast8": "cpp/fast8", "auto": "cpp/hamilton (dw cpp/fast8)"},
    )
    verdict = _auto_against_the_best([fine], names)
    assert verdict["status"] == "PASS" and ";" not in verdict["detail"]
    assert verdict["detail"].endswith(f"best fast8, ratio of medians {8 / 8.1:.2f}x)")
    verdict = _auto_against_the_best([fine, noise, choice], names)
    assert verdict["status"] == "FAIL" and verdict["value"] == pytest.approx(8 / 9)
    assert verdict["detail"].endswith(
        f"; 2 of 3 cases below 0.95x, 1 of them running the best provider's own pairs ({noise.case.name})"
    )


def test_the_auto_check_skips_when_a_provider_it_names_did_not_run():
    """``--providers auto``: "auto >= 0.95x the best of expanded, hamilton, fast8" said PASS against expanded
    alone."""
    from benchmarks import common
    from benchmarks.conv import Result, check_targets

    case = Case(dims=1, channels=4, size=8, batch=2)
    timings = {k: common.Timing.of([v / 1e3]) for k, v in {"expanded": 10, "auto": 8}.items()}
    checks = check_targets([Result(case, "fwdbwd", timings, dict.fromkeys(timings), {})])
    (verdict,) = [c for c in checks if "the best of" in c["target"]]
    assert verdict["status"] == "SKIP" and verdict["detail"] == "hamilton, fast8 not in this run"


def test_cpu_targets_stated_for_float32_skip_in_another_dtype_or_device():
    from benchmarks import common

    checks = [{"target": "t", "status": "FAIL", "value": 1.2, "detail": "1.20x"}]
    assert common.skipped_outside(checks, torch.float32, "cpu") == checks
    for dtype, device in ((torch.float64, "cpu"), (torch.float32, "cuda")):
        (check,) = common.skipped_outside(checks, dtype, device)
        assert check["status"] == "SKIP" and check["value"] is None
        assert check["detail"] == f"stated for torch.float32 on cpu; this run is {dtype} on {device}"


def test_the_table_names_what_served_auto_only_where_auto_ran():
    from benchmarks import common
    from benchmarks.conv import Result, markdown

    case = Case(dims=2, channels=2, size=5, batch=2)
    env = {**common.environment(torch.device("cpu"), 1, 0), "command": "aqcf-bench conv"}
    timing = common.Timing.of([1e-3, 2e-3])

    def table(providers: list[str]) -> str:
        result = Result(case, "fwd", dict.fromkeys(providers, timing), {}, {"auto": "torch/hamilton"})
        return markdown([result], env)

    with_auto = table(["expanded", "auto"])
    assert "| auto served by |" in with_auto and "torch/hamilton" in with_auto
    assert "auto served by" not in table(["expanded", "torch"])


def test_channels_last_leaves_1d_cases_alone(capsys):
    from benchmarks import cli

    assert cli.main(["conv", "--grid", "full", "--channels-last", "--list"]) == 0
    names = [line.split("  ")[0] for line in capsys.readouterr().out.splitlines()[:-1]]
    assert {n.startswith("1d") for n in names} == {True, False}  # (the grid has both)
    for name in names:
        assert name.endswith(" cl") != name.startswith("1d"), name
