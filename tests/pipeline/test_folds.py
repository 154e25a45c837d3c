"""Cross-validation folds (nnU-Net's convention): patient-level, disjoint, covering, deterministic; --fold k and
--fold all runs record their fold; aqcf-evaluate summarises several fold runs (mean ± sd)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from aqcf_kernels.data import DataError
from aqcf_kernels.data.split import load_or_create_split, make_fold_split, make_folds
from aqcf_kernels.pipeline import evaluate as ev
from aqcf_kernels.pipeline import train as tr
from aqcf_kernels.pipeline.checkpoint import checkpoint_info, load_checkpoint

IDS = [f"lits-{i}" for i in range(23)]
# Some patients have several scans: cases 0-5 belong to three patients, two scans each.
GROUPS = {f"lits-{i}": f"patient-{i // 2}" if i < 6 else f"patient-{i}" for i in range(23)}


def _patients(cases: list[str]) -> set[str]:
    return {GROUPS[c] for c in cases}


def test_folds_are_patient_level_disjoint_covering_and_deterministic() -> None:
    folds = make_folds(IDS, folds=5, test_fraction=0.2, seed=3, groups=GROUPS)
    parts = [folds["test"], *folds["folds"]]
    everything = [c for part in parts for c in part]
    assert sorted(everything) == sorted(IDS) and len(everything) == len(set(everything))  # cover, disjoint
    for i, a in enumerate(parts):  # no patient in two parts
        for b in parts[i + 1 :]:
            assert not _patients(a) & _patients(b)
    sizes = [len(_patients(part)) for part in folds["folds"]]
    assert max(sizes) - min(sizes) <= 1 and len(folds["folds"]) == 5
    assert len(_patients(folds["test"])) == round(20 * 0.2)  # 20 patients
    # deterministic, independent of the order of the ids; another seed, other folds
    assert make_folds(list(reversed(IDS)), 5, 0.2, 3, GROUPS) == folds
    assert make_folds(IDS, 5, 0.2, 4, GROUPS) != folds

    splits = [make_fold_split(IDS, k, 5, 0.2, 3, GROUPS) for k in range(5)]
    for k, split in enumerate(splits):
        assert split["val"] == folds["folds"][k] and split["test"] == folds["test"]
        assert sorted(split["train"] + split["val"] + split["test"]) == sorted(IDS)
        assert not _patients(split["train"]) & _patients(split["val"])
    assert sorted(c for s in splits for c in s["val"]) == sorted(c for f in folds["folds"] for c in f)
    everything_but_test = make_fold_split(IDS, "all", 5, 0.2, 3, GROUPS)
    assert everything_but_test["val"] == [] and everything_but_test["test"] == folds["test"]
    assert sorted(everything_but_test["train"]) == sorted(set(IDS) - set(folds["test"]))


def test_fold_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot be cut into 5 folds"):
        make_fold_split(IDS[:5], 0, folds=5, test_fraction=0.2)
    assert make_fold_split(IDS[:5], "all", folds=5, test_fraction=0.2)["val"] == []  # 'all' needs no folds
    with pytest.raises(ValueError, match="fold must be 0..4 or 'all'"):
        make_fold_split(IDS, 5)
    # A run folder holds one fold: its split file is never silently reused for another.
    path = tmp_path / "split_ct.json"
    split = load_or_create_split(path, IDS, (0.7, 0.1, 0.2), fold=1, folds=5)
    stored = json.loads(path.read_text())
    assert (stored["fold"], stored["folds"], stored["val"]) == (1, 5, split["val"])
    assert load_or_create_split(path, IDS, (0.7, 0.1, 0.2), fold=1, folds=5) == split
    with pytest.raises(DataError, match="holds fold 1, but fold 2 was asked for"):
        load_or_create_split(path, IDS, (0.7, 0.1, 0.2), fold=2, folds=5)
    with pytest.raises(DataError, match="holds fold 1, but no fold was asked for"):
        load_or_create_split(path, IDS, (0.7, 0.1, 0.2))


def test_fold_config_errors(datasets, tmp_path: Path, capsys) -> None:
    args = ["--out", str(tmp_path / "run")]
    for item in datasets.overrides("ct"):
        args += ["--set", item]
    assert tr.main([*args, "--fold", "5"]) == 2
    assert "data.fold / data.folds: fold must be 0..4 or 'all', got 5" in capsys.readouterr().err
    assert tr.main([*args, "--set", "data.folds=1"]) == 2
    assert "data.folds must be >= 2" in capsys.readouterr().err


def _fold_run(datasets, out: Path, fold: str, capsys) -> Path:
    args = ["--out", str(out), "--fold", fold, "--device", "cpu"]
    for item in datasets.overrides("ct", data__folds=2):  # 5 cases: 1 test, 2 folds of 2
        args += ["--set", item]
    capsys.readouterr()
    assert tr.main(args) == 0, capsys.readouterr().err
    return out


def test_fold_runs_and_their_summary(datasets, tmp_path: Path, capsys) -> None:
    runs = [_fold_run(datasets, tmp_path / f"fold{k}", str(k), capsys) for k in (0, 1)]
    splits = [json.loads((r / "split_ct.json").read_text()) for r in runs]
    assert [(s["fold"], s["folds"]) for s in splits] == [(0, 2), (1, 2)]
    assert splits[0]["test"] == splits[1]["test"] and len(splits[0]["test"]) == 1  # one held-out test set
    assert not set(splits[0]["val"]) & set(splits[1]["val"])
    assert sorted(splits[0]["val"] + splits[1]["val"]) == sorted(splits[0]["train"] + splits[0]["val"])
    for k, run in enumerate(runs):  # the run folder records its fold: config, checkpoint, log
        assert json.loads((run / "config.json").read_text())["data"]["fold"] == k
        assert checkpoint_info(load_checkpoint(run / "best.pt"), run / "best.pt")["fold"] == k
        assert f'"fold": {k}' in (run / "metrics.jsonl").read_text()

    # fold all: every non-test case trains, nothing validates, best.pt is the last epoch and says so
    everything = _fold_run(datasets, tmp_path / "all", "all", capsys)
    assert "best.pt will be the last epoch's weights" in capsys.readouterr().out
    split = json.loads((everything / "split_ct.json").read_text())
    assert split["fold"] == "all" and split["val"] == [] and split["test"] == splits[0]["test"]
    assert sorted(split["train"]) == sorted(splits[0]["train"] + splits[0]["val"])
    best = load_checkpoint(everything / "best.pt")
    assert best["epochs_done"] == load_checkpoint(everything / "last.pt")["epochs_done"]
    assert "last epoch" in best["selected_by"] and "fold 'all'" in best["selected_by"]
    val_rows = [json.loads(r) for r in (everything / "metrics.jsonl").read_text().splitlines() if '"val"' in r]
    assert val_rows[-1]["best_epoch"] == 1 and "ct_dice_liver" not in val_rows[-1]

    # aqcf-evaluate over the two folds: each evaluated, then mean ± sd per metric
    out = tmp_path / "summary"
    capsys.readouterr()
    assert ev.main([*map(str, runs), "--out", str(out), "--no-masks", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "Summary over runs (2 runs, ct, best.pt, test split)" in printed and "| ct | 2 |" in printed
    assert "(fold 0): best.pt: weights of epoch 1/1" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert [r["fold"] for r in summary["runs"]] == [0, 1] and summary["same_cases"] is True
    stats = summary["modalities"]["ct"]["dice_liver"]
    values = [json.loads((r / "eval_test_best" / "results.json").read_text()) for r in runs]
    liver = [v["modalities"]["ct"]["summary"]["dice_liver"] for v in values]
    assert stats["values"] == pytest.approx(liver) and stats["mean"] == pytest.approx(sum(liver) / 2)
    assert stats["sd"] == pytest.approx(abs(liver[0] - liver[1]) / math.sqrt(2))
    assert "±" in (out / "summary.md").read_text() and "fold 1" in (out / "summary.md").read_text()
    # several runs need best/last, not a file; runs of different models are not summarised together
    assert ev.main([*map(str, runs), "--checkpoint", str(runs[0] / "best.pt")]) == 2
    assert "--checkpoint must be best or last" in capsys.readouterr().err
