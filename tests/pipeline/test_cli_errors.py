"""The pipeline commands on user mistakes and Ctrl-C: one line, exit status 2 (130 for Ctrl-C), no traceback, and
no empty output folder left behind; checkpoints readable by others as every other file of a run is.

Every check stops before the slow work (or fakes it with monkeypatch), so each test takes about a second on the
tiny ``ct`` run of conftest.py.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from aqcf_kernels.data.outputs import OutputError, output_dir
from aqcf_kernels.pipeline import evaluate as ev
from aqcf_kernels.pipeline import explain as xp
from aqcf_kernels.pipeline import export as ex
from aqcf_kernels.pipeline import predict as pr
from aqcf_kernels.pipeline import train as tr
from aqcf_kernels.pipeline.checkpoint import load_checkpoint, save_atomic

TOOLS = ("train", "evaluate", "explain", "predict", "export")


def _one_error_line(err: str, tool: str, *needles: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"aqcf-{tool}: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _scan(datasets) -> Path:
    return datasets.ct / "Training Batch 1" / "volume-0.nii"


def _argv(tool: str, datasets, run: Path, out: Path) -> list[str]:
    if tool == "train":
        args = ["--out", str(out)]
        for item in datasets.overrides("ct"):
            args += ["--set", item]
        return args
    if tool == "predict":
        return ["-i", str(_scan(datasets)), "-o", str(out), "--run", str(run), "--quiet"]
    if tool == "export":
        return [str(run), "-o", str(out), "--quiet"]
    return [str(run), "--out", str(out), "--quiet"]


MAINS = {"train": tr.main, "evaluate": ev.main, "explain": xp.main, "predict": pr.main, "export": ex.main}


@pytest.mark.parametrize("below", [False, True], ids=["file", "under-file"])
@pytest.mark.parametrize("tool", TOOLS)
def test_output_path_that_is_or_lies_under_a_file(trained, datasets, tmp_path: Path, capsys, tool, below) -> None:
    """``--out afile`` and ``--out afile/sub``: one line naming the path (was a traceback, exit status 1)."""
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    out = afile / "sub" if below else afile
    assert MAINS[tool](_argv(tool, datasets, trained("ct"), out)) == 2
    why = f"{afile} is a file, not a folder" if below else "exists and is not a folder"
    _one_error_line(capsys.readouterr().err, tool, str(out), why)
    assert afile.read_text() == "keep me"


def test_output_dir_removes_only_what_it_created_and_left_empty(tmp_path: Path) -> None:
    kept = tmp_path / "kept"
    kept.mkdir()
    with pytest.raises(RuntimeError), output_dir(kept / "a" / "b", "-o"):
        raise RuntimeError
    assert kept.is_dir() and not (kept / "a").exists()  # both created levels removed, the existing one kept
    with pytest.raises(KeyboardInterrupt), output_dir(tmp_path / "c" / "d", "-o") as out:
        (out / "written.csv").write_text("x")
        raise KeyboardInterrupt
    assert (tmp_path / "c" / "d" / "written.csv").is_file()  # a folder holding a file stays
    (tmp_path / "f").write_text("")
    with pytest.raises(OutputError, match="exists and is not a folder"), output_dir(tmp_path / "f", "-o"):
        pass


def test_zero_size_input_names_the_file_and_writes_nothing(trained, tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((48, 48, 0), np.int16), np.eye(4)), empty)
    out = tmp_path / "out"
    assert pr.main(["-i", str(empty), "-o", str(out), "--run", str(trained("ct")), "--quiet"]) == 2
    _one_error_line(capsys.readouterr().err, "predict", str(empty), "empty volume")
    assert not out.exists()


def test_failed_prediction_leaves_no_output_folder(trained, datasets, tmp_path: Path, capsys) -> None:
    """A header that reads but data that do not (a truncated download) fail after the folder would be made."""
    broken = tmp_path / "broken.nii"
    data = _scan(datasets).read_bytes()
    broken.write_bytes(data[: len(data) - 500])
    out = tmp_path / "nested" / "out"
    assert pr.main(["-i", str(broken), "-o", str(out), "--run", str(trained("ct")), "--quiet"]) == 2
    _one_error_line(capsys.readouterr().err, "predict", str(broken), "unreadable NIfTI")
    assert not (tmp_path / "nested").exists()


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def _main(main, argv: list[str]) -> int:
    """``main(argv)``; a KeyboardInterrupt escaping it (the traceback a user saw) fails the test instead of
    ending the pytest session."""
    try:
        return main(argv)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped main() (a traceback for the user)")


def test_ctrl_c_in_predict(trained, datasets, tmp_path: Path, monkeypatch, capsys) -> None:
    """One line and status 130 (was a 23-frame traceback); no empty folder, and after a finished case its mask and
    summary.csv stay and the line says so."""
    run, out = trained("ct"), tmp_path / "out"
    monkeypatch.setattr(pr, "_predict_case", _interrupt)
    assert _main(pr.main, ["-i", str(_scan(datasets)), "-o", str(out), "--run", str(run), "--quiet"]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip() == "aqcf-predict: interrupted before the first case was written: nothing written"
    assert not out.exists()

    monkeypatch.undo()
    real = pr._predict_case
    calls: list[str] = []

    def second_interrupted(ctx, volume, modality):
        calls.append(volume.case_id)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(ctx, volume, modality)

    monkeypatch.setattr(pr, "_predict_case", second_interrupted)
    scans = [str(_scan(datasets)), str(datasets.ct / "Training Batch 1" / "volume-1.nii")]
    assert _main(pr.main, ["-i", *scans, "-o", str(out), "--run", str(run), "--quiet"]) == 130
    err = capsys.readouterr().err
    assert err.strip() == f"aqcf-predict: interrupted after 1 of 2 case(s): their masks and summary.csv are in {out}"
    assert (out / "volume-0.nii.gz").is_file() and (out / "summary.csv").read_text().count("\n") == 2


@pytest.mark.parametrize("tool", ["evaluate", "explain", "export"])
def test_ctrl_c_in_the_other_commands(trained, tmp_path: Path, monkeypatch, capsys, tool) -> None:
    """Ctrl-C on the first case (file): one line, status 130, and the output folder it created is gone."""
    target = {"evaluate": (ev, "predict_case_labels"), "explain": (xp, "predict_case_labels"),
              "export": (ex, "export_program")}[tool]  # fmt: skip
    monkeypatch.setattr(*target, _interrupt)
    out = tmp_path / "out"
    assert _main(MAINS[tool], _argv(tool, None, trained("ct"), out)) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().startswith(f"aqcf-{tool}: interrupted"), err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_max_epochs_this_run_below_1_is_refused(datasets, tmp_path: Path, capsys) -> None:
    for value in ("0", "-1"):
        with pytest.raises(SystemExit) as caught:
            tr.main([*_argv("train", datasets, tmp_path, tmp_path / "run"), "--max-epochs-this-run", value])
        assert caught.value.code == 2
        assert f"--max-epochs-this-run: must be at least 1, got {value}" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="max-epochs-this-run must be at least 1"):
        tr.train(datasets.config("ct"), tmp_path / "run", max_epochs_this_run=0)
    assert not (tmp_path / "run").exists()


def test_resume_of_a_finished_run_says_so_and_logs_nothing(trained, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained("ct"), run)
    capsys.readouterr()  # (the run's own log, when this test is the first on its worker to train it)
    before = (run / "metrics.jsonl").read_text()
    for _ in range(2):
        assert tr.main(["--out", str(run), "--resume"]) == 0
        out = capsys.readouterr().out
        last = run / "last.pt"
        assert out.strip() == f"aqcf-train: {run} is already complete ({last} holds epoch 1 of 1); nothing to train"
    assert (run / "metrics.jsonl").read_text() == before  # no "resume" row per call


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_checkpoints_get_the_mode_of_a_normal_file(tmp_path: Path, umask: int) -> None:
    """mkstemp's 0600 made last.pt/best.pt the only files of a run others could not read."""
    old = os.umask(umask)
    try:
        path = save_atomic({"config": {}, "model": {"w": torch.ones(2)}}, tmp_path / "last.pt")
        normal = tmp_path / "config.json"
        normal.write_text("{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(normal.stat().st_mode) == 0o666 & ~umask
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(2))


def test_export_quiet_silences_the_onnx_exporter(trained, tmp_path: Path, monkeypatch, capfd) -> None:
    """``--quiet`` prints nothing on success: torch's exporter logs "torchvision is not installed" and its pytree
    code a FutureWarning during every ONNX export. Stood in for by what they emit, so the test takes a second
    (the real exporter was checked by hand: nothing printed)."""

    def chatty_export(net, modality, spec, path, metadata=None):
        logging.getLogger("torch.onnx._internal.exporter._registration").warning(
            "torchvision is not installed. Skipping torchvision::nms"
        )
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated", FutureWarning, stacklevel=2)
        Path(path).write_bytes(b"onnx")
        return Path(path)

    monkeypatch.setattr(ex, "export_onnx", chatty_export)
    monkeypatch.setattr(ex, "_check_onnx_packages", lambda: None)
    argv = [str(trained("ct")), "--format", "onnx", "--no-verify", "-o", str(tmp_path / "out")]
    # the fixture trains on its first use in this worker and logs that run's lines: not the export's output
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert ex.main([*argv, "--quiet"]) == 0
    outerr = capfd.readouterr()
    assert outerr.out == "" and "torchvision" not in outerr.err, outerr
    assert not [w for w in caught if issubclass(w.category, FutureWarning)]
    assert logging.getLogger("torch.onnx").level == logging.NOTSET  # restored after the export
    with warnings.catch_warnings(record=True) as caught:  # without --quiet nothing is hidden
        warnings.simplefilter("always")
        assert ex.main(argv) == 0
    assert [w for w in caught if issubclass(w.category, FutureWarning)]


def test_several_runs_of_one_fold_get_a_plain_note(trained, tmp_path: Path, capsys) -> None:
    """The note is a ``note:`` line (and in summary.json/.md), not a Python warning showing evaluate.py's source."""
    runs = [tmp_path / "a", tmp_path / "b"]
    for run in runs:
        shutil.copytree(trained("ct"), run)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = ev.main([*map(str, runs), "--no-masks", "--quiet", "--out", str(tmp_path / "summary")])
    assert code == 0
    assert not [w for w in caught if "same fold" in str(w.message)]
    err = capsys.readouterr().err
    assert "note: several runs of the same fold ([None, None]): the summary is not a cross-validation\n" in err
    assert "evaluate.py" not in err and "warnings.warn" not in err
    summary = json.loads((tmp_path / "summary" / "summary.json").read_text())
    assert summary["notes"] == ["several runs of the same fold ([None, None]): the summary is not a cross-validation"]


@pytest.mark.parametrize("existing", [False, True], ids=["new-folder", "empty-folder"])
def test_bad_data_leaves_nothing_of_a_new_run(datasets, tmp_path: Path, capsys, existing: bool) -> None:
    # config.json and the split files were left behind when data preparation failed (bad data, Ctrl-C):
    # the same command, with the data fixed, then met "--out already holds a run"
    ct = tmp_path / "ct"
    shutil.copytree(datasets.ct, ct)
    label_path = next(ct.rglob("segmentation-0.nii"))
    label = nib.load(label_path)
    values = np.asarray(label.dataobj).copy()
    values.flat[0] = 7
    nib.save(nib.Nifti1Image(values, label.affine, label.header), label_path)
    out = tmp_path / "run"
    if existing:
        out.mkdir()
    args = ["--out", str(out)]
    for item in datasets.overrides("ct", data__ct_root=str(ct), data__cache_dir=str(tmp_path / "cache")):
        args += ["--set", item]
    assert tr.main(args) == 2
    _one_error_line(capsys.readouterr().err, "train", "segmentation-0.nii")
    assert out.is_dir() == existing
    assert not existing or not any(out.iterdir())


# ------------------------------------------------------------------------ user audit (tiny phantoms)

_PROC = pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, where no folder can be made")


@_PROC
@pytest.mark.parametrize("tool", TOOLS)
def test_output_folder_that_cannot_be_created_is_refused_first(trained, datasets, capsys, tool) -> None:
    """``--out /proc/x``: refused before the checkpoint is read (aqcf-explain printed its checkpoint line first:
    os.access says root may write in /proc, but mkdir fails there)."""
    run = trained("ct")
    capsys.readouterr()  # (the run's own log, when this test is the first on its worker to train it)
    assert MAINS[tool](_argv(tool, datasets, run, Path("/proc/x"))) == 2
    outerr = capsys.readouterr()
    _one_error_line(outerr.err, tool, "/proc/x: cannot create")
    assert outerr.out == "", outerr.out


@pytest.mark.parametrize("where", ["file", "proc"])
@pytest.mark.parametrize("tool", ["train", "evaluate", "explain"])
def test_cache_dir_that_cannot_be_a_folder_names_the_key(
    trained, datasets, tmp_path: Path, capsys, tool, where
) -> None:
    """``data.cache_dir`` an existing file: a NotADirectoryError traceback; ``/proc/x``: a line not naming the key."""
    if where == "proc" and not Path("/proc/self").is_dir():
        pytest.skip("needs Linux's /proc")
    run = trained("ct")
    capsys.readouterr()
    cache = tmp_path / "fake.txt"
    cache.write_text("not a folder")
    if where == "proc":
        cache = Path("/proc/x")
    out = tmp_path / "out"
    assert MAINS[tool]([*_argv(tool, datasets, run, out), "--set", f"data.cache_dir={cache}"]) == 2
    why = "exists and is not a folder" if where == "file" else "cannot create"
    _one_error_line(capsys.readouterr().err, tool, f"data.cache_dir={cache}: {why}")
    assert not out.exists()
    assert where == "proc" or cache.read_text() == "not a folder"


@pytest.mark.parametrize("text", ["hello\n", "- data\n- train\n"], ids=["word", "list"])
def test_config_file_that_is_not_a_mapping(tmp_path: Path, capsys, text: str) -> None:
    """Valid YAML but no sections: was ``AttributeError: 'str' object has no attribute 'items'``."""
    config = tmp_path / "config.yaml"
    config.write_text(text)
    out = tmp_path / "run"
    assert tr.main(["--config", str(config), "--out", str(out)]) == 2
    _one_error_line(capsys.readouterr().err, "train", str(config), "must be a mapping of sections")
    assert not out.exists()


def test_a_config_file_that_is_not_yaml_is_one_line(tmp_path: Path, capsys) -> None:
    """PyYAML's message spans 5 lines with a caret drawing; the error is one line saying where."""
    config = tmp_path / "config.yaml"
    config.write_text("data:\n  ct_root: [a\nmodel: {\n")
    assert tr.main(["--config", str(config), "--out", str(tmp_path / "run")]) == 2
    line = _one_error_line(capsys.readouterr().err, "train", str(config), "not valid YAML (line 3, column 6: ")
    assert "expected ',' or ']'" in line and "while parsing a flow sequence" in line


def test_failed_case_after_a_written_one_says_what_was_kept(trained, datasets, tmp_path: Path, capsys) -> None:
    """A bad later case: the error said nothing of the first case's mask and summary.csv it left behind. They stay
    (as after Ctrl-C), and the line says so; --help says so too."""
    good = _scan(datasets)
    scan = nib.load(good)
    values = np.asarray(scan.dataobj, dtype=np.float32).copy()
    values[0, 0, 0] = np.nan
    bad = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(values, scan.affine), bad)
    out = tmp_path / "out"
    assert pr.main(["-i", str(good), str(bad), "-o", str(out), "--run", str(trained("ct")), "--quiet"]) == 2
    line = _one_error_line(capsys.readouterr().err, "predict", str(bad), "NaN")
    assert line.endswith(f"; 1 of 2 case(s) were written before it: their masks and summary.csv are in {out}")
    assert (out / "volume-0.nii.gz").is_file() and (out / "summary.csv").read_text().count("\n") == 2
    assert not (out / "predict.json").exists()  # written by a complete run only
    assert "as after Ctrl-C, the cases written before it keep" in " ".join(pr.build_parser().format_help().split())


def test_nnunet_channel_files_are_refused_as_in_training(trained, datasets, tmp_path: Path, capsys) -> None:
    """``liver_0_0000`` + ``liver_0_0001`` were predicted as two cases; the training reader refuses channel 0001."""
    folder = tmp_path / "imagesTs"
    folder.mkdir()
    for channel in ("0000", "0001"):
        shutil.copy(_scan(datasets), folder / f"liver_0_{channel}.nii")
    out = tmp_path / "out"
    assert pr.main(["-i", str(folder), "-o", str(out), "--run", str(trained("ct")), "--quiet"]) == 2
    message = f"{folder / 'liver_0_0001.nii'}: channel 0001 found; this pipeline reads one channel"
    assert _one_error_line(capsys.readouterr().err, "predict") == f"aqcf-predict: error: {message}"
    assert not out.exists()
    # a name that only ends in four digits, with no _0000 file beside it, is still a case
    shutil.copy(_scan(datasets), tmp_path / "scan_2019.nii")
    assert [v.case_id for v in pr.find_inputs([tmp_path / "scan_2019.nii"])] == ["scan_2019"]


@pytest.mark.parametrize(("layout", "data_modality", "key"), [("nnunet", "mri", "ct"), ("msd", "ct", "mri")])
def test_dataset_json_modality_must_match_its_key(datasets, tmp_path: Path, capsys, layout, data_modality, key) -> None:
    """MRI data (dataset.json channel "MRI") given as data.ct_root trained silently: normalised as MRI, fed to the CT
    stream. Refused before training, naming the key, the file and the declared modality."""
    from aqcf_kernels.data.synth import write_dataset

    root = tmp_path / "data"
    write_dataset(root, layout, 3, modality=data_modality, shape=(24, 24, 6), progress=False)
    out, cache = tmp_path / "run", tmp_path / "cache"
    args = ["--out", str(out)]
    for item in datasets.overrides(key, **{f"data__{key}_root": str(root), "data__cache_dir": str(cache)}):
        args += ["--set", item]
    assert tr.main(args) == 2
    declared = {"ct": "CT", "mri": "MRI"}[data_modality]
    _one_error_line(capsys.readouterr().err, "train", f"data.{key}_root={root}", "dataset.json", f"'{declared}'")
    assert not out.exists() and not cache.exists()


def _exported_program(path: Path) -> Path:
    """A torch.export archive (of a tiny Linear: what matters here is the file format, not the model)."""
    program = torch.export.export(torch.nn.Linear(2, 2), (torch.randn(1, 2),))
    torch.export.save(program, path)
    return path


@pytest.mark.parametrize("tool", ["evaluate", "explain"])
def test_exported_program_is_not_a_training_checkpoint(trained, tmp_path: Path, capsys, tool) -> None:
    """``--checkpoint FILE.pt2`` said "PytorchStreamReader failed locating file data.pkl ... corrupted"."""
    run = trained("ct")
    capsys.readouterr()
    program = _exported_program(tmp_path / "best-ct.pt2")
    out = tmp_path / "out"
    assert MAINS[tool]([str(run), "--checkpoint", str(program), "--out", str(out), "--quiet"]) == 2
    _one_error_line(capsys.readouterr().err, tool, str(program), "exported program",
                    f"aqcf-{tool} needs a training checkpoint (.pt")  # fmt: skip
    renamed = program.rename(tmp_path / "model.pt")  # the same file under a checkpoint's name: found by its content
    assert MAINS[tool]([str(run), "--checkpoint", str(renamed), "--out", str(out), "--quiet"]) == 2
    line = _one_error_line(capsys.readouterr().err, tool, str(renamed), "is an exported program", "training checkpoint")
    assert "data.pkl" not in line and "corrupted" not in line
    assert not out.exists()


@pytest.mark.parametrize("tool", ["evaluate", "explain", "predict", "export"])
def test_a_checkpoint_its_config_does_not_describe_is_one_line(trained, datasets, tmp_path: Path, capsys, tool) -> None:
    """Weights that do not fit the model of the checkpoint's own config (a hand-edited file): evaluate and explain
    printed load_state_dict's traceback, predict and export one line; now all four that line."""
    run = trained("ct")
    capsys.readouterr()
    ckpt = torch.load(run / "best.pt", weights_only=True)
    ckpt["config"]["model"]["features"] = [f * 2 for f in ckpt["config"]["model"]["features"]]
    edited = tmp_path / "edited.pt"
    torch.save(ckpt, edited)
    out = tmp_path / "out"
    assert MAINS[tool]([*_argv(tool, datasets, run, out), "--checkpoint", str(edited)]) == 2
    _one_error_line(capsys.readouterr().err, tool, str(edited), "does not load into the model its config describes")
    assert not out.exists()


@pytest.mark.parametrize("tool", ["evaluate", "explain"])
def test_a_missing_exported_file_is_missing_not_the_wrong_kind(trained, tmp_path: Path, capsys, tool) -> None:
    """A mistyped ``--checkpoint x.pt2`` was refused as "an exported program": it does not exist."""
    run = trained("ct")
    capsys.readouterr()
    missing = tmp_path / "nowhere" / "model.pt2"
    assert MAINS[tool]([str(run), "--checkpoint", str(missing), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    line = _one_error_line(capsys.readouterr().err, tool, str(missing), "does not exist")
    assert "exported program" not in line


def test_run_folder_without_checkpoints_or_with_fold_folders(trained, tmp_path: Path, capsys) -> None:
    """aqcf-export of an empty folder said "(it has )"; evaluate/explain of a cross-validation's parent folder said
    only "best.pt does not exist": now what it holds and how to pass its folds."""
    empty = tmp_path / "empty"
    empty.mkdir()
    assert ex.main([str(empty), "-o", str(tmp_path / "out"), "--quiet"]) == 2
    line = _one_error_line(capsys.readouterr().err, "export", str(empty), "holds no checkpoints")
    assert "it has )" not in line
    cv = tmp_path / "cv"
    for k in (0, 1, "all"):
        shutil.copytree(trained("ct"), cv / f"fold_{k}")
    capsys.readouterr()
    # a summary over the cross-validation takes its numbered folds, not fold_all (as aqcf-predict's ensemble)
    hints = {
        "evaluate": f"pass them as run folders, aqcf-evaluate {cv / 'fold_0'} {cv / 'fold_1'}",
        "explain": f"pass one of them, e.g. aqcf-explain {cv / 'fold_0'}",
        "export": f"pass one of them, e.g. aqcf-export {cv / 'fold_0'}",
    }
    for tool, hint in hints.items():
        assert MAINS[tool](_argv(tool, None, cv, tmp_path / "out")) == 2
        line = _one_error_line(capsys.readouterr().err, tool, "holds the fold folders fold_0, fold_1, fold_all", hint)
        assert line.endswith(hint), line
    assert not (tmp_path / "out").exists()


def test_help_states_defaults_without_rst_markup(capsys) -> None:
    """--help of every pipeline command: defaults stated, no reStructuredText roles or literals shown raw."""
    parsers = {"train": tr.build_parser, "evaluate": ev.build_parser, "explain": xp.build_parser,
               "predict": pr.build_parser, "export": ex.build_parser}  # fmt: skip
    texts = {tool: " ".join(build().format_help().split()) for tool, build in parsers.items()}
    for tool, text in texts.items():
        for markup in ("``", ":func:", ":class:", ":mod:", ":attr:"):
            assert markup not in text, (tool, markup)
    explain = texts["explain"]
    assert "stream(s) to explain (default both" in explain
    assert "Grad-CAM, Grad-CAM++ or both (default both)" in explain
    assert "which part of the saved split (default test)" in explain
    assert "auto (CUDA when present, else CPU" in texts["export"]
    assert texts["train"].count("aqcf-train: unpaired joint training") == 1


def test_explain_cases_below_1_names_the_option(trained, tmp_path: Path, capsys) -> None:
    run = trained("ct")
    capsys.readouterr()
    assert xp.main([str(run), "--cases", "0", "--out", str(tmp_path / "out"), "--quiet"]) == 2
    _one_error_line(capsys.readouterr().err, "explain", "--cases must be at least 1, got 0")
    assert not (tmp_path / "out").exists()
