"""``aqcf-bench --malloc keep``: the timing process keeps freed memory, and the report says so.

Run in a subprocess: the setting is process-wide and cannot be undone, so it must not reach the
test process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import common

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("malloc", ["keep", "default"])
def test_conv_run_applies_and_reports_the_allocator_setting(tmp_path: Path, malloc: str) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "benchmarks.cli", "conv", "--grid", "quick", "--cases", "1d 16q",
           "--providers", "expanded", "--modes", "fwd", "--reps", "1", "--warmup", "0", "--min-time", "0",
           "--no-memory", "--out", str(out), "--malloc", malloc]  # fmt: skip
    env = {**os.environ, "AQCF_TUNING_CACHE": str(tmp_path / "tuning.json")}
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    report = json.loads((out / "conv.json").read_text())
    assert report["env"]["malloc"] == malloc
    assert ("--malloc keep" in (out / "conv.md").read_text()) == (malloc == "keep")


def test_unknown_setting_is_refused() -> None:
    with pytest.raises(ValueError, match="--malloc must be one of keep, default"):
        common.apply_malloc("jemalloc")


def test_a_keep_that_cannot_apply_is_reported_as_default(monkeypatch, capsys) -> None:
    monkeypatch.setattr(common, "apply_malloc_choice", lambda choice: "the C library is musl, not glibc")
    monkeypatch.setattr(common, "_malloc_setting", "default")
    common.apply_malloc("keep")
    assert common._malloc_setting == "default"
    assert "--malloc keep not applied: the C library is musl, not glibc" in capsys.readouterr().err
