"""Segmentation metrics with nnU-Net's conventions, and the table next to the paper's numbers.

Classes are evaluated as regions: liver = labels {1, 2} (the whole organ, tumour included, as in
LiTS), tumour = label 2. Dice follows nnU-Net's rule: a case with the region empty in both label
and prediction is NaN (skipped by the mean); empty label but something predicted scores 0. HD95
(MONAI, in mm with the voxel spacing) is NaN where either side is empty.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch

REGIONS = {"liver": (1, 2), "tumour": (2,)}

# Tumour Dice (%) of the paper's table: A-QCF-Net and its unimodal nnU-Net baselines.
PAPER = {"ct": {"aqcf": 76.7, "nnunet": 71.3}, "mri": {"aqcf": 78.3, "nnunet": 73.6}}


def region(labels: np.ndarray, name: str) -> np.ndarray:
    return np.isin(labels, REGIONS[name])


def dice(pred: np.ndarray, label: np.ndarray, name: str) -> float:
    """nnU-Net's per-case Dice of region ``name``: 2TP / (2TP + FP + FN), NaN if both are empty."""
    p, g = region(pred, name), region(label, name)
    tp = np.logical_and(p, g).sum()
    denominator = p.sum() + g.sum()
    return float("nan") if denominator == 0 else float(2 * tp / denominator)


def hd95(pred: np.ndarray, label: np.ndarray, name: str, spacing: Sequence[float]) -> float:
    """95th-percentile Hausdorff distance in mm between the region's surfaces (NaN if one is empty): MONAI's
    definition, the larger of the two directed 95th percentiles (each surface voxel's distance to the other
    surface; a surface voxel has a face neighbour outside its mask), not the percentile of both sets pooled."""
    from monai.metrics import compute_hausdorff_distance

    p, g = region(pred, name), region(label, name)
    if not p.any() or not g.any():
        return float("nan")
    as_batch = [torch.from_numpy(np.stack([~m, m]))[None] for m in (p, g)]  # (1, 2, *spatial) one-hot
    with warnings.catch_warnings():  # MONAI 1.5+ warns about its own internal use of a deprecated argument
        warnings.simplefilter("ignore", FutureWarning)
        value = compute_hausdorff_distance(*as_batch, percentile=95, spacing=list(spacing))
    return float(value[0, 0])


def case_metrics(pred: np.ndarray, label: np.ndarray, spacing: Sequence[float]) -> dict[str, float]:
    """Dice and HD95 of both regions for one case."""
    if pred.shape != label.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from the label's {label.shape}")
    out = {}
    for name in REGIONS:
        out[f"dice_{name}"] = dice(pred, label, name)
        out[f"hd95_{name}"] = hd95(pred, label, name, spacing)
    return out


def summarise(per_case: Sequence[dict[str, float]]) -> dict[str, float]:
    """Mean of each metric over the cases where it is defined (NaN-skipping, as nnU-Net), and counts."""
    keys = sorted({k for row in per_case for k in row if isinstance(row[k], float)})
    summary: dict[str, float] = {"cases": float(len(per_case))}
    for k in keys:
        values = [row[k] for row in per_case if isinstance(row.get(k), float) and not math.isnan(row[k])]
        summary[k] = float(np.mean(values)) if values else float("nan")
        summary[f"{k}_n"] = float(len(values))
    return summary


def _pct(v: float) -> str:
    return "n/a" if math.isnan(v) else f"{100 * v:.1f}"


def _mm(v: float) -> str:
    return "n/a" if math.isnan(v) else f"{v:.1f}"


def markdown_table(summaries: dict[str, dict[str, float]], label: str = "this run") -> str:
    """One row per modality: our Dice/HD95 and the paper's tumour Dice for A-QCF-Net and nnU-Net."""
    head = (
        "| modality | cases | liver Dice % | tumour Dice % | liver HD95 mm | tumour HD95 mm "
        "| paper A-QCF tumour % | paper nnU-Net tumour % |"
    )
    rule = "|---|---:|---:|---:|---:|---:|---:|---:|"
    rows = [f"Results ({label}); Dice per nnU-Net's rule, mean over cases where defined.", "", head, rule]
    for modality, s in summaries.items():
        paper = PAPER.get(modality, {})
        rows.append(
            f"| {modality} | {int(s.get('cases', 0))} | {_pct(s.get('dice_liver', math.nan))} | "
            f"{_pct(s.get('dice_tumour', math.nan))} | {_mm(s.get('hd95_liver', math.nan))} | "
            f"{_mm(s.get('hd95_tumour', math.nan))} | {paper.get('aqcf', 'n/a')} | {paper.get('nnunet', 'n/a')} |"
        )
    return "\n".join(rows) + "\n"
