"""Checkpoints hold only tensors and plain values and are read with ``torch.load(weights_only=True)``.

A file whose pickle would run code on load is refused by :func:`load_checkpoint` and by every command
that loads checkpoints (aqcf-evaluate, aqcf-explain, aqcf-predict, aqcf-train --resume), with one
line naming the file, and nothing in it runs (a marker file it would create never appears). A
checkpoint of the previous format (numpy arrays in its RNG state) is refused with a line saying so.
"""

from __future__ import annotations

import os
import pickle
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from aqcf_kernels.pipeline import evaluate as ev
from aqcf_kernels.pipeline import explain as ex
from aqcf_kernels.pipeline import predict as pr
from aqcf_kernels.pipeline import train as tr
from aqcf_kernels.pipeline.checkpoint import UnsafeCheckpointError, load_checkpoint, save_atomic

PLAIN = (str, int, float, bool, type(None), torch.Tensor)


def _leave_marker(path: str) -> None:
    """What the malicious pickles would run: proof that code ran, if the file appears."""
    Path(path).write_text("code from a checkpoint ran")


class RunsOnLoad:
    """Pickles to ``call(*args)``: unpickling it with plain ``pickle`` (or ``weights_only=False``) runs that."""

    def __init__(self, call: Callable[..., Any], *args: Any) -> None:
        self.call, self.args = call, args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.call, self.args


def _payloads(marker: Path) -> dict[str, RunsOnLoad]:
    return {
        "os.system": RunsOnLoad(os.system, f"touch {marker}"),
        "test-module function": RunsOnLoad(_leave_marker, str(marker)),
    }


def _write(kind: str, obj: Any, path: Path) -> Path:
    """``obj`` as torch.save writes it today (zip), as older torch did (legacy), or as a bare pickle."""
    if kind == "zip":
        torch.save(obj, path)
    elif kind == "legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(obj, protocol=4))
    return path


def _assert_plain(value: Any, where: str = "checkpoint") -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            assert isinstance(key, (str, int)), f"{where}: key {key!r}"
            _assert_plain(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _assert_plain(item, f"{where}[{i}]")
    else:
        assert isinstance(value, PLAIN), f"{where} is a {type(value).__name__}"


@pytest.mark.parametrize("payload", ["os.system", "test-module function"])
@pytest.mark.parametrize("kind", ["zip", "legacy", "bare-pickle"])
def test_code_executing_pickle_is_refused(tmp_path: Path, kind: str, payload: str) -> None:
    marker = tmp_path / "MARKER"
    evil = {"config": {}, "model": {"w": torch.ones(2)}, "extra": _payloads(marker)[payload]}
    path = _write(kind, evil, tmp_path / "evil.pt")
    with pytest.raises(UnsafeCheckpointError) as caught:
        load_checkpoint(path)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"checkpoint {path} cannot be loaded safely: its pickle imports ")
    expected = "posix.system" if payload == "os.system" else f"{__name__}._leave_marker"
    assert expected in message and message.endswith("nothing in it was run"), message
    assert not marker.exists()
    # The same file through plain pickle would have run the payload: the test's file is really malicious.
    if kind == "bare-pickle" and payload == "test-module function":
        pickle.loads(path.read_bytes())
        assert marker.exists()


@pytest.fixture
def evil_run(trained, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of a trained run whose best.pt and last.pt run code on load; returns (run folder, marker)."""
    source = trained("ct")
    run_dir = tmp_path / "shared-run"
    run_dir.mkdir()
    for name in ("config.json", "split_ct.json"):
        (run_dir / name).write_bytes((source / name).read_bytes())
    marker = tmp_path / "MARKER"
    good = load_checkpoint(source / "best.pt")
    for name in ("best.pt", "last.pt"):
        _write("zip", {**good, "rng": RunsOnLoad(os.system, f"touch {marker}")}, run_dir / name)
    return run_dir, marker


def _one_error_line(err: str, command: str, path: Path) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"{command}: error: checkpoint {path} cannot be loaded safely"), err
    return lines[0]


def test_commands_refuse_a_code_executing_checkpoint(evil_run, datasets, tmp_path: Path, capsys) -> None:
    run_dir, marker = evil_run
    capsys.readouterr()
    assert ev.main([str(run_dir), "--quiet"]) == 2
    _one_error_line(capsys.readouterr().err, "aqcf-evaluate", run_dir / "best.pt")
    assert ex.main([str(run_dir), "--quiet", "--out", str(tmp_path / "cam")]) == 2
    _one_error_line(capsys.readouterr().err, "aqcf-explain", run_dir / "best.pt")
    assert ex.main([str(run_dir), "--list-layers"]) == 2
    _one_error_line(capsys.readouterr().err, "aqcf-explain", run_dir / "best.pt")
    scan = next(datasets.ct.rglob("volume-0.nii"))
    assert pr.main(["-i", str(scan), "-o", str(tmp_path / "masks"), "--run", str(run_dir), "--quiet"]) == 2
    _one_error_line(capsys.readouterr().err, "aqcf-predict", run_dir / "best.pt")
    assert tr.main(["--out", str(run_dir), "--resume"]) == 2
    _one_error_line(capsys.readouterr().err, "aqcf-train", run_dir / "last.pt")
    assert not marker.exists()


def test_checkpoint_of_the_previous_format_is_refused_clearly(trained, tmp_path: Path) -> None:
    """The old format kept numpy's RNG state as a numpy array: refused, and the line says why."""
    good = load_checkpoint(trained("ct") / "last.pt")
    old = {**good, "rng": {**good["rng"], "numpy": np.random.get_state()}, "epoch": good["epochs_done"] - 1}
    path = _write("zip", old, tmp_path / "last.pt")
    with pytest.raises(UnsafeCheckpointError) as caught:
        load_checkpoint(path)
    message = str(caught.value)
    assert "\n" not in message and f"checkpoint {path} cannot be loaded safely" in message
    assert "numpy" in message and "before safe loading" in message, message


def test_training_checkpoints_are_tensors_and_plain_values(trained) -> None:
    """Every value a training run stores is a tensor or a plain type, so weights_only needs no allow-list."""
    run_dir = trained("joint")
    for name in ("best.pt", "last.pt"):
        assert torch.serialization.get_unsafe_globals_in_checkpoint(run_dir / name) == []
        ckpt = torch.load(run_dir / name, weights_only=True)  # no safe_globals context needed
        _assert_plain(ckpt)
        assert set(ckpt["rng"]) >= {"torch", "numpy", "python"}
        assert ckpt["epochs_done"] == 1 and ckpt["step"] == 2


def test_rng_state_round_trips_exactly(tmp_path: Path) -> None:
    """torch, numpy (incl. a cached Gaussian) and python RNGs draw the same after save, load and restore."""
    np.random.seed(3)
    np.random.standard_normal()  # leaves has_gauss = 1 and a cached Gaussian in numpy's legacy state
    random.seed(4)
    torch.manual_seed(5)
    path = save_atomic({"config": {}, "model": {}, "rng": tr.rng_state()}, tmp_path / "rng.pt")

    def draws() -> tuple:
        return (
            np.random.standard_normal(3).tolist(),
            np.random.randint(0, 1000, 3).tolist(),
            random.random(),
            (torch.rand(3).tolist()),
        )

    expected = draws()
    draws()  # move every generator on
    tr.set_rng_state(load_checkpoint(path)["rng"])
    assert draws() == expected


def test_normal_checkpoint_round_trips(tmp_path: Path) -> None:
    state = {"config": {"train": {"epochs": 2}}, "model": {"w": torch.arange(4.0)}, "epochs_done": 2, "best": -np.inf}
    loaded = load_checkpoint(save_atomic(state, tmp_path / "x.pt"))
    assert loaded["config"] == state["config"] and loaded["epochs_done"] == 2 and loaded["best"] == -np.inf
    assert torch.equal(loaded["model"]["w"], state["model"]["w"])


def test_damaged_file_is_not_readable_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"is not readable") as caught:
        load_checkpoint(path)
    assert not isinstance(caught.value, UnsafeCheckpointError) and "\n" not in str(caught.value)
    good = _write("zip", {"config": {}, "model": {}}, tmp_path / "good.pt")
    path.write_bytes(good.read_bytes()[:100])  # torn
    with pytest.raises(ValueError, match=r"is not readable") as caught:
        load_checkpoint(path)
    assert "\n" not in str(caught.value)


def test_a_file_of_another_kind_is_not_a_checkpoint(datasets, tmp_path: Path, capsys) -> None:
    """Text (or any non-torch file) was "not readable (KeyError: 105)": say it is not a checkpoint of this package."""
    run = tmp_path / "run"
    run.mkdir()
    path = run / "notes.pt"
    path.write_text("i am a text file")
    with pytest.raises(ValueError, match="not a checkpoint of aqcf_kernels") as caught:
        load_checkpoint(path)
    assert "KeyError" not in str(caught.value) and "\n" not in str(caught.value)
    scan = next(datasets.ct.rglob("volume-0.nii*"))
    argv = ["-i", str(scan), "-o", str(tmp_path / "out"), "--run", str(run), "--checkpoint", "notes.pt", "--quiet"]
    assert pr.main(argv) == 2
    assert capsys.readouterr().err == (
        f"aqcf-predict: error: checkpoint {path} is not readable: not a checkpoint of aqcf_kernels (aqcf-train "
        "writes torch.save files, .pt; this is neither a torch zip archive nor a pickle)\n"
    )
    assert not (tmp_path / "out").exists()
