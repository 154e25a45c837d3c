"""The interleaved timer: the order of the providers within each rep and the reps that ``min_time``
adds for fast steps."""

from __future__ import annotations

import itertools
import os
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from aqcf_kernels import tuning
from benchmarks import common


def _sleeper(seconds: float, log: list[str], name: str):
    def step() -> None:
        log.append(name)
        time.sleep(seconds)

    return step


def test_min_time_adds_reps_for_fast_steps() -> None:
    log: list[str] = []
    steps = {"a": _sleeper(0.002, log, "a"), "b": _sleeper(0.002, log, "b")}
    times = common.time_interleaved(steps, reps=3, warmup=1, min_time=0.05)
    # ~2 ms per call: 0.05 s asks for ~25 reps (sleep overshoots, so allow fewer), far above 3
    assert all(8 <= len(v) <= 26 for v in times.values()), {k: len(v) for k, v in times.items()}
    assert len(times["a"]) == len(times["b"])
    assert all(t >= 0.002 for v in times.values() for t in v)
    # without a warmup round, judged from the first timed rep (min_time was ignored then)
    unwarmed = common.time_interleaved(steps, reps=3, warmup=0, min_time=0.05)
    assert all(8 <= len(v) <= 26 for v in unwarmed.values()), {k: len(v) for k, v in unwarmed.items()}


def test_without_min_time_the_reps_are_exact_and_capped_with_it() -> None:
    log: list[str] = []
    steps = {"a": _sleeper(0.0, log, "a")}
    assert len(common.time_interleaved(steps, reps=4, warmup=1)["a"]) == 4
    assert len(common.time_interleaved(steps, reps=4, warmup=1, min_time=10.0)["a"]) == common.MAX_REPS


def test_each_step_follows_each_other_about_equally_often() -> None:
    """A provider that always ran right after the same neighbour would inherit its cache and heap
    state in every rep; the shuffled order spreads the neighbours (and who runs first) evenly."""
    log: list[str] = []
    names = ["a", "b", "c", "d"]
    reps = 240
    common.time_interleaved({n: _sleeper(0.0, log, n) for n in names}, reps=reps, warmup=1)
    timed = log[len(names) :]
    rounds = [timed[i : i + len(names)] for i in range(0, len(timed), len(names))]
    assert len(rounds) == reps and all(sorted(r) == names for r in rounds)
    follows = Counter(zip(timed, timed[1:], strict=False))
    pairs = list(itertools.permutations(names, 2))
    # 959 successions: 720 within rounds, ~60 per ordered pair of distinct steps, plus ~15 from the
    # round boundaries: ~75 each; a fixed order rotated per round gives one pair ~240 and others ~0
    assert all(50 <= follows[p] <= 110 for p in pairs), {f"{a}>{b}": follows[(a, b)] for a, b in pairs}
    firsts = Counter(r[0] for r in rounds)
    assert all(40 <= firsts[n] <= 80 for n in names), firsts
    log2: list[str] = []  # seeded: a second run repeats the same orders
    common.time_interleaved({n: _sleeper(0.0, log2, n) for n in names}, reps=reps, warmup=1)
    assert log2 == log


def test_settle_choices_calls_until_auto_remembers(monkeypatch) -> None:
    """Three provisional choices resolve one per round; a choice left open by other code before is not
    waited for; steps that never settle are an error, not a benchmark of their refining calls."""
    open_choices = {"elsewhere"}
    monkeypatch.setattr(tuning, "provisional", lambda: frozenset(open_choices))
    calls: list[str] = []

    def step() -> None:
        if "auto" not in calls:  # the first call opens three choices
            open_choices.update({"a", "b", "c"})
        calls.append("auto")
        open_choices.discard(min(open_choices - {"elsewhere"}, default=None))

    def slow_reference() -> None:
        calls.append("slow")
        time.sleep(0.02)

    steps = {"auto": step, "quick": lambda: calls.append("quick"), "slow": slow_reference}
    assert common.settle_choices(steps) == 3
    # after the first round: the step refining, and the quickest other step as the work in between
    assert sorted(calls) == ["auto"] * 3 + ["quick"] * 3 + ["slow"]

    def never() -> None:
        calls.append("never")
        open_choices.add("d")

    with pytest.raises(RuntimeError, match="still provisional"):
        common.settle_choices({"never": never})
    assert calls.count("never") == common.SETTLE_LIMIT


def _choose_by_fake_clock(monkeypatch, faster: str) -> tuning.Candidate:
    """One call of the signature 'sig' between pairs x/a and x/b, ``faster`` 10x the other (a fake
    clock): beyond CLEAR_LOSS and CLEAR_LOSS_MIN_S, so the choice is remembered at once."""
    clock = [0.0]
    monkeypatch.setattr(tuning, "_timer", lambda device: lambda: clock[0])
    a, b = tuning.Candidate("x", "a"), tuning.Candidate("x", "b")
    fast = tuning.CLEAR_LOSS_MIN_S

    def run(c: tuning.Candidate) -> None:
        clock[0] += fast if c.algorithm == faster else 10 * fast

    choice, _ = tuning.choose("sig", [a, b], a, run, [torch.zeros(1)])
    assert choice.how == "measured"
    return choice.candidate


def test_each_workload_chooses_afresh_and_the_memory_pass_replays_its_file(tmp_path, monkeypatch) -> None:
    """Choices made in one workload (a case and mode) neither leak into the next nor are lost: the
    same workload entered again (the memory pass, another process) finds its own cache file."""
    monkeypatch.setattr(tuning, "mode", "measure")
    monkeypatch.setenv(common.TUNING_DIR_ENV, "set, so that the teardown removes it")
    monkeypatch.delenv(common.TUNING_DIR_ENV)
    monkeypatch.delenv("AQCF_TUNING_CACHE")
    try:
        with common.fresh_tuning_cache():
            folder, run_cache = Path(os.environ[common.TUNING_DIR_ENV]), os.environ["AQCF_TUNING_CACHE"]
            assert Path(run_cache).parent == folder and not any(folder.iterdir())
            with common.workload_tuning("1d 16q k3 N8 1024 bwd"):
                assert _choose_by_fake_clock(monkeypatch, "a").algorithm == "a"
            assert os.environ["AQCF_TUNING_CACHE"] == run_cache and tuning.lookup("sig") is None
            with common.workload_tuning("1d 16q k3 N8 1024 fwdbwd"):
                assert tuning.lookup("sig") is None, "a choice leaked from the bwd workload"
                assert _choose_by_fake_clock(monkeypatch, "b").algorithm == "b"
            files = sorted(p.name for p in folder.glob("*.json"))
            assert files == ["tuning-1d-16q-k3-N8-1024-bwd.json", "tuning-1d-16q-k3-N8-1024-fwdbwd.json"]
            with common.workload_tuning("1d 16q k3 N8 1024 bwd"):
                assert tuning.lookup("sig") == tuning.Candidate("x", "a")
    finally:
        tuning.clear()


def test_workloads_share_a_cache_the_caller_chose(tmp_path, monkeypatch) -> None:
    """With ``AQCF_TUNING_CACHE`` set by the caller there is no run folder: every workload uses that
    cache, as one process doing them all in turn would."""
    monkeypatch.setattr(tuning, "mode", "measure")
    monkeypatch.setenv("AQCF_TUNING_CACHE", str(tmp_path / "mine.json"))
    monkeypatch.setenv(common.TUNING_DIR_ENV, "set, so that the teardown removes it")
    monkeypatch.delenv(common.TUNING_DIR_ENV)
    tuning.clear()
    try:
        with common.fresh_tuning_cache():
            assert common.TUNING_DIR_ENV not in os.environ
            with common.workload_tuning("a bwd"):
                _choose_by_fake_clock(monkeypatch, "a")
            with common.workload_tuning("a fwdbwd"):
                assert tuning.lookup("sig") == tuning.Candidate("x", "a")
        assert [p.name for p in tmp_path.glob("*.json")] == ["mine.json"]
    finally:
        tuning.clear()


def test_ratios_are_taken_rep_by_rep_and_fall_back_to_the_medians() -> None:
    """A speedup is the median of the per-rep ratios (the reps are side by side); with samples that are not
    paired (unequally many, or one each) it is the ratio of the medians."""
    from benchmarks.conv import Case, Result

    over = common.Timing.of([0.010, 0.030, 0.012])
    provider = common.Timing.of([0.005, 0.020, 0.012])
    assert common.paired_ratio(over, provider) == pytest.approx(1.5)  # ratios 2, 1.5, 1; medians 12 / 12
    assert common.paired_ratio(over, common.Timing.of([0.006, 0.024])) == pytest.approx(0.012 / 0.015)
    assert common.paired_ratio(common.Timing.of([0.02]), common.Timing.of([0.01])) == pytest.approx(2.0)
    r = Result(Case(dims=1, channels=4, size=8, batch=2), "fwdbwd", {"expanded": over, "auto": provider}, {}, {})
    assert r.speedup("auto") == pytest.approx(1.5)
    assert r.speedup("expanded", over="auto") == pytest.approx(1 / 1.5)  # ratios 1/2, 2/3, 1


def test_the_full_grid_times_longer_unless_asked_otherwise() -> None:
    """--min-time defaults to MIN_TIME_S by grid (the full grid's 5% check needs more reps); an explicit
    value, 0 included, always wins."""
    from benchmarks import conv

    assert conv.min_time("full", None) == conv.MIN_TIME_S["full"] > conv.MIN_TIME_S["other"]
    assert conv.min_time("quick", None) == conv.min_time("targets", None) == conv.MIN_TIME_S["other"]
    assert conv.min_time("full", 0.0) == 0.0 and conv.min_time("quick", 3.0) == 3.0


def test_the_recorded_command_can_be_typed_again(monkeypatch) -> None:
    """``python -m benchmarks.predict`` was recorded as ``predict.py ...``, which no shell runs."""
    from pathlib import Path

    here = Path(common.__file__).parent
    for module, expected in (("predict.py", "predict"), ("cli.py", "cli"), ("__main__.py", "cli")):
        monkeypatch.setattr("sys.argv", [str(here / module), "--quick", "--out", "a b"])
        assert common.command_line() == f"python -m {common.__package__}.{expected} --quick --out 'a b'"
    monkeypatch.setattr("sys.argv", ["/usr/bin/aqcf-bench", "conv"])
    assert common.command_line() == "aqcf-bench conv"
