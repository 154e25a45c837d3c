"""End to end on tiny phantoms: train (1 epoch x 2 steps) -> aqcf-evaluate -> aqcf-explain, in every mode.

Evaluation runs in all four modes (joint, ct, mri, dynunet) and in 3D; explanation runs for joint,
one unimodal A-QCF-Net (mri), the DynUNet pair and 3D, which covers every default-layer rule and
both spatial dims within the time budget.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from aqcf_kernels.data import find_cases
from aqcf_kernels.pipeline import evaluate as ev
from aqcf_kernels.pipeline import explain as ex
from aqcf_kernels.pipeline.checkpoint import checkpoint_info, load_checkpoint, load_for_inference
from aqcf_kernels.pipeline.data import prepare_data
from aqcf_kernels.pipeline.metrics import dice

MODALITIES = {"joint": ["ct", "mri"], "ct": ["ct"], "mri": ["mri"], "dynunet": ["ct", "mri"]}


def _originals(datasets, modality: str) -> dict[str, tuple[Path, Path]]:
    root = datasets.ct if modality == "ct" else datasets.mri
    return {c.case_id: (c.image, c.label) for c in find_cases(root, modality=modality)}


def _check_results(datasets, run_dir: Path, out: Path, mode: str, results: dict, grid: str = "preprocessed") -> None:
    modalities = MODALITIES[mode]
    stored = json.loads((out / "results.json").read_text())  # strict JSON: NaN written as null
    assert stored["mode"] == mode and stored["split"] == "test"
    assert list(stored["modalities"]) == modalities == list(results["modalities"])
    table = (out / "results.md").read_text()
    for modality in modalities:
        split = json.loads((run_dir / f"split_{modality}.json").read_text())
        entry = stored["modalities"][modality]
        assert [row["case_id"] for row in entry["cases"]] == split["test"]
        assert entry["summary"]["cases"] == len(split["test"])
        for row in entry["cases"]:
            for key in ev.METRICS:
                value = row[key]
                assert value is None or (key.startswith("hd95") and value >= 0) or 0.0 <= value <= 1.0
            assert row["dice_liver"] is not None  # every phantom has a liver: Dice is defined
            assert row["grid"] == grid
        with (out / f"per_case_{modality}.csv").open() as f:
            rows = list(csv.DictReader(f))
        assert [r["case_id"] for r in rows] == split["test"]
        assert all(
            math.isnan(float(r["hd95_tumour"])) == (s["hd95_tumour"] is None)
            for r, s in zip(rows, entry["cases"], strict=True)
        )
        # Masks: NIfTI on the ORIGINAL image grid, with the original affine, labels in {0, 1, 2}.
        originals = _originals(datasets, modality)
        for case_id, row in zip(split["test"], entry["cases"], strict=True):
            mask = nib.load(out / "masks" / modality / f"{case_id}.nii.gz")
            image_path, label_path = originals[case_id]
            original = nib.load(image_path)
            assert mask.shape == original.shape
            np.testing.assert_allclose(mask.affine, original.affine, atol=1e-6)
            data = np.asarray(mask.dataobj)
            assert data.dtype == np.uint8 and set(np.unique(data)) <= {0, 1, 2}
            # The crop keeps every labelled voxel, and resampled runs are scored on the original grid, so
            # Dice of the mask vs the dataset's own segmentation file equals the reported Dice.
            truth = np.asarray(nib.load(label_path).dataobj).astype(np.uint8)
            for region in ("liver", "tumour"):
                expected = row[f"dice_{region}"]
                got = dice(data, truth, region)
                assert (math.isnan(got) and expected is None) or got == pytest.approx(expected, abs=1e-9)
        assert f"| {modality} | {len(split['test'])} |" in table
    for modality, paper in (("ct", "| 76.7 | 71.3 |"), ("mri", "| 78.3 | 73.6 |")):
        assert (paper in table) == (modality in modalities)


@pytest.mark.parametrize("mode", ["joint", "ct", "mri", "dynunet"])
def test_train_evaluate(trained, datasets, mode: str, tmp_path: Path, capsys) -> None:
    run_dir = trained(mode)
    for name in ("last.pt", "best.pt", "config.json", "metrics.jsonl", "curves.png"):
        assert (run_dir / name).is_file(), name
    out = tmp_path / "eval"
    results = ev.evaluate(run_dir, out=out, progress=False)
    assert f"| {MODALITIES[mode][0]} |" in capsys.readouterr().out  # the table is printed
    _check_results(datasets, run_dir, out, mode, results)


@pytest.mark.parametrize("mode", ["joint", "mri", "dynunet"])
def test_explain(trained, mode: str, tmp_path: Path) -> None:
    run_dir = trained(mode)
    paths = ex.explain(run_dir, cases=1, out=tmp_path / "cam", progress=False)
    model, cfg = load_for_inference(run_dir / "best.pt")
    expected = {
        tmp_path / "cam" / m / f"{case}_{method}_{layer.removeprefix('model.')}.png"
        for m in MODALITIES[mode]
        for case in json.loads((run_dir / f"split_{m}.json").read_text())["test"][:1]
        for method in ("gradcam", "gradcampp")
        for layer in ex.default_layers(model, m)
    }
    assert set(paths) == expected
    for path in paths:
        image = np.asarray(Image.open(path).convert("RGB"))
        assert image.shape[0] > 200 and image.shape[1] > 800  # four panels side by side
        assert image.std() > 10 and len(np.unique(image.reshape(-1, 3), axis=0)) > 100  # not blank


def test_3d_train_evaluate_explain(trained, datasets, tmp_path: Path) -> None:
    run_dir = trained("joint", model__spatial_dims=3)
    _, cfg = load_for_inference(run_dir / "last.pt")
    assert cfg.model.spatial_dims == 3 and tuple(cfg.data.patch_size) == (8, 32, 32)
    results = ev.evaluate(run_dir, out=tmp_path / "eval", progress=False, echo=False)
    _check_results(datasets, run_dir, tmp_path / "eval", "joint", results)
    paths = ex.explain(run_dir, modality="ct", method="gradcampp", cases=1, out=tmp_path / "cam", progress=False)
    assert [p.name for p in paths] == [
        f"{results['modalities']['ct']['cases'][0]['case_id']}_gradcampp_encoder.ct.levels.1.png"
    ]


def test_evaluate_resampled_run_on_original_grid(trained, datasets, tmp_path: Path) -> None:
    """With data.target_spacing the network sees a resampled grid; scores are taken on the original one."""
    run_dir = trained("ct", data__target_spacing="[1.2, 1.2, 2.0]")
    _, cfg = load_for_inference(run_dir / "best.pt")
    assert cfg.data.target_spacing == (1.2, 1.2, 2.0)
    results = ev.evaluate(run_dir, out=tmp_path, progress=False, echo=False)
    _check_results(datasets, run_dir, tmp_path, "ct", results, grid="original")


def test_evaluate_cli(trained, tmp_path: Path, capsys) -> None:
    run_dir = trained("ct")
    assert (
        ev.main(
            [str(run_dir), "--checkpoint", "last", "--split", "val", "--out", str(tmp_path), "--no-masks", "--quiet"]
        )
        == 0
    )
    assert "| ct |" in capsys.readouterr().out
    assert (tmp_path / "results.json").is_file() and not (tmp_path / "masks").exists()
    assert json.loads((tmp_path / "results.json").read_text())["split"] == "val"


def test_an_evaluation_replaces_an_earlier_one_in_its_folder(trained, tmp_path: Path, capsys) -> None:
    """A second evaluation into one folder (here --no-masks after masks, on the joint run, then the ct run's
    checkpoint into the same --out): its files only, nothing of the earlier one left beside them (its masks and
    the per-case table of a modality it no longer has stayed, under results that did not describe them); the
    user's own files in the folder untouched."""
    run_dir = trained("joint")
    out = tmp_path / "eval"
    ev.evaluate(run_dir, out=out, progress=False, echo=False)
    masks = sorted(out.glob("masks/*/*.nii.gz"))
    assert masks and (out / "per_case_mri.csv").is_file()
    (out / "mine.txt").write_text("a note of the user's\n")
    capsys.readouterr()
    ev.evaluate(run_dir, out=out, write_masks=False, progress=False, echo=False)
    assert f"{out} held an earlier evaluation" in capsys.readouterr().err
    assert not (out / "masks").exists()
    ct_run = trained("ct")
    ev.evaluate(run_dir, checkpoint=ct_run / "best.pt", out=out, write_masks=False, progress=False, echo=False)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["mine.txt", "per_case_ct.csv", "results.json", "results.md"]
    assert json.loads((out / "results.json").read_text())["mode"] == "ct"


def test_another_runs_checkpoint_gets_its_own_default_folder(trained, tmp_path: Path) -> None:
    """``aqcf-evaluate RUN --checkpoint OTHER/best.pt`` wrote into RUN/eval_test_best, RUN's own best's folder."""
    run_dir = tmp_path / "run"
    shutil.copytree(trained("ct"), run_dir)
    other = tmp_path / "other"
    shutil.copytree(trained("ct"), other)
    ev.evaluate(run_dir, checkpoint=other / "best.pt", write_masks=False, progress=False, echo=False)
    ev.evaluate(run_dir, checkpoint=run_dir / "last.pt", write_masks=False, progress=False, echo=False)
    assert sorted(p.name for p in run_dir.glob("eval_*")) == ["eval_test_last", "eval_test_other-best"]


def test_evaluate_errors(trained, tmp_path: Path, capsys) -> None:
    assert ev.main([str(tmp_path / "nowhere")]) == 2
    assert f"run folder {tmp_path / 'nowhere'} does not exist" in capsys.readouterr().err
    assert ev.main([str(tmp_path)]) == 2
    assert f"checkpoint {tmp_path / 'best.pt'} does not exist" in capsys.readouterr().err
    assert ev.main([str(tmp_path), "--checkpoint", str(tmp_path / "x.pt")]) == 2
    assert f"checkpoint {tmp_path / 'x.pt'} does not exist" in capsys.readouterr().err
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    assert ev.main([str(tmp_path), "--checkpoint", str(tmp_path / "bad.pt")]) == 2
    assert "is not readable" in capsys.readouterr().err
    # A run folder without its split files: never re-drawn silently.
    run_dir = trained("ct")
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    assert ev.main([str(lonely), "--checkpoint", str(run_dir / "best.pt")]) == 2
    assert f"split file {lonely / 'split_ct.json'} does not exist" in capsys.readouterr().err
    assert ev.main([str(run_dir), "--set", "model.heads=4"]) == 2
    assert "only the data section" in capsys.readouterr().err


def test_explain_cli_and_layers(trained, tmp_path: Path, capsys) -> None:
    run_dir = trained("joint")
    capsys.readouterr()  # (the run's own log, when this test is the first on its worker to train it)
    assert ex.main([str(run_dir), "--list-layers", "--modality", "ct"]) == 0
    listed = capsys.readouterr().out
    assert "* encoder.ct.levels.1" in listed and " decoder.blocks.0 " in listed and "model." not in listed
    assert "encoder.mri" not in listed and "fusion" not in listed  # fusion never runs with one modality
    # Names with or without the wrapper's prefix; a shared (decoder) layer is explained for both streams.
    args = [str(run_dir), "--layers", "decoder.blocks.0", "model.encoder.ct.levels.0", "--method", "gradcam"]
    assert ex.main([*args, "--cases", "1", "--out", str(tmp_path), "--quiet"]) == 0
    names = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.png"))
    assert [n.split("/")[0] for n in names] == ["ct", "ct", "mri"]
    assert all("_gradcam_" in n for n in names) and any(n.endswith("encoder.ct.levels.0.png") for n in names)
    assert ex.main([str(run_dir), "--layers", "fusion.0"]) == 2
    assert "does not run for ct or mri" in capsys.readouterr().err
    assert ex.main([str(trained("ct")), "--modality", "mri"]) == 2
    assert "has no mri stream" in capsys.readouterr().err


def test_class_scores_wrapper() -> None:
    """One score per class: the mean logit over the region (set, else each class's argmax region)."""

    class Fixed(torch.nn.Module):
        def forward(self, ct=None, mri=None):
            return {"ct": ct.repeat(1, 3, 1, 1) * torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1)}

    x = torch.arange(4.0).view(1, 1, 2, 2)  # logits: class c = (c + 1) * x, argmax is class 2 unless x == 0
    wrapper = ex.ClassScores(Fixed(), "ct")
    region = torch.tensor([[[[True, False], [False, True]]]])
    wrapper.region = region
    torch.testing.assert_close(wrapper(x), torch.tensor([[1.5, 3.0, 4.5]]))  # mean over {0, 3}
    wrapper.region = None
    # x == 0 ties every class (argmax 0 there): class 0 averages over {0}, class 1 is empty -> everything,
    # class 2 over {1, 2, 3}
    torch.testing.assert_close(wrapper(x), torch.tensor([[0.0, 3.0, 6.0]]))


def _listed_layers(text: str) -> list[str]:
    """The names ``--list-layers`` printed (the lines under each stream's header)."""
    return [line[4:].split()[0] for line in text.splitlines() if line.startswith("  ")]


def test_listed_layer_names_are_the_png_names(trained, tmp_path: Path, capsys) -> None:
    """Each name --list-layers prints is accepted by --layers as printed and is the name the PNG carries."""
    run_dir = trained("mri")
    capsys.readouterr()  # (the run's own log, when this test is the first on its worker to train it)
    assert ex.main([str(run_dir), "--list-layers"]) == 0
    listed = _listed_layers(capsys.readouterr().out)
    assert "encoder.mri.levels.1" in listed and len(listed) > 5
    chosen = [listed[0], "encoder.mri.levels.1", listed[-1]]
    with warnings.catch_warnings(record=True) as caught:  # (the first layer's input is the image: no gradient)
        warnings.simplefilter("always")
        assert ex.main([str(run_dir), "--layers", *chosen, "--method", "gradcam", "--cases", "1",
                        "--out", str(tmp_path), "--quiet"]) == 0  # fmt: skip
    assert not [w for w in caught if "backward hook" in str(w.message)], [str(w.message) for w in caught]
    case = json.loads((run_dir / "split_mri.json").read_text())["test"][0]
    names = sorted(p.name for p in (tmp_path / "mri").glob("*.png"))
    assert names == sorted(f"{case}_gradcam_{layer}.png" for layer in chosen)


def test_unknown_layer_lists_the_known_ones(trained, capsys) -> None:
    run_dir = trained("joint")
    capsys.readouterr()  # (the run's own log, when this test is the first on its worker to train it)
    assert ex.main([str(run_dir), "--list-layers"]) == 0
    listed = set(_listed_layers(capsys.readouterr().out))
    assert ex.main([str(run_dir), "--layers", "encoder.ct.levelz.9"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    prefix = "aqcf-explain: error: no such layer 'encoder.ct.levelz.9'; known layers: "
    assert err.startswith(prefix), err
    assert set(err.removeprefix(prefix).split(", ")) == listed  # exactly what --list-layers prints
    # A real layer that never runs with one modality is another error (fusion blocks need both).
    assert ex.main([str(run_dir), "--layers", "model.fusion.0"]) == 2
    assert "does not run for ct or mri" in capsys.readouterr().err


def test_explain_says_which_checkpoint_as_evaluate_does(trained, tmp_path: Path, capsys) -> None:
    run_dir = trained("mri")
    capsys.readouterr()
    ev.evaluate(run_dir, "last", out=tmp_path / "eval", write_masks=False, progress=False)
    evaluate_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("Checkpoint "))
    expected = checkpoint_info(load_checkpoint(run_dir / "last.pt"), run_dir / "last.pt")["description"]
    assert evaluate_line == f"Checkpoint {expected}."
    assert "last.pt: weights of epoch 1/1" in expected and "best.pt: epoch 1, by" in expected
    assert ex.main([str(run_dir), "--checkpoint", "last", "--cases", "1", "--method", "gradcam",
                    "--out", str(tmp_path / "cam"), "--quiet"]) == 0  # fmt: skip
    out = capsys.readouterr().out.splitlines()
    assert out[0] == evaluate_line and out[1].endswith(".png")


def test_evaluation_pads_windows_as_prediction_does(trained, datasets, tmp_path: Path) -> None:
    """MRI volumes (40x40 in-plane) are smaller than the 48x48 window: evaluation pads them with the case's
    normalised air (far below 0 after the z-score), as aqcf-predict does, so both give the same masks."""
    from aqcf_kernels.pipeline import predict as pr

    run_dir = trained("mri")
    results = ev.evaluate(run_dir, out=tmp_path / "eval", progress=False, echo=False)
    originals = _originals(datasets, "mri")
    case_ids = [row["case_id"] for row in results["modalities"]["mri"]["cases"]]
    images = [originals[case_id][0] for case_id in case_ids]
    rows = pr.predict(images, tmp_path / "predicted", run_dir, modality="mri", progress=False)
    pads = set()
    for case_id, row in zip(case_ids, rows, strict=True):
        evaluated = np.asarray(nib.load(tmp_path / "eval" / "masks" / "mri" / f"{case_id}.nii.gz").dataobj)
        predicted = np.asarray(nib.load(tmp_path / "predicted" / row["mask"]).dataobj)
        np.testing.assert_array_equal(evaluated, predicted)
    for case in prepare_data(load_for_inference(run_dir / "best.pt")[1], run_dir, progress=False)["mri"]["test"]:
        pads.add(case.pad_value)
    assert all(p < -0.5 for p in pads), pads  # padding with 0 would differ from air


def _fake_terminal(monkeypatch) -> None:
    """Make the captured stderr claim to be a terminal, so bars with ``disable=None`` draw."""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)


def _error_starts_a_line(err: str, start: str) -> None:
    # A bar left open ends with "\r<bar>" and no newline: the error would follow on the bar's line.
    assert any(line.startswith(start) for line in err.split("\n")), repr(err[-500:])


@pytest.mark.parametrize("command", ["evaluate", "explain", "preprocess"])
def test_error_lines_start_on_their_own_line(trained, datasets, tmp_path: Path, monkeypatch, capsys, command) -> None:
    """An error during a progress bar is printed after the bar is closed, never onto the bar's line."""
    import aqcf_kernels.data as data_module
    from aqcf_kernels.data import DataError

    run_dir = trained("ct")  # 3 training cases: the second fails
    calls: list[int] = []

    def fail_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise DataError("boom on the second case")
        return real(*args, **kwargs)

    if command == "evaluate":
        real = ev.score_case
        monkeypatch.setattr(ev, "score_case", fail_second)
        argv, main = [str(run_dir), "--split", "train", "--no-masks", "--out", str(tmp_path)], ev.main
    elif command == "explain":
        real = ex._figure
        monkeypatch.setattr(ex, "_figure", fail_second)
        argv = [str(run_dir), "--split", "train", "--cases", "2", "--method", "gradcam", "--out", str(tmp_path)]
        main = ex.main
    else:
        real = data_module.preprocess_case
        monkeypatch.setattr(data_module, "preprocess_case", fail_second)
        argv, main = [str(run_dir), "--no-masks", "--out", str(tmp_path)], ev.main
    _fake_terminal(monkeypatch)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{command} ct" in err  # the bar was drawn
    _error_starts_a_line(err, f"aqcf-{'explain' if command == 'explain' else 'evaluate'}: error: boom on the second")


def test_preprocessing_bar_only_on_a_terminal(datasets, tmp_path: Path, monkeypatch, capsys) -> None:
    """prepare_data (what aqcf-train calls) follows tqdm's convention, as every other bar: none on a pipe."""
    cfg = datasets.config("ct")
    capsys.readouterr()
    prepare_data(cfg, tmp_path)
    assert "preprocess" not in capsys.readouterr().err
    _fake_terminal(monkeypatch)
    prepare_data(cfg, tmp_path)
    assert "preprocess ct" in capsys.readouterr().err
    prepare_data(cfg, tmp_path, progress=False)
    assert capsys.readouterr().err == ""
