"""A run's data: find the cases, preprocess them into the cache, split them, and sample training batches.

Shared by ``aqcf-train`` (which draws the split, or the cross-validation fold, and writes it to the
run folder as ``split_{modality}.json``), and ``aqcf-evaluate`` / ``aqcf-explain`` (which reuse that saved split,
never re-drawing it, so that the test cases stay held out: :func:`check_splits` first).
The readers, cache and samplers themselves live in :mod:`aqcf_kernels.data`; this module applies a
:class:`RunConfig` to them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import RunConfig

if TYPE_CHECKING:
    from ..data import CachedCase, Case, InfiniteLoader, JointLoader, PreprocessConfig

__all__ = [
    "SPLITS",
    "SPLIT_FILE",
    "SingleStream",
    "check_declared_modality",
    "check_splits",
    "make_loader",
    "prepare_data",
    "preprocess_config",
]

#: The split's file in the run folder, per modality.
SPLIT_FILE = "split_{modality}.json"
#: The parts of a split.
SPLITS = ("test", "val", "train")


def preprocess_config(cfg: RunConfig) -> PreprocessConfig:
    """The preprocessing (CT window, target spacing) the run's config asks for."""
    from ..data import PreprocessConfig

    return PreprocessConfig(ct_window=tuple(cfg.data.hu_window), target_spacing=cfg.data.target_spacing)


def prepare_data(
    cfg: RunConfig, run_dir: Path, *, progress: bool | None = None
) -> dict[str, dict[str, list[CachedCase]]]:
    """Per modality: the cached cases of each split (train/val/test), the split written to ``run_dir``.

    With ``data.fold`` set the split is that cross-validation fold (:func:`~aqcf_kernels.data.split.make_fold_split`:
    the same held-out test set for every fold of a seed); otherwise the seeded train/val/test split.

    ``progress``: tqdm bars while preprocessing (``None``, the default: only when stderr is a terminal,
    tqdm's convention and that of every other bar of the pipeline; ``False``: never).
    """
    from tqdm.auto import tqdm

    from ..data import find_cases, load_or_create_split, preprocess_case
    from ..data.outputs import make_folder

    cfg.check_data_roots()
    d = cfg.data
    fractions = (1.0 - d.val_fraction - d.test_fraction, d.val_fraction, d.test_fraction)
    out: dict[str, dict[str, list]] = {}
    for modality in cfg.modalities:
        root, layout = getattr(d, f"{modality}_root"), getattr(d, f"{modality}_layout") or "auto"
        cases = find_cases(root, layout)
        check_declared_modality(cases, modality, root)
        # the key decides (LiTS and ATLAS declare nothing; a dataset.json that disagrees was refused above)
        cases = [dataclasses.replace(c, modality=modality) for c in cases]
        # the cache folder now, named by its key: preprocessing's mkdir met a file or /proc as a traceback
        make_folder(Path(d.cache_dir) / modality, f"data.cache_dir={d.cache_dir}")
        disable = None if progress is None else not progress
        # The bar closes also on a DataError, so the error line that follows starts on a line of its own.
        with tqdm(cases, desc=f"preprocess {modality}", unit="case", disable=disable) as bar:
            cached = [preprocess_case(c, Path(d.cache_dir) / modality, preprocess_config(cfg)) for c in bar]
        split = load_or_create_split(
            run_dir / SPLIT_FILE.format(modality=modality),
            [c.case_id for c in cached],
            fractions,
            d.split_seed,
            fold=d.fold,
            folds=d.folds,
        )
        by_id = {c.case_id: c for c in cached}
        out[modality] = {part: [by_id[i] for i in ids] for part, ids in split.items()}
        if not out[modality]["train"]:
            raise ValueError(f"{modality}: the split leaves no training case ({len(cached)} cases under {root})")
    return out


def check_declared_modality(cases: Sequence[Case], modality: str, root: str | Path) -> None:
    """Refuse a dataset whose ``dataset.json`` declares the other modality than the key it was given as
    (``data.ct_root`` / ``data.mri_root``): a ValueError naming the key, the file and the declared channel.

    MRI cases given as ``data.ct_root`` were normalised as MRI and fed to the CT stream without a word.
    LiTS and ATLAS layouts declare no modality; the key decides for them.
    """
    from ..data.readers import declared_channels, modality_from_name

    if not any(c.layout in ("msd", "nnunet") and c.modality != modality for c in cases):
        return
    names = {"ct": "CT", "mri": "MRI"}
    other = "mri" if modality == "ct" else "ct"
    wrong = [(j, n) for j, n in declared_channels(root) if modality_from_name(n) != modality]
    where = f"{wrong[0][0]} declares the modality {wrong[0][1]!r}" if wrong else "its dataset.json declares it"
    raise ValueError(
        f"data.{modality}_root={root}: {where} ({names[other]} data, not {names[modality]}); give it as "
        f"data.{other}_root (with train.mode {other} or joint), or point data.{modality}_root at {names[modality]} data"
    )


def check_splits(run_dir: Path, modalities: Sequence[str]) -> None:
    """Raise :class:`FileNotFoundError` unless ``run_dir`` holds the saved split of every modality.

    Call before :func:`prepare_data` on a finished run: that would otherwise draw a new split.
    """
    for modality in modalities:
        path = run_dir / SPLIT_FILE.format(modality=modality)
        if not path.is_file():
            raise FileNotFoundError(
                f"split file {path} does not exist: evaluate the folder aqcf-train wrote (its split is reused, "
                "never re-drawn, so that the test cases stay held out)"
            )


def make_loader(
    cfg: RunConfig, train_cases: dict[str, list[CachedCase]], rank: int, world_size: int
) -> JointLoader | SingleStream:
    """The unpaired training stream: ``next(loader) -> {modality: {"image", "label", "case"}}``."""
    from ..data import InfiniteLoader, JointLoader, PatchDataset, SliceDataset, flip_intensity_augment

    d, t = cfg.data, cfg.train
    transform = flip_intensity_augment() if t.augment else None

    def dataset(modality: str, seed: int):
        cases = train_cases[modality]
        common = {"tumour_prob": d.tumour_prob, "seed": seed, "transform": transform}
        if cfg.model.spatial_dims == 3:
            return PatchDataset(cases, d.patch_size, **common)
        return SliceDataset(cases, d.slice_size, **common)

    kw = {"num_workers": d.num_workers, "rank": rank, "world_size": world_size}
    if len(cfg.modalities) == 2:
        return JointLoader(dataset("ct", t.seed), dataset("mri", t.seed + 1), t.batch_size, **kw)
    (modality,) = cfg.modalities
    return SingleStream(modality, InfiniteLoader(dataset(modality, t.seed), t.batch_size, **kw))


class SingleStream:
    """One modality's loader with the joint loader's interface (a dict per step, state_dict)."""

    def __init__(self, modality: str, loader: InfiniteLoader) -> None:
        self.modality, self.loader = modality, loader

    def __next__(self) -> dict[str, Any]:
        return {self.modality: next(self.loader)}

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)
