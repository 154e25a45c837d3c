"""The init schemes (``init`` quaternion, unitary, random) x ``init_criterion``, and how layers take them."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from aqcf_kernels.nn import (
    QuaternionConv2d,
    QuaternionConvTranspose1d,
    QuaternionLiGRU,
    QuaternionLinear,
    QuaternionLSTM,
    init_quaternion_,
    quaternion_init_,
    random_init_,
    unitary_init_,
)
from aqcf_kernels.nn.init import INITS

F64 = torch.float64


def _sigma(criterion: str, fan_in: int, fan_out: int) -> float:
    return 1 / math.sqrt(2 * (fan_in + fan_out)) if criterion == "glorot" else 1 / math.sqrt(2 * fan_in)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# (4, A, B, *k) weight, fan_in = B * prod(k), fan_out = A * prod(k): > 6e4 quaternions each.
SHAPE, FAN_IN, FAN_OUT = (4, 128, 96, 3, 2), 96 * 6, 128 * 6


def test_unitary_has_unit_modulus_whatever_the_criterion():
    for criterion in ("glorot", "he"):
        w = unitary_init_(torch.empty(SHAPE, dtype=F64), criterion, _gen(0))
        assert_close(w.norm(dim=0), torch.ones(SHAPE[1:], dtype=F64))
        # Every component symmetric about 0 and, with the normalised cube, equally spread.
        assert w.mean(dim=(1, 2, 3, 4)).abs().max().item() < 0.01
        assert_close(w.square().mean(dim=(1, 2, 3, 4)), torch.full((4,), 0.25, dtype=F64), rtol=0.02, atol=0)


@pytest.mark.parametrize("criterion", ["glorot", "he"])
def test_random_has_the_criterions_variance(criterion):
    sigma = _sigma(criterion, FAN_IN, FAN_OUT)
    w = random_init_(torch.empty(SHAPE, dtype=F64), criterion, _gen(1))
    assert w.abs().max().item() <= math.sqrt(3) * sigma  # U[-√3σ, √3σ] per component
    assert w.abs().max().item() > 0.99 * math.sqrt(3) * sigma
    # E|w|² = 4σ², like the quaternion init; components independent and each of variance σ².
    assert w.square().sum(0).mean().item() == pytest.approx(4 * sigma**2, rel=0.02)
    assert_close(w.square().mean(dim=(1, 2, 3, 4)) / sigma**2, torch.ones(4, dtype=F64), rtol=0.03, atol=0)
    corr = torch.corrcoef(w.flatten(1))
    assert (corr - torch.eye(4, dtype=F64)).abs().max().item() < 0.02


@pytest.mark.parametrize("criterion", ["glorot", "he"])
def test_quaternion_init_unchanged_through_the_dispatcher(criterion):
    a = init_quaternion_(torch.empty(SHAPE), "quaternion", criterion, _gen(2))
    b = quaternion_init_(torch.empty(SHAPE), criterion, _gen(2))
    assert torch.equal(a, b)
    sigma = _sigma(criterion, FAN_IN, FAN_OUT)
    assert a.double().square().sum(0).mean().item() == pytest.approx(4 * sigma**2, rel=0.03)


@pytest.mark.parametrize("init", INITS)
def test_seeded_and_reproducible(init):
    w = torch.empty(4, 3, 5, dtype=F64)
    a = init_quaternion_(w.clone(), init, "he", _gen(7))
    assert torch.equal(a, init_quaternion_(w.clone(), init, "he", _gen(7)))
    assert not torch.equal(a, init_quaternion_(w.clone(), init, "he", _gen(8)))
    with torch.random.fork_rng():  # without a generator, torch.manual_seed governs
        torch.manual_seed(3)
        b = init_quaternion_(w.clone(), init)
        torch.manual_seed(3)
        assert torch.equal(b, init_quaternion_(w.clone(), init))
    assert init_quaternion_(torch.empty(4, 0, 3), init).shape == (4, 0, 3)  # nothing to draw
    half = init_quaternion_(torch.empty(4, 3, 5, dtype=torch.bfloat16), init, "glorot", _gen(7))
    assert half.dtype == torch.bfloat16 and half.abs().sum() > 0


@pytest.mark.parametrize(
    "make",
    [
        lambda init: QuaternionLinear(64, 32, init=init),
        lambda init: QuaternionConv2d(16, 32, 3, init=init),
        lambda init: QuaternionConvTranspose1d(16, 8, 3, init=init),
        lambda init: QuaternionLSTM(16, 32, init=init),
        lambda init: QuaternionLiGRU(16, 32, init=init),
    ],
)
def test_layers_take_init(make):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        default = make("quaternion")
        torch.manual_seed(0)
        assert all(
            torch.equal(a, b) for a, b in zip(default.parameters(), make("quaternion").parameters(), strict=True)
        )
        unitary = make("unitary")
    weights = [p for n, p in unitary.named_parameters() if n.startswith("weight") and p.dim() >= 3]
    assert weights and all(torch.allclose(w.norm(dim=0), torch.ones(())) for w in weights)
    assert "init='unitary'" in repr(unitary)
    assert "init=" not in repr(default)


def test_layer_default_is_quaternion_glorot():
    layer = QuaternionLinear(8, 8)
    assert (layer.init, layer.init_criterion) == ("quaternion", "glorot")
    torch.manual_seed(5)
    a = QuaternionLinear(16, 8)
    torch.manual_seed(5)
    b = QuaternionLinear(16, 8, init="quaternion", init_criterion="glorot")
    assert torch.equal(a.weight, b.weight)


@pytest.mark.parametrize(
    "make, argument",
    [
        (lambda: QuaternionLinear(8, 8, init="xavier"), "init must be one of"),
        (lambda: QuaternionConv2d(8, 8, 3, init="orthogonal"), "init must be one of"),
        (lambda: QuaternionConv2d(8, 8, 3, init="unitary", init_criterion="lecun"), "init_criterion"),
        (lambda: init_quaternion_(torch.empty(4, 2, 2), "zeros"), "init must be one of"),
        (lambda: init_quaternion_(torch.empty(4, 2, 2), "random", "lecun"), "init_criterion"),
        (lambda: unitary_init_(torch.empty(3, 2, 2)), "shape"),
    ],
)
def test_bad_init_names_the_argument(make, argument):
    with pytest.raises(ValueError, match=argument):
        make()
