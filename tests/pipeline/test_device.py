"""--device on aqcf-train / aqcf-evaluate / aqcf-explain: ``auto`` by default, a device this machine lacks is
one ``aqcf-xxx: error:`` line and exit status 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aqcf_kernels.pipeline import evaluate as ev
from aqcf_kernels.pipeline import explain as ex
from aqcf_kernels.pipeline import train as tr

from .conftest import subprocess_env


def _missing_cuda() -> str:
    """A CUDA device this machine cannot provide: any on a CPU-only torch, else one past the count."""
    return f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"


def _one_error_line(err: str, prog: str, spec: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: error: --device {spec!r}"), err
    assert "Traceback" not in err


@pytest.mark.parametrize("via", ["--device", "--set"])
def test_train_unavailable_device(datasets, tmp_path: Path, capsys, via: str) -> None:
    spec = _missing_cuda()
    args = ["--out", str(tmp_path / "run")]
    for item in datasets.overrides("ct"):
        args += ["--set", item]
    args += ["--device", spec] if via == "--device" else ["--set", f"train.device={spec}"]
    assert tr.main(args) == 2
    _one_error_line(capsys.readouterr().err, "aqcf-train", spec)
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.parametrize("main", [ev.main, ex.main], ids=["evaluate", "explain"])
def test_evaluate_explain_unavailable_device(main, tmp_path: Path, capsys) -> None:
    spec = _missing_cuda()
    prog = "aqcf-evaluate" if main is ev.main else "aqcf-explain"
    assert main([str(tmp_path), "--device", spec]) == 2  # the device is checked before the run folder
    _one_error_line(capsys.readouterr().err, prog, spec)
    if main is ex.main:
        assert main([str(tmp_path), "--list-layers", "--device", spec]) == 2
        _one_error_line(capsys.readouterr().err, prog, spec)


@pytest.mark.parametrize("spec", ["tpu", "cuda:x"])
def test_unknown_device(tmp_path: Path, capsys, spec: str) -> None:
    assert ev.main([str(tmp_path), "--device", spec]) == 2
    _one_error_line(capsys.readouterr().err, "aqcf-evaluate", spec)


def test_defaults_are_auto() -> None:
    assert tr.build_parser().parse_args(["--out", "x"]).device is None  # None: train.device, itself auto
    assert tr.RunConfig().train.device == "auto"
    assert ev.build_parser().parse_args(["x"]).device == "auto"
    assert ex.build_parser().parse_args(["x"]).device == "auto"
    rank, world, device = tr._distributed("auto")
    assert (rank, world) == (0, 1) and device.type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_train_device_error_in_a_subprocess(datasets, tmp_path: Path) -> None:
    """The real console path: exit status 2, one line on stderr, no traceback."""
    spec = _missing_cuda()
    cmd = [sys.executable, "-m", "aqcf_kernels.pipeline.train", "--out", str(tmp_path / "run"), "--device", spec]
    for item in datasets.overrides("ct"):
        cmd += ["--set", item]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=120, check=False)
    assert proc.returncode == 2, proc.stderr
    _one_error_line(proc.stderr, "aqcf-train", spec)
