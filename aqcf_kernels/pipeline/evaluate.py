"""``aqcf-evaluate``: score a trained run on its held-out cases, next to the paper's table.

    aqcf-evaluate runs/joint                          # best.pt on the test split
    aqcf-evaluate runs/joint --checkpoint last --split val --out runs/joint/eval-val
    aqcf-evaluate runs/ct --no-masks --device cuda
    aqcf-evaluate runs/fold0 runs/fold1 runs/fold2 runs/fold3 runs/fold4 --split val   # cross-validation

For every modality of the run's mode, every case of the run's saved split (``split_{modality}.json``,
written by ``aqcf-train``; never re-drawn here) is predicted whole-volume with MONAI's sliding-window
inference (:mod:`aqcf_kernels.pipeline.inference`) on the preprocessed grid, and scored with
nnU-Net's per-case Dice rule for liver (labels 1 ∪ 2) and tumour (label 2) and HD95 in mm
(:mod:`aqcf_kernels.pipeline.metrics`): on the preprocessed grid, which without resampling is the
original one cropped and reoriented (same scores), or, for a run with ``data.target_spacing``, on the
original grid against the dataset's own label file (:func:`score_case`). Written to ``--out``
(default ``RUN_DIR/eval_{split}_{checkpoint}``):

* ``per_case_{modality}.csv``: one row per case (``nan`` where a metric is undefined);
* ``results.json``: the summaries and per-case rows (undefined metrics as ``null``);
* ``results.md``: one row per modality beside the paper's A-QCF-Net / nnU-Net tumour Dice (also printed);
* ``masks/{modality}/{case_id}.nii.gz``: the predicted labels (uint8, 0/1/2) mapped back onto the
  ORIGINAL image grid with the input's affine and header, so they overlay the input in any viewer
  (skipped with ``--no-masks``).

The checkpoint part of the default folder is ``best``, ``last``, the stem of a file of the run, or
``{folder}-{stem}`` for another run's file. A folder that holds an earlier evaluation gets this one's files
only: what the earlier ``results.json`` lists and this one did not rewrite (masks, a modality's table) is
removed, other files are left alone, and a ``note:`` line says so.

Which weights were scored is always said: the checkpoint file, the epoch its weights are from, and
the criterion that made it ``best.pt`` (:func:`~aqcf_kernels.pipeline.checkpoint.checkpoint_info`)
are printed, written under ``checkpoint_info`` in ``results.json`` and as a line of ``results.md``.

Several run folders (e.g. the folds of a cross-validation, ``aqcf-train --fold k``) are each
evaluated as above (into their own default folder) and summarised over the runs, mean ± sd of each
metric per modality, in ``--out`` (default: ``eval_{split}_{checkpoint}_runs`` next to the runs):
``summary.json`` and ``summary.md`` (:func:`evaluate_runs`). ``--split val`` gives the
cross-validation estimate (each fold on its own validation cases), ``--split test`` the spread of
the fold models on the shared held-out test set.

Relative data paths in the run's config are read from the current directory, as during training;
``--set data.ct_root=...`` (data keys only) points the evaluation at moved data or cache folders.
Errors (missing run folder, checkpoint or split, bad data) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..data.outputs import check_output_dir, output_dir
from .allocator import add_malloc_argument, apply_malloc_choice
from .checkpoint import load_run_checkpoint
from .config import apply_overrides
from .data import SPLITS, check_splits, prepare_data
from .device import DEVICE_CHOICES_HELP, resolve_device
from .inference import predict_case_labels, resolve_checkpoint
from .metrics import PAPER, case_metrics, markdown_table, summarise

__all__ = ["METRICS", "evaluate", "evaluate_runs", "main", "resolve_checkpoint", "score_case", "summarise_runs"]

#: Per-case metric columns, in table order.
METRICS = ("dice_liver", "dice_tumour", "hd95_liver", "hd95_tumour")


def _tag(checkpoint: str | Path, path: Path, run_dir: Path) -> str:
    """The default output folder's checkpoint part: ``best``, ``last``, a file of the run by its stem, and a file
    from elsewhere by its folder too (``run_ct-best``): another run's ``best.pt`` wrote into this run's own
    ``eval_test_best``."""
    if str(checkpoint) in ("best", "last"):
        return str(checkpoint)
    folder = path.resolve().parent
    return path.stem if folder == run_dir.resolve() else f"{folder.name}-{path.stem}"


def _recorded_outputs(out: Path) -> set[Path]:
    """The files an earlier evaluation wrote into ``out``, as its ``results.json`` lists them (the results, the
    per-case tables, the masks); only paths inside ``out``; empty where there is no such record."""
    try:
        old = json.loads((out / "results.json").read_text())
    except (OSError, ValueError):
        return set()
    if not isinstance(old, dict) or not isinstance(old.get("modalities"), dict):
        return set()
    files = {out / "results.json", out / "results.md"}
    for modality, entry in old["modalities"].items():
        files.add(out / f"per_case_{modality}.csv")
        cases = entry.get("cases", []) if isinstance(entry, dict) else []
        files.update(out / row["mask"] for row in cases if isinstance(row, dict) and isinstance(row.get("mask"), str))
    inside = out.resolve()
    return {f for f in files if inside in f.resolve().parents}


def _remove_stale(out: Path, stale: set[Path]) -> None:
    """Delete ``stale`` files and the folders under ``out`` they leave empty."""
    for path in stale:
        path.unlink(missing_ok=True)
    for folder in sorted({p.parent for p in stale}, key=lambda p: len(p.parts), reverse=True):
        while folder != out and out in folder.parents:
            try:
                folder.rmdir()
            except OSError:  # not empty (or gone): leave it
                break
            folder = folder.parent


def _json_safe(value: Any) -> Any:
    """NaN/inf as ``null`` (strict JSON), numpy scalars as Python numbers, recursively."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    fields = ["case_id", *METRICS, "label_tumour_voxels", "pred_tumour_voxels", "grid", "seconds", "mask"]
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("nan" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})


def _resampled(case: Any) -> bool:
    z, x, y = case.meta["shape"]
    return tuple(case.meta["ras_shape_before_resampling"]) != (x, y, z)


def score_case(pred: np.ndarray, case: Any) -> dict[str, Any]:
    """Dice/HD95 of a prediction on the case's preprocessed grid, with voxel counts and the grid used.

    Without resampling the preprocessed grid is the original one cropped (every labelled voxel kept)
    and reoriented, so the scores equal those on the original grid. A resampled case is scored on
    the original grid instead (prediction mapped back, the dataset's own label file, its spacing), as
    nnU-Net and the challenges do. An unlabelled case gets NaN metrics.
    """
    from ..data import load_nifti, restore_to_original

    if case.label is None:
        return {**dict.fromkeys(METRICS, float("nan")), "label_tumour_voxels": None,
                "pred_tumour_voxels": int((pred == 2).sum()), "grid": None}  # fmt: skip
    if not _resampled(case):
        label, spacing, grid = np.asarray(case.label), case.spacing, "preprocessed"
    else:
        pred = restore_to_original(pred, case, order=0)
        raw = np.asarray(load_nifti(case.meta["label_path"]).dataobj)
        label = np.rint(raw.reshape(raw.shape[:3])).astype(np.uint8)
        spacing, grid = case.meta["original"]["spacing"], "original"
    return {
        **case_metrics(pred, label, spacing),
        "label_tumour_voxels": int((label == 2).sum()),
        "pred_tumour_voxels": int((pred == 2).sum()),
        "grid": grid,
    }


def evaluate(
    run_dir: str | Path,
    checkpoint: str | Path = "best",
    split: str = "test",
    out: str | Path | None = None,
    device: str = "auto",
    write_masks: bool = True,
    *,
    data_overrides: Sequence[str] = (),
    progress: bool | None = None,
    echo: bool = True,
) -> dict[str, Any]:
    """Predict and score every case of ``split``; write CSVs, ``results.json``/``.md`` and masks to ``out``.

    Args:
        run_dir: the ``--out`` folder of ``aqcf-train`` (holds the checkpoints and ``split_*.json``).
        checkpoint: ``"best"``, ``"last"`` or a path to a checkpoint.
        split: ``"test"`` (default), ``"val"`` or ``"train"``.
        out: output folder; default ``run_dir / f"eval_{split}_{checkpoint name}"``.
        device: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"``, ``"cuda:1"``... (a DeviceError, a
            ValueError, for one this machine lacks).
        write_masks: also write predicted masks as NIfTI on the original grids.
        data_overrides: ``"data.KEY=VALUE"`` overrides of the run's data section (moved data/cache).
        progress: tqdm bars (``None``: only on a terminal).
        echo: print the markdown table.

    Returns:
        The content of ``results.json``: ``{"run_dir", "checkpoint", "checkpoint_info", "fold", "split",
        "mode", "out", "modalities": {modality: {"summary": {...}, "cases": [row, ...]}}, "paper": {...},
        "table"}`` (undefined metrics are NaN here, ``null`` in the file); ``checkpoint_info`` says which
        epoch the weights are from and the criterion that chose them.

    Raises:
        FileNotFoundError: missing run folder, checkpoint or split file.
        ValueError: bad split name or override; :class:`~aqcf_kernels.data.DataError` for bad data.
    """
    torch_device = resolve_device(device)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    run_dir = Path(run_dir)
    out_argument = "--out" if out is not None else "output folder"
    if out is not None:
        out = check_output_dir(out, out_argument)
    ckpt_path = resolve_checkpoint(run_dir, checkpoint, command="aqcf-evaluate", several=True)
    if out is None:
        out = check_output_dir(run_dir / f"eval_{split}_{_tag(checkpoint, ckpt_path, run_dir)}", out_argument)
    model, cfg, info = load_run_checkpoint(ckpt_path, torch_device)
    apply_overrides(cfg, data_overrides, sections=("data",))
    cfg.validate()  # an override is checked as in training (e.g. data.hu_window), not met deep in preprocessing
    check_splits(run_dir, cfg.modalities)
    data = prepare_data(cfg, run_dir, progress=progress)
    # created now; removed again if nothing gets written into it (an error or Ctrl-C on the first case)
    with output_dir(out, out_argument):
        return _evaluate_into(out, run_dir, ckpt_path, model, cfg, info, data, split, torch_device, write_masks,
                              progress=progress, echo=echo)  # fmt: skip


def _evaluate_into(
    out: Path,
    run_dir: Path,
    ckpt_path: Path,
    model: Any,
    cfg: Any,
    info: dict[str, Any],
    data: dict[str, dict[str, list]],
    split: str,
    torch_device: Any,
    write_masks: bool,
    *,
    progress: bool | None,
    echo: bool,
) -> dict[str, Any]:
    """The body of :func:`evaluate` once the model and data are loaded: predict, score and write into ``out``."""
    import torch
    from tqdm.auto import tqdm

    from ..data import write_prediction

    # An earlier evaluation here (a rerun, --no-masks, another checkpoint or split): its record goes first, so a
    # failure below leaves no results that describe files it did not write, and what this one does not rewrite
    # goes at the end, so the folder holds this evaluation's files only.
    earlier = _recorded_outputs(out)
    if earlier:
        _remove_stale(out, {out / "results.json", out / "results.md"})
        note(f"{out} held an earlier evaluation: its files are replaced")
    written: set[Path] = {out / "results.json", out / "results.md"}
    results: dict[str, Any] = {
        "run_dir": str(run_dir),
        "checkpoint": str(ckpt_path),
        "checkpoint_info": info,
        "fold": cfg.data.fold,
        "split": split,
        "mode": cfg.train.mode,
        "out": str(out),
        "modalities": {},
        "paper": PAPER,
    }
    summaries: dict[str, dict[str, float]] = {}
    for modality in cfg.modalities:
        cases = data[modality][split]
        if not cases:
            note(f"{modality}: the {split} split of {run_dir} is empty; nothing to evaluate")
        rows: list[dict[str, Any]] = []
        bar = tqdm(cases, desc=f"evaluate {modality}", unit="case", disable=None if progress is None else not progress)
        try:
            for case in bar:
                started = time.perf_counter()
                with torch.inference_mode():
                    pred = predict_case_labels(model, case, modality, cfg, torch_device)
                row: dict[str, Any] = {"case_id": case.case_id, **score_case(pred, case)}
                if write_masks:
                    mask = write_prediction(pred, case, out / "masks" / modality / f"{case.case_id}.nii.gz")
                    row["mask"] = str(mask.relative_to(out))
                    written.add(mask)
                row["seconds"] = time.perf_counter() - started
                rows.append(row)
                if not math.isnan(row["dice_tumour"]):
                    bar.set_postfix(tumour_dice=f"{row['dice_tumour']:.3f}")
        finally:
            bar.close()  # also on an error: its message then starts on a clean line
        summaries[modality] = summarise([{k: row[k] for k in METRICS} for row in rows])
        results["modalities"][modality] = {"summary": summaries[modality], "cases": rows}
        _write_csv(out / f"per_case_{modality}.csv", rows)
        written.add(out / f"per_case_{modality}.csv")

    fold = "" if cfg.data.fold is None else f", fold {cfg.data.fold}"
    epoch = "" if info["epoch"] is None else f" (epoch {info['epoch']})"
    table = markdown_table(summaries, label=f"{cfg.train.mode}{fold}, {ckpt_path.name}{epoch}, {split} split")
    results["table"] = table
    checkpoint_line = f"Checkpoint {info['description']}."
    (out / "results.md").write_text(f"{table}\n{checkpoint_line}\n")
    (out / "results.json").write_text(json.dumps(_json_safe(results), indent=1) + "\n")
    _remove_stale(out, earlier - written)
    if echo:
        print(table, end="", flush=True)
        print(checkpoint_line, flush=True)
        print(f"written to {out}", flush=True)
    return results


def _mean_sd(values: Sequence[float]) -> dict[str, Any]:
    defined = [float(v) for v in values if v is not None and not math.isnan(v)]
    mean = float(np.mean(defined)) if defined else float("nan")
    sd = float(np.std(defined, ddof=1)) if len(defined) > 1 else float("nan")
    return {"mean": mean, "sd": sd, "n": len(defined), "values": [float(v) for v in values]}


def summarise_runs(results: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per modality and metric of :data:`METRICS`: mean and sample sd (ddof 1; NaN for one run) over the
    runs' case means, the number of runs where it is defined (``n``), and each run's value."""
    modalities = list(dict.fromkeys(m for r in results for m in r["modalities"]))
    return {
        m: {
            k: _mean_sd([r["modalities"][m]["summary"].get(k, math.nan) for r in results if m in r["modalities"]])
            for k in METRICS
        }
        for m in modalities
    }


def _pm(stats: dict[str, Any], scale: float, digits: int = 1) -> str:
    if math.isnan(stats["mean"]):
        return "n/a"
    text = f"{scale * stats['mean']:.{digits}f}"
    return text + (f" ± {scale * stats['sd']:.{digits}f}" if not math.isnan(stats["sd"]) else "")


def _runs_table(summary: dict[str, dict[str, dict[str, Any]]], label: str) -> str:
    rows = [
        f"Summary over runs ({label}): mean ± sd (sample sd, n-1) over the runs of each run's mean over its cases.",
        "",
        "| modality | runs | liver Dice % | tumour Dice % | liver HD95 mm | tumour HD95 mm |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for modality, stats in summary.items():
        runs = max(len(s["values"]) for s in stats.values())
        rows.append(
            f"| {modality} | {runs} | {_pm(stats['dice_liver'], 100)} | {_pm(stats['dice_tumour'], 100)} | "
            f"{_pm(stats['hd95_liver'], 1)} | {_pm(stats['hd95_tumour'], 1)} |"
        )
    return "\n".join(rows) + "\n"


def evaluate_runs(
    run_dirs: Sequence[str | Path],
    checkpoint: str = "best",
    split: str = "test",
    out: str | Path | None = None,
    device: str = "auto",
    write_masks: bool = True,
    *,
    data_overrides: Sequence[str] = (),
    progress: bool | None = None,
    echo: bool = True,
) -> dict[str, Any]:
    """:func:`evaluate` each run (into its default folder), then mean ± sd over the runs per modality.

    Meant for the folds of one cross-validation (``aqcf-train --fold k``): the runs must share the
    mode; runs of the same fold, or (``split="test"``) with different test cases, get a note (printed as
    a ``note:`` line, and under ``notes`` in the result and ``summary.md``).
    Writes ``summary.json`` and ``summary.md`` to ``out`` (default: the runs' common parent folder /
    ``eval_{split}_{checkpoint}_runs``).

    Returns:
        ``{"split", "checkpoint", "mode", "out", "runs": [{"run_dir", "fold", "checkpoint_info", "out",
        "summaries"}], "same_cases", "notes", "modalities": {modality: {metric: {"mean", "sd", "n", "values"}}},
        "table"}``.
    """
    resolve_device(device)
    if str(checkpoint) not in ("best", "last"):
        raise ValueError(f"with several run folders, --checkpoint must be best or last, got {str(checkpoint)!r}")
    run_dirs = [Path(r) for r in run_dirs]
    if len({r.resolve() for r in run_dirs}) != len(run_dirs):
        raise ValueError("a run folder is given more than once")
    out_argument = "--out" if out is not None else "output folder"
    if out is None:
        parent = Path(os.path.commonpath([str(r.resolve()) for r in run_dirs]))
        out = parent / f"eval_{split}_{checkpoint}_runs"
    out = check_output_dir(out, out_argument)  # before the first run is evaluated, not after the last
    modes = {}
    for run_dir in run_dirs:
        # every folder checked before the first is evaluated
        resolve_checkpoint(run_dir, checkpoint, command="aqcf-evaluate", several=True)
        if (run_dir / "config.json").is_file():
            modes[run_dir] = (json.loads((run_dir / "config.json").read_text()).get("train") or {}).get("mode")
    if len(set(modes.values())) > 1:
        shown = ", ".join(f"{r}: {m}" for r, m in modes.items())
        raise ValueError(f"the runs have different modes ({shown}): summarise runs of one model only")
    each = []
    for run_dir in run_dirs:
        each.append(evaluate(run_dir, checkpoint, split, None, device, write_masks,
                             data_overrides=data_overrides, progress=progress, echo=False))  # fmt: skip
        if echo:
            fold = "" if each[-1]["fold"] is None else f" (fold {each[-1]['fold']})"
            print(f"{run_dir}{fold}: {each[-1]['checkpoint_info']['description']}", flush=True)
    modes = sorted({r["mode"] for r in each})
    if len(modes) > 1:
        raise ValueError(f"the runs have different modes ({', '.join(modes)}): summarise runs of one model only")
    folds = [r["fold"] for r in each]
    notes = []
    if len(set(map(str, folds))) != len(folds):
        notes.append(f"several runs of the same fold ({folds}): the summary is not a cross-validation")
    cases = [{m: [row["case_id"] for row in r["modalities"][m]["cases"]] for m in r["modalities"]} for r in each]
    same_cases = all(c == cases[0] for c in cases)
    if split == "test" and not same_cases:
        notes.append("the runs' test sets differ: the summary mixes different cases")
    for text in notes:
        note(text)
    summary = summarise_runs(each)
    out.mkdir(parents=True, exist_ok=True)  # checked above, before the runs were evaluated
    table = _runs_table(summary, f"{len(each)} runs, {modes[0]}, {checkpoint}.pt, {split} split")
    lines = [
        f"- {r['run_dir']}" + ("" if r["fold"] is None else f" (fold {r['fold']})")
        + f": {r['checkpoint_info']['description']}; results in {r['out']}"
        for r in each
    ]  # fmt: skip
    markdown = table + "\nRuns:\n\n" + "\n".join(lines) + "\n" + "".join(f"\nNote: {text}.\n" for text in notes)
    result = {
        "split": split,
        "checkpoint": str(checkpoint),
        "mode": modes[0],
        "out": str(out),
        "runs": [
            {
                "run_dir": r["run_dir"],
                "fold": r["fold"],
                "checkpoint_info": r["checkpoint_info"],
                "out": r["out"],
                "summaries": {m: v["summary"] for m, v in r["modalities"].items()},
            }
            for r in each
        ],  # fmt: skip
        "same_cases": same_cases,
        "notes": notes,
        "modalities": summary,
        "table": table,
    }
    (out / "summary.md").write_text(markdown)
    (out / "summary.json").write_text(json.dumps(_json_safe(result), indent=1) + "\n")
    if echo:
        print(table, end="", flush=True)
        print(f"written to {out}", flush=True)
    return result


def note(text: str) -> None:
    """A caveat about the results, as one plain ``note:`` line on stderr (not a Python warning with its source
    line); printed whatever ``echo`` says, as the warning it replaces was."""
    print(f"note: {text}", file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    """The ``aqcf-evaluate`` command line."""
    p = argparse.ArgumentParser(
        prog="aqcf-evaluate",
        description="Score a trained run on its saved test (or val) split: per-case Dice (nnU-Net's rule) and "
        "HD95, a table next to the paper's numbers, and the predicted masks as NIfTI on the input grids.",
    )
    p.add_argument(
        "run_dirs",
        nargs="+",
        type=Path,
        metavar="RUN_DIR",
        help="the --out folder of aqcf-train; several (e.g. the folds of a cross-validation): each is evaluated "
        "and the metrics are summarised over them (mean ± sd) in --out",
    )
    p.add_argument("--checkpoint", default="best", help="best (default), last, or a path to a checkpoint")
    p.add_argument("--split", default="test", choices=SPLITS, help="which part of the run's saved split (test)")
    p.add_argument(
        "--out",
        type=Path,
        help="output folder (default RUN_DIR/eval_{split}_{checkpoint}); with several runs, the summary's "
        "(default eval_{split}_{checkpoint}_runs in their common parent folder)",
    )
    p.add_argument("--device", default="auto", help=f"{DEVICE_CHOICES_HELP} (default auto)")
    add_malloc_argument(p)
    p.add_argument("--no-masks", action="store_true", help="do not write the predicted masks as NIfTI")
    p.add_argument(
        "--set", action="append", default=[], metavar="data.KEY=VALUE", help="override a data path (moved data/cache)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``aqcf-evaluate``; returns the exit status (2 on a user-facing error, 130 on Ctrl-C)."""
    args = build_parser().parse_args(argv)
    apply_malloc_choice(args.malloc)
    several = len(args.run_dirs) > 1
    try:
        (evaluate_runs if several else evaluate)(
            args.run_dirs if several else args.run_dirs[0],
            checkpoint=args.checkpoint,
            split=args.split,
            out=args.out,
            device=args.device,
            write_masks=not args.no_masks,
            data_overrides=args.set,
            progress=False if args.quiet else None,
        )
    except KeyboardInterrupt:
        # results.json and results.md are written at the end: an interrupted evaluation has none
        print("aqcf-evaluate: interrupted; results.json not written (evaluate again)", file=sys.stderr, flush=True)
        return 130
    except (ValueError, FileNotFoundError) as e:
        print(f"aqcf-evaluate: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
