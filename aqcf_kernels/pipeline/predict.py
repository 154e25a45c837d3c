"""``aqcf-predict``: liver and tumour masks for new scans (NIfTI files or DICOM series) from trained runs.

    aqcf-predict -i scans/ -o masks/ --run runs/ct
    aqcf-predict -i case.nii.gz dicom/patient7/ -o masks/ --run runs/joint --modality ct --tta
    aqcf-predict -i scans/ -o masks/ --run runs/ct --folds runs/ct-seed1 runs/ct-seed2 --save-probabilities

Inputs (``-i``, any number of files and folders):

* NIfTI volumes (``.nii`` / ``.nii.gz``); the case id is the file name without its extension and
  without nnU-Net's ``_0000`` channel suffix;
* DICOM series: a folder of single-frame slices (``*.dcm``, ``*.ima``, or extensionless files with the
  DICOM magic), read with pydicom; geometry from ImagePositionPatient / ImageOrientationPatient /
  PixelSpacing, slices sorted along the normal, RescaleSlope/Intercept applied (CT in HU). One series
  per folder (a folder mixing series is an error listing them). The case id is the folder's name.

Folders are searched recursively; a case found below a folder given to ``-i`` is named by its path
relative to that folder (``sub/case`` -> ``sub_case``). Label maps of the known dataset layouts
(``labelsTr``/``labelsTs`` folders, LiTS ``segmentation-N.nii``) are skipped.

Each case is preprocessed exactly as the run's training data were (the same
:func:`~aqcf_kernels.data.preprocess_case`: body crop, reorientation to RAS, CT window or MRI z-score,
the run's resampling), predicted with MONAI's sliding window (:mod:`aqcf_kernels.pipeline.inference`;
``--tta`` adds nnU-Net's mirroring), and mapped back onto the input's own voxel grid. Written to ``-o``:

* ``{case}.nii.gz``: uint8 labels 0 background, 1 liver, 2 tumour (LiTS's), on the input's grid with
  its affine (a NIfTI input's header is kept; a DICOM series gets the RAS affine of its headers, the
  array indexed column, row, slice as dcm2niix writes it);
* ``{case}.npz`` with ``--save-probabilities``: ``probabilities`` float32 ``(3, *input shape)``
  (background, liver, tumour, summing to 1; before post-processing), ``affine`` and ``classes``;
* ``summary.csv``: per case the liver volume in mL (labels 1 and 2), tumour volume in mL, tumour count
  (connected components, 26-connectivity), voxel spacing, shape and seconds;
* ``predict.json``: the command, checkpoints, modality per case and options, for provenance.

Several models are averaged (softmax probabilities) when ``--folds`` names more run folders, fold
names (``--folds 0 1 2``: ``RUN/fold_0`` or ``RUN/fold0`` ...), or when ``--run`` holds no checkpoint
itself but ``fold*`` subfolders that do (nnU-Net's layout and default: its numbered folds, ``fold_all`` only
when named or alone). The members must share the preprocessing (CT window, spacing).

``--checkpoint FILE.pt2`` predicts with a program written by ``aqcf-export`` (one modality, no model code
needed; its run config travels inside it).

The modality of a case is ``--modality``, else the DICOM Modality tag (CT or MR), else the run's only
modality (a joint run needs ``--modality`` for NIfTI inputs). Errors (missing input, nothing readable,
a run folder without checkpoints, a modality the run was not trained for, a DICOM folder mixing
series, bad data, an output path that is a file) print one line and exit with status 2; Ctrl-C prints
one line saying how many cases were written and exits with status 130. A case that fails (bad data)
stops the command as Ctrl-C does: the cases finished before it keep their masks and ``summary.csv``,
and the error line says how many and where (``predict.json`` is written only by a complete run).
The output folder is created once the inputs and models are read, and removed again if the command
created it and wrote nothing. nnU-Net's channel files other than ``_0000`` (``case_0001`` beside
``case_0000``) are refused, as by the training reader: one channel is read.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..data.outputs import check_output_dir, output_dir
from .allocator import add_malloc_argument, apply_malloc_choice
from .device import DEVICE_CHOICES_HELP, DeviceError, resolve_device
from .evaluate import note
from .runs import PREDICTABLE, checkpoints_in, ensemble_folds

__all__ = [
    "CLASSES",
    "InputVolume",
    "Member",
    "PredictError",
    "PredictInterrupted",
    "build_parser",
    "find_inputs",
    "keep_largest_liver",
    "load_members",
    "main",
    "mask_statistics",
    "predict",
]

#: Output label values, in the probabilities' class order.
CLASSES = ("background", "liver", "tumour")
POSTPROCESS = ("largest-component",)
CHECKPOINT_NAMES = ("best", "last")
SUMMARY_FIELDS = (
    "case",
    "modality",
    "liver_ml",
    "tumour_ml",
    "tumour_count",
    "spacing_mm",
    "shape",
    "seconds",
    "mask",
    "input",
)

_NII_SUFFIXES = (".nii.gz", ".nii")
# Skipped when searching folders: label maps of the dataset layouts the readers know.
_LABEL_FOLDERS = ("labelsTr", "labelsTs")
_LITS_SEGMENTATION = re.compile(r"^segmentation-\d+$")


class PredictError(ValueError):
    """A user-facing problem with the command's inputs, runs or options (printed as one line)."""


class PredictInterrupted(KeyboardInterrupt):
    """Ctrl-C while predicting; ``str()`` says how many cases were written (their masks and summary.csv stay)."""

    def __init__(self, done: int, total: int, out: Path) -> None:
        self.done, self.total, self.out = done, total, out
        if done:
            text = f"interrupted after {done} of {total} case(s): their masks and summary.csv are in {out}"
        else:
            text = "interrupted before the first case was written: nothing written"
        super().__init__(text)


# ------------------------------------------------------------------------------------------ inputs


@dataclass
class InputVolume:
    """One case to predict: a NIfTI file or a DICOM series folder (``series`` holds its headers)."""

    case_id: str
    path: Path
    kind: str  # "nifti" | "dicom"
    series: Any = None  # readers.DicomSeries for DICOM inputs

    @property
    def modality_hint(self) -> str | None:
        """'ct' / 'mri' from a DICOM series' Modality tag; ``None`` for NIfTI (no such header)."""
        return self.series.pipeline_modality if self.series is not None else None


def _nifti_stem(name: str) -> str | None:
    lower = name.lower()
    for suffix in _NII_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return None


def _case_id(stem: str) -> str:
    # nnU-Net's imagesTs files are case_0000.nii.gz (channel 0): its users expect case.nii.gz back.
    return stem[:-5] if stem.endswith("_0000") and len(stem) > 5 else stem


_CHANNEL = re.compile(r"^(.+)_(\d{4})$")


def _check_one_channel(path: Path) -> None:
    """Refuse nnU-Net's channel 1, 2 ... of a case (``case_0001.nii.gz`` next to ``case_0000.nii.gz``), as the
    training reader does: they were predicted as cases of their own."""
    from ..data import DataError

    stem = _nifti_stem(path.name) or ""
    m = _CHANNEL.match(stem)
    if m and m.group(2) != "0000" and path.with_name(f"{m.group(1)}_0000{path.name[len(stem) :]}").is_file():
        raise DataError(f"{path}: channel {m.group(2)} found; this pipeline reads one channel")


def _scan_folder(root: Path) -> list[tuple[str, Path, str]]:
    """(relative id, path, kind) of every NIfTI file and DICOM series folder under ``root``."""
    from ..data.readers import _walk, is_dicom_file

    found = []
    for folder, files in _walk(root):
        if folder.name in _LABEL_FOLDERS and folder != root:
            continue  # a dataset's label maps are not scans (pointing -i at a training set's root works)
        rel = folder.relative_to(root)
        prefix = "_".join(rel.parts)
        if any(is_dicom_file(folder / f) for f in files):
            found.append((prefix or folder.resolve().name, folder, "dicom"))
        for f in files:
            stem = _nifti_stem(f)
            if stem is not None and not _LITS_SEGMENTATION.match(stem) and (folder / f).is_file():
                found.append(("_".join((*rel.parts, _case_id(stem))), folder / f, "nifti"))
    return found


def find_inputs(paths: Sequence[str | os.PathLike]) -> list[InputVolume]:
    """The cases named by ``-i``: NIfTI files and DICOM series folders, headers checked, in the given order.

    Raises:
        PredictError: a path that does not exist, a file that is neither NIfTI nor DICOM, nothing
            found, or two inputs with the same case id.
        DataError: an unreadable NIfTI header, a DICOM folder that is not one series, or an nnU-Net channel
            file other than ``_0000`` (``case_0001`` beside ``case_0000``: one channel is read, as in training).
    """
    from ..data import load_nifti
    from ..data.readers import is_dicom_file, scan_dicom_series

    if not paths:
        raise PredictError("no input given (-i FILE_OR_FOLDER ...)")
    found: list[tuple[str, Path, str]] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.exists():
            raise PredictError(f"input {path} does not exist")
        if path.is_dir():
            inside = _scan_folder(path)
            if not inside:
                raise PredictError(
                    f"{path}: no readable volumes (NIfTI .nii/.nii.gz files or DICOM series folders of .dcm slices)"
                )
            found += inside
        elif _nifti_stem(path.name) is not None:
            found.append((_case_id(_nifti_stem(path.name) or path.name), path, "nifti"))
        elif is_dicom_file(path):
            found.append((path.parent.resolve().name, path.parent, "dicom"))  # a slice names its series
        else:
            raise PredictError(f"{path}: not a NIfTI volume (.nii/.nii.gz) or a DICOM file")
    volumes: list[InputVolume] = []
    seen: dict[str, Path] = {}
    for case_id, path, kind in found:
        if case_id in seen:
            if seen[case_id].resolve() == path.resolve():
                continue  # the same series given twice (two of its slices, or a folder and a slice)
            raise PredictError(f"{path}: case id {case_id!r} is also that of {seen[case_id]}; rename one of them")
        seen[case_id] = path
        if kind == "nifti":
            _check_one_channel(path)
            load_nifti(path)  # header only: a broken file is reported before anything is predicted
            volumes.append(InputVolume(case_id, path, kind))
        else:
            volumes.append(InputVolume(case_id, path, kind, scan_dicom_series(path)))
    return volumes


# ------------------------------------------------------------------------------------------ models


@dataclass
class Member:
    """One model of the ensemble: where it came from, the network (eval mode) and its run config."""

    run_dir: Path
    checkpoint: Path
    model: Any
    cfg: Any

    @property
    def modalities(self) -> tuple[str, ...]:
        exported = getattr(self.model, "exported_modality", None)  # an aqcf-export program: one stream
        return (exported,) if exported else tuple(self.cfg.modalities)


def _checkpoints_in(folder: Path) -> list[Path]:
    return checkpoints_in(folder, PREDICTABLE)  # .pt2: programs written by aqcf-export


def _fold_dirs(folder: Path) -> list[Path]:
    """The runs of a cross-validation's folder that an ensemble takes unasked (``--folds all`` names fold_all)."""
    return ensemble_folds(folder, PREDICTABLE)


def _member_dirs(run: Path, folds: Sequence[str]) -> list[Path]:
    """The run folders to load: ``run`` (or its ``fold_*`` subfolders) and the ``--folds`` items."""
    if not run.is_dir():
        raise PredictError(f"run folder {run} does not exist (expected the --out folder of aqcf-train)")
    dirs: list[Path] = []
    if _checkpoints_in(run):
        dirs.append(run)
    elif not folds:
        dirs += _fold_dirs(run)
    for item in folds:
        path = Path(item).expanduser()
        if not path.is_dir():
            path = next((run / f"fold{sep}{item}" for sep in ("_", "") if (run / f"fold{sep}{item}").is_dir()), path)
        if not path.is_dir():
            raise PredictError(f"--folds {item}: neither a run folder nor {run / f'fold_{item}'}")
        if _checkpoints_in(path):
            dirs.append(path)
        elif _fold_dirs(path):
            dirs += _fold_dirs(path)
        else:
            raise PredictError(f"run folder {path} holds no checkpoints (*.pt); is it the --out folder of aqcf-train?")
    if not dirs:
        raise PredictError(
            f"run folder {run} holds no checkpoints (best.pt/last.pt, or fold_*/ with them); "
            "is it the --out folder of aqcf-train, and has training saved one yet?"
        )
    unique: dict[Path, Path] = {}
    for d in dirs:
        unique.setdefault(d.resolve(), d)
    return list(unique.values())


def _checkpoint_path(run_dir: Path, checkpoint: str, command: str = "aqcf-predict") -> Path:
    if checkpoint in CHECKPOINT_NAMES:
        path = run_dir / f"{checkpoint}.pt"
        if not path.is_file():
            others = ", ".join(p.name for p in _checkpoints_in(run_dir))
            if others:
                raise PredictError(
                    f"run folder {run_dir} has no {path.name} (it has {others}); choose with --checkpoint"
                )
            # no checkpoint at all: "(it has )" said nothing; a cross-validation's parent folder says how
            from .inference import missing_checkpoint_hint

            raise PredictError(f"run folder {run_dir} has no {path.name}; {missing_checkpoint_hint(run_dir, command)}")
        return path
    path = Path(checkpoint).expanduser()
    if not path.is_absolute() and (run_dir / path).is_file():
        path = run_dir / path  # a file name inside each run folder (works for ensembles)
    elif not path.is_file():
        raise PredictError(f"checkpoint {path} does not exist (--checkpoint best, last or a file)")
    if path.suffix.lower() == ".onnx":
        raise PredictError(
            f"--checkpoint {path}: an ONNX file cannot be used here (it is for ONNX Runtime); give the run's "
            f".pt checkpoint or the .pt2 program aqcf-export wrote next to it"
        )
    return path


def load_members(
    run: str | os.PathLike,
    folds: Sequence[str] = (),
    checkpoint: str = "best",
    device: Any = "cpu",
    prepare_model: Callable[[Any], Any] | None = None,
) -> list[Member]:
    """Load every model of the ensemble (``run`` and ``folds``, see the module docstring) onto ``device``.

    ``prepare_model(model) -> model`` is applied to each network after loading (e.g. the benchmark's
    expanded-conv baseline build). Raises :class:`PredictError` for missing runs or checkpoints, and
    when the members preprocess differently (an ensemble averages on one preprocessed grid).
    """
    from .checkpoint import CheckpointMismatchError, load_for_inference
    from .data import preprocess_config

    dirs = _member_dirs(Path(run).expanduser(), folds)
    if checkpoint not in CHECKPOINT_NAMES and len(dirs) > 1:
        for d in dirs:
            if Path(checkpoint).is_absolute() or not (d / checkpoint).is_file():
                raise PredictError(
                    f"--checkpoint {checkpoint}: with {len(dirs)} runs ensembled it must be a file name inside "
                    f"each run folder ({d} has none)"
                )
    members = []
    for d in dirs:
        path = _checkpoint_path(d, checkpoint)
        try:
            if path.suffix == ".pt2":
                from .export import ExportError, load_exported

                try:
                    model, cfg = load_exported(path, device)
                except ExportError as e:
                    raise PredictError(str(e)) from None
            else:
                model, cfg = load_for_inference(path, device)
        except CheckpointMismatchError as e:  # state dict and config disagree: a damaged or hand-edited checkpoint
            raise PredictError(str(e)) from e
        if prepare_model is not None:
            model = prepare_model(model)
        members.append(Member(d, path, model.eval(), cfg))
    first = preprocess_config(members[0].cfg)
    for m in members[1:]:
        if preprocess_config(m.cfg) != first:
            raise PredictError(
                f"runs {members[0].run_dir} and {m.run_dir} preprocess differently (CT window "
                f"{first.ct_window} vs {preprocess_config(m.cfg).ct_window}, spacing {first.target_spacing} vs "
                f"{preprocess_config(m.cfg).target_spacing}); an ensemble needs one preprocessing"
            )
    return members


def _run_modalities(members: Sequence[Member]) -> tuple[str, ...]:
    common = [m for m in ("ct", "mri") if all(m in member.modalities for member in members)]
    if not common:
        listed = ", ".join(f"{m.run_dir} ({'/'.join(m.modalities)})" for m in members)
        raise PredictError(f"the runs share no modality ({listed}); ensemble runs of the same modality")
    return tuple(common)


def _describe_runs(members: Sequence[Member]) -> str:
    exported = next((m for m in members if getattr(m.model, "exported_modality", None)), None)
    if exported is not None:
        # A program holds one stream whatever its run was trained for: the file is what limits it, not the run.
        return f"{exported.checkpoint} (an aqcf-export file of a train.mode={exported.cfg.train.mode} run, one stream)"
    modes = sorted({m.cfg.train.mode for m in members})
    return f"{members[0].run_dir if len(members) == 1 else f'{len(members)} runs'} (train.mode={'/'.join(modes)})"


def _not_available(members: Sequence[Member], available: Sequence[str], wanted: str) -> str:
    """What the members can predict instead of ``wanted``, and for an exported file where ``wanted`` is."""
    if any(getattr(m.model, "exported_modality", None) for m in members):
        return (
            f"{_describe_runs(members)} holds the {'/'.join(available)} stream only; export the {wanted} one "
            f"(aqcf-export RUN_DIR --modality {wanted}) or give the run's .pt checkpoint"
        )
    return f"{_describe_runs(members)} was trained for {'/'.join(available)} only"


def _case_modalities(volumes: Sequence[InputVolume], members: Sequence[Member], requested: str | None) -> list[str]:
    available = _run_modalities(members)
    if requested is not None:
        if requested not in ("ct", "mri"):
            raise PredictError(f"--modality {requested!r}: expected ct or mri")
        if requested not in available:
            raise PredictError(f"--modality {requested}: {_not_available(members, available, requested)}")
        return [requested] * len(volumes)
    out = []
    for v in volumes:
        hint = v.modality_hint
        if hint is not None:
            if hint not in available:
                raise PredictError(
                    f"{v.path}: a {v.series.modality} series, but {_describe_runs(members)} predicts "
                    f"{'/'.join(available)} only (--modality overrides the DICOM tag)"
                )
            out.append(hint)
        elif len(available) == 1:
            out.append(available[0])
        else:
            raise PredictError(
                f"{_describe_runs(members)} predicts both ct and mri: pass --modality ct or --modality mri "
                f"(the modality of {v.path} is not in its header)"
            )
    return out


# ---------------------------------------------------------------------------------------- masks


def _structure():
    from scipy import ndimage

    return ndimage.generate_binary_structure(3, 3)  # 26-connectivity: touching diagonally is touching


def keep_largest_liver(labels: np.ndarray) -> np.ndarray:
    """Keep the largest connected component of the whole liver (labels 1 ∪ 2), tumour only inside it.

    Everything outside that component (other liver islands, tumour elsewhere) becomes background.
    Returns a new array; an empty prediction is returned unchanged.
    """
    from scipy import ndimage

    components, n = ndimage.label(labels > 0, structure=_structure())
    if n <= 1:
        return labels.copy()
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return np.where(components == int(np.argmax(sizes)), labels, 0).astype(labels.dtype)


def mask_statistics(labels: np.ndarray, affine: np.ndarray) -> dict[str, Any]:
    """Liver volume (labels 1 ∪ 2) and tumour volume in mL, and the number of tumours (26-connected)."""
    from scipy import ndimage

    voxel_ml = abs(float(np.linalg.det(np.asarray(affine)[:3, :3]))) / 1000.0
    tumour = labels == 2
    _, count = ndimage.label(tumour, structure=_structure())
    return {
        "liver_ml": float(np.count_nonzero(labels)) * voxel_ml,
        "tumour_ml": float(np.count_nonzero(tumour)) * voxel_ml,
        "tumour_count": int(count),
    }


def _save_nifti(data: np.ndarray, affine: np.ndarray, header: Any, path: Path) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(data, affine, header=header)
    if header is None:
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
        img.header.set_xyzt_units("mm", "sec")
    img.set_data_dtype(data.dtype)
    img.header.set_slope_inter(1, 0)
    nib.save(img, path)


def _probabilities_on_input_grid(probs: Any, cached: Any) -> np.ndarray:
    from ..data import restore_to_original

    fg = [restore_to_original(probs[c].numpy(), cached, order=1) for c in (1, 2)]
    background = np.clip(1.0 - fg[0] - fg[1], 0.0, 1.0)  # outside the body crop: background, probability 1
    return np.stack([background, *fg]).astype(np.float32)


# ----------------------------------------------------------------------------------------- predict


@dataclass
class _Context:
    members: list[Member]
    device: Any
    tta: bool
    save_probabilities: bool
    postprocess: str | None
    progress: bool | None
    workdir: Path
    out: Path
    rows: list[dict[str, Any]] = field(default_factory=list)


def _spacing_text(affine: np.ndarray) -> str:
    spacing = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    return "x".join(f"{s:.4g}" for s in spacing)


def _not_like_ct(image: np.ndarray, low_value: float, low_hu: float) -> str | None:
    """Why a volume preprocessed as CT looks unlike one, or None: no voxel reaches the CT window's low end
    (``low_hu``, which preprocessing maps to ``low_value``), while a CT scan in Hounsfield units has air around
    the body at about -1000 HU. An MRI volume (intensities from 0) given to a CT run is so, and is predicted as
    CT without a word otherwise; so is a CT stored without its rescale intercept."""
    if image.size == 0 or float(image.min()) <= low_value + 1e-6:
        return None
    return (
        f"predicted as CT, but no voxel is at or below {low_hu:g} HU (the CT window's low end; air is about "
        "-1000 HU): is this a CT scan in Hounsfield units? An MRI volume needs --modality mri and a run trained on MRI"
    )


def _predict_case(ctx: _Context, volume: InputVolume, modality: str) -> dict[str, Any]:
    import torch
    from tqdm.auto import tqdm

    from ..data import Case, DataError, load_nifti, preprocess_case, restore_to_original
    from ..data.readers import read_dicom_series
    from .data import preprocess_config
    from .inference import count_windows, predict_probabilities

    started = time.perf_counter()
    case_dir = Path(tempfile.mkdtemp(prefix="case-", dir=ctx.workdir))
    try:
        if volume.kind == "dicom":
            import nibabel as nib

            image_path = case_dir / f"{volume.case_id}.nii"
            dicom = read_dicom_series(volume.series)
            nib.save(dicom.to_nifti(), image_path)
            affine, header, shape = dicom.affine, None, dicom.data.shape
            del dicom
        else:
            image_path = volume.path
            img = load_nifti(volume.path)
            affine, header, shape = img.affine, img.header.copy(), img.shape[:3]
        case = Case(volume.case_id, image_path, None, modality, "predict")  # type: ignore[arg-type]
        try:
            cached = preprocess_case(case, case_dir / "cache", preprocess_config(ctx.members[0].cfg))
        except DataError as e:  # name the user's input, not the temporary NIfTI a DICOM series became
            raise DataError(str(e).replace(str(image_path), str(volume.path))) from None
        image = np.asarray(cached.image)
        # (the window this case was preprocessed with, whose low end its pad value is)
        window = cached.meta["normalisation"].get("window") if modality == "ct" else None
        caution = _not_like_ct(image, cached.pad_value, window[0]) if window else None
        if caution:
            note(f"{volume.path}: {caution}")
        total = sum(count_windows(image.shape, m.cfg, tta=ctx.tta) for m in ctx.members)
        disable = None if ctx.progress is None else not ctx.progress  # None: a bar only on a terminal
        bar = tqdm(total=total, desc=volume.case_id, unit="win", disable=disable)
        try:
            probs = None
            for member in ctx.members:
                p = predict_probabilities(
                    member.model,
                    image,
                    modality,
                    member.cfg,
                    ctx.device,
                    tta=ctx.tta,
                    pad_value=cached.pad_value,
                    on_windows=bar.update,
                )
                probs = p if probs is None else probs.add_(p)
        finally:
            bar.close()
        assert probs is not None
        if len(ctx.members) > 1:
            probs /= len(ctx.members)
        labels = restore_to_original(probs.argmax(0).numpy().astype(np.uint8), cached, order=0)
        if ctx.postprocess == "largest-component":
            labels = keep_largest_liver(labels)
        mask_path = ctx.out / f"{volume.case_id}.nii.gz"
        _save_nifti(labels, affine, header, mask_path)
        if ctx.save_probabilities:
            grid = _probabilities_on_input_grid(probs, cached)
            np.savez_compressed(
                ctx.out / f"{volume.case_id}.npz",
                probabilities=grid,
                affine=np.asarray(affine),
                classes=np.array(CLASSES),
            )
            del grid
        del probs, image, cached
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return {
            "case": volume.case_id,
            "modality": modality,
            **({"note": caution} if caution else {}),
            **mask_statistics(labels, affine),
            "spacing_mm": _spacing_text(affine),
            "shape": "x".join(str(n) for n in shape),
            "seconds": round(time.perf_counter() - started, 3),
            "mask": mask_path.name,
            "input": str(volume.path),
        }
    finally:
        shutil.rmtree(case_dir, ignore_errors=True)


def _write_summary(out: Path, rows: Sequence[dict[str, Any]]) -> Path:
    path = out / "summary.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=SUMMARY_FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {k: (f"{row[k]:.3f}" if k in ("liver_ml", "tumour_ml") else row[k]) for k in SUMMARY_FIELDS}
            )
    return path


def predict(
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    run: str | os.PathLike,
    *,
    modality: str | None = None,
    checkpoint: str = "best",
    folds: Sequence[str] = (),
    tta: bool = False,
    save_probabilities: bool = False,
    postprocess: str | None = None,
    device: str = "auto",
    progress: bool | None = None,
    prepare_model: Callable[[Any], Any] | None = None,
    command: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Predict every input case and write masks, ``summary.csv`` and ``predict.json`` to ``out``.

    Args:
        inputs: NIfTI files, DICOM series folders, or folders searched recursively for both.
        out: output folder (created).
        run: an ``aqcf-train`` run folder (or one holding ``fold_*`` run folders).
        modality: ``"ct"`` / ``"mri"``; ``None`` takes it from DICOM headers or the run's only modality.
        checkpoint: ``"best"``, ``"last"`` or a checkpoint file (a bare name is looked up in each run).
        folds: more members of the ensemble: run folders, or fold names under ``run`` (``0`` -> ``run/fold_0``).
        tta: mirroring test-time augmentation.
        save_probabilities: also write ``{case}.npz`` with the class probabilities on the input grid.
        postprocess: ``None`` or ``"largest-component"`` (:func:`keep_largest_liver`).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        progress: a tqdm bar per case (``None``: only on a terminal; ``False``: never).
        prepare_model: applied to each loaded network (benchmarks: a baseline build of the same weights).
        command: the command line that asked for this (``aqcf-predict``'s), recorded in ``predict.json``
            shell-quoted, so it can be pasted back; ``None`` for a call from Python.

    Returns:
        The rows of ``summary.csv`` (volumes as floats).

    Raises:
        PredictError, :class:`~aqcf_kernels.data.DataError`, DeviceError,
        :class:`~aqcf_kernels.data.outputs.OutputError`: one-line user-facing errors. A case that fails
            stops the command; the cases written before it stay (masks and ``summary.csv``, as after
            Ctrl-C) and the error, then a PredictError, says how many and where; with none written, a
            folder this call created is removed.
        PredictInterrupted: Ctrl-C (a KeyboardInterrupt), saying how many cases were written.
    """
    import torch

    if postprocess is not None and postprocess not in POSTPROCESS:
        raise PredictError(f"--postprocess {postprocess!r}: expected one of {', '.join(POSTPROCESS)}")
    out = check_output_dir(out, "-o")  # a file in the way is named before the models load
    dev = resolve_device(device)
    volumes = find_inputs(inputs)
    members = load_members(run, folds, checkpoint, dev, prepare_model)
    modalities = _case_modalities(volumes, members, modality)
    # Created once the inputs and models are read; removed again if no case gets written (bad data, Ctrl-C).
    with output_dir(out, "-o"), tempfile.TemporaryDirectory(prefix="aqcf-predict-") as tmp:
        ctx = _Context(members, dev, tta, save_probabilities, postprocess, progress, Path(tmp), out)
        try:
            with torch.inference_mode():
                for volume, mod in zip(volumes, modalities, strict=True):
                    ctx.rows.append(_predict_case(ctx, volume, mod))
                    _write_summary(out, ctx.rows)  # after every case: an interrupted run keeps its table
        except KeyboardInterrupt:
            raise PredictInterrupted(len(ctx.rows), len(volumes), out) from None
        except (ValueError, OSError) as e:  # bad data in a later case: the finished ones stay, as after Ctrl-C
            if not ctx.rows:
                raise  # nothing written: output_dir removes the folder it created
            raise PredictError(
                f"{e}; {len(ctx.rows)} of {len(volumes)} case(s) were written before it: their masks and "
                f"summary.csv are in {out}"
            ) from e
        provenance = {
            "command": None if command is None else shlex.join(command),
            "members": [{"run_dir": str(m.run_dir), "checkpoint": str(m.checkpoint)} for m in members],
            "device": str(dev),
            "tta": tta,
            "postprocess": postprocess,
            "save_probabilities": save_probabilities,
            "cases": [{k: r[k] for k in ("case", "input", "modality", "note") if k in r} for r in ctx.rows],
        }
        (out / "predict.json").write_text(json.dumps(provenance, indent=1) + "\n")
    return ctx.rows


# ---------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    """The ``aqcf-predict`` command line."""
    p = argparse.ArgumentParser(
        prog="aqcf-predict",
        description="Liver (1) and tumour (2) masks for new scans, NIfTI or DICOM, from trained aqcf-train runs: "
        "written as NIfTI on each input's own grid and affine, with a per-case summary.csv (volumes in mL, "
        "tumour count).",
        epilog="Folders are searched recursively; a DICOM series is a folder of .dcm slices (one series per folder); "
        "nnU-Net's CASE_0000 files are read, a CASE_0001 beside one is refused (one channel). "
        "Errors print one line and exit with status 2 (Ctrl-C: 130). A case that fails stops the command; as "
        "after Ctrl-C, the cases written before it keep their masks and summary.csv and the line says how many "
        "and where; with none written, nothing is left.",
    )
    p.add_argument("-i", "--input", nargs="+", required=True, metavar="IN", help="NIfTI files, DICOM series folders, "
                   "or folders holding them")  # fmt: skip
    p.add_argument("-o", "--output", required=True, type=Path, metavar="OUT", help="output folder")
    p.add_argument(
        "--run",
        required=True,
        type=Path,
        metavar="RUN_DIR",
        help="the --out folder of aqcf-train, or a cross-validation's folder: its numbered fold_*/ are ensembled "
        "(fold_all only with --folds all, or when it is the only one)",
    )
    p.add_argument(
        "--modality",
        choices=("ct", "mri"),
        help="the inputs' modality (default: the DICOM Modality tag, else the run's only modality)",
    )
    p.add_argument(
        "--checkpoint",
        default="best",
        help="best (default), last, or a checkpoint file (a bare file name is looked up in each run folder); "
        "a .pt2 file written by aqcf-export predicts without the model's code",
    )
    p.add_argument(
        "--folds",
        nargs="+",
        default=[],
        metavar="RUN_DIR",
        help="more run folders to ensemble with --run (softmax probabilities averaged); a bare fold name k means "
        "RUN/fold_k",
    )
    p.add_argument("--tta", action="store_true", help="mirroring test-time augmentation (4 passes in 2D, 8 in 3D)")
    p.add_argument(
        "--save-probabilities",
        action="store_true",
        help="also write OUT/{case}.npz: float32 probabilities (background, liver, tumour) on the input grid",
    )
    p.add_argument(
        "--postprocess",
        choices=POSTPROCESS,
        help="largest-component: keep the largest connected liver component, tumour only inside it",
    )
    p.add_argument("--device", default="auto", help=DEVICE_CHOICES_HELP)
    add_malloc_argument(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars or final message")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``aqcf-predict``; returns the exit status (2 on a user-facing error, 130 on Ctrl-C)."""
    from ..data import DataError

    args = build_parser().parse_args(argv)
    apply_malloc_choice(args.malloc)
    try:
        rows = predict(
            args.input,
            args.output,
            args.run,
            modality=args.modality,
            checkpoint=args.checkpoint,
            folds=args.folds,
            tta=args.tta,
            save_probabilities=args.save_probabilities,
            postprocess=args.postprocess,
            device=args.device,
            progress=False if args.quiet else None,
            command=["aqcf-predict", *(sys.argv[1:] if argv is None else argv)],
        )
    except KeyboardInterrupt as e:  # while loading (nothing written yet) or predicting (PredictInterrupted)
        what = e if isinstance(e, PredictInterrupted) else "interrupted: nothing written"
        print(f"aqcf-predict: {what}", file=sys.stderr, flush=True)
        return 130
    except (PredictError, DataError, DeviceError, FileNotFoundError, ValueError) as e:
        print(f"aqcf-predict: error: {e}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(f"{len(rows)} case(s) predicted; masks and summary.csv in {args.output}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
