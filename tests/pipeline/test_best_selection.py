"""best.pt: chosen by an EMA (alpha 0.9, from 0) of the mean foreground Dice; its epoch and criterion are recorded
in the checkpoint, metrics.jsonl and curves.png, and named by aqcf-evaluate."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from aqcf_kernels.pipeline import evaluate as ev
from aqcf_kernels.pipeline import train as tr
from aqcf_kernels.pipeline.checkpoint import load_checkpoint

# The short run: epoch 1 found a little tumour (Dice 0.15 CT / 0.00 MRI) with a poor liver; later
# epochs segment the liver well (0.92) but no tumour yet. Mean tumour Dice picked epoch 1.
FLUKE_RUN = [
    {"ct_dice_liver": 0.35, "ct_dice_tumour": 0.15, "mri_dice_liver": 0.30, "mri_dice_tumour": 0.00},
    {"ct_dice_liver": 0.70, "ct_dice_tumour": 0.00, "mri_dice_liver": 0.62, "mri_dice_tumour": 0.00},
    {"ct_dice_liver": 0.85, "ct_dice_tumour": 0.00, "mri_dice_liver": 0.80, "mri_dice_tumour": 0.00},
    {"ct_dice_liver": 0.90, "ct_dice_tumour": 0.02, "mri_dice_liver": 0.88, "mri_dice_tumour": 0.00},
    {"ct_dice_liver": 0.92, "ct_dice_tumour": 0.03, "mri_dice_liver": 0.91, "mri_dice_tumour": 0.01},
]


def _old_criterion(val: dict[str, float]) -> float:
    """The former selection score: mean tumour Dice, liver only as a tie-break."""
    tumour = [v for k, v in val.items() if k.endswith("dice_tumour")]
    liver = [v for k, v in val.items() if k.endswith("dice_liver")]
    return sum(tumour) / len(tumour) + 1e-3 * sum(liver) / len(liver)


def test_selection_score_is_mean_foreground_dice() -> None:
    val = {"ct_dice_liver": 0.9, "ct_dice_tumour": 0.0, "mri_dice_liver": 0.8, "mri_dice_tumour": math.nan}
    assert tr.selection_score(val) == pytest.approx((0.9 + 0.0 + 0.8) / 3)  # NaN skipped, a 0 counts as 0
    assert math.isnan(tr.selection_score({"ct_dice_liver": math.nan, "ct_dice_tumour": math.nan}))
    assert tr.selection_score({"ct_dice_liver": 0.5, "score": 99.0, "ema": 99.0}) == 0.5  # only Dice keys


def test_ema_picks_a_later_epoch_over_an_epoch_1_fluke() -> None:
    old = [_old_criterion(v) for v in FLUKE_RUN]
    assert max(range(len(old)), key=old.__getitem__) == 0  # the old criterion kept epoch 1
    scores = [tr.selection_score(v) for v in FLUKE_RUN]
    assert tr.best_epoch_by_ema(scores) == 5


def test_ema_picks_a_later_epoch_over_a_lucky_first_validation() -> None:
    scores = [0.6, 0.3, 0.4, 0.45, 0.5]  # epoch 1 is the raw maximum, a fluke; then steady progress
    assert tr.best_epoch_by_ema(scores) == 5
    # nnU-Net's start (the EMA at the first score) would keep the fluke: 0.6 -> 0.57 -> 0.553 -> ...
    ema, nnunet = scores[0], []
    for score in scores:
        ema = 0.9 * ema + 0.1 * score
        nnunet.append(ema)
    assert max(nnunet) == nnunet[0]


def test_ema_damps_a_single_lucky_validation() -> None:
    scores = [0.2, 0.7, 0.3, 0.45, 0.5, 0.55, 0.6]  # epoch 2 is a spike; the run improves steadily after it
    assert max(range(len(scores)), key=scores.__getitem__) + 1 == 2  # the raw maximum
    assert tr.best_epoch_by_ema(scores) == 7
    # ema = 0.9 * ema + 0.1 * score from 0; NaN leaves it as is
    selection = tr.BestSelection()
    assert selection.update(1, 0.5) and selection.ema == pytest.approx(0.05)
    assert not selection.update(2, math.nan) and selection.ema == pytest.approx(0.05)
    assert selection.update(3, 0.4) and selection.ema == pytest.approx(0.085) and selection.best_epoch == 3
    assert not selection.update(4, 0.0) and selection.best_epoch == 3  # a collapse does not become best
    assert selection.ema == pytest.approx(0.0765) and selection.best == pytest.approx(0.085)
    assert tr.best_epoch_by_ema([math.nan, math.nan]) is None


def test_tiny_run_records_the_best_epoch(datasets, tmp_path: Path, monkeypatch, capsys) -> None:
    """A 3-epoch run whose (scripted) validations are FLUKE_RUN's first three: best.pt holds epoch 3 and says
    why; metrics.jsonl, curves.png and aqcf-evaluate's output name that epoch and the criterion."""
    calls: list[int] = []

    def scripted_validate(model, cfg, val_cases, device) -> dict[str, float]:
        out = dict(FLUKE_RUN[len(calls)])
        calls.append(1)
        return {**out, "score": tr.selection_score(out)}

    monkeypatch.setattr(tr, "validate", scripted_validate)
    run_dir = tmp_path / "run"
    tr.train(datasets.config("joint", train__epochs=3, train__steps_per_epoch=1), run_dir)
    monkeypatch.undo()
    assert len(calls) == 3

    best, last = load_checkpoint(run_dir / "best.pt"), load_checkpoint(run_dir / "last.pt")
    assert best["epochs_done"] == last["epochs_done"] == 3  # 1-based, as metrics.jsonl
    assert best["role"] == "best" and last["role"] == "last"
    assert best["selection"]["best_epoch"] == 3 and "EMA (alpha 0.9, from 0)" in best["selected_by"]
    assert "mean foreground Dice" in best["selected_by"]

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    (session,) = [r for r in rows if r["kind"] == "run"]
    assert "EMA (alpha 0.9, from 0)" in session["criterion"] and session["validates"] is True
    val = [r for r in rows if r["kind"] == "val"]
    assert [r["best_epoch"] for r in val] == [1, 2, 3] and all(r["new_best"] for r in val)
    ema = 0.0
    for row, record in zip(val, FLUKE_RUN, strict=False):
        ema = 0.9 * ema + 0.1 * tr.selection_score(record)
        assert row["ema"] == pytest.approx(ema)
    assert (run_dir / "curves.png").stat().st_size > 1000

    capsys.readouterr()
    results = ev.evaluate(run_dir, out=tmp_path / "eval", write_masks=False, progress=False)
    printed = capsys.readouterr().out
    info = results["checkpoint_info"]
    assert (info["role"], info["epoch"], info["epochs"], info["best_epoch"]) == ("best", 3, 3, 3)
    assert "EMA (alpha 0.9, from 0)" in info["selected_by"]
    for text in (printed, (tmp_path / "eval" / "results.md").read_text()):
        assert "best.pt: weights of epoch 3/3" in text and "EMA (alpha 0.9, from 0) of the mean foreground Dice" in text
    stored = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert stored["checkpoint_info"]["epoch"] == 3 and "EMA" in stored["checkpoint_info"]["description"]

    # last.pt says it is the last epoch and which epoch best.pt holds
    results = ev.evaluate(run_dir, "last", out=tmp_path / "eval-last", write_masks=False, progress=False, echo=False)
    assert "last.pt: weights of epoch 3/3" in results["checkpoint_info"]["description"]
    assert "the last saved epoch (best.pt: epoch 3" in results["checkpoint_info"]["description"]
