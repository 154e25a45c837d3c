"""Whole-volume prediction with MONAI's sliding-window inference, and the checkpoint of a run to predict with.

A 2D model sees the volume slice by slice (axial, a batch of slices at a time), each slice tiled by
windows of the training crop size; a 3D model tiles the volume with windows of the training patch
size. Windows overlap by a quarter and are blended with Gaussian weights (nnU-Net's choice).

:func:`predict_probabilities` adds mirroring test-time augmentation (nnU-Net's: every combination of
flips along the axes the network sees, softmax probabilities averaged) and a per-window progress
callback; :func:`count_windows` says how many windows a volume takes, for progress bars.
"""

from __future__ import annotations

import itertools
import shlex
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from .config import RunConfig
from .runs import checkpoints_in, ensemble_folds, fold_folders

if TYPE_CHECKING:
    from ..data import CachedCase

SLICES_PER_BATCH = 8
OVERLAP = 0.25
SW_BATCH_SIZE = 4


#: Files of other kinds that a ``--checkpoint`` may name by mistake, and what they are for.
NOT_TRAINING_CHECKPOINTS = {
    ".pt2": "an exported program (aqcf-export's .pt2, which aqcf-predict runs)",
    ".onnx": "an ONNX file (aqcf-export's, for ONNX Runtime)",
}


def missing_checkpoint_hint(run_dir: str | Path, command: str, *, several: bool = False) -> str:
    """What to pass instead when ``run_dir`` has not the checkpoint asked for: its fold folders (all of them
    for a ``command`` taking ``several`` run folders, else one), or that it holds no checkpoint at all;
    ``""`` when it holds other checkpoints."""
    run_dir = Path(run_dir)
    folds = fold_folders(run_dir)
    if folds:
        names = ", ".join(d.name for d in folds)
        if several:  # the runs a summary over the cross-validation takes: its numbered folds, as predict's ensemble
            return (
                f"{run_dir} holds the fold folders {names} of a cross-validation: pass them as run folders, "
                f"{command} {' '.join(shlex.quote(str(d)) for d in ensemble_folds(run_dir))}"
            )
        return (
            f"{run_dir} holds the fold folders {names} of a cross-validation: pass one of them, e.g. "
            f"{command} {shlex.quote(str(folds[0]))}"
        )
    others = [p.name for p in checkpoints_in(run_dir)]
    if not others:
        return (
            f"{run_dir} holds no checkpoints (*.pt); is it the --out folder of aqcf-train, "
            "and has training saved one yet?"
        )
    return f"it has {', '.join(others)}; choose with --checkpoint"


def resolve_checkpoint(
    run_dir: str | Path, checkpoint: str | Path = "best", *, command: str = "this command", several: bool = False
) -> Path:
    """``best``/``last`` -> ``RUN_DIR/{best,last}.pt``; anything else is a path. Raises if it is missing, with
    :func:`missing_checkpoint_hint` (``command``, ``several``) for ``best``/``last``, and a ValueError for an
    exported program or ONNX file (a training checkpoint is needed)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist (expected the --out folder of aqcf-train)")
    named = str(checkpoint) in ("best", "last")
    path = run_dir / f"{checkpoint}.pt" if named else Path(checkpoint)
    if not path.is_file():  # first: a mistyped path is missing, whatever its suffix says it would be
        hint = missing_checkpoint_hint(run_dir, command, several=several) if named else ""
        raise FileNotFoundError(f"checkpoint {path} does not exist" + (f"; {hint}" if hint else ""))
    what = NOT_TRAINING_CHECKPOINTS.get(path.suffix.lower())
    if what is not None and not named:
        raise ValueError(
            f"--checkpoint {path}: {what}; {command} needs a training checkpoint (.pt: best, last or a file "
            "aqcf-train wrote), not an exported one"
        )
    return path


def _predictor(model: nn.Module, modality: str, on_windows: Callable[[int], None] | None = None):
    def predict(x: Tensor) -> Tensor:
        out = model(**{modality: x})[modality]
        if on_windows is not None:
            on_windows(x.shape[0])
        return out[0] if isinstance(out, (list, tuple)) else out  # deep supervision: the full-resolution head

    return predict


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    image: np.ndarray,
    modality: str,
    cfg: RunConfig,
    device="cpu",
    *,
    pad_value: float = 0.0,
    on_windows: Callable[[int], None] | None = None,
) -> Tensor:
    """Class logits ``(3, z, x, y)`` (float32, on CPU) of a preprocessed ``(z, x, y)`` volume.

    ``pad_value``: what a volume smaller than the window is padded with (the case's normalised
    air, :attr:`~aqcf_kernels.data.CachedCase.pad_value`, as the training samplers pad; 0 by default).
    ``on_windows(n)`` is called after each forward pass with the number of windows it computed.
    """
    from monai.inferers import sliding_window_inference

    predict = _predictor(model, modality, on_windows)
    kw = {"overlap": OVERLAP, "mode": "gaussian", "sw_batch_size": SW_BATCH_SIZE, "cval": float(pad_value)}
    volume = torch.from_numpy(np.array(image, dtype=np.float32))  # a copy: cached arrays are read-only memmaps
    if cfg.model.spatial_dims == 3:
        x = volume[None, None].to(device)
        return sliding_window_inference(x, cfg.data.patch_size, predictor=predict, **kw)[0].float().cpu()
    slices = []
    for z0 in range(0, volume.shape[0], SLICES_PER_BATCH):
        x = volume[z0 : z0 + SLICES_PER_BATCH, None].to(device)  # (b, 1, x, y)
        slices.append(sliding_window_inference(x, cfg.data.slice_size, predictor=predict, **kw).float().cpu())
    return torch.cat(slices).permute(1, 0, 2, 3)  # (3, z, x, y)


def mirror_axes(cfg: RunConfig) -> tuple[int, ...]:
    """The ``(z, x, y)`` array axes mirroring TTA flips: in-plane (x, y) for a 2D model, all three in 3D."""
    return (0, 1, 2) if cfg.model.spatial_dims == 3 else (1, 2)


def mirror_flips(cfg: RunConfig, tta: bool = True) -> list[tuple[int, ...]]:
    """Every subset of :func:`mirror_axes`, identity first: 4 passes in 2D, 8 in 3D; ``[()]`` without TTA."""
    axes = mirror_axes(cfg) if tta else ()
    return [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]


def _windows(size: Sequence[int], roi: Sequence[int]) -> int:
    # MONAI's tiling: the image is padded up to the ROI, windows start every int(roi * (1 - overlap))
    # voxels (the whole ROI when it equals the size), the last one flush with the far edge.
    from monai.data.utils import dense_patch_slices

    size = [max(s, r) for s, r in zip(size, roi, strict=True)]
    interval = [r if r == s else max(1, int(r * (1 - OVERLAP))) for s, r in zip(size, roi, strict=True)]
    return len(dense_patch_slices(size, roi, interval))


def count_windows(shape: Sequence[int], cfg: RunConfig, *, tta: bool = False) -> int:
    """How many windows :func:`predict_probabilities` runs the model on for a ``(z, x, y)`` volume."""
    z, x, y = (int(n) for n in shape)
    if cfg.model.spatial_dims == 3:
        per_pass = _windows((z, x, y), cfg.data.patch_size)
    else:
        per_pass = z * _windows((x, y), cfg.data.slice_size)
    return per_pass * len(mirror_flips(cfg, tta))


@torch.no_grad()
def predict_probabilities(
    model: nn.Module,
    image: np.ndarray,
    modality: str,
    cfg: RunConfig,
    device="cpu",
    *,
    tta: bool = False,
    pad_value: float = 0.0,
    on_windows: Callable[[int], None] | None = None,
) -> Tensor:
    """Softmax probabilities ``(3, z, x, y)`` (float32, CPU) of a preprocessed ``(z, x, y)`` volume.

    With ``tta`` the volume is also predicted mirrored along every combination of :func:`mirror_axes`
    (flipped back before averaging the probabilities), as nnU-Net does. The model is put in eval
    mode for the call and restored afterwards.
    """
    was_training = model.training
    model.eval()
    try:
        total: Tensor | None = None
        flips = mirror_flips(cfg, tta)
        for axes in flips:
            view = np.flip(image, axes) if axes else image
            logits = predict_logits(model, view, modality, cfg, device, pad_value=pad_value, on_windows=on_windows)
            probs = torch.softmax(logits, dim=0)
            del logits
            if axes:
                probs = probs.flip([a + 1 for a in axes])  # array axis a is dim a + 1 after the class dim
            total = probs if total is None else total.add_(probs)
        assert total is not None
        return total.div_(len(flips)) if len(flips) > 1 else total
    finally:
        model.train(was_training)


def predict_labels(
    model: nn.Module, image: np.ndarray, modality: str, cfg: RunConfig, device="cpu", *, pad_value: float = 0.0
) -> np.ndarray:
    """Label map ``(z, x, y)`` uint8 (0 background, 1 liver, 2 tumour) of a preprocessed volume.

    ``pad_value`` as in :func:`predict_logits`; for a cached case use :func:`predict_case_labels`,
    which pads with the case's own air value.
    """
    was_training = model.training
    model.eval()
    try:
        logits = predict_logits(model, image, modality, cfg, device, pad_value=pad_value)
        return logits.argmax(0).numpy().astype(np.uint8)
    finally:
        model.train(was_training)


def predict_case_labels(model: nn.Module, case: CachedCase, modality: str, cfg: RunConfig, device="cpu") -> np.ndarray:
    """:func:`predict_labels` of a preprocessed case, windows padded with its normalised air
    (:attr:`~aqcf_kernels.data.CachedCase.pad_value`), as ``aqcf-predict`` and the training samplers
    pad: validation, ``aqcf-evaluate`` and ``aqcf-explain`` then see what prediction sees (an MRI
    z-score's air is far below 0, so padding with 0 would put a bright frame around small volumes)."""
    return predict_labels(model, case.image, modality, cfg, device, pad_value=case.pad_value)
