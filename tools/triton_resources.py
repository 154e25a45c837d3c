"""Registers and stack (spills) per thread of Triton kernel variants, for sm_90, without a GPU: each
variant is compiled with the local triton and its cubin read with the ``cuobjdump`` triton ships.
A static proxy only; a GPU run decides.

    python tools/triton_resources.py            # the conv weight-gradient kernel (autotuned configs)
    python tools/triton_resources.py --norm     # the norm kernels and the conv activation pass: regs, stack, loads
    python tools/triton_resources.py --igemm [--json FILE]   # the implicit-GEMM conv: issue 13's criteria
    python tools/triton_resources.py --wgrad [--json FILE]   # its weight-gradient GEMM: the same criteria
    python tools/triton_resources.py --rnn [--quick]         # the fused recurrence's cell kernels (issue 16)
    python tools/triton_resources.py --attention [--json FILE]  # the attention's kernels as launched on a GPU

TRITON_INTERPRET must be unset. The GPU machines run triton 3.6: to read what they will run, put a
triton 3.6 first on the path (``pip install --no-deps --target DIR triton==3.6.0``, then
``PYTHONPATH=DIR``). ``--norm`` compiles each kernel with the specialisation a real launch gets
(pointers and integers divisible by 16 marked so, unit strides constexpr) and exits non-zero if a
variant spills or if its loads of the activation tensors are not vectorised; ``--rnn`` does the same
for the recurrence's forward and backward cell kernels, every mode and candidate.
"""

from __future__ import annotations

import itertools
import math
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
    """(registers, stack bytes) of the cubin's kernel."""
    usage = resource_usage(cubin)
    return usage["REG"], usage["STACK"]


def main() -> int:
    if os.environ.get("TRITON_INTERPRET"):
        print("unset TRITON_INTERPRET: the interpreter compiles nothing", file=sys.stderr)
        return 2
    if "--norm" in sys.argv[1:]:
        return norm_main(quick="--quick" in sys.argv[1:])
    if "--rnn" in sys.argv[1:]:
        return rnn_main(quick="--quick" in sys.argv[1:])
    if "--wgrad" in sys.argv[1:]:  # [--json FILE]
        argv = sys.argv[1:]
        return wgrad_main(argv[argv.index("--json") + 1] if "--json" in argv else None)
    if "--attention" in sys.argv[1:]:  # [--json FILE]
        argv = sys.argv[1:]
        return attention_main(argv[argv.index("--json") + 1] if "--json" in argv else None)
    if "--igemm" in sys.argv[1:]:  # [--json FILE]
        argv = sys.argv[1:]
        return igemm_main(argv[argv.index("--json") + 1] if "--json" in argv else None)
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
#: (``part_ptr``: the conv activation pass's partial bias sums)
NORM_FP32_POINTERS = {
    "mean_ptr",
    "var_ptr",
    "pmean_ptr",
    "pm2_ptr",
    "psum_gz_ptr",
    "psum_gzx_ptr",
    "coef_ptr",
    "part_ptr",
}
#: the pointers the kernels stream over the activation tensor with (the loads that must be vectorised)
NORM_STREAMS = {"x_ptr", "gy_ptr"}


def norm_case(layout: str, n: int = 8, c: int = 256, s: int = 64 * 64) -> dict[str, int]:
    """The integer arguments of a launch on an ``(n, c, s)`` tensor in ``layout`` ('nchw' or 'channels_last')."""
    strides = (c * s, s, 1) if layout == "nchw" else (c * s, 1, c)
    values = {"C": c, "CQ": c // 4, "S": s, "G": n, "CHUNK": 512, "SPLITS": 8, "PARTS": 8 * n, "COUNT": n * s}
    values.update(N0=0, G0=0)  # the grid's slice starts at 0 (common.axis_slices)
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
    """``(label, kernel, dtype, layout, constexprs)`` of the norm kernels as the launcher picks their tiles,
    and of the conv activation's backward pass (backends/triton/activation_grad.py), which tiles the
    same ``(N, C, S)`` view the same way."""
    from aqcf_kernels.backends.triton import activation_grad as tag
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
            ("act_bias", tag.activation_grad_bias_kernel, dict(ACTIVATION=3, **blocks)),
        ]
        kernels += list(pool_variants(tn, every=not quick and i == 0))
        for j, (label, kernel, constexprs) in enumerate(kernels):
            # quick (the test suite): each kernel once, each norm kernel in another dtype/layout, the
            # activation pass in bf16 channels_last (what the GPU benchmarks run)
            if not quick or j == i or (label in ("act_bias", *POOL_KERNELS) and i == 1):
                yield label, kernel, dtype, layout, constexprs


#: the kernels that pool the norm's partial rows: small and latency-bound, they stream nothing (their loads of
#: partial sums need not be vectorised: at BLOCK_Q = 1 a tile's channels are Cq apart)
POOL_KERNELS = ("stats_pool", "bwd_coefs")


def pool_variants(tn, every: bool):
    """``(label, kernel, constexprs)`` of the pooling kernels: at a 64q layer's tiles, or (``every``) at every
    ``BLOCK_Q`` the launcher picks (1, 2, 4 quaternion channels) with every combination of their flags."""
    block_p = tn._pool_blocks(64)[1]
    for block_q in (1, 2, 4) if every else (tn._pool_blocks(64)[0],):
        pool = dict(ACC=tl.float32, BLOCK_Q=block_q, BLOCK_P=block_p)
        for per_sample in (False, True) if every else (False,):
            yield "stats_pool", tn.qnorm_stats_pool_kernel, dict(PER_SAMPLE=per_sample, **pool)
        for flags in itertools.product((False, True), repeat=4) if every else [(True,) * 4]:
            names = ("HAS_WEIGHT", "USE_INPUT_STATS", "WANT_GW", "WANT_GB")
            yield "bwd_coefs", tn.qnorm_bwd_coefficients_kernel, dict(zip(names, flags, strict=True), **pool)


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
        # (the pooling kernels' tiles: 4 components x BLOCK_Q channels by BLOCK_P partial rows)
        tile = (
            constexprs.get("BLOCK_C", 4 * constexprs.get("BLOCK_Q", 0)),
            constexprs.get("BLOCK_S", constexprs.get("BLOCK_P")),
        )
        print(f"{label:10} {dtype:5} {layout:13} {tile!s:12} {regs:5} {stack:8}  {widths}")
        if stack or not (vector or label in POOL_KERNELS):
            bad += 1
    print("all variants: no spills, vectorised loads" if not bad else f"{bad} variant(s) spill or load scalars")
    return 1 if bad else 0


# --------------------------------------------------------------------------------------------------
# The implicit-GEMM conv kernel (aqcf_kernels/backends/triton/igemm.py): issue 13's static proof
# --------------------------------------------------------------------------------------------------

#: pointer type and dot dtype of each input dtype
IGEMM_POINTERS = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}
IGEMM_DOTS = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32}


def compile_launch(kernel, args: dict, constexprs: dict, options: dict):
    """Compile ``kernel`` for sm_90 as a launch with ``args`` would be specialised by triton's JIT.

    ``args`` maps every non-constexpr argument to its value: a pointer as its type string (``'*bf16'``;
    taken 16-byte aligned, as torch's allocations are), a float (an ``fp32`` scalar), or an int: equal
    to 1 it becomes a constexpr, divisible by 16 it gets ``tt.divisibility = 16``.
    """
    signature, consts, attrs = {}, dict(constexprs), {}
    for i, name in enumerate(kernel.arg_names):
        if name in consts:
            signature[name] = "constexpr"
            continue
        value = args[name]
        if isinstance(value, str):
            signature[name] = value
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1:
            signature[name], consts[name] = "constexpr", 1
        else:
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=kernel, signature=signature, constexprs=consts, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def cuobjdump(cubin: bytes, flag: str) -> str:
    """What the ``cuobjdump`` triton ships prints for ``cubin`` with ``flag``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        return subprocess.run([str(CUOBJDUMP), flag, f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)


def resource_usage(cubin: bytes) -> dict[str, int]:
    """``{'REG', 'STACK', 'SHARED'}`` of the cubin's kernel, from ``cuobjdump --dump-resource-usage``."""
    out = cuobjdump(cubin, "--dump-resource-usage")
    return {key: int(re.search(key + r":(\d+)", out).group(1)) for key in ("REG", "STACK", "SHARED")}


def ptx_loops(ptx: str) -> list[str]:
    """The PTX of each MMA loop, in program order: a region from a label to a backward branch to it that
    holds an MMA (``wgmma``/``mma``; else an ``fma``) and no other such region (the innermost ones: fast8's
    forward has two K loops one after the other)."""
    lines = ptx.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\$L__BB\d+_\d+):", line.strip()))}
    regions = []
    for i, line in enumerate(lines):
        m = re.search(r"\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+);", line)
        if m and labels.get(m.group(1), i + 1) < i:
            start = labels[m.group(1)]
            if re.search(r"\b(wgmma\.mma_async|mma\.sync|fma\.rn)", "\n".join(lines[start : i + 1])):
                regions.append((start, i))
    innermost = [r for r in regions if not any(o != r and r[0] <= o[0] and o[1] <= r[1] for o in regions)]
    return ["\n".join(lines[s : e + 1]) for s, e in sorted(innermost)]


def sass_loops(cubin: bytes) -> list[int]:
    """The SASS instructions of one iteration of each MMA loop (``HGMMA``/``HMMA``; else ``FFMA``), innermost
    ones, in program order: what every warp of a program issues per K step. A loop ends in a predicated
    backward branch; the unconditional ones are ptxas's retry paths of an mbarrier wait (TMA), which jump
    back into the middle of the loop from code laid out after it."""
    sass = cuobjdump(cubin, "-sass")
    code = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*;)", sass)]
    regions = []
    for i, (address, text) in enumerate(code):
        m = re.search(r"^@!?U?P\w+\s+BRA (0x[0-9a-f]+)", text)
        if m and int(m.group(1), 16) < address:
            start = next(j for j, (a, _) in enumerate(code) if a == int(m.group(1), 16))
            if any(re.match(r"(HGMMA|HMMA|FFMA)", t) for _, t in code[start : i + 1]):
                regions.append((start, i))
    innermost = [r for r in regions if not any(o != r and r[0] <= o[0] and o[1] <= r[1] for o in regions)]
    return [e - s + 1 for s, e in sorted(innermost)]


#: Dense tensor-core FLOPs per clock of one sm_90 SM (H100/H200: 989 TFLOPS bf16 = 132 SMs x 1.83 GHz x 4096),
#: by the dot's input precision; and the SM's warp schedulers, each issuing one warp's instruction a clock.
TENSOR_FLOPS_PER_CLOCK = {"bf16": 4096, "fp16": 4096, "tf32": 2048}
SCHEDULERS = 4


def issue_share(instructions: int, num_warps: int, tiles: tuple[int, int, int], dot: str) -> float | None:
    """The clocks an SM's schedulers need to issue one K step of a program's loop (each of its warps runs the
    ``instructions``) over the clocks its tensor cores need for that step's ``BLOCK_M x BLOCK_N x BLOCK_K``
    product: above 1 the loop is issue-bound even with no stall at all. ``None`` without tensor cores."""
    if dot not in TENSOR_FLOPS_PER_CLOCK:
        return None
    m, n, k = tiles
    return instructions * num_warps / SCHEDULERS / (2 * m * n * k / TENSOR_FLOPS_PER_CLOCK[dot])


def ttgir_loops(ttgir: str) -> list[str]:
    """The body of each ``scf.for`` that holds a dot (TTGIR text), innermost ones, in program order."""
    lines = ttgir.splitlines()
    bodies = []
    for i, line in enumerate(lines):
        if "scf.for" in line:
            indent = len(line) - len(line.lstrip())
            for j in range(i + 1, len(lines)):
                if lines[j].strip().startswith("}") and len(lines[j]) - len(lines[j].lstrip()) == indent:
                    body = "\n".join(lines[i + 1 : j])
                    if ("warp_group_dot" in body or "tt.dot" in body) and "scf.for" not in body:
                        bodies.append(body)
                    break
    return bodies


def igemm_launch_args(
    dtype: str, cq_in: int, cq_out: int, groups: int = 1, dims: int = 2, size: int = 64, batch: int = 32,
    k: int = 3, stride: int = 1, transposed: bool = False, fast8: bool = False,
) -> dict:  # fmt: skip
    """The arguments of ``qconv_igemm_kernel`` for a ``k``^dims conv (padding k//2) on a batch of ``size``^dims
    channels_last images, as ``igemm.conv_igemm`` passes them (transposed: the input gradient of a stride-s conv;
    fast8: x is the 8 combinations, each product's GEMM Cg_in channels per tap into Cg_out columns)."""
    pad = k // 2
    if transposed:
        out = (size - 1) * stride - 2 * pad + k + (stride - 1)  # the input size of the strided conv
    else:
        out = (size + 2 * pad - k) // stride + 1
    sp_in = (1,) * (3 - dims) + (size,) * dims
    sp_out = (1,) * (3 - dims) + (out,) * dims
    ks = (1,) * (3 - dims) + (k,) * dims
    unit = (1,) * (3 - dims)
    c_x, per_product = (8 * cq_in, 1) if fast8 else (4 * cq_in, 4)
    ptr = IGEMM_POINTERS[dtype]
    args = dict(x_ptr=ptr, w_ptr=ptr, b_ptr=ptr, y_ptr=ptr, z_ptr=ptr, negative_slope=0.01)
    args.update(M=batch * sp_out[0] * sp_out[1] * sp_out[2], C_Y=4 * cq_out, K_TAP=per_product * cq_in // groups)
    args.update(N_G=per_product * cq_out // groups, CQ_IN=cq_in, CG_IN=cq_in // groups, CQ_OUT=cq_out)
    args.update(CG_OUT=cq_out // groups)
    args.update(zip(("ID", "IH", "IW", "OD", "OH", "OW", "KD", "KH", "KW"), (*sp_in, *sp_out, *ks), strict=True))
    strides = (sp_in[0] * sp_in[1] * sp_in[2] * c_x, sp_in[1] * sp_in[2] * c_x, sp_in[2] * c_x, c_x)
    args.update(zip(("s_xn", "s_xd", "s_xh", "s_xw"), strides, strict=True))
    args.update(zip(("SD", "SH", "SW"), unit + (stride,) * dims, strict=True))
    args.update(zip(("PD", "PH", "PW"), (0,) * (3 - dims) + (pad,) * dims, strict=True))
    args.update(zip(("DD", "DH", "DW"), (1, 1, 1), strict=True))
    # sub-pixel phases (dilation 1): a transposed conv's taps of one phase step by the stride, its rows are
    # that phase's ⌈out/stride⌉ outputs per dim
    steps = unit + ((stride,) * dims if transposed else (1,) * dims)
    args.update(zip(("KSD", "KSH", "KSW", "ESD", "ESH", "ESW"), (*steps, 1, 1, 1), strict=True))
    if transposed:
        args["M"] = batch * math.prod(-(-o // s) for o, s in zip(sp_out, steps, strict=True))
    return args


def _config(configs: list, shape: tuple[int, ...]):
    """The config of ``configs`` with tiles, warps and stages ``(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)``
    (and one column block a program, where configs say how many; the weight gradient's fast8 products a
    program: a sixth entry, default 1)."""
    (found,) = [
        c
        for c in configs
        if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages) == shape[:5]
        and c.kwargs.get("RUNS", 1) == 1
        and c.kwargs.get("FAST8_PRODUCTS", 1) == (shape[5] if len(shape) > 5 else 1)
    ]
    return found


def igemm_variants():
    """``(label, dtype, precision, args, constexprs, config)``: every autotune config a launch of each case
    may run (``igemm.prune_configs``), over the cases: 2d 64q bf16 (conv + bias + ReLU), fp16 with GELU
    keeping the pre-activation, 16q, 10q and 8q (memory-bound widths; 10q's runs of 40 channels are not
    multiples of 16), groups=4, the input gradient of a stride-2 conv and (64q, 16q) of the targets' stride-1
    conv (transposed), 3d 32q, and fp32 with
    TF32 and in IEEE fp32; fast8 (2 K loops of 4 dots) at 64q and 128q bf16 (the GPU targets), its input gradient,
    groups, 16q, 40q (runs of 40: not whole K blocks, so a K mask), and fp32 with TF32 and in IEEE fp32."""
    from aqcf_kernels.backends.triton.igemm import gpu_configs, loop_constexprs, prune_configs

    base = dict(DIMS=2, TRANSPOSED=False, GROUPED=False, FAST8=False, HAS_BIAS=True, ACTIVATION=1, STORE_PRE=False)
    f8 = dict(FAST8=True)
    WIDE = (128, 256, 64, 8, 3)  # noqa: N806  (the widest tile: with the pre-activation stored, sub-pixel)
    cases = [
        ("2d 64q", "bf16", "ieee", igemm_launch_args("bf16", 64, 64), {}, None),
        ("2d 64q gelu+pre", "fp16", "ieee", igemm_launch_args("fp16", 64, 64), dict(ACTIVATION=3, STORE_PRE=True),
         None),
        ("2d 64q relu+pre", "bf16", "ieee", igemm_launch_args("bf16", 64, 64), dict(STORE_PRE=True), WIDE),
        ("2d 16q", "bf16", "ieee", igemm_launch_args("bf16", 16, 16), {}, None),
        ("2d 8q", "bf16", "ieee", igemm_launch_args("bf16", 8, 8), {}, None),
        ("2d 10q", "bf16", "ieee", igemm_launch_args("bf16", 10, 10), {}, None),
        ("2d 64q g4", "bf16", "ieee", igemm_launch_args("bf16", 64, 64, groups=4), dict(GROUPED=True), None),
        (
            "2d 64q dgrad s2", "bf16", "ieee", igemm_launch_args("bf16", 64, 64, stride=2, transposed=True, size=32),
            dict(TRANSPOSED=True, HAS_BIAS=False, ACTIVATION=0), WIDE,
        ),
        (  # the targets' input gradient: a stride-1 transposed conv (at each config the forward's figures)
            "2d 64q dgrad s1", "bf16", "ieee", igemm_launch_args("bf16", 64, 64, transposed=True),
            dict(TRANSPOSED=True, HAS_BIAS=False, ACTIVATION=0), (128, 256, 64, 8, 3),
        ),
        (
            "2d 16q dgrad s1", "bf16", "ieee", igemm_launch_args("bf16", 16, 16, transposed=True),
            dict(TRANSPOSED=True, HAS_BIAS=False, ACTIVATION=0), (128, 64, 64, 4, 3),
        ),
        ("2d 64q 7x7", "bf16", "ieee", igemm_launch_args("bf16", 64, 64, k=7), {}, (128, 128, 64, 8, 3)),
        ("3d 32q", "bf16", "ieee", igemm_launch_args("bf16", 32, 32, dims=3, size=32, batch=2), dict(DIMS=3),
         (128, 64, 64, 4, 3)),
        ("2d 64q", "fp32", "tf32", igemm_launch_args("fp32", 64, 64), {}, (128, 128, 64, 8, 3)),
        ("2d 64q", "fp32", "tf32", igemm_launch_args("fp32", 64, 64), {}, (128, 64, 32, 4, 4)),
        ("2d 64q", "fp32", "ieee", igemm_launch_args("fp32", 64, 64), {}, None),
        ("2d 64q fast8", "bf16", "ieee", igemm_launch_args("bf16", 64, 64, fast8=True), f8, None),
        ("2d 128q fast8", "bf16", "ieee", igemm_launch_args("bf16", 128, 128, fast8=True), f8, (64, 128, 64, 8, 2)),
        (
            "2d 64q f8 dgrad", "fp16", "ieee", igemm_launch_args("fp16", 64, 64, stride=2, transposed=True, size=32,
                                                                 fast8=True),
            dict(f8, TRANSPOSED=True, HAS_BIAS=False, ACTIVATION=0), None,
        ),
        ("2d 128q f8 g2", "bf16", "ieee", igemm_launch_args("bf16", 128, 128, groups=2, fast8=True),
         dict(f8, GROUPED=True), (64, 32, 32, 4, 4)),
        ("2d 16q fast8", "bf16", "ieee", igemm_launch_args("bf16", 16, 16, fast8=True), f8, None),
        ("2d 40q fast8", "bf16", "ieee", igemm_launch_args("bf16", 40, 40, fast8=True), f8, None),
        ("2d 64q fast8", "fp32", "tf32", igemm_launch_args("fp32", 64, 64, fast8=True), f8, None),
        ("2d 64q fast8", "fp32", "ieee", igemm_launch_args("fp32", 64, 64, fast8=True), f8, None),
    ]  # fmt: skip
    configs = gpu_configs()
    for label, dtype, precision, args, extra, which in cases:
        consts = {**base, **extra, "DOT_DTYPE": IGEMM_DOTS[dtype], "PRECISION": precision}
        # as conv_igemm sets them (8q's channel runs are not whole K blocks, the 7x7 case's 49 taps not bits)
        seg_len = args["CG_IN"] if consts["GROUPED"] or consts["FAST8"] else args["K_TAP"]
        consts.update(loop_constexprs(seg_len, args["KD"] * args["KH"] * args["KW"]))
        chosen = prune_configs(configs, args, **consts) if which is None else [_config(configs, which)]
        for config in chosen:
            yield label, dtype, precision, args, consts, config


def _loop_figures(loop: str, tloop: str, dtype: str) -> dict:
    """Issue 13's figures of one MMA loop (its PTX and its TTGIR)."""
    scalar_2byte = re.findall(r"\bld\.global(?:\.[a-z]+)*\.(?:b16|u16|s16|f16)\b", loop)
    return dict(
        scalar_2byte_loads=len(scalar_2byte) if dtype != "fp32" else 0,
        async_copies=re.findall(r"ttg\.async_copy_global_to_local.*?:\s*tensor<(\d+x\d+)x!tt\.ptr", tloop),
        tma=len(re.findall(r"async_tma_copy_global_to_local", tloop)),
        plain_loads=len(re.findall(r"\btt\.load\b", tloop)),
        cp_async_bytes={int(b, 0) for b in re.findall(r"cp\.async\.c[ag]\.shared\.global[^,]*,[^,]*,\s*(\w+)", loop)},
        wgmma=len(re.findall(r"\bwgmma\.mma_async", loop)),
        mma_sync=len(re.findall(r"\bmma\.sync", loop)),
        fma=len(re.findall(r"\bfma\.rn\.f32", loop)),
        wait_pendings=[int(n) for n in re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", loop)],
    )


def _copies(row: dict) -> str:
    """The async copies of a variant's loops for the table: one loop's, with ``xN`` when N loops copy alike."""
    loops = row["async_copies_per_loop"]
    first = " ".join(loops[0])
    return first + (f" x{len(loops)}" if len(loops) > 1 and all(c == loops[0] for c in loops) else "")


def _per_step(row: dict) -> str:
    """A variant's SASS instructions per K step for the table: one loop's, with ``xN`` for N alike."""
    steps = row["sass_loop_instructions"]
    return f"{steps[0]}" + (f" x{len(steps)}" if len(steps) > 1 and len(set(steps)) == 1 else "") if steps else "-"


def _share(row: dict) -> str:
    return "-" if row["issue_share"] is None else f"{row['issue_share']:.2f}"


def analyse_igemm(kernel, dtype: str, precision: str, tiles: tuple[int, int, int], num_warps: int) -> dict:
    """The static figures and the criteria of issue 13 for one compiled variant, over every MMA loop (one,
    or fast8's two): counts summed, the async copies of each loop, the wgmma count of the poorest loop,
    every wait's pending count, the SASS instructions of each loop's iteration and the largest
    :func:`issue_share` among them."""
    ptx, ttgir = kernel.asm["ptx"], kernel.asm["ttgir"]
    ploops, tloops = ptx_loops(ptx), ttgir_loops(ttgir)
    usage = resource_usage(kernel.asm["cubin"])
    per_loop = [_loop_figures(p, t, dtype) for p, t in zip(ploops, tloops, strict=False)] or [
        _loop_figures("", "", dtype)
    ]
    per_step = sass_loops(kernel.asm["cubin"])
    dot = precision if dtype == "fp32" else dtype
    return dict(
        sass_loop_instructions=per_step,
        issue_share=issue_share(max(per_step), num_warps, tiles, dot) if per_step else None,
        regs=usage["REG"],
        stack=usage["STACK"],
        smem=kernel.metadata.shared,
        dot_loops=(len(ploops), len(tloops)),
        scalar_2byte_loads_in_loop=sum(f["scalar_2byte_loads"] for f in per_loop),
        async_copies_per_loop=[f["async_copies"] for f in per_loop],
        tma_in_loop=min(f["tma"] for f in per_loop),
        plain_loads_in_loop=sum(f["plain_loads"] for f in per_loop),
        cp_async_bytes=sorted(set().union(*(f["cp_async_bytes"] for f in per_loop))),
        wgmma_in_loop=min(f["wgmma"] for f in per_loop),
        mma_sync_in_loop=sum(f["mma_sync"] for f in per_loop),
        fma_in_loop=sum(f["fma"] for f in per_loop),
        wait_pendings_in_loop=[n for f in per_loop for n in f["wait_pendings"]],
    )


def igemm_main(json_path: str | None = None) -> int:
    """Compile every variant of :func:`igemm_variants`, print its figures (and write them as JSON)."""
    import json

    from aqcf_kernels.backends.triton.igemm import qconv_igemm_kernel

    rows = []
    head = f"{'case':16} {'dtype':5} {'dot':4} {'tiles (M,N,K)':15} {'w':>2} {'st':>2} {'regs':>4} {'smem B':>7}"
    print(
        head + f" {'spill':>5} {'ld16':>4} {'async copies':16} {'wgmma':>5} {'waits':8} {'SASS/step':>9} {'issue':>5}"
    )
    for label, dtype, precision, args, constexprs, config in igemm_variants():
        consts = dict(constexprs, **config.kwargs)
        options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
        kernel = compile_launch(qconv_igemm_kernel, args, consts, options)
        tiles = tuple(config.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
        dots = 4 if consts["FAST8"] else 1  # dots a step (fast8: four products): its MMA work is dots x the tile's
        row = dict(case=label, dtype=dtype, precision=precision, tiles=tiles, fast8=consts["FAST8"], dots=dots)
        row.update(options)
        row.update(analyse_igemm(kernel, dtype, precision, (tiles[0], dots * tiles[1], tiles[2]), config.num_warps))
        rows.append(row)
        print(
            f"{label:16} {dtype:5} {precision:4} {','.join(map(str, tiles)):15} {config.num_warps:2} "
            f"{config.num_stages:2} {row['regs']:4} {row['smem']:7} {row['stack']:5} "
            f"{row['scalar_2byte_loads_in_loop']:4} {_copies(row):16} "
            f"{row['wgmma_in_loop']:5} {row['wait_pendings_in_loop']!s:8} {_per_step(row):>9} {_share(row):>5}"
        )
    if json_path:
        Path(json_path).write_text(json.dumps(rows, indent=1))
    return fast8_combine_main()


def fast8_combine_main() -> int:
    """Registers, stack and load widths of fast8's pre-pass (the 8 combinations of a 64q, 16q and 40q activation,
    32 x 64x64 pixels); non-zero if it spills, loads scalars, or loads a component more than once."""
    from aqcf_kernels.backends.triton import fast8
    from aqcf_kernels.backends.triton.channels import chan_align

    bad = 0
    for ptr, cq in (("*bf16", 64), ("*bf16", 16), ("*bf16", 40), ("*fp32", 64)):
        args = dict(src_ptr=ptr, dst_ptr=ptr, P=32 * 64 * 64, CQ=cq)
        block_p, block_c = fast8.combine_blocks(cq)
        codes = fast8.combination_codes("right", False)
        consts = dict(codes, CHAN_ALIGN=chan_align(cq), BLOCK_P=block_p, BLOCK_C=block_c)
        kernel = compile_launch(fast8.combine_kernel, args, consts, {"num_warps": 4})
        usage = resource_usage(kernel.asm["cubin"])
        widths = load_widths(kernel.asm["ptx"])
        vector = any(w.startswith(("v4", "v2")) for w in widths)
        # each component once: as many loads as the tile's four component tiles take at their widths
        loads = sum(widths.values())
        once = 4 * block_p * block_c * (2 if ptr == "*bf16" else 4) // (16 * 128)  # 16-byte loads, 128 threads
        print(
            f"fast8 combinations, {ptr[1:]} {cq}q ({block_p}x{block_c}): regs {usage['REG']}, "
            f"stack {usage['STACK']} B, loads {widths} ({once} if each component is loaded once in 16 bytes)"
        )
        bad += usage["STACK"] != 0 or not vector or loads != once
    return 1 if bad else 0


# --------------------------------------------------------------------------------------------------
# The fused recurrence's cell kernels (aqcf_kernels/backends/triton/rnn_cell.py): issue 16
# --------------------------------------------------------------------------------------------------

RNN_CELLS = [("rnn", "tanh"), ("rnn", "relu"), ("lstm", "tanh"), ("ligru", "relu"), ("ligru", "leaky_relu"),
             ("ligru", "tanh")]  # fmt: skip
RNN_DTYPES = {
    "fp32": ("*fp32", tl.float32, 0.25),
    "bf16": ("*bf16", tl.float32, 0.25),
    "fp64": ("*fp64", tl.float64, 0.02),
}


def rnn_variants(quick: bool = False, batch: int = 8, hidden: int = 512):
    """``(label, kernel, dtype, args, constexprs)``: the forward and backward cell kernels of every cell as a
    launch at ``batch`` x ``hidden`` gets them (the launcher's tiles), fp32 and bf16, and the LSTM in fp64.
    ``quick`` (the test suite): each cell's two kernels in one dtype, fp32 and bf16 alternating."""
    from aqcf_kernels.backends.triton import rnn_cell as tr

    block_b, block_h = tr._blocks(batch, hidden)
    cases = [(dtype, cell) for dtype in ("fp32", "bf16") for cell in RNN_CELLS]
    if quick:
        cases = [("fp32" if i % 2 == 0 else "bf16", cell) for i, cell in enumerate(RNN_CELLS)]
    cases.append(("fp64", ("lstm", "tanh")))
    for dtype, (mode, nonlinearity) in cases:
        ptr, acc, small = RNN_DTYPES[dtype]
        acc_ptr = "*fp64" if dtype == "fp64" else "*fp32"
        consts = dict(
            MODE=tr.MODE_CODES[mode], ACT=0 if mode == "lstm" else tr.ACTIVATION_CODES[nonlinearity], ACC=acc,
            SMALL=small, BLOCK_B=block_b, BLOCK_H=block_h,
        )  # fmt: skip
        sizes = dict(B=batch, H=hidden, slope_hi=0.01, slope_lo=1e-10)
        names = ("proj_ptr", "mm_ptr", "h_prev_ptr", "c_prev_ptr", "h_ptr", "c_ptr", "saved_ptr")
        fwd = dict(dict.fromkeys(names, ptr), stride_pb=tr.GATES[mode] * hidden, stride_pj=1, **sizes)
        names = ("go_ptr", "gc_ptr", "dh_ptr", "saved_ptr", "h_ptr", "h_prev_ptr", "c_prev_ptr", "c_ptr", "dg_ptr")
        bwd = dict(dict.fromkeys(names, ptr), dc_ptr=acc_ptr, **sizes)
        label = f"{mode} {nonlinearity}"
        yield label + " fwd", tr.rnn_cell_fwd_kernel, dtype, fwd, consts
        yield label + " bwd", tr.rnn_cell_bwd_kernel, dtype, bwd, dict(consts, HAS_GO=True, HAS_GC=mode == "lstm")


def rnn_main(quick: bool = False) -> int:
    from aqcf_kernels.backends.triton import rnn_cell as tr

    batch, hidden = 8, 512
    block_b, block_h = tr._blocks(batch, hidden)
    print(f"triton {triton.__version__}, sm_90, batch {batch} x hidden {hidden}, tile ({block_b}, {block_h}), "
          f"num_warps {tr.GPU_WARPS}")  # fmt: skip
    print(f"{'kernel':20} {'dtype':5} {'regs':>5} {'stack B':>8}  loads")
    bad = 0
    for label, kernel, dtype, args, constexprs in rnn_variants(quick, batch, hidden):
        compiled = compile_launch(kernel, args, constexprs, {"num_warps": tr.GPU_WARPS})
        usage = resource_usage(compiled.asm["cubin"])
        widths = load_widths(compiled.asm["ptx"])
        vector = any(k.startswith(("v4", "v2")) for k in widths)
        print(f"{label:20} {dtype:5} {usage['REG']:5} {usage['STACK']:8}  {widths}")
        if usage["STACK"] or not vector:
            bad += 1
    print("all variants: no spills, vectorised loads" if not bad else f"{bad} variant(s) spill or load scalars")
    return 1 if bad else 0


# --------------------------------------------------------------------------------------------------
# The weight-gradient GEMM of the implicit-GEMM conv (aqcf_kernels/backends/triton/igemm_wgrad.py)
# --------------------------------------------------------------------------------------------------

#: SMs of an H100/H200 SXM (the split-K policy's target)
SM90_SMS = 132


def wgrad_launch_args(
    dtype: str, cq_in: int, cq_out: int, groups: int = 1, dims: int = 2, size: int = 64, batch: int = 32,
    k: int = 3, stride: int = 1, transposed: bool = False, fast8: bool = False,
) -> dict:  # fmt: skip
    """The arguments of ``qconv_wgrad_igemm_kernel`` for the weight gradient of a ``k``^dims conv (padding
    k//2) on a batch of ``size``^dims channels_last images, as ``igemm_wgrad.conv_weight_grad_igemm`` passes
    them, its split count included (the GPU policy with :data:`SM90_SMS` SMs). ``transposed``: the weight
    gradient of the stride-``stride`` transposed conv whose output is that image (x and gy swapped, the
    bias summed over x). ``fast8``: x and gy are the 8 combinations, one GEMM per product and group."""

    pad = k // 2
    out = (size + 2 * pad - k) // stride + 1
    sp_in = (1,) * (3 - dims) + (size,) * dims
    sp_out = (1,) * (3 - dims) + (out,) * dims
    ks = (1,) * (3 - dims) + (k,) * dims
    unit = (1,) * (3 - dims)
    per_product = 1 if fast8 else 4
    c_x, m = (8 if fast8 else 4) * cq_in, batch * math.prod(sp_out)
    ptr = IGEMM_POINTERS[dtype]
    args = dict(x_ptr=ptr, gy_ptr=ptr, part_ptr="*fp32", bsrc_ptr=ptr, bpart_ptr="*fp32")
    args.update(M=m, C_Y=(8 if fast8 else 4) * cq_out, K_TAP=per_product * cq_in // groups)
    args.update(N_G=per_product * cq_out // groups)
    args.update(CQ_IN=cq_in, CG_IN=cq_in // groups, CQ_OUT=cq_out, CG_OUT=cq_out // groups)
    args.update(zip(("ID", "IH", "IW", "OD", "OH", "OW", "KD", "KH", "KW"), (*sp_in, *sp_out, *ks), strict=True))
    strides = (math.prod(sp_in) * c_x, sp_in[1] * sp_in[2] * c_x, sp_in[2] * c_x, c_x)
    args.update(zip(("s_xn", "s_xd", "s_xh", "s_xw"), strides, strict=True))
    args.update(zip(("SD", "SH", "SW"), unit + (stride,) * dims, strict=True))
    args.update(zip(("PD", "PH", "PW"), (0,) * (3 - dims) + (pad,) * dims, strict=True))
    args.update(zip(("DD", "DH", "DW"), (1, 1, 1), strict=True))
    args.update(MB=batch * math.prod(sp_in), C_B=4 * cq_in) if transposed else args.update(MB=m, C_B=4 * cq_out)
    return args


def wgrad_splits(args: dict, config, fast8: bool) -> int:
    """The split count the launcher gives a launch of ``args`` with ``config`` on an H100/H200
    (``igemm_wgrad.config_splits``: the config's own programs per split)."""
    from aqcf_kernels.backends.triton import igemm_wgrad as iw

    groups, taps = args["CQ_OUT"] // args["CG_OUT"], args["KD"] * args["KH"] * args["KW"]
    programs = iw.split_programs(args["CQ_IN"], args["CQ_OUT"], groups, taps, fast8, config.kwargs)
    partial = 4 * (8 if fast8 else 16) * args["CQ_OUT"] * args["CG_IN"] * taps
    return iw.config_splits(args["M"], programs, partial, SM90_SMS)


def wgrad_variants():
    """``(label, dtype, precision, args, constexprs, config)``: every autotune config a launch of each case may
    run (``igemm_wgrad.prune_configs``; a fixed one where ``which`` says so), over the cases: 2d 64q bf16 and
    fp16, 16q and 8q (narrow), groups 2 (128q: runs of 64 channels) and 4 (64q: runs of 16), the transposed
    conv's weight gradient (stride 2), 3d 32q, 1d, and fp32 with TF32 and in IEEE fp32; fast8 at 64q, 128q,
    groups 4, in fp32 with TF32; and runs that are not multiples of 16 channels: 10q (runs of 40) and fast8 at
    40q."""
    from aqcf_kernels.backends.triton.channels import chan_align
    from aqcf_kernels.backends.triton.igemm_wgrad import P_ALIGN, gpu_configs, prune_configs

    WIDE = (256, 128, 64, 8, 3)  # noqa: N806  (the widest tile: without a bias, transposed)
    cases = [
        ("2d 64q", "bf16", "ieee", wgrad_launch_args("bf16", 64, 64), {}, None),
        ("2d 64q", "fp16", "ieee", wgrad_launch_args("fp16", 64, 64), {}, (128, 128, 64, 8, 3)),
        ("2d 64q no bias", "bf16", "ieee", wgrad_launch_args("bf16", 64, 64), dict(HAS_BIAS=False), WIDE),
        ("2d 16q", "bf16", "ieee", wgrad_launch_args("bf16", 16, 16), {}, None),
        ("2d 8q", "bf16", "ieee", wgrad_launch_args("bf16", 8, 8), {}, None),
        ("2d 128q g2", "bf16", "ieee", wgrad_launch_args("bf16", 128, 128, groups=2), dict(GROUPED=True), None),
        ("2d 64q g4", "fp16", "ieee", wgrad_launch_args("fp16", 64, 64, groups=4), dict(GROUPED=True), None),
        ("2d 64q T s2", "bf16", "ieee", wgrad_launch_args("bf16", 64, 64, stride=2, transposed=True), {}, WIDE),
        ("3d 32q", "bf16", "ieee", wgrad_launch_args("bf16", 32, 32, dims=3, size=32, batch=2), {}, (64, 64, 64, 4, 4)),
        ("1d 64q", "fp16", "ieee", wgrad_launch_args("fp16", 64, 64, dims=1, size=4096, batch=32), {},
         (128, 64, 64, 4, 3)),
        ("2d 64q", "fp32", "tf32", wgrad_launch_args("fp32", 64, 64), {}, (128, 128, 64, 8, 3)),
        ("2d 64q", "fp32", "ieee", wgrad_launch_args("fp32", 64, 64), {}, None),
        ("2d 64q fast8", "bf16", "ieee", wgrad_launch_args("bf16", 64, 64, fast8=True), dict(FAST8=True), None),
        ("2d 128q fast8", "bf16", "ieee", wgrad_launch_args("bf16", 128, 128, fast8=True), dict(FAST8=True),
         (128, 128, 64, 8, 3)),
        ("2d 128q fast8", "bf16", "ieee", wgrad_launch_args("bf16", 128, 128, fast8=True), dict(FAST8=True),
         (128, 64, 64, 8, 2, 4)),
        ("2d 64q f8 g4", "fp16", "ieee", wgrad_launch_args("fp16", 64, 64, groups=4, fast8=True),
         dict(FAST8=True, GROUPED=True), None),
        ("2d 10q", "bf16", "ieee", wgrad_launch_args("bf16", 10, 10), {}, None),
        ("2d 40q fast8", "bf16", "ieee", wgrad_launch_args("bf16", 40, 40, fast8=True), dict(FAST8=True), None),
        ("2d 64q fast8", "fp32", "tf32", wgrad_launch_args("fp32", 64, 64, fast8=True), dict(FAST8=True),
         (128, 64, 64, 4, 3)),
    ]  # fmt: skip
    configs = gpu_configs()
    for label, dtype, precision, args, extra, which in cases:
        consts = {
            "DIMS": int(label[0]),  # as the launcher passes them: the conv's dims, whole pixel steps
            "P_EVEN": args["M"] % P_ALIGN == 0,
            "GROUPED": False,
            "FAST8": False,
            "HAS_BIAS": True,
            **extra,
            "DOT_DTYPE": IGEMM_DOTS[dtype],
            "PRECISION": precision,
        }
        # as the launcher says it: the power of two dividing gy's and x's contiguous channel runs
        runs = ("CG_OUT", "CG_IN") if consts["GROUPED"] or consts["FAST8"] else ("N_G", "K_TAP")
        consts["CHAN_ALIGN"] = chan_align(*(args[r] for r in runs))
        chosen = prune_configs(configs, args, **consts) if which is None else [_config(configs, which)]
        for config in chosen:
            yield label, dtype, precision, args, consts, config


def wgrad_main(json_path: str | None = None) -> int:
    """Compile every variant of :func:`wgrad_variants`, print its figures (and write them as JSON): the
    criteria of ``--igemm``, read on the GEMM's pixel loop (the bias programs' loop holds no dot)."""
    import json

    from aqcf_kernels.backends.triton.igemm_wgrad import qconv_wgrad_igemm_kernel

    rows = []
    head = f"{'case':15} {'dtype':5} {'dot':4} {'tiles (M,N,K)':13} {'w':>2} {'st':>2} {'spl':>3} {'regs':>4}"
    print(
        head + f" {'smem B':>7} {'spill':>5} {'ld16':>4} {'async copies':14} {'wgmma':>5} {'mma':>3} {'waits':8}"
        f" {'SASS/step':>9} {'issue':>5}"
    )
    for label, dtype, precision, args, constexprs, config in wgrad_variants():
        consts = dict(constexprs, **config.kwargs)
        options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
        kernel = compile_launch(qconv_wgrad_igemm_kernel, args, consts, options)
        tiles = tuple(config.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
        runs = config.kwargs["RUNS"]  # column blocks a program: its MMA work per step is runs x the tile's
        products = config.kwargs["FAST8_PRODUCTS"] if consts["FAST8"] else 1  # and fast8's products a program
        row = dict(case=label, dtype=dtype, precision=precision, tiles=tiles, runs=runs, products=products)
        row.update(options, splits=wgrad_splits(args, config, consts["FAST8"]))
        dots = runs * products
        row.update(analyse_igemm(kernel, dtype, precision, (tiles[0], dots * tiles[1], tiles[2]), config.num_warps))
        rows.append(row)
        shown = ",".join(map(str, tiles)) + (f"x{runs}" if runs > 1 else "") + (f"p{products}" if products > 1 else "")
        print(
            f"{label:15} {dtype:5} {precision:4} {shown:13} {config.num_warps:2} "
            f"{config.num_stages:2} {row['splits']:3} {row['regs']:4} {row['smem']:7} {row['stack']:5} "
            f"{row['scalar_2byte_loads_in_loop']:4} {_copies(row):14} "
            f"{row['wgmma_in_loop']:5} {row['mma_sync_in_loop']:3} {row['wait_pendings_in_loop']!s:8}"
            f" {_per_step(row):>9} {_share(row):>5}"
        )
    if json_path:
        Path(json_path).write_text(json.dumps(rows, indent=1))
    return wgrad_fold_main()


def wgrad_fold_main() -> int:
    """Registers, stack and load widths of the reduce-and-fold kernel (2d 64q 3x3, 8 splits, with bias), of
    hamilton's 16 blocks and fast8's 8 products; non-zero if it spills."""
    from aqcf_kernels.backends.triton.igemm_wgrad import FOLD_BLOCK, qconv_wgrad_fold_kernel

    bad = 0
    for ptr, blocks in (("*bf16", 16), ("*fp32", 16), ("*bf16", 8)):
        per = 4 if blocks == 16 else 1
        args = dict(part_ptr="*fp32", t_ptr="*fp32", gw_ptr=ptr, bpart_ptr="*fp32", gb_ptr=ptr, Q=64 * 64 * 9)
        args.update(SPLIT_STRIDE=blocks * 64 * 64 * 9, SPLITS=8, N_G=per * 64, K_TAP=per * 64)
        args.update(PRODUCT_STRIDE=64 * 64 * 9, CG_OUT=64, CG_IN=64, TAPS=9, C_B=256)
        consts = dict(NB=blocks, HAS_BIAS=True, BLOCK=FOLD_BLOCK)
        kernel = compile_launch(qconv_wgrad_fold_kernel, args, consts, {"num_warps": 4})
        usage = resource_usage(kernel.asm["cubin"])
        widths = load_widths(kernel.asm["ptx"])
        which = "hamilton" if blocks == 16 else "fast8"
        print(f"fold kernel, {which}, {ptr[1:]} out: regs {usage['REG']}, stack {usage['STACK']} B, loads {widths}")
        bad += usage["STACK"] != 0
    return 1 if bad else 0


# --------------------------------------------------------------------------------------------------
# The A-QCF attention's kernels (aqcf_kernels/backends/triton/attention.py)
# --------------------------------------------------------------------------------------------------

#: (dtype, the dot's precision, head sizes E in reals): every configuration of :data:`attention.GPU_TILES`, E = 48
#: and 96 masked to a power of two, and fp16 at two sizes (it compiles as bf16 does).
ATTENTION_CASES = [
    ("bf16", "ieee", (16, 32, 48, 64, 96, 128, 256)),
    ("fp16", "ieee", (64, 128)),
    ("fp32", "tf32", (16, 32, 64, 128, 256)),
    ("fp32", "ieee", (16, 32, 64, 128, 256)),
]
#: The statistics' pointers, fp32 whatever the operands' dtype.
ATTENTION_FP32_POINTERS = {"la_ptr", "lb_ptr", "da_ptr", "db_ptr"}


def attention_variants(tokens: int = 4096):
    """``(kernel name, kernel, dtype, precision, E, args, constexprs, tiles)``: each attention kernel as the
    launcher launches it on a GPU (its :func:`attention.gpu_tiles`) on ``tokens`` queries and keys a side."""
    from aqcf_kernels.backends.triton import attention as ta

    kernels = dict(zip(ta.KERNEL_NAMES, (ta.attention_fwd_kernel, ta.attention_bwd_dkdv_kernel,
                                         ta.attention_bwd_dq_kernel), strict=True))  # fmt: skip
    sizes = dict(n_qa=tokens, n_ka=tokens, n_qb=tokens, n_kb=tokens, scale=0.125, BH0=0)
    for dtype, precision, heads in ATTENTION_CASES:
        dot = precision if dtype == "fp32" else "half"
        for e, (name, kernel) in itertools.product(heads, kernels.items()):
            block_e = ta._head_block(e)
            tiles = ta.gpu_tiles(name, dot, block_e)
            own = tiles.block_n if name == "dkdv" else tiles.block_m  # the rows a program owns
            args = {
                n: "*fp32" if n in ATTENTION_FP32_POINTERS else f"*{dtype}"
                for n in kernel.arg_names
                if n.endswith("_ptr")
            }
            args.update(sizes, tiles_a=tokens // own, tiles_b=tokens // own)
            args = {n: v for n, v in args.items() if n in kernel.arg_names}
            consts = dict(E=e, BLOCK_E=block_e, DOT_DTYPE=IGEMM_DOTS[dtype], PRECISION=precision,
                          BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n)  # fmt: skip
            yield name, kernel, dtype, precision, e, args, consts, tiles


def attention_main(json_path: str | None = None) -> int:
    """Compile every variant of :func:`attention_variants` for sm_90, print its figures (and write them as
    JSON): registers, shared memory, spills, and the MMA loop's scalar 2-byte loads, async copies, wgmma and
    mma.sync and their waits."""
    import json

    rows = []
    print(f"triton {triton.__version__}, sm_90, 4096 tokens a side")
    print(
        f"{'kernel':6} {'dtype':5} {'dot':4} {'E':>3} {'tiles (M,N,E)':13} {'w':>2} {'st':>2} {'regs':>4} "
        f"{'smem B':>7} {'spill':>5} {'ld16':>4} {'async copies':16} {'wgmma':>5} {'mma':>3} {'waits':12} "
        f"{'SASS/step':>9}"
    )
    for name, kernel, dtype, precision, e, args, consts, tiles in attention_variants():
        options = {"num_warps": tiles.num_warps, "num_stages": tiles.num_stages}
        compiled = compile_launch(kernel, args, consts, options)
        shape = (tiles.block_m, tiles.block_n, consts["BLOCK_E"])
        row = dict(kernel=name, dtype=dtype, precision=precision, e=e, tiles=shape, **options)
        row.update(analyse_igemm(compiled, dtype, precision, shape, tiles.num_warps))
        rows.append(row)
        print(
            f"{name:6} {dtype:5} {precision:4} {e:3} {','.join(map(str, shape)):13} {tiles.num_warps:2} "
            f"{tiles.num_stages:2} {row['regs']:4} {row['smem']:7} {row['stack']:5} "
            f"{row['scalar_2byte_loads_in_loop']:4} {_copies(row):16} {row['wgmma_in_loop']:5} "
            f"{row['mma_sync_in_loop']:3} {row['wait_pendings_in_loop']!s:12} {_per_step(row):>9}"
        )
    rows += gate_rows()
    if json_path:
        Path(json_path).write_text(json.dumps(rows, indent=1))
    return 0


def gate_rows(numel: int = 32 * 64 * 64 * 64) -> list[dict]:
    """Registers, stack and global load widths of the gate's forward and backward kernels (elementwise over
    ``numel`` values, the launcher's block), bf16 and fp32; printed and returned as rows (``kernel``: gate_fwd,
    gate_bwd)."""
    from aqcf_kernels.backends.triton import attention as ta

    rows = []
    for (name, kernel), dtype in itertools.product(
        (("gate_fwd", ta.gated_residual_fwd_kernel), ("gate_bwd", ta.gated_residual_bwd_kernel)), ("bf16", "fp32")
    ):
        args = {
            n: "*fp32" if n == "dalpha_partial_ptr" else f"*{dtype}" for n in kernel.arg_names if n.endswith("_ptr")
        }
        args["numel"] = numel
        compiled = compile_launch(kernel, args, {"BLOCK": ta.GATE_BLOCK}, {"num_warps": 4})
        usage = resource_usage(compiled.asm["cubin"])
        widths = load_widths(compiled.asm["ptx"])
        rows.append(dict(kernel=name, dtype=dtype, regs=usage["REG"], stack=usage["STACK"], load_widths=widths))
        print(f"{name:8} {dtype:5} regs {usage['REG']:3}  stack {usage['STACK']} B  loads {widths}")
    return rows


if __name__ == "__main__":
    sys.exit(main())
