"""Registers and stack (spills) per thread of the Triton weight-gradient kernel's variants, for sm_90,
without a GPU: each variant is compiled with the local triton and its cubin read with the
``cuobjdump`` triton ships. A static proxy only; a GPU run decides (the kernel is autotuned).

    python tools/triton_resources.py            # TRITON_INTERPRET must be unset
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "triton_kernels"))
from _compile_for_gpu import compile_variant  # noqa: E402

from aqcf_kernels.backends.triton.conv import wgrad_gpu_configs  # noqa: E402
from aqcf_kernels.backends.triton.conv_kernels import qconv_wgrad_kernel  # noqa: E402

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
VARIANTS = [
    ("fp32", tl.float32, "*fp32", "tf32"),
    ("fp32", tl.float32, "*fp32", "ieee"),
    ("bf16", tl.bfloat16, "*bf16", "ieee"),
]


def resources(cubin: bytes) -> tuple[int, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run([str(CUOBJDUMP), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    return int(re.search(r"REG:(\d+)", out).group(1)), int(re.search(r"STACK:(\d+)", out).group(1))


def main() -> int:
    if os.environ.get("TRITON_INTERPRET"):
        print("unset TRITON_INTERPRET: the interpreter compiles nothing", file=sys.stderr)
        return 2
    print(f"{'dtype':5} {'dot':4} {'algorithm':9} {'tiles (O, C, P)':16} {'warps':>5} {'regs':>5} {'stack B':>8}")
    for (name, dot, ptr, precision), fast8, config in itertools.product(VARIANTS, (False, True), wgrad_gpu_configs()):
        constexprs = dict(FAST8=fast8, DOT_DTYPE=dot, PRECISION=precision, **config.kwargs)
        kernel = compile_variant(
            qconv_wgrad_kernel, {"x_ptr", "gy_ptr", "gw_ptr"}, constexprs, ptr, {"num_warps": config.num_warps}
        )
        regs, stack = resources(kernel.asm["cubin"])
        tiles = tuple(config.kwargs[k] for k in ("BLOCK_O", "BLOCK_C", "BLOCK_P"))
        algorithm = "fast8" if fast8 else "hamilton"
        print(f"{name:5} {precision:4} {algorithm:9} {tiles!s:16} {config.num_warps:5} {regs:5} {stack:8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
