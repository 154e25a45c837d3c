"""``QuaternionConvNormAct``: in eval mode the norm folded into the conv must compute exactly what
``nn.Sequential(conv, norm)`` computes (float64: forward and the gradients of the input, the conv's
weight and bias and the norm's affine parameters), the norm must really be skipped, and every case
that cannot fold must run the two modules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from aqcf_kernels import nn as qnn

CONVS = {1: qnn.QuaternionConv1d, 2: qnn.QuaternionConv2d, 3: qnn.QuaternionConv3d}
BATCH_NORMS = {1: qnn.QuaternionBatchNorm1d, 2: qnn.QuaternionBatchNorm2d, 3: qnn.QuaternionBatchNorm3d}
SPATIAL = {1: (11,), 2: (7, 9), 3: (5, 6, 7)}


def seeded(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def make_unit(dims=2, cin=8, cout=12, activation="leaky_relu", conv_bias=True, affine=True, norm_cls=None, **conv_kw):
    torch.manual_seed(dims + cin + cout)
    conv = CONVS[dims](cin, cout, 3, padding=1, bias=conv_bias, dtype=torch.float64, **conv_kw)
    norm_cls = norm_cls or BATCH_NORMS[dims]
    norm = norm_cls(cout, affine=affine, activation=activation, negative_slope=0.2, dtype=torch.float64)
    with torch.no_grad():  # trained-looking statistics and affine parameters, none of them trivial
        if norm.track_running_stats:
            norm.running_mean.copy_(seeded(cout, seed=1))
            norm.running_var.copy_(seeded(cout // 4, seed=2).abs() + 0.3)
        if affine:
            norm.weight.copy_(seeded(cout // 4, seed=3))
            norm.bias.copy_(seeded(cout, seed=4))
    return qnn.QuaternionConvNormAct(conv, norm)


def run(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
    module.zero_grad()
    x = x.detach().requires_grad_()
    y = module(x)
    y.backward(grad)
    return (y.detach(), x.grad, *[p.grad for p in module.parameters()])


def check_same_as_sequential(unit: qnn.QuaternionConvNormAct, x: torch.Tensor) -> None:
    grad = seeded(*unit(x).shape, seed=7)
    got = run(unit, x, grad)
    ref = run(nn.Sequential(*unit), x, grad)  # the same two modules, one after the other
    names = ["output", "d input", *[n for n, _ in unit.named_parameters()]]
    for name, g, r in zip(names, got, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "gelu", None])
def test_eval_fold_equals_conv_then_norm(dims, activation) -> None:
    unit = make_unit(dims, activation=activation).eval()
    assert unit.folds
    check_same_as_sequential(unit, seeded(3, 8, *SPATIAL[dims], seed=5))


@pytest.mark.parametrize(
    "options",
    [
        {"conv_bias": False},
        {"affine": False},
        {"stride": 2},
        {"groups": 2, "cout": 16},
        {"dilation": 2, "padding_mode": "reflect"},
    ],
    ids=["no-conv-bias", "no-affine", "stride-2", "groups-2", "dilated-reflect"],
)
def test_eval_fold_equals_conv_then_norm_for_every_geometry(options) -> None:
    unit = make_unit(2, **options).eval()  # 8 -> 12 (or 16) channels
    assert unit.folds
    x = seeded(2, 8, 9, 8, seed=6).contiguous(memory_format=torch.channels_last)  # the model's layout
    check_same_as_sequential(unit, x)


def test_eval_fold_skips_the_norm() -> None:
    unit = make_unit(2).eval()
    calls = []
    unit[1].register_forward_hook(lambda *args: calls.append(1))
    x = seeded(2, 8, 7, 9, seed=8)
    y = unit(x)
    assert not calls, "the folded unit ran the norm"
    torch.testing.assert_close(y, unit[1](unit[0](x)), rtol=1e-10, atol=1e-12)
    # an unbatched input is the norm's to accept or refuse, as in nn.Sequential(conv, norm)
    with pytest.raises(ValueError, match="expected 4D input"):
        unit(x[0])


def test_weights_are_never_changed_and_train_mode_runs_both_modules() -> None:
    unit = make_unit(2)
    before = {k: v.clone() for k, v in unit.state_dict().items()}
    unit.eval()(seeded(2, 8, 5, 5, seed=9))
    assert all(torch.equal(before[k], v) for k, v in unit.state_dict().items())
    unit.train()
    assert not unit.folds
    check_same_as_sequential(unit, seeded(2, 8, 5, 5, seed=10))  # batch statistics: no fold


@pytest.mark.parametrize("case", ["instance-norm", "whiten", "composite-norm", "rotation"])
def test_unfoldable_units_run_both_modules(case) -> None:
    if case == "instance-norm":  # input statistics in eval too
        unit = make_unit(2, norm_cls=qnn.QuaternionInstanceNorm2d)
    elif case == "whiten":
        torch.manual_seed(0)
        conv = qnn.QuaternionConv2d(8, 12, 3, padding=1, dtype=torch.float64)
        unit = qnn.QuaternionConvNormAct(conv, qnn.QuaternionBatchNorm2d(12, whiten=True, dtype=torch.float64))
    elif case == "composite-norm":
        unit = make_unit(2)
        unit[1].fused = False
    else:
        torch.manual_seed(0)
        conv = qnn.QuaternionConv2d(8, 12, 3, padding=1, rotation=True, dtype=torch.float64)
        unit = qnn.QuaternionConvNormAct(conv, qnn.QuaternionBatchNorm2d(12, dtype=torch.float64))
    unit.eval()
    assert not unit.folds
    calls = []
    unit[1].register_forward_hook(lambda *args: calls.append(1))
    check_same_as_sequential(unit, seeded(2, 8, 5, 6, seed=11))
    assert calls


def test_the_fold_is_exact_algebra() -> None:
    """W' and b' against the formula written out per real channel (not through the unit's code)."""
    unit = make_unit(2).eval()
    conv, norm = unit
    w, b = unit.folded_weight_and_bias()
    cq = norm.num_features // 4
    for real in range(norm.num_features):
        q = real % cq
        s = norm.weight[q] / torch.sqrt(norm.running_var[q] + norm.eps)
        torch.testing.assert_close(b[real], s * (conv.bias[real] - norm.running_mean[real]) + norm.bias[real])
        torch.testing.assert_close(w[:, q], s * conv.weight[:, q])


def test_constructor_errors() -> None:
    conv = qnn.QuaternionConv2d(8, 12, 3)
    with pytest.raises(TypeError, match="conv must be a quaternion conv"):
        qnn.QuaternionConvNormAct(nn.Conv2d(8, 12, 3), qnn.QuaternionBatchNorm2d(12))
    with pytest.raises(TypeError, match="norm must be a quaternion norm"):
        qnn.QuaternionConvNormAct(conv, nn.BatchNorm2d(12))
    with pytest.raises(ValueError, match="12 output channels but the norm num_features=16"):
        qnn.QuaternionConvNormAct(conv, qnn.QuaternionBatchNorm2d(16))


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("concatenates", [False, True], ids=["per-input", "concatenated"])
def test_several_inputs_are_their_qcat(mode, concatenates) -> None:
    """unit(a, b) == nn.Sequential(conv, norm)(qcat([a, b])): values and every gradient (a, b, the
    conv's weight and bias, the norm's parameters), without building the concatenation (per-input) or
    with it (what the benchmarks' baseline asks)."""
    from aqcf_kernels.layout import qcat

    unit = make_unit(2, cin=20, cout=12)  # 8 + 12 input channels: unequal slices of the weight
    unit.concatenates_inputs = concatenates
    unit.train(mode == "train")
    fmt = torch.channels_last
    a = seeded(3, 8, 7, 9, seed=20).contiguous(memory_format=fmt)
    b = seeded(3, 12, 7, 9, seed=21).contiguous(memory_format=fmt)
    grad = seeded(3, 12, 7, 9, seed=22)

    def run(fn):
        unit.zero_grad()
        x, y = a.detach().requires_grad_(), b.detach().requires_grad_()
        out = fn(x, y)
        out.backward(grad)
        return (out.detach(), x.grad, y.grad, *[p.grad for p in unit.parameters()])

    state = {k: v.clone() for k, v in unit.state_dict().items()}  # train mode moves the running stats
    got = run(unit)
    unit.load_state_dict(state)
    ref = run(lambda x, y: nn.Sequential(*unit)(qcat([x, y])))
    names = ["output", "d a", "d b", *[n for n, _ in unit.named_parameters()]]
    for name, g, r in zip(names, got, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12, msg=name)


def test_several_inputs_must_add_up_to_the_conv_input() -> None:
    unit = make_unit(2, cin=20, cout=12)
    with pytest.raises(ValueError, match=r"8 \+ 8 = 16 channels together, the conv takes in_channels=20"):
        unit(seeded(1, 8, 5, 5, seed=0), seeded(1, 8, 5, 5, seed=1))


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("inputs", [1, 2])
def test_the_conv_module_sees_every_conv_call(mode, inputs) -> None:
    """Folded (eval) or on one input at a time (two inputs), the conv runs through its module: its
    forward hooks fire once per conv computed (one per input when split)."""
    unit = make_unit(2, cin=20, cout=12)
    unit.train(mode == "train")
    calls: list[tuple[int, ...]] = []
    unit[0].register_forward_hook(lambda m, args, out: calls.append(tuple(out.shape)))
    xs = [seeded(3, 20, 7, 9, seed=30)] if inputs == 1 else [seeded(3, 8, 7, 9, seed=31), seeded(3, 12, 7, 9, seed=32)]
    unit(*xs)
    assert calls == [(3, 12, 7, 9)] * inputs


@pytest.mark.parametrize("slower", ["split", "concatenate"])
def test_inference_measures_split_against_concatenate(slower, tmp_path, monkeypatch) -> None:
    """With several inputs and no grad, the unit times convolving them one by one against convolving
    their qcat (after one untimed run of each) and keeps the faster, remembered in the tuning cache;
    every call returns the same values; with grad, or in 'heuristic' mode, it splits. A fake clock times
    the two ways (20 ms against 1 ms), so the machine's load cannot decide (a sleep did, once, under load)."""
    from aqcf_kernels import tuning
    from aqcf_kernels.layout import qcat
    from aqcf_kernels.nn import unit as unit_module

    monkeypatch.setenv("AQCF_TUNING_CACHE", str(tmp_path / "tuning.json"))
    monkeypatch.setattr(tuning, "mode", "measure")
    monkeypatch.setattr(unit_module, "_warmed", set())
    tuning.clear()
    unit = make_unit(2, cin=20, cout=12).eval()
    a, b = seeded(2, 8, 6, 7, seed=30), seeded(2, 12, 6, 7, seed=31)
    ran: list[str] = []
    folded = unit_module.QuaternionConvNormAct._folded
    clock = [0.0]

    def now() -> float:  # a microsecond a reading: the convs' own measurements inside see ties, never 0
        clock[0] += 1e-6
        return clock[0]

    monkeypatch.setattr(tuning, "_timer", lambda device: now)

    def timed(self, inputs, weight, bias, split):
        ran.append("split" if split else "concatenate")
        clock[0] += 0.02 if ran[-1] == slower else 0.001
        return folded(self, inputs, weight, bias, split)

    monkeypatch.setattr(unit_module.QuaternionConvNormAct, "_folded", timed)
    want = nn.Sequential(*unit)(qcat([a, b]))
    try:
        with torch.no_grad():
            outs = [unit(a, b) for _ in range(2 + tuning.max_provisional_calls(2))]
            key = unit_module._split_signature(unit[0], (a, b))
            faster = "concatenate" if slower == "split" else "split"
            assert tuning.lookup(key) == tuning.Candidate("unit", faster)
            assert ran[:2] == ["concatenate", "split"]  # the first call: both ways once, untimed
            ran.clear()
            unit(a, b)
            assert ran == [faster]
        for out in outs:
            torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)
        ran.clear()
        unit(a, b)  # grad enabled: split, not measured
        with torch.no_grad(), tuning.using("heuristic"):
            tuning.clear()
            unit(a, b)
        assert ran == ["split", "split"]
    finally:
        tuning.clear()
