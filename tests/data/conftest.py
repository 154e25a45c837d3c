"""Fixtures for the data-pipeline tests: tiny synthetic datasets written by :mod:`aqcf_kernels.data.synth`.

Shapes are tiny (CT 40x40x16, MRI 32x32x10) so a case takes milliseconds to write and preprocess.
Datasets that a test modifies are written per test (``synth``); the preprocessed CT and MRI sets
used by the sampler tests are built once per session.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from aqcf_kernels.data import CachedCase, PreprocessConfig, find_cases, preprocess_cases
from aqcf_kernels.data.synth import write_dataset

CT_SHAPE = (40, 40, 16)
MRI_SHAPE = (32, 32, 10)
#: With seed 0 and this share, case 2 of 3 is drawn tumour-free (as ~10% of LiTS): see write_dataset.
NO_TUMOUR_FRAC = 0.34


def tiny_shape(layout: str, modality: str | None = None) -> tuple[int, int, int]:
    mod = modality or ("mri" if layout == "atlas" else "ct")
    return CT_SHAPE if mod == "ct" else MRI_SHAPE


@pytest.fixture
def synth(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``synth(layout, cases=3, **write_dataset_kwargs)`` writes under tmp_path; returns the output folder."""

    def make(layout: str, cases: int = 3, **kw) -> Path:
        out = tmp_path / f"{layout}-{len(list(tmp_path.iterdir()))}"
        kw.setdefault("shape", tiny_shape(layout, kw.get("modality")))
        write_dataset(out, layout, cases, progress=False, **kw)
        return out

    return make


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    """Write ``data`` as NIfTI (format from the suffix) with ``affine`` (identity by default)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path


@pytest.fixture(scope="session")
def ct_cases(tmp_path_factory) -> list[CachedCase]:
    """Three preprocessed LiTS-layout CT cases (case lits-2 has no tumour)."""
    base = tmp_path_factory.mktemp("ct")
    write_dataset(base / "raw", "lits", 3, shape=CT_SHAPE, no_tumour_frac=NO_TUMOUR_FRAC, progress=False)
    return preprocess_cases(find_cases(base / "raw"), base / "cache", PreprocessConfig(), progress=False)


@pytest.fixture(scope="session")
def mri_cases(tmp_path_factory) -> list[CachedCase]:
    """Three preprocessed ATLAS-layout MRI cases (all with tumour, as in ATLAS)."""
    base = tmp_path_factory.mktemp("mri")
    write_dataset(base / "raw", "atlas", 3, shape=MRI_SHAPE, seed=1, progress=False)
    return preprocess_cases(find_cases(base / "raw"), base / "cache", PreprocessConfig(), progress=False)
