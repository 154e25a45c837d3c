"""benchmarks/gpu_suite.sh without a GPU, so that what a lent GPU runs has run before it is lent: every
benchmark stage's command runs as a dry run (``SUITE_DEVICE=cpu``: the same commands on CPU at tiny sizes)
and writes its tables; the suite's time budget cuts a stage that overruns it and skips the stages after,
saying so in stages.md; an unknown stage is refused before anything runs; the tests stage's failure log.
(The build and tests stages are the repository's own build and test commands, run by CI as they are.)"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SUITE = ROOT / "benchmarks" / "gpu_suite.sh"
BENCHMARK_STAGES = ["conv-bf16", "profile", "model", "host", "attention", "norm", "rnn", "conv-bf16-grid", "conv-tf32"]


def _suite(out: Path, *stages: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # (tests/conftest.py sets it)
    environ.update({"PYTHON": sys.executable, "SUITE_DEVICE": "cpu", **env})
    return subprocess.run(
        ["bash", str(SUITE), str(out), *stages], env=environ, capture_output=True, text=True, timeout=600
    )


def _results(out: Path) -> dict[str, str]:
    """stages.md's ``stage -> result`` column."""
    rows = [line.strip("|").split("|") for line in (out / "stages.md").read_text().splitlines()[2:]]
    return {cells[0].strip(): cells[3].strip() for cells in rows}


def test_every_benchmark_stage_runs_and_writes_its_tables(tmp_path):
    run = _suite(tmp_path, *BENCHMARK_STAGES)
    log = (tmp_path / "setup.log").read_text()
    assert run.returncode == 0, log[-4000:]
    stages = [
        "conv-bf16",
        "conv-bf16-relu",
        "profile",
        "model",
        "host",
        "attention",
        "norm",
        "passes",
        "rnn",
        "conv-bf16-grid",
        "conv-tf32",
    ]
    assert _results(tmp_path) == dict.fromkeys(stages, "ok")
    tables = ["bf16/conv", "bf16-relu/conv", "bf16-grid/conv", "profile/profile", "profile/autotune", "model/model",
              "host/host",
              "host/block",
              "attention/attention",
              "tf32/conv", "norm/norm", "norm/activation_pass", "norm/wgrad_bias", "rnn/rnn"]  # fmt: skip
    for table in tables:
        for suffix in (".md", ".json"):
            assert (tmp_path / (table + suffix)).stat().st_size > 0, table + suffix


def test_the_budget_cuts_an_overrunning_stage_and_skips_the_rest(tmp_path):
    stub = tmp_path / "python"  # answers the suite's version probe, then overruns any stage
    stub.write_text('#!/bin/sh\n[ "$1" = -c ] && exit 0\nsleep 60\n')
    stub.chmod(0o755)
    started = time.monotonic()
    # (a 6 s budget and stages skipped under 3 s left: the default 15 s kept a test worker asleep for 16 s)
    run = _suite(tmp_path / "out", "norm", "rnn", PYTHON=str(stub), SUITE_BUDGET="6", SUITE_MIN_STAGE="3")
    assert time.monotonic() - started < 30
    assert run.returncode == 1
    skipped = "skipped: budget spent"
    assert _results(tmp_path / "out") == {"norm": "TIMED OUT", "passes": skipped, "rnn": skipped}
    assert "SKIPPED rnn: the suite's budget (6s) is spent" in run.stdout


def test_an_unknown_stage_is_refused_before_anything_runs(tmp_path):
    run = _suite(tmp_path, "norm", "conv-fp8")
    assert run.returncode == 2
    assert "unknown stage 'conv-fp8'" in run.stderr
    assert not (tmp_path / "stages.md").exists()


@pytest.mark.parametrize("workers", [None, 2])
def test_failures_are_logged_as_they_happen(tmp_path, workers):
    # the tests stage's plugin: every failure, named with its traceback, once (xdist: by the controller), even
    # for a run that is killed before pytest's summary; passes are not written
    tests = tmp_path / "test_some.py"
    tests.write_text(
        "def test_passes(): pass\n"
        "def test_fails(): assert 1 == 2, 'the one failure'\n"
        "def test_errors_in_setup(missing_fixture): pass\n"
    )
    log = tmp_path / "failures.txt"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "benchmarks.pytest_failure_log"]
    cmd += ["-n", str(workers)] if workers else []
    env = {**os.environ, "AQCF_TEST_FAILURES": str(log), "PYTHONPATH": str(ROOT)}
    run = subprocess.run([*cmd, str(tests)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stdout[-2000:]
    text = log.read_text()
    assert text.count("FAILED ") == 2
    assert "FAILED test_some.py::test_fails (call)" in text and "the one failure" in text
    assert "FAILED test_some.py::test_errors_in_setup (setup)" in text and "missing_fixture" in text
    assert "test_passes" not in text
