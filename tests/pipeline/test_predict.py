"""``aqcf-predict`` on tiny phantoms: NIfTI and DICOM inputs, masks back on each input's own grid.

The geometry tests swap the trained network for a pointwise intensity threshold (``prepare_model``):
its labels are a known function of each voxel's CT value, so the mask written on the input grid must
equal that function applied to the input file directly. That checks the whole round trip (crop,
reorientation to RAS, sliding window, mirroring TTA, mapping back) independently of what a 2-step
model learned. The trained tiny run (``trained("ct")``) covers loading, ensembles and errors.
"""

from __future__ import annotations

import csv
import json
import math
import shlex
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from aqcf_kernels.data.readers import read_dicom_series
from aqcf_kernels.data.synth import make_phantom
from aqcf_kernels.pipeline import predict as pr
from aqcf_kernels.pipeline.inference import count_windows, predict_probabilities

pydicom = pytest.importorskip("pydicom")

SHAPE = (48, 44, 12)  # (x, y, z) of the phantoms: in-plane within the tiny run's 48x48 crops
SPACING = (0.8, 0.75, 1.5)
# Thresholds of the stand-in network, on the CT value: half-integers, so integer HU never tie.
LIVER_HU, TUMOUR_HU = 79.5, 20.5


def _unit(hu: float) -> float:
    return (hu + 200.0) / 450.0  # the default CT window [-200, 250] scaled to [0, 1], as preprocessing does


class Threshold(nn.Module):
    """Pointwise (hence flip-equivariant) labels: liver above LIVER_HU, tumour between the thresholds."""

    def forward(self, ct: torch.Tensor | None = None, mri: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        x = ct if ct is not None else mri
        liver = x > _unit(LIVER_HU)
        tumour = (x > _unit(TUMOUR_HU)) & ~liver
        logits = torch.cat([~(liver | tumour), liver, tumour], dim=1).float() * 10
        return {"ct" if ct is not None else "mri": logits}


def _threshold_labels(hu: np.ndarray) -> np.ndarray:
    return np.where(hu > LIVER_HU, 1, np.where(hu > TUMOUR_HU, 2, 0)).astype(np.uint8)


def _rotation(angles: tuple[float, float, float]) -> np.ndarray:
    out = np.eye(3)
    for axis, a in enumerate(np.radians(angles)):
        c, s = math.cos(a), math.sin(a)
        r = np.eye(3)
        i, j = [k for k in range(3) if k != axis]
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        out = r @ out
    return out


def _oblique_affine() -> np.ndarray:
    """A RAS affine whose axes are rotated (20, -12, 35 degrees), LPS-like flipped, with an offset."""
    directions = np.diag([-1.0, -1.0, 1.0]) @ _rotation((20.0, -12.0, 35.0))  # right-handed in LPS
    affine = np.eye(4)
    affine[:3, :3] = directions @ np.diag(SPACING)
    affine[:3, 3] = (31.5, -142.25, 407.0)
    return affine


@pytest.fixture(scope="module")
def phantom() -> tuple[np.ndarray, np.ndarray]:
    """(int16 HU volume (x, y, z), its oblique RAS affine)."""
    ph = make_phantom("ct", seed=3, shape=SHAPE, spacing=SPACING)
    return np.clip(np.rint(ph.image), -1024, 3071).astype(np.int16), _oblique_affine()


def _write_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, path)
    return path


def slice_name(k: int, n: int, prefix: str = "slice") -> str:
    """The file :func:`write_dicom_series` stores slice ``k`` of ``n`` in (names are shuffled)."""
    return f"{prefix}-{np.random.default_rng(n).permutation(n)[k]:03d}.dcm"


def write_dicom_series(
    folder: Path, hu: np.ndarray, affine: np.ndarray, *, modality: str = "CT", prefix: str = "slice"
) -> Path:
    """Write ``hu`` (x, y, z) as single-frame slices whose headers encode the RAS ``affine``.

    Pixels are stored unsigned with RescaleIntercept -1024 (as many CT scanners do), file names in a
    shuffled order and InstanceNumber reversed, so only the geometry can sort the slices.
    """
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    row, col = lps[:3, 0] / spacing[0], lps[:3, 1] / spacing[1]
    series_uid, study_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    for k in range(hu.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientID, ds.SeriesDescription = modality, "phantom", "test series"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.InstanceNumber = hu.shape[2] - k
        ds.ImageOrientationPatient = [f"{v:.10f}" for v in (*row, *col)]
        ds.ImagePositionPatient = [f"{v:.10f}" for v in lps[:3, 3] + k * lps[:3, 2]]
        ds.PixelSpacing = [f"{spacing[1]:.10f}", f"{spacing[0]:.10f}"]  # row spacing, then column spacing
        ds.SliceThickness = f"{spacing[2]:.6f}"
        ds.Rows, ds.Columns = hu.shape[1], hu.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = np.ascontiguousarray((hu[:, :, k].T.astype(np.int32) + 1024).astype(np.uint16)).tobytes()
        ds.save_as(folder / slice_name(k, hu.shape[2], prefix), enforce_file_format=True)
    return folder


def _summary(out: Path) -> dict[str, dict[str, str]]:
    with (out / "summary.csv").open() as f:
        return {row["case"]: row for row in csv.DictReader(f)}


def _check_mask(path: Path, shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    mask = nib.load(path)
    assert mask.shape == shape
    np.testing.assert_allclose(mask.affine, affine, atol=1e-4)
    data = np.asarray(mask.dataobj)
    assert data.dtype == np.uint8 and set(np.unique(data)) <= {0, 1, 2}
    return data


# ------------------------------------------------------------------------------------------ DICOM


def test_dicom_reader_geometry(phantom, tmp_path: Path) -> None:
    hu, affine = phantom
    volume = read_dicom_series(write_dicom_series(tmp_path / "series", hu, affine))
    assert volume.data.dtype == np.int16 and volume.series.pipeline_modality == "ct"
    np.testing.assert_array_equal(volume.data, hu)  # sorted by position, rescaled to HU, (column, row, slice)
    np.testing.assert_allclose(volume.affine, affine, atol=1e-6)


def test_dicom_reader_missing_slice(phantom, tmp_path: Path) -> None:
    hu, affine = phantom
    folder = write_dicom_series(tmp_path / "gap", hu[:, :, :6], affine)
    (folder / slice_name(2, 6)).unlink()  # a slice from the middle of the stack
    with pytest.raises(ValueError, match="uneven slice gaps"):
        read_dicom_series(folder)


# -------------------------------------------------------------------------------- the round trip


def test_nifti_and_dicom_round_trip(trained, phantom, tmp_path: Path) -> None:
    """Masks land on each input's own grid and affine; NIfTI and DICOM of one scan give the same mask."""
    hu, affine = phantom
    run_dir = trained("ct")
    inputs = tmp_path / "in"
    inputs.mkdir()
    _write_nifti(inputs / "oblique_0000.nii.gz", hu, affine)  # nnU-Net's channel suffix is dropped
    # The same scan stored in another voxel order (axes permuted and flipped): its own grid differs.
    permuted = np.flip(hu.transpose(2, 0, 1), axis=1)
    perm_affine = affine[:, [2, 0, 1, 3]].copy()
    perm_affine[:3, 3] += perm_affine[:3, 1] * (permuted.shape[1] - 1)
    perm_affine[:3, 1] *= -1
    _write_nifti(inputs / "permuted.nii", permuted, perm_affine)
    write_dicom_series(inputs / "patient7" / "ct-series", hu, affine)
    out = tmp_path / "out"
    rows = pr.predict([inputs], out, run_dir, tta=True, progress=False, prepare_model=lambda m: Threshold())
    assert [r["case"] for r in rows] == ["oblique", "permuted", "patient7_ct-series"]

    expected = _threshold_labels(hu)
    oblique = _check_mask(out / "oblique.nii.gz", hu.shape, affine)
    dicom = _check_mask(out / "patient7_ct-series.nii.gz", hu.shape, affine)
    perm = _check_mask(out / "permuted.nii.gz", permuted.shape, perm_affine)
    np.testing.assert_array_equal(oblique, expected)
    np.testing.assert_array_equal(dicom, expected)
    np.testing.assert_array_equal(perm, np.flip(expected.transpose(2, 0, 1), axis=1))

    summary = _summary(out)
    assert set(summary) == {"oblique", "permuted", "patient7_ct-series"}
    voxel_ml = np.prod(SPACING) / 1000
    for row in summary.values():
        assert float(row["liver_ml"]) == pytest.approx(np.count_nonzero(expected) * voxel_ml, abs=1e-3)
        assert float(row["tumour_ml"]) == pytest.approx(np.count_nonzero(expected == 2) * voxel_ml, abs=1e-3)
        assert int(row["tumour_count"]) >= 1 and float(row["seconds"]) > 0
        assert sorted(float(s) for s in row["spacing_mm"].split("x")) == pytest.approx(sorted(SPACING), abs=1e-3)
    assert summary["oblique"]["modality"] == "ct" and summary["patient7_ct-series"]["shape"] == "48x44x12"
    assert (out / "predict.json").is_file()


def test_tta_ensemble_probabilities_postprocess(trained, phantom, tmp_path: Path, capsys) -> None:
    """Two copies of one run average to that run; probabilities are saved on the input grid; CLI path."""
    hu, affine = phantom
    run_dir = trained("ct")
    twin = tmp_path / "twin"
    shutil.copytree(run_dir, twin)
    scan = _write_nifti(tmp_path / "scan.nii.gz", hu, affine)
    common = ["-i", str(scan), "--run", str(run_dir), "--checkpoint", "last", "--save-probabilities", "--quiet"]
    # What the setup printed is not predict's: the run is trained here when this test is the first on its
    # worker to ask for it (its log lines failed the check below, depending on the xdist schedule).
    capsys.readouterr()
    assert pr.main([*common, "-o", str(tmp_path / "single"), "--tta", "--device", "cpu"]) == 0
    assert pr.main([*common, "-o", str(tmp_path / "double"), "--tta", "--folds", str(twin)]) == 0
    assert pr.main([*common, "-o", str(tmp_path / "pp"), "--postprocess", "largest-component"]) == 0
    assert capsys.readouterr().out == ""  # --quiet: no bars, no final line

    one, two = np.load(tmp_path / "single" / "scan.npz"), np.load(tmp_path / "double" / "scan.npz")
    probs = one["probabilities"]
    assert probs.shape == (3, *hu.shape) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
    np.testing.assert_allclose(one["affine"], affine, atol=1e-6)
    assert list(one["classes"]) == list(pr.CLASSES)
    np.testing.assert_allclose(two["probabilities"], probs, atol=1e-5)  # the mean of two copies of one model
    mask = _check_mask(tmp_path / "single" / "scan.nii.gz", hu.shape, affine)
    sure = probs.max(0) > 0.51
    np.testing.assert_array_equal(mask[sure], probs.argmax(0)[sure])
    # Post-processing is applied to the mask only; the saved probabilities are the network's.
    raw = np.load(tmp_path / "pp" / "scan.npz")["probabilities"].argmax(0).astype(np.uint8)
    post = _check_mask(tmp_path / "pp" / "scan.nii.gz", hu.shape, affine)
    np.testing.assert_array_equal(post, pr.keep_largest_liver(raw))


def test_predict_json_records_the_command_quoted(trained, phantom, tmp_path: Path, capsys) -> None:
    """predict.json's command is the one given to aqcf-predict, shell-quoted (a path with a space, as LiTS's
    "Training Batch 1", was written unquoted, and from a Python call it was the host program's sys.argv)."""
    hu, affine = phantom
    (tmp_path / "Training Batch 1").mkdir()
    scan = _write_nifti(tmp_path / "Training Batch 1" / "scan.nii.gz", hu, affine)
    argv = ["-i", str(scan), "-o", str(tmp_path / "out"), "--run", str(trained("ct")), "--quiet"]
    capsys.readouterr()
    assert pr.main(argv) == 0
    command = json.loads((tmp_path / "out" / "predict.json").read_text())["command"]
    assert shlex.split(command) == ["aqcf-predict", *argv]
    pr.predict([scan], tmp_path / "api", trained("ct"), progress=False)
    assert json.loads((tmp_path / "api" / "predict.json").read_text())["command"] is None


def test_a_volume_unlike_ct_predicted_as_ct_gets_a_note(trained, phantom, tmp_path: Path, capsys) -> None:
    """An MRI volume given to a CT run is predicted as CT (the run has no other modality); with no voxel at the
    CT window's low end (air is about -1000 HU), stderr and predict.json say so. The CT phantom gets no note."""
    hu, affine = phantom
    mri = make_phantom("mri", seed=4, shape=SHAPE, spacing=SPACING).image.astype(np.float32)
    assert mri.min() >= 0  # (MRI intensities: no air at -1000)
    scans = [_write_nifti(tmp_path / "ct.nii.gz", hu, affine), _write_nifti(tmp_path / "mr.nii.gz", mri, affine)]
    capsys.readouterr()
    argv = ["-i", *map(str, scans), "-o", str(tmp_path / "out"), "--run", str(trained("ct")), "--quiet"]
    assert pr.main(argv) == 0
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if line.startswith("note: ")]
    assert len(notes) == 1 and notes[0].startswith(f"note: {scans[1]}: predicted as CT, but no voxel"), err
    assert "--modality mri" in notes[0]
    cases = {c["case"]: c for c in json.loads((tmp_path / "out" / "predict.json").read_text())["cases"]}
    assert "note" not in cases["ct"] and cases["mr"]["note"].startswith("predicted as CT")


def test_a_cross_validation_folder_ensembles_its_numbered_folds(trained, tmp_path: Path) -> None:
    """As nnU-Net's default: ``--run CV`` takes fold_0, fold_1 ... and not fold_all (trained on every training case:
    a model of its own, which the ensemble took too); ``--folds all`` names it; alone, it is the run."""
    cv = tmp_path / "cv"
    for name in ("fold_0", "fold_1", "fold_all"):
        shutil.copytree(trained("ct"), cv / name)

    def members(run: Path, *folds: str) -> list[str]:
        return [m.run_dir.name for m in pr.load_members(run, folds)]

    assert members(cv) == ["fold_0", "fold_1"]
    assert members(cv, "0", "all") == ["fold_0", "fold_all"]
    for name in ("fold_0", "fold_1"):
        shutil.rmtree(cv / name)
    assert members(cv) == ["fold_all"]


def test_dataset_folder_matches_evaluation_path(trained, datasets, tmp_path: Path, capsys) -> None:
    """-i at a LiTS-layout folder: segmentations skipped; masks equal the cache + predict_labels path."""
    from aqcf_kernels.data import find_cases, preprocess_case, restore_to_original
    from aqcf_kernels.pipeline.checkpoint import load_for_inference
    from aqcf_kernels.pipeline.data import preprocess_config
    from aqcf_kernels.pipeline.inference import predict_labels

    run_dir = trained("ct")
    rows = pr.predict([datasets.ct], tmp_path, run_dir, progress=True)
    err = capsys.readouterr().err
    cases = find_cases(datasets.ct, modality="ct")
    assert [r["case"] for r in rows] == [f"Training Batch 1_volume-{i}" for i in range(len(cases))]
    assert "Training Batch 1_volume-0" in err and "win" in err  # one progress bar per case
    model, cfg = load_for_inference(run_dir / "best.pt")
    for case, row in zip(cases, rows, strict=True):
        cached = preprocess_case(case, datasets.cache / "ct", preprocess_config(cfg))
        expected = restore_to_original(predict_labels(model, cached.image, "ct", cfg), cached)
        mask = _check_mask(tmp_path / row["mask"], nib.load(case.image).shape, nib.load(case.image).affine)
        np.testing.assert_array_equal(mask, expected)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_count_windows_and_mirroring(datasets, spatial_dims: int) -> None:
    """The progress bar's total is the number of windows run; mirroring undoes its flips exactly."""
    cfg = datasets.config("ct", model__spatial_dims=spatial_dims)
    image = np.random.default_rng(0).uniform(0, 1, (11, 70, 53)).astype(np.float32)
    seen: list[int] = []
    plain = predict_probabilities(Threshold(), image, "ct", cfg)
    mirrored = predict_probabilities(Threshold(), image, "ct", cfg, tta=True, on_windows=seen.append)
    assert sum(seen) == count_windows(image.shape, cfg, tta=True)
    assert count_windows(image.shape, cfg, tta=True) == (4 if spatial_dims == 2 else 8) * count_windows(
        image.shape, cfg
    )
    torch.testing.assert_close(mirrored, plain)


def test_keep_largest_liver_and_statistics() -> None:
    labels = np.zeros((12, 10, 8), np.uint8)
    labels[1:7, 1:7, 1:6] = 1  # the big liver, 180 voxels
    labels[2:4, 2:4, 2:4] = 2  # a tumour inside it
    labels[4, 4, 4] = 2  # touches the first one at a corner only: the same tumour (26-connectivity)
    labels[5:6, 5:6, 1:2] = 2  # a second tumour, on the liver's edge
    labels[9:11, 8:10, 5:7] = 1  # a small island
    labels[10, 8, 6] = 2  # a tumour in the island
    affine = np.diag([0.5, 0.5, 2.0, 1.0])
    stats = pr.mask_statistics(labels, affine)
    assert stats["tumour_count"] == 3
    assert stats["liver_ml"] == pytest.approx(np.count_nonzero(labels) * 0.5 / 1000)
    kept = pr.keep_largest_liver(labels)
    assert kept[9:11, 8:10, 5:7].max() == 0 and np.array_equal(kept[:8], labels[:8])
    after = pr.mask_statistics(kept, affine)
    assert after["tumour_count"] == 2 and after["tumour_ml"] == pytest.approx(10 * 0.5 / 1000)
    assert np.array_equal(pr.keep_largest_liver(np.zeros_like(labels)), np.zeros_like(labels))


# ----------------------------------------------------------------------------------------- errors


def test_errors_are_one_line(trained, phantom, tmp_path: Path, capsys) -> None:
    hu, affine = phantom
    run_dir = trained("ct")
    scan = _write_nifti(tmp_path / "scan.nii.gz", hu[:, :, :4], affine)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no scans here")
    mixed = write_dicom_series(tmp_path / "mixed", hu[:, :, :2], affine)
    write_dicom_series(mixed, hu[:, :, 2:4], affine, prefix="other")  # a second series in the same folder
    mr = write_dicom_series(tmp_path / "mr", hu[:, :, :3], affine, modality="MR")
    out = str(tmp_path / "out")
    cases = [
        (["-i", str(tmp_path / "nowhere.nii.gz"), "--run", str(run_dir)], "does not exist"),
        (["-i", str(empty), "--run", str(run_dir)], "no readable volumes"),
        (["-i", str(scan), "--run", str(empty)], "holds no checkpoints"),
        (["-i", str(scan), "--run", str(run_dir), "--checkpoint", "epoch7.pt"], "does not exist"),
        (["-i", str(scan), "--run", str(run_dir), "--modality", "mri"], "trained for ct only"),
        (["-i", str(mixed), "--run", str(run_dir)], "DICOM series mixed in one folder"),
        (["-i", str(mr), "--run", str(run_dir)], "a MR series"),
        (["-i", str(scan), "--run", str(run_dir), "--device", "cuda:7"], "--device"),
    ]
    for argv, message in cases:
        assert pr.main([*argv, "-o", out, "--quiet"]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("aqcf-predict: error: ") and message in err, (argv, err)
        assert err.count("\n") == 1 and "Traceback" not in err
