"""Ctrl-C ends training with one line (what was saved, the command that continues); --resume takes the original
command line when its config is the run's own, and lists the differing keys when it is not."""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path

import pytest
import torch

from aqcf_kernels import tuning
from aqcf_kernels.pipeline import train as tr
from aqcf_kernels.pipeline.checkpoint import load_checkpoint, load_for_inference


def _args(datasets, out: Path, **extra: object) -> list[str]:
    args = ["--out", str(out)]
    for item in datasets.overrides("ct", **{"train__epochs": 2, "train__steps_per_epoch": 1, **extra}):
        args += ["--set", item]
    return args


def _interrupt_line(err: str) -> str:
    """The one line Ctrl-C ends with: the last on stderr (after any preprocessing bar), and the only one
    from aqcf-train; no traceback."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert "Traceback" not in err, err
    ours = [line for line in lines if "aqcf-train" in line]
    assert len(ours) == 1 and lines[-1] == ours[0] and ours[0].startswith("aqcf-train: interrupted"), err
    return ours[0]


def test_resume_with_another_config_lists_the_differences(datasets, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    args = _args(datasets, out)
    capsys.readouterr()
    assert tr.main([*args, "--max-epochs-this-run", "1"]) == 0
    assert load_checkpoint(out / "last.pt")["epochs_done"] == 1
    # stopped short of the run's end: one line says where and how it goes on (it ended in silence)
    stopped = [line for line in capsys.readouterr().out.splitlines() if line.startswith("aqcf-train: stopped")]
    assert stopped == [
        f"aqcf-train: stopped after epoch 1 of 2 (--max-epochs-this-run 1); {out / 'last.pt'} holds it; "
        f"continue with: aqcf-train --out {out} --resume"
    ]
    before = (out / "last.pt").read_bytes()

    changed = [*args, "--set", "train.lr=0.01", "--set", "train.epochs=3", "--fold", "0", "--resume"]
    capsys.readouterr()
    assert tr.main(changed) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("aqcf-train: error: --resume: this command's config differs from the run's own")
    for item in ("data.fold: null → 0", "train.epochs: 2 → 3", "train.lr: 0.0003 → 0.01"):
        assert item in err, err
    assert "train.device" not in err and "data.ct_root" not in err  # only what differs
    assert (out / "last.pt").read_bytes() == before  # nothing ran

    # Without --resume the folder is protected; the message says how to continue.
    capsys.readouterr()
    assert tr.main(args) == 2
    assert "already holds a run (last.pt): add --resume" in capsys.readouterr().err

    # The original command line (+ --resume) continues; the device may differ.
    assert tr.main([*args, "--resume", "--device", "cpu"]) == 0
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["epochs_done"] == 2 and ckpt["config"]["train"]["device"] == "cpu"
    # --set without --config is compared on what it sets, on top of the run's own config: only the key typed is
    # listed (it listed every default the run had overridden)
    capsys.readouterr()
    assert tr.main(["--out", str(out), "--resume", "--set", "train.epochs=3"]) == 2
    err = capsys.readouterr().err
    assert "differs from the run's own" in err and "train.epochs: 2 → 3" in err and "data.ct_root" not in err, err
    assert tr.main(["--out", str(out), "--resume", "--set", "train.device=cpu"]) == 0  # the one key that may change
    # Just --out DIR --resume uses the run's own config (here: nothing left to train).
    assert tr.main(["--out", str(out), "--resume"]) == 0
    assert load_checkpoint(out / "last.pt")["epochs_done"] == 2
    capsys.readouterr()
    assert tr.main(["--out", str(tmp_path / "nothing"), "--resume"]) == 2
    assert "holds no run to continue (no last.pt)" in capsys.readouterr().err


def test_resume_help_is_documented() -> None:
    text = tr.build_parser().format_help()
    assert "--resume" in text and "original command line" in text and "differing keys" in text


def test_ctrl_c_during_an_epoch(datasets, tmp_path: Path, monkeypatch, capsys) -> None:
    """Ctrl-C in epoch 2: last.pt (epoch 1) is loadable, one line names it and the exact continue command."""
    out = tmp_path / "run"
    args = _args(datasets, out)
    real_epoch = tr.train_epoch

    def interrupted_epoch(run, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        return real_epoch(run, epoch)

    monkeypatch.setattr(tr, "train_epoch", interrupted_epoch)
    capsys.readouterr()
    assert tr.main(args) == 130
    line = _interrupt_line(capsys.readouterr().err)
    command = shlex.join(["aqcf-train", *args, "--resume"])
    assert line == (
        f"aqcf-train: interrupted in epoch 2/2: {out / 'last.pt'} holds epoch 1, the last completed; "
        f"continue with: {command}"
    )
    assert load_checkpoint(out / "last.pt")["epochs_done"] == 1
    model, cfg = load_for_inference(out / "last.pt")
    assert cfg.train.epochs == 2
    monkeypatch.undo()

    # The printed command continues the run to its end.
    assert tr.main(shlex.split(command)[1:]) == 0
    assert load_checkpoint(out / "last.pt")["epochs_done"] == 2


def _validate_drawing_from_the_rng(model, cfg, val_cases, device):
    """A validation whose score depends on the weights and on a draw from torch's RNG (as an augmenting one's
    would): a resumed run that validated other weights or from another RNG state scores differently."""
    weights = sum(float(p.detach().double().sum()) for p in model.parameters())
    score = abs(math.sin(weights)) * 0.5 + 0.5 * float(torch.rand(()))
    return {"ct_dice_liver": score, "ct_dice_tumour": score, "score": score}


def _rows(out: Path) -> list[dict]:
    """metrics.jsonl's training and validation rows, without their timings."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows if r["kind"] in ("train", "val")]


@pytest.mark.parametrize("epoch", [2, 3], ids=["middle", "last"])
def test_ctrl_c_during_validation_saves_the_trained_epoch_and_resume_validates_it(
    datasets, tmp_path: Path, monkeypatch, capsys, epoch: int
) -> None:
    """The training steps of an epoch finished, its validation was interrupted: last.pt is written at that
    moment, atomically, and the line says so; --resume validates that epoch first, from the RNG states its
    training left, so every row, the EMA, best.pt and last.pt equal an uninterrupted run's (the validation
    was skipped before, and the EMA that picks best.pt came out different)."""
    # (the rule's conv algorithms: measuring, 'auto' computes a signature's first calls with each candidate in
    # turn, so the first run's weights would differ from the second's in the last bits)
    monkeypatch.setattr(tuning, "mode", "heuristic")
    args = _args(datasets, tmp_path / "straight", train__epochs=3)
    monkeypatch.setattr(tr, "validate", _validate_drawing_from_the_rng)
    assert tr.main(args) == 0
    out = tmp_path / "run"
    args = _args(datasets, out, train__epochs=3)
    calls: list[int] = []

    def interrupted(*a):
        calls.append(1)
        if len(calls) == epoch:
            torch.rand(())  # the validation drew from the RNG before the Ctrl-C
            raise KeyboardInterrupt
        return _validate_drawing_from_the_rng(*a)

    monkeypatch.setattr(tr, "validate", interrupted)
    capsys.readouterr()
    assert tr.main(args) == 130
    line = _interrupt_line(capsys.readouterr().err)
    assert line.startswith(
        f"aqcf-train: interrupted in epoch {epoch}/3: saved {out / 'last.pt'} (epoch {epoch}, written now; its "
        "validation runs first when resumed);"
    )
    assert line.endswith(shlex.join(["aqcf-train", *args, "--resume"]))
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["epochs_done"] == epoch and ckpt["step"] == epoch and ckpt["role"] == "last"
    assert ckpt["unfinished"]["logged"] is True
    assert load_checkpoint(out / "best.pt")["epochs_done"] < epoch  # best.pt holds a validated epoch, untouched
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]

    monkeypatch.setattr(tr, "validate", _validate_drawing_from_the_rng)
    assert tr.main([*args, "--resume"]) == 0
    assert _rows(out) == _rows(tmp_path / "straight")
    for name in ("last.pt", "best.pt"):
        a, b = load_checkpoint(tmp_path / "straight" / name), load_checkpoint(out / name)
        assert (a["epochs_done"], a["selection"]) == (b["epochs_done"], b["selection"]), name
        assert "unfinished" not in b and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), name


@pytest.mark.parametrize("epoch", [1, 2], ids=["middle", "last"])
def test_ctrl_c_between_last_pt_and_its_validation_row_loses_no_row(
    datasets, tmp_path: Path, monkeypatch, capsys, epoch: int
) -> None:
    """A Ctrl-C after an epoch's last.pt is written and before its validation row reaches metrics.jsonl: the
    epoch is finished (last.pt holds it, validated); --resume appends the missing row, also when the run has no
    epoch left to train, and the rows equal an uninterrupted run's (the row was lost before)."""
    monkeypatch.setattr(tuning, "mode", "heuristic")
    monkeypatch.setattr(tr, "validate", _validate_drawing_from_the_rng)
    assert tr.main(_args(datasets, tmp_path / "straight")) == 0
    out = tmp_path / "run"
    args = _args(datasets, out)
    save_checkpoints = tr.save_checkpoints

    def interrupted_after_saving(run, saved_epoch, *a, **kw):
        save_checkpoints(run, saved_epoch, *a, **kw)
        if saved_epoch + 1 == epoch:
            raise KeyboardInterrupt

    monkeypatch.setattr(tr, "save_checkpoints", interrupted_after_saving)
    capsys.readouterr()
    assert tr.main(args) == 130
    line = _interrupt_line(capsys.readouterr().err)
    assert line.startswith(f"aqcf-train: interrupted in epoch {epoch}/2: {out / 'last.pt'} holds epoch {epoch}")
    assert [r["epoch"] for r in _rows(out) if r["kind"] == "val"] == list(range(1, epoch))
    monkeypatch.setattr(tr, "save_checkpoints", save_checkpoints)
    assert tr.main([*args, "--resume"]) == 0
    assert _rows(out) == _rows(tmp_path / "straight")
    assert tr.main([*args, "--resume"]) == 0  # the row is not appended twice
    assert _rows(out) == _rows(tmp_path / "straight")


@pytest.mark.parametrize("resumed", [False, True])
def test_ctrl_c_before_any_epoch_finished(datasets, tmp_path: Path, monkeypatch, capsys, resumed: bool) -> None:
    out = tmp_path / "run"
    args = _args(datasets, out)

    def interrupted_epoch(run, epoch):
        raise KeyboardInterrupt

    monkeypatch.setattr(tr, "train_epoch", interrupted_epoch)
    if not resumed:
        assert tr.main(args) == 130
        line = _interrupt_line(capsys.readouterr().err)
        assert line == (
            "aqcf-train: interrupted in epoch 1/2 before any epoch finished: nothing saved; "
            f"start again with: {shlex.join(['aqcf-train', *args])}"
        )
        assert not (out / "last.pt").exists()
        return
    monkeypatch.undo()
    assert tr.main([*args, "--max-epochs-this-run", "1"]) == 0
    monkeypatch.setattr(tr, "train_epoch", interrupted_epoch)
    capsys.readouterr()
    assert tr.main(["--out", str(out), "--resume"]) == 130
    line = _interrupt_line(capsys.readouterr().err)
    assert line == (
        f"aqcf-train: interrupted in epoch 2/2: {out / 'last.pt'} holds epoch 1, the last completed; "
        f"continue with: aqcf-train --out {out} --resume"
    )
