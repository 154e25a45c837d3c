"""Static proof (issue 13) of the weight-gradient GEMM (aqcf_kernels/backends/triton/igemm_wgrad.py): what an
H100/H200 would run, read without a GPU.

Every autotune config the launcher may pick for each case (igemm_wgrad.gpu_configs() after
igemm_wgrad.prune_configs(); cases in ``tools/triton_resources.py`` ``wgrad_variants``: 2d 64q bf16/fp16,
16q, 10q, 8q, groups 2 and 4, the transposed conv's weight gradient, 3d, 1d, fp32 with TF32 and in IEEE fp32;
fast8, the same GEMM on the combinations of gy and conj(x), one per product and group: 64q, 40q and 128q bf16,
groups 4, TF32) is compiled for sm_90 by **triton 3.6** with a real launch's specialisation, by
``tools/triton_resources.py --wgrad`` in a subprocess (triton 3.6 found as in test_igemm_static.py). The
criteria, on the GEMM's pixel loop (the bias programs' loop has no dot):

* 0 bytes of stack (spills) per thread;
* fp16/bf16: no scalar 2-byte global loads in the main loop;
* fp16/bf16 tiles ≥ 64 rows: one 16-byte async copy per operand tile (gy: BLOCK_K x BLOCK_M, x: BLOCK_K x
  BLOCK_N for each of the program's column blocks), no plain ``tt.load`` in the loop, and wgmma kept in
  flight (``wgmma.wait_group`` with ≥ 1 pending). Narrower tiles (8q layers, groups of ≤ 32 channels)
  compile to ``mma.sync`` with gy through registers;
* the best kept config of each target case (64q, 16q, fast8 at 64q and 128q) issues its step in fewer
  clocks than its MMAs take.

The reduce-and-fold kernel is compiled too (hamilton's 16 blocks with bf16 and fp32 outputs, fast8's 8 products
with bf16): the tool exits non-zero, failing the
fixture, if it spills. fp32 variants of the GEMM are compiled and printed (no spills asserted, nothing
else): IEEE fp32 has no tensor-core instruction; TF32 compiles to wgmma in flight too (see the output).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .test_igemm_static import ROOT, TRITON36, WHY_NOT, check_issue_shares, triton36_env

pytestmark = pytest.mark.skipif(TRITON36 is None, reason=WHY_NOT)


@pytest.fixture(scope="module")
def variants(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("wgrad-static") / "figures.json"
    env = triton36_env()
    cmd = [sys.executable, str(ROOT / "tools" / "triton_resources.py"), "--wgrad", "--json", str(out)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    print("\n" + result.stdout)  # registers, shared memory, spills, ... per variant
    return json.loads(out.read_text())


def _name(v: dict) -> str:
    tiles = "x".join(map(str, v["tiles"])) + (f" ({v['runs']} blocks)" if v["runs"] > 1 else "")
    tiles += f" ({v['products']} products)" if v["products"] > 1 else ""
    return f"{v['case']} {v['dtype']}/{v['precision']} {tiles} w{v['num_warps']} s{v['num_stages']}"


def _half(v: dict) -> bool:
    return v["dtype"] in ("fp16", "bf16")


def test_every_config_and_case_compiled(variants):
    cases = {(v["case"], v["dtype"], v["precision"]) for v in variants}
    assert len(cases) >= 12 and len(variants) >= 20, cases
    assert {v["dtype"] for v in variants} == {"bf16", "fp16", "fp32"}
    for v in variants:
        print(f"{_name(v):44} regs {v['regs']:3}  smem {v['smem']:6} B  stack {v['stack']} B  splits {v['splits']}")


def test_no_spills(variants):
    bad = [f"{_name(v)}: {v['stack']} B" for v in variants if v["stack"] != 0]
    assert not bad, "stack (spills) per thread: " + "; ".join(bad)


def test_no_scalar_two_byte_loads_in_main_loop(variants):
    bad = [f"{_name(v)}: {v['scalar_2byte_loads_in_loop']}" for v in variants if v["scalar_2byte_loads_in_loop"]]
    assert not bad, "scalar 2-byte ld.global in the main loop: " + "; ".join(bad)


def test_async_copies_for_both_operands(variants):
    """On the wgmma tiles (≥ 64 rows). The narrow ones (mma.sync) take gy through registers: no async copy
    of it, but no scalar 2-byte loads either (test above)."""
    bad = []
    for v in [v for v in variants if _half(v) and v["tiles"][0] >= 64]:
        m, n, k = v["tiles"]
        copies = [sorted(c) for c in v["async_copies_per_loop"]]
        if (
            any(c != sorted([f"{k}x{m}"] * v["products"] + [f"{k}x{n}"] * v["runs"] * v["products"]) for c in copies)
            or v["plain_loads_in_loop"]
            or v["cp_async_bytes"] != [16]
        ):
            loads, widths = v["plain_loads_in_loop"], v["cp_async_bytes"]
            bad.append(f"{_name(v)}: async copies {copies}, tt.load {loads}, cp.async widths {widths} B")
    assert not bad, "; ".join(bad)


def test_wgmma_in_flight_where_tiles_allow(variants):
    wide = [v for v in variants if _half(v) and v["tiles"][0] >= 64]
    assert len(wide) >= 10
    bad = []
    for v in wide:
        pendings = v["wait_pendings_in_loop"]
        if not v["wgmma_in_loop"] or not pendings or min(pendings) < 1:
            bad.append(f"{_name(v)}: {v['wgmma_in_loop']} wgmma, waits {pendings}, {v['mma_sync_in_loop']} mma.sync")
    assert not bad, "; ".join(bad)
    narrow = [v for v in variants if _half(v) and v["tiles"][0] < 64]
    assert all(v["mma_sync_in_loop"] or v["wgmma_in_loop"] for v in narrow), [_name(v) for v in narrow]


@pytest.mark.parametrize(
    "cases",
    [{"2d 64q", "2d 64q no bias", "2d 64q T s2"}, {"2d 16q"}, {"2d 64q fast8", "2d 128q fast8"}],
    ids=["wide", "16q", "fast8"],
)
def test_best_kept_config_is_not_issue_bound(variants, cases):
    """As in test_igemm_static.py: the best kept config of each case issues its pixel step in fewer clocks than
    its MMAs take. Wide layers do (0.42 at 256×128×64; 1.06 before 2026-12-05, when the loop checked and
    carried the size-1 dims of a 2d conv and masked whole pixel steps). A 16q layer's runs of 64 channels
    cap its blocks at 64×64 (2.15 before, then 1.45: issue-bound); a program now takes 4 blocks (4 taps) on
    one gy tile, 434 instructions per step for 4 blocks' MMAs: 0.85. fast8's GEMMs (one per product) have
    runs of Cg channels: 64q likewise (1.46 -> 0.85), 128q 0.71 at 128×128; a program taking one tile of each
    of four products (four gy tiles, four x tiles, four dots a step on one set of pixel counters and tap
    masks): 64q 0.70 (356 instructions a step at 64×64×64 on 4 warps), 128q 0.56 (128×64×64 on 8 warps)."""
    check_issue_shares([dict(v, fast8=False) for v in variants], cases)
