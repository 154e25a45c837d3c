"""``aqcf-bench model``'s time breakdown (benchmarks.breakdown) and one tiny run of the model benchmark."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from torch import nn

from aqcf_kernels import nn as qnn
from benchmarks import breakdown, common
from benchmarks.model import FAMILIES, TARGET_CASES, Case, Result, check_targets, conv_gflop, markdown, run

pytestmark = pytest.mark.usefixtures("single_threaded")


class _Net(nn.Module):
    """A big matmul (family 'mm'), then cheap elementwise work (family 'cheap')."""

    def __init__(self) -> None:
        super().__init__()
        self.mm = nn.Linear(768, 768)
        self.cheap = nn.Tanh()

    def forward(self, x):
        return self.cheap(self.mm(x))


FAMILIES_OF_NET = {"mm": (nn.Linear,), "cheap": (nn.Tanh,)}


def test_shares_sum_to_one_and_name_every_family() -> None:
    net, x = _Net(), torch.randn(512, 768)
    shares = breakdown.shares(net, lambda: net(x).sum().backward(), FAMILIES_OF_NET)
    assert set(shares) == {"mm", "cheap", breakdown.REST}
    assert sum(shares.values()) == pytest.approx(1.0)
    assert all(0.0 <= v <= 1.0 for v in shares.values())
    assert shares["mm"] > shares["cheap"]  # 768² MACs per row against one tanh per element


def test_a_profiled_step_prints_no_kineto_markers_and_keeps_the_rest_of_stderr(capfd) -> None:
    """kineto writes ``USDT:... profiler_start`` / ``profiler_stop`` to fd 2 around every profile: two lines a
    case between the model benchmark's progress lines. They go; whatever else the step wrote there stays."""
    net, x = _Net(), torch.randn(64, 768)

    def step() -> None:
        net(x).sum().backward()
        os.write(2, b"written by the step\n")
        print("through sys.stderr", file=sys.stderr)

    breakdown.shares(net, step, FAMILIES_OF_NET)
    err = capfd.readouterr().err
    assert breakdown.KINETO_MARKER not in err
    # (under capfd sys.stderr writes to the capture directly, not through fd 2: the order is capfd's)
    assert sorted(err.splitlines()) == ["through sys.stderr", "written by the step"]


def test_backward_ops_go_to_the_family_of_their_forward_op() -> None:
    """Backward ops run outside every module scope; they are attributed through their autograd node.
    (Checked on the ops each family claims, not on times: a loaded machine makes times say anything.)"""
    net, x = _Net(), torch.randn(64, 768, requires_grad=True)

    def forward_only() -> None:
        with torch.no_grad():
            net(x)

    def forward_backward() -> None:
        net.zero_grad()
        net(x).sum().backward()

    def backward_ops(ops: set[str]) -> set[str]:
        return {name[len(breakdown._BACKWARD) :] for name in ops if name.startswith(breakdown._BACKWARD)}

    fwd, fwdbwd = (
        breakdown.profiled_ops(net, forward_only, FAMILIES_OF_NET),
        breakdown.profiled_ops(net, forward_backward, FAMILIES_OF_NET),
    )
    assert backward_ops(fwd["mm"]) == backward_ops(fwd["cheap"]) == set()
    assert backward_ops(fwdbwd["mm"]) == {"AddmmBackward0", "TBackward0"}  # linear = addmm(b, x, wᵀ)
    assert backward_ops(fwdbwd["cheap"]) == {"TanhBackward0"}
    assert "aten::addmm" in fwd["mm"] and "aten::tanh" in fwd["cheap"]
    # The backward's own matmuls sit inside the claimed node.
    assert "aten::mm" in fwdbwd["mm"] and "aten::mm" not in fwd["mm"]


class _RunningMean(nn.Module):
    """tanh, then an in-place update of a buffer, as a norm updates its running statistics: an op that
    records autograd's counter without making a node."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("running", torch.zeros(768))

    def forward(self, x):
        y = torch.tanh(x)
        self.running.mul_(0.9).add_(y.detach().mean(0), alpha=0.1)
        return y


def test_a_node_goes_to_the_op_that_made_it_not_to_an_earlier_one_with_its_number() -> None:
    """The buffer update and the next module's first op record the same sequence number; the node is the
    second's (a conv's backward after a norm was counted for the norm)."""
    net = nn.Sequential(_RunningMean(), nn.Linear(768, 768))
    families = {"cheap": (_RunningMean,), "mm": (nn.Linear,)}
    x = torch.randn(64, 768, requires_grad=True)

    def forward_backward() -> None:
        net.zero_grad()
        net(x).sum().backward()

    ops = breakdown.profiled_ops(net, forward_backward, families)
    backward = {
        f: {n[len(breakdown._BACKWARD) :] for n in o if n.startswith(breakdown._BACKWARD)} for f, o in ops.items()
    }
    assert backward == {"cheap": {"TanhBackward0"}, "mm": {"AddmmBackward0", "TBackward0"}}


def test_the_outermost_family_claims_nested_modules() -> None:
    outer = nn.Sequential(nn.Linear(512, 512), nn.Tanh())
    families = {"block": (nn.Sequential,), "mm": (nn.Linear,)}
    x = torch.randn(512, 512)
    # several calls: a step long enough that Python's time between ops ("rest") stays a small share
    # on a loaded machine (the test suite runs on two busy workers)
    shares = breakdown.shares(outer, lambda: [outer(x) for _ in range(4)], families)
    assert shares["mm"] == 0.0 and shares["block"] > 0.5


def test_tiny_model_run_reports_breakdown_and_targets() -> None:
    case = Case(2, 16, 1, features=(8, 16), bottleneck=16)
    results = run([case], ["fwd", "fwdbwd"], ["baseline", "expanded", "ours"], 1, 0, torch.float32,
                  torch.device("cpu"), memory=False)  # fmt: skip
    assert [r.mode for r in results] == ["fwd", "fwdbwd"]
    for r in results:
        assert r.errors["ours"] < 1e-4 and r.errors["baseline"] < 1e-4
        for provider in ("baseline", "expanded", "ours"):
            components = r.components[provider]
            assert set(components) == {*FAMILIES, breakdown.REST}
            assert sum(components.values()) == pytest.approx(r.timings[provider].median)
            assert components["convs"] > 0 and components["attention"] > 0
            # eval with our norms (ours, expanded): every norm folded into its conv, every activation
            # given to the conv; the baseline's composite norms run as they are
            folded = provider != "baseline" and r.mode == "fwd"
            assert (components["norms+acts"] == 0) == folded, (provider, r.mode, components)
    env = {"command": "test", "cpu_model": "cpu", "threads": 1, "torch": "t", "triton": None, "git_commit": "x",
           "date": "now"}  # fmt: skip
    text = markdown(results, env, check_targets(results))
    assert "## Where the time goes" in text and "norms+acts" in text
    assert r.speedup("ours", "baseline") > 0
    # the convs' FLOPs (a backward does twice the forward's: input and weight gradients) and the peak
    fwd, fwdbwd = results
    assert fwdbwd.conv_gflop == pytest.approx(3 * fwd.conv_gflop, rel=0.05)
    assert fwd.peak_gflops > 0 and "GFLOP per step" in text
    assert fwd.time_bound("baseline") > 1  # the other families at most the baseline's own, its convs halved


def test_the_dense_peak_is_the_best_of_two_kernels_computing_one_product():
    """Both kernels of the roofline compute the same ``n × n × n`` product (so ``2 n³`` FLOPs each), and the
    peak is the faster one's rate."""
    torch.manual_seed(0)
    products = common.dense_products(64, torch.float64, "cpu")
    mm, conv = products["mm"](), products["conv1x1"]()
    assert conv.shape == (1, 64, 32, 2)
    torch.testing.assert_close(conv.reshape(64, 64), mm)
    rates = common.dense_peak_gflops(torch.float32, "cpu", reps=2, n=64)
    assert set(rates) == {"mm", "conv1x1", "peak"} and min(rates.values()) > 0
    assert rates["peak"] == max(rates["mm"], rates["conv1x1"])


def test_the_dense_peak_s_size_doubles_while_the_next_product_fits_its_budget():
    """From 256, doubled while 8x one product's time fits the budget, capped: a slow dtype stays small."""
    fast = common.dense_size(2048, lambda n: (n / 1024) ** 3 * 0.01, budget_s=0.1)  # 1024: 10 ms, 2048: 80 ms
    assert fast == 2048
    slow = common.dense_size(2048, lambda n: (n / 256) ** 3 * 0.02, budget_s=0.1)  # 256: 20 ms, 512: 160 ms
    assert slow == 256
    assert common.dense_size(8192, lambda n: 0.0) == 8192


def _timing(seconds: float) -> common.Timing:
    return common.Timing.of([seconds])


def _result(mode: str, components: dict[str, dict[str, float]], **kw) -> Result:
    timings = {p: _timing(sum(c.values())) for p, c in components.items()}
    return Result(TARGET_CASES[0], mode, timings, {}, {}, components=components, **kw)


def test_the_bound_halves_the_convs_and_takes_the_cheapest_build_of_everything_else() -> None:
    def fam(convs, attention, norms, rest):
        return {"convs": convs, "attention": attention, "norms+acts": norms, breakdown.REST: rest}

    comps = {"baseline": fam(6.0, 2.0, 1.5, 0.5), "ours": fam(4.0, 2.2, 0.6, 0.4), "real": fam(5.0, 1.8, 0.7, 0.5)}
    r = _result("fwd", comps)
    # baseline 10 s; best possible: 3 (half its convs) + 1.8 + 0.6 + 0.4
    assert r.time_bound("baseline") == pytest.approx(10.0 / 5.8)
    assert r.time_bound("real") == pytest.approx(8.0 / (2.5 + 2.8))
    # a matmul peak that would run the convs' work faster than half the baseline's conv time wins
    fast = _result("fwd", comps, conv_gflop=100.0, peak_gflops=50.0)  # half the work at the peak: 1 s
    assert fast.time_bound("baseline") == pytest.approx(10.0 / 3.8)
    slow = _result("fwd", comps, conv_gflop=100.0, peak_gflops=10.0)  # 5 s: half the conv time stays
    assert slow.time_bound("baseline") == pytest.approx(10.0 / 5.8)


def test_a_target_beyond_its_bound_is_reported_unreachable() -> None:
    def fam(convs, other):
        return {"convs": convs, "attention": other, "norms+acts": 0.0, breakdown.REST: 0.0}

    # inference: baseline 10 s with 8 s of convs -> bound 10 / (4 + 2) = 1.67 < 1.8
    fwd = _result("fwd", {"baseline": fam(8.0, 2.0), "ours": fam(6.0, 2.0), "real": fam(8.0, 2.0)})
    # training: bound 10 / (2 + 1) = 3.3, reachable; ours measured 10 / 9
    fwdbwd = _result("fwdbwd", {"baseline": fam(4.0, 6.0), "ours": fam(8.0, 1.0), "real": fam(4.0, 6.0)})
    name = TARGET_CASES[0].name
    checks = {c["target"].removeprefix(f"{name}: "): c for c in check_targets([fwd, fwdbwd]) if name in c["target"]}
    inference = checks["inference ours >= 1.8x baseline"]
    assert inference["status"] == "FAIL" and inference["bound"] == pytest.approx(10 / 6)
    assert inference["detail"].endswith("(bound 1.67: unreachable)")
    training = checks["training step ours >= 1.6x baseline"]
    assert training["status"] == "FAIL" and training["detail"] == "1.111 (bound 3.33)"
    assert "bound" not in checks["training peak memory ours <= 0.8x baseline"]


def test_conv_gflop_counts_the_convs_of_a_step() -> None:
    x, w = torch.randn(2, 8, 10, 12), torch.randn(16, 8, 3, 3)
    expected = 2 * 2 * 16 * 8 * 3 * 3 * 8 * 10 / 1e9  # output 8x10 (no padding)
    assert conv_gflop(lambda: torch.nn.functional.conv2d(x, w)) == pytest.approx(expected)
    assert conv_gflop(lambda: torch.mm(x.flatten(1), x.flatten(1).T)) is None


def test_a_folded_unit_counts_as_a_conv_and_a_training_unit_as_its_parts() -> None:
    """In eval mode a conv + norm unit is one folded conv (its norm never runs): the breakdown bills it to
    convs; in training its conv and norm are billed to their own families."""
    torch.manual_seed(0)
    conv = qnn.QuaternionConv2d(16, 16, 3, padding=1)
    unit = qnn.QuaternionConvNormAct(conv, qnn.QuaternionBatchNorm2d(16, activation="relu"))
    x = torch.randn(2, 16, 48, 48)

    def step() -> None:
        with torch.no_grad():
            unit(x)

    unit.eval()
    folded = breakdown.profiled_seconds(unit, step, FAMILIES)
    assert folded["convs"] > 0 and folded["norms+acts"] == 0.0
    unit.train()
    parts = breakdown.profiled_seconds(unit, step, FAMILIES)
    assert parts["convs"] > 0 and parts["norms+acts"] > 0


def test_a_unit_convolving_its_inputs_one_by_one_bills_the_convs_to_convs() -> None:
    """Given (features, skip), a unit convolves each on its weight slice, through its conv module: in
    training the conv ops are billed to convs and the norm to norms+acts, none of the convs to rest."""
    torch.manual_seed(0)
    unit = qnn.QuaternionConvNormAct(
        qnn.QuaternionConv2d(32, 16, 3, padding=1), qnn.QuaternionBatchNorm2d(16, activation="relu")
    ).train()
    x, skip = torch.randn(2, 16, 48, 48), torch.randn(2, 16, 48, 48)

    def step() -> None:
        with torch.no_grad():
            unit(x, skip)

    ops = breakdown.profiled_ops(unit, step, FAMILIES)
    assert "aqcf::qconv" in ops["convs"] and "aqcf::qnorm" in ops["norms+acts"]
    assert "aqcf::qconv" not in ops["norms+acts"]


class _Event:
    """A profiler event as breakdown reads it (torch.autograd.profiler_util.FunctionEvent's fields)."""

    def __init__(self, name, thread, parent=None, seq=-1, cpu_us=0.0, device_us=0.0, device_type=None):
        self.name, self.thread, self.cpu_parent, self.sequence_nr = name, thread, parent, seq
        self.self_cpu_time_total, self.self_device_time_total = cpu_us, device_us
        self.device_type = device_type or torch.autograd.DeviceType.CPU


def _gpu_step_events() -> list[_Event]:
    """A conv then a norm on the caller's thread (1), their backward on autograd's device thread (2), as on a
    GPU: each op's kernels counted on the op that launched them (self device time), the kernels themselves
    events of their own (here on the caller's thread, under the op) and the scopes' device annotations too."""
    conv_scope = _Event("breakdown::convs", 1, cpu_us=40.0, device_us=300.0)
    conv = _Event("aten::convolution", 1, conv_scope, seq=10, cpu_us=30.0, device_us=120.0)
    norm_scope = _Event("breakdown::norms", 1, cpu_us=20.0, device_us=90.0)
    norm = _Event("aqcf::qnorm", 1, norm_scope, seq=11, cpu_us=15.0, device_us=25.0)
    norm_bwd = _Event(breakdown._BACKWARD + "QNormBackward", 2, seq=11, cpu_us=12.0)
    norm_bwd_op = _Event("aqcf::qnorm_backward", 2, norm_bwd, cpu_us=10.0, device_us=50.0)
    conv_bwd = _Event(breakdown._BACKWARD + "ConvolutionBackward0", 2, seq=10, cpu_us=25.0)
    conv_bwd_op = _Event("aten::convolution_backward", 2, conv_bwd, cpu_us=20.0, device_us=240.0)
    kernel = _Event("sm90_xmma_fprop", 1, conv, device_us=120.0, device_type=torch.autograd.DeviceType.CUDA)
    outside = _Event("aten::add_", 1, cpu_us=5.0, device_us=4.0)  # no family: rest
    return [conv_scope, conv, norm_scope, norm, outside, kernel, norm_bwd, norm_bwd_op, conv_bwd, conv_bwd_op]


def test_on_a_gpu_the_families_are_their_kernels_time_backward_from_the_engine_thread_included() -> None:
    families = {"convs": (), "norms": ()}
    claimed = breakdown.claimed_events(_gpu_step_events())
    names = {f: {e.name for e, g in claimed if g == f} for f in families}
    assert names == {
        "convs": {"breakdown::convs", "aten::convolution", breakdown._BACKWARD + "ConvolutionBackward0",
                  "aten::convolution_backward"},
        "norms": {"breakdown::norms", "aqcf::qnorm", breakdown._BACKWARD + "QNormBackward", "aqcf::qnorm_backward"},
    }  # fmt: skip
    # device: each op's own kernels (a scope's annotation spans them: not counted again); rest is the wall's rest
    gpu = breakdown.spent_seconds(1000.0, claimed, families, "cuda")
    assert gpu["convs"] == pytest.approx((120.0 + 240.0) / 1e6)
    assert gpu["norms"] == pytest.approx((25.0 + 50.0) / 1e6)
    assert gpu[breakdown.REST] == pytest.approx((1000.0 - 435.0) / 1e6)
    # on CPU the same events count their own CPU time
    cpu = breakdown.spent_seconds(1000.0, claimed, families, "cpu")
    assert cpu["convs"] == pytest.approx((40.0 + 30.0 + 25.0 + 20.0) / 1e6)
    assert cpu["norms"] == pytest.approx((20.0 + 15.0 + 12.0 + 10.0) / 1e6)


def test_a_thread_that_runs_no_scope_and_no_backward_is_left_out() -> None:
    # an intra-op worker thread's events run inside a claimed op's span: counting them would count it twice
    events = _gpu_step_events()
    worker = _Event("aten::mul", 3, _Event("aten::convolution", 3, seq=12, cpu_us=30.0), cpu_us=30.0)
    claimed = breakdown.claimed_events(events + [worker, worker.cpu_parent])
    assert all(e.thread in (1, 2) for e, _ in claimed)


def test_the_gpu_target_is_the_bf16_training_step_over_the_baseline() -> None:
    def fam(convs, other):
        return {"convs": convs, "attention": other, "norms+acts": 0.0, breakdown.REST: 0.0}

    fwdbwd = _result("fwdbwd", {"baseline": fam(8.0, 5.0), "ours": fam(5.0, 5.0), "real": fam(6.0, 4.0)})
    name = TARGET_CASES[0].name
    checks = [c for c in check_targets([fwdbwd], "cuda", torch.bfloat16) if name in c["target"]]
    assert [c["target"] for c in checks] == [f"{name}: training step ours >= 1.3x baseline"]
    assert checks[0]["status"] == "PASS" and checks[0]["value"] == pytest.approx(1.3)
    # the same run in another dtype is not a verdict on a target stated in bf16 (nor in fp32 on CPU)
    for device, dtype in (("cuda", torch.float32), ("cpu", torch.bfloat16)):
        other = [c for c in check_targets([fwdbwd], device, dtype) if name in c["target"]]
        assert {c["status"] for c in other} == {"SKIP"} and "stated for" in other[0]["detail"]
    assert check_targets([fwdbwd], "mps", torch.float32) == []
