"""The installed ``aqcf-bench``, run from outside the source tree as a user of the wheel runs it.

``benchmarks/`` installs as the package ``aqcf_bench``: it installed as a top-level ``benchmarks``, which
takes that name in site-packages from any other distribution that has one. Its modules name each other
relatively (the family modules, the peak-memory worker's ``-m``), so they work under either name.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def _outside(tmp_path: Path, *cmd: str) -> subprocess.CompletedProcess:
    """``cmd`` in ``tmp_path``, with no PYTHONPATH: only what the environment installed is importable."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_the_benchmarks_install_as_aqcf_bench_and_nothing_as_benchmarks(tmp_path):
    names = ("benchmarks", "aqcf_bench")
    code = f"import importlib.util as u, json; print(json.dumps([u.find_spec(n) is not None for n in {names}]))"
    proc = _outside(tmp_path, sys.executable, "-c", code)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [False, True]


def test_the_console_script_runs_a_benchmark_with_its_memory_worker(tmp_path):
    """One tiny case with the peak-memory pass: the worker is started as ``-m aqcf_bench._memory_worker``."""
    script = Path(sys.executable).with_name("aqcf-bench")
    assert script.exists(), f"{script}: install the package (make install) to get the console script"
    out = tmp_path / "out"
    proc = _outside(tmp_path, str(script), "conv", "--grid", "quick", "--cases", "1d 16q", "--modes", "fwd",
                    "--providers", "expanded", "--reps", "1", "--warmup", "0", "--out", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "peak-memory worker failed" not in proc.stderr
    # A clean run prints its progress and what it wrote, nothing else (the worker's exit once printed triton's
    # nanobind leak report: ~60 lines).
    noise = [
        line for line in proc.stderr.splitlines() if not line.startswith(("[", "WARNING: 1-minute load", "wrote "))
    ]
    assert noise == [], proc.stderr
    (row,) = json.loads((out / "conv.json").read_text())["results"]
    assert row["providers"]["expanded"]["peak_mib"] > 0
