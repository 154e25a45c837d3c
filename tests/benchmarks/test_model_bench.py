"""``aqcf-bench model``'s time breakdown (benchmarks.breakdown) and one tiny run of the model benchmark."""

from __future__ import annotations

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
