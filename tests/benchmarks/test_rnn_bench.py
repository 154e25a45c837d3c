"""Smoke test of ``aqcf-bench rnn``: the baseline computes our layers' function, and one tiny run reports."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from aqcf_kernels.nn import QuaternionLiGRU, QuaternionLSTM, QuaternionRNN
from benchmarks import cli
from benchmarks.baselines import SpeechbrainStyleRecurrent
from benchmarks.rnn import Case, make_inputs, make_model, markdown, run

pytestmark = pytest.mark.usefixtures("single_threaded")


@pytest.mark.parametrize(
    "make",
    [
        lambda: QuaternionLSTM(8, 8, 2, batch_first=True, bidirectional=True, dtype=torch.float64),
        lambda: QuaternionLiGRU(8, 8, 2, batch_first=True, nonlinearity="leaky_relu", dtype=torch.float64),
        lambda: QuaternionRNN(8, 8, batch_first=True, nonlinearity="relu", dtype=torch.float64),
    ],
)
def test_speechbrain_style_baseline_computes_the_same_function(make):
    layer = make()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.5, generator=torch.Generator().manual_seed(p.numel()))
    x = torch.randn(2, 3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert_close(SpeechbrainStyleRecurrent(layer)(x)[0], layer(x)[0])


def test_tiny_run_reports():
    case = Case("lstm", 1, 8, 2, 3, 8)
    models = {p: make_model(p, case, torch.float32, torch.device("cpu")) for p in ("expanded", "ours")}
    x = make_inputs(case, torch.float32, torch.device("cpu")).x
    assert_close(models["ours"](x)[0], models["expanded"](x)[0])
    results = run([case], ["fwd", "fwdbwd"], ["expanded", "ours"], 1, 0, torch.float32, torch.device("cpu"), False)
    assert [r.mode for r in results] == ["fwd", "fwdbwd"]
    assert results[1].speedup("ours") > 0 and results[1].errors["ours"] < 1e-5
    env = {"command": "test", "cpu_model": "cpu", "threads": 1, "torch": "t", "triton": None, "git_commit": "x",
           "date": "now"}  # fmt: skip
    assert "lstm 1x8 in8 B2 T3" in markdown(results, env, None)


def test_cli_knows_rnn():
    args = cli.build_parser().parse_args(["rnn", "--grid", "quick", "--cells", "ligru", "--no-memory"])
    assert args.family == "rnn" and args.cells == ["ligru"]
