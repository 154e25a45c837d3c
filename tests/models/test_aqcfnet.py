"""AQCFNet: shapes (odd sizes, 2D/3D), modalities and batches, parameter counts against the real twin,
gradients, train/eval, torch.compile, a few optimisation steps, state dicts, the expanded-weight build,
and constructor errors. Every model here is tiny (features (8, 16), bottleneck 32, 2 heads)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close
from torch.utils._pytree import tree_leaves

from aqcf_kernels import nn as qnn
from aqcf_kernels import tuning
from aqcf_kernels.models import AQCFNet, RealAQCFBlock
from benchmarks.baselines import ExpandedQuaternionConv2d, ExpandedQuaternionConvTranspose2d, use_expanded_convs

TINY = {"features": (8, 16), "bottleneck": 32, "heads": 2}
SIZES = {2: (19, 23), 3: (11, 13, 9)}
OTHER_SIZES = {2: (17, 20), 3: (9, 12, 10)}


pytestmark = pytest.mark.usefixtures("single_threaded")


def image(batch: int, size: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1, *size, generator=g, dtype=torch.float64).to(dtype)


def tiny(spatial_dims: int = 2, seed: int = 0, **kwargs) -> AQCFNet:
    torch.manual_seed(seed)
    return AQCFNet(spatial_dims, **{**TINY, **kwargs})


def set_alphas(model: nn.Module, value: float = 0.5) -> None:
    """A-QCF blocks start as the identity (alpha = 0); a nonzero alpha makes the fusion path count."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, qnn.AQCFBlock):
                m.alpha_a.fill_(value)
                m.alpha_b.fill_(-value)


def outputs_flat(out: dict) -> torch.Tensor:
    parts = []
    for name in sorted(out):
        v = out[name]
        parts += [t.flatten() for t in (v if isinstance(v, list) else [v])]
    return torch.cat(parts)


# ---------------------------------------------------------------------------------------------
# Shapes, modalities, batches
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("down", ["conv", "pool"])
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_shapes_odd_sizes(spatial_dims: int, down: str) -> None:
    norm = "instance" if down == "pool" else "batch"  # cover both norms without doubling the grid
    model = tiny(spatial_dims, down=down, norm=norm, kv_pool=16)  # kv_pool < tokens: pooled keys too
    ct, mri = image(2, SIZES[spatial_dims], 1), image(2, OTHER_SIZES[spatial_dims], 2)
    out = model(ct=ct, mri=mri)
    assert set(out) == {"ct", "mri"}
    assert out["ct"].shape == (2, 3, *SIZES[spatial_dims])
    assert out["mri"].shape == (2, 3, *OTHER_SIZES[spatial_dims])
    assert torch.isfinite(outputs_flat(out)).all()


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_deep_supervision(spatial_dims: int) -> None:
    model = tiny(spatial_dims, features=(8, 16, 16), deep_supervision=True)
    size = SIZES[spatial_dims]
    out = model(ct=image(2, size, 1))
    assert isinstance(out["ct"], list) and len(out["ct"]) == 3
    for k, t in enumerate(out["ct"]):
        assert t.shape == (2, 3, *(-(-s // 2**k) for s in size))
    model.eval()
    assert model(ct=image(2, size, 1))["ct"].shape == (2, 3, *size)
    assert len(tiny(spatial_dims, features=(8, 16, 16), deep_supervision=1).head) == 2


def test_one_modality_skips_fusion() -> None:
    model = tiny().eval()
    ct, mri = image(2, SIZES[2], 1), image(2, SIZES[2], 2)
    alone = model(ct=ct)
    assert set(alone) == {"ct"} and set(model(mri=mri)) == {"mri"}
    # A fresh block is the identity (alpha = 0): fused and unfused outputs agree ...
    torch.testing.assert_close(model(ct=ct, mri=mri)["ct"], alone["ct"])
    # ... and once alpha != 0 the MRI stream changes the CT logits, but not the CT-only forward.
    set_alphas(model)
    assert not torch.allclose(model(ct=ct, mri=mri)["ct"], alone["ct"])
    torch.testing.assert_close(model(ct=ct)["ct"], alone["ct"])


@pytest.mark.parametrize("modality", ["ct", "mri"])
def test_single_stream_is_the_one_modality_forward_with_only_its_weights(modality: str) -> None:
    model = tiny().eval()
    set_alphas(model)
    x = image(2, SIZES[2], 3)
    stream = model.single_stream(modality)
    with torch.no_grad():
        # (auto may compute the two calls with different algorithms: fp32 rounding apart)
        torch.testing.assert_close(
            stream(**{modality: x})[modality], model(**{modality: x})[modality], rtol=1e-5, atol=1e-6
        )
    names = {n for n, _ in stream.named_parameters()}
    other = "mri" if modality == "ct" else "ct"
    assert names and not {n for n in names if f".{other}." in n or n.startswith("fusion.")}
    assert {n for n, _ in model.named_parameters() if f".{other}." not in n and not n.startswith("fusion.")} == names
    # shared, not copied; the model itself keeps both streams
    assert stream.stem[modality][0].weight is model.stem[modality][0].weight
    assert set(model.stem) == {"ct", "mri"} and len(model.fusion) > 0
    with pytest.raises(ValueError, match=f"no {other} stream"):
        stream(**{other: x})
    with pytest.raises(ValueError, match="no 'pet' stream"):
        model.single_stream("pet")


def test_fusion_levels() -> None:
    assert list(tiny(fusion_levels=(1,)).fusion) == ["1"]
    assert len(tiny(fusion_levels="none").fusion) == 0
    assert list(tiny().fusion) == ["0", "1"]
    model = tiny(fusion_levels="none").eval()
    ct, mri = image(2, SIZES[2], 1), image(2, SIZES[2], 2)
    torch.testing.assert_close(model(ct=ct, mri=mri)["ct"], model(ct=ct)["ct"])


def test_batch_broadcast_and_mismatch() -> None:
    model = tiny().eval()
    set_alphas(model)
    ct, mri = image(3, SIZES[2], 1), image(1, SIZES[2], 2)
    out = model(ct=ct, mri=mri)
    # One shared MRI: every CT sample is fused with it, and the MRI logits come once per pairing.
    assert out["ct"].shape == (3, 3, *SIZES[2]) and out["mri"].shape == (3, 3, *SIZES[2])
    paired = model(ct=ct[1:2], mri=mri)
    torch.testing.assert_close(out["ct"][1:2], paired["ct"])
    torch.testing.assert_close(out["mri"][1:2], paired["mri"])
    with pytest.raises(ValueError, match="batch sizes ct=2 and mri=3"):
        model(ct=image(2, SIZES[2], 1), mri=image(3, SIZES[2], 2))
    with pytest.raises(ValueError, match="batch sizes ct=1 and mri=3"):
        model(ct=image(1, SIZES[2], 1), mri=image(3, SIZES[2], 2))


@pytest.mark.parametrize("mode", ["ct", "mri"])
def test_unimodal_modes(mode: str) -> None:
    model = tiny(mode=mode)
    other = "mri" if mode == "ct" else "ct"
    assert list(model.encoder) == [mode] and list(model.stem) == [mode] and len(model.fusion) == 0
    assert not any(k.startswith((f"encoder.{other}", f"stem.{other}")) for k in model.state_dict())
    assert model(**{mode: image(2, SIZES[2], 1)})[mode].shape == (2, 3, *SIZES[2])
    with pytest.raises(ValueError, match=f"mode='{mode}' and has no {other} stream"):
        model(**{other: image(2, SIZES[2], 1)})
    with pytest.raises(ValueError, match=f"no {other} stream"):
        model(ct=image(2, SIZES[2], 1), mri=image(2, SIZES[2], 2))
    # The unimodal body is the joint model's stream: its weights load into a joint model.
    joint = tiny(fusion_levels="none")
    missing, unexpected = joint.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all(k.startswith((f"encoder.{other}", f"stem.{other}")) for k in missing)


def test_forward_input_errors() -> None:
    model = tiny()
    with pytest.raises(ValueError, match="at least one of ct=, mri="):
        model()
    with pytest.raises(ValueError, match="ct must be"):
        model(ct=torch.randn(2, 1, 8, 8, 8))
    with pytest.raises(ValueError, match="in_channels=1"):
        model(ct=torch.randn(2, 2, 8, 8))
    # the dtype and device named for the input, before the stem conv's own error
    with pytest.raises(TypeError, match=r"mri has dtype torch.float64, the model torch.float32: .* \.to\(torch"):
        model(ct=torch.randn(2, 1, 8, 8), mri=torch.randn(2, 1, 8, 8, dtype=torch.float64))
    # an integer image: only the advice that works (no model moves to an integer dtype; autocast takes none)
    with pytest.raises(TypeError, match=r"ct has dtype torch.int16, the model torch.float32: pass a normalised") as e:
        model(ct=torch.zeros(1, 1, 8, 8, dtype=torch.int16))
    assert ".to(" not in str(e.value) and "autocast" not in str(e.value)
    with pytest.raises(ValueError, match=r"ct is on meta, the model on cpu"):
        model(ct=torch.empty(1, 1, 8, 8, device="meta"))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts a half image as it casts the weights
        out = model(ct=torch.randn(1, 1, 8, 8, dtype=torch.bfloat16))
    assert out["ct"].shape[-2:] == (8, 8)


# ---------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_parameter_count_quarter_of_real_twin(spatial_dims: int) -> None:
    # A quaternion conv C -> C holds 4 * (C/4)^2 = C^2/4 weights per tap, its real twin C^2: every conv,
    # transposed conv and A-QCF projection is 1/4. What keeps the ratio a little above 0.25: the real
    # stem and output heads (the same in both), and the norms (quaternion BN: 1.25 parameters per real
    # channel against 2). On the default widths that is ~0.26.
    model = AQCFNet(spatial_dims, device="meta")
    real = AQCFNet(spatial_dims, real_valued=True, device="meta")
    n_q = sum(p.numel() for p in model.parameters())
    n_r = sum(p.numel() for p in real.parameters())
    assert 0.2 <= n_q / n_r <= 0.35
    counts = model.count_parameters()
    assert counts["total"] == n_q and counts["real_twin"]["total"] == n_r
    assert counts["ratio"] == pytest.approx(n_q / n_r)
    assert sum(counts["parts"].values()) == n_q and all(v > 0 for v in counts["parts"].values())
    back = real.count_parameters()
    assert back["quaternion_twin"]["total"] == n_q and back["ratio"] == pytest.approx(n_q / n_r)
    # The twin is real throughout, fusion included.
    assert not any(type(m).__module__.startswith("aqcf_kernels.nn") for m in real.modules())
    assert all(isinstance(b, RealAQCFBlock) for b in real.fusion.values())


def test_real_twin_forward() -> None:
    model = tiny(real_valued=True)
    set_alphas(model)
    out = model(ct=image(2, SIZES[2], 1), mri=image(2, SIZES[2], 2))
    assert out["ct"].shape == (2, 3, *SIZES[2]) and out["mri"].shape == (2, 3, *SIZES[2])


def test_gradients_reach_every_parameter() -> None:
    # alpha = 0 at init would zero the gradients of every A-QCF projection and gate: set it nonzero.
    # Deep supervision on, so the auxiliary heads are in the graph too; kv_pool exercises the pooling.
    model = tiny(deep_supervision=True, kv_pool=16)
    set_alphas(model)
    out = model(ct=image(2, SIZES[2], 1), mri=image(2, SIZES[2], 2))
    g = torch.Generator().manual_seed(3)
    loss = sum((t * torch.randn(t.shape, generator=g)).sum() for v in out.values() for t in v)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_eval_mode_gradients_equal_the_unfolded_network(spatial_dims: int) -> None:
    """In eval mode the conv + norm units run folded (one conv, the activation as its epilogue or oneDNN's
    post-op). Gradients taken there (saliency maps, Grad-CAM, fine-tuning with frozen statistics) must be
    the network's: the input's and every parameter's equal those of the same weights with the composite
    norms, which never fold, in float64. (The folded stem once ran oneDNN's post-op conv under autograd: no
    gradient reached the input at all, and the stem's weights got none.) Norm-wise, per tensor: an entry of a
    float32 gradient can be a sum that nearly cancels (a norm weight's, through the fold, was 1.8e-3 off in one
    entry where its tensor was 1e-5 off), and whether the folded or the unfolded float32 run lands nearer depends
    on the conv algorithm ``auto`` picked."""
    from benchmarks.baselines import use_composite_norms

    size = SIZES[spatial_dims]
    folded = tiny(spatial_dims, deep_supervision=True)
    set_alphas(folded)
    folded(ct=image(2, size, 1), mri=image(2, size, 2))  # running statistics of a batch, then eval
    unfolded = use_composite_norms(copy.deepcopy(folded))
    reference = copy.deepcopy(unfolded).double()
    images = image(2, size, 3), image(2, size, 4)
    grads = []
    for model, dtype in ((folded, torch.float32), (unfolded, torch.float32), (reference, torch.float64)):
        ct, mri = (t.to(dtype).requires_grad_() for t in images)
        out = model.eval()(ct=ct, mri=mri)
        g = torch.Generator().manual_seed(5)
        loss = sum((t * torch.randn(t.shape, generator=g).to(dtype)).sum() for v in out.values() for t in v)
        params = [p for _, p in model.named_parameters()]
        # (allow_unused: eval mode returns no deep-supervision logits, so their heads are not in the graph)
        grads.append(torch.autograd.grad(loss, [ct, mri, *params], allow_unused=True))
    names = ["ct", "mri", *(n for n, _ in folded.named_parameters())]
    assert grads[0][0] is not None and grads[0][1] is not None
    assert sum(g is not None for g in grads[0]) > len(names) // 2
    for name, got, unfolded_got, want in zip(names, *grads, strict=True):
        assert (got is None) == (unfolded_got is None) == (want is None), name
        if want is None:
            continue
        for what, g in (("folded", got), ("unfolded", unfolded_got)):
            error = ((g.double() - want).norm() / want.norm()).item()
            assert error < 1e-4, f"{name}: {what} float32 gradient {error:.1e} off the float64 one"


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_gradient_penalty_is_the_derivative_of_the_penalty(spatial_dims: int, train: bool) -> None:
    """A gradient penalty P(θ) = ‖∂L/∂ct‖² (WGAN-GP, R1: create_graph=True through every op — convs, fused
    norms, the A-QCF attention and gate, the folded eval units) backpropagates to the parameters: its
    gradient along a random direction d is (P(θ + εd) − P(θ − εd)) / 2ε, float64. GELU, because a
    piecewise-linear activation's kinks make that difference quotient jump wherever a unit crosses zero."""
    size = SIZES[spatial_dims]
    model = tiny(spatial_dims, kv_pool=16, act="gelu").double()
    set_alphas(model)
    model(ct=image(2, size, 9, torch.float64), mri=image(2, size, 8, torch.float64))  # running statistics
    model.train(train)
    ct, mri = image(2, size, 1, torch.float64), image(2, size, 2, torch.float64)
    params = list(model.parameters())
    g = torch.Generator().manual_seed(7)
    direction = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]

    def penalty() -> torch.Tensor:
        x = ct.clone().requires_grad_()
        out = model(ct=x, mri=mri)
        (grad,) = torch.autograd.grad(out["ct"].square().sum() + out["mri"].square().sum(), x, create_graph=True)
        return grad.square().sum()

    analytic = sum((a * d).sum() for a, d in zip(torch.autograd.grad(penalty(), params), direction, strict=True))
    eps, shifted = 1e-6, []
    with torch.no_grad():
        for sign in (1, -1):
            for p, d in zip(params, direction, strict=True):
                p.add_(sign * eps * d)
            with torch.enable_grad():
                shifted.append(penalty().item())
            for p, d in zip(params, direction, strict=True):
                p.sub_(sign * eps * d)
    numeric = (shifted[0] - shifted[1]) / (2 * eps)
    assert abs(analytic.item() - numeric) <= 1e-6 * abs(numeric), (analytic.item(), numeric)


# ---------------------------------------------------------------------------------------------
# Modes of operation
# ---------------------------------------------------------------------------------------------


def test_train_eval_switch() -> None:
    model = tiny(dropout=0.3)
    ct, mri = image(4, SIZES[2], 1), image(4, SIZES[2], 2)
    bn = model.encoder["ct"].levels[0][0][1]
    assert isinstance(bn, qnn.QuaternionBatchNorm2d)
    model(ct=ct, mri=mri)
    assert bn.num_batches_tracked.item() == 1 and bn.running_mean.abs().sum() > 0
    # Training: dropout and batch statistics, so two calls differ.
    assert not torch.equal(model(ct=ct)["ct"], model(ct=ct)["ct"])
    model.eval()
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    # Bitwise: both calls must run the same algorithms. Under measuring, a signature whose choice is still
    # provisional computes its next calls with each candidate in turn (different rounding: 3e-8 apart, in CI).
    with tuning.using("heuristic"):
        a, b = model(ct=ct, mri=mri), model(ct=ct, mri=mri)
    torch.testing.assert_close(a["ct"], b["ct"], rtol=0, atol=0)
    # Running statistics: a sample's logits don't depend on the rest of its batch, nor do buffers move.
    torch.testing.assert_close(model(ct=ct[:1], mri=mri[:1])["ct"], a["ct"][:1])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in stats.items())
    model.train()
    assert model.training and all(m.training for m in model.modules())


def test_torch_compile_matches_eager() -> None:
    # An A-QCF-block limitation under torch.compile, not the model's (reported upstream): with one
    # quaternion channel per head (d = 1) the fake kernel of aqcf.cross_attention gives the wrong
    # strides. Hence d >= 2. (kv pooling failed to lower in Inductor while its size loop broke the graph.)
    # One level (encoders, an A-QCF fusion, the bottleneck, a decoder stage): every kind of op Inductor lowers
    # here; a second level only doubled the C++ kernels it compiles (52 s instead of 35 s, 2026-12-07).
    model = tiny(features=(16,), kv_pool=8)
    set_alphas(model)
    eager = copy.deepcopy(model)
    ct, mri = image(2, SIZES[2], 1), image(2, SIZES[2], 2)
    compiled = torch.compile(model)
    out, ref = compiled(ct=ct, mri=mri), eager(ct=ct, mri=mri)  # training mode: batch stats, buffer updates
    for k in ref:
        torch.testing.assert_close(out[k], ref[k], rtol=1e-4, atol=1e-5)
    bn, bn_ref = model.bottleneck[0][1], eager.bottleneck[0][1]
    torch.testing.assert_close(bn.running_var, bn_ref.running_var, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.usefixtures("fresh_dynamo")
def test_torch_compile_fullgraph(train: bool) -> None:
    """The whole network is one graph (``fullgraph=True``: no break) in training (forward and backward) and in
    eval (folded units, the unit's split rule, no oneDNN stem), with kv pooling and deep supervision, and
    gives eager mode's outputs and gradients. Before, an eval forward broke the graph 32 times (kv pooling's
    size loop over a generator, the oneDNN stem's availability check, the unit's measured split) and ran
    compiled slower than eager. aot_eager: the graphs and their fake-tensor shapes, without Inductor's
    compile time (tested for the convs elsewhere)."""
    model = tiny(kv_pool=8, deep_supervision=True)
    set_alphas(model)
    model.train(train)
    eager = copy.deepcopy(model)
    ct, mri = image(2, SIZES[2], 1), image(2, OTHER_SIZES[2], 2)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=False)  # (not this process's history)
    with torch.set_grad_enabled(train):
        out, ref = compiled(ct=ct, mri=mri), eager(ct=ct, mri=mri)
    assert_close(out, ref, rtol=1e-4, atol=1e-5)
    if train:
        loss = sum(t.square().mean() for t in tree_leaves(out))
        loss_ref = sum(t.square().mean() for t in tree_leaves(ref))
        got = torch.autograd.grad(loss, list(model.parameters()))
        want = torch.autograd.grad(loss_ref, list(eager.parameters()))
        for (name, _), g, w in zip(model.named_parameters(), got, want, strict=True):
            assert_close(g, w, rtol=1e-3, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.usefixtures("fresh_dynamo")
def test_torch_compile_dynamic_shapes_training() -> None:
    """``dynamic=True`` training on a size that needs padding to a multiple of ``2**levels`` and one that does
    not: the same gradients as eager. The padding was ``-s % m``, whose symbolic modulo torch 2.13 could not
    lower in a backward graph ("TensorReferenceAnalysis has no attribute python_mod"); it is a floor
    division now. (Each size class, padded or not, is a graph of its own: a guard on the remainder.)"""
    model = tiny(features=(8,), bottleneck=16)
    set_alphas(model)
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, dynamic=True, fullgraph=True, backend="aot_eager")
    for size in ((12, 16), (13, 17)):
        ct, mri = image(2, size, 1), image(2, size, 2)
        loss = sum(t.square().mean() for t in compiled(ct=ct, mri=mri).values())
        loss_ref = sum(t.square().mean() for t in eager(ct=ct, mri=mri).values())
        got = torch.autograd.grad(loss, list(model.parameters()))
        want = torch.autograd.grad(loss_ref, list(eager.parameters()))
        for (name, _), g, w in zip(model.named_parameters(), got, want, strict=True):
            assert_close(g, w, rtol=1e-3, atol=1e-5, msg=lambda m, name=name, size=size: f"{size} {name}: {m}")


def test_optimisation_lowers_loss() -> None:
    torch.manual_seed(0)
    model = tiny(norm="instance")
    ct, mri = image(2, (16, 16), 1), image(2, (16, 16), 2)
    # Labels any per-pixel net can learn: background / "liver" / "tumour" by intensity.
    target = {k: (x[:, 0] > 0.0).long() + (x[:, 0] > 1.0).long() for k, x in (("ct", ct), ("mri", mri))}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        out = model(ct=ct, mri=mri)
        loss = sum(F.cross_entropy(out[k], target[k]) for k in out)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_state_dict_round_trip() -> None:
    model = tiny(deep_supervision=True)
    set_alphas(model, 0.3)
    model(ct=image(2, SIZES[2], 1), mri=image(2, SIZES[2], 2))  # move the running stats off their init
    model.eval()
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh = tiny(seed=1, deep_supervision=True).eval()
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    ct, mri = image(2, SIZES[2], 3), image(2, SIZES[2], 4)
    # Bitwise: so both models must run the same algorithms. Under measuring, a signature whose choice
    # is still provisional computes its next calls with each candidate in turn (different rounding).
    with tuning.using("heuristic"):
        a, b = model(ct=ct, mri=mri), fresh(ct=ct, mri=mri)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs", [{"spatial_dims": 2}, {"spatial_dims": 3}, {"spatial_dims": 2, "real_valued": True}], ids=str
)
def test_the_whole_model_pickles(kwargs: dict) -> None:
    """``torch.save(model)`` / pickle of a whole network (multiprocessing, checkpoints of the module): every class
    in it, the stem's real convs included, is found by its module and name."""
    model = tiny(**kwargs).eval()
    size = SIZES[kwargs["spatial_dims"]]
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert {type(m) for m in loaded.modules()} == {type(m) for m in model.modules()}
    ct, mri = image(1, size, 3), image(1, size, 4)
    with tuning.using("heuristic"):
        a, b = model(ct=ct, mri=mri), loaded(ct=ct, mri=mri)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


@pytest.mark.parametrize("algorithm", ["hamilton", "fast8"])
def test_expanded_build_matches_fused(algorithm: str) -> None:
    kw = {"dtype": torch.float64, "algorithm": algorithm, "deep_supervision": True, "kv_pool": 16}
    fused = tiny(**kw)
    expanded = use_expanded_convs(tiny(**kw))
    # The same construction, so the same init; every quaternion conv swapped, nothing else.
    for (k, v), (k2, v2) in zip(fused.state_dict().items(), expanded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2), k
    assert isinstance(expanded.encoder["ct"].levels[0][0][0], ExpandedQuaternionConv2d)
    assert isinstance(expanded.decoder.ups[0], ExpandedQuaternionConvTranspose2d)
    set_alphas(fused)
    set_alphas(expanded)
    ct, mri = image(2, SIZES[2], 1, torch.float64), image(2, SIZES[2], 2, torch.float64)
    a, b = outputs_flat(fused(ct=ct, mri=mri)), outputs_flat(expanded(ct=ct, mri=mri))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    a.sum().backward()
    b.sum().backward()
    for (name, p), p2 in zip(fused.named_parameters(), expanded.parameters(), strict=True):
        torch.testing.assert_close(p.grad, p2.grad, rtol=1e-9, atol=1e-10, msg=name)


def test_expanded_build_needs_quaternion_convs() -> None:
    with pytest.raises(ValueError, match="AQCFNet has no quaternion convs"):
        use_expanded_convs(tiny(real_valued=True))


# ---------------------------------------------------------------------------------------------
# Constructor and repr
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"spatial_dims": 1}, "spatial_dims must be 2 or 3"),
        ({"spatial_dims": 4}, "spatial_dims must be 2 or 3"),
        ({"features": (8, 18)}, r"features\[1\] must be a positive multiple of 4"),
        ({"features": ()}, "features must be a non-empty sequence"),
        ({"features": (8, 12)}, r"features\[1\] = 12 must be a multiple of 4 \* heads = 8"),
        ({"bottleneck": 30}, "bottleneck must be a positive multiple of 4"),
        ({"heads": 0}, "heads must be 'auto' or a positive int"),
        ({"heads": "many"}, "heads must be 'auto' or a positive int"),
        ({"in_channels": 0}, "in_channels must be a positive int"),
        ({"out_channels": 1.5}, "out_channels must be a positive int"),
        ({"fusion_levels": (0, 2)}, r"fusion_levels must hold distinct level indices in 0..1"),
        ({"fusion_levels": "some"}, "fusion_levels must be 'all', 'none'"),
        ({"mode": "pet"}, "mode must be one of"),
        ({"mode": "ct", "fusion_levels": (0,)}, "mode='ct' has one stream and no fusion"),
        ({"norm": "group"}, "norm must be one of"),
        ({"act": "swish"}, "act must be one of"),
        ({"down": "stride"}, "down must be one of"),
        ({"gate": "head"}, "gate must be one of"),
        ({"kv_pool": 0}, "kv_pool must be None or a positive int"),
        ({"dropout": 1.0}, "dropout must be a probability"),
        ({"algorithm": "fast4"}, "algorithm must be one of"),
        ({"memory_format": "nhwc"}, "memory_format must be one of"),
        ({"real_valued": 1}, "real_valued must be a bool"),
        ({"deep_supervision": 2}, r"deep_supervision must be a bool or an int in 0..1"),
    ],
)
def test_constructor_errors(kwargs: dict, match: str) -> None:
    args = {"spatial_dims": 2, **TINY, **kwargs}
    with pytest.raises(ValueError, match=match):
        AQCFNet(device="meta", **args)


def test_features_only_need_heads_multiple_where_fused() -> None:
    AQCFNet(2, features=(12, 16), bottleneck=32, heads=2, fusion_levels=(1,), device="meta")
    AQCFNet(2, features=(12, 16), bottleneck=32, heads=2, mode="ct", device="meta")


def test_repr_names_the_settings() -> None:
    text = repr(tiny(deep_supervision=True, kv_pool=64))
    for setting in (
        "spatial_dims=2",
        "features=(8, 16)",
        "bottleneck=32",
        "mode='joint'",
        "fusion_levels=(0, 1)",
        "heads=2",
        "kv_pool=64",
        "norm='batch'",
        "down='conv'",
        "deep_supervision=1",
        "algorithm='auto'",
        "pad_to_multiple_of=4",
    ):
        assert setting in text, setting
    assert "real_valued=True" in repr(tiny(real_valued=True))


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_memory_format_changes_layout_not_results(spatial_dims: int) -> None:
    """``memory_format='channels_last'`` (what ``'auto'`` picks on CPU) runs every feature map
    channels_last and returns channels-first logits; values and every gradient equal the contiguous
    network's (float64, both streams fused, deep supervision on)."""
    kw = {"dtype": torch.float64, "deep_supervision": True, "kv_pool": 16}
    cl = torch.channels_last if spatial_dims == 2 else torch.channels_last_3d
    size = SIZES[spatial_dims]
    ct, mri = image(2, size, seed=1, dtype=torch.float64), image(2, size, seed=2, dtype=torch.float64)
    results = {}
    for fmt in ("contiguous", "channels_last"):
        model = tiny(spatial_dims, memory_format=fmt, **kw)
        set_alphas(model)
        layouts: list[bool] = []
        hooks = [
            m.register_forward_hook(lambda m, a, out, seen=layouts: seen.append(out.is_contiguous(memory_format=cl)))
            for m in model.modules()
            if isinstance(m, (qnn.QuaternionConv2d, qnn.QuaternionConv3d))
        ]
        out = model(ct=ct, mri=mri)
        for h in hooks:
            h.remove()
        logits = [t for name in ("ct", "mri") for t in out[name]]
        assert all(t.is_contiguous() for t in logits)
        loss = sum((t * torch.linspace(-1, 1, t.numel(), dtype=t.dtype).view_as(t)).sum() for t in logits)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results[fmt] = (logits, grads, layouts)
    (ref_logits, ref_grads, ref_layouts), (got_logits, got_grads, got_layouts) = results.values()
    assert got_layouts and all(got_layouts), "a quaternion conv ran outside channels_last"
    assert not any(ref_layouts)
    for o, r in zip(got_logits, ref_logits, strict=True):
        torch.testing.assert_close(o, r, rtol=1e-10, atol=1e-12)
    for name, r in ref_grads.items():
        torch.testing.assert_close(got_grads[name], r, rtol=1e-9, atol=1e-12, msg=name)


def test_memory_format_auto_is_channels_last_on_cpu() -> None:
    model = tiny(2)
    assert model.options.memory_format == "auto"
    feats = model._in_feature_layout(torch.randn(2, 8, 5, 6))
    assert feats.is_contiguous(memory_format=torch.channels_last) and not feats.is_contiguous()
    assert tiny(2, memory_format="contiguous")._in_feature_layout(feats.contiguous()).is_contiguous()


@pytest.mark.parametrize("in_channels", [1, 2])
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_stem_conv_writes_channels_last_itself(spatial_dims: int, in_channels: int) -> None:
    """The stem's input gets channels_last strides (a one-channel image too, whose default strides read
    as channels-first), so the stem conv's oneDNN kernel writes its output channels_last and nothing
    converts it after; the stem's output is the one it computes on the plain image."""
    cl = torch.channels_last if spatial_dims == 2 else torch.channels_last_3d
    model = tiny(spatial_dims, in_channels=in_channels).eval()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, in_channels, *SIZES[spatial_dims], generator=g)
    staged = model._stem_input(x)
    assert staged.stride(1) == 1 and torch.equal(staged, x)
    conv = model.stem["ct"][0]
    seen = []
    hook = conv.register_forward_hook(lambda m, a, out: seen.append(out.is_contiguous(memory_format=cl)))
    with torch.no_grad():
        got = model.stem["ct"](staged)
        ref = model.stem["ct"](x)
    hook.remove()
    assert seen == [True, False]  # from the plain image it would come out channels-first
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    assert model._in_feature_layout(got).data_ptr() == got.data_ptr()  # already in the maps' layout: no copy
    assert tiny(spatial_dims, in_channels=in_channels, memory_format="contiguous")._stem_input(x) is x


@pytest.mark.parametrize("real_valued", [False, True], ids=["quaternion", "real"])
def test_decoder_blocks_take_features_and_skip(real_valued: bool) -> None:
    """Each decoder block is called once with (features, skip) and computes what it computes on their
    qcat: values and every gradient equal the network whose units concatenate first (float64, train
    mode, so both the per-input and the concatenating conv run the norm on batch statistics)."""
    from aqcf_kernels.models.layers import ConvBlock

    kw = {"dtype": torch.float64, "kv_pool": 16, "real_valued": real_valued}
    ct, mri = image(2, SIZES[2], seed=3, dtype=torch.float64), image(2, SIZES[2], seed=4, dtype=torch.float64)
    results = []
    for concatenates in (False, True):
        model = tiny(2, **kw)
        set_alphas(model)
        assert all(isinstance(b, ConvBlock) for b in model.decoder.blocks)
        units = [m for m in model.modules() if isinstance(m, qnn.QuaternionConvNormAct)]
        assert bool(units) != real_valued
        for m in units:
            m.concatenates_inputs = concatenates
        calls: list[int] = []
        hooks = [
            b.register_forward_pre_hook(lambda m, args, seen=calls: seen.append(len(args)))
            for b in model.decoder.blocks
        ]
        out = model(ct=ct, mri=mri)
        for h in hooks:
            h.remove()
        assert calls == [2] * 2 * len(model.decoder.blocks)  # once per stream, with (features, skip)
        loss = sum((t * torch.linspace(-1, 1, t.numel(), dtype=t.dtype).view_as(t)).sum() for t in out.values())
        loss.backward()
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (got, got_grads), (ref, ref_grads) = results
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-10, atol=1e-12, msg=name)
    for name, r in ref_grads.items():
        torch.testing.assert_close(got_grads[name], r, rtol=1e-9, atol=1e-12, msg=name)
