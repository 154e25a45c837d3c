"""``AQCFBlock`` against a plain re-implementation built from ``aqcf_kernels.reference`` pieces.

The re-implementation below uses the module's own parameters but none of the package's layout or
attention code: projections are ``reference.quaternion_conv_expanded`` on slices of the weights
(``qkv_a`` holds [Q of a | K of a | V of a] per component block, as documented), heads are cut by
explicit component indexing, pooling happens BEFORE the projections (it commutes with them: the
averaging weights sum to one, so the bias passes through), attention is ``reference.attention`` and
the epilogue ``reference.gated_residual``. Everything runs in float64 on the torch backend unless
a test says otherwise.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck
from torch.func import functional_call

from aqcf_kernels import backends, reference
from aqcf_kernels.backends import registered
from aqcf_kernels.layout import merge_heads, split_heads
from aqcf_kernels.nn import AQCFBlock

from ._util import rand, rel

# ---------------------------------------------------------------------------------------------
# The plain re-implementation
# ---------------------------------------------------------------------------------------------


def comp(x: torch.Tensor, c: int, channels: slice) -> torch.Tensor:
    """Quaternion channels ``channels`` of component ``c`` of a blocked (B, 4·Cq, N) tensor."""
    cq = x.shape[1] // 4
    return x[:, c * cq + channels.start : c * cq + channels.stop]


def hand_split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, 4·Cq, N) -> (B, H, N, 4·d): head h's row is [r | i | j | k] of quaternion channels [h·d, (h+1)·d)."""
    d = x.shape[1] // 4 // heads
    rows = [
        torch.cat([comp(x, c, slice(h * d, (h + 1) * d)) for c in range(4)], 1).transpose(1, 2) for h in range(heads)
    ]
    return torch.stack(rows, 1)


def hand_merge_heads(z: torch.Tensor) -> torch.Tensor:
    """(B, H, N, 4·d) -> (B, 4·H·d, N), component block c = [head 0's c | head 1's c | ...]."""
    _, h, _, e = z.shape
    d = e // 4
    return torch.cat([z[:, head, :, c * d : (c + 1) * d].transpose(1, 2) for c in range(4) for head in range(h)], 1)


def hand_qcat(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    cx, cy = x.shape[1] // 4, y.shape[1] // 4
    return torch.cat([t for c in range(4) for t in (comp(x, c, slice(0, cx)), comp(y, c, slice(0, cy)))], 1)


def project(conv, x, part=None, parts=1):
    """``reference.quaternion_conv_expanded`` with the module's weight (part ``part`` of ``parts`` equal
    output slices of every component block, e.g. Q/K/V of the fused qkv conv)."""
    w, b = conv.weight, conv.bias
    if part is not None:
        n = w.shape[1] // parts
        w = w[:, part * n : (part + 1) * n]
        b = None if b is None else b.view(4, parts * n)[:, part * n : (part + 1) * n].reshape(-1)
    return reference.quaternion_conv_expanded(x, w, b)


def pool(f: torch.Tensor, size) -> torch.Tensor:
    return (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)[len(size) - 1](f, size)


def reference_block(block: AQCFBlock, f_a, f_b, pooled_a=None, pooled_b=None):
    """The block's definition from reference pieces; ``pooled_*`` the expected K/V spatial size (or None)."""
    if f_b.shape[0] == 1 and f_a.shape[0] > 1:
        f_b = f_b.expand(f_a.shape[0], *f_b.shape[1:])
    t_a, t_b = f_a.flatten(2), f_b.flatten(2)
    kv_in_a = t_a if pooled_a is None else pool(f_a, pooled_a).flatten(2)
    kv_in_b = t_b if pooled_b is None else pool(f_b, pooled_b).flatten(2)
    q_a, k_a, v_a = (
        project(block.qkv_a, t_a, 0, 3),
        project(block.qkv_a, kv_in_a, 1, 3),
        project(block.qkv_a, kv_in_a, 2, 3),
    )
    q_b, k_b, v_b = (
        project(block.qkv_b, t_b, 0, 3),
        project(block.qkv_b, kv_in_b, 1, 3),
        project(block.qkv_b, kv_in_b, 2, 3),
    )
    h = block.heads
    scale = 1 / math.sqrt(4 * (block.channels // 4 // h))
    split = [hand_split_heads(t, h) for t in (q_a, k_a, v_a, q_b, k_b, v_b)]
    z_a = reference.attention(split[0], split[4], split[5], scale)[0]  # a's queries read b
    z_b = reference.attention(split[3], split[1], split[2], scale)[0]  # b's queries read a
    o_a, o_b = project(block.out_a, hand_merge_heads(z_a)), project(block.out_b, hand_merge_heads(z_b))
    outs = []
    for t, o, name, alpha in ((t_a, o_a, "a", block.alpha_a), (t_b, o_b, "b", block.alpha_b)):
        if block.gate == "none":
            outs.append(t + alpha * o)
            continue
        gate_in = hand_qcat(t, o)
        if block.gate == "channel":
            gate_in = gate_in.mean(2, keepdim=True)
        g = project(getattr(block, f"gate_{name}"), gate_in)
        outs.append(reference.gated_residual(t, o, g, alpha))
    return outs[0].reshape(f_a.shape), outs[1].reshape(f_b.shape)


def make_block(channels, heads, gate, kv_pool=None, seed=0, dtype=torch.float64, alphas=(0.7, -1.3), bias=True):
    """A block whose every parameter is fresh seeded noise (biases included), alphas non-zero."""
    block = AQCFBlock(channels, heads=heads, kv_pool=kv_pool, gate=gate, bias=bias, dtype=dtype)
    with torch.no_grad():
        for i, (name, p) in enumerate(sorted(block.named_parameters())):
            if name.startswith("alpha"):
                continue
            fan_in = p.shape[2] * 4 if p.dim() > 1 else 1
            p.copy_(rand(*p.shape, seed=seed * 100 + i, dtype=dtype, scale=0.4 if p.dim() == 1 else fan_in**-0.5))
        block.alpha_a.fill_(alphas[0])
        block.alpha_b.fill_(alphas[1])
    return block


@pytest.fixture(autouse=True)
def force_torch(monkeypatch):
    monkeypatch.setenv("AQCF_BACKEND", "torch")


# ---------------------------------------------------------------------------------------------
# Layout: the package's head split is the hand-made one
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cq, heads", [(6, 3), (8, 2), (5, 1)])
def test_split_and_merge_heads_match_explicit_indexing(cq, heads):
    x = rand(2, 4 * cq, 7, seed=cq)
    assert torch.equal(split_heads(x, heads), hand_split_heads(x, heads))
    z = rand(2, heads, 7, 4 * cq // heads, seed=cq + 1)
    assert torch.equal(merge_heads(z), hand_merge_heads(z))
    assert torch.equal(merge_heads(split_heads(x, heads)), x)


# ---------------------------------------------------------------------------------------------
# The block against the re-implementation
# ---------------------------------------------------------------------------------------------

# (gate, channels, heads, kv_pool, shape_a, shape_b, expected pooled K/V size of a, of b)
CASES = {
    "token-2d-vs-1d": ("token", 16, 2, None, (2, 16, 3, 5), (2, 16, 7), None, None),
    "channel-Bb1": ("channel", 8, 1, None, (3, 8, 11), (1, 8, 4, 3), None, None),
    "none-4heads": ("none", 32, 4, None, (2, 32, 5), (2, 32, 6), None, None),
    # 15 tokens -> factor 2 -> (2, 3) = 6 tokens; 13 -> factor 3 -> 5 tokens (factor 2 leaves 7 > 6)
    "token-kvpool": ("token", 16, 2, 6, (2, 16, 3, 5), (2, 16, 13), (2, 3), (5,)),
    # a: 2·3·2 = 12 tokens -> factor 2 -> (1, 2, 1); b: 3 tokens <= 4, not pooled; b shared (batch 1)
    "channel-kvpool-3d-Bb1": ("channel", 16, 4, 4, (2, 16, 2, 3, 2), (1, 16, 3), (1, 2, 1), None),
    "none-kvpool": ("none", 8, 2, 5, (1, 8, 9), (1, 8, 2, 4), (5,), (1, 2)),
    # one quaternion channel per head (d = 1) and a single head, no pooling or broadcasting
    "token-d1": ("token", 12, 3, None, (2, 12, 6), (2, 12, 5), None, None),
    "token-1head": ("token", 8, 1, None, (2, 8, 4), (2, 8, 7), None, None),
}


def _inputs(shape_a, shape_b, seed, dtype=torch.float64):
    return rand(*shape_a, seed=seed, dtype=dtype), rand(*shape_b, seed=seed + 1, dtype=dtype)


@pytest.mark.parametrize("case", list(CASES))
def test_block_matches_reference_forward_and_grads(case):
    gate, channels, heads, kv_pool, shape_a, shape_b, pooled_a, pooled_b = CASES[case]
    block = make_block(channels, heads, gate, kv_pool, seed=len(case))
    f_a, f_b = _inputs(shape_a, shape_b, seed=3)
    out_shape_b = (shape_a[0], *shape_b[1:])
    gy_a, gy_b = rand(*shape_a, seed=5), rand(*out_shape_b, seed=6)

    def run(fn):
        block.zero_grad()
        a, b = f_a.clone().requires_grad_(), f_b.clone().requires_grad_()
        y_a, y_b = fn(a, b)
        ((y_a * gy_a).sum() + (y_b * gy_b).sum()).backward()
        params = {n: p.grad.clone() for n, p in block.named_parameters()}
        return y_a.detach(), y_b.detach(), a.grad, b.grad, params

    got = run(block)
    ref = run(lambda a, b: reference_block(block, a, b, pooled_a, pooled_b))
    assert got[0].shape == shape_a and got[1].shape == out_shape_b
    for name, o, r in zip(("f_a'", "f_b'", "d f_a", "d f_b"), got[:4], ref[:4], strict=True):
        assert rel(o, r) <= 1e-12, f"{name}: {rel(o, r):.2e}"
    assert got[4].keys() == ref[4].keys()
    for name in ref[4]:
        assert rel(got[4][name], ref[4][name]) <= 1e-11, f"grad {name}: {rel(got[4][name], ref[4][name]):.2e}"
        assert got[4][name].abs().max() > 0, f"no gradient reaches {name}"


def test_block_without_bias_matches_reference():
    block = make_block(16, 2, "token", seed=9, bias=False)
    assert all(m.bias is None for m in (block.qkv_a, block.out_b, block.gate_a))
    f_a, f_b = _inputs((2, 16, 6), (2, 16, 4), seed=10)
    for o, r in zip(block(f_a, f_b), reference_block(block, f_a, f_b), strict=True):
        assert rel(o, r) <= 1e-12


@pytest.mark.parametrize("gate", ["token", "channel", "none"])
@pytest.mark.parametrize("batch_b", [2, 1], ids=["Bb=B", "Bb=1"])
def test_identity_at_alpha_zero(gate, batch_b):
    block = AQCFBlock(16, heads=2, gate=gate, kv_pool=4, dtype=torch.float64)  # a fresh block: α = 0
    assert block.alpha_a.item() == 0 and block.alpha_b.item() == 0
    f_a, f_b = _inputs((2, 16, 3, 5), (batch_b, 16, 7), seed=11)
    out_a, out_b = block(f_a, f_b)
    assert torch.equal(out_a, f_a)
    assert torch.equal(out_b, f_b.expand(2, -1, -1))
    # ... and the attention path is live: the same block with α ≠ 0 changes both streams
    with torch.no_grad():
        block.alpha_a.fill_(0.5)
        block.alpha_b.fill_(0.5)
    out_a, out_b = block(f_a, f_b)
    assert not torch.allclose(out_a, f_a) and not torch.allclose(out_b, f_b.expand(2, -1, -1))


def test_forward_with_one_stream_returns_input_itself():
    block = make_block(8, 2, "token", seed=12)
    f_a = rand(2, 8, 5, seed=13)
    out_a, out_b = block(f_a, None)
    assert out_a is f_a and out_b is None
    out_a, out_b = block(f_a)
    assert out_a is f_a and out_b is None


def test_block_gradcheck_float64(single_threaded):
    block = make_block(8, 2, "token", kv_pool=4, seed=14)  # K/V pooled: a's 9 tokens to 4, b's 5 to 3
    names = [n for n, _ in block.named_parameters()]
    f_a, f_b = _inputs((1, 8, 3, 3), (1, 8, 5), seed=15)

    def fn(f_a, f_b, *params):
        return functional_call(block, dict(zip(names, params, strict=True)), (f_a, f_b))

    params = [p.detach().clone().requires_grad_() for p in block.parameters()]
    assert gradcheck(fn, (f_a.requires_grad_(), f_b.requires_grad_(), *params))


def test_block_gradcheck_channel_gate_shared_stream(single_threaded):
    block = make_block(8, 1, "channel", seed=16)
    f_a, f_b = _inputs((2, 8, 3), (1, 8, 2), seed=17)
    assert gradcheck(lambda a, b: block(a, b), (f_a.requires_grad_(), f_b.requires_grad_()))


@pytest.mark.parametrize(
    ("heads", "gate", "kv_pool", "shape_a", "shape_b"),
    [
        (2, "token", 4, (1, 8, 3, 3), (1, 8, 5)),
        (1, "channel", None, (2, 8, 3), (1, 8, 2)),
        (1, "none", None, (2, 8, 3), (2, 8, 4)),
    ],
    ids=["token-pooled", "channel-shared-stream", "no-gate"],
)
def test_block_gradgradcheck_float64(heads, gate, kv_pool, shape_a, shape_b, single_threaded):
    """Double backward through the block (a gradient penalty, a Hessian-vector product): its attention and
    gate differentiate their composites under create_graph=True, the projections are convs (whose
    backward is made of differentiable ops)."""
    block = make_block(8, heads, gate, kv_pool=kv_pool, seed=18)
    f_a, f_b = _inputs(shape_a, shape_b, seed=19)
    assert gradgradcheck(lambda a, b: block(a, b), (f_a.requires_grad_(), f_b.requires_grad_()))


def test_block_gradient_penalty_matches_reference():
    """A gradient penalty ‖∂L/∂f_a‖² backpropagated to the parameters (create_graph=True) equals the
    penalty's gradient through the reference block."""
    block = make_block(16, 2, "token", kv_pool=6, seed=20)
    f_a, f_b = _inputs((2, 16, 4, 3), (2, 16, 7), seed=21)

    def penalty_grads(forward):
        block.zero_grad()
        a = f_a.detach().clone().requires_grad_()
        out_a, out_b = forward(a, f_b)
        (g,) = torch.autograd.grad(out_a.square().sum() + out_b.sum(), a, create_graph=True)
        g.square().sum().backward()
        return {n: p.grad.clone() for n, p in block.named_parameters()}

    got = penalty_grads(block)
    expected = penalty_grads(lambda a, b: reference_block(block, a, b, (2, 2), (4,)))  # 12 and 7 tokens pooled to <= 6
    for name, g in got.items():
        assert rel(g, expected[name]) <= 1e-12, f"{name}: {rel(g, expected[name]):.2e}"


# ---------------------------------------------------------------------------------------------
# Heads never mix components
# ---------------------------------------------------------------------------------------------


def _signed_component_permutation(x: torch.Tensor) -> torch.Tensor:
    """(r, i, j, k) -> (r, k, -i, j) on the component blocks of a blocked (B, 4·Cq, N) tensor: an
    orthogonal map of each quaternion channel's 4 reals, so it preserves every per-head real dot
    product Re(Σ q ⊗ conj(k)) — IF each head holds whole quaternion channels."""
    r, i, j, k = x.chunk(4, dim=1)
    return torch.cat([r, k, -i, j], dim=1)


def _reshape_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """The bug found in public quaternion transformers: a plain reshape of the blocked layout."""
    b, c, n = x.shape
    return x.reshape(b, heads, c // heads, n).transpose(-1, -2)


def _score_path_is_invariant(split, heads: int) -> bool:
    """Attention probabilities (reference.attention with identity values) of q against k, before and
    after permuting the components of both q and k in the same way."""
    q, k = rand(2, 24, 7, seed=21), rand(2, 24, 9, seed=22)  # Cq = 6 quaternion channels, 3 per head
    eye = torch.eye(9, dtype=torch.float64).expand(2, heads, 9, 9)
    scale = 12**-0.5
    p = reference.attention(split(q, heads), split(k, heads), eye, scale)[0]
    p_perm = reference.attention(
        split(_signed_component_permutation(q), heads), split(_signed_component_permutation(k), heads), eye, scale
    )[0]
    assert p.shape == (2, heads, 7, 9) and torch.allclose(p.sum(-1), torch.ones(2, heads, 7, dtype=torch.float64))
    return torch.allclose(p_perm, p, rtol=0, atol=1e-12)


def test_heads_never_mix_components_and_the_test_catches_a_reshape_split():
    assert _score_path_is_invariant(split_heads, 2)
    assert not _score_path_is_invariant(_reshape_heads, 2)  # the same check rejects a reshape-based split


def _permute_qk_components(module, inputs, out):
    """Forward hook on a fused qkv conv: (r, i, j, k) -> (r, k, -i, j) on its Q and K outputs, V untouched."""
    b, c, n = out.shape
    blocks = out.view(b, 4, c // 4, n)  # per component: [Q | K | V], cq each
    cq = c // 12
    qk, v = blocks[:, :, : 2 * cq], blocks[:, :, 2 * cq :]
    qk = torch.stack([qk[:, 0], qk[:, 3], -qk[:, 1], qk[:, 2]], 1)
    return torch.cat([qk, v], 2).reshape(b, c, n)


@pytest.mark.parametrize("split", ["package", "reshape"])
def test_block_score_path_is_component_equivariant(split, monkeypatch):
    """Through the block itself: the same signed permutation of the components of Q and K (a hook on the
    projections) must leave both outputs unchanged. With the block's head split replaced by a plain
    reshape, the same check fails, so it really tests the split."""
    import aqcf_kernels.nn.attention as block_module

    if split == "reshape":
        monkeypatch.setattr(block_module, "split_heads", _reshape_heads)
    block = make_block(24, 2, "token", seed=23)
    f_a, f_b = _inputs((2, 24, 7), (2, 24, 9), seed=24)
    before = block(f_a, f_b)
    hooks = [conv.register_forward_hook(_permute_qk_components) for conv in (block.qkv_a, block.qkv_b)]
    try:
        after = block(f_a, f_b)
    finally:
        for h in hooks:
            h.remove()
    errors = [rel(o, r) for o, r in zip(after, before, strict=True)]
    if split == "package":
        assert max(errors) <= 1e-12, errors
    else:
        assert min(errors) > 1e-3, errors


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(channels=24, heads=4), r"channels must be a positive multiple of 4 \* heads = 16.*got 24"),
        (dict(channels=6, heads=1), r"channels must be a positive multiple of 4 \* heads = 4.*got 6"),
        (dict(channels=16, heads=0), r"heads must be a positive int, got 0"),
        (dict(channels=16, heads=2, gate="sigmoid"), r"gate must be one of .*'sigmoid'"),
        (dict(channels=16, heads=2, kv_pool=0), r"kv_pool must be None or a positive int, got 0"),
    ],
    ids=["not-multiple-of-4H", "not-multiple-of-4", "heads", "gate", "kv_pool"],
)
def test_construction_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AQCFBlock(**kwargs)


@pytest.mark.parametrize(
    "shape_a, shape_b, dtype_b, match",
    [
        ((2, 16, 5), (2, 12, 5), torch.float64, r"f_b has 12 channels, the block was built for 16"),
        ((2, 12, 5), (2, 16, 5), torch.float64, r"f_a has 12 channels, the block was built for 16"),
        ((2, 16, 5), (2, 18, 5), torch.float64, r"f_b must have a positive multiple of 4 channels"),
        ((3, 16, 5), (2, 16, 5), torch.float64, r"batch sizes 3 \(f_a\) and 2 \(f_b\) differ"),
        ((1, 16, 5), (2, 16, 5), torch.float64, r"batch sizes 1 \(f_a\) and 2 \(f_b\) differ"),
        ((2, 16, 5), (2, 16, 5), torch.float32, r"f_b is torch.float32 on cpu but f_a is torch.float64"),
        ((2, 16), (2, 16, 5), torch.float64, r"f_a must be \(batch, channels, \*spatial\), got \(2, 16\)"),
        ((2, 16, 5), (16, 5), torch.float64, r"f_b must be \(batch, channels, \*spatial\), got \(16, 5\)"),
        ((2, 16, 5), (2, 16, 0), torch.float64, r"f_b has no tokens \(spatial size \(0,\)\)"),
        ((2, 16, 3, 0), (2, 16, 5), torch.float64, r"f_a has no tokens \(spatial size \(3, 0\)\)"),
    ],
    ids=[
        "f_b-channels",
        "f_a-channels",
        "not-blocked",
        "batch",
        "batch-a1",
        "dtype",
        "rank-a",
        "rank-b",
        "no-tokens-b",
        "no-tokens-a",
    ],  # fmt: skip
)
def test_forward_errors(shape_a, shape_b, dtype_b, match):
    block = make_block(16, 2, "token", seed=30)
    f_a, f_b = rand(*shape_a, seed=31), rand(*shape_b, seed=32, dtype=dtype_b)
    with pytest.raises(ValueError, match=match):
        block(f_a, f_b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a device mismatch needs a second device (CUDA)")
def test_forward_device_mismatch():
    block = make_block(16, 2, "token", seed=33)
    with pytest.raises(ValueError, match=r"f_b is torch.float64 on cuda"):
        block(rand(2, 16, 5, seed=34), rand(2, 16, 5, seed=35).cuda())


# ---------------------------------------------------------------------------------------------
# The block on the triton backend (interpreter on CPU)
# ---------------------------------------------------------------------------------------------

TRITON_WHY = registered("attention")["triton"].unavailable()


@pytest.mark.skipif(TRITON_WHY is not None, reason=f"triton attention backend unavailable: {TRITON_WHY}")
@pytest.mark.parametrize("gate", ["token", "channel"])
def test_block_on_triton_matches_torch_backend(gate):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    block = make_block(16, 2, gate, kv_pool=20, seed=40, dtype=torch.float32).to(device)
    f_a, f_b = _inputs((2, 16, 5, 7), (1, 16, 9), seed=41, dtype=torch.float32)
    f_a, f_b = f_a.to(device), f_b.to(device)
    gy = rand(2, 16, 5, 7, seed=42, dtype=torch.float32).to(device), rand(2, 16, 9, seed=43, dtype=torch.float32)

    def run(backend):
        block.zero_grad()
        a, b = f_a.clone().requires_grad_(), f_b.clone().requires_grad_()
        with backends.use(backend):
            y_a, y_b = block(a, b)
            ((y_a * gy[0]).sum() + (y_b * gy[1].to(y_b)).sum()).backward()
        return [y_a.detach(), y_b.detach(), a.grad, b.grad] + [p.grad.clone() for p in block.parameters()]

    calls = []
    from aqcf_kernels.backends.triton import attention as TRA

    real = TRA.attention_fwd_kernel

    class Spy:
        def __getitem__(self, grid):
            calls.append(grid)
            return real[grid]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TRA, "attention_fwd_kernel", Spy())
        got = run("triton")
    assert len(calls) == 1  # both directions in one launch
    ref = run("torch")
    names = ["f_a'", "f_b'", "d f_a", "d f_b"] + [n for n, _ in block.named_parameters()]
    for name, o, r in zip(names, got, ref, strict=True):
        assert rel(o, r) <= 1e-5, f"{name}: {rel(o, r):.2e}"


def test_block_compiles_with_one_quaternion_channel_per_head():
    """torch.compile, forward and backward, where split_heads gives non-contiguous views (d = 1): the
    op's fake reports contiguous outputs, as the real op returns."""
    block = make_block(8, 2, "token", dtype=torch.float32, seed=21)
    g = torch.Generator().manual_seed(22)
    f_a, f_b = torch.randn(2, 8, 5, 3, generator=g), torch.randn(2, 8, 7, generator=g)
    compiled = torch.compile(block, fullgraph=True)
    outs = compiled(f_a, f_b)
    for got, want in zip(outs, block(f_a, f_b), strict=True):
        torch.testing.assert_close(got, want)
    (outs[0].square().sum() + outs[1].sum()).backward()
    assert all(p.grad is not None for p in block.parameters())


@pytest.mark.parametrize("spatial", [(4, 5), (3, 2, 3)], ids=["2d", "3d"])
def test_block_keeps_channels_last_and_matches_channels_first(spatial):
    """A channels_last network stays channels_last past the block (its tokens are computed
    channels-first): same values and gradients as channels-first inputs, outputs in the inputs' layout."""
    block = make_block(8, 2, "token", kv_pool=8, seed=4)
    fmt = torch.channels_last if len(spatial) == 2 else torch.channels_last_3d
    f_a, f_b = _inputs((2, 8, *spatial), (2, 8, *spatial), seed=11)
    gy_a, gy_b = rand(2, 8, *spatial, seed=12), rand(2, 8, *spatial, seed=13)

    def run(to_format):
        a, b = (to_format(t).detach().requires_grad_() for t in (f_a, f_b))
        y_a, y_b = block(a, b)
        ((y_a * gy_a).sum() + (y_b * gy_b).sum()).backward()
        return y_a, y_b, a.grad, b.grad

    got = run(lambda t: t.contiguous(memory_format=fmt))
    ref = run(lambda t: t.contiguous())
    assert got[0].is_contiguous(memory_format=fmt) and got[1].is_contiguous(memory_format=fmt)
    assert ref[0].is_contiguous() and ref[1].is_contiguous()
    for name, o, r in zip(("f_a'", "f_b'", "d f_a", "d f_b"), got, ref, strict=True):
        assert rel(o, r) <= 1e-12, f"{name}: {rel(o, r):.2e}"
