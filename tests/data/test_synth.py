"""Synthetic phantoms: anatomy and contrast as documented, determinism, and the exact on-disk layouts."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from aqcf_kernels.data.synth import DEFAULT_SHAPE, DEFAULT_SPACING, _parser, main, make_phantom, write_dataset


@pytest.mark.parametrize("modality", ["ct", "mri"])
def test_phantom_anatomy(modality):
    ph = make_phantom(modality, seed=3)
    assert ph.image.shape == ph.label.shape == DEFAULT_SHAPE[modality]
    assert ph.image.dtype == np.float32 and ph.label.dtype == np.uint8
    assert set(np.unique(ph.label)) == {0, 1, 2}
    assert 1 <= ph.n_tumours <= 3
    # Tumours are blobs of several voxels radius, not specks: the largest has >= 4^3 voxels.
    components, n = ndimage.label(ph.label == 2)
    assert n >= 1 and np.bincount(components.ravel())[1:].max() >= 64
    # Tumours lie inside the liver: most of the ring of voxels around them is liver, not background.
    tumour = ph.label == 2
    ring = ndimage.binary_dilation(tumour) & ~tumour
    assert (ph.label[ring] == 1).mean() > 0.6
    np.testing.assert_allclose(np.abs(np.diag(ph.affine)[:3]), DEFAULT_SPACING[modality], rtol=0.11)
    liver, tumour = ph.image[ph.label == 1], ph.image[tumour]
    if modality == "ct":
        assert ph.image.min() < -900  # air outside the body
        assert liver.mean() - tumour.mean() > 30  # hypodense tumours
        assert 70 < liver.mean() < 140
    else:
        assert ph.image.min() >= 0  # magnitude image
        assert tumour.mean() > 1.1 * liver.mean()  # hyperintense tumours despite the bias field
    # Clearly above noise but not thresholdable: many non-tumour voxels share the tumour intensity range.
    lo, hi = np.percentile(tumour, [25, 75])
    in_range = (ph.image >= lo) & (ph.image <= hi)
    assert in_range[ph.label != 2].sum() > in_range[ph.label == 2].sum()


def test_phantom_options():
    a = make_phantom("ct", seed=5, shape=(24, 24, 8), n_tumours=0)
    assert a.n_tumours == 0 and not np.any(a.label == 2) and np.any(a.label == 1)
    b = make_phantom("mri", seed=[1, 2], shape=(24, 24, 8), spacing=(2.0, 2.0, 4.0))
    np.testing.assert_array_equal(np.diag(b.affine)[:3], [2.0, 2.0, 4.0])
    c1, c2, c3 = (make_phantom("ct", seed=s, shape=(24, 24, 8)) for s in (7, 7, 8))
    np.testing.assert_array_equal(c1.image, c2.image)
    np.testing.assert_array_equal(c1.label, c2.label)
    assert not np.array_equal(c1.image, c3.image)
    with pytest.raises(ValueError, match="modality"):
        make_phantom("pet")


EXPECTED_FILES = {
    "lits": ["Training Batch 1/volume-0.nii", "Training Batch 1/segmentation-1.nii"],
    "atlas": ["train/imagesTr/im0.nii.gz", "train/labelsTr/lb1.nii.gz"],
    "msd": [
        "Task03_Liver/dataset.json",
        "Task03_Liver/imagesTr/liver_0.nii.gz",
        "Task03_Liver/labelsTr/liver_1.nii.gz",
    ],
    "nnunet": [
        "Dataset003_Liver/dataset.json",
        "Dataset003_Liver/imagesTr/liver_0_0000.nii.gz",
        "Dataset003_Liver/labelsTr/liver_1.nii.gz",
    ],
}


@pytest.mark.parametrize("layout", sorted(EXPECTED_FILES))
def test_write_layout(tmp_path, layout):
    root = write_dataset(tmp_path, layout, 2, shape=(20, 20, 6), progress=False, macos_junk=True)
    for rel in EXPECTED_FILES[layout]:
        assert (tmp_path / rel).is_file(), rel
    assert root.is_dir() and tmp_path in root.parents or root == tmp_path
    image_rel = EXPECTED_FILES[layout][-2] if layout in ("msd", "nnunet") else EXPECTED_FILES[layout][0]
    img = nib.load(tmp_path / image_rel)
    assert img.shape == (20, 20, 6) and img.get_data_dtype() == np.int16
    assert "".join(nib.aff2axcodes(img.affine)) == ("LPS" if layout == "lits" else "RAS")
    assert (tmp_path / image_rel).with_name("._" + (tmp_path / image_rel).name).is_file()  # requested junk
    if layout == "msd":
        meta = json.loads((root / "dataset.json").read_text())
        assert meta["modality"] == {"0": "CT"} and meta["labels"]["2"] == "cancer" and meta["numTraining"] == 2
        assert meta["training"][1] == {"image": "./imagesTr/liver_1.nii.gz", "label": "./labelsTr/liver_1.nii.gz"}
    if layout == "nnunet":
        meta = json.loads((root / "dataset.json").read_text())
        assert (
            meta["channel_names"] == {"0": "CT"} and meta["labels"]["tumor"] == 2 and meta["file_ending"] == ".nii.gz"
        )


def test_cases_are_stable_and_orientation_is_only_storage(tmp_path):
    # Case i depends only on (seed, i): a bigger dataset starts with the same cases. Stored LPS vs RAS is
    # the same anatomy: nibabel's canonical reorientation brings both to the same array.
    write_dataset(tmp_path / "a", "atlas", 1, shape=(20, 20, 6), orientation="LPS", progress=False)
    write_dataset(tmp_path / "b", "atlas", 2, shape=(20, 20, 6), progress=False)
    a = nib.as_closest_canonical(nib.load(tmp_path / "a/train/imagesTr/im0.nii.gz"))
    b = nib.load(tmp_path / "b/train/imagesTr/im0.nii.gz")
    np.testing.assert_array_equal(a.get_fdata(), b.get_fdata())
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-5)


def test_cli(tmp_path, capsys):
    assert main([str(tmp_path), "--layout", "lits", "--cases", "2", "--shape", "16", "16", "6", "--seed", "3"]) == 0
    assert "wrote 2 lits case(s)" in capsys.readouterr().out
    assert (tmp_path / "Training Batch 1" / "segmentation-1.nii").is_file()
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--layout", "kits", "--cases", "1"])


def test_module_help_runs():
    out = subprocess.run(
        [sys.executable, "-m", "aqcf_kernels.data.synth", "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "--layout" in out.stdout and "nnunet" in out.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cases", "0"], "--cases must be at least 1, got 0"),
        (["--cases", "-3"], "--cases must be at least 1, got -3"),
        (["--cases", "1", "--shape", "0", "48", "16"], "--shape must be 3 sizes of at least 4 voxels, got 0 48 16"),
        (["--cases", "1", "--shape", "4", "4", "2"], "--shape must be 3 sizes of at least 4 voxels, got 4 4 2"),
        (["--cases", "1", "--no-tumour-frac", "2"], "--no-tumour-frac must be in [0, 1], got 2.0"),
        (["--cases", "1", "--orientation", "XYZ"], "--orientation 'XYZ': expected 3 axis codes"),
        (["--cases", "1", "--orientation", "RRS"], "--orientation 'RRS': expected 3 axis codes"),
        (["--cases", "1", "--spacing", "0", "1", "1"], "--spacing must be 3 positive sizes in mm, got 0.0 1.0 1.0"),
    ],
)
def test_cli_argument_errors(tmp_path, capsys, args, message):
    """One line naming the option, exit status 2, nothing written (were tracebacks: numpy, nibabel's matrix dump)."""
    out = tmp_path / "out"
    assert main([str(out), "--layout", "lits", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"aqcf-synth: error: {message}") and err.count("\n") == 1, err
    assert not out.exists()


@pytest.mark.parametrize("below", [False, True])
def test_cli_output_under_a_file(tmp_path, capsys, below):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    out = afile / "sub" if below else afile
    assert main([str(out), "--layout", "atlas", "--cases", "1", "--shape", "8", "8", "4"]) == 2
    why = f"{afile} is a file, not a folder" if below else "exists and is not a folder"
    assert capsys.readouterr().err == f"aqcf-synth: error: OUT {out}: {why}\n"
    assert afile.read_text() == "keep me"


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, where no folder can be made")
def test_cli_output_that_cannot_be_created(capsys):
    """``OUT /proc/x``: one line naming OUT before any case is made, as the other commands say it (was a
    FileNotFoundError traceback chained through the first case's save)."""
    assert main(["/proc/x", "--layout", "lits", "--cases", "1", "--shape", "8", "8", "4", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("aqcf-synth: error: OUT /proc/x: cannot create") and err.count("\n") == 1, err


def test_cli_output_folder_that_exists_but_takes_no_files(tmp_path, capsys, monkeypatch):
    """An existing folder where nothing can be written (a read-only mount; permission bits pass for root): one
    line naming OUT before any case is made."""
    from aqcf_kernels.data import outputs

    def read_only(**kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(outputs.tempfile, "mkdtemp", read_only)
    assert main([str(tmp_path), "--layout", "lits", "--cases", "1", "--shape", "8", "8", "4", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err == f"aqcf-synth: error: OUT {tmp_path}: cannot write in the folder ({os.strerror(errno.EROFS)})\n"
    assert list(tmp_path.iterdir()) == []


def test_cli_help_states_the_defaults():
    text = " ".join(_parser().format_help().split())  # argparse wraps lines where it likes
    assert "random seed (default 0;" in text
    assert "share of cases without tumour, 0 to 1 (default 0;" in text
