"""The data pipeline over a hypothesis grid, held to plain numpy / nibabel references written in this file.

tests/data/test_preprocess.py and test_sampling.py check fixed phantoms; this grid draws the inputs and re-derives
every expected output from the documented behaviour, sharing no code with the package beyond the public functions
under test (and the samplers' window helpers ``_read_window`` / ``_window_start``).

Drawn cases (:func:`write_case`): LiTS layout (CT, ``volume-N.nii`` or ``.nii.gz``) or ATLAS layout (MRI,
``imagesTr/imN.nii.gz``), 1-2 cases per dataset, shapes 5-23 per axis (sometimes 33-45 slices, so that the
32-slice slab scan takes two slabs), a random affine (any axis permutation and flips, anisotropic spacing 0.5-3 mm,
an origin offset, sometimes a rotation of up to 15 degrees), held in the sform, the qform or both, sometimes with a
trailing axis of 1, big-endian, or as NIfTI-2 (:class:`Storage`). The image is stored as int16 / uint16 / int32 /
float32 / float64, with or without scl_slope / scl_inter; the label as uint8 / int16 / float32 (also scaled by 0.5),
holding boxes and ellipsoids of liver (1) and tumour (2), sometimes no tumour, sometimes nothing. The image is air
(CT -1024..-600 HU, sometimes no body at all; MRI 0, or noise up to 0.08M around a 0.9M..M body where that pins the
threshold, see :func:`make_phantom`) around a box-shaped body (CT -400..1500 HU; MRI 0.2M..M for a random scale M),
plus a few isolated bright voxels in the air: the noise that the body crop must ignore (preprocess.py,
``_scan_body``). Labelled blobs may lie outside the body. Random data is never all zero.

References (preprocess.py's module docstring and :class:`PreprocessConfig`):

* crop box (:func:`ref_crop_box`): the numpy bounding box of the body (voxels above the documented threshold,
  CT -500 HU, MRI 10% of the 99th percentile, less the planted isolated voxels), or of the label for
  ``crop="label"``, always united with the label's box, grown by ``ceil(margin / spacing)`` voxels per axis and
  clipped to the volume; ``crop="none"``: the whole volume;
* orientation (:func:`ref_to_ras`): each stored axis goes to the RAS axis its affine column points along most,
  flipped where it points backwards, written as a transpose and flips; the affine is the crop's composed with
  that index map; arrays stored (z, x, y);
* normalisation: CT: clip to the window and scale to [0, 1] or [-1, 1]; MRI: clip to the percentiles of the crop's
  body voxels (above 10% of the crop's 99th percentile; every voxel with ``mri_norm_region="all"``) and z-score
  with the clipped voxels' mean and std;
* resampling (:func:`ref_resample`): shape ``max(1, round(n s / t))``, spacing ``n s / m``, the field of view kept
  (outer voxel edges at the same world positions), the image equal to separable linear interpolation at
  pixel-edge-aligned positions (``np.interp``), the label to the nearest voxel (either one at an exact half);
* :func:`restore_to_original` (:func:`ref_restore`): each voxel inside the crop takes the value of the
  preprocessed voxel whose centre is nearest in world space (through the two affines), 0 outside, so the label
  round trip is exact without resampling and with integer upsampling; :func:`write_prediction`: a uint8 NIfTI of
  the original's class that nibabel reads back with the original shape, affine (bit for bit) and qform/sform codes
  and the restored labels;
* samplers: ``_read_window`` equals pad-then-slice (:func:`ref_window`); ``_window_start`` stays in its range,
  contains ``must_include`` and reaches every allowed start; dataset items are windows of the drawn case and slice
  (located by their voxel values, which are all distinct, and where label = f(image)), at an allowed start, with
  tumour where the draw asked for it; ``fit="resize"`` is bilinear / nearest-exact resizing written with np.interp
  and floor; the tumour rate is ``tumour_prob`` within 4.5 binomial sigma, cases uniform among those with slices of
  the drawn kind and slices uniform within the case (6 sigma per count); ``flip_intensity_augment`` flips image
  and label along the same axes and maps intensity by ``a x + b`` within the documented ranges;
* split: ``make_folds`` / ``make_fold_split`` / ``make_split`` partition the cases (disjoint, complete, whole
  patients, order-independent, deterministic), with the documented sizes; ``load_or_create_split`` returns what it
  wrote.

Faults found by the grid, now fixed, each kept as a minimal fixed case: ``_read_window`` raised on windows wholly
outside the array instead of returning all padding (test_read_window_wholly_outside); ``write_prediction`` changed the
sform / qform codes of a NIfTI-2 image whose affine is in its qform alone, writing it as NIfTI-1 with a float32
quaternion (test_write_prediction_keeps_the_codes_of_a_nifti2_qform_image). The grid now draws windows wholly outside
the array too and checks the codes of every image written back.

Examples per test are sized for CI; a longer hunt multiplies them: ``AQCF_GRID_SCALE=10 pytest <this file>``.
"""

from __future__ import annotations

import itertools
import math
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from _grid import grid
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aqcf_kernels.data import (
    CachedCase,
    DataError,
    PatchDataset,
    PreprocessConfig,
    SliceDataset,
    flip_intensity_augment,
    load_or_create_split,
    make_split,
    prepare,
    restore_to_original,
    write_prediction,
)
from aqcf_kernels.data.sampling import _read_window, _window_start
from aqcf_kernels.data.split import make_fold_split, make_folds

pytestmark = pytest.mark.usefixtures("single_threaded")


def _grid(examples: int) -> settings:
    return grid(examples, HealthCheck.function_scoped_fixture)


SEEDS = st.integers(0, 2**32 - 1)
Box = list[tuple[int, int]]


@contextmanager
def scratch() -> Iterator[Path]:
    # tmp_path is shared by all examples of a hypothesis test; each example writes its own dataset and cache.
    with tempfile.TemporaryDirectory(prefix="aqcf-grid-") as d:
        yield Path(d)


# ------------------------------------------------------------------------------------------ drawing cases


@dataclass(frozen=True)
class Encoding:
    """How values are stored on disk: dtype, and scl_slope / scl_inter (None: not set, nibabel's NaN)."""

    dtype: str
    slope: float | None = None
    inter: float | None = None

    def encode(self, values: np.ndarray) -> np.ndarray:
        raw = (values - (self.inter or 0.0)) / (self.slope or 1.0)
        dt = np.dtype(self.dtype)
        if dt.kind in "iu":
            raw = np.rint(raw)
            assert np.iinfo(dt).min <= raw.min() and raw.max() <= np.iinfo(dt).max, (self, raw.min(), raw.max())
        return raw.astype(dt)


CT_ENCODINGS = [
    Encoding("int16"),
    Encoding("int16", 1.0, -1024.0),  # DICOM-style: raw = HU + 1024
    Encoding("uint16", 1.0, -1024.0),
    Encoding("int16", 0.5, 0.0),
    Encoding("int32"),
    Encoding("float32"),
    Encoding("float64"),
    Encoding("float32", 2.0, -100.0),
]
# MRI air must stay exactly 0 (see make_phantom), so no intercept.
MRI_ENCODINGS = [
    Encoding("int16"),
    Encoding("uint16"),
    Encoding("float32"),
    Encoding("int16", 2.0),
    Encoding("float32", 0.25),
]
LABEL_ENCODINGS = [Encoding("uint8"), Encoding("int16"), Encoding("float32"), Encoding("float32", 0.5)]


def random_affine(rng: np.random.Generator, rotate: bool) -> np.ndarray:
    """A signed axis permutation times anisotropic spacing, optionally rotated up to 15 degrees, plus an origin."""
    perm, signs = rng.permutation(3), rng.choice([-1.0, 1.0], 3)
    spacing = rng.uniform(0.5, 3.0, 3)
    affine = np.eye(4)
    affine[:3, :3] = 0
    for a in range(3):
        affine[perm[a], a] = signs[a] * spacing[a]  # stored axis a runs along world axis perm[a]
    if rotate:
        # Rodrigues: well under 45 degrees, so the closest canonical axis of each column stays unambiguous.
        axis = rng.normal(size=3)
        axis /= np.linalg.norm(axis)
        theta = np.deg2rad(rng.uniform(-15, 15))
        k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
        affine[:3, :3] = (np.eye(3) + np.sin(theta) * k + (1 - np.cos(theta)) * k @ k) @ affine[:3, :3]
    affine[:3, 3] = rng.uniform(-200, 200, 3)
    return affine


def draw_box(rng: np.random.Generator, shape: Sequence[int], min_extent: int) -> Box:
    box = []
    for n in shape:
        e = int(rng.integers(min(min_extent, n), n + 1))
        lo = int(rng.integers(0, n - e + 1))
        box.append((lo, lo + e))
    return box


def box_slices(box: Box) -> tuple[slice, ...]:
    return tuple(slice(lo, hi) for lo, hi in box)


def blob(rng: np.random.Generator, shape: Sequence[int]) -> np.ndarray:
    """A box or an ellipsoid (never empty: it holds its centre)."""
    centre = [int(rng.integers(0, n)) for n in shape]
    semi = [rng.uniform(0.5, max(1.0, n / 3)) for n in shape]
    if rng.random() < 0.5:
        mask = np.zeros(shape, bool)
        mask[tuple(slice(max(0, c - int(s)), c + int(s) + 1) for c, s in zip(centre, semi, strict=True))] = True
        return mask
    grid_ = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    return sum(((g - c) / s) ** 2 for g, c, s in zip(grid_, centre, semi, strict=True)) <= 1.0


def draw_label(rng: np.random.Generator, shape: Sequence[int]) -> np.ndarray:
    label = np.zeros(shape, np.uint8)
    if rng.random() < 0.1:
        return label  # an unlabelled-looking case: the crop falls back to the body
    for _ in range(int(rng.integers(1, 4))):
        label[blob(rng, shape)] = 1
    if rng.random() < 0.75:  # LiTS has cases without tumour
        for _ in range(int(rng.integers(1, 3))):
            label[blob(rng, shape)] = 2
    return label


def chebyshev_to_box(p: Sequence[int], box: Box) -> int:
    return max(max(lo - q, q - (hi - 1), 0) for q, (lo, hi) in zip(p, box, strict=True))


@dataclass
class Phantom:
    values: np.ndarray  # intensities as meant (HU, MRI units), stored axis order
    label: np.ndarray
    body: Box
    spikes: list[tuple[int, int, int]] = field(default_factory=list)


def make_phantom(rng: np.random.Generator, shape: Sequence[int], modality: str, noisy_air: bool = False) -> Phantom:
    # The body box is at least 3 voxels wide: the body scan's in-plane 3x3 opening would erase a thinner one.
    body = draw_box(rng, shape, 3) if rng.random() < 0.85 else [(0, n) for n in shape]
    if modality == "ct":
        values = rng.uniform(-1024, -600, shape)
        if rng.random() < 0.05:
            # No body at all (only the isolated voxels below): the crop falls back to the whole volume.
            body = [(0, n) for n in shape]
        else:
            values[box_slices(body)] = rng.uniform(-400, 1500, [hi - lo for lo, hi in body])
        spike_range = (-300.0, 500.0)
    else:
        # Air exactly 0 and every bright voxel within [0.2M, M]: the 10%-of-99th-percentile threshold then lies in
        # [0, 0.1M] whatever voxels it is computed from, so body = the box (and the spikes) for any subsample.
        top = rng.uniform(200, 3000)
        values = np.zeros(shape)
        values[box_slices(body)] = rng.uniform(0.2 * top, top, [hi - lo for lo, hi in body])
        spike_range = (0.2 * top, top)
        inside = np.zeros(shape, bool)
        inside[box_slices(body)] = True
        # Noisy air (up to 8% of M) pins the threshold's value: it must sit between the air and a body held within
        # [0.9M, M] (10% of a 99th percentile there: 9-10% of M). Only where the body fills at least 5% of the
        # volume and of the strided subsample the code takes its percentile from (_mri_body_threshold), so that
        # the 99th percentile is the body's, as documented.
        if noisy_air and inside.mean() >= 0.05 and inside[::4, ::4, ::2].mean() >= 0.05:
            values = rng.uniform(0, 0.08 * top, shape)
            values[inside] = rng.uniform(0.9 * top, top, int(inside.sum()))
    spikes: list[tuple[int, int, int]] = []
    for _ in range(int(rng.integers(0, 4))):
        for _try in range(30):
            p = tuple(int(rng.integers(0, n)) for n in shape)
            # 2 voxels from the body and from each other: no 3x3 in-plane block can hold a spike, so the
            # opening removes it and leaves the body box whole.
            if chebyshev_to_box(p, body) >= 2 and all(
                max(abs(a - b) for a, b in zip(p, q, strict=True)) >= 2 for q in spikes
            ):
                spikes.append(p)  # type: ignore[arg-type]
                values[p] = rng.uniform(*spike_range)
                break
    return Phantom(values, draw_label(rng, shape), body, spikes)


@dataclass
class Written:
    case_id: str
    image_path: Path
    label_path: Path
    phantom: Phantom


@dataclass(frozen=True)
class Storage:
    """How a file is laid out, beyond its values: which of sform / qform hold the affine, a trailing axis of 1
    (documented to count as 3D), big-endian data, NIfTI-2."""

    forms: str = "sform"  # sform | both | qform
    four_d: bool = False
    big_endian: bool = False
    nifti2: bool = False


def draw_storage(rng: np.random.Generator) -> Storage:
    return Storage(
        str(rng.choice(["sform", "both", "qform"])),
        bool(rng.random() < 0.15),
        bool(rng.random() < 0.2),
        bool(rng.random() < 0.15),
    )


def write_nifti(path: Path, values: np.ndarray, affine: np.ndarray, enc: Encoding, storage: Storage) -> None:
    raw = enc.encode(values)
    if storage.four_d:
        raw = raw[..., None]
    kind, header_kind = (nib.Nifti2Image, nib.Nifti2Header) if storage.nifti2 else (nib.Nifti1Image, nib.Nifti1Header)
    img = kind(raw, affine, header=header_kind(endianness=">" if storage.big_endian else "<"))
    img.set_data_dtype(raw.dtype)  # a given header brings its own dtype (float32): store the array's
    if storage.forms in ("both", "qform"):
        img.set_qform(affine, code=1)
    if storage.forms == "qform":
        img.set_sform(affine, code=0)  # the affine lives in the qform alone
    if enc.slope is not None:
        img.header.set_slope_inter(enc.slope, enc.inter or 0.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)
    back = nib.load(path)
    # The grid relies on the file holding exactly this encoding and layout (nibabel could rescale on save).
    assert back.get_data_dtype() == raw.dtype.newbyteorder(">" if storage.big_endian else "<")
    assert (back.dataobj.slope, back.dataobj.inter) == (enc.slope or 1.0, enc.inter or 0.0)
    assert back.shape == raw.shape and isinstance(back, kind)
    assert int(back.header["sform_code"]) == (0 if storage.forms == "qform" else 2)
    # A qform holds a float32 quaternion, coarse near 180-degree rotations (as flips make): the references use the
    # affine nibabel reads back, so this only checks that the intended geometry was written.
    np.testing.assert_allclose(back.affine, affine, rtol=0, atol=1e-2)


def read_volume(path: Path) -> np.ndarray:
    """What nibabel reads (scaling applied), a trailing axis of 1 dropped."""
    data = nib.load(path).get_fdata()
    return data[..., 0] if data.ndim == 4 else data


def write_case(
    rng: np.random.Generator,
    root: Path,
    modality: str,
    number: int,
    image_enc: Encoding,
    label_enc: Encoding,
    gz: bool,
    rotate: bool,
    shape: Sequence[int] | None = None,
    noisy_air: bool = False,
) -> Written:
    if shape is None:
        shape = [int(rng.integers(5, 24)) for _ in range(3)]
        if rng.random() < 0.2:
            shape[2] = int(rng.integers(33, 46))  # two slabs of the 32-slice scan
    ph = make_phantom(rng, shape, modality, noisy_air)
    affine = random_affine(rng, rotate)
    storage = draw_storage(rng)
    if modality == "ct":
        ext = ".nii.gz" if gz else ".nii"
        folder = root / ("Training Batch 1" if number < 28 else "Training Batch 2")
        image, label, case_id = (
            folder / f"volume-{number}{ext}",
            folder / f"segmentation-{number}{ext}",
            f"lits-{number}",
        )
    else:
        folder = root / "train"
        image, label = folder / "imagesTr" / f"im{number}.nii.gz", folder / "labelsTr" / f"lb{number}.nii.gz"
        case_id = f"atlas-{number}"
    write_nifti(image, ph.values, affine, image_enc, storage)
    # The label has its own 4D-ness and byte order (its own writer), the same affine and forms.
    label_storage = Storage(storage.forms, bool(rng.random() < 0.15), bool(rng.random() < 0.2), storage.nifti2)
    write_nifti(label, ph.label.astype(np.float64), affine, label_enc, label_storage)
    return Written(case_id, image, label, ph)


# ------------------------------------------------------------------------------------------ references


def bbox(mask: np.ndarray) -> Box | None:
    if not mask.any():
        return None
    box = []
    for axis in range(mask.ndim):
        idx = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append((int(idx[0]), int(idx[-1]) + 1))
    return box


def spacing_of(affine: np.ndarray) -> np.ndarray:
    return np.linalg.norm(affine[:3, :3], axis=0)


def ref_body_box(values: np.ndarray, spikes: list[tuple[int, int, int]], modality: str, cfg: PreprocessConfig) -> Box:
    thr = cfg.ct_body_hu if modality == "ct" else cfg.mri_body_fraction * np.percentile(values, 99)
    above = values > thr
    for p in spikes:
        above[p] = False  # isolated noise: documented not to stretch the box
    box = bbox(above)
    return box if box is not None else [(0, n) for n in values.shape]


def ref_crop_box(
    values: np.ndarray,
    label: np.ndarray,
    affine: np.ndarray,
    spikes: list[tuple[int, int, int]],
    modality: str,
    cfg: PreprocessConfig,
) -> Box:
    shape = values.shape
    if cfg.crop == "none":
        return [(0, n) for n in shape]
    lab = bbox(label > 0)
    if cfg.crop == "label" and lab is not None:
        box = lab
    else:
        box = ref_body_box(values, spikes, modality, cfg)
        if lab is not None:
            box = [(min(a, c), max(b, d)) for (a, b), (c, d) in zip(box, lab, strict=True)]
    margin = [math.ceil(cfg.crop_margin_mm / s) for s in spacing_of(affine)]
    return [(max(0, lo - m), min(n, hi + m)) for (lo, hi), m, n in zip(box, margin, shape, strict=True)]


def ref_to_ras(arr: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(array in RAS index order, the 4x4 map from RAS indices to the input's indices)."""
    cols = affine[:3, :3] / spacing_of(affine)
    world_axis = np.argmax(np.abs(cols), axis=0)  # per stored axis, the RAS axis it points along most
    assert sorted(world_axis) == [0, 1, 2]
    stored_axis = [int(np.flatnonzero(world_axis == r)[0]) for r in range(3)]
    out = arr.transpose(stored_axis)
    index_map = np.zeros((4, 4))
    index_map[3, 3] = 1
    for r, a in enumerate(stored_axis):
        if cols[r, a] < 0:  # this axis runs from Right to Left (or A->P, S->I): flip it
            out = np.flip(out, r)
            index_map[a, r], index_map[a, 3] = -1, arr.shape[a] - 1
        else:
            index_map[a, r] = 1
    return out, index_map


def ref_to_ras_inverse(ras: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """An (x, y, z) RAS array back in the stored axis order of ``affine`` (the inverse of :func:`ref_to_ras`)."""
    cols = affine[:3, :3] / spacing_of(affine)
    world_axis = np.argmax(np.abs(cols), axis=0)
    out = ras
    for r in range(3):
        a = int(np.flatnonzero(world_axis == r)[0])
        if cols[r, a] < 0:
            out = np.flip(out, r)
    return out.transpose([int(r) for r in world_axis])  # stored axis a comes from RAS axis world_axis[a]


def translate(offset: Sequence[float]) -> np.ndarray:
    t = np.eye(4)
    t[:3, 3] = offset
    return t


@dataclass
class Expected:
    box: Box
    image: np.ndarray  # (z, x, y), float64
    label: np.ndarray  # (z, x, y)
    affine: np.ndarray  # RAS, indexed (x, y, z)
    pad_value: float
    constant: bool = False  # MRI: nothing to z-score (documented DataError)


def ref_preprocess(w: Written, modality: str, cfg: PreprocessConfig) -> Expected:
    """The documented pipeline up to (not including) resampling, from what nibabel reads."""
    values = read_volume(w.image_path)
    label = np.rint(read_volume(w.label_path)).astype(np.uint8)
    affine = nib.load(w.image_path).affine
    box = ref_crop_box(values, label, affine, w.phantom.spikes, modality, cfg)
    crop, crop_label = values[box_slices(box)], label[box_slices(box)]
    ras, index_map = ref_to_ras(crop, affine)
    ras_label, _ = ref_to_ras(crop_label, affine)
    ras_affine = affine @ translate([lo for lo, _ in box]) @ index_map
    if modality == "ct":
        lo, hi = cfg.ct_window
        norm = (np.clip(ras, lo, hi) - lo) / (hi - lo)
        pad = 0.0
        if cfg.ct_range == "symmetric":
            norm, pad = 2 * norm - 1, -1.0
    else:
        region = ras.ravel()
        if cfg.mri_norm_region == "body":
            mask = ras > cfg.mri_body_fraction * np.percentile(ras, 99)
            if mask.sum() >= 0.01 * ras.size:
                region = ras[mask]
        plo, phi = np.percentile(region, cfg.mri_percentiles)
        clipped = np.clip(region, plo, phi)
        mean, std = clipped.mean(), clipped.std()
        if not std > 1e-8 * max(1.0, abs(mean)):
            # e.g. crop="label" around a label drawn in the air: all zeros. preprocess_case raises DataError.
            return Expected(box, ras.transpose(2, 0, 1), ras_label.transpose(2, 0, 1), ras_affine, 0.0, True)
        norm, pad = (np.clip(ras, plo, phi) - mean) / std, (plo - mean) / std
    zxy = (2, 0, 1)
    return Expected(box, norm.transpose(zxy), ras_label.transpose(zxy), ras_affine, float(pad))


def positions(n: int, m: int) -> np.ndarray:
    """Pixel-edge-aligned source positions of m output voxels over n input voxels."""
    return (np.arange(m) + 0.5) * n / m - 0.5


def ref_linear(arr: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Separable linear interpolation at pixel-edge-aligned positions, edge values held (np.interp clamps)."""
    out = np.asarray(arr, np.float64)
    for axis, m in enumerate(shape):
        n = out.shape[axis]
        p = positions(n, m)
        out = np.apply_along_axis(lambda v, n=n, p=p: np.interp(p, np.arange(n), v), axis, out)
    return out


def nearest_candidates(p: np.ndarray, n: int, tol: float = 1e-4) -> tuple[np.ndarray, np.ndarray]:
    """Nearest index to each position (clamped to [0, n)): two candidates where p is at an exact half."""
    tie = np.abs(p - np.floor(p) - 0.5) < tol
    a = np.where(tie, np.floor(p), np.rint(p))
    b = np.where(tie, np.floor(p) + 1, np.rint(p))
    return np.clip(a, 0, n - 1).astype(int), np.clip(b, 0, n - 1).astype(int)


def matches_nearest(got: np.ndarray, src: np.ndarray, cands: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Per voxel: does ``got`` equal src at one of the nearest-neighbour candidates (an outer product per axis)?"""
    ok = np.zeros(got.shape, bool)
    for pick in itertools.product(*[(a, b) for a, b in cands]):
        ok |= got == src[np.ix_(*pick)]
    return ok


def ref_resample(
    exp: Expected, target: Sequence[float | None]
) -> tuple[tuple[int, ...], np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """(new (z, x, y) shape, new spacing (z, x, y), nearest candidates per (z, x, y) axis)."""
    shape_zxy = np.array(exp.image.shape)
    sp = spacing_of(exp.affine)  # RAS x, y, z
    sp_zxy = sp[[2, 0, 1]]
    t_zxy = [target[2], target[0], target[1]]
    new = tuple(n if t is None else max(1, round(n * s / t)) for n, s, t in zip(shape_zxy, sp_zxy, t_zxy, strict=True))
    new_sp = np.array([n * s / m for n, s, m in zip(shape_zxy, sp_zxy, new, strict=True)])
    cands = [nearest_candidates(positions(n, m), n) for n, m in zip(shape_zxy, new, strict=True)]
    return new, new_sp, cands


def ref_restore(array: np.ndarray, case: CachedCase) -> tuple[np.ndarray, np.ndarray]:
    """(expected result, mask of voxels whose nearest preprocessed voxel is unique): the world-space nearest voxel."""
    orig = case.meta["original"]
    shape, affine = tuple(orig["shape"]), np.array(orig["affine"])
    box = case.meta["crop_box"]
    out = np.zeros(shape, array.dtype)
    vox = np.stack(np.meshgrid(*[np.arange(lo, hi) for lo, hi in box], indexing="ij"), -1).reshape(-1, 3)
    world = affine @ np.c_[vox, np.ones(len(vox))].T
    q = (np.linalg.inv(case.affine) @ world)[:3].T  # preprocessed RAS (x, y, z) index of each voxel's centre
    m_xyz = np.array(case.shape)[[1, 2, 0]]
    # Resampling keeps the field of view: every voxel centre of the crop lies inside the preprocessed grid.
    assert np.all(q > -0.5 - 1e-6) and np.all(q < m_xyz - 0.5 + 1e-6), (q.min(0), q.max(0), m_xyz)
    cands = [nearest_candidates(q[:, r], m_xyz[r]) for r in range(3)]
    first = array[cands[2][0], cands[0][0], cands[1][0]]
    unique = np.all([a == b for a, b in cands], axis=0)
    out[tuple(vox.T)] = first
    sure = np.zeros(shape, bool)
    sure[tuple(vox.T)] = unique
    outside = np.ones(shape, bool)
    outside[box_slices(box)] = False
    return out, sure | outside


# ------------------------------------------------------------------------------------------ preprocessing

CT_WINDOWS = [(-200.0, 250.0), (-100.0, 200.0), (-300.0, 500.0), (0.0, 100.0)]
MARGINS = [0.0, 2.5, 7.0, 10.0, 16.3]


@st.composite
def preprocess_configs(draw: st.DrawFn) -> tuple[str, PreprocessConfig]:
    modality = draw(st.sampled_from(["ct", "mri"]))
    kw: dict = {
        "crop": draw(st.sampled_from(["body", "label", "none"])),
        "crop_margin_mm": draw(st.sampled_from(MARGINS)),
        "max_tumour_points": draw(st.sampled_from([3, 10000])),
    }
    if modality == "ct":
        kw["ct_window"] = draw(st.sampled_from(CT_WINDOWS))
        kw["ct_range"] = draw(st.sampled_from(["unit", "symmetric"]))
    else:
        kw["mri_percentiles"] = draw(st.sampled_from([(0.5, 99.5), (0.0, 100.0), (2.0, 98.0), (5.0, 95.0)]))
        kw["mri_norm_region"] = draw(st.sampled_from(["body", "all"]))
    return modality, PreprocessConfig(**kw)


@dataclass(frozen=True)
class CaseDraw:
    modality: str
    cfg: PreprocessConfig
    image_enc: Encoding
    label_enc: Encoding
    gz: bool
    rotate: bool
    seed: int


@st.composite
def case_draws(draw: st.DrawFn) -> CaseDraw:
    modality, cfg = draw(preprocess_configs())
    encs = CT_ENCODINGS if modality == "ct" else MRI_ENCODINGS
    return CaseDraw(
        modality,
        cfg,
        draw(st.sampled_from(encs)),
        draw(st.sampled_from(LABEL_ENCODINGS)),
        draw(st.booleans()),
        draw(st.booleans()),
        draw(SEEDS),
    )


def prepare_cases(
    d: CaseDraw, root: Path, n_cases: int, cfg: PreprocessConfig
) -> tuple[list[Written], list[CachedCase]] | None:
    """Write and prepare the drawn cases; None (after checking the DataError) when the reference says it must fail."""
    rng = np.random.default_rng(d.seed)
    # Noisy MRI air only where every crop voxel enters the z-score: the body mask of the crop would otherwise
    # depend on which voxels the threshold's percentile is taken from.
    noisy_air = d.modality == "mri" and cfg.mri_norm_region == "all" and bool(rng.random() < 0.7)
    numbers = sorted(rng.choice(131 if d.modality == "ct" else 60, n_cases, replace=False).tolist())
    written = [
        write_case(rng, root / "raw", d.modality, int(k), d.image_enc, d.label_enc, d.gz, d.rotate, noisy_air=noisy_air)
        for k in numbers
    ]
    layout = "lits" if d.modality == "ct" else "atlas"
    if any(ref_preprocess(w, d.modality, cfg).constant for w in written):
        with pytest.raises(DataError, match="constant within the body"):
            prepare(root / "raw", root / "cache", layout, cfg, progress=False)
        return None
    cached = prepare(root / "raw", root / "cache", layout, cfg, progress=False)
    # Cases come back sorted by number (natural order), one per written case.
    assert [c.case_id for c in cached] == [w.case_id for w in written]
    return written, cached


def check_against(c: CachedCase, exp: Expected, modality: str) -> None:
    assert c.meta["crop_box"] == [list(b) for b in exp.box]
    assert c.shape == exp.image.shape and c.image.dtype == np.float32 and c.label.dtype == np.uint8
    scale = max(1.0, float(np.abs(exp.image).max()))
    np.testing.assert_allclose(c.image, exp.image, rtol=0, atol=(2e-6 if modality == "ct" else 2e-5) * scale)
    np.testing.assert_array_equal(c.label, exp.label)
    np.testing.assert_allclose(c.affine, exp.affine, rtol=0, atol=1e-4)
    np.testing.assert_allclose(c.spacing, spacing_of(exp.affine)[[2, 0, 1]], rtol=1e-6)
    np.testing.assert_allclose(c.pad_value, exp.pad_value, rtol=1e-5, atol=1e-5)


@_grid(100)
@given(d=case_draws())
def test_preprocess_matches_reference(d: CaseDraw) -> None:
    """Crop box, RAS reorientation, normalisation, affine, per-slice counts and tumour points of prepared cases."""
    with scratch() as root:
        n_cases = 1 + int(np.random.default_rng(d.seed + 1).random() < 0.3)
        prepared = prepare_cases(d, root, n_cases, d.cfg)
        if prepared is None:
            return
        written, cached = prepared
        for w, c in zip(written, cached, strict=True):
            exp = ref_preprocess(w, d.modality, d.cfg)
            # The body box found from the data is the planted one (a check of the generator, not the package).
            assert ref_body_box(read_volume(w.image_path), w.phantom.spikes, d.modality, d.cfg) == w.phantom.body
            check_against(c, exp, d.modality)
            assert c.meta["original"]["shape"] == list(w.phantom.values.shape)
            np.testing.assert_allclose(c.meta["original"]["affine"], nib.load(w.image_path).affine, atol=1e-6)
            lab = exp.label
            assert c.tumour_per_slice.tolist() == (lab == 2).sum(axis=(1, 2)).tolist()
            assert c.liver_per_slice.tolist() == (lab > 0).sum(axis=(1, 2)).tolist()
            every = np.argwhere(lab == 2)
            assert c.meta["n_tumour_voxels"] == len(every) and c.has_tumour == (len(every) > 0)
            pts = c.tumour_points
            assert pts.shape == (min(len(every), d.cfg.max_tumour_points), 3)
            # A sample of the tumour voxels (all of them when few enough): distinct, all labelled 2.
            assert all(lab[tuple(p)] == 2 for p in pts)
            assert len({tuple(p) for p in pts}) == len(pts)


def draw_target(rng: np.random.Generator, spacing_xyz: np.ndarray) -> tuple[float | None, ...]:
    """Per RAS axis: keep (None), the current spacing (identity), an integer upsampling, or any 0.4-4 mm."""
    out: list[float | None] = []
    for s in spacing_xyz:
        kind = rng.integers(4)
        out.append([None, float(s), float(s) / int(rng.integers(1, 4)), float(rng.uniform(0.4, 4.0))][kind])
    return tuple(out)


@_grid(80)
@given(d=case_draws())
def test_resampling_matches_reference(d: CaseDraw) -> None:
    """Shape, spacing, field of view, trilinear image and nearest label after resampling to a drawn spacing."""
    with scratch() as root:
        # The target is drawn from the case's RAS spacing, which needs the case: prepare once without resampling.
        prepared = prepare_cases(d, root, 1, d.cfg)
        if prepared is None:
            return
        (w,), (native,) = prepared
        target = draw_target(np.random.default_rng(d.seed + 2), spacing_of(native.affine))
        cfg = PreprocessConfig(**{**d.cfg.to_dict(), "target_spacing": target})
        (c,) = prepare(root / "raw", root / "cache", "auto", cfg, progress=False)
        exp = ref_preprocess(w, d.modality, cfg)
        new_shape, new_spacing, cands = ref_resample(exp, target)
        assert c.meta["crop_box"] == [list(b) for b in exp.box]
        assert c.shape == new_shape, (c.shape, new_shape, exp.image.shape, target)
        np.testing.assert_allclose(c.spacing, new_spacing, rtol=1e-6)
        np.testing.assert_allclose(spacing_of(c.affine)[[2, 0, 1]], new_spacing, rtol=1e-6)
        # Pixel-edge aligned: the outer corners of the first and last voxels stay where they were.
        before = np.array(exp.image.shape)[[1, 2, 0]]
        after = np.array(new_shape)[[1, 2, 0]]
        for corner_before, corner_after in ((np.full(3, -0.5), np.full(3, -0.5)), (before - 0.5, after - 0.5)):
            np.testing.assert_allclose(
                c.affine @ np.r_[corner_after, 1], exp.affine @ np.r_[corner_before, 1], rtol=0, atol=1e-3
            )
        want = ref_linear(exp.image, new_shape)
        scale = max(1.0, float(np.abs(want).max()))
        np.testing.assert_allclose(c.image, want, rtol=0, atol=2e-5 * scale)
        ok = matches_nearest(np.asarray(c.label), exp.label, cands)
        assert ok.all(), f"{(~ok).sum()} label voxels are not the nearest source voxel's label"
        if all(t is None or abs(t - s) < 1e-9 for t, s in zip(target, spacing_of(exp.affine), strict=True)):
            # The identity spacing changes nothing at all.
            check_against(c, exp, d.modality)


# ------------------------------------------------------------------------------------------ back to the scanner


@_grid(70)
@given(d=case_draws(), resample=st.sampled_from(["none", "upsample", "any"]), gz=st.booleans())
def test_restore_and_write_prediction(d: CaseDraw, resample: str, gz: bool) -> None:
    """restore_to_original against the world-space nearest voxel; write_prediction read back by nibabel."""
    with scratch() as root:
        rng = np.random.default_rng(d.seed + 3)
        cfg = d.cfg
        if resample != "none":
            # Integer upsampling (spacing / k) round-trips labels exactly; any spacing is checked voxel by voxel.
            rel = rng.integers(1, 4, 3) if resample == "upsample" else None
            prepared = prepare_cases(d, root, 1, cfg)
            if prepared is None:
                return
            written, (native,) = prepared
            sp = spacing_of(native.affine)
            target = tuple(sp / rel) if rel is not None else tuple(rng.uniform(0.4, 4.0, 3))
            cfg = PreprocessConfig(**{**cfg.to_dict(), "target_spacing": target})
            (c,) = prepare(root / "raw", root / "cache", "auto", cfg, progress=False)
        else:
            prepared = prepare_cases(d, root, 1, cfg)
            if prepared is None:
                return
            written, (c,) = prepared
        original = nib.load(written[0].image_path)
        label = np.rint(read_volume(written[0].label_path)).astype(np.uint8)
        shape = original.shape[:3]  # a trailing axis of 1 is not part of the volume
        box = box_slices(c.meta["crop_box"])

        back = restore_to_original(np.asarray(c.label), c, order=0)
        assert back.shape == shape and back.dtype == np.uint8
        if resample != "any":
            # The crop holds every labelled voxel, so the whole label comes back, zero outside included.
            np.testing.assert_array_equal(back, label)
        # Any array on the preprocessed grid: each crop voxel takes the nearest preprocessed voxel, 0 outside.
        noise = rng.integers(0, 3, c.shape).astype(np.uint8)
        want, sure = ref_restore(noise, c)
        got = restore_to_original(noise, c, order=0)
        assert got.shape == shape and got.dtype == np.uint8
        assert np.array_equal(got[sure], want[sure]), f"{(got[sure] != want[sure]).sum()} voxels misplaced"
        if resample == "none":
            assert sure.all()
            # order=1 without resampling: the image comes back as the normalised original inside the crop.
            exp = ref_preprocess(written[0], d.modality, cfg)
            img_back = restore_to_original(np.asarray(c.image), c, order=1)
            ref = np.zeros(shape, np.float64)
            ref[box] = ref_to_ras_inverse(exp.image.transpose(1, 2, 0), original.affine)
            np.testing.assert_allclose(img_back, ref, rtol=0, atol=2e-5 * max(1.0, float(np.abs(ref).max())))

        out = write_prediction(noise, c, root / "pred" / f"{c.case_id}.nii{'.gz' if gz else ''}")
        saved = nib.load(out)
        assert saved.shape == shape and saved.get_data_dtype() == np.uint8
        np.testing.assert_array_equal(np.asanyarray(saved.dataobj), got)  # no scaling carried over from the image
        np.testing.assert_array_equal(saved.get_fdata(), got)
        # Written with the original's own class and header as they are (NIfTI-1 float32 or NIfTI-2 float64 sform /
        # qform): the affine read back is the original's bit for bit (measured: exact for both kinds, every draw).
        assert type(saved) is type(original)
        np.testing.assert_array_equal(saved.affine, original.affine)
        assert int(saved.header["sform_code"]) == int(original.header["sform_code"])
        assert int(saved.header["qform_code"]) == int(original.header["qform_code"])


def test_write_prediction_keeps_the_codes_of_a_nifti2_qform_image(tmp_path: Path) -> None:
    """A NIfTI-2 original whose affine lives in its qform alone is written back as NIfTI-2 with its codes (0, 1).

    A fault the grid found, now fixed: the prediction was always a Nifti1Image built on the original header, whose
    float64 qform became a float32 quaternion that nibabel no longer found allclose (atol 1e-8 on the zero entries)
    to the given affine, so it rewrote the header (sform_code 0 -> 2, qform_code 1 -> 0). The prediction now takes
    the original's own class and header.
    """
    affine = np.array([[1.0, 0, 0, 10], [0, 0, 2.0, -20], [0, 1.5, 0, 30], [0, 0, 0, 1]])  # y and z swapped
    image = np.full((6, 7, 5), -1000, np.int16)
    image[1:5, 1:6, 1:4] = 100
    label = np.zeros((6, 7, 5), np.uint8)
    label[2:4, 2:4, 2] = 1
    (tmp_path / "raw").mkdir()
    for name, data in (("volume-0.nii", image), ("segmentation-0.nii", label)):
        img = nib.Nifti2Image(data, affine)
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=0)  # the affine in the qform alone (a NIfTI-1 image keeps its codes)
        nib.save(img, tmp_path / "raw" / name)
    (c,) = prepare(tmp_path / "raw", tmp_path / "cache", "lits", PreprocessConfig(), progress=False)
    saved = nib.load(write_prediction(np.asarray(c.label), c, tmp_path / "pred.nii.gz"))
    assert isinstance(saved, nib.Nifti2Image)
    np.testing.assert_allclose(saved.affine, affine, atol=1e-5)
    assert (int(saved.header["sform_code"]), int(saved.header["qform_code"])) == (0, 1)


# ------------------------------------------------------------------------------------------ sampling


def ref_window(arr: np.ndarray, starts: Sequence[int], size: Sequence[int], pad: float) -> np.ndarray:
    """``arr[s : s + k]`` per axis, where indices outside the array read ``pad``: pad enough, then slice."""
    width = [(max(0, -s), max(0, s + k - n)) for s, k, n in zip(starts, size, arr.shape, strict=True)]
    padded = np.pad(arr, width, constant_values=pad)
    return padded[tuple(slice(s + b, s + b + k) for s, k, (b, _) in zip(starts, size, width, strict=True))]


@_grid(300)
@given(seed=SEEDS, ndim=st.integers(1, 3), dtype=st.sampled_from(["float32", "uint8", "int64"]))
def test_read_window_matches_pad_and_slice(seed: int, ndim: int, dtype: str) -> None:
    """Windows inside, partly outside, larger than, or wholly outside the array on every axis."""
    rng = np.random.default_rng(seed)
    shape = tuple(int(rng.integers(1, 9)) for _ in range(ndim))
    arr = (rng.permutation(int(np.prod(shape))) + 1).reshape(shape).astype(dtype)  # distinct, never all zero
    size = tuple(int(rng.integers(1, 12)) for _ in range(ndim))
    starts = tuple(int(rng.integers(-k - 3, n + 4)) for n, k in zip(shape, size, strict=True))
    pad = float(rng.choice([0, -1, 7]))
    got = _read_window(arr, starts, size, pad)
    assert got.shape == size and got.dtype == arr.dtype
    np.testing.assert_array_equal(got, ref_window(arr, starts, size, pad))


@pytest.mark.parametrize("start", [-5, 11], ids=["before", "after"])
def test_read_window_wholly_outside(start: int) -> None:
    """A window wholly before the array (start + size < 0) or starting past it (n < start < n + size) is all padding.

    A fault the grid found, now fixed: the source slice was clipped to a negative stop and raised a broadcast
    ValueError (unreachable from the datasets, whose windows always overlap the volume).
    """
    arr = np.arange(1.0, 11.0)
    np.testing.assert_array_equal(_read_window(arr, [start], [3], -1.0), ref_window(arr, [start], [3], -1.0))


@_grid(300)
@given(seed=SEEDS, n=st.integers(1, 12), size=st.integers(1, 12), include=st.booleans())
def test_window_start_range(seed: int, n: int, size: int, include: bool) -> None:
    """Inside [0, n - size] (or the centred start when the window covers the axis), holding must_include;
    every allowed start is reachable."""
    rng = np.random.default_rng(seed)
    must = int(rng.integers(0, n)) if include else None
    starts = {_window_start(rng, n, size, must) for _ in range(200)}
    if n <= size:
        assert starts == {-((size - n) // 2)}  # documented: centred, so it covers every voxel
        return
    lo, hi = 0, n - size
    if must is not None:
        lo, hi = max(lo, must - size + 1), min(hi, must)
    assert starts == set(range(lo, hi + 1)), (starts, lo, hi)  # 200 draws miss one of <= 12 starts ~never
    if must is not None:
        assert all(s <= must < s + size for s in starts)


#: CT bands per label (HU strictly inside the default window): label = f(image) for every voxel.
BANDS = {0: (-190.0, -60.0), 1: (-50.0, 90.0), 2: (100.0, 240.0)}


def band_of(norm: np.ndarray, symmetric: bool) -> np.ndarray:
    hu = ((norm + 1) / 2 if symmetric else norm) * 450 - 200
    return np.where(hu < -55, 0, np.where(hu < 95, 1, 2))


def sampling_cases(
    rng: np.random.Generator, root: Path, n_cases: int, symmetric: bool, points: int
) -> list[CachedCase]:
    """Small CT cases, every voxel value distinct (a permutation of evenly spaced values within its label's band)."""
    for k in range(n_cases):
        shape = (int(rng.integers(3, 15)), int(rng.integers(3, 15)), int(rng.integers(2, 10)))
        label = np.zeros(shape, np.uint8)
        label[blob(rng, shape)] = 1
        if rng.random() < 0.7:
            # Tumour in a few slices only, so that tumour-free slices exist.
            z0 = int(rng.integers(0, shape[2]))
            t = blob(rng, shape)
            t[..., : max(0, z0 - 1)] = False
            t[..., z0 + 2 :] = False
            label[t] = 2
        values = np.zeros(shape)
        for v, (lo, hi) in BANDS.items():
            where = label == v
            values[where] = lo + (hi - lo) * (rng.permutation(int(where.sum())) + 0.5) / max(1, where.sum())
        affine = random_affine(rng, rotate=False)
        write_nifti(root / "raw" / f"volume-{k}.nii", values, affine, Encoding("float32"), Storage())
        write_nifti(root / "raw" / f"segmentation-{k}.nii", label.astype(float), affine, Encoding("uint8"), Storage())
    cfg = PreprocessConfig(crop="none", ct_range="symmetric" if symmetric else "unit", max_tumour_points=points)
    return prepare(root / "raw", root / "cache", "lits", cfg, progress=False)


def allowed_start(s: int, n: int, k: int) -> bool:
    return s == -((k - n) // 2) if n <= k else 0 <= s <= n - k


def check_window(
    image: np.ndarray, label: np.ndarray, case: CachedCase, starts: Sequence[int], symmetric: bool
) -> None:
    """The sample's image and label are the case's window at ``starts`` (padded outside), in register."""
    size = image.shape
    np.testing.assert_array_equal(image, ref_window(np.asarray(case.image), starts, size, case.pad_value))
    np.testing.assert_array_equal(label, ref_window(np.asarray(case.label), starts, size, 0))
    data = image != case.pad_value
    assert data.any()
    # Label = f(image) voxel by voxel, zero where padded: a label window shifted against the image shows here too.
    np.testing.assert_array_equal(label[data], band_of(image[data], symmetric))
    assert not label[~data].any()


def window_start_of(window: np.ndarray, case: CachedCase) -> tuple[int, ...]:
    """Where ``window`` (a (z, x, y) block) starts in the case's volume, found from one of its distinct values."""
    first = np.argwhere(window != case.pad_value)[0]
    hits = np.argwhere(np.asarray(case.image) == window[tuple(first)])
    assert len(hits) == 1, (len(hits), window[tuple(first)])  # every value of the case is distinct
    return tuple(int(h - f) for h, f in zip(hits[0], first, strict=True))


TUMOUR_PROBS = [None, 0.0, 0.3, 0.5, 1.0]


@_grid(50)
@given(
    seed=SEEDS,
    n_cases=st.integers(1, 3),
    size=st.one_of(st.none(), st.tuples(st.integers(1, 18), st.integers(1, 18))),
    tumour_prob=st.sampled_from(TUMOUR_PROBS),
    symmetric=st.booleans(),
    fit=st.sampled_from(["crop", "resize"]),
)
def test_slice_dataset_items(
    seed: int, n_cases: int, size: tuple[int, int] | None, tumour_prob: float | None, symmetric: bool, fit: str
) -> None:
    """Each item is the drawn case's drawn slice, windowed (or resized) with its label in register."""
    with scratch() as root:
        rng = np.random.default_rng(seed)
        cases = sampling_cases(rng, root, n_cases, symmetric, int(rng.choice([2, 10000])))
        ds = SliceDataset(cases, size, tumour_prob=tumour_prob, fit=fit, seed=seed % 1000)
        again = SliceDataset(cases, size, tumour_prob=tumour_prob, fit=fit, seed=seed % 1000)
        any_pos = any(c.has_tumour for c in cases)
        any_neg = any((c.tumour_per_slice == 0).any() for c in cases)
        for index in [*range(12), *rng.integers(0, 10**9, 6).tolist()]:
            s = ds[index]
            ci, z, want, _ = ds.draw(index)
            case = cases[ci]
            assert s["case"] == case.case_id
            t = again[index]  # the same draw in another dataset object: the same sample
            assert torch.equal(s["image"], t["image"]) and torch.equal(s["label"], t["label"])
            slice_shape = case.shape[1:]
            k = slice_shape if size is None else size
            assert s["image"].shape == (1, *k) and s["image"].dtype == torch.float32
            assert s["label"].shape == tuple(k) and s["label"].dtype == torch.int64
            # The tumour constraint as documented (the other kind is used when one kind is missing).
            if tumour_prob is None or not (any_pos or any_neg):
                assert want is None
            elif not any_pos:
                assert want is False
            elif not any_neg:
                assert want is True
            if want is not None:
                assert (case.tumour_per_slice[z] > 0) == want
                if not want or fit == "crop" or size is None:  # resizing may shrink a tumour away (not promised)
                    assert bool((s["label"] == 2).any()) == want  # a tumour crop keeps a tumour pixel
            if fit == "resize" and size is not None:
                check_resized(s, np.asarray(case.image[z]), np.asarray(case.label[z]), size)
                continue
            image, label = s["image"][0].numpy()[None], s["label"].numpy()[None]  # as (1, H, W) blocks
            starts = window_start_of(image, case)
            assert starts[0] == z  # the drawn slice, found among all the case's slices
            assert all(allowed_start(t_, n, kk) for t_, n, kk in zip(starts[1:], slice_shape, k, strict=True))
            check_window(image, label, case, starts, symmetric)


def check_resized(s: dict[str, torch.Tensor], image: np.ndarray, label: np.ndarray, size: Sequence[int]) -> None:
    """Bilinear with half-pixel centres (align_corners=False) for the image; nearest-exact (floor) for the label."""
    np.testing.assert_allclose(s["image"][0].numpy(), ref_linear(image, size), rtol=0, atol=1e-5)
    got = s["label"].numpy()
    cands = []
    for n, m in zip(image.shape, size, strict=True):
        src = (np.arange(m) + 0.5) * n / m
        near = np.abs(src - np.rint(src)) < 1e-4  # at an integer: float rounding may land either side
        a = np.clip(np.where(near, np.rint(src) - 1, np.floor(src)), 0, n - 1).astype(int)
        b = np.clip(np.where(near, np.rint(src), np.floor(src)), 0, n - 1).astype(int)
        cands.append((a, b))
    assert matches_nearest(got, label.astype(np.int64), cands).all()


@_grid(50)
@given(
    seed=SEEDS,
    n_cases=st.integers(1, 3),
    patch=st.tuples(st.integers(1, 10), st.integers(1, 16), st.integers(1, 16)),
    tumour_prob=st.sampled_from(TUMOUR_PROBS),
    symmetric=st.booleans(),
)
def test_patch_dataset_items(
    seed: int, n_cases: int, patch: tuple[int, int, int], tumour_prob: float | None, symmetric: bool
) -> None:
    """Each item is a window of one case at an allowed start, label in register; tumour_prob=1 always has tumour."""
    with scratch() as root:
        rng = np.random.default_rng(seed)
        cases = sampling_cases(rng, root, n_cases, symmetric, int(rng.choice([2, 10000])))
        by_id = {c.case_id: c for c in cases}
        ds = PatchDataset(cases, patch, tumour_prob=tumour_prob, seed=seed % 1000)
        again = PatchDataset(cases, patch, tumour_prob=tumour_prob, seed=seed % 1000)
        for index in [*range(10), *rng.integers(0, 10**9, 5).tolist()]:
            s = ds[index]
            t = again[index]
            assert torch.equal(s["image"], t["image"]) and torch.equal(s["label"], t["label"])
            assert s["image"].shape == (1, *patch) and s["image"].dtype == torch.float32
            assert s["label"].shape == patch and s["label"].dtype == torch.int64
            case = by_id[s["case"]]
            image, label = s["image"][0].numpy(), s["label"].numpy()
            starts = window_start_of(image, case)
            assert all(allowed_start(t_, n, k) for t_, n, k in zip(starts, case.shape, patch, strict=True))
            check_window(image, label, case, starts, symmetric)
            if tumour_prob == 1.0 and any(c.has_tumour for c in cases):
                assert case.has_tumour and (s["label"] == 2).any()


@_grid(20)
@given(
    seed=SEEDS,
    tumour_prob=st.sampled_from([0.0, 0.2, 0.5, 0.8, 1.0]),
    patches=st.booleans(),
)
def test_tumour_rate(seed: int, tumour_prob: float, patches: bool) -> None:
    """The share of samples holding tumour is tumour_prob (slices: exactly per draw; patches: at least that)."""
    with scratch() as root:
        rng = np.random.default_rng(seed)
        cases = sampling_cases(rng, root, 3, False, 10000)
        has_pos = any(c.has_tumour for c in cases)
        has_neg = any((c.tumour_per_slice == 0).any() for c in cases)
        n = 300
        if patches:
            ds = PatchDataset(cases, (2, 6, 6), tumour_prob=tumour_prob, seed=1)
        else:
            ds = SliceDataset(cases, (6, 6), tumour_prob=tumour_prob, seed=1)
        rate = float(np.mean([bool((ds[i]["label"] == 2).any()) for i in range(n)]))
        expected = tumour_prob if has_pos and has_neg else float(has_pos and not has_neg)
        tol = 4.5 * math.sqrt(tumour_prob * (1 - tumour_prob) / n) + 1e-9
        if patches:
            # Tumour-free draws reject windows with tumour only max_tries times (documented): a lower bound.
            if has_pos:
                assert rate >= tumour_prob - tol, (rate, tumour_prob)
        else:
            assert abs(rate - expected) <= tol, (rate, expected)


def within_binomial(count: int, n: int, p: float) -> bool:
    # 6 sigma: up to ~80 comparisons per example, thousands of examples in a long hunt, no false alarm.
    return abs(count - n * p) <= 6 * math.sqrt(n * p * (1 - p)) + 1


@_grid(15)
@given(seed=SEEDS, tumour_prob=st.sampled_from([None, 0.3, 0.5]))
def test_slice_draws_are_uniform(seed: int, tumour_prob: float | None) -> None:
    """Within each kind (tumour / tumour-free / unconstrained) the case is uniform among the cases that have one,
    then the slice uniform among that case's slices of the kind (sampling.py's module docstring)."""
    with scratch() as root:
        rng = np.random.default_rng(seed)
        cases = sampling_cases(rng, root, int(rng.integers(1, 4)), False, 10000)
        ds = SliceDataset(cases, None, tumour_prob=tumour_prob, seed=seed % 1000)
        draws = [ds.draw(i)[:3] for i in range(1500)]
        for kind in {w for _, _, w in draws}:
            mine = [(ci, z) for ci, z, w in draws if w is kind]

            def eligible(c: CachedCase, kind: bool | None = kind) -> np.ndarray:
                every = np.arange(c.shape[0])
                return every if kind is None else every[(c.tumour_per_slice > 0) == kind]

            pool = [ci for ci, c in enumerate(cases) if len(eligible(c))]
            for ci in range(len(cases)):
                n_case = sum(1 for c, _ in mine if c == ci)
                if ci not in pool:
                    assert n_case == 0
                    continue
                assert within_binomial(n_case, len(mine), 1 / len(pool)), (ci, n_case, len(mine), len(pool))
                slices = eligible(cases[ci])
                for z in range(cases[ci].shape[0]):
                    n_slice = sum(1 for c, zz in mine if c == ci and zz == z)
                    if z not in slices:
                        assert n_slice == 0
                    else:
                        assert within_binomial(n_slice, n_case, 1 / len(slices)), (ci, z, n_slice, n_case)


@_grid(200)
@given(
    seed=SEEDS,
    shape=st.one_of(st.tuples(st.integers(2, 7), st.integers(2, 7)), st.tuples(*[st.integers(2, 6)] * 3)),
    flip_prob=st.sampled_from([0.0, 0.5, 1.0]),
    scale=st.sampled_from([0.0, 0.1, 0.3]),
    shift=st.sampled_from([0.0, 0.1, 0.5]),
)
def test_flip_intensity_augment(
    seed: int, shape: tuple[int, ...], flip_prob: float, scale: float, shift: float
) -> None:
    """Image and label flip along the same axes; intensity becomes a x + b, a in 1 +- scale, b in +- shift."""
    g = np.random.default_rng(seed)
    # Gaussian values: no flip of them is an affine function of another flip (a permutation's could be).
    image = torch.from_numpy(g.standard_normal((1, *shape)).astype(np.float32) + 3)
    label = torch.from_numpy(g.integers(0, 3, shape))
    sample = {"image": image, "label": label, "case": "c"}
    aug = flip_intensity_augment(flip_prob=flip_prob, scale=scale, shift=shift)
    out = aug(dict(sample), np.random.default_rng(seed + 1))
    again = aug(dict(sample), np.random.default_rng(seed + 1))
    assert torch.equal(out["image"], again["image"]) and torch.equal(out["label"], again["label"])
    assert out["image"].shape == image.shape and out["label"].shape == label.shape
    x = out["image"][0].double().numpy()
    fits = []
    for r in range(len(shape) + 1):
        for dims in itertools.combinations(range(len(shape)), r):
            src = np.flip(image[0].double().numpy(), dims) if dims else image[0].double().numpy()
            a, b = np.polyfit(src.ravel(), x.ravel(), 1)
            if np.allclose(src * a + b, x, rtol=0, atol=1e-4):
                fits.append((dims, a, b))
    assert len(fits) == 1, fits  # one flip explains the image
    dims, a, b = fits[0]
    assert torch.equal(out["label"], label.flip(list(dims)) if dims else label)
    assert 1 - scale - 1e-6 <= a <= 1 + scale + 1e-6 and -shift - 1e-5 <= b <= shift + 1e-5
    if flip_prob == 0.0:
        assert dims == ()
    if flip_prob == 1.0:
        assert dims == tuple(range(len(shape)))
    noisy = flip_intensity_augment(flip_prob=flip_prob, scale=scale, shift=shift, noise=0.05)
    n1 = noisy(dict(sample), np.random.default_rng(seed + 1))
    assert torch.equal(n1["image"], noisy(dict(sample), np.random.default_rng(seed + 1))["image"])
    assert any(
        torch.equal(n1["label"], label.flip(list(dims)))
        for r in range(len(shape) + 1)
        for dims in itertools.combinations(range(len(shape)), r)
    )


# ------------------------------------------------------------------------------------------ split


@st.composite
def id_sets(draw: st.DrawFn) -> tuple[list[str], dict[str, str] | None, int]:
    seed = draw(SEEDS)
    rng = np.random.default_rng(seed)
    n = draw(st.integers(1, 40))
    ids = [f"case-{k}" for k in rng.choice(1000, n, replace=False)]
    groups = None
    if draw(st.booleans()):
        # Several scans per patient: patient p owns a random share.
        n_patients = int(rng.integers(1, n + 1))
        groups = {c: f"patient-{int(rng.integers(n_patients))}" for c in ids}
    return ids, groups, seed


def patients_of(ids: Sequence[str], groups: dict[str, str] | None) -> set[str]:
    return {(groups or {}).get(c, c) for c in ids}


@_grid(200)
@given(
    data=id_sets(),
    folds=st.integers(2, 6),
    test_fraction=st.sampled_from([0.0, 0.1, 0.2, 0.5, 0.9]),
)
def test_folds_partition(data: tuple[list[str], dict[str, str] | None, int], folds: int, test_fraction: float) -> None:
    """Test set + folds partition the cases by whole patients; fold sizes differ by at most one patient."""
    ids, groups, seed = data
    split_seed = seed % 7
    res = make_folds(ids, folds, test_fraction, split_seed, groups)
    assert res == make_folds(list(reversed(ids)), folds, test_fraction, split_seed, groups)
    parts = [res["test"], *res["folds"]]
    assert len(res["folds"]) == folds
    named = [c for p in parts for c in p]
    assert sorted(named) == sorted(ids) and len(named) == len(set(named))
    assert all(p == sorted(p) for p in parts)
    owners = [patients_of(p, groups) for p in parts]
    for a, b in itertools.combinations(owners, 2):
        assert not a & b  # a patient's scans all land in one part
    n = len(patients_of(ids, groups))
    n_test = round(n * test_fraction)
    if test_fraction > 0 and n >= 2:
        n_test = min(max(n_test, 1), n - 1)
    assert len(owners[0]) == n_test
    sizes = [len(o) for o in owners[1:]]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == n - n_test
    for fold in [*range(folds), "all"]:
        if fold != "all" and min(sizes) == 0:
            with pytest.raises(DataError, match="cannot be cut into"):
                make_fold_split(ids, fold, folds, test_fraction, split_seed, groups)
            continue
        fs = make_fold_split(ids, fold, folds, test_fraction, split_seed, groups)
        if fold in (0, "all"):
            with scratch() as root:  # the split file hands back what it wrote, for a fold as well
                args = (root / "split.json", ids, (1 - test_fraction, 0.0, test_fraction), split_seed, groups)
                assert load_or_create_split(*args, fold=fold, folds=folds) == fs
                assert load_or_create_split(*args, fold=fold, folds=folds) == fs
        assert fs["test"] == res["test"]
        val = [] if fold == "all" else res["folds"][fold]
        assert fs["val"] == val
        assert fs["train"] == sorted(c for k, p in enumerate(res["folds"]) if k != fold for c in p)


@_grid(200)
@given(
    data=id_sets(),
    fractions=st.sampled_from(
        [(0.7, 0.1, 0.2), (0.5, 0.25, 0.25), (1.0, 0.0, 0.0), (0.8, 0.0, 0.2), (0.34, 0.33, 0.33)]
    ),
)
def test_make_split_partition(
    data: tuple[list[str], dict[str, str] | None, int], fractions: tuple[float, float, float]
) -> None:
    """train / val / test partition whole patients, sized by the fractions; the split file returns the same."""
    ids, groups, seed = data
    res = make_split(ids, fractions, seed % 7, groups)
    assert res == make_split(list(reversed(ids)), fractions, seed % 7, groups)
    parts = [res[k] for k in ("train", "val", "test")]
    named = [c for p in parts for c in p]
    assert sorted(named) == sorted(ids) and len(named) == len(set(named))
    owners = [patients_of(p, groups) for p in parts]
    for a, b in itertools.combinations(owners, 2):
        assert not a & b
    n = len(patients_of(ids, groups))
    counts = [len(o) for o in owners]
    nonzero = sum(f > 0 for f in fractions)
    for f, c in zip(fractions, counts, strict=True):
        if f == 0:
            assert c == 0
        elif n >= nonzero:
            assert c >= 1  # documented: every non-zero fraction gets a patient when there are enough
    rounded = [round(n * f) for f in fractions[1:]]
    if all(r >= 1 or f == 0 for r, f in zip(rounded, fractions[1:], strict=True)) and sum(rounded) <= n - 1:
        assert counts[1:] == rounded  # no adjustment needed: val and test are the rounded shares
    if fractions[0] > 0:
        assert counts[0] >= 1  # documented: train keeps at least one patient
    with scratch() as root:
        path = root / "split.json"
        assert load_or_create_split(path, ids, fractions, seed % 7, groups) == res  # written
        assert load_or_create_split(path, ids, fractions, seed % 7, groups) == res  # read back
