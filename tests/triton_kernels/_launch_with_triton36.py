"""Every Triton launcher's GPU launch path through triton 3.6, without a GPU (run as a script with triton
3.6 first on the path; test_igemm_static.py does), on _standin_gpu.py's sm_90: the launchers take the
branches they take on a GPU (``tl.dot`` in bf16, TF32 when allowed, the GPU launch options and autotune
sets; ``AQCF_TRITON_AUTOTUNE=first``: one config each), and triton binds, specialises and compiles each
launch as it would there. The interpreter runs none of this: a launcher that passes an argument the
compiled kernel does not take, or a constexpr of the wrong kind, fails here and not only on a GPU.
Nothing is launched, so no output is checked; a kernel that needs more shared memory than the GPU has is
refused as on the GPU (``AQCF_STANDIN_MAX_SHARED`` stands in for a smaller one). Each launch runs twice: the
second finds its key tuned and launches the JIT kernel with the autotuner's choice itself
(``common.TunedLauncher``). bf16 runs every launcher and variant, fp32 (with TF32) one launch of each and the
attention at its larger head sizes. Arguments, if any, keep only the launches whose name holds one of them.
Prints JSON ``{launch: "ok" | error}``, the compile count, per autotuned kernel its launches and how many the
autotuner handled, and the refused launches ``[kernel, shared memory]``.
"""

import json
import os
import sys
import traceback

os.environ["AQCF_TRITON_AUTOTUNE"] = "first"

import _standin_gpu as standin  # noqa: E402
import torch  # noqa: E402
from _standin_gpu import install  # noqa: E402

from aqcf_kernels.backends.triton import (  # noqa: E402
    activation_grad,
    attention,
    common,
    igemm,
    igemm_wgrad,
    norm,
    rnn_cell,
)
from aqcf_kernels.backends.triton import conv as conv_v1  # noqa: E402
from aqcf_kernels.params import ConvParams  # noqa: E402

BF16, FP32 = torch.bfloat16, torch.float32


def _conv_inputs(dtype, cq_in=8, cq_out=8, spatial=(6, 5), kernel=(3, 3), transposed=False, groups=1):
    w_shape = (4, cq_in, cq_out // groups, *kernel) if transposed else (4, cq_out, cq_in // groups, *kernel)
    x = torch.randn(2, 4 * cq_in, *spatial, dtype=dtype)
    return x, torch.randn(*w_shape, dtype=dtype), torch.randn(4 * cq_out, dtype=dtype)


def _params(n=2, stride=1, padding=1, transposed=False, output_padding=0, groups=1) -> ConvParams:
    return ConvParams(n, (stride,) * n, (padding,) * n, (1,) * n, transposed, (output_padding,) * n, groups)


def _norm(x, per_sample):
    weight, bias = torch.ones(x.shape[1] // 4, dtype=x.dtype), torch.zeros(x.shape[1], dtype=x.dtype)
    y, mean, var = norm.forward(x, weight, bias, None, None, True, per_sample, 1e-5, "gelu", 0.0)
    norm.backward(torch.randn_like(y), x, weight, bias, mean, var, True, per_sample, 1e-5, "gelu", 0.0, [True] * 3)


def _rnn(mode, dtype, hidden=16):
    gates = {"lstm": 4, "ligru": 2}[mode] * hidden
    proj, h0 = torch.randn(3, 2, gates, dtype=dtype), torch.randn(2, hidden, dtype=dtype)
    c0 = torch.randn(2, hidden, dtype=dtype) if mode == "lstm" else None
    weight = torch.randn(4, gates // 4, hidden // 4, dtype=dtype)
    nonlinearity = "tanh" if mode == "lstm" else "relu"
    out, cells, saved = rnn_cell.forward(proj, h0, c0, weight, mode, nonlinearity, 0.0, False)
    rnn_cell.backward(
        torch.randn_like(out), None, out, cells, saved, h0, c0, weight, mode, nonlinearity, 0.0, False, [True] * 4
    )


def _attention(dtype, e=16):
    q_a, k_a, v_a = (torch.randn(1, 2, 40, e, dtype=dtype) for _ in range(3))
    q_b, k_b, v_b = (torch.randn(1, 2, 24, e, dtype=dtype) for _ in range(3))
    out_a, out_b, lse_a, lse_b = attention.cross_attention(q_a, k_a, v_a, q_b, k_b, v_b, 0.25)
    grads = torch.randn_like(out_a), torch.randn_like(out_b)
    attention.cross_attention_backward(*grads, q_a, k_a, v_a, q_b, k_b, v_b, out_a, out_b, lse_a, lse_b, 0.25)
    f, o = torch.randn(1, 32, 5, 6, dtype=dtype), torch.randn(1, 32, 5, 6, dtype=dtype)
    logits, alpha = torch.randn(1, 32, 1, 1, dtype=dtype), torch.tensor(0.3, dtype=dtype)
    attention.gated_residual(f, o, logits, alpha)
    attention.gated_residual_backward(torch.randn_like(f), o, logits, alpha)


def _activation_pass(z):
    activation_grad.activation_grad_bias(torch.randn_like(z), z, "gelu", 0.0)


def launches(dtype, every: bool):
    """``(name, function, args)`` for the launches of the GPU path in ``dtype``: every launcher and variant
    (``every``), or one launch of each kernel family's launcher."""
    tag = str(dtype).removeprefix("torch.")
    p2, pt, p3 = _params(), _params(stride=2, transposed=True, output_padding=1), _params(n=3)
    x, w, b = _conv_inputs(dtype)
    xt, wt, bt = _conv_inputs(dtype, transposed=True)
    x3, w3, _ = _conv_inputs(dtype, spatial=(4, 3, 5), kernel=(3, 3, 3))
    gy = torch.randn(2, 32, 6, 5, dtype=dtype)
    z = torch.randn(2, 32, 6, 5, dtype=dtype)
    for algorithm in ("hamilton", "fast8"):
        yield f"igemm {tag} {algorithm} conv+bias+relu", igemm.conv_igemm, (x, w, b, p2, "relu", 0.0, False, algorithm)
        yield f"igemm_wgrad {tag} {algorithm} with bias", igemm_wgrad.conv_weight_grad_igemm, (
            x, gy, w.shape, p2, True, None, None, algorithm,
        )  # fmt: skip
        if every:
            yield f"igemm {tag} {algorithm} transposed s2 gelu keep_pre", igemm.conv_igemm, (
                xt, wt, bt, pt, "gelu", 0.0, True, algorithm,
            )  # fmt: skip
            yield f"igemm {tag} {algorithm} 3d", igemm.conv_igemm, (x3, w3, None, p3, None, 0.0, False, algorithm)
            yield f"v1 conv {tag} {algorithm}", conv_v1.conv, (x, w, b, p2, algorithm, "leaky_relu", 0.1)
            yield f"v1 wgrad {tag} {algorithm}", conv_v1.conv_weight_grad, (x, gy, w.shape, p2, algorithm)
    yield (
        f"activation_grad_bias {tag} channels_last",
        _activation_pass,
        (z.contiguous(memory_format=torch.channels_last),),
    )
    yield f"norm {tag} batch fwd+bwd", _norm, (torch.randn(2, 16, 6, 5, dtype=dtype), False)
    yield f"rnn {tag} lstm fwd+bwd", _rnn, ("lstm", dtype)
    yield f"attention {tag} fwd+bwd and gate", _attention, (dtype,)
    for e in (96, 256):  # the attention kernels' larger tiles (attention.GPU_TILES), within the GPU's shared memory
        yield f"attention {tag} E={e} fwd+bwd and gate", _attention, (dtype, e)
    if every:
        yield f"activation_grad_bias {tag} nchw", _activation_pass, (z,)
        yield f"norm {tag} instance fwd+bwd", _norm, (torch.randn(2, 16, 6, 5, dtype=dtype), True)
        yield f"rnn {tag} ligru fwd+bwd", _rnn, ("ligru", dtype)


def _count_autotuned_launches() -> dict:
    """Per autotuned kernel, how many launches its :class:`common.TunedLauncher` took and how many of them
    the autotuner handled (the rest went straight to the JIT kernel)."""
    counts = {name: {"launches": 0, "through_autotuner": 0} for name in common.AUTOTUNED}
    for name, (tuner, _) in common.AUTOTUNED.items():
        tuner.run = _counted(tuner.run, counts[name], "through_autotuner")
    launcher_run = common.TunedLauncher.run

    def counted_launch(self, grid, *args, **kwargs):
        counts[self.tuner.fn.__name__]["launches"] += 1
        return launcher_run(self, grid, *args, **kwargs)

    common.TunedLauncher.run = counted_launch
    return counts


def _counted(function, counts: dict, field: str):
    def counted(*args, **kwargs):
        counts[field] += 1
        return function(*args, **kwargs)

    return counted


def main() -> int:
    """``[NAME ...]``: only the launches whose name holds one of these."""
    compiles = install()
    autotuned = _count_autotuned_launches()
    results = {}
    torch.backends.cuda.matmul.allow_tf32 = True  # fp32 launches take the TF32 dot (off: IEEE, static tests)
    # bf16 (the GPU targets' dtype): every launcher and variant; fp32 (TF32): one launch per launcher
    for name, function, args in [*launches(BF16, every=True), *launches(FP32, every=False)]:
        if sys.argv[1:] and not any(part in name for part in sys.argv[1:]):
            continue
        try:
            function(*args)
            function(*args)  # again: an autotuned kernel's tuned key now launches directly (common.TunedLauncher)
            results[name] = "ok"
        except Exception:  # noqa: BLE001  (reported: the test fails on any)
            results[name] = traceback.format_exc(limit=-3)
    print(json.dumps(dict(results=results, compiles=len(compiles), autotuned=autotuned, refused=standin.REFUSED)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
