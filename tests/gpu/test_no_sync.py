"""A settled training step of a quaternion conv never waits for the GPU.

A host-device synchronisation inside a layer (a blocking copy of a table built per call, an ``.item()``)
stalls the host until every queued kernel has run, so the GPU idles while the host then launches the rest
of the step: on small and medium layers, whose steps are bound by the host's launch time, it costs more
than the kernels. The Triton fast8 conv had one (its combination table built per call with
``torch.tensor(..., device='cuda')``). Measuring (``algorithm='auto'``) and Triton's autotuning synchronise
by design, on the first calls of a signature: the steps below are checked once those are done, under
``torch.cuda.set_sync_debug_mode('error')``, which raises on any synchronising call.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from aqcf_kernels import backends, tuning
from aqcf_kernels import functional as QF
from aqcf_kernels.backends import registered

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# (backend forced or None for the registry's choice, algorithm)
PAIRS = [
    (None, "auto"),
    ("torch", "hamilton"),
    ("torch", "fast8"),
    ("cuda", "hamilton"),
    ("cuda", "fast8"),
    ("triton", "hamilton"),
    ("triton", "fast8"),
]


@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "transposed"])
@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize(("backend", "algorithm"), PAIRS, ids=[f"{b or 'auto'}-{a}" for b, a in PAIRS])
def test_a_settled_step_does_not_synchronise(backend, algorithm, activation, transposed):
    if backend is not None and registered()[backend].unavailable() is not None:
        pytest.fail(f"{backend} unavailable on a GPU machine: {registered()[backend].unavailable()}")
    g = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(2, 4 * 8, 12, 10, device="cuda", generator=g, dtype=torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    w = (0.1 * torch.randn(4, 8, 8, 3, 3, device="cuda", generator=g)).requires_grad_()
    b = torch.randn(32, device="cuda", generator=g).requires_grad_()
    conv = QF.quaternion_conv_transpose2d if transposed else QF.quaternion_conv2d
    kwargs = {} if activation is None else {"activation": activation}

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = conv(x, w, b, padding=1, algorithm=algorithm, **kwargs)
        torch.autograd.grad(y.float().square().sum(), (x, w, b))

    # measuring (auto: up to every candidate's provisional calls) and Triton's autotuning (first calls) settle
    warmup = 1 + tuning.max_provisional_calls(3) if backend is None else 2
    with backends.use(backend) if backend else contextlib.nullcontext():
        for _ in range(warmup):
            step()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            step()
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
