"""Read, check, reorient, crop, normalise and (optionally) resample one case, and cache the result.

Pipeline per case (:func:`preprocess_case`):

1. Open image and label with nibabel. Uncompressed ``.nii`` (LiTS) is memory-mapped and scanned in
   slabs, so only the cropped region is ever materialised in float32; a ``.nii.gz`` is decompressed
   once in its stored dtype (int16 for CT: half the size of float32).
2. Check: readable NIfTI, 3D, image/label shapes equal, affines equal within ``affine_atol`` mm,
   label values in {0, 1, 2}, image values finite. Any failure raises :class:`DataError` naming the file.
3. Crop to the bounding box of the body (CT: > -500 HU; MRI: > 10% of the 99th percentile of a strided
   subsample, every 4th voxel in x and y and every 2nd in z), or of the liver label (``crop="label"``),
   always including every labelled voxel, plus a margin in mm.
4. Reorient to RAS (the closest canonical orientation, as ``nibabel.as_closest_canonical``).
5. Normalise. CT: clip to the HU window (default [-200, 250]) and scale to [0, 1] (``ct_range="unit"``)
   or [-1, 1] (``"symmetric"``). MRI: clip to the 0.5/99.5 percentiles and z-score, both statistics
   taken over the body voxels of the cropped volume (``mri_norm_region="body"``) so that the amount of
   air in the field of view does not change the scale; ``"all"`` uses every voxel of the crop.
6. Resample (optional) to ``target_spacing`` (RAS x, y, z in mm; ``None`` per axis keeps it):
   trilinear for the image, nearest for the label (``scipy.ndimage.zoom``, pixel-edge aligned).
7. Store as ``.npy`` in **slice-major (z, x, y) order** (an axial slice is one contiguous read from the
   memory map) with a ``meta.json``: spacing per array axis, RAS affine, original shape/affine, crop box,
   orientation, normalisation statistics, and per-slice liver/tumour voxel counts plus a sample of tumour
   voxel coordinates (so samplers never scan the arrays).

The cache entry is keyed by the image and label paths, sizes and mtimes, the modality, the
:class:`PreprocessConfig` and :data:`CACHE_VERSION`: touching a file or changing a parameter makes a
new entry (old entries are left in place; delete the cache folder to reclaim space). Entries are
written to a temporary folder and renamed, so concurrent processes (DDP ranks) never see half an entry.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import uuid
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
from nibabel import orientations as nio
from scipy import ndimage

from .errors import DataError
from .readers import Case, Modality, find_cases

__all__ = [
    "CACHE_VERSION",
    "CachedCase",
    "PreprocessConfig",
    "load_nifti",
    "prepare",
    "preprocess_case",
    "preprocess_cases",
    "restore_to_original",
    "write_prediction",
]

#: Bump when the stored arrays or metadata change meaning: every old cache entry is then ignored.
CACHE_VERSION = 1

#: Labels every supported dataset uses: 0 background, 1 liver, 2 tumour.
LABEL_VALUES = (0, 1, 2)

_SLAB = 32  # slices per slab when scanning a volume: bounds the RAM of a scan to a few slabs


@dataclass(frozen=True)
class PreprocessConfig:
    """Everything that changes the preprocessed arrays (and hence the cache key).

    ``target_spacing`` is (x, y, z) in mm in RAS axes, ``None`` (no resampling) or with ``None`` for
    axes to keep. ``crop_margin_mm`` is added on every side of the crop box. ``affine_atol`` is the
    largest allowed absolute difference (mm) between image and label affines; ``None`` skips the check.
    """

    ct_window: tuple[float, float] = (-200.0, 250.0)
    ct_range: Literal["unit", "symmetric"] = "unit"
    mri_percentiles: tuple[float, float] = (0.5, 99.5)
    mri_norm_region: Literal["body", "all"] = "body"
    target_spacing: tuple[float | None, float | None, float | None] | None = None
    crop: Literal["body", "label", "none"] = "body"
    crop_margin_mm: float = 10.0
    ct_body_hu: float = -500.0
    mri_body_fraction: float = 0.1
    affine_atol: float | None = 1e-3
    max_tumour_points: int = 10000

    def __post_init__(self) -> None:
        lo, hi = self.ct_window
        if not lo < hi:
            raise ValueError(f"ct_window must be (low, high) with low < high, got {self.ct_window}")
        plo, phi = self.mri_percentiles
        if not 0 <= plo < phi <= 100:
            raise ValueError(f"mri_percentiles must satisfy 0 <= low < high <= 100, got {self.mri_percentiles}")
        if self.ct_range not in ("unit", "symmetric"):
            raise ValueError(f"ct_range must be 'unit' or 'symmetric', got {self.ct_range!r}")
        if self.mri_norm_region not in ("body", "all"):
            raise ValueError(f"mri_norm_region must be 'body' or 'all', got {self.mri_norm_region!r}")
        if self.crop not in ("body", "label", "none"):
            raise ValueError(f"crop must be 'body', 'label' or 'none', got {self.crop!r}")
        if self.target_spacing is not None:
            ts = tuple(self.target_spacing)
            if len(ts) != 3 or any(t is not None and not t > 0 for t in ts):
                raise ValueError(f"target_spacing must be 3 positive values (or None), got {self.target_spacing}")
            object.__setattr__(self, "target_spacing", ts)  # lists from YAML hash and compare like tuples
        object.__setattr__(self, "ct_window", tuple(float(v) for v in self.ct_window))
        object.__setattr__(self, "mri_percentiles", tuple(float(v) for v in self.mri_percentiles))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------- reading


def load_nifti(path: str | os.PathLike) -> nib.Nifti1Image:
    """Open a 3D NIfTI lazily (header only), or raise :class:`DataError` naming the file.

    A 4D image with a single volume (shape ``(X, Y, Z, 1)``) counts as 3D; a size of 0 along an axis
    (no voxels) is an error.
    """
    try:
        img = nib.load(os.fspath(path))
    except Exception as e:  # nibabel raises many types (ImageFileError, OSError, EOFError, zlib.error...)
        raise DataError(f"{path}: unreadable NIfTI ({type(e).__name__}: {e})") from e
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise DataError(f"{path}: not a NIfTI image (nibabel read it as {type(img).__name__})")
    shape = img.shape
    if not (len(shape) == 3 or (len(shape) == 4 and shape[3] == 1)):
        raise DataError(f"{path}: expected a 3D volume, got shape {shape}")
    if 0 in shape[:3]:  # a header can declare it; every later step (body crop, windowing) needs voxels
        raise DataError(f"{path}: empty volume (shape {shape}, no voxels)")
    return img


def _raw_data(img: nib.Nifti1Image, path: Path) -> tuple[np.ndarray, float, float]:
    """(stored array, slope, intercept) without applying the scaling, so a memmap stays a memmap."""
    proxy = img.dataobj
    try:
        if isinstance(proxy, nib.arrayproxy.ArrayProxy):
            raw = proxy.get_unscaled()
            slope, inter = float(proxy.slope), float(proxy.inter)
        else:
            raw, slope, inter = np.asanyarray(proxy), 1.0, 0.0
    except Exception as e:  # truncated/corrupt data surfaces only when the data block is read
        raise DataError(f"{path}: unreadable NIfTI data ({type(e).__name__}: {e})") from e
    if raw.ndim == 4:
        raw = raw[..., 0]
    if not math.isfinite(slope) or not math.isfinite(inter):
        raise DataError(f"{path}: non-finite scaling in header (slope {slope}, intercept {inter})")
    return raw, slope, inter


def _slabs(n: int) -> Iterator[slice]:
    # Along the last (slowest, Fortran-order) axis a slab is one contiguous block of the file.
    for k in range(0, n, _SLAB):
        yield slice(k, min(n, k + _SLAB))


def _scaled(chunk: np.ndarray, slope: float, inter: float) -> np.ndarray:
    if slope == 1.0 and inter == 0.0:
        return chunk
    return chunk.astype(np.float32) * np.float32(slope) + np.float32(inter)


def _box_of(mask_projs: list[np.ndarray]) -> list[tuple[int, int]] | None:
    box = []
    for p in mask_projs:
        idx = np.flatnonzero(p)
        if idx.size == 0:
            return None
        box.append((int(idx[0]), int(idx[-1]) + 1))
    return box


def _scan_label(raw: np.ndarray, slope: float, inter: float, path: Path) -> list[tuple[int, int]] | None:
    """Check label values slab by slab; return the bounding box of label > 0 (None if empty)."""
    projs = [np.zeros(n, bool) for n in raw.shape]
    bad: set[float] = set()
    for sl in _slabs(raw.shape[2]):
        c = _scaled(np.asarray(raw[:, :, sl]), slope, inter)
        # min/max first: np.unique on every slab of a 512x512x900 volume would take many seconds.
        if c.min() < 0 or c.max() > 2 or (c.dtype.kind == "f" and np.any(c != np.round(c))):
            off = (c < 0) | (c > 2) | (c != np.round(c)) if c.dtype.kind == "f" else (c < 0) | (c > 2)
            bad.update(np.unique(c[off])[:10].tolist())
        m = c > 0
        projs[0] |= m.any(axis=(1, 2))
        projs[1] |= m.any(axis=(0, 2))
        projs[2][sl] = m.any(axis=(0, 1))
    if bad:
        shown = ", ".join(f"{v:g}" for v in sorted(bad)[:10])
        raise DataError(f"{path}: label values outside {{0, 1, 2}} (found {shown})")
    return _box_of(projs)


def _mri_body_threshold(raw: np.ndarray, slope: float, inter: float, fraction: float) -> float:
    # A strided subsample is enough for a robust 99th percentile and avoids reading the whole volume.
    sub = _scaled(np.asarray(raw[::4, ::4, ::2]), slope, inter).astype(np.float32)
    return float(fraction * np.percentile(sub, 99))


def _scan_body(raw: np.ndarray, slope: float, inter: float, threshold: float) -> list[tuple[int, int]] | None:
    """Bounding box of the body: the planes where it covers at least 1% of its largest cross-section.

    Isolated noise voxels in the air of an MRI (Rician noise above the threshold) must not stretch
    the box to the whole field of view: an in-plane 3x3 opening removes them, and counting (rather than
    "any voxel") ignores what is left. The crop margin covers the thin edges this may shave off.
    """
    counts = [np.zeros(n, np.int64) for n in raw.shape]
    opening = np.ones((3, 3, 1), bool)
    for sl in _slabs(raw.shape[2]):
        m = _scaled(np.asarray(raw[:, :, sl]), slope, inter) > threshold
        m = ndimage.binary_opening(m, structure=opening)
        counts[0] += m.sum(axis=(1, 2))
        counts[1] += m.sum(axis=(0, 2))
        counts[2][sl] = m.sum(axis=(0, 1))
    return _box_of([c >= max(1, 0.01 * c.max()) for c in counts])


def _check_pair(img: nib.Nifti1Image, lbl: nib.Nifti1Image, case: Case, atol: float | None) -> None:
    if img.shape[:3] != lbl.shape[:3]:
        raise DataError(
            f"{case.label}: label shape {tuple(lbl.shape[:3])} does not match image {case.image} "
            f"shape {tuple(img.shape[:3])}"
        )
    if atol is not None:
        diff = float(np.max(np.abs(img.affine - lbl.affine)))
        if not diff <= atol:
            raise DataError(
                f"{case.label}: label affine differs from image {case.image} by up to {diff:.4g} mm "
                f"(tolerance {atol:g}; image affine {np.round(img.affine, 4).tolist()}, "
                f"label affine {np.round(lbl.affine, 4).tolist()})"
            )


# -------------------------------------------------------------------------------------- geometry


def _spacing(affine: np.ndarray) -> np.ndarray:
    return np.sqrt((affine[:3, :3] ** 2).sum(axis=0))


def _translate(offset: Sequence[float]) -> np.ndarray:
    t = np.eye(4)
    t[:3, 3] = offset
    return t


def _invert_ornt(ornt: np.ndarray) -> np.ndarray:
    """The orientation transform that undoes ``apply_orientation(arr, ornt)``."""
    inv = np.zeros_like(ornt)
    for i, (j, flip) in enumerate(ornt):
        inv[int(j)] = (i, flip)
    return inv


def _resample(
    img: np.ndarray, lbl: np.ndarray | None, affine: np.ndarray, target: Sequence[float | None]
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    spacing = _spacing(affine)
    shape = np.array(img.shape)
    want = np.array([s if t is None else t for s, t in zip(spacing, target, strict=True)], dtype=float)
    out_shape = np.maximum(1, np.round(shape * spacing / want)).astype(int)
    if np.array_equal(out_shape, shape):
        return img, lbl, affine
    zoom = out_shape / shape
    # grid_mode=True aligns voxel edges (not centres), so the field of view is preserved exactly.
    img = ndimage.zoom(img, zoom, order=1, mode="nearest", grid_mode=True).astype(np.float32, copy=False)
    if lbl is not None:
        lbl = ndimage.zoom(lbl, zoom, order=0, mode="nearest", grid_mode=True)
    ratio = shape / out_shape  # old voxels per new voxel
    step = np.eye(4)
    step[:3, :3] = np.diag(ratio)
    step[:3, 3] = (ratio - 1) / 2  # centre of new voxel 0, in old voxel indices
    return img, lbl, affine @ step


# ------------------------------------------------------------------------------------------ cache


class CachedCase:
    """A preprocessed case in the cache: arrays are memory-mapped on first access, per process.

    Arrays are ``(z, x, y)`` in RAS voxel order: ``image[k]`` is axial slice k (k grows towards
    Superior), ``image[k, i, j]`` has x index i (grows towards the patient's Right) and y index j (grows
    towards Anterior). ``spacing`` is per array axis, in mm.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        try:
            with open(self.directory / "meta.json", encoding="utf-8") as f:
                self.meta: dict[str, Any] = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"{self.directory}: not a readable cache entry ({type(e).__name__}: {e})") from e
        self._image: np.ndarray | None = None
        self._label: np.ndarray | None = None
        self._points: np.ndarray | None = None

    # Memory maps must not travel to DataLoader workers by pickling (that would copy the data).
    def __getstate__(self) -> dict[str, Any]:
        return {"directory": self.directory, "meta": self.meta}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.directory, self.meta = state["directory"], state["meta"]
        self._image = self._label = self._points = None

    def __repr__(self) -> str:
        return f"CachedCase({self.case_id!r}, {self.modality}, shape={self.shape}, dir={str(self.directory)!r})"

    @property
    def case_id(self) -> str:
        return self.meta["case_id"]

    @property
    def modality(self) -> Modality:
        return self.meta["modality"]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.meta["shape"])  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm per array axis (z, x, y)."""
        return tuple(self.meta["spacing"])  # type: ignore[return-value]

    @property
    def affine(self) -> np.ndarray:
        """RAS affine of the preprocessed volume, indexed (x, y, z) as NIfTI (i.e. ``image.transpose(1, 2, 0)``)."""
        return np.array(self.meta["affine"])

    @property
    def pad_value(self) -> float:
        """The normalised intensity of background (air): what to pad images with."""
        return float(self.meta["pad_value"])

    @property
    def image(self) -> np.ndarray:
        """Normalised float32 volume, ``(z, x, y)``, memory-mapped read-only."""
        if self._image is None:
            self._image = np.load(self.directory / "image.npy", mmap_mode="r")
        return self._image

    @property
    def label(self) -> np.ndarray | None:
        """uint8 labels (0 background, 1 liver, 2 tumour), ``(z, x, y)``; ``None`` for unlabelled cases."""
        if self._label is None and self.meta["has_label"]:
            self._label = np.load(self.directory / "label.npy", mmap_mode="r")
        return self._label

    @property
    def tumour_per_slice(self) -> np.ndarray:
        return np.asarray(self.meta["tumour_per_slice"], dtype=np.int64)

    @property
    def liver_per_slice(self) -> np.ndarray:
        """Voxels of the whole liver (labels 1 and 2) per axial slice."""
        return np.asarray(self.meta["liver_per_slice"], dtype=np.int64)

    @property
    def tumour_slices(self) -> np.ndarray:
        return np.flatnonzero(self.tumour_per_slice)

    @property
    def has_tumour(self) -> bool:
        return self.meta["n_tumour_voxels"] > 0

    @property
    def tumour_points(self) -> np.ndarray:
        """(N, 3) int32 (z, x, y) coordinates of tumour voxels (a seeded sample of at most ``max_tumour_points``)."""
        if self._points is None:
            self._points = np.load(self.directory / "tumour_points.npy")
        return self._points


def _file_stamp(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError as e:
        raise DataError(f"{path}: cannot stat ({e.strerror})") from e
    return {"path": os.path.abspath(path), "mtime_ns": st.st_mtime_ns, "size": st.st_size}


def cache_key(case: Case, config: PreprocessConfig) -> str:
    """Hex digest over everything that determines the cached arrays."""
    payload = {
        "version": CACHE_VERSION,
        "image": _file_stamp(case.image),
        "label": _file_stamp(case.label),
        "modality": case.modality,
        "config": config.to_dict(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _compute(case: Case, cfg: PreprocessConfig) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, dict[str, Any]]:
    """The preprocessed (z, x, y) image, label, tumour points and metadata of one case (nothing written)."""
    img = load_nifti(case.image)
    lbl = load_nifti(case.label) if case.label is not None else None
    if lbl is not None:
        _check_pair(img, lbl, case, cfg.affine_atol)
    raw, slope, inter = _raw_data(img, case.image)
    affine = img.affine.copy()
    raw_spacing = _spacing(affine)
    label_box = None
    if lbl is not None:
        lraw, lslope, linter = _raw_data(lbl, case.label)  # type: ignore[arg-type]
        label_box = _scan_label(lraw, lslope, linter, case.label)  # type: ignore[arg-type]

    # Crop box in stored-voxel indices. Labelled voxels are always kept, whatever the crop mode.
    full = [(0, n) for n in raw.shape]
    if cfg.crop == "none":
        box = full
    else:
        if cfg.crop == "label" and label_box is not None:
            box = label_box
        else:
            if case.modality == "ct":
                thr = cfg.ct_body_hu
            else:
                thr = _mri_body_threshold(raw, slope, inter, cfg.mri_body_fraction)
            body = _scan_body(raw, slope, inter, thr)
            box = body if body is not None else full
            if label_box is not None:
                box = [(min(a[0], b[0]), max(a[1], b[1])) for a, b in zip(box, label_box, strict=True)]
        margin = [math.ceil(cfg.crop_margin_mm / s) if s > 0 else 0 for s in raw_spacing]
        box = [(max(0, lo - m), min(n, hi + m)) for (lo, hi), m, n in zip(box, margin, raw.shape, strict=True)]
    sl = tuple(slice(lo, hi) for lo, hi in box)

    # Only the crop is ever converted to float32.
    image = _scaled(np.asarray(raw[sl]), slope, inter).astype(np.float32, copy=False)
    if not np.all(np.isfinite(image)):
        raise DataError(f"{case.image}: image contains NaN or infinite values")
    label = None
    if lbl is not None:
        label = np.rint(_scaled(np.asarray(lraw[sl]), lslope, linter)).astype(np.uint8)

    # Reorient the crop to RAS; the affine follows the crop offset and then the axis flips/permutation.
    ornt = nio.io_orientation(affine)
    crop_affine = affine @ _translate([lo for lo, _ in box])
    ras_affine = crop_affine @ nio.inv_ornt_aff(ornt, image.shape)
    image = nio.apply_orientation(image, ornt)
    if label is not None:
        label = nio.apply_orientation(label, ornt)

    # Normalise.
    if case.modality == "ct":
        lo, hi = cfg.ct_window
        image = (np.clip(image, lo, hi) - lo) / (hi - lo)
        if cfg.ct_range == "symmetric":
            image = image * 2 - 1
        pad_value = 0.0 if cfg.ct_range == "unit" else -1.0
        norm: dict[str, Any] = {"kind": "ct_window", "window": list(cfg.ct_window), "range": cfg.ct_range}
    else:
        region = image
        if cfg.mri_norm_region == "body":
            thr = _mri_body_threshold(image, 1.0, 0.0, cfg.mri_body_fraction)
            mask = image > thr
            # A near-empty mask (odd intensity offsets) would give unstable statistics: use all voxels.
            if mask.sum() >= 0.01 * image.size:
                region = image[mask]
        plo, phi = np.percentile(region, cfg.mri_percentiles)
        clipped_region = np.clip(region, plo, phi)
        mean, std = float(clipped_region.mean(dtype=np.float64)), float(clipped_region.std(dtype=np.float64))
        if not std > 1e-8 * max(1.0, abs(mean)):
            raise DataError(f"{case.image}: image is constant within the body; cannot z-score it")
        image = (np.clip(image, plo, phi) - mean) / std
        pad_value = (float(plo) - mean) / std
        norm = {"kind": "zscore", "clip": [float(plo), float(phi)], "mean": mean, "std": std}
    image = image.astype(np.float32, copy=False)

    ras_shape = image.shape
    if cfg.target_spacing is not None:
        image, label, ras_affine = _resample(image, label, ras_affine, cfg.target_spacing)

    # Slice-major storage: an axial slice is one contiguous block of the memory map.
    image = np.ascontiguousarray(image.transpose(2, 0, 1))
    if label is not None:
        label = np.ascontiguousarray(label.transpose(2, 0, 1))
    ras_spacing = _spacing(ras_affine)
    if label is not None:
        tumour = label == 2
        tumour_per_slice = tumour.sum(axis=(1, 2)).tolist()
        liver_per_slice = (label > 0).sum(axis=(1, 2)).tolist()
        points = np.argwhere(tumour).astype(np.int32)
    else:
        tumour_per_slice = liver_per_slice = [0] * image.shape[0]
        points = np.zeros((0, 3), np.int32)
    n_tumour = len(points)
    if n_tumour > cfg.max_tumour_points:
        # Seeded by the case id, so the sample (and everything sampled from it) is reproducible.
        rng = np.random.default_rng(zlib.crc32(case.case_id.encode()))
        points = points[np.sort(rng.choice(n_tumour, cfg.max_tumour_points, replace=False))]

    meta = {
        "version": CACHE_VERSION,
        "case_id": case.case_id,
        "modality": case.modality,
        "layout": case.layout,
        "image_path": os.path.abspath(case.image),
        "label_path": os.path.abspath(case.label) if case.label is not None else None,
        "has_label": label is not None,
        "config": cfg.to_dict(),
        "axes": "zxy",
        "shape": list(image.shape),
        "spacing": [float(ras_spacing[2]), float(ras_spacing[0]), float(ras_spacing[1])],
        "affine": ras_affine.tolist(),
        "original": {
            "shape": list(raw.shape),
            "affine": affine.tolist(),
            "spacing": raw_spacing.tolist(),
            "axcodes": "".join(nio.aff2axcodes(affine)),
        },
        "crop_box": [list(b) for b in box],
        "ornt": ornt.tolist(),
        "ras_shape_before_resampling": list(ras_shape),
        "normalisation": norm,
        "pad_value": float(pad_value),
        "tumour_per_slice": tumour_per_slice,
        "liver_per_slice": liver_per_slice,
        "n_tumour_voxels": int(n_tumour),
    }
    return image, label, points, meta


def preprocess_case(
    case: Case,
    cache_dir: str | os.PathLike,
    config: PreprocessConfig | None = None,
    *,
    force: bool = False,
) -> CachedCase:
    """Preprocess one case into ``cache_dir`` (or reuse the cached entry) and return it.

    Raises:
        DataError: unreadable/corrupt NIfTI, non-3D volume, image/label shape or affine mismatch,
            label values outside {0, 1, 2}, non-finite or constant image. The message names the file.
    """
    cfg = config or PreprocessConfig()
    cache = Path(cache_dir)
    key = cache_key(case, cfg)
    out = cache / f"{case.case_id}-{key[:16]}"
    replace = force
    if not force and (out / "meta.json").exists():
        try:
            cached = CachedCase(out)
            if cached.meta.get("key") == key:
                return cached
        except DataError:
            pass  # a damaged entry: rebuild it below
        replace = True
    image, label, points, meta = _compute(case, cfg)
    meta["key"] = key
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".tmp-{case.case_id}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        np.save(tmp / "image.npy", image)
        if label is not None:
            np.save(tmp / "label.npy", label)
        np.save(tmp / "tumour_points.npy", points)
        with open(tmp / "meta.json", "w", encoding="utf-8") as f:
            json.dump(meta, f)
        if replace and out.exists():  # force=True or a damaged entry; never a concurrent writer's fresh one
            shutil.rmtree(out, ignore_errors=True)
        try:
            os.rename(tmp, out)
        except OSError:
            if not (out / "meta.json").exists():
                raise
            # Another process (a DDP rank) wrote the same entry first; it is identical, keep theirs.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return CachedCase(out)


def preprocess_cases(
    cases: Sequence[Case],
    cache_dir: str | os.PathLike,
    config: PreprocessConfig | None = None,
    *,
    progress: bool | None = None,
    force: bool = False,
) -> list[CachedCase]:
    """:func:`preprocess_case` for each case, one at a time (so one raw volume in RAM at most).

    ``progress``: tqdm bar; ``None`` shows it only on a terminal.
    """
    from tqdm.auto import tqdm

    bar = tqdm(cases, desc="preprocess", unit="case", disable=None if progress is None else not progress)
    return [preprocess_case(c, cache_dir, config, force=force) for c in bar]


def prepare(
    root: str | os.PathLike,
    cache_dir: str | os.PathLike,
    layout: str = "auto",
    config: PreprocessConfig | None = None,
    *,
    modality: Modality | None = None,
    progress: bool | None = None,
) -> list[CachedCase]:
    """:func:`~aqcf_kernels.data.readers.find_cases` then :func:`preprocess_cases`."""
    return preprocess_cases(find_cases(root, layout, modality=modality), cache_dir, config, progress=progress)


# ------------------------------------------------------------------------------ back to the scanner


def restore_to_original(array: np.ndarray, case: CachedCase, *, order: int = 0) -> np.ndarray:
    """Map a (z, x, y) array on the preprocessed grid back onto the original image's voxel grid.

    Undoes resampling (``order`` 0 for labels, 1 for probabilities), the RAS reorientation and the
    crop (outside the crop is 0). The result pairs with ``case.meta["original"]["affine"]``.
    """
    meta = case.meta
    if tuple(array.shape) != tuple(meta["shape"]):
        raise ValueError(
            f"array shape {tuple(array.shape)} is not the case's preprocessed shape {tuple(meta['shape'])}"
        )
    ras = np.asarray(array).transpose(1, 2, 0)
    before = tuple(meta["ras_shape_before_resampling"])
    if ras.shape != before:
        zoom = np.array(before) / np.array(ras.shape)
        ras = ndimage.zoom(ras, zoom, order=order, mode="nearest", grid_mode=True)
    crop = nio.apply_orientation(ras, _invert_ornt(np.array(meta["ornt"])))
    out = np.zeros(meta["original"]["shape"], dtype=array.dtype)
    out[tuple(slice(lo, hi) for lo, hi in meta["crop_box"])] = crop
    return out


def write_prediction(array: np.ndarray, case: CachedCase, path: str | os.PathLike) -> Path:
    """Save a (z, x, y) label map on the preprocessed grid as NIfTI on the original image's grid.

    The header (affine, qform/sform codes) is the original image's, so the mask overlays the input
    in any viewer; the data type is uint8.
    """
    data = restore_to_original(np.asarray(array).astype(np.uint8), case, order=0)
    try:
        original = load_nifti(case.meta["image_path"])
    except DataError:  # original moved away: the stored affine is enough
        img = nib.Nifti1Image(data, np.array(case.meta["original"]["affine"]))
    else:
        # The original's class and header as they are (no affine given: nibabel would rewrite the codes where its
        # header's affine is not allclose to the one given, as a NIfTI-2 qform stored at NIfTI-1's float32 was).
        img = type(original)(data, None, header=original.header.copy())
    img.set_data_dtype(np.uint8)
    img.header.set_slope_inter(1, 0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)
    return path
