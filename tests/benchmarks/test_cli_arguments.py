"""``aqcf-bench`` (and ``python -m benchmarks.predict`` / ``benchmarks.gpu_stages``) refuse a bad argument
with one line naming it and exit 2, before any work (never a traceback, never after the benchmark); and a
run removes its temporary tuning folder when it ends, error or not.

Every test here stubs out the benchmark itself: a value that got through would fail the test, not run a grid.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import tempfile
from pathlib import Path

import pytest
import torch

from aqcf_kernels.data import outputs
from benchmarks import attention, cli, common, conv, gpu_stages, model, predict, rnn


@pytest.fixture
def no_benchmark(monkeypatch):
    """Any family's benchmark (or predict's, or a GPU stage) starting fails the test."""

    def ran(*args, **kwargs):
        pytest.fail("the benchmark started: the bad argument was not refused first")

    for module in (conv, attention, model, rnn):
        monkeypatch.setattr(module, "run", ran)
    monkeypatch.setattr(predict, "run_benchmark", ran)
    monkeypatch.setattr(gpu_stages, "STAGES", {name: ran for name in gpu_stages.STAGES})


@pytest.fixture
def a_file(tmp_path) -> Path:
    path = tmp_path / "afile"
    path.write_text("not a folder")
    return path


def _refused(capsys, main, argv: list[str], argument: str) -> str:
    """``main(argv)`` exits 2 with argparse's one error line naming ``argument``; that line."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and f"error: argument {argument}: " in errors[0], err
    return errors[0]


BAD_VALUES = [
    (["conv", "--device", "tpu"], "--device"),
    (["conv", "--device", "cuda:notanindex"], "--device"),
    (["conv", "--device", "meta"], "--device"),
    (["attention", "--tokens", "-5"], "--tokens"),
    (["attention", "--channels", "0"], "--channels"),
    (["attention", "--heads", "-1"], "--heads"),
    (["attention", "--batch", "0"], "--batch"),
    (["attention", "--naive-max-gib", "-1"], "--naive-max-gib"),
    (["rnn", "--reps", "-3"], "--reps"),
    (["conv", "--reps", "0"], "--reps"),
    (["model", "--threads", "0"], "--threads"),
    (["rnn", "--warmup", "-1"], "--warmup"),
    (["conv", "--min-time", "-1"], "--min-time"),
    (["conv", "--min-time", "nan"], "--min-time"),
    (["conv", "--load", "-1"], "--load"),
]


@pytest.mark.parametrize(("argv", "argument"), BAD_VALUES, ids=[" ".join(argv) for argv, _ in BAD_VALUES])
def test_a_bad_value_is_refused_naming_its_argument(argv, argument, tmp_path, capsys, no_benchmark) -> None:
    _refused(capsys, cli.main, [*argv, "--out", str(tmp_path / "out")], argument)


def test_cuda_is_refused_where_torch_has_none(tmp_path, capsys, monkeypatch, no_benchmark) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = _refused(capsys, cli.main, ["conv", "--device", "cuda", "--out", str(tmp_path)], "--device")
    assert "CUDA is not available" in line


def test_an_output_folder_that_cannot_be_created_is_refused_before_the_run(a_file, capsys, no_benchmark) -> None:
    for family in ("conv", "attention", "model", "rnn"):
        line = _refused(capsys, cli.main, [family, "--out", str(a_file / "x")], "--out")
        assert f"{a_file} is a file, not a folder" in line
    _refused(capsys, cli.main, ["rnn", "--out", str(a_file)], "--out")


def test_an_output_folder_a_mount_refuses_is_refused_before_the_run(tmp_path, capsys, monkeypatch, no_benchmark):
    """Permission bits pass (root writes anywhere; /proc or a read-only mount still refuse): the benchmark once
    ran to its end and then failed to write its files."""

    def read_only(**kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(outputs.tempfile, "mkdtemp", read_only)
    line = _refused(capsys, cli.main, ["conv", "--out", str(tmp_path)], "--out")
    assert f"cannot write in the folder ({os.strerror(errno.EROFS)})" in line
    monkeypatch.undo()
    if Path("/proc/self").is_dir():  # Linux: a real folder nobody can create files in
        _refused(capsys, cli.main, ["conv", "--out", "/proc/aqcf-bench-out"], "--out")
        _refused(capsys, cli.main, ["conv", "--out", "/proc"], "--out")


def test_the_default_output_folder_is_checked_unless_the_run_only_lists(tmp_path, capsys, monkeypatch, no_benchmark):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bench-out").write_text("a file where the default folder would be")
    assert cli.main(["conv", "--no-memory"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("aqcf-bench conv: error: argument --out: ") and "not a folder" in err, err
    assert cli.main(["conv", "--list"]) == 0  # listing writes nothing
    assert "cases" in capsys.readouterr().out


def test_an_empty_list_says_so(tmp_path, capsys, no_benchmark) -> None:
    line = _refused(capsys, cli.main, ["conv", "--modes", ",", "--out", str(tmp_path)], "--modes")
    assert "names none" in line
    line = _refused(capsys, cli.main, ["conv", "--modes", "fwd,sideways", "--out", str(tmp_path)], "--modes")
    assert "'sideways': not one of" in line


def test_load_is_bounded_by_the_cores(tmp_path, capsys, no_benchmark) -> None:
    """``--load 999`` once started 999 spinning processes (load average ~205 on 2 cores)."""
    cores = os.cpu_count() or 1
    line = _refused(capsys, cli.main, ["conv", "--load", str(100 * cores), "--out", str(tmp_path)], "--load")
    assert f"on {cores} cores" in line and "per core" in line
    limit = common.MAX_LOAD_PER_CORE * cores
    assert f"at most {limit}" in line
    assert cli.build_parser().parse_args(["conv", "--load", str(limit)]).load == limit
    _refused(capsys, cli.main, ["conv", "--load", str(limit + 1), "--out", str(tmp_path)], "--load")


def test_good_values_still_parse(tmp_path) -> None:
    args = cli.build_parser().parse_args(
        ["attention", "--tokens", "256,1024,", "--channels", "8", "--heads", "2", "--device", "cpu",
         "--warmup", "0", "--naive-max-gib", "0", "--out", str(tmp_path / "new" / "folder")]
    )  # fmt: skip
    assert args.tokens == [256, 1024] and args.channels == 8 and args.device == "cpu" and args.warmup == 0
    assert args.out == tmp_path / "new" / "folder" and not args.out.exists()  # checked, not created
    assert list(tmp_path.iterdir()) == []  # nor is anything else left there
    assert cli.build_parser().parse_args(["conv"]).out == Path("bench-out")
    assert cli.build_parser().parse_args(["conv", "--min-time", "0"]).min_time == 0.0


def test_heads_that_do_not_divide_the_channels_are_refused(tmp_path, capsys, no_benchmark) -> None:
    argv = ["attention", "--channels", "6", "--heads", "4", "--no-memory", "--out", str(tmp_path / "out")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "--channels 6 is not a multiple of --heads 4" in err


LATE_REFUSALS = [  # values judged after parsing (against another option), each with its message
    (["attention", "--channels", "6", "--heads", "4"], "aqcf-bench attention: error: --channels 6 is not a multiple"),
    (["attention", "--modes", "sideways"], "aqcf-bench attention: error: unknown mode/provider ['sideways']"),
    (["conv", "--cases", "no such case"], "aqcf-bench conv: error: no case of grid 'quick' matches"),
    (["model", "--providers", "nobody"], "aqcf-bench model: error: unknown mode/provider ['nobody']"),
    (["rnn", "--cells", "gru9"], "aqcf-bench rnn: error: unknown mode/provider/cell ['gru9']"),
    # a provider that forces a backend the device cannot run (it was a BackendError traceback mid-run)
    (
        ["conv", "--device", "cpu", "--providers", "cuda"],
        "aqcf-bench conv: error: --providers cuda: the cuda backend cannot run here: it runs on cuda tensors",
    ),
]


@pytest.mark.parametrize(("argv", "message"), LATE_REFUSALS, ids=[" ".join(a) for a, _ in LATE_REFUSALS])
def test_a_value_refused_after_parsing_reads_as_a_usage_error(argv, message, tmp_path, capsys, no_benchmark):
    """As argparse's own refusals: ``aqcf-bench FAMILY: error: ...``, exit status 2, no traceback."""
    assert cli.main([*argv, "--no-memory", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith(message), err


def test_predict_and_gpu_stages_refuse_bad_values(tmp_path, a_file, capsys, no_benchmark) -> None:
    _refused(capsys, predict.main, ["--quick", "--reps", "0", "--out", str(tmp_path)], "--reps")
    _refused(capsys, predict.main, ["--quick", "--threads", "-2", "--out", str(tmp_path)], "--threads")
    _refused(capsys, predict.main, ["--quick", "--out", str(a_file / "x")], "--out")
    _refused(capsys, gpu_stages.main, ["norm", str(a_file / "x"), "--device", "cpu", "--small"], "out")
    _refused(capsys, gpu_stages.main, ["norm", str(tmp_path), "--device", "tpu", "--small"], "--device")


# ---------------------------------------------------------------------------------------------
# The temporary tuning folder
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def bench_tmp(tmp_path, monkeypatch) -> Path:
    """Where this test's run makes its temporary folders (other processes' stay out of the count), and
    no tuning cache given by the caller (tests/conftest.py sets one), so the run makes its own."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    monkeypatch.delenv("AQCF_TUNING_CACHE", raising=False)
    monkeypatch.delenv(common.TUNING_DIR_ENV, raising=False)
    return folder


def _tuning_folder_in_use(seen: list[Path]) -> None:
    """What a run does with its folder: the tuning caches are written there."""
    folder = Path(os.environ[common.TUNING_DIR_ENV])
    assert folder.is_dir() and Path(os.environ["AQCF_TUNING_CACHE"]).parent == folder
    (folder / "tuning-a-workload.json").write_text("{}")
    seen.append(folder)


RNN_ARGS = ["rnn", "--cells", "ligru", "--reps", "2", "--no-memory"]


def test_a_run_removes_its_tuning_folder(bench_tmp, tmp_path, monkeypatch) -> None:
    seen: list[Path] = []
    monkeypatch.setattr(rnn, "run", lambda *args, **kwargs: _tuning_folder_in_use(seen) or [])
    monkeypatch.setattr(rnn, "plot", lambda *args: None)  # (no results to plot)
    assert cli.main([*RNN_ARGS, "--out", str(tmp_path / "out")]) == 0
    assert len(seen) == 1 and not seen[0].exists()
    assert list(bench_tmp.iterdir()) == []
    assert "AQCF_TUNING_CACHE" not in os.environ and common.TUNING_DIR_ENV not in os.environ


def test_a_failed_run_removes_its_tuning_folder(bench_tmp, tmp_path, monkeypatch) -> None:
    seen: list[Path] = []

    def fails(*args, **kwargs):
        _tuning_folder_in_use(seen)
        raise RuntimeError("a kernel failed")

    monkeypatch.setattr(rnn, "run", fails)
    with pytest.raises(RuntimeError, match="a kernel failed"):
        cli.main([*RNN_ARGS, "--out", str(tmp_path / "out")])
    assert len(seen) == 1 and list(bench_tmp.iterdir()) == []
    assert "AQCF_TUNING_CACHE" not in os.environ


def test_sigterm_ends_the_run_through_the_cleanup(bench_tmp, tmp_path, monkeypatch) -> None:
    """gpu_suite.sh's ``timeout`` cuts a stage with SIGTERM: the folder goes too. (The handler the run
    installs is called directly: a real signal would kill pytest where none is installed.)"""
    seen: list[Path] = []
    before = signal.getsignal(signal.SIGTERM)

    def terminated(*args, **kwargs):
        _tuning_folder_in_use(seen)
        handler = signal.getsignal(signal.SIGTERM)
        assert callable(handler), "no SIGTERM handler: the process would die without its cleanups"
        handler(signal.SIGTERM, None)

    monkeypatch.setattr(rnn, "run", terminated)
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*RNN_ARGS, "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 128 + signal.SIGTERM
    assert len(seen) == 1 and list(bench_tmp.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) == before


@pytest.mark.parametrize("family", list(cli.FAMILIES))
def test_help_shows_no_rst_markup(family, capsys) -> None:
    """The descriptions are the modules' docstrings, reStructuredText for the API docs: --help shows them plain."""
    with pytest.raises(SystemExit) as stop:
        cli.main([family, "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert "``" not in out and not re.search(r":(func|class|mod|meth|data|attr):`", out), out
