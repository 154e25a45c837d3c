"""``--malloc keep`` (aqcf-predict, aqcf-evaluate): glibc then serves large allocations from its heap
and keeps freed memory, so a large tensor allocated again costs no page faults. The setting is
process-wide: it is checked in fresh interpreters, never in the test process."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest

from aqcf_kernels.pipeline import allocator, evaluate, predict

# Minor page faults of 4 allocate-and-fills of a 64 MiB tensor after 2 more (above glibc's largest
# mmap threshold, 32 MiB: by default every one is fresh pages from the kernel).
FAULTS = textwrap.dedent(
    """
    import resource, sys
    import torch
    from aqcf_kernels.pipeline.allocator import apply_malloc_choice
    apply_malloc_choice(sys.argv[1])
    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(2):  # warm-up: torch's thread pool starts on the first fill
        torch.empty(16 * 2**20).fill_(1)
    counts = []
    for _ in range(4):
        before = faults()
        torch.empty(16 * 2**20).fill_(1)
        counts.append(faults() - before)
    print(*counts)
    """
)


def _faults(choice: str) -> list[int]:
    out = subprocess.run([sys.executable, "-c", FAULTS, choice], capture_output=True, text=True, check=True)
    return [int(v) for v in out.stdout.split()]


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's"
)
def test_keep_stops_the_page_faults_of_a_large_allocation() -> None:
    pages = 16 * 2**20 * 4 // 4096
    default, keep = _faults("default"), _faults("keep")
    assert all(f >= pages // 2 for f in default), default  # fresh pages, every time
    # The freed block is reused. (On a busy machine the block freed first was once not the one
    # reused, [16384, 0] after one warm-up: one round may still fault, the steady state may not.)
    assert sum(f >= pages // 2 for f in keep) <= 1 and keep[-1] < pages // 50, keep


def test_keep_explains_where_it_cannot_apply(monkeypatch) -> None:
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("musl", "1.2"))
    monkeypatch.setattr(allocator.sys, "platform", "linux")
    assert allocator.keep_freed_memory() == "the C library is musl, not glibc"
    monkeypatch.setattr(allocator.sys, "platform", "darwin")
    assert "not darwin" in allocator.keep_freed_memory()
    assert "not darwin" in allocator.apply_malloc_choice("keep")  # a reason, logged, not an error
    assert allocator.apply_malloc_choice("default") is None


def test_commands_take_malloc(tmp_path) -> None:
    p = predict.build_parser()
    args = p.parse_args(["-i", "x.nii.gz", "-o", str(tmp_path), "--run", str(tmp_path)])
    assert args.malloc == "keep"
    assert p.parse_args(["-i", "x", "-o", "y", "--run", "z", "--malloc", "default"]).malloc == "default"
    assert evaluate.build_parser().parse_args([str(tmp_path)]).malloc == "keep"
    with pytest.raises(SystemExit):
        p.parse_args(["-i", "x", "-o", "y", "--run", "z", "--malloc", "jemalloc"])
    with pytest.raises(ValueError, match="--malloc must be one of keep, default, got 'jemalloc'"):
        allocator.apply_malloc_choice("jemalloc")
