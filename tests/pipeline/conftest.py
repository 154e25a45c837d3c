"""Fixtures for the pipeline tests: tiny synthetic CT (LiTS layout) and MRI (ATLAS layout) sets, tiny runs.

Everything is tiny (CT 48x48x12, MRI 40x40x8, 5 cases each; U-Nets of widths 16/32 on 48x48 crops),
so one training run of 1 epoch x 2 steps, with validation, takes a second or two. The datasets and
their preprocessing cache are written once per session and shared; each trained run is cached per
session too (``trained``), so evaluation and explanation tests reuse it.

Torch runs single-threaded here: on a loaded 2-core machine, two OpenMP threads spin-wait on each
other and make the tiny convolutions ~40x slower.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from aqcf_kernels.data.synth import write_dataset
from aqcf_kernels.pipeline.config import RunConfig, load_config

CT_SHAPE = (48, 48, 12)
MRI_SHAPE = (40, 40, 8)
CASES = 5


@dataclass(frozen=True)
class Datasets:
    ct: Path  # LiTS layout
    mri: Path  # ATLAS layout
    cache: Path  # shared preprocessing cache

    def overrides(self, mode: str = "joint", **extra: object) -> list[str]:
        """``--set`` strings of a tiny run in ``mode`` on these sets; ``extra`` adds/overrides ``section.key``."""
        values: dict[str, object] = {
            "data.ct_root": str(self.ct),
            "data.mri_root": str(self.mri),
            "data.cache_dir": str(self.cache),
            "data.slice_size": "[48, 48]",
            "data.patch_size": "[8, 32, 32]",
            "data.val_fraction": 0.2,
            "data.test_fraction": 0.2,
            "model.features": "[16, 32]",
            "model.bottleneck": 32,
            "model.heads": 2,
            "train.mode": mode,
            "train.epochs": 1,
            "train.steps_per_epoch": 2,
            "train.batch_size": 2,
            "train.warmup_steps": 1,
        }
        values.update({k.replace("__", "."): v for k, v in extra.items()})
        return [f"{k}={v}" for k, v in values.items()]

    def config(self, mode: str = "joint", **extra: object) -> RunConfig:
        """The :class:`RunConfig` of :meth:`overrides` (keys as ``section__key`` keyword arguments)."""
        return load_config(None, self.overrides(mode, **extra))


@pytest.fixture(autouse=True)
def _single_threaded(single_threaded) -> None:
    """One intra-op thread for every test here (tests/conftest.py); subprocesses get OMP_NUM_THREADS=1."""


@pytest.fixture(scope="session")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> Datasets:
    """Five tiny CT cases in LiTS layout and five MRI cases in ATLAS layout, with a shared cache folder."""
    base = tmp_path_factory.mktemp("pipeline-data")
    ct = write_dataset(base / "ct", "lits", CASES, shape=CT_SHAPE, progress=False)
    mri = write_dataset(base / "mri", "atlas", CASES, shape=MRI_SHAPE, progress=False)
    return Datasets(ct=ct, mri=mri, cache=base / "cache")


@pytest.fixture(scope="session")
def trained(datasets: Datasets, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory: ``trained(mode, **extra)`` -> the folder of a tiny run (1 epoch x 2 steps), trained once per session."""
    from aqcf_kernels.pipeline.train import train

    runs: dict[tuple, Path] = {}

    def make(mode: str, **extra: object) -> Path:
        key = (mode, *sorted(extra.items()))
        if key not in runs:
            run_dir = tmp_path_factory.mktemp(f"run-{mode}")
            train(datasets.config(mode, **extra), run_dir)
            runs[key] = run_dir
        return runs[key]

    return make


def subprocess_env() -> dict[str, str]:
    """The environment for child processes: single-threaded, no progress bars on pipes."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
