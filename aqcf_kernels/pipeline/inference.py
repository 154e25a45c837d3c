"""Whole-volume prediction with MONAI's sliding-window inference, and the checkpoint of a run to predict with.

A 2D model sees the volume slice by slice (axial, a batch of slices at a time), each slice tiled by
windows of the training crop size; a 3D model tiles the volume with windows of the training patch
size. Windows overlap by a quarter and are blended with Gaussian weights (nnU-Net's choice).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .config import RunConfig

SLICES_PER_BATCH = 8


def resolve_checkpoint(run_dir: str | Path, checkpoint: str | Path = "best") -> Path:
    """``best``/``last`` -> ``RUN_DIR/{best,last}.pt``; anything else is a path. Raises if it is missing."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist (expected the --out folder of aqcf-train)")
    path = run_dir / f"{checkpoint}.pt" if str(checkpoint) in ("best", "last") else Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return path


def _predictor(model: nn.Module, modality: str):
    def predict(x: Tensor) -> Tensor:
        out = model(**{modality: x})[modality]
        return out[0] if isinstance(out, (list, tuple)) else out  # deep supervision: the full-resolution head

    return predict


@torch.no_grad()
def predict_logits(model: nn.Module, image: np.ndarray, modality: str, cfg: RunConfig, device="cpu") -> Tensor:
    """Class logits ``(3, z, x, y)`` (float32, on CPU) of a preprocessed ``(z, x, y)`` volume."""
    from monai.inferers import sliding_window_inference

    predict = _predictor(model, modality)
    kw = {"overlap": 0.25, "mode": "gaussian", "sw_batch_size": 4}
    volume = torch.from_numpy(np.array(image, dtype=np.float32))  # a copy: cached arrays are read-only memmaps
    if cfg.model.spatial_dims == 3:
        x = volume[None, None].to(device)
        return sliding_window_inference(x, cfg.data.patch_size, predictor=predict, **kw)[0].float().cpu()
    slices = []
    for z0 in range(0, volume.shape[0], SLICES_PER_BATCH):
        x = volume[z0 : z0 + SLICES_PER_BATCH, None].to(device)  # (b, 1, x, y)
        slices.append(sliding_window_inference(x, cfg.data.slice_size, predictor=predict, **kw).float().cpu())
    return torch.cat(slices).permute(1, 0, 2, 3)  # (3, z, x, y)


def predict_labels(model: nn.Module, image: np.ndarray, modality: str, cfg: RunConfig, device="cpu") -> np.ndarray:
    """Label map ``(z, x, y)`` uint8 (0 background, 1 liver, 2 tumour) of a preprocessed volume."""
    was_training = model.training
    model.eval()
    try:
        return predict_logits(model, image, modality, cfg, device).argmax(0).numpy().astype(np.uint8)
    finally:
        model.train(was_training)
