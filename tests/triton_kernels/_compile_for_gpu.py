"""Compile every Triton kernel variant to PTX/cubin for sm_90 without a GPU (run as a script).

The interpreter executes kernels as Python, so it never runs triton's compiler frontend: code that
interprets fine can still fail to compile (a shape that only type-checks in one constexpr branch,
an unsupported construct). This compiles what the GPU would, for Hopper, on any machine.
Must run with TRITON_INTERPRET unset (tests/triton_kernels/test_triton_compile.py does that).
"""

import itertools
import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from aqcf_kernels.backends.triton.attention_kernels import (
    attention_bwd_dkdv_kernel,
    attention_bwd_dq_kernel,
    attention_fwd_kernel,
    gated_residual_bwd_kernel,
    gated_residual_fwd_kernel,
)
from aqcf_kernels.backends.triton.conv_kernels import qconv_kernel, qconv_wgrad_kernel

TARGET = GPUTarget("cuda", 90, 32)
DTYPES = {"fp32": (tl.float32, "*fp32"), "bf16": (tl.bfloat16, "*bf16")}


# Arguments whose type is not the tensor dtype / i32 default: fp32 accumulators and statistics.
FP32_POINTERS = {"gw_ptr", "la_ptr", "lb_ptr", "da_ptr", "db_ptr", "dalpha_partial_ptr"}


def compile_variant(kernel, pointers, constexprs, ptr_type, options=None):
    """The compiled kernel (``.asm['cubin']``, ``.asm['ptx']``) for sm_90; ``options`` e.g. num_warps."""
    options = options or {}
    signature = {
        name: "constexpr" if name in constexprs else (ptr_type if name in pointers else "i32")
        for name in kernel.arg_names
    }
    for name in FP32_POINTERS & set(pointers):
        signature[name] = "*fp32"
    for name in ("scale", "negative_slope"):
        if name in signature:
            signature[name] = "fp32"
    return triton.compile(
        ASTSource(fn=kernel, signature=signature, constexprs=constexprs), target=TARGET, options=options
    )


def main() -> int:
    # Every constexpr branch of the frontend (transposed, fast8, bias) in fp32 with TF32, and each
    # algorithm once in bf16 (the half-precision dot); ~6 s per variant on a cold cache.
    count = 0
    variants = [("fp32", "tf32", f, t) for f, t in itertools.product((False, True), (False, True))]
    variants += [("bf16", "ieee", f, False) for f in (False, True)]
    for dtype, precision, fast8, transposed in variants:
        dot_dtype, ptr_type = DTYPES[dtype]
        compile_variant(
            qconv_kernel,
            {"x_ptr", "w_ptr", "b_ptr", "y_ptr", "z_ptr"},
            dict(
                TRANSPOSED=transposed,
                FAST8=fast8,
                HAS_BIAS=True,
                DOT_DTYPE=dot_dtype,
                PRECISION=precision,
                BLOCK_M=64,
                BLOCK_N=32 if fast8 else 64,
                BLOCK_K=32,
                # the fused epilogue: GELU keeping z in one variant per dtype, no activation elsewhere
                ACTIVATION=3 if transposed else 0,
                STORE_PRE=transposed,
            ),
            ptr_type,
        )
        count += 1
        if not transposed:
            compile_variant(
                qconv_wgrad_kernel,
                {"x_ptr", "gy_ptr", "gw_ptr"},
                dict(FAST8=fast8, DOT_DTYPE=dot_dtype, PRECISION=precision, BLOCK_O=32, BLOCK_C=32, BLOCK_P=64),
                ptr_type,
            )
            count += 1
    count += compile_attention()
    print(f"compiled {count} kernel variants for sm_90")
    return 0


def compile_attention() -> int:
    """The attention kernels (forward, both backward halves) and the gate, in fp32 (TF32) and bf16."""
    count = 0
    for dtype, precision in (("fp32", "tf32"), ("bf16", "ieee")):
        dot_dtype, ptr_type = DTYPES[dtype]
        consts = dict(E=32, DOT_DTYPE=dot_dtype, PRECISION=precision, BLOCK_M=128, BLOCK_N=64, BLOCK_E=32)
        for kernel in (attention_fwd_kernel, attention_bwd_dkdv_kernel, attention_bwd_dq_kernel):
            pointers = {name for name in kernel.arg_names if name.endswith("_ptr")}
            compile_variant(kernel, pointers, consts, ptr_type)
            count += 1
        for kernel in (gated_residual_fwd_kernel, gated_residual_bwd_kernel):
            pointers = {name for name in kernel.arg_names if name.endswith("_ptr")}
            compile_variant(kernel, pointers, dict(BLOCK=1024), ptr_type)
            count += 1
    return count


if __name__ == "__main__":
    sys.exit(main())
