"""Static proof (issue 13) of the A-QCF attention's Triton kernels: what an H100/H200 would run, read without a GPU.

Each kernel (the forward, the dk/dv and the dq halves of the backward) is compiled for sm_90 by **triton 3.6**
in the configuration its launcher takes on a GPU (``attention.gpu_tiles``), with the specialisation a real
launch gets (``tools/triton_resources.py --attention``, in a subprocess), at head sizes E from 16 to 256 reals
(48 and 96 masked to the next power of two): bf16 at each, fp16, fp32 with TF32 and in IEEE fp32 (fp32's
default) at some. The criteria, for every variant:

* 0 bytes of stack (spills) per thread;
* at most an H100's 227 KB of shared memory per program (more, and the launch fails on an H100: the launcher
  would fall back to a smaller configuration, tests/attention/test_triton_attention.py);
* one MMA loop;
* in half precision: no scalar 2-byte global loads in that loop, and both of the loop's operand tiles (k and v
  in the forward and dq kernels, q and dO in dk/dv) copied asynchronously, 16 bytes a ``cp.async`` (or a thread's
  whole share of a smaller tile);
* with tensor cores (half precision, TF32): every product of at least 64 rows a wgmma (no ``mma.sync``); a
  wgmma needs 64 rows, so a configuration with fewer (the dk/dv kernel's 32 key rows above E = 128, where
  more do not fit) runs those products as ``mma.sync``.

The gate's two elementwise kernels: no spills, their tensors read in 16-byte vectors.

Not asserted, printed: the wgmma's waits. The loop's products are one chain (S → P → O in the forward;
S → P → dV and dP → dS → dK in dk/dv), so each iteration waits for its own wgmma before using their results;
overlapping them across iterations is FlashAttention-3's ping-pong scheduling, which these kernels do not do.
TF32's async copies are printed too: a TF32 wgmma takes both operands K-major from shared memory, so a tile
that one product reads as rows and another as columns (q and dO in dk/dv at E ≤ 64, k in dq) is loaded into
registers and rearranged rather than copied.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .test_igemm_static import ROOT, TRITON36, WHY_NOT, _run_with_triton36, triton36_env

pytestmark = pytest.mark.skipif(TRITON36 is None, reason=WHY_NOT)

#: The largest dynamic shared memory a program may have on an H100/H200 (227 KB; triton raises OutOfResources
#: at the launch above it).
SM90_MAX_SHARED = 232448


@pytest.fixture(scope="module")
def figures(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("attention-static") / "figures.json"
    cmd = [sys.executable, str(ROOT / "tools" / "triton_resources.py"), "--attention", "--json", str(out)]
    result = subprocess.run(cmd, env=triton36_env(), capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    print("\n" + result.stdout)  # registers, shared memory, spills, copies, MMAs per variant
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def variants(figures) -> list[dict]:
    """The attention kernels' variants."""
    return [f for f in figures if f["kernel"] in ("fwd", "dkdv", "dq")]


def test_gate_kernels_load_vectors_and_do_not_spill(figures):
    """The gate's elementwise kernels (forward, backward), bf16 and fp32: no stack, and their tensors read in
    16-byte vectors (the one scalar load is α's)."""
    gates = [f for f in figures if f["kernel"].startswith("gate")]
    assert len(gates) == 4

    def scalar(f):
        return sum(n for width, n in f["load_widths"].items() if not width.startswith("v"))

    bad = [f for f in gates if f["stack"] or f["load_widths"].get("v4.b32", 0) < 3 or scalar(f) > 1]
    assert not bad, bad


def _name(v: dict) -> str:
    tiles = "x".join(map(str, v["tiles"]))
    return f"{v['kernel']} {v['dtype']}/{v['precision']} E={v['e']} {tiles} w{v['num_warps']} s{v['num_stages']}"


def _half(v: dict) -> bool:
    return v["dtype"] in ("bf16", "fp16")


def _tensor_core(v: dict) -> bool:
    return _half(v) or v["precision"] == "tf32"


def _mma_rows(v: dict) -> int:
    """The fewest rows of the kernel's products: BLOCK_M (query rows) for all but dk/dv's P·dO and dS·Q, whose rows
    are its BLOCK_N keys."""
    m, n, _ = v["tiles"]
    return min(m, n) if v["kernel"] == "dkdv" else m


def test_every_kernel_dtype_and_head_size_compiled(variants):
    assert {v["kernel"] for v in variants} == {"fwd", "dkdv", "dq"}
    assert {(v["dtype"], v["precision"]) for v in variants} == {
        ("bf16", "ieee"), ("fp16", "ieee"), ("fp32", "tf32"), ("fp32", "ieee")
    }  # fmt: skip
    assert {v["e"] for v in variants if v["dtype"] == "bf16"} == {16, 32, 48, 64, 96, 128, 256}
    assert len(variants) >= 45


def test_no_spills(variants):
    bad = [f"{_name(v)}: {v['stack']} B" for v in variants if v["stack"] != 0]
    assert not bad, "stack (spills) per thread: " + "; ".join(bad)


def test_shared_memory_fits_an_h100(variants):
    bad = [f"{_name(v)}: {v['smem']} B" for v in variants if v["smem"] > SM90_MAX_SHARED]
    assert not bad, f"shared memory above {SM90_MAX_SHARED} B: " + "; ".join(bad)


def test_one_mma_loop(variants):
    bad = [f"{_name(v)}: {v['dot_loops']}" for v in variants if tuple(v["dot_loops"]) != (1, 1)]
    assert not bad, "MMA loops (PTX, TTGIR): " + "; ".join(bad)


def test_half_precision_loops_copy_both_operands_asynchronously(variants):
    bad = []
    for v in filter(_half, variants):
        m, n, e = v["tiles"]
        rows = m if v["kernel"] == "dkdv" else n  # dk/dv loops over query tiles, the others over key tiles
        copies = [sorted(c) for c in v["async_copies_per_loop"]]
        # 16 bytes a copy, or the tile's share of each thread where it is smaller (E = 16: 64 x 16 x 2 B on 256 threads)
        width = min(16, rows * e * 2 // (32 * v["num_warps"]))
        if copies != [[f"{rows}x{e}"] * 2] or width not in v["cp_async_bytes"] or v["scalar_2byte_loads_in_loop"]:
            widths, scalar = v["cp_async_bytes"], v["scalar_2byte_loads_in_loop"]
            bad.append(f"{_name(v)}: async copies {copies} (cp.async widths {widths} B), {scalar} scalar 2-byte loads")
    assert not bad, "; ".join(bad)


def test_tensor_core_products_are_wgmma_where_they_have_64_rows(variants):
    bad = []
    for v in filter(_tensor_core, variants):
        # S = q·kᵀ has BLOCK_M rows in every kernel; a program whose products all have 64 rows or more has no mma.sync
        if (v["tiles"][0] >= 64 and not v["wgmma_in_loop"]) or (_mma_rows(v) >= 64 and v["mma_sync_in_loop"]):
            bad.append(
                f"{_name(v)}: {v['wgmma_in_loop']} wgmma, {v['mma_sync_in_loop']} mma.sync, {v['fma_in_loop']} fma"
            )
    assert not bad, "; ".join(bad)
    narrow = [_name(v) for v in filter(_tensor_core, variants) if _mma_rows(v) < 64]
    print("products of fewer than 64 rows (mma.sync): " + ("; ".join(narrow) or "none"))


def test_on_a_gpu_with_less_shared_memory_the_launchers_step_down(tmp_path):
    """The attention's launches (fwd+bwd, E = 16, 96, 256, bf16 and fp32) through triton 3.6 on the stand-in
    sm_90 with a consumer GPU's 99 KB of shared memory (sm_86/sm_89) instead of an H100's: the configurations
    sized for the H100 that need more are refused at their launch, as the GPU refuses them, and each launcher
    steps down (attention.smaller) to one that fits; every launch succeeds."""
    out = _run_with_triton36("_launch_with_triton36.py", tmp_path, "attention", AQCF_STANDIN_MAX_SHARED="101376")
    failed = {name: error for name, error in out["results"].items() if error != "ok"}
    assert not failed, "\n\n".join(f"{name}:\n{error}" for name, error in failed.items())
    assert len(out["results"]) == 6, out["results"]
    refused = {name for name, _ in out["refused"]}
    assert refused and refused <= {"attention_fwd_kernel", "attention_bwd_dkdv_kernel", "attention_bwd_dq_kernel"}
    assert all(shared > 101376 for _, shared in out["refused"]), out["refused"]
    print(f"refused launches (kernel, shared memory B): {out['refused']}")
