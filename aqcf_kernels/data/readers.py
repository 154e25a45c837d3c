"""Find the cases of a liver dataset on disk, in the layouts the public releases use.

Supported layouts (the root is searched recursively, so it can be the folder holding the dataset or
any folder above it):

``lits``
    LiTS 2017 training set: ``volume-N.nii`` + ``segmentation-N.nii`` (N not zero-padded, also
    accepted gzipped), possibly spread over ``Training Batch 1`` / ``Training Batch 2``. CT.
``atlas``
    ATLAS (MICCAI 2023, liver tumour MRI): ``imagesTr/imN.nii.gz`` + sibling ``labelsTr/lbN.nii.gz``,
    paired by index. Contrast-enhanced T1 MRI.
``msd``
    Medical Segmentation Decathlon (e.g. ``Task03_Liver``): a ``dataset.json`` with ``modality`` and a
    ``training`` list of ``{"image", "label"}`` paths relative to the json. nnU-Net v1 raw datasets
    have the same json with images renamed ``<case>_0000.nii.gz``; both spellings are accepted.
``nnunet``
    nnU-Net v2 raw: a ``dataset.json`` with ``channel_names`` and ``file_ending``, images
    ``imagesTr/<case>_0000<ending>``, labels ``labelsTr/<case><ending>``. Single channel only.

For inference on new scans, a DICOM series (a folder of single-frame ``.dcm`` slices) is read with
pydicom by :func:`read_dicom_series`, its geometry taken from the headers (see the DICOM section).

All layouts use labels 0 background, 1 liver, 2 tumour (checked when the arrays are read, see
:mod:`aqcf_kernels.data.preprocess`). Dot-files, macOS ``._*`` AppleDouble junk (present in the MSD
archives) and ``__MACOSX`` folders are skipped.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .errors import DataError

__all__ = [
    "DICOM_SUFFIXES",
    "LAYOUTS",
    "Case",
    "DicomSeries",
    "DicomVolume",
    "declared_channels",
    "detect_layouts",
    "dicom_files",
    "find_cases",
    "is_dicom_file",
    "modality_from_name",
    "read_dicom_series",
    "scan_dicom_series",
]

Modality = Literal["ct", "mri"]

#: Layout name -> what the reader looks for; used in error messages so the user sees what was searched.
LAYOUTS: dict[str, str] = {
    "lits": "volume-N.nii + segmentation-N.nii (LiTS)",
    "atlas": "imagesTr/imN.nii.gz + labelsTr/lbN.nii.gz (ATLAS 2023)",
    "msd": "dataset.json with 'modality' and 'training' + imagesTr/labelsTr (Medical Segmentation Decathlon)",
    "nnunet": "dataset.json with 'channel_names' + imagesTr/<case>_0000 + labelsTr/<case> (nnU-Net v2 raw)",
}

_NII = r"\.nii(?:\.gz)?"
_LITS_VOLUME = re.compile(rf"^volume-(\d+){_NII}$")
_LITS_SEG = re.compile(rf"^segmentation-(\d+){_NII}$")
_ATLAS_IMAGE = re.compile(rf"^im(\d+){_NII}$")
_ATLAS_LABEL = re.compile(rf"^lb(\d+){_NII}$")


@dataclass(frozen=True)
class Case:
    """One patient scan: where its image and label live and how to normalise it.

    ``label`` is ``None`` only when the reader was asked not to require labels (inference on
    unlabelled images).
    """

    case_id: str
    image: Path
    label: Path | None
    modality: Modality
    layout: str


def modality_from_name(name: str) -> Modality:
    """Map a dataset.json modality / channel name to 'ct' or 'mri'.

    Follows nnU-Net: only "CT" gets the CT (HU window) normalisation; any other channel name (MRI,
    T1, T2, ADC, ...) is normalised per case like MRI.
    """
    return "ct" if name.strip().upper() == "CT" else "mri"


def _is_junk(name: str) -> bool:
    # '._foo' is macOS AppleDouble metadata; any dot-file is hidden state, never a case.
    return name.startswith(".")


def _walk(root: Path) -> Iterator[tuple[Path, list[str]]]:
    """(folder, visible file names) for every visible folder under root, in a stable order."""
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:  # a symlink loop: followlinks would recurse forever
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not _is_junk(d) and d != "__MACOSX")
        yield Path(dirpath), sorted(f for f in filenames if not _is_junk(f))


def _natural_key(case_id: str) -> tuple:
    # liver_2 before liver_10: split digits out and compare them as numbers.
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", case_id))


def _check_root(root: str | os.PathLike) -> Path:
    path = Path(root).expanduser()
    if not path.exists():
        raise DataError(f"{path}: dataset folder does not exist")
    if not path.is_dir():
        raise DataError(f"{path}: not a folder (give the folder holding the dataset)")
    return path


def _unique(index: dict, key, path: Path, what: str) -> None:
    if key in index:
        raise DataError(f"{path}: duplicate {what} (also at {index[key]}); keep one copy of the dataset under the root")
    index[key] = path


# --------------------------------------------------------------------------------------------- LiTS


def _find_lits(tree: list[tuple[Path, list[str]]], require_labels: bool) -> list[Case]:
    volumes: dict[int, Path] = {}
    segs: dict[int, Path] = {}
    for folder, files in tree:
        for f in files:
            if m := _LITS_VOLUME.match(f):
                _unique(volumes, int(m.group(1)), folder / f, f"LiTS volume {m.group(1)}")
            elif m := _LITS_SEG.match(f):
                _unique(segs, int(m.group(1)), folder / f, f"LiTS segmentation {m.group(1)}")
    for n, seg in segs.items():
        if n not in volumes:
            raise DataError(f"{seg}: segmentation without its image (no volume-{n}.nii anywhere under the root)")
    cases = []
    for n in sorted(volumes):
        label = segs.get(n)
        if label is None and require_labels:
            raise DataError(f"{volumes[n]}: no label file (expected segmentation-{n}.nii somewhere under the root)")
        cases.append(Case(f"lits-{n}", volumes[n], label, "ct", "lits"))
    return cases


# -------------------------------------------------------------------------------------------- ATLAS


def _find_atlas(tree: list[tuple[Path, list[str]]], require_labels: bool) -> list[Case]:
    images: dict[int, Path] = {}
    labels: dict[int, Path] = {}
    for folder, files in tree:
        if folder.name == "imagesTr":
            for f in files:
                if m := _ATLAS_IMAGE.match(f):
                    _unique(images, int(m.group(1)), folder / f, f"ATLAS image {m.group(1)}")
        elif folder.name == "labelsTr":
            for f in files:
                if m := _ATLAS_LABEL.match(f):
                    _unique(labels, int(m.group(1)), folder / f, f"ATLAS label {m.group(1)}")
    for n, lb in labels.items():
        if n not in images:
            raise DataError(f"{lb}: label without its image (expected ../imagesTr/im{n}.nii.gz)")
    cases = []
    for n in sorted(images):
        im = images[n]
        label = labels.get(n)
        if label is not None and label.parent.parent != im.parent.parent:
            raise DataError(f"{label}: pairs with {im} by index but lies in another dataset folder")
        if label is None and require_labels:
            raise DataError(f"{im}: no label file (expected {im.parent.parent / 'labelsTr' / f'lb{n}.nii.gz'})")
        cases.append(Case(f"atlas-{n}", im, label, "mri", "atlas"))
    return cases


# ---------------------------------------------------------------------------------- MSD and nnU-Net


def _read_json(path: Path) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read dataset.json ({type(e).__name__}: {e})") from e
    return data if isinstance(data, dict) else None


def _json_kind(data: dict | None) -> str | None:
    if not data:
        return None
    if "channel_names" in data:
        return "nnunet"
    if isinstance(data.get("training"), list) and "modality" in data:
        return "msd"
    return None


def _strip_nii(name: str) -> str:
    return re.sub(rf"{_NII}$", "", name)


def _resolve_msd(base: Path, rel: str) -> Path:
    """An MSD json path; falls back to nnU-Net v1's ``<case>_0000`` renaming of the image."""
    p = Path(os.path.normpath(base / rel))  # normpath, not resolve: keep the user's symlinked paths
    if p.exists():
        return p
    alt = p.with_name(_strip_nii(p.name) + "_0000" + p.name[len(_strip_nii(p.name)) :])
    return alt if alt.exists() else p


def _find_msd(jsons: list[tuple[Path, dict]], require_labels: bool) -> list[Case]:
    cases = []
    for jpath, data in jsons:
        modalities = data.get("modality") or {}
        if len(modalities) != 1:
            raise DataError(f"{jpath}: {len(modalities)} modalities declared; this pipeline reads one channel")
        modality = modality_from_name(str(next(iter(modalities.values()))))
        for i, entry in enumerate(data["training"]):
            if not isinstance(entry, dict) or "image" not in entry:
                raise DataError(f"{jpath}: training entry {i} is not an {{'image', 'label'}} object")
            image = _resolve_msd(jpath.parent, entry["image"])
            if not image.exists():
                raise DataError(f"{image}: listed in {jpath} but missing")
            label = Path(os.path.normpath(jpath.parent / entry["label"])) if entry.get("label") else None
            if label is None or not label.exists():
                if require_labels:
                    raise DataError(f"{image}: no label file (expected {label}, listed in {jpath})")
                label = None
            case_id = _strip_nii(Path(entry["image"]).name)
            cases.append(Case(case_id, image, label, modality, "msd"))
    return cases


def _find_nnunet(jsons: list[tuple[Path, dict]], require_labels: bool) -> list[Case]:
    cases = []
    for jpath, data in jsons:
        channels = data.get("channel_names") or {}
        if len(channels) != 1:
            raise DataError(f"{jpath}: {len(channels)} channels declared; this pipeline reads one channel")
        modality = modality_from_name(str(next(iter(channels.values()))))
        ending = data.get("file_ending", ".nii.gz")
        images_dir, labels_dir = jpath.parent / "imagesTr", jpath.parent / "labelsTr"
        if not images_dir.is_dir():
            raise DataError(f"{images_dir}: missing (nnU-Net dataset declared by {jpath})")
        pattern = re.compile(rf"^(.+)_(\d{{4}}){re.escape(ending)}$")
        for f in sorted(os.listdir(images_dir)):
            if _is_junk(f) or not (m := pattern.match(f)):
                continue
            if m.group(2) != "0000":
                raise DataError(f"{images_dir / f}: channel {m.group(2)} found; this pipeline reads one channel")
            label = labels_dir / f"{m.group(1)}{ending}"
            if not label.exists():
                if require_labels:
                    raise DataError(f"{images_dir / f}: no label file (expected {label})")
                label = None
            cases.append(Case(m.group(1), images_dir / f, label, modality, "nnunet"))
    return cases


# ----------------------------------------------------------------------------------------- public


def _scan(root: Path) -> tuple[list[tuple[Path, list[str]]], dict[str, list[tuple[Path, dict]]]]:
    tree = list(_walk(root))
    jsons: dict[str, list[tuple[Path, dict]]] = {"msd": [], "nnunet": []}
    for folder, files in tree:
        if "dataset.json" in files:
            data = _read_json(folder / "dataset.json")
            kind = _json_kind(data)
            if kind is not None:
                jsons[kind].append((folder / "dataset.json", data))  # type: ignore[arg-type]
    return tree, jsons


def _evidence(tree: list[tuple[Path, list[str]]], jsons: dict[str, list]) -> list[str]:
    found = []
    if any(_LITS_VOLUME.match(f) or _LITS_SEG.match(f) for _, files in tree for f in files):
        found.append("lits")
    # ATLAS images live in imagesTr but so do MSD/nnU-Net images; only imN files count for ATLAS.
    if any(folder.name == "imagesTr" and any(_ATLAS_IMAGE.match(f) for f in files) for folder, files in tree):
        found.append("atlas")
    found += [k for k in ("msd", "nnunet") if jsons[k]]
    return found


def detect_layouts(root: str | os.PathLike) -> list[str]:
    """Names of the layouts (keys of :data:`LAYOUTS`) that have files under ``root``."""
    tree, jsons = _scan(_check_root(root))
    return _evidence(tree, jsons)


def declared_channels(root: str | os.PathLike) -> list[tuple[Path, str]]:
    """``(dataset.json, channel name as written)`` of every MSD / nnU-Net dataset under ``root``: the
    modality the dataset declares (``"CT"``, ``"MRI"``, ``"T2"``; :func:`modality_from_name` maps it)."""
    _, jsons = _scan(_check_root(root))
    found = []
    for kind, key in (("msd", "modality"), ("nnunet", "channel_names")):
        for jpath, data in jsons[kind]:
            names = data.get(key) or {}
            if isinstance(names, dict) and names:
                found.append((jpath, str(next(iter(names.values())))))
    return found


def _describe(layouts: Iterable[str]) -> str:
    return "; ".join(f"{k}: {LAYOUTS[k]}" for k in layouts)


def find_cases(
    root: str | os.PathLike,
    layout: str = "auto",
    *,
    modality: Modality | None = None,
    require_labels: bool = True,
) -> list[Case]:
    """All cases of the dataset under ``root``, sorted naturally by case id.

    Args:
        root: folder searched recursively (the dataset folder or any folder above it).
        layout: one of :data:`LAYOUTS`, or ``"auto"`` to detect it; auto fails if several layouts
            are present under ``root`` (point it at a narrower folder or name the layout).
        modality: overrides the reader's modality ('ct' for LiTS, 'mri' for ATLAS, dataset.json's
            for MSD/nnU-Net), e.g. for an MSD-style MRI set whose json says something else.
        require_labels: an image without its label is an error (default); with ``False`` such
            cases get ``label=None``.

    Raises:
        DataError: missing folder, no cases (naming the folder and the layouts searched), an image
            without its label or a label without its image, duplicate cases, unreadable dataset.json.
    """
    path = _check_root(root)
    if layout != "auto" and layout not in LAYOUTS:
        raise ValueError(f"layout must be 'auto' or one of {sorted(LAYOUTS)}, got {layout!r}")
    if modality is not None and modality not in ("ct", "mri"):
        raise ValueError(f"modality must be 'ct', 'mri' or None, got {modality!r}")
    tree, jsons = _scan(path)
    if layout == "auto":
        found = _evidence(tree, jsons)
        if not found:
            raise DataError(f"{path}: no cases found; searched recursively for {_describe(LAYOUTS)}")
        if len(found) > 1:
            raise DataError(
                f"{path}: several dataset layouts found ({', '.join(found)}); pass layout= or point root at one dataset"
            )
        layout = found[0]
    if layout == "lits":
        cases = _find_lits(tree, require_labels)
    elif layout == "atlas":
        cases = _find_atlas(tree, require_labels)
    elif layout == "msd":
        cases = _find_msd(jsons["msd"], require_labels)
    else:
        cases = _find_nnunet(jsons["nnunet"], require_labels)
    if not cases:
        raise DataError(f"{path}: no cases found; searched recursively for {_describe([layout])}")
    ids: dict[str, Path] = {}
    for c in cases:
        _unique(ids, c.case_id, c.image, f"case id {c.case_id!r}")
    if modality is not None:
        cases = [Case(c.case_id, c.image, c.label, modality, c.layout) for c in cases]
    return sorted(cases, key=lambda c: _natural_key(c.case_id))


# -------------------------------------------------------------------------------------------- DICOM
#
# A DICOM series is a folder of single-frame slices (CT or MR Image Storage). Geometry comes from the
# headers alone: ImageOrientationPatient (the row and column direction cosines), PixelSpacing (row
# spacing, then column spacing) and ImagePositionPatient (the centre of each slice's first pixel), in
# the patient's LPS frame; slices are sorted along the normal (row x column), whatever the file names
# or InstanceNumbers say. The volume is returned as NIfTI orders it: array index (i, j, k) = (column,
# row, slice), with a RAS affine (LPS with x and y negated), which is what dcm2niix writes too.

#: File suffixes taken as DICOM without looking inside (case-insensitive); files without a suffix are
#: DICOM when they carry the ``DICM`` magic at byte 128 (many scanners export extensionless files).
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")

#: Largest allowed relative deviation of one slice gap from the median gap (missing slices, tilts).
DICOM_GAP_RTOL = 0.05


def _pydicom():
    try:
        import pydicom
    except ImportError as e:  # pragma: no cover - the train extra installs it
        raise DataError("reading DICOM needs pydicom: pip install pydicom (or the package's [train] extra)") from e
    return pydicom


def is_dicom_file(path: str | os.PathLike) -> bool:
    """A file named ``*.dcm`` / ``*.dicom`` / ``*.ima``, or without suffix and with the DICOM magic."""
    p = Path(path)
    if _is_junk(p.name) or p.name.upper() == "DICOMDIR" or not p.is_file():
        return False
    if p.suffix.lower() in DICOM_SUFFIXES:
        return True
    if p.suffix:
        return False
    try:
        with open(p, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def dicom_files(folder: str | os.PathLike) -> list[Path]:
    """The DICOM files directly inside ``folder`` (not its subfolders), sorted by name."""
    folder = Path(folder)
    return [folder / f for f in sorted(os.listdir(folder)) if is_dicom_file(folder / f)]


@dataclass(frozen=True)
class DicomSeries:
    """The headers-only view of a DICOM series folder (:func:`scan_dicom_series`).

    ``modality`` is the DICOM Modality tag as written (``"CT"``, ``"MR"``, ...); :attr:`pipeline_modality`
    maps it to 'ct' / 'mri' (``None`` for anything else).
    """

    folder: Path
    files: tuple[Path, ...]
    series_uid: str
    modality: str
    description: str

    @property
    def pipeline_modality(self) -> Modality | None:
        return {"CT": "ct", "MR": "mri"}.get(self.modality.strip().upper())  # type: ignore[return-value]


@dataclass
class DicomVolume:
    """A DICOM series as a volume: ``data`` indexed (column, row, slice), rescaled (HU for CT), RAS ``affine``."""

    data: Any
    affine: Any
    series: DicomSeries

    def to_nifti(self):
        """The volume as an in-memory ``nibabel.Nifti1Image`` (qform and sform = the affine, scanner space)."""
        import nibabel as nib

        img = nib.Nifti1Image(self.data, self.affine)
        img.set_qform(self.affine, code=1)
        img.set_sform(self.affine, code=1)
        img.header.set_xyzt_units("mm", "sec")
        return img


def _read_header(path: Path):
    pydicom = _pydicom()
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as e:  # noqa: BLE001 - pydicom raises many types for a broken file
        raise DataError(f"{path}: unreadable DICOM ({type(e).__name__}: {e})") from e


def scan_dicom_series(folder: str | os.PathLike) -> DicomSeries:
    """Read the headers of the DICOM files in ``folder`` and check that they form one series.

    Raises:
        DataError: no DICOM files, an unreadable file, or several series (SeriesInstanceUID) in the
            folder: the message lists them, each series must be in a folder of its own.
    """
    folder = Path(folder)
    files = dicom_files(folder)
    if not files:
        raise DataError(f"{folder}: no DICOM files (*.dcm, or files with the DICM magic)")
    by_uid: dict[str, list[tuple[Path, Any]]] = {}
    for f in files:
        ds = _read_header(f)
        by_uid.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((f, ds))
    if len(by_uid) > 1:
        parts = []
        for uid, members in by_uid.items():
            ds = members[0][1]
            what = " ".join(str(ds.get(k, "")).strip() for k in ("Modality", "SeriesDescription")).strip()
            parts.append(f"{uid or '<no SeriesInstanceUID>'} ({what or 'no description'}, {len(members)} files)")
        raise DataError(
            f"{folder}: {len(by_uid)} DICOM series mixed in one folder ({'; '.join(parts)}); "
            "put each series in a folder of its own"
        )
    ((uid, members),) = by_uid.items()
    ds = members[0][1]
    return DicomSeries(
        folder,
        tuple(f for f, _ in members),
        uid,
        str(ds.get("Modality", "")).strip(),
        str(ds.get("SeriesDescription", "")).strip(),
    )


def _floats(ds: Any, keyword: str, n: int, path: Path) -> list[float]:
    value = ds.get(keyword)
    try:
        out = [float(v) for v in value]  # type: ignore[union-attr]
    except (TypeError, ValueError):
        out = []
    if len(out) != n:
        raise DataError(f"{path}: DICOM {keyword} missing or malformed ({value!r}); cannot place the slice in space")
    return out


def read_dicom_series(series: DicomSeries | str | os.PathLike) -> DicomVolume:
    """Read a single-frame DICOM series into a volume with its patient-space geometry.

    Slices are sorted along the slice normal by their ImagePositionPatient; RescaleSlope and
    RescaleIntercept are applied per slice (CT values in HU). The stored dtype is int16 when the
    rescaled values are integers within its range (CT), float32 otherwise.

    Raises:
        DataError: mixed series, a multi-frame object, missing or inconsistent geometry (orientation,
            pixel spacing, image size differing between slices), duplicate slice positions, uneven
            slice gaps (missing slices), or pixel data pydicom cannot decode.
    """
    import numpy as np

    if not isinstance(series, DicomSeries):
        series = scan_dicom_series(series)
    pydicom = _pydicom()
    folder = series.folder
    slices = []
    for f in series.files:
        try:
            ds = pydicom.dcmread(f)
        except Exception as e:  # noqa: BLE001
            raise DataError(f"{f}: unreadable DICOM ({type(e).__name__}: {e})") from e
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise DataError(f"{f}: multi-frame DICOM (enhanced CT/MR) is not supported; export single-frame slices")
        if "PixelData" not in ds:
            raise DataError(f"{f}: DICOM file without pixel data in an image series")
        orient = np.array(_floats(ds, "ImageOrientationPatient", 6, f))
        position = np.array(_floats(ds, "ImagePositionPatient", 3, f))
        spacing = np.array(_floats(ds, "PixelSpacing", 2, f))
        slices.append((f, ds, orient, position, spacing, (int(ds.Rows), int(ds.Columns))))

    f0, ds0, orient, _, spacing, size = slices[0]
    for f, _, o, _, s, sz in slices[1:]:
        if sz != size:
            raise DataError(f"{f}: image size {sz} differs from {size} of {f0} in the same series")
        if not np.allclose(o, orient, atol=1e-4):
            raise DataError(f"{f}: ImageOrientationPatient differs from {f0}'s in the same series")
        if not np.allclose(s, spacing, rtol=1e-4):
            raise DataError(f"{f}: PixelSpacing {s.tolist()} differs from {f0}'s {spacing.tolist()}")
    row, col = orient[:3], orient[3:]  # direction of increasing column index, of increasing row index
    normal = np.cross(row, col)
    if not (abs(np.linalg.norm(row) - 1) < 1e-3 and abs(np.linalg.norm(col) - 1) < 1e-3 and abs(row @ col) < 1e-3):
        raise DataError(f"{f0}: ImageOrientationPatient {orient.tolist()} is not two orthonormal directions")
    slices.sort(key=lambda s: float(s[3] @ normal))
    depth = np.array([float(s[3] @ normal) for s in slices])
    if len(slices) > 1:
        gaps = np.diff(depth)
        if np.any(gaps < 1e-4):
            i = int(np.argmin(gaps))
            raise DataError(
                f"{folder}: two slices at the same position ({slices[i][0].name}, {slices[i + 1][0].name}); "
                "a series with repeated acquisitions must be split first"
            )
        median = float(np.median(gaps))
        if np.max(np.abs(gaps - median)) > DICOM_GAP_RTOL * median:
            raise DataError(
                f"{folder}: uneven slice gaps ({gaps.min():.3g}-{gaps.max():.3g} mm): slices missing from the series?"
            )
        step = (slices[-1][3] - slices[0][3]) / (len(slices) - 1)
    else:
        thickness = float(ds0.get("SpacingBetweenSlices") or ds0.get("SliceThickness") or 1.0)
        step = normal * thickness

    lps = np.eye(4)
    lps[:3, 0] = row * spacing[1]  # i: along a row (next column), PixelSpacing[1] = column spacing
    lps[:3, 1] = col * spacing[0]  # j: down a column (next row), PixelSpacing[0] = row spacing
    lps[:3, 2] = step
    lps[:3, 3] = slices[0][3]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # LPS -> RAS

    data = np.empty((size[1], size[0], len(slices)), np.float32)
    integral = True
    for k, (f, ds, *_rest) in enumerate(slices):
        try:
            pixels = ds.pixel_array
        except Exception as e:  # noqa: BLE001 - compressed syntaxes need optional decoders
            syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "?")
            raise DataError(f"{f}: cannot decode DICOM pixel data (transfer syntax {syntax}: {e})") from e
        if pixels.ndim != 2:
            raise DataError(f"{f}: expected a single-channel 2D slice, got pixel data of shape {pixels.shape}")
        slope = float(ds.get("RescaleSlope", 1) or 1)
        inter = float(ds.get("RescaleIntercept", 0) or 0)
        integral &= pixels.dtype.kind in "iu" and slope.is_integer() and inter.is_integer()
        data[:, :, k] = pixels.T.astype(np.float32) * np.float32(slope) + np.float32(inter)
    if integral and data.size and -32768 <= data.min() and data.max() <= 32767:
        data = data.astype(np.int16)
    return DicomVolume(data, affine, series)
