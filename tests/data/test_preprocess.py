"""Preprocessing: RAS reorientation, intensity normalisation, crop, resampling, the cache, and bad data."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel import orientations as nio

from aqcf_kernels.data import (
    DataError,
    PreprocessConfig,
    find_cases,
    preprocess_case,
    restore_to_original,
    write_prediction,
)
from aqcf_kernels.data import preprocess as pp
from aqcf_kernels.data.synth import make_phantom

from .conftest import save_nifti

NONE = PreprocessConfig(crop="none")


def write_pair(root: Path, image: np.ndarray, label: np.ndarray, affine: np.ndarray, label_affine=None, mri=False):
    """One case in LiTS (CT, .nii) or ATLAS (MRI, .nii.gz) layout; returns its Case."""
    if mri:
        save_nifti(root / "imagesTr" / "im0.nii.gz", image, affine)
        save_nifti(root / "labelsTr" / "lb0.nii.gz", label, affine if label_affine is None else label_affine)
    else:
        save_nifti(root / "volume-0.nii", image, affine)
        save_nifti(root / "segmentation-0.nii", label, affine if label_affine is None else label_affine)
    (case,) = find_cases(root)
    return case


def stored(ph, axcodes: str):
    """The phantom's int16 image, label and affine as stored in ``axcodes`` orientation."""
    image = np.rint(ph.image).astype(np.int16)
    ornt = nio.ornt_transform(nio.axcodes2ornt("RAS"), nio.axcodes2ornt(tuple(axcodes)))
    affine = ph.affine @ nio.inv_ornt_aff(ornt, image.shape)
    return nio.apply_orientation(image, ornt), nio.apply_orientation(ph.label, ornt), affine


@pytest.fixture(scope="module")
def ct_phantom():
    return make_phantom("ct", seed=0, shape=(30, 24, 10))  # x != y != z so transposes show


def test_reorientation_to_ras(tmp_path, ct_phantom):
    ras_image, ras_label, ras_affine = stored(ct_phantom, "RAS")
    expected = np.clip((ras_image.astype(np.float32) + 200) / 450, 0, 1).transpose(2, 0, 1)
    for codes in ("RAS", "LPS", "PIL"):
        image, label, affine = stored(ct_phantom, codes)
        assert "".join(nib.aff2axcodes(affine)) == codes
        if codes != "RAS":
            assert not np.array_equal(image.shape, ras_image.shape) or not np.array_equal(image, ras_image)
        case = write_pair(tmp_path / codes, image, label, affine)
        c = preprocess_case(case, tmp_path / "cache", NONE)
        # The stored array comes back flipped/permuted to RAS: identical to the RAS-stored copy.
        np.testing.assert_allclose(c.image, expected, atol=1e-6)
        np.testing.assert_array_equal(c.label, ras_label.transpose(2, 0, 1))
        np.testing.assert_allclose(c.affine, ras_affine, atol=1e-4)
        assert c.meta["original"]["axcodes"] == codes
    # Explicitly: the x-flipped ("L") storage of a slice is mirrored back.
    lps, _, _ = stored(ct_phantom, "LPS")
    c = preprocess_case(find_cases(tmp_path / "LPS")[0], tmp_path / "cache", NONE)
    np.testing.assert_allclose(c.image[3], np.clip((lps[::-1, ::-1, 3] + 200.0) / 450, 0, 1), atol=1e-6)


def test_ct_window(tmp_path, ct_phantom):
    image, label, affine = stored(ct_phantom, "RAS")
    case = write_pair(tmp_path, image, label, affine)
    c = preprocess_case(case, tmp_path / "cache", NONE)
    hu = image.transpose(2, 0, 1)
    assert c.image.dtype == np.float32 and c.image.min() == 0 and c.image.max() == 1
    assert np.all(c.image[hu <= -200] == 0) and np.all(c.image[hu >= 250] == 1)
    inside = (hu > -200) & (hu < 250)
    np.testing.assert_allclose(c.image[inside], (hu[inside] + 200) / 450, atol=1e-6)
    assert c.pad_value == 0.0
    s = preprocess_case(case, tmp_path / "cache", PreprocessConfig(crop="none", ct_range="symmetric"))
    np.testing.assert_allclose(s.image, 2 * c.image - 1, atol=1e-6)
    assert s.pad_value == -1.0
    w = preprocess_case(case, tmp_path / "cache", PreprocessConfig(crop="none", ct_window=(0, 100)))
    np.testing.assert_allclose(
        w.image[inside & (hu > 0) & (hu < 100)], hu[inside & (hu > 0) & (hu < 100)] / 100, atol=1e-6
    )


def test_mri_zscore(tmp_path):
    ph = make_phantom("mri", seed=2, shape=(32, 32, 10))
    image, label, affine = stored(ph, "RAS")
    case = write_pair(tmp_path, image, label, affine, mri=True)
    assert case.modality == "mri"
    c = preprocess_case(case, tmp_path / "cache", PreprocessConfig(crop="none", mri_norm_region="all"))
    z = np.asarray(c.image, dtype=np.float64)
    lo, hi = np.percentile(image.astype(np.float64), [0.5, 99.5])
    clipped = np.clip(image.astype(np.float64), lo, hi)
    assert abs(z.mean()) < 1e-4 and abs(z.std() - 1) < 1e-4
    np.testing.assert_allclose(z.max(), (hi - clipped.mean()) / clipped.std(), rtol=1e-4)
    np.testing.assert_allclose(c.pad_value, z.min(), rtol=1e-5)
    # Default: statistics over the body only, so the air around it does not set the scale.
    b = preprocess_case(case, tmp_path / "cache", PreprocessConfig(crop="none"))
    assert b.meta["normalisation"]["kind"] == "zscore" and b.image.mean() < -0.1
    assert b.image[b.label > 0].mean() > 0  # liver/tumour brighter than the body average


def test_crop_keeps_labels(tmp_path, ct_phantom):
    image, label, affine = stored(ct_phantom, "LPS")
    case = write_pair(tmp_path, image, label, affine)
    body = preprocess_case(case, tmp_path / "cache", PreprocessConfig(crop_margin_mm=0))
    liver = preprocess_case(case, tmp_path / "cache", PreprocessConfig(crop="label", crop_margin_mm=0))
    full = np.prod(image.shape)
    assert np.prod(liver.shape) < np.prod(body.shape) < full
    for c in (body, liver):
        assert (c.label == 2).sum() == (label == 2).sum() and (c.label == 1).sum() == (label == 1).sum()
        assert c.tumour_per_slice.sum() == (label == 2).sum()
    # The margin is in mm: 10 mm at ~0.8 mm pixels adds up to ~13 voxels per side (clipped at the border).
    wide = preprocess_case(case, tmp_path / "cache", PreprocessConfig(crop="label", crop_margin_mm=10))
    assert all(w >= n for w, n in zip(wide.shape, liver.shape, strict=True))


def test_mri_body_crop_ignores_noise_in_air(tmp_path):
    # A phantom in a larger field of view whose air is Rician noise (as in real MRI): isolated bright
    # noise voxels must not stretch the body box to the whole field of view.
    ph = make_phantom("mri", seed=4, shape=(24, 24, 8))
    rng = np.random.default_rng(0)
    sigma = 0.06 * ph.image[ph.label == 1].mean()
    padded = np.pad(ph.image, ((16, 16), (16, 16), (0, 0)))
    noisy = np.sqrt((padded + rng.normal(0, sigma, padded.shape)) ** 2 + rng.normal(0, sigma, padded.shape) ** 2)
    label = np.pad(ph.label, ((16, 16), (16, 16), (0, 0)))
    case = write_pair(tmp_path, noisy.astype(np.float32), label, ph.affine, mri=True)
    c = preprocess_case(case, tmp_path / "cache", PreprocessConfig(crop_margin_mm=0))
    (x0, x1), (y0, y1), _ = c.meta["crop_box"]
    assert 12 <= x0 and x1 <= 44 and 12 <= y0 and y1 <= 44, c.meta["crop_box"]


def test_resampling(tmp_path, ct_phantom):
    image, label, affine = stored(ct_phantom, "LPS")
    case = write_pair(tmp_path, image, label, affine)
    native = preprocess_case(case, tmp_path / "cache", NONE)
    target = (1.5, 1.5, 2.0)
    c = preprocess_case(case, tmp_path / "cache", PreprocessConfig(crop="none", target_spacing=target))
    sx, sy, sz = ct_phantom.affine.diagonal()[:3]
    assert c.shape == tuple(
        round(n * s / t) for n, s, t in zip((10, 30, 24), (sz, sx, sy), (2.0, 1.5, 1.5), strict=True)
    )
    # Shapes are rounded, so the spacing reached is n * s / round(n * s / t), as in nnU-Net.
    np.testing.assert_allclose(
        c.spacing, [n * s / m for n, s, m in zip((10, 30, 24), (sz, sx, sy), c.shape, strict=True)], rtol=1e-6
    )
    np.testing.assert_allclose(np.sqrt((c.affine[:3, :3] ** 2).sum(0)), [c.spacing[1], c.spacing[2], c.spacing[0]])
    assert set(np.unique(c.label)) <= {0, 1, 2}
    vox = np.prod(c.spacing)
    liver_mm3 = (label > 0).sum() * np.prod(native.spacing)  # nearest resampling keeps volumes roughly
    assert abs((c.label > 0).sum() * vox - liver_mm3) < 0.25 * liver_mm3
    # Same field of view: the world position of the volume centre does not move.
    centre = lambda cc: cc.affine @ np.r_[(np.array(cc.shape)[[1, 2, 0]] - 1) / 2, 1]  # noqa: E731
    np.testing.assert_allclose(centre(c), centre(native), atol=1e-3)
    partial = preprocess_case(case, tmp_path / "cache", PreprocessConfig(crop="none", target_spacing=(None, None, 3)))
    assert partial.shape[1:] == native.shape[1:] and partial.shape[0] < native.shape[0]


def test_restore_and_write_prediction(tmp_path, ct_phantom):
    image, label, affine = stored(ct_phantom, "PIL")
    case = write_pair(tmp_path, image, label, affine)
    c = preprocess_case(case, tmp_path / "cache", PreprocessConfig(crop="label", crop_margin_mm=2))
    assert c.shape != image.shape
    np.testing.assert_array_equal(restore_to_original(np.asarray(c.label), c), label)
    out = write_prediction(c.label, c, tmp_path / "pred" / "lits-0.nii.gz")
    saved = nib.load(out)
    np.testing.assert_array_equal(np.asarray(saved.dataobj), label)
    np.testing.assert_allclose(saved.affine, affine, atol=1e-5)
    assert saved.get_data_dtype() == np.uint8
    r = preprocess_case(case, tmp_path / "cache", PreprocessConfig(target_spacing=(1.0, 1.0, 1.3)))
    back = restore_to_original(np.asarray(r.label), r)
    assert back.shape == label.shape
    inter = ((back > 0) & (label > 0)).sum()
    assert 2 * inter / ((back > 0).sum() + (label > 0).sum()) > 0.85
    with pytest.raises(ValueError, match="preprocessed shape"):
        restore_to_original(np.zeros((2, 2, 2)), r)


def test_cache_reuse_and_invalidation(tmp_path, ct_phantom, monkeypatch):
    image, label, affine = stored(ct_phantom, "RAS")
    case = write_pair(tmp_path / "raw", image, label, affine)
    first = preprocess_case(case, tmp_path / "cache")
    assert isinstance(first.image, np.memmap) and isinstance(first.label, np.memmap)
    real_compute = pp._compute
    calls = []
    monkeypatch.setattr(pp, "_compute", lambda *a: calls.append(a) or real_compute(*a))
    again = preprocess_case(case, tmp_path / "cache")
    assert again.directory == first.directory and not calls  # reused, nothing recomputed
    st = os.stat(case.image)
    os.utime(case.image, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the file changed
    touched = preprocess_case(case, tmp_path / "cache")
    assert touched.directory != first.directory and len(calls) == 1
    other = preprocess_case(case, tmp_path / "cache", PreprocessConfig(ct_window=(-100, 200)))
    assert other.directory not in (first.directory, touched.directory) and len(calls) == 2
    preprocess_case(case, tmp_path / "cache", PreprocessConfig(ct_window=(-100, 200)), force=True)
    assert len(calls) == 3
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".tmp")]
    # Pickling (DataLoader workers under spawn) carries the path, never the mapped arrays.
    blob = pickle.dumps(first)
    assert len(blob) < 20_000
    np.testing.assert_array_equal(pickle.loads(blob).image, first.image)


# ------------------------------------------------------------------------------------------ bad data


@pytest.fixture
def good(tmp_path, ct_phantom):
    image, label, affine = stored(ct_phantom, "RAS")
    return image, label, affine


def _expect(case, cache, match, named):
    with pytest.raises(DataError, match=match) as e:
        preprocess_case(case, cache)
    assert str(named) in str(e.value)
    assert "\n" not in str(e.value)  # the tools print it as their one-line error (nibabel's can span two)


def test_corrupt_gz_nifti(tmp_path):
    ph = make_phantom("mri", seed=0, shape=(16, 16, 6))
    image, label, affine = stored(ph, "RAS")
    case = write_pair(tmp_path, image, label, affine, mri=True)
    valid = case.image.read_bytes()
    case.image.write_bytes(np.random.default_rng(0).bytes(3000))  # garbage: not even gzip
    _expect(case, tmp_path / "cache", "unreadable NIfTI", case.image)
    case.image.write_bytes(valid[: len(valid) // 2])  # truncated download
    _expect(case, tmp_path / "cache", "unreadable NIfTI", case.image)


def test_truncated_uncompressed_nifti(tmp_path, good):
    case = write_pair(tmp_path, *good)
    data = case.label.read_bytes()
    case.label.write_bytes(data[: len(data) - 500])
    _expect(case, tmp_path / "cache", "unreadable NIfTI", case.label)


def test_shape_mismatch(tmp_path, good):
    image, label, affine = good
    case = write_pair(tmp_path, image, label[:, :, :-1], affine)
    _expect(case, tmp_path / "cache", r"label shape \(30, 24, 9\) does not match image .* \(30, 24, 10\)", case.label)


def test_affine_mismatch(tmp_path, good):
    image, label, affine = good
    shifted = affine.copy()
    shifted[0, 3] += 1.0
    case = write_pair(tmp_path, image, label, affine, label_affine=shifted)
    _expect(case, tmp_path / "cache", "label affine differs", case.label)
    c = preprocess_case(case, tmp_path / "cache", PreprocessConfig(affine_atol=None))  # check disabled
    assert c.shape
    tiny = affine.copy()
    tiny[0, 3] += 1e-5  # float32 header rounding is not a mismatch
    ok = write_pair(tmp_path / "tiny", image, label, affine, label_affine=tiny)
    assert preprocess_case(ok, tmp_path / "cache").shape


@pytest.mark.parametrize("bad_value", [3, 255, 1.5, -1])
def test_label_values_outside_0_1_2(tmp_path, good, bad_value):
    image, label, affine = good
    label = label.astype(np.float32 if isinstance(bad_value, float) or bad_value < 0 else np.uint8)
    label[5, 5, 7] = bad_value
    case = write_pair(tmp_path, image, label, affine)
    _expect(case, tmp_path / "cache", rf"label values outside \{{0, 1, 2\}} \(found {bad_value:g}\)", case.label)


def test_not_3d_and_non_finite(tmp_path, good):
    image, label, affine = good
    case = write_pair(tmp_path / "4d", np.stack([image, image], -1), label, affine)
    _expect(case, tmp_path / "cache", r"expected a 3D volume, got shape \(30, 24, 10, 2\)", case.image)
    nan = image.astype(np.float32)
    nan[1, 1, 1] = np.nan
    case = write_pair(tmp_path / "nan", nan, label, affine)
    _expect(case, tmp_path / "cache", "NaN", case.image)
    single = write_pair(tmp_path / "4d1", image[..., None], label, affine)  # (X, Y, Z, 1) is 3D
    assert preprocess_case(single, tmp_path / "cache").shape


@pytest.mark.parametrize("which", ["image", "label"])
def test_zero_size_volume_names_the_file(tmp_path, which):
    """A header declaring 0 voxels along an axis: a DataError naming the file (was an IndexError, or numpy's
    "zero-size array to reduction operation maximum" with no file named)."""
    image = np.zeros((48, 48, 0) if which == "image" else (8, 8, 4), np.int16)
    label = np.zeros((48, 48, 0) if which == "label" else (8, 8, 4), np.uint8)
    case = write_pair(tmp_path, image, label, np.eye(4))
    _expect(case, tmp_path / "cache", r"empty volume \(shape \(48, 48, 0\)", getattr(case, which))
    with pytest.raises(DataError, match="empty volume"):
        pp.load_nifti(getattr(case, which))


def test_config_validation():
    with pytest.raises(ValueError, match="ct_window"):
        PreprocessConfig(ct_window=(250, -200))
    with pytest.raises(ValueError, match="mri_percentiles"):
        PreprocessConfig(mri_percentiles=(99, 1))
    with pytest.raises(ValueError, match="target_spacing"):
        PreprocessConfig(target_spacing=(1, 1))
    assert PreprocessConfig(target_spacing=[1, 1, None]) == PreprocessConfig(target_spacing=(1, 1, None))
