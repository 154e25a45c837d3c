"""The attention benchmark measures what it says: ``ours/triton`` runs the Triton attention backend for
its whole step (the backward too), ``ours`` the registry's pick, and the GPU target check reads the
worst fwd+bwd ratio to ``sdpa`` over 1k-16k tokens."""

from __future__ import annotations

import pytest
import torch

from aqcf_kernels import backends
from aqcf_kernels.backends.triton import common as triton_common
from benchmarks import common
from benchmarks.attention import Case, Result, build, check_targets, make_block, make_inputs, make_step


def _spy_on(monkeypatch, backend_name: str) -> list[str]:
    backend = backends.registered("attention")[backend_name]
    calls: list[str] = []
    for method in ("cross_attention", "cross_attention_backward"):
        original = getattr(backend, method)

        def spy(*args, _original=original, _method=method):
            calls.append(_method)
            return _original(*args)

        monkeypatch.setattr(backend, method, spy)
    return calls


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize(("provider", "backend"), [("ours", "torch"), ("ours/triton", "triton")])
def test_provider_runs_its_backend_for_the_whole_step(provider, backend, mode, monkeypatch):
    if backend == "triton" and backends.registered("attention")["triton"].unavailable():
        pytest.skip(f"triton attention unavailable here: {triton_common.IMPORT_ERROR or 'no interpreter'}")
    monkeypatch.delenv("AQCF_BACKEND", raising=False)
    case = Case(tokens=8, channels_q=4, heads=1)
    block = make_block(case, torch.float32, torch.device("cpu"))
    inputs = make_inputs(case, torch.float32, torch.device("cpu"))
    calls = _spy_on(monkeypatch, backend)
    make_step(mode, build(provider, block), block, inputs, provider)()
    expected = ["cross_attention"] + (["cross_attention_backward"] if mode == "fwdbwd" else [])
    assert calls == expected


def _row(tokens: int, sdpa_ms: float, ours_ms: float, triton_ms: float | None) -> Result:
    def timing(ms):
        return None if ms is None else common.Timing.of([ms / 1e3])

    timings = {"naive": None, "sdpa": timing(sdpa_ms), "ours": timing(ours_ms), "ours/triton": timing(triton_ms)}
    return Result(Case(tokens), "fwdbwd", timings, {})


def test_gpu_targets_take_the_worst_case_in_range():
    rows = [
        _row(256, 1.0, 2.0, 2.0),  # below the range: ignored
        _row(1024, 1.0, 1.0, 1.6),
        _row(4096, 4.0, 4.2, 5.0),  # ours 0.952x: the worst in range
        _row(16384, 40.0, 38.0, 45.0),
    ]
    ours, triton = check_targets(rows, "cuda")
    assert ours["status"] == "PASS" and ours["value"] == pytest.approx(4.0 / 4.2)
    assert "N4096" in ours["detail"]
    assert triton["status"] == "FAIL" and triton["value"] == pytest.approx(1.0 / 1.6)


def test_gpu_targets_skip_what_was_not_run():
    ours, triton = check_targets([_row(1024, 1.0, 0.8, None)], "cuda")
    assert ours["status"] == "PASS" and triton["status"] == "SKIP"


def test_cpu_targets_skip_in_another_dtype():
    """The CPU targets are stated for N=4096 in float32: a float64 run said PASS/FAIL on them."""
    from benchmarks.attention import TARGET_CASE

    row = Result(TARGET_CASE, "fwdbwd", {k: common.Timing.of([1e-3]) for k in ("naive", "sdpa", "ours")}, {})
    assert {c["status"] for c in check_targets([row], "cpu", torch.float64)} == {"SKIP"}
    speed = [c for c in check_targets([row], "cpu", torch.float32) if c["target"].startswith("speed")]
    assert len(speed) == 2 and all(c["status"] in ("PASS", "FAIL") for c in speed)  # (no peaks: memory is SKIP)


def test_stdout_is_the_report_alone(tmp_path, capsys):
    """As conv's: the markdown report on stdout, the "wrote ..." line on stderr with the progress."""
    from benchmarks import cli

    out = tmp_path / "out"
    argv = ["attention", "--tokens", "64", "--channels", "8", "--heads", "1", "--providers", "sdpa,ours",
            "--modes", "fwd", "--reps", "1", "--warmup", "0", "--no-memory", "--out", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == (out / "attention.md").read_text().strip()
    assert f"wrote {out}/attention.md" in captured.err
