"""torch.func on the Triton conv kernels (interpreted on CPU without a GPU): the vmap rules fold per-sample
gradients into one grouped conv and one grouped weight gradient (``groups`` = samples), which the implicit
GEMMs must serve as they serve any grouped conv. fp32 against the float64 reference's per-sample gradients,
within the hamilton contract (1e-5) and fast8's (5e-4); the launches counted, so a fallback cannot pass.
"""

from __future__ import annotations

import pytest
import torch
from torch.func import grad, vmap

from aqcf_kernels import functional as QF
from aqcf_kernels import reference
from aqcf_kernels.backends import registered
from aqcf_kernels.backends.base import activate

TRITON = registered()["triton"]
pytestmark = [
    pytest.mark.skipif(TRITON.unavailable() is not None, reason=f"triton backend unavailable: {TRITON.unavailable()}"),
    pytest.mark.usefixtures("no_vmap_fallback", "python_kernels_on_cpu"),
]
if TRITON.unavailable() is None:
    from aqcf_kernels.backends.triton import igemm, igemm_wgrad
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def triton_launches(monkeypatch):
    """Force the triton backend; count its conv and weight-gradient GEMMs, with the groups they ran."""
    monkeypatch.setenv("AQCF_BACKEND", "triton")
    launches = []
    conv, wgrad = igemm.conv_igemm, igemm_wgrad.conv_weight_grad_igemm

    def counting_conv(input, weight, bias, p, *args, **kwargs):
        launches.append(("conv", p.groups))
        return conv(input, weight, bias, p, *args, **kwargs)

    def counting_wgrad(input, grad_output, weight_shape, p, *args, **kwargs):
        launches.append(("wgrad", p.groups))
        return wgrad(input, grad_output, weight_shape, p, *args, **kwargs)

    monkeypatch.setattr(igemm, "conv_igemm", counting_conv)
    monkeypatch.setattr(igemm_wgrad, "conv_weight_grad_igemm", counting_wgrad)
    return launches


def _rel(out, ref) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    return ((out - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize(
    "algorithm, activation, transposed",
    [("hamilton", "gelu", False), ("fast8", "relu", True)],
    ids=["hamilton", "fast8"],
)
def test_per_sample_gradients(algorithm, activation, transposed, triton_launches):
    g = torch.Generator().manual_seed(4)
    samples, groups = 3, 2
    geometry = dict(stride=2, padding=1, groups=groups)
    if transposed:
        geometry.update(transposed=True, output_padding=1)
    w_shape = (4, 2 * groups, 3, 3, 2) if transposed else (4, 3 * groups, 2, 3, 2)  # odd channel counts per group
    x = torch.randn(samples, 4 * 2 * groups, 5, 6, generator=g, dtype=torch.float64)
    w = torch.randn(w_shape, generator=g, dtype=torch.float64) / 4
    out_channels = 4 * (w_shape[2] * groups if transposed else w_shape[1])
    b = torch.randn(out_channels, generator=g, dtype=torch.float64)

    def loss(conv):
        def f(w, b, x, t):
            return (conv(x[None], w, b)[0] * t).sum()

        return f

    def ours(x, w, b):
        return QF.quaternion_conv(x, w, b, **geometry, algorithm=algorithm, activation=activation)

    def ref(x, w, b):
        return activate(reference.quaternion_conv_naive(x, w, b, **geometry), activation, 0.01)

    target = torch.randn_like(ref(x, w, b), dtype=torch.float64)
    want = [grad(loss(ref), argnums=(0, 1))(w, b, x[i], target[i]) for i in range(samples)]
    to = dict(dtype=torch.float32, device=DEVICE)
    got = vmap(grad(loss(ours), argnums=(0, 1)), in_dims=(None, None, 0, 0))(
        w.to(**to), b.to(**to), x.to(**to), target.to(**to)
    )
    # the forward folded into the batch (the conv's own groups), the weight gradient into groups per sample
    assert triton_launches == [("conv", groups), ("wgrad", groups * samples)]
    bound = 1e-5 if algorithm == "hamilton" else 5e-4
    for name, o, r in zip(("weight", "bias"), got, [torch.stack(t) for t in zip(*want, strict=True)], strict=True):
        assert o.shape == r.shape and _rel(o, r) <= bound, f"{name}: relative error {_rel(o, r):.2e}"
