"""A training run's folder on disk: the checkpoints in it and, for a cross-validation's parent folder, its
fold folders. Without torch: aqcf-predict keeps torch out of its start-up, and evaluate/explain share these."""

from __future__ import annotations

from pathlib import Path

#: What ``aqcf-train`` writes (``best.pt``, ``last.pt``).
TRAINING_CHECKPOINTS = ("*.pt",)
#: What ``aqcf-predict`` runs: training checkpoints and the programs ``aqcf-export`` writes.
PREDICTABLE = ("*.pt", "*.pt2")


def checkpoints_in(folder: str | Path, patterns: tuple[str, ...] = TRAINING_CHECKPOINTS) -> list[Path]:
    """The files in ``folder`` matching any of ``patterns``, sorted."""
    folder = Path(folder)
    return sorted(p for pattern in patterns for p in folder.glob(pattern))


def fold_folders(folder: str | Path, patterns: tuple[str, ...] = TRAINING_CHECKPOINTS) -> list[Path]:
    """The ``fold_*`` (nnU-Net's ``fold_0`` ... ``fold_all``) or ``fold*`` subfolders of ``folder`` holding a
    checkpoint (``patterns``): ``folder`` is then the parent of a cross-validation's runs (``aqcf-train --fold
    k --out folder/fold_k``), not a run itself."""
    return [d for d in sorted(Path(folder).glob("fold*")) if d.is_dir() and checkpoints_in(d, patterns)]


def ensemble_folds(folder: str | Path, patterns: tuple[str, ...] = TRAINING_CHECKPOINTS) -> list[Path]:
    """The fold folders (:func:`fold_folders`) a cross-validation's results are taken over unasked: its numbered
    folds (``fold_0``, ``fold1`` ...), as nnU-Net's default ensemble; ``fold_all`` (trained on every training
    case, a model of its own) only when it is all the folder holds."""
    found = fold_folders(folder, patterns)
    numbered = [d for d in found if d.name.removeprefix("fold").removeprefix("_").isdigit()]
    return numbered or found
