"""Liver/tumour data pipeline: dataset readers, preprocessing cache, splits, samplers, phantoms.

Typical use (see the submodules for details)::

    from aqcf_kernels.data import find_cases, preprocess_cases, load_or_create_split, SliceDataset, JointLoader

    ct = preprocess_cases(find_cases("data/LiTS"), "cache/ct")          # list[CachedCase]
    split = load_or_create_split("runs/ct_split.json", [c.case_id for c in ct], seed=0)
    train_ct = [c for c in ct if c.case_id in set(split["train"])]
    ...
    loader = JointLoader(SliceDataset(train_ct, (256, 256)), SliceDataset(train_mri, (256, 256)), batch_size=8)
    batch = next(loader)   # {"ct": {"image", "label", "case"}, "mri": {...}}

Requires the ``train`` extra (nibabel, scipy, tqdm; MONAI for the training script).
"""

from .errors import DataError
from .preprocess import (
    CACHE_VERSION,
    CachedCase,
    PreprocessConfig,
    load_nifti,
    prepare,
    preprocess_case,
    preprocess_cases,
    restore_to_original,
    write_prediction,
)
from .readers import LAYOUTS, Case, detect_layouts, find_cases, modality_from_name
from .sampling import (
    InfiniteBatchSampler,
    InfiniteLoader,
    JointLoader,
    PatchDataset,
    SliceDataset,
    flip_intensity_augment,
)
from .split import load_or_create_split, make_split

__all__ = [
    "CACHE_VERSION",
    "LAYOUTS",
    "Case",
    "CachedCase",
    "DataError",
    "InfiniteBatchSampler",
    "InfiniteLoader",
    "JointLoader",
    "PatchDataset",
    "PreprocessConfig",
    "SliceDataset",
    "detect_layouts",
    "find_cases",
    "flip_intensity_augment",
    "load_nifti",
    "load_or_create_split",
    "make_split",
    "modality_from_name",
    "prepare",
    "preprocess_case",
    "preprocess_cases",
    "restore_to_original",
    "write_prediction",
]
