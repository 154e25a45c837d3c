"""The reproduction pipeline on a GPU: a tiny joint A-QCF-Net run trained on CUDA with ``train.amp`` (bf16
autocast, the default there) and evaluated, as ``aqcf-train`` / ``aqcf-evaluate`` run it. On CPU the
pipeline tests (tests/pipeline) cover the rest; autocast itself is tests/gpu/test_autocast_cuda.py."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from aqcf_kernels.data.synth import write_dataset
from aqcf_kernels.pipeline.config import load_config
from aqcf_kernels.pipeline.evaluate import evaluate
from aqcf_kernels.pipeline.train import train

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
DEVICE = "cuda"


@pytest.mark.parametrize("amp", [True, False])
def test_tiny_joint_run_trains_and_evaluates_on_cuda(tmp_path: Path, amp: bool) -> None:
    ct = write_dataset(tmp_path / "ct", "lits", 5, shape=(48, 48, 12), progress=False)
    mri = write_dataset(tmp_path / "mri", "atlas", 5, shape=(40, 40, 8), progress=False)
    overrides = {
        "data.ct_root": ct,
        "data.mri_root": mri,
        "data.cache_dir": tmp_path / "cache",
        "data.slice_size": "[48, 48]",
        "data.val_fraction": 0.2,
        "data.test_fraction": 0.2,
        "model.features": "[16, 32]",
        "model.bottleneck": 32,
        "model.heads": 2,
        "train.epochs": 1,
        "train.steps_per_epoch": 3,
        "train.batch_size": 2,
        "train.warmup_steps": 1,
        "train.amp": str(amp).lower(),
        "train.device": DEVICE,
    }
    cfg = load_config(None, [f"{k}={v}" for k, v in overrides.items()])
    record = train(cfg, tmp_path / "run")
    assert record["epoch"] == 1 and math.isfinite(record["score"]), record
    assert (tmp_path / "run" / "last.pt").exists() and (tmp_path / "run" / "best.pt").exists()
    results = evaluate(tmp_path / "run", device=DEVICE, write_masks=False, progress=False, echo=False)
    assert results, "no evaluation results"
