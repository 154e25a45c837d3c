"""AQCFNet's options dataclass: declared once for the constructor and the run config's model section,
checked once (errors naming the option, with the caller's prefix), and built from either side."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

from aqcf_kernels.models import AQCFNet, AQCFNetOptions, ArchitectureOptions
from aqcf_kernels.pipeline.checkpoint import build_model
from aqcf_kernels.pipeline.config import RunConfig

TINY = {"features": (8, 16), "bottleneck": 32, "heads": 2}

pytestmark = pytest.mark.usefixtures("single_threaded")


def test_signature_declares_every_option_with_its_default() -> None:
    params = inspect.signature(AQCFNet).parameters
    defaults = {f.name: f.default for f in dataclasses.fields(AQCFNetOptions)}
    assert set(params) - {"device", "dtype"} == set(defaults)
    assert params["spatial_dims"].default is inspect.Parameter.empty  # required by the model, 2 in a run config
    for name, default in defaults.items():
        if name != "spatial_dims":
            assert params[name].default == default, name


def test_model_keeps_canonical_options() -> None:
    model = AQCFNet(2, features=[8, 16], bottleneck=32, heads=2, mode="ct", deep_supervision=True, device="meta")
    expected = AQCFNetOptions(spatial_dims=2, mode="ct", fusion_levels=(), deep_supervision=1, **TINY)
    assert model.options == expected
    assert model.options.validated() == model.options  # canonical form is a fixed point
    joint = AQCFNet(2, fusion_levels=[1, 0], **TINY, device="meta").options
    assert joint.fusion_levels == (0, 1) and joint.deep_supervision == 0


def test_from_options_rebuilds_the_same_network() -> None:
    torch.manual_seed(0)
    model = AQCFNet(2, **TINY, fusion_levels=(1,), act="gelu", dropout=0.1)
    torch.manual_seed(0)
    again = AQCFNet.from_options(model.options)
    assert again.options == model.options
    for (k, v), (k2, v2) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2), k


def test_run_config_model_section_is_the_architecture_options() -> None:
    cfg = RunConfig()
    assert type(cfg.model) is ArchitectureOptions
    model_section = {
        "features": [8, 16],
        "bottleneck": 32,
        "heads": 2,
        "fusion_levels": [1],
        "act": "gelu",
        "algorithm": "hamilton",
        "deep_supervision": 1,
        "kv_pool": None,
    }
    cfg = RunConfig.from_dict({"model": model_section, "train": {"mode": "joint"}})
    options = cfg.model_options()
    assert (options.features, options.fusion_levels, options.act) == ((8, 16), (1,), "gelu")
    model = build_model(cfg)
    assert isinstance(model, AQCFNet) and model.options == options.validated()
    assert list(model.fusion) == ["1"] and len(model.head) == 2
    # A saved config (JSON) reads back to the same options.
    assert RunConfig.from_dict(cfg.to_dict()).model_options() == options
    ct = RunConfig.from_dict({"model": {**model_section, "fusion_levels": "all"}, "train": {"mode": "ct"}})
    assert build_model(ct).options.mode == "ct"


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"model": {"spatial_dims": 4}}, "model.spatial_dims must be 2 or 3, got 4"),
        ({"model": {"heads": 0}}, "model.heads must be 'auto' or a positive int"),
        ({"model": {"features": [16, 18]}}, r"model.features\[1\] must be a positive multiple of 4"),
        (
            {"model": {"features": [8, 16], "heads": 4}},
            r"model.features\[0\] = 8 must be a multiple of 4 \* heads = 16",
        ),
        ({"model": {"algorithm": "fast4"}}, "model.algorithm must be one of"),
        ({"model": {"act": "swish"}}, "model.act must be one of"),
        ({"model": {"fusion_levels": [0]}, "train": {"mode": "ct"}}, "mode='ct' has one stream and no fusion"),
        ({"model": {"deep_supervision": "yes"}}, "model.deep_supervision must be true or false"),
        ({"model": {"mode": "ct"}}, "unknown key 'model.mode'"),
        ({"model": {"in_channels": 2}}, "unknown key 'model.in_channels'"),
    ],
)
def test_run_config_model_errors_name_the_key(data: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RunConfig.from_dict(data)


@pytest.mark.parametrize(
    ("width", "heads"),
    [(4, 1), (16, 1), (32, 2), (48, 3), (64, 4), (128, 8), (256, 16), (40, 2), (36, 1), (80, 5), (96, 6)],
)
def test_auto_heads_give_each_head_16_real_channels(width: int, heads: int) -> None:
    options = AQCFNetOptions(features=(width,), bottleneck=8, heads="auto").validated()
    assert options.heads_at(width) == heads
    assert (width // 4) % heads == 0  # each head owns whole quaternion channels
    assert AQCFNetOptions(features=(width,), bottleneck=8, heads=1).validated().heads_at(width) == 1


def test_the_model_builds_its_blocks_with_the_heads_of_their_level() -> None:
    model = AQCFNet(2, features=(32, 64, 128), bottleneck=128, device="meta")
    assert model.options.heads == "auto"
    assert [block.heads for block in model.fusion.values()] == [2, 4, 8]
    fixed = AQCFNet(2, features=(32, 64, 128), bottleneck=128, heads=2, device="meta")
    assert [block.heads for block in fixed.fusion.values()] == [2, 2, 2]
    with pytest.raises(ValueError, match="model.heads must be 'auto' or a positive int"):
        RunConfig.from_dict({"model": {"heads": "some"}})
    assert RunConfig.from_dict({"model": {"heads": "auto"}}).model.heads == "auto"
