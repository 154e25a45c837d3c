"""Dataset readers: every layout found (and auto-detected), junk ignored, and every layout error named."""

from __future__ import annotations

import json
import shutil

import pytest

from aqcf_kernels.data import LAYOUTS, DataError, detect_layouts, find_cases

EXPECTED = {
    "lits": (["lits-0", "lits-1", "lits-2"], "ct"),
    "atlas": (["atlas-0", "atlas-1", "atlas-2"], "mri"),
    "msd": (["liver_0", "liver_1", "liver_2"], "ct"),
    "nnunet": (["liver_0", "liver_1", "liver_2"], "ct"),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_each_layout_auto_and_explicit(synth, layout):
    out = synth(layout, macos_junk=True)  # '._*' AppleDouble junk next to every file, as in MSD archives
    assert detect_layouts(out) == [layout]
    cases = find_cases(out)
    ids, modality = EXPECTED[layout]
    assert [c.case_id for c in cases] == ids
    assert all(c.modality == modality and c.layout == layout for c in cases)
    assert all(c.image.is_file() and c.label.is_file() and not c.image.name.startswith(".") for c in cases)
    assert find_cases(out, layout) == cases
    assert [c.modality for c in find_cases(out, layout, modality="mri")] == ["mri"] * 3


def test_pairing_is_by_index(synth):
    cases = find_cases(synth("atlas"))
    for c in cases:
        n = c.case_id.split("-")[1]
        assert c.image.name == f"im{n}.nii.gz" and c.label.name == f"lb{n}.nii.gz"
    cases = find_cases(synth("nnunet"))
    assert [(c.image.name, c.label.name) for c in cases][1] == ("liver_1_0000.nii.gz", "liver_1.nii.gz")


def test_lits_over_two_batches_natural_order_and_junk(synth):
    out = synth("lits", cases=3)
    b1, b2 = out / "Training Batch 1", out / "Training Batch 2"
    b2.mkdir()
    shutil.move(b1 / "volume-2.nii", b2 / "volume-10.nii")  # image in batch 2, label in batch 1
    shutil.move(b1 / "segmentation-2.nii", b1 / "segmentation-10.nii")
    (b1 / "._volume-0.nii").write_bytes(b"\x00\x05\x16\x07junk")  # macOS junk: never a case
    (b1 / "._segmentation-5.nii").write_bytes(b"junk")
    hidden = out / ".Trash"
    hidden.mkdir()
    shutil.copy(b1 / "volume-0.nii", hidden / "volume-7.nii")  # hidden folders are not searched
    cases = find_cases(out)
    assert [c.case_id for c in cases] == ["lits-0", "lits-1", "lits-10"]  # 10 after 1: natural order
    assert cases[2].image == b2 / "volume-10.nii" and cases[2].label == b1 / "segmentation-10.nii"


def test_msd_json_with_nnunet_v1_image_names(synth):
    out = synth("msd")
    images = out / "Task03_Liver" / "imagesTr"
    for f in images.glob("liver_*.nii.gz"):
        f.rename(f.with_name(f.name.replace(".nii.gz", "_0000.nii.gz")))
    cases = find_cases(out)
    assert [c.image.name for c in cases] == [f"liver_{i}_0000.nii.gz" for i in range(3)]


def test_empty_folder_names_folder_and_layouts(tmp_path):
    (tmp_path / "notes.txt").write_text("nothing here")
    with pytest.raises(DataError) as e:
        find_cases(tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg and all(name in msg for name in LAYOUTS)
    with pytest.raises(DataError, match="ATLAS"):
        find_cases(tmp_path, "atlas")
    with pytest.raises(DataError, match="does not exist"):
        find_cases(tmp_path / "missing")
    with pytest.raises(ValueError, match="layout"):
        find_cases(tmp_path, "kits")


def test_explicit_layout_not_present(synth):
    out = synth("lits")
    with pytest.raises(DataError, match="no cases found"):
        find_cases(out, "nnunet")


@pytest.mark.parametrize(
    ("layout", "label_rel"),
    [
        ("lits", "Training Batch 1/segmentation-1.nii"),
        ("atlas", "train/labelsTr/lb1.nii.gz"),
        ("msd", "Task03_Liver/labelsTr/liver_1.nii.gz"),
        ("nnunet", "Dataset003_Liver/labelsTr/liver_1.nii.gz"),
    ],
)
def test_missing_label_names_the_image(synth, layout, label_rel):
    out = synth(layout)
    (out / label_rel).unlink()
    with pytest.raises(DataError, match="no label file") as e:
        find_cases(out)
    assert "1" in str(e.value).split(":")[0]  # the image of case 1 is named first
    cases = find_cases(out, require_labels=False)
    assert [c.label is None for c in cases] == [False, True, False]


@pytest.mark.parametrize(
    ("layout", "image_rel"),
    [("lits", "Training Batch 1/volume-2.nii"), ("atlas", "train/imagesTr/im2.nii.gz")],
)
def test_label_without_image(synth, layout, image_rel):
    out = synth(layout)
    (out / image_rel).unlink()
    with pytest.raises(DataError, match="without its image"):
        find_cases(out)


def test_msd_listed_image_missing(synth):
    out = synth("msd")
    (out / "Task03_Liver/imagesTr/liver_0.nii.gz").unlink()
    with pytest.raises(DataError, match=r"liver_0\.nii\.gz: listed in .*dataset\.json but missing"):
        find_cases(out)


def test_duplicate_and_mixed_layouts(synth, tmp_path):
    out = synth("lits")
    b2 = out / "Training Batch 2"
    b2.mkdir()
    shutil.copy(out / "Training Batch 1" / "volume-1.nii", b2 / "volume-1.nii")
    with pytest.raises(DataError, match="duplicate LiTS volume 1"):
        find_cases(out)
    mixed = synth("atlas")
    shutil.copytree(synth("msd") / "Task03_Liver", mixed / "Task03_Liver")
    assert detect_layouts(mixed) == ["atlas", "msd"]
    with pytest.raises(DataError, match="several dataset layouts"):
        find_cases(mixed)
    assert len(find_cases(mixed, "msd")) == 3


def test_bad_dataset_json(synth):
    out = synth("nnunet")
    js = out / "Dataset003_Liver" / "dataset.json"
    js.write_text("{not json")
    with pytest.raises(DataError, match="cannot read dataset.json"):
        find_cases(out)
    js.write_text(json.dumps({"channel_names": {"0": "T2", "1": "ADC"}, "file_ending": ".nii.gz"}))
    with pytest.raises(DataError, match="2 channels"):
        find_cases(out)
    js.write_text(json.dumps({"channel_names": {"0": "T2"}, "file_ending": ".nii.gz"}))
    assert {c.modality for c in find_cases(out)} == {"mri"}  # nnU-Net's rule: only "CT" is CT
