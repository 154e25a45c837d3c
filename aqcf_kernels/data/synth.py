"""Synthetic abdominal CT/MRI phantoms with liver and tumour labels, written in the real datasets' layouts.

The real LiTS and ATLAS data cannot be downloaded here, so the pipeline is exercised end to end on
these. Each case is a 3D volume (defined in RAS, then stored in the requested orientation) with:

- a body (elliptic cross-section with a subcutaneous fat ring) in air, a vertebral body, the aorta,
  spleen, kidneys and a bowel gas pocket as distractors (same intensity range as liver or tumour);
- an irregular liver: an ellipsoid whose surface is deformed by low-frequency noise (label 1);
- 1-3 irregular tumours inside the liver (label 2; radius about 22-42% (CT) or 32-50% (MRI) of the
  liver's, i.e. several voxels and slices at the default shapes), or none for a ``no_tumour_frac``
  share of cases (LiTS has ~10%).

CT (HU, int16): air -1000, fat -100, soft tissue 45, bone 700, liver 95-120 (spleen similar),
hypodense tumours 45-65 HU below the liver (so close to soft tissue: not separable by a threshold),
correlated noise of 8-14 HU, a mild texture, partial-volume blur. Spacing ~0.77 x 0.77 x 1 mm.

MRI (T1 contrast-enhanced-like, int16, arbitrary units): fat bright, liver mid-grey, tumours
hyperintense (1.4-1.8x liver), Rician noise, a smooth multiplicative bias field (about +-20%) and a
random global scale (200-3000). Spacing ~1 x 1 x 3 mm.

Contrast is several times the noise, so a small U-Net learns the tumours quickly, while noise, bias
field and distractor organs keep a global threshold from working. Default shapes are small
(CT 96 x 96 x 48, MRI 80 x 80 x 24) so that tests and the CPU demo are fast.

Command line: ``aqcf-synth OUT --layout lits|atlas|msd|nnunet --cases N [--seed S] [--shape X Y Z]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np
from nibabel import orientations as nio
from scipy import ndimage

from .outputs import check_output_dir

__all__ = ["DEFAULT_SHAPE", "DEFAULT_SPACING", "Phantom", "main", "make_phantom", "write_dataset"]

Modality = Literal["ct", "mri"]

DEFAULT_SHAPE: dict[str, tuple[int, int, int]] = {"ct": (96, 96, 48), "mri": (80, 80, 24)}
DEFAULT_SPACING: dict[str, tuple[float, float, float]] = {"ct": (0.77, 0.77, 1.0), "mri": (1.0, 1.0, 3.0)}
#: Default modality and on-disk orientation per layout. LiTS volumes are mostly stored LPS-like
#: (DICOM-derived), which makes the reader's reorientation to RAS matter in the demo.
LAYOUT_DEFAULTS: dict[str, tuple[Modality, str]] = {
    "lits": ("ct", "LPS"),
    "atlas": ("mri", "RAS"),
    "msd": ("ct", "RAS"),
    "nnunet": ("ct", "RAS"),
}

# Tissue intensities: CT in HU; MRI in arbitrary units before bias field and global scale.
_CT = {"air": -1000.0, "fat": -100.0, "soft": 45.0, "bone": 700.0, "aorta": 170.0, "kidney": 180.0, "gas": -900.0}
_MRI = {"air": 0.0, "fat": 0.95, "soft": 0.35, "bone": 0.2, "aorta": 0.8, "kidney": 0.6, "gas": 0.02}


@dataclass
class Phantom:
    """One synthetic case in RAS: ``image`` (float32, HU for CT) and ``label`` (uint8) indexed (x, y, z)."""

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    modality: Modality
    n_tumours: int


def _smooth_field(rng: np.random.Generator, shape: Sequence[int], cells: Sequence[int]) -> np.ndarray:
    """Zero-mean, unit-std noise with about ``cells`` oscillations per axis: a cubic-spline-upsampled coarse grid.

    The upsampling is done one axis at a time as a matrix product (the 1D spline-zoom operator applied
    to an identity matrix): the same result as a 3D ``ndimage.zoom`` at a fraction of its cost.
    """
    f = rng.standard_normal([c + 3 for c in cells])
    for axis, n in enumerate(shape):
        k = f.shape[axis]
        basis = ndimage.zoom(np.eye(k), (n / k, 1), order=3, mode="nearest", grid_mode=True)[:n]  # (n, k)
        f = np.moveaxis(np.tensordot(basis, f, axes=(1, axis)), 0, axis)
    return ((f - f.mean()) / (f.std() + 1e-12)).astype(np.float32)


def _ellipsoid(grid, centre, semi, field=None, amp=0.0) -> np.ndarray:
    r2 = sum(((g - c) / a) ** 2 for g, c, a in zip(grid, centre, semi, strict=True))
    if field is None:
        return r2 < 1.0
    return np.sqrt(r2) < 1.0 + amp * field


def make_phantom(
    modality: Modality = "ct",
    *,
    seed: int | Sequence[int] | np.random.Generator = 0,
    shape: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
    n_tumours: int | None = None,
    jitter_spacing: bool = True,
) -> Phantom:
    """One random phantom in RAS orientation (see the module docstring for what it contains).

    ``n_tumours=None`` draws 1-3. ``spacing`` defaults to the modality's typical spacing, jittered by
    up to +-10% per case unless ``jitter_spacing=False``.
    """
    if modality not in ("ct", "mri"):
        raise ValueError(f"modality must be 'ct' or 'mri', got {modality!r}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    shape = tuple(int(n) for n in (shape or DEFAULT_SHAPE[modality]))
    if len(shape) != 3 or min(shape) < 4:
        raise ValueError(f"shape must be 3 sizes of at least 4, got {shape}")
    sp = np.array(spacing or DEFAULT_SPACING[modality], dtype=float)
    if jitter_spacing and spacing is None:
        sp = sp * rng.uniform(0.9, 1.1, 3)
        sp[1] = sp[0]  # in-plane pixels are square in both datasets
    # Normalised coordinates in [-1, 1] across the field of view, broadcastable (x, y, z).
    grid = [
        np.linspace(-1, 1, n, dtype=np.float32).reshape([-1 if a == i else 1 for a in range(3)])
        for i, n in enumerate(shape)
    ]
    x, y, z = grid
    T = _CT if modality == "ct" else _MRI

    # Body and fixed anatomy. The body is a slightly wobbly elliptic cylinder along z.
    body_field = _smooth_field(rng, shape, (3, 3, 1))
    rb = np.sqrt((x / 0.88) ** 2 + (y / 0.7) ** 2) / (1 + 0.03 * body_field)
    body = rb < 1.0
    image = np.full(shape, T["air"], np.float32)
    image[body] = T["fat"]
    image[rb < 0.9] = T["soft"]
    zc = float(rng.uniform(-0.1, 0.1))
    organs = [
        ("gas", _ellipsoid(grid, (-0.3, 0.35, zc - 0.2), (0.12, 0.1, 0.25))),
        ("bone", (x / 0.11) ** 2 + ((y + 0.5) / 0.1) ** 2 < 1.0),
        ("aorta", ((x + 0.12) / 0.06) ** 2 + ((y + 0.3) / 0.06) ** 2 < 1.0),
        ("kidney", _ellipsoid(grid, (0.4, -0.42, zc - 0.4), (0.1, 0.13, 0.3))),
        ("kidney", _ellipsoid(grid, (-0.4, -0.42, zc - 0.35), (0.1, 0.13, 0.3))),
    ]
    for name, mask in organs:
        image[mask & body] = T[name]

    # Liver (patient's right = +x in RAS, anterior = +y) and a spleen of similar brightness opposite.
    if modality == "ct":
        liver_val = float(rng.uniform(95, 120))
        spleen_val = liver_val + float(rng.uniform(-15, 5))
        tumour_val = liver_val - float(rng.uniform(45, 65))
    else:
        liver_val = 0.55 * float(rng.uniform(0.9, 1.1))
        spleen_val = liver_val * float(rng.uniform(0.85, 0.95))
        tumour_val = liver_val * float(rng.uniform(1.4, 1.8))
    image[_ellipsoid(grid, (-0.5, -0.15, zc + 0.1), (0.16, 0.22, 0.35)) & body] = spleen_val
    lc = np.array([0.35 + rng.uniform(-0.05, 0.05), 0.05 + rng.uniform(-0.05, 0.05), zc])
    la = np.array([0.42, 0.36, 0.65]) * rng.uniform(0.9, 1.1, 3)
    liver = _ellipsoid(grid, lc, la, _smooth_field(rng, shape, (3, 3, 2)), amp=0.15) & body
    image[liver] = liver_val
    label = liver.astype(np.uint8)

    # Tumours: irregular blobs centred in the liver's interior, clipped to the liver.
    count = int(rng.integers(1, 4)) if n_tumours is None else int(n_tumours)
    # MRI slices are 3 mm: somewhat larger tumours keep them several slices thick.
    tumour_scale = (0.22, 0.42) if modality == "ct" else (0.32, 0.5)
    placed = 0
    interior = np.argwhere(_ellipsoid(grid, lc, la * 0.5) & liver)  # centres well inside: mostly intra-hepatic
    for _ in range(count):
        if len(interior) == 0:
            break
        for _attempt in range(10):
            c = interior[rng.integers(len(interior))]
            centre = [float(g.reshape(-1)[i]) for g, i in zip(grid, c, strict=True)]
            semi = la * rng.uniform(*tumour_scale) * rng.uniform(0.85, 1.15, 3)
            blob = _ellipsoid(grid, centre, semi, _smooth_field(rng, shape, (4, 4, 3)), amp=0.2) & liver
            if blob.sum() >= 8:  # tiny shapes can make a blob vanish: retry rather than a 1-voxel "tumour"
                image[blob] = tumour_val
                label[blob] = 2
                placed += 1
                break

    # Texture, partial-volume blur, then noise (after the blur: scanner noise is not blurred away).
    if modality == "ct":
        image += 6.0 * _smooth_field(rng, shape, (12, 12, 6))
        image = ndimage.gaussian_filter(image, (0.6, 0.6, 0.4))
        noise = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 0.5)
        image += float(rng.uniform(8, 14)) * noise / noise.std()
    else:
        image *= 1 + 0.05 * _smooth_field(rng, shape, (12, 12, 6))
        image = ndimage.gaussian_filter(image, (0.6, 0.6, 0.3))
        sigma = float(rng.uniform(0.02, 0.035))
        n1, n2 = rng.standard_normal((2, *shape)).astype(np.float32) * sigma
        image = np.sqrt((image + n1) ** 2 + n2**2)  # magnitude image: Rician noise
        image *= np.exp(0.2 * _smooth_field(rng, shape, (2, 2, 1)))  # receive-coil bias field
        image *= float(np.exp(rng.uniform(np.log(200), np.log(3000))))  # arbitrary scanner scale
    affine = np.diag([*sp, 1.0])
    affine[:3, 3] = -(np.array(shape) - 1) / 2 * sp  # field of view centred on the scanner origin
    return Phantom(image.astype(np.float32), label, affine, modality, placed)


# -------------------------------------------------------------------------------------------- writing


def _reorient(data: np.ndarray, affine: np.ndarray, axcodes: str) -> tuple[np.ndarray, np.ndarray]:
    """RAS array + affine -> the same image stored in ``axcodes`` orientation (e.g. 'LPS')."""
    ornt = nio.ornt_transform(nio.axcodes2ornt("RAS"), nio.axcodes2ornt(tuple(axcodes)))
    return nio.apply_orientation(data, ornt), affine @ nio.inv_ornt_aff(ornt, data.shape)


def _save(data: np.ndarray, affine: np.ndarray, path: Path, junk: bool, rng: np.random.Generator) -> None:
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)
    if junk:
        # macOS AppleDouble companion ("._name", magic 0x00051607), as found in the MSD archives.
        (path.parent / f"._{path.name}").write_bytes(b"\x00\x05\x16\x07" + rng.bytes(4092))


def _to_disk(ph: Phantom) -> tuple[np.ndarray, np.ndarray]:
    if ph.modality == "ct":
        image = np.clip(np.rint(ph.image), -1024, 3071).astype(np.int16)
    else:
        image = np.clip(np.rint(ph.image), 0, 32767).astype(np.int16)
    return image, ph.label.astype(np.uint8)


#: The smallest phantom side that still holds a liver voxel (see :func:`make_phantom`).
MIN_SIDE = 4
#: Each stored axis is one of these pairs, each pair used once (nibabel's axis codes).
_AXIS_PAIRS = ("RL", "AP", "SI")


def check_arguments(
    layout: str,
    cases: int,
    shape: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
    no_tumour_frac: float = 0.0,
    orientation: str | None = None,
) -> None:
    """Refuse bad :func:`write_dataset` arguments before anything is written, with a ValueError of one
    line naming the ``aqcf-synth`` option (the keyword of the same name, dashed)."""
    if layout not in LAYOUT_DEFAULTS:
        raise ValueError(f"--layout must be one of {', '.join(sorted(LAYOUT_DEFAULTS))}, got {layout!r}")
    if isinstance(cases, bool) or not isinstance(cases, int) or cases < 1:
        raise ValueError(f"--cases must be at least 1, got {cases!r}")
    if shape is not None and (len(shape) != 3 or any(int(n) < MIN_SIDE for n in shape)):
        raise ValueError(f"--shape must be 3 sizes of at least {MIN_SIDE} voxels, got {' '.join(map(str, shape))}")
    if spacing is not None and (len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing)):
        # nibabel would otherwise fail on a singular affine with a matrix dump
        raise ValueError(f"--spacing must be 3 positive sizes in mm, got {' '.join(map(str, spacing))}")
    if not 0 <= no_tumour_frac <= 1:  # also False for NaN
        raise ValueError(f"--no-tumour-frac must be in [0, 1], got {no_tumour_frac}")
    if orientation is not None:
        codes = orientation.upper()
        pairs = sorted(next((i for i, pair in enumerate(_AXIS_PAIRS) if c in pair), -1) for c in codes)
        if len(codes) != 3 or pairs != [0, 1, 2]:
            raise ValueError(
                f"--orientation {orientation!r}: expected 3 axis codes, one of R/L, one of A/P and one of S/I "
                "(e.g. RAS, LPS)"
            )


def write_dataset(
    out: str | os.PathLike,
    layout: str,
    cases: int,
    *,
    seed: int = 0,
    modality: Modality | None = None,
    shape: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
    no_tumour_frac: float = 0.0,
    orientation: str | None = None,
    macos_junk: bool = False,
    progress: bool | None = None,
) -> Path:
    """Write ``cases`` phantoms under ``out`` in ``layout``; return the dataset folder.

    Layouts (N = 0, 1, ...):

    - ``lits``: ``out/Training Batch 1/volume-N.nii`` + ``segmentation-N.nii`` (uncompressed; N >= 28
      in ``Training Batch 2`` as in the real release), stored LPS by default;
    - ``atlas``: ``out/train/imagesTr/imN.nii.gz`` + ``out/train/labelsTr/lbN.nii.gz``;
    - ``msd``: ``out/Task03_Liver/{dataset.json, imagesTr/liver_N.nii.gz, labelsTr/liver_N.nii.gz}``;
    - ``nnunet``: ``out/Dataset003_Liver/{dataset.json, imagesTr/liver_N_0000.nii.gz, labelsTr/liver_N.nii.gz}``.

    Case i only depends on ``(seed, i)``, so more cases extend a dataset without changing the first ones.
    """
    from tqdm.auto import tqdm

    check_arguments(layout, cases, shape, spacing, no_tumour_frac, orientation)
    default_modality, default_orientation = LAYOUT_DEFAULTS[layout]
    modality = modality or default_modality
    axcodes = (orientation or default_orientation).upper()
    out = check_output_dir(out, "OUT")  # before the first case: a file in the way is named, not a traceback
    root = {"lits": out, "atlas": out / "train", "msd": out / "Task03_Liver", "nnunet": out / "Dataset003_Liver"}[
        layout
    ]
    check_output_dir(root, "OUT")
    ext = ".nii" if layout == "lits" else ".nii.gz"
    training = []
    bar = tqdm(
        range(cases), desc=f"aqcf-synth {layout}", unit="case", disable=None if progress is None else not progress
    )
    for i in bar:
        rng = np.random.default_rng([seed, i])
        n_tumours = 0 if rng.random() < no_tumour_frac else None
        ph = make_phantom(modality, seed=rng, shape=shape, spacing=spacing, n_tumours=n_tumours)
        image, label = _to_disk(ph)
        image, affine = _reorient(image, ph.affine, axcodes)
        label, _ = _reorient(label, ph.affine, axcodes)
        if layout == "lits":
            folder = root / ("Training Batch 1" if i < 28 else "Training Batch 2")
            im_path, lb_path = folder / f"volume-{i}{ext}", folder / f"segmentation-{i}{ext}"
        elif layout == "atlas":
            im_path, lb_path = root / "imagesTr" / f"im{i}{ext}", root / "labelsTr" / f"lb{i}{ext}"
        elif layout == "msd":
            im_path, lb_path = root / "imagesTr" / f"liver_{i}{ext}", root / "labelsTr" / f"liver_{i}{ext}"
        else:
            im_path, lb_path = root / "imagesTr" / f"liver_{i}_0000{ext}", root / "labelsTr" / f"liver_{i}{ext}"
        _save(image, affine, im_path, macos_junk, rng)
        _save(label, affine, lb_path, macos_junk, rng)
        training.append({"image": f"./imagesTr/liver_{i}{ext}", "label": f"./labelsTr/liver_{i}{ext}"})
    channel = "CT" if modality == "ct" else "MRI"
    if layout == "msd":
        meta = {
            "name": "Liver",
            "description": "Synthetic liver/tumour phantoms (aqcf-synth) in the MSD Task03_Liver layout",
            "reference": "aqcf_kernels.data.synth",
            "licence": "CC-BY-SA 4.0",
            "release": "synthetic",
            "tensorImageSize": "3D",
            "modality": {"0": channel},
            "labels": {"0": "background", "1": "liver", "2": "cancer"},
            "numTraining": cases,
            "numTest": 0,
            "training": training,
            "test": [],
        }
        (root / "dataset.json").write_text(json.dumps(meta, indent=4))
    elif layout == "nnunet":
        meta = {
            "channel_names": {"0": channel},
            "labels": {"background": 0, "liver": 1, "tumor": 2},
            "numTraining": cases,
            "file_ending": ext,
            "name": "Liver",
            "description": "Synthetic liver/tumour phantoms (aqcf-synth) in the nnU-Net v2 raw layout",
        }
        (root / "dataset.json").write_text(json.dumps(meta, indent=4))
    return root


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="aqcf-synth",
        description="Write synthetic liver/tumour CT or MRI phantoms in a public dataset's on-disk layout.",
    )
    p.add_argument(
        "out", type=Path, metavar="OUT", help="output folder (created; existing files of the same name are replaced)"
    )
    p.add_argument("--layout", required=True, choices=sorted(LAYOUT_DEFAULTS), help="on-disk layout to write")
    p.add_argument("--cases", type=int, required=True, help="number of cases")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0; case i depends only on seed and i)")
    p.add_argument("--modality", choices=["ct", "mri"], help="default: ct for lits/msd/nnunet, mri for atlas")
    p.add_argument("--shape", type=int, nargs=3, metavar=("X", "Y", "Z"), help="default: 96 96 48 (CT), 80 80 24 (MRI)")
    p.add_argument(
        "--spacing", type=float, nargs=3, metavar=("X", "Y", "Z"), help="mm; default ~0.77 0.77 1 (CT), ~1 1 3 (MRI)"
    )
    p.add_argument(
        "--no-tumour-frac",
        type=float,
        default=0.0,
        help="share of cases without tumour, 0 to 1 (default 0; LiTS: ~0.1)",
    )
    p.add_argument("--orientation", help="stored axis codes, e.g. RAS or LPS (default: LPS for lits, RAS otherwise)")
    p.add_argument("--macos-junk", action="store_true", help="also write '._*' AppleDouble files, as in MSD archives")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no summary line")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``aqcf-synth`` console script; returns the exit status (2 on a user-facing error,
    130 on Ctrl-C)."""
    args = _parser().parse_args(argv)
    try:
        root = write_dataset(
            args.out,
            args.layout,
            args.cases,
            seed=args.seed,
            modality=args.modality,
            shape=args.shape,
            spacing=args.spacing,
            no_tumour_frac=args.no_tumour_frac,
            orientation=args.orientation,
            macos_junk=args.macos_junk,
            progress=False if args.quiet else None,
        )
    except KeyboardInterrupt:
        print(f"aqcf-synth: interrupted; the cases written so far are in {args.out}", file=sys.stderr, flush=True)
        return 130
    except ValueError as e:  # check_arguments, OutputError
        print(f"aqcf-synth: error: {e}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(f"wrote {args.cases} {args.layout} case(s) to {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
