"""A pytest plugin for runs that may be cut short: each failure is appended to ``$AQCF_TEST_FAILURES`` as it
happens, its test id and traceback, so a run that a time limit kills still names what failed (pytest prints
its summary only at the end; the 2026-12-04 GPU run left only unnamed ``F`` marks).

``pytest -p benchmarks.pytest_failure_log`` (benchmarks/gpu_suite.sh's tests stage). Under pytest-xdist the
controller writes (it receives every worker's reports), the workers do not, so each failure is written once.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

_log: Path | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _log
    path = os.environ.get("AQCF_TEST_FAILURES", "").strip()
    _log = Path(path) if path and not hasattr(config, "workerinput") else None


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if _log is None or not report.failed:
        return
    with _log.open("a", encoding="utf-8") as f:  # one append per failure, flushed on close
        f.write(f"FAILED {report.nodeid} ({report.when})\n{report.longreprtext}\n\n")
