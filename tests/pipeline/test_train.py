"""aqcf-train: exact resume, atomic checkpoints, clear config errors, and a 2-process torchrun (gloo) run."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from aqcf_kernels import tuning
from aqcf_kernels.pipeline import checkpoint as ckpt_module
from aqcf_kernels.pipeline.checkpoint import load_checkpoint, save_atomic
from aqcf_kernels.pipeline.train import main as train_main
from aqcf_kernels.pipeline.train import train

from .conftest import subprocess_env


def _tmp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def _crashing_save(obj, f, *args, **kwargs) -> None:
    """torch.save that dies half-way: some bytes reach the file, then the process 'crashes'."""
    f.write(b"PK\x03\x04 partial checkpoint")
    raise RuntimeError("simulated crash during torch.save")


def test_resume_matches_uninterrupted_run(datasets, tmp_path: Path, monkeypatch) -> None:
    """2 epochs in one go == 1 epoch, a crash while saving epoch 2, then --resume (model, optimiser, step), with
    dropout: its masks come from torch's global RNG, which the resumed process's new data loader iterator drew
    from (its workers' seed) where the unbroken run's did not, so every later mask differed."""
    monkeypatch.setattr(tuning, "mode", "heuristic")  # (tests/pipeline/test_resume_interrupt.py says why)
    cfg = datasets.config("joint", train__epochs=2, train__augment=True, model__dropout=0.3)
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    train(cfg, straight)
    train(cfg, interrupted, max_epochs_this_run=1)
    first = load_checkpoint(interrupted / "last.pt")
    assert first["epochs_done"] == 1 and first["step"] == 2

    # Crash while writing the epoch-2 checkpoint: the epoch-1 checkpoint survives, no temp files remain.
    before = (interrupted / "last.pt").read_bytes()
    with monkeypatch.context() as m:
        m.setattr(ckpt_module.torch, "save", _crashing_save)
        with pytest.raises(RuntimeError, match="simulated crash"):
            train(cfg, interrupted, resume=True)
    assert (interrupted / "last.pt").read_bytes() == before
    assert _tmp_files(interrupted) == []

    train(cfg, interrupted, resume=True)
    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(interrupted / "last.pt")
    assert (a["epochs_done"], a["step"]) == (b["epochs_done"], b["step"]) == (2, 4)
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 4


def test_save_atomic_keeps_old_checkpoint(tmp_path: Path, monkeypatch) -> None:
    path = save_atomic({"config": {}, "model": {"w": torch.ones(3)}}, tmp_path / "last.pt")
    before = path.read_bytes()
    monkeypatch.setattr(ckpt_module.torch, "save", _crashing_save)
    with pytest.raises(RuntimeError, match="simulated crash"):
        save_atomic({"config": {}, "model": {"w": torch.zeros(3)}}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before and _tmp_files(tmp_path) == []
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--set", "train.epochz=3"], "unknown key 'train.epochz'; train has mode, epochs"),
        (["--set", "trian.epochs=3"], "unknown section 'trian'"),
        (["--set", "train.epochs=many"], "train.epochs must be an integer, got 'many'"),
        (["--set", "data.slice_size=[48]"], "data.slice_size must have 2 entries"),
        (["--set", "train.mode=fancy"], "train.mode must be one of"),
        (["--set", "data.ct_root=null"], "train.mode='joint' needs data.ct_root"),
        (["--set", "data.mri_root=/no/such/folder"], "/no/such/folder"),
        (["--config", "/no/such.yaml"], "config file /no/such.yaml does not exist"),
    ],
)
def test_config_errors(datasets, tmp_path: Path, capsys, extra: list[str], message: str) -> None:
    args = ["--out", str(tmp_path / "run")]
    for item in datasets.overrides("joint"):
        args += ["--set", item]
    assert train_main([*args, *extra]) == 2
    err = capsys.readouterr().err
    assert "aqcf-train: error:" in err and message in err, err
    assert not (tmp_path / "run" / "last.pt").exists()


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("train.lr=-1", "train.lr must be a positive number, got -1.0"),
        ("train.lr=.nan", "train.lr must be a positive number, got NaN"),
        ("data.slice_size=[0,0]", "data.slice_size must hold sizes >= 1, got [0, 0]"),
        ("data.patch_size=[8,0,32]", "data.patch_size must hold sizes >= 1"),
        ("data.tumour_prob=2", "data.tumour_prob must be in [0, 1], got 2.0"),
        ("data.hu_window=[250,-200]", "data.hu_window must be [low, high] with low < high"),
        ("data.target_spacing=[1,0,1]", "data.target_spacing must be 3 positive sizes"),
        ("data.test_fraction=1", "data.test_fraction must be in [0, 1)"),
        ("data.val_fraction=0.9", "data.val_fraction + data.test_fraction must be < 1"),
        ("data.split_seed=-1", "data.split_seed must be >= 0"),
        ("data.num_workers=-1", "data.num_workers must be >= 0"),
        ("train.weight_decay=-0.1", "train.weight_decay must be >= 0"),
        ("train.warmup_steps=-1", "train.warmup_steps must be >= 0"),
        ("train.grad_clip=-1", "train.grad_clip must be >= 0"),
        ("train.seed=-1", "train.seed must be in 0 .. 2**32 - 1"),
        ("train.val_cases=0", "train.val_cases must be >= 1 or null"),
    ],
)
def test_bad_numbers_are_refused_before_anything_is_written(datasets, tmp_path: Path, capsys, item, message) -> None:
    """Named by their full dotted key, before the run folder exists (was: torch's "Invalid learning rate: -1.0",
    numpy's "low >= high", the sampler's "tumour_prob", after config.json and the split files were written)."""
    args = ["--out", str(tmp_path / "run")]
    for override in [*datasets.overrides("joint"), item]:
        args += ["--set", override]
    assert train_main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"aqcf-train: error: {message}") and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


def test_config_file_errors(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: 2\n  lr: fast\n")
    assert train_main(["--config", str(bad), "--out", str(tmp_path / "run")]) == 2
    assert f"{bad}: train.lr must be a number, got 'fast'" in capsys.readouterr().err
    bad.write_text("optimiser:\n  lr: 0.1\n")
    assert train_main(["--config", str(bad), "--out", str(tmp_path / "run")]) == 2
    assert "unknown section 'optimiser'" in capsys.readouterr().err


def test_torchrun_two_processes(datasets, tmp_path: Path) -> None:
    """``torchrun --nproc-per-node 2 -m aqcf_kernels.pipeline.train`` on CPU (gloo) finishes and writes last.pt."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "aqcf_kernels.pipeline.train", "--out", str(out)]
    for item in datasets.overrides("joint"):
        cmd += ["--set", item]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=180, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["step"] == 2 and ckpt["epochs_done"] == 1
    assert (out / "metrics.jsonl").read_text().count('"kind": "val"') == 1  # rank 0 logs once
    print(f"torchrun smoke test: {time.perf_counter() - started:.1f} s")
