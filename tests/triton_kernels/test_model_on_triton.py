"""A-QCF-Net's training step with every quaternion op on the Triton kernels, against float64.

What a GPU runs when the ``triton`` backend serves the network: the convs (forward, input gradient,
weight gradient with or without the bias's), the fused norms and the A-QCF attention and gate, in
one training step of the joint model with its fusion blocks active. Here the kernels are interpreted
(``TRITON_INTERPRET=1``, tests/conftest.py) on CPU tensors; on a GPU they run natively. A spy on each
Triton entry point proves they served. The accuracy rule is FlashAttention's: the logits and the whole
gradient are within twice the error of the CPU build in the same dtype, both measured against the CPU
build in float64 (same weights, same inputs). The references run on CPU on a GPU machine too, where the
norms of a CUDA model take the Triton kernels whatever the backend.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from aqcf_kernels import backends
from aqcf_kernels.backends.triton import common
from aqcf_kernels.models import AQCFNet

pytestmark = pytest.mark.skipif(common.unavailable() is not None, reason=f"triton: {common.unavailable()}")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def triton_served(monkeypatch, python_kernels_on_cpu) -> Counter:
    """Counts the calls of each Triton entry point: conv, norm and attention, forward and backward."""
    from aqcf_kernels.backends.triton import attention, norm
    from aqcf_kernels.backends.triton.conv import TritonConvBackend

    served: Counter = Counter()

    def spy(owner, name, static=False):
        real = getattr(owner, name)

        def counted(*args, **kwargs):
            served[name] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, staticmethod(counted) if static else counted)

    for name in ("conv", "conv_weight_grad", "conv_weight_bias_grad"):
        spy(TritonConvBackend, name)
    for name in ("cross_attention", "cross_attention_backward", "gated_residual", "gated_residual_backward"):
        spy(attention.TritonAttentionBackend, name, static=True)
    spy(norm, "forward")
    spy(norm, "backward")
    return served


def _model(dtype: torch.dtype, device: str = "cpu") -> AQCFNet:
    torch.manual_seed(0)
    model = AQCFNet(2, features=(4, 8), bottleneck=8, heads=1, dtype=dtype, device=device)
    with torch.no_grad():  # a trained model's fusion: the attention path contributes to the output
        for block in model.modules():
            if hasattr(block, "alpha_a"):
                block.alpha_a.fill_(0.5)
                block.alpha_b.fill_(-0.5)
    return model


def _training_step(dtype: torch.dtype, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The logits of both modalities and every parameter's gradient, flattened, in float64 on CPU."""
    model = _model(dtype, device)
    model.load_state_dict(_model(torch.float64).state_dict())  # the same weights, rounded once
    g = torch.Generator().manual_seed(1)
    ct, mri = (torch.randn(1, 1, 11, 9, generator=g, dtype=torch.float64).to(device, dtype) for _ in range(2))
    out = model(ct=ct, mri=mri)
    # a loss with a fresh gradient per logit (not a plain sum: that one is constant over the logits)
    loss = sum((out[m].double() * torch.linspace(-1, 2, out[m].numel(), dtype=torch.float64,
               device=device).view_as(out[m])).square().mean() for m in ("ct", "mri"))  # fmt: skip
    loss.backward()
    logits = torch.cat([out[m].detach().double().flatten() for m in ("ct", "mri")])
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads)
    return logits.cpu(), torch.cat([g.double().flatten() for g in grads]).cpu()


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_step_on_triton_kernels_is_as_accurate_as_the_cpu_build(triton_served, dtype) -> None:
    ref_logits, ref_grads = _training_step(torch.float64)
    cpu_logits, cpu_grads = _training_step(dtype)
    assert not triton_served, "the CPU build ran a Triton kernel"
    with backends.use("triton"):
        logits, grads = _training_step(dtype, DEVICE)
    served = dict(triton_served)
    # every quaternion conv's forward and input gradient (conv), and its weight gradient; each norm's and
    # each fusion block's forward and backward
    weight_grads = served.get("conv_weight_grad", 0) + served.get("conv_weight_bias_grad", 0)
    assert weight_grads > 0 and served.get("conv_weight_bias_grad", 0) > 0, served
    assert served.get("conv") == 2 * weight_grads, served
    assert served.get("forward", 0) > 0 and served.get("backward") == served["forward"], served
    for op in ("cross_attention", "gated_residual"):
        assert served.get(op, 0) > 0 and served.get(f"{op}_backward") == served[op], served
    floor = 1e-6 if dtype == torch.float32 else 1e-3
    assert _rel(logits, ref_logits) <= 2 * _rel(cpu_logits, ref_logits) + floor
    assert _rel(grads, ref_grads) <= 2 * _rel(cpu_grads, ref_grads) + floor
