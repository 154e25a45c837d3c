"""The CPU inference benchmark's harness (``python -m benchmarks.predict``): the quick size end to end,
both providers in their own processes, and the report (ratios, peak memory, allocator settings)."""

from __future__ import annotations

import json

import pytest

from benchmarks import predict as bench


def test_allocator_settings_name_only_allocator_variables() -> None:
    env = {
        "MALLOC_MMAP_MAX_": "0",
        "MALLOC_CONF": "background_thread:true",
        "LD_PRELOAD": "/usr/lib/libjemalloc.so.2",
        "GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1",
        "TCMALLOC_RELEASE_RATE": "0",
        "PATH": "/usr/bin",
        "OMP_NUM_THREADS": "2",
    }
    assert list(bench.allocator_settings(env)) == [
        "GLIBC_TUNABLES", "LD_PRELOAD", "MALLOC_CONF", "MALLOC_MMAP_MAX_", "TCMALLOC_RELEASE_RATE",
    ]  # fmt: skip
    assert bench.allocator_settings({"PATH": "/usr/bin"}) == {}


@pytest.mark.parametrize("malloc", ["keep", "default"])
def test_quick_run_reports_both_providers(tmp_path, monkeypatch, malloc: str) -> None:
    for k in list(bench.allocator_settings()):
        monkeypatch.delenv(k)
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")  # an allocator variable the report must name
    args = ["--quick", "--out", str(tmp_path / "out")] + (["--malloc", malloc] if malloc != "keep" else [])
    assert bench.main(args) == 0
    result = json.loads((tmp_path / "out" / "predict.json").read_text())
    base, ours = result["providers"]["baseline"], result["providers"]["ours"]
    assert result["shape"] == [96, 96, 8] and result["reps"] == 1
    assert result["speedup"] == pytest.approx(base["seconds_per_case"] / ours["seconds_per_case"])
    for r in (base, ours):
        assert r["seconds_per_case"] > 0 and r["peak_rss_bytes"] > 0
    # The same synthetic scan and weights: both builds find the same tumour volume (within a few
    # voxels of 1.5e-3 mL each, where float rounding may flip an argmax).
    assert ours["tumour_ml"] == pytest.approx(base["tumour_ml"], abs=0.01)
    text = (tmp_path / "out" / "predict.md").read_text()
    assert "| baseline |" in text and "| ours     |" in text
    assert result["malloc"] == malloc and result["allocator"] == {"MALLOC_ARENA_MAX": "4"}
    assert f"allocator: --malloc {malloc}, environment MALLOC_ARENA_MAX=4\n" in text
