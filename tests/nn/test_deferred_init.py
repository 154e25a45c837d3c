"""Deferred initialisation: a layer or A-QCF-Net built under ``torch.device('meta')``, given memory by
``to_empty`` and then initialised by every module's ``reset_parameters`` (FSDP's recipe for models too
big to build twice) gets the state a fresh build gets: the same constants (norm scales and shifts,
running statistics, the A-QCF block's alphas, zero biases) and random weights of the same scale. The
new memory is filled with NaN first, so a parameter no ``reset_parameters`` covers stays NaN and fails.
Before, ``AQCFBlock`` had no ``reset_parameters``: its alphas kept the NaN (a fresh block is the identity).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from aqcf_kernels import nn as qnn
from aqcf_kernels.models import AQCFNet

from .test_fx import LAYERS

MODELS = {
    "aqcfnet_2d": lambda: AQCFNet(2, features=(8, 16), bottleneck=32, deep_supervision=True),
    "aqcfnet_3d_instance_pool": lambda: AQCFNet(
        3, features=(8, 16), bottleneck=32, norm="instance", gate="channel", down="pool"
    ),
    "aqcfnet_real_twin": lambda: AQCFNet(2, features=(8, 16), bottleneck=32, real_valued=True),
    "whitened_norm": lambda: qnn.QuaternionBatchNorm1d(8, whiten=True),
    "rotation_linear": lambda: qnn.QuaternionLinear(8, 12, rotation=True),
    **{name: factory for name, (factory, _) in LAYERS.items()},
}


def _deferred(factory) -> nn.Module:
    with torch.device("meta"):
        module = factory()
    module.to_empty(device="cpu")
    with torch.no_grad():  # what new memory may hold
        for t in itertools.chain(module.parameters(), module.buffers()):
            t.fill_(float("nan") if t.is_floating_point() else 12345)
    for m in module.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return module


@pytest.mark.parametrize("name", MODELS)
def test_meta_build_then_reset_parameters_gives_a_fresh_builds_state(name):
    torch.manual_seed(0)
    fresh = MODELS[name]().state_dict()
    deferred = _deferred(MODELS[name]).state_dict()
    assert list(deferred) == list(fresh)
    for key, want in fresh.items():
        got = deferred[key]
        assert got.shape == want.shape and got.dtype == want.dtype and got.device.type == "cpu", key
        if not want.is_floating_point() or want.numel() < 2 or bool((want == want.flatten()[0]).all()):
            torch.testing.assert_close(got, want, rtol=0, atol=0, msg=lambda m, key=key: f"{key}: {m}")
        else:  # random: finite, not constant, the same scale
            assert torch.isfinite(got).all(), key
            assert got.std() > 0, key
            if want.numel() >= 64:
                assert 0.5 < (got.std() / want.std()).item() < 2, key


def test_aqcf_block_reset_parameters_restores_the_identity_and_every_projection():
    torch.manual_seed(0)
    block = qnn.AQCFBlock(16, heads=2)
    before = {k: v.clone() for k, v in block.state_dict().items()}
    with torch.no_grad():
        block.alpha_a.fill_(0.5)
        block.alpha_b.fill_(-0.3)
    block.reset_parameters()
    assert block.alpha_a.item() == 0 and block.alpha_b.item() == 0
    changed = [k for k, v in block.state_dict().items() if not torch.equal(v, before[k])]
    assert {k.split(".")[0] for k in changed} == {"qkv_a", "qkv_b", "out_a", "out_b", "gate_a", "gate_b"}
    a, b = torch.randn(2, 16, 3, 5), torch.randn(2, 16, 4, 2)
    out_a, out_b = block(a, b)
    assert torch.equal(out_a, a) and torch.equal(out_b, b)
