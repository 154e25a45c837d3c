"""``aqcf-bench model``'s time breakdown (benchmarks.breakdown) and one tiny run of the model benchmark."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from benchmarks import breakdown
from benchmarks.model import FAMILIES, Case, check_targets, markdown, run

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


def test_the_outermost_family_claims_nested_modules() -> None:
    outer = nn.Sequential(nn.Linear(256, 256), nn.Tanh())
    families = {"block": (nn.Sequential,), "mm": (nn.Linear,)}
    x = torch.randn(256, 256)
    shares = breakdown.shares(outer, lambda: outer(x), families)
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
            assert components["convs"] > 0 and components["attention"] > 0 and components["norms+acts"] > 0
    env = {"command": "test", "cpu_model": "cpu", "threads": 1, "torch": "t", "triton": None, "git_commit": "x",
           "date": "now"}  # fmt: skip
    text = markdown(results, env, check_targets(results))
    assert "## Where the time goes" in text and "norms+acts" in text
    assert r.speedup("ours", "baseline") > 0
