"""Registers and stack (spills) per thread of Triton kernel variants, for sm_90, without a GPU: each
variant is compiled with the local triton and its cubin read with the ``cuobjdump`` triton ships.
A static proxy only; a GPU run decides.

    python tools/triton_resources.py            # the conv weight-gradient kernel (autotuned configs)
    python tools/triton_resources.py --norm     # the fused norm kernels: registers, stack, load widths

TRITON_INTERPRET must be unset. The GPU machines run triton 3.6: to read what they will run, put a
triton 3.6 first on the path (``pip install --no-deps --target DIR triton==3.6.0``, then
``PYTHONPATH=DIR``). ``--norm`` compiles each kernel with the specialisation a real launch gets
(pointers and integers divisible by 16 marked so, unit strides constexpr) and exits non-zero if a
variant spills or if its loads of the activation tensors are not vectorised.
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
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

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
    if "--norm" in sys.argv[1:]:
        return norm_main(quick="--quick" in sys.argv[1:])
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


# --------------------------------------------------------------------------------------------------
# The fused norm kernels (aqcf_kernels/backends/triton/norm.py)
# --------------------------------------------------------------------------------------------------

#: pointers to fp32 statistics, partial sums and coefficients whatever the input dtype
NORM_FP32_POINTERS = {"mean_ptr", "var_ptr", "pmean_ptr", "pm2_ptr", "psum_gz_ptr", "psum_gzx_ptr", "coef_ptr"}
#: the pointers the kernels stream over the activation tensor with (the loads that must be vectorised)
NORM_STREAMS = {"x_ptr", "gy_ptr"}


def norm_case(layout: str, n: int = 8, c: int = 256, s: int = 64 * 64) -> dict[str, int]:
    """The integer arguments of a launch on an ``(n, c, s)`` tensor in ``layout`` ('nchw' or 'channels_last')."""
    strides = (c * s, s, 1) if layout == "nchw" else (c * s, 1, c)
    values = {"C": c, "CQ": c // 4, "S": s, "G": n, "CHUNK": 512}
    for prefix in ("stride_", "sx", "sy", "sg", "sd"):  # every tensor in the same layout
        values.update({prefix + k: v for k, v in zip("ncs", strides, strict=True)})
    return values


def compile_norm_variant(kernel, dtype: str, layout: str, constexprs: dict, num_warps: int = 4):
    """Compile ``kernel`` for sm_90 as a launch on a 64q, 64x64, batch-8 tensor in ``layout`` would."""
    ptr = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16"}[dtype]
    ints = norm_case(layout)
    signature, consts, attrs = {}, dict(constexprs), {}
    for i, name in enumerate(kernel.arg_names):
        if name in consts:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32" if name in NORM_FP32_POINTERS else ptr
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ("eps", "negative_slope"):
            signature[name] = "fp32"
        elif ints[name] == 1:  # triton specialises an integer argument equal to 1
            signature[name], consts[name] = "constexpr", 1
        else:
            signature[name] = "i32"
            if ints[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=kernel, signature=signature, constexprs=consts, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


def load_widths(ptx: str) -> dict[str, int]:
    """How many ``ld.global`` instructions of each width (``v4.b32``, ``b16``, ...) the PTX holds."""
    widths: dict[str, int] = {}
    for m in re.finditer(r"ld\.global(?:\.[a-z]+)*?((?:\.v[248])?\.[bfu]\d+)", ptx):
        widths[m.group(1).lstrip(".")] = widths.get(m.group(1).lstrip("."), 0) + 1
    return widths


def norm_variants(quick: bool = False):
    """``(label, kernel, dtype, layout, constexprs)`` of the norm kernels as the launcher picks their tiles."""
    from aqcf_kernels.backends.triton import norm as tn

    c, s = 256, 64 * 64
    combos = [("fp32", "nchw"), ("bf16", "channels_last"), ("bf16", "nchw"), ("fp32", "channels_last")]
    for i, (dtype, layout) in enumerate(combos):
        block_c, block_s = tn._blocks(c, s, layout == "channels_last")
        blocks = dict(BLOCK_C=block_c, BLOCK_S=block_s)
        affine = dict(HAS_WEIGHT=True, HAS_BIAS=True, PER_SAMPLE=False, ACTIVATION=3, **blocks)
        kernels = [
            ("stats", tn.qnorm_stats_kernel, dict(PER_SAMPLE=False, ACC=tl.float32, **blocks)),
            ("apply", tn.qnorm_apply_kernel, affine),
            ("bwd_sums", tn.qnorm_bwd_sums_kernel, affine),
            ("bwd_input", tn.qnorm_bwd_input_kernel, affine),
        ]
        for j, (label, kernel, constexprs) in enumerate(kernels):
            if not quick or j == i:  # quick (the test suite): each kernel once, each in another dtype/layout
                yield label, kernel, dtype, layout, constexprs


def norm_main(quick: bool = False) -> int:
    from aqcf_kernels.backends.triton import norm as tn

    print(f"triton {triton.__version__}, sm_90, 8 x 64q x 64x64, GELU, num_warps {tn.GPU_WARPS}")
    print(f"{'kernel':10} {'dtype':5} {'layout':13} {'tile (C, S)':12} {'regs':>5} {'stack B':>8}  loads of x/gy")
    bad = 0
    for label, kernel, dtype, layout, constexprs in norm_variants(quick):
        compiled = compile_norm_variant(kernel, dtype, layout, constexprs, tn.GPU_WARPS)
        regs, stack = resources(compiled.asm["cubin"])
        widths = load_widths(compiled.asm["ptx"])
        # the streamed tensor's element loads: 16 B per thread (v4.b32 fp32, v4.b32 packing 8 bf16) or 8 B
        vector = any(k.startswith(("v4", "v2")) for k in widths)
        tile = (constexprs["BLOCK_C"], constexprs["BLOCK_S"])
        print(f"{label:10} {dtype:5} {layout:13} {tile!s:12} {regs:5} {stack:8}  {widths}")
        if stack or not vector:
            bad += 1
    print("all variants: no spills, vectorised loads" if not bad else f"{bad} variant(s) spill or load scalars")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
