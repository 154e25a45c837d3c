"""The layers' argument checking against ``torch.nn``'s, over a hypothesis grid of valid and invalid arguments.

The layers promise torch.nn's signatures ("drop-in layers", README; every class docstring: "arguments as
``torch.nn.Conv2d``" and so on), channels counted in REAL channels of a blocked ``[r|i|j|k]`` tensor (nn/conv.py,
nn/norm.py, nn/linear.py docstrings). For each draw the torch.nn twin is built with the same arguments (the same real
channel counts) next to ours, and:

* a configuration is *accepted by torch* when torch's constructor AND a forward on a roomy, well-formed input pass:
  torch's constructors check little (``nn.Conv2d(4, 4, 3, stride=0)`` builds; its forward refuses), while ours may
  refuse earlier, at construction, which is what the package wants ("before any kernel runs");
* torch accepts  -> ours accepts, except where the quaternion rule is broken (channels not a positive multiple of
  ``4 * groups``, ``groups`` not holding whole quaternions): ours refuses, naming the channel argument or groups;
* torch refuses -> ours refuses, with ValueError / TypeError / RuntimeError, and a message naming the argument that
  the draw made bad (or torch's own message, word for word);
* then a drawn input (right or wrong rank, unbatched, wrong channel count, empty batch, spatial sizes 0-6, another
  dtype; ``output_size`` for transposed convs): ours accepts it iff torch does (the quaternion rule aside), a refusal
  names the input; where both accept, the output has torch's shape and dtype, and for convs and linear layers torch's
  VALUES given the expanded real weight (``aqcf_kernels.quaternion.expand_weight_grouped``, the channels reordered
  group-major around the twin for ``groups > 1``: torch's groups split a blocked tensor across components), and for
  average pooling torch's values.

Covered: QuaternionConv1d/2d/3d, QuaternionConvTranspose1d/2d/3d, QuaternionLinear, QuaternionBatchNorm1d/2d/3d,
QuaternionInstanceNorm1d/2d/3d, QuaternionMaxPool1d/2d/3d, QuaternionAvgPool1d/2d/3d, QuaternionDropout and the
functional convs / linear of ``aqcf_kernels.functional``; also each constructor's signature against torch's
(names, order, defaults).

Where ours differs from torch.nn on purpose, README's Conventions bullet "Where the layers differ from torch.nn's
on purpose" says so, and ours is held to that: a one-element kernel_size repeated for every dim, a negative padding
refused in every padding mode, a bool geometry refused, a conv's dtype check of an empty batch, zero channel counts
refused, an instance norm returning an empty batch empty in training, a norm checking the channel count of an empty
input and without parameters or running statistics, momentum in [0, 1], a max pool's ``stride=()`` refused. Each
has a plain test asserting the documented behaviour next to torch's (torch's asserted too, so a change in torch is
noticed), and the grid asserts the same where its draws reach it. The disagreements this grid found and the package
fixed (zero-size spatial dims convolved, the meta device's dtype error, batch norm eps <= 0, unbatched functional
convs, the norms' keyword-only ``bias=``; and complex dtypes, now refused at construction naming the dtype) are plain
tests asserting the fixed behaviour, torch's but for the complex dtypes, and the grid draws them again.
Where torch.nn contradicts itself (one-element padding in a non-zero padding mode; a transposed conv's
zero-size output, refused with one group and returned empty with several) ours is held to its consistent behaviour
in plain tests, and the grid goes around it. A max pool window of padding only is refused as documented (nn/pool.py).
Where torch crashes rather than checks (an instance norm on an input with no element: an IndexError) or its meta
kernels check less (a transposed conv's channel count), ours' refusal or empty output is asserted instead.
Mutation-checked: 12 bugs injected in the layers' checks (each fix above undone, the channel check of parameterless
norms and empty inputs dropped, a one-element sequence not repeated, bools taken as ints), all caught at scale 1.

``AQCF_GRID_SCALE`` multiplies every ``max_examples`` (the default run is sized for CI, ~12 s on one core).
"""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
import torch.nn.functional as F
from _grid import grid as _grid
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import aqcf_kernels.functional as QF
from aqcf_kernels import nn as qnn
from aqcf_kernels.quaternion import expand_weight_grouped, from_group_major, to_group_major
from aqcf_kernels.reference import expand_weight

pytestmark = pytest.mark.usefixtures("single_threaded")

#: what a refusal of ours may raise (torch's kinds; the package's own checks raise ValueError / TypeError)
ERRORS = (ValueError, TypeError, RuntimeError)
F64 = torch.float64

CONV = {
    (1, False): (qnn.QuaternionConv1d, nn.Conv1d),
    (2, False): (qnn.QuaternionConv2d, nn.Conv2d),
    (3, False): (qnn.QuaternionConv3d, nn.Conv3d),
    (1, True): (qnn.QuaternionConvTranspose1d, nn.ConvTranspose1d),
    (2, True): (qnn.QuaternionConvTranspose2d, nn.ConvTranspose2d),
    (3, True): (qnn.QuaternionConvTranspose3d, nn.ConvTranspose3d),
}
BATCH_NORM = {1: (qnn.QuaternionBatchNorm1d, nn.BatchNorm1d), 2: (qnn.QuaternionBatchNorm2d, nn.BatchNorm2d),
              3: (qnn.QuaternionBatchNorm3d, nn.BatchNorm3d)}  # fmt: skip
INSTANCE_NORM = {1: (qnn.QuaternionInstanceNorm1d, nn.InstanceNorm1d),
                 2: (qnn.QuaternionInstanceNorm2d, nn.InstanceNorm2d),
                 3: (qnn.QuaternionInstanceNorm3d, nn.InstanceNorm3d)}  # fmt: skip
MAX_POOL = {1: (qnn.QuaternionMaxPool1d, nn.MaxPool1d), 2: (qnn.QuaternionMaxPool2d, nn.MaxPool2d),
            3: (qnn.QuaternionMaxPool3d, nn.MaxPool3d)}  # fmt: skip
AVG_POOL = {1: (qnn.QuaternionAvgPool1d, nn.AvgPool1d), 2: (qnn.QuaternionAvgPool2d, nn.AvgPool2d),
            3: (qnn.QuaternionAvgPool3d, nn.AvgPool3d)}  # fmt: skip
QF_CONV = {
    (1, False): (QF.quaternion_conv1d, F.conv1d),
    (2, False): (QF.quaternion_conv2d, F.conv2d),
    (3, False): (QF.quaternion_conv3d, F.conv3d),
    (1, True): (QF.quaternion_conv_transpose1d, F.conv_transpose1d),
    (2, True): (QF.quaternion_conv_transpose2d, F.conv_transpose2d),
    (3, True): (QF.quaternion_conv_transpose3d, F.conv_transpose3d),
}


def grid(examples: int) -> settings:
    return _grid(examples, HealthCheck.data_too_large, HealthCheck.filter_too_much)


# ---------------------------------------------------------------------------------------------------------------------
# the differential harness
# ---------------------------------------------------------------------------------------------------------------------


class Refused:
    """What a call raised (any exception: torch's own refusals are not held to a kind)."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def __repr__(self) -> str:
        return f"Refused({type(self.error).__name__}: {self.error})"


def attempt(fn):
    """``fn()``, or a :class:`Refused` holding what it raised; warnings silenced (torch warns on empty inits)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 (torch's refusals come in every kind)
            return Refused(e)


def refused(result) -> bool:
    return isinstance(result, Refused)


def assert_named_refusal(ours: Refused, names, torch_result=None, what: str = "") -> None:
    """Ours refused with one of :data:`ERRORS`, naming one of ``names`` in its message, or with torch's own message."""
    err = ours.error
    assert isinstance(err, ERRORS), f"{what}: refused with {type(err).__name__}, not one of torch's kinds: {err!r}"
    message = str(err)
    if refused(torch_result) and type(torch_result.error) is type(err) and str(torch_result.error) == message:
        return  # torch's own error, word for word (e.g. nn.Parameter refusing an integer dtype)
    assert any(n in message for n in names), f"{what}: the error names none of {names}: {type(err).__name__}: {err}"


def int_like(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def as_tuple(value, n: int):
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


# Values: plausible and implausible, for the argument the draw perturbs.
def int_or_tuple(lo: int, hi: int, dims: int):
    """An int, or a tuple of 0-4 ints (the right length ``dims``, one, and wrong ones)."""
    elem = st.integers(lo, hi)
    return st.one_of(
        elem,
        st.lists(elem, min_size=dims, max_size=dims).map(tuple),
        st.lists(elem, min_size=0, max_size=4).map(tuple),
        st.lists(elem, min_size=1, max_size=1),
    )


JUNK = st.sampled_from([1.5, 2.0, "2", None, True, (2.0,), (1, "a"), (2, True), (True,)])


def geometry_values(name: str, dims: int):
    return {
        "kernel_size": st.one_of(int_or_tuple(-1, 4, dims), JUNK),
        "stride": st.one_of(int_or_tuple(-1, 3, dims), JUNK),
        "padding": st.one_of(int_or_tuple(-2, 3, dims), JUNK, st.sampled_from(["same", "valid", "SAME", "full", ""])),
        "dilation": st.one_of(int_or_tuple(-1, 3, dims), JUNK),
        "output_padding": st.one_of(int_or_tuple(-1, 3, dims), JUNK),
    }[name]


CHANNEL_VALUES = st.one_of(st.integers(-4, 24), st.sampled_from([4.0, True, "8", None]))


def randomise(module: nn.Module) -> None:
    """Fresh random parameters (ours start with a zero bias), float or not."""
    with torch.no_grad():
        for p in module.parameters():
            if p.is_floating_point() and p.device.type != "meta":
                p.copy_(torch.randn_like(p))


def assert_like_torch(ours, want, *, values: bool, what: str) -> None:
    """Same shape and dtype as torch's output (each of a tuple's); values too where asked."""
    if isinstance(want, tuple):
        assert isinstance(ours, tuple) and len(ours) == len(want), f"{what}: got {type(ours)}, torch {len(want)}-tuple"
        for o, w in zip(ours, want, strict=True):
            assert_like_torch(o, w, values=values, what=what)
        return
    shapes = f"output shape {tuple(ours.shape)}, torch's {tuple(want.shape)}"
    assert tuple(ours.shape) == tuple(want.shape), f"{what}: {shapes}"
    assert ours.dtype == want.dtype, f"{what}: output dtype {ours.dtype}, torch's {want.dtype}"
    if values and want.device.type != "meta" and want.numel():
        if want.dtype == F64:
            torch.testing.assert_close(ours, want, msg=lambda m: f"{what}: {m}")
        elif want.dtype == torch.float32:
            err = (ours.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)
            assert err <= 1e-5, f"{what}: float32 relative error {err:.2e}"


# ---------------------------------------------------------------------------------------------------------------------
# convolutions (modules)
# ---------------------------------------------------------------------------------------------------------------------

CONV_ARGS = ["in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "output_padding", "groups",
             "bias", "padding_mode", "device", "dtype"]  # fmt: skip
#: what a refusal of each perturbed argument may name (the quaternion channel rule involves all three)
CONV_NAMES = {"in_channels": ["in_channels", "groups"], "out_channels": ["out_channels", "groups"],
              "groups": ["groups", "in_channels", "out_channels"], "kernel_size": ["kernel_size"],
              "stride": ["stride"], "padding": ["padding"], "dilation": ["dilation"],
              "output_padding": ["output_padding"], "padding_mode": ["padding_mode"], "bias": ["bias"],
              "device": ["device"], "dtype": ["dtype"]}  # fmt: skip
#: the roomy spatial size of the input that decides whether torch accepts a configuration (kernel <= 4, dilation <= 3)
ROOMY = 11


@st.composite
def conv_configs(draw):
    """A valid configuration (1-2 quaternion channels per group in and out, groups 1-3, kernel 1-3, stride and
    dilation 1-2, padding ints / 'same' / 'valid', output_padding under torch's rule), ints or tuples as drawn, then
    (usually) ONE argument replaced by any value, plausible or not, and whether it is passed positionally."""
    dims, transposed = draw(st.integers(1, 3)), draw(st.booleans())
    groups = draw(st.sampled_from([1, 1, 2, 3]))

    def maybe_int(t):  # an int where all equal, sometimes
        return t[0] if len(set(t)) == 1 and draw(st.booleans()) else t

    def tup(lo, hi):
        return maybe_int(tuple(draw(st.integers(lo, hi)) for _ in range(dims)))

    kw = {"in_channels": 4 * groups * draw(st.integers(1, 2)), "out_channels": 4 * groups * draw(st.integers(1, 2)),
          "kernel_size": tup(1, 3), "stride": tup(1, 2), "dilation": tup(1, 2), "groups": groups,
          "bias": draw(st.booleans()), "padding_mode": "zeros", "device": None, "dtype": F64}  # fmt: skip
    if transposed:
        stride, dilation = as_tuple(kw["stride"], dims), as_tuple(kw["dilation"], dims)
        kw["padding"] = tup(0, 2)
        pairs = zip(stride, dilation, strict=True)
        kw["output_padding"] = maybe_int(tuple(draw(st.integers(0, max(s, d) - 1)) for s, d in pairs))
    else:
        kw["padding"] = draw(st.sampled_from(["int", "int", "same", "valid"]))
        if kw["padding"] == "same":
            kw["stride"] = 1
        elif kw["padding"] == "int":
            kw["padding"] = tup(0, 2)
        kw["padding_mode"] = draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"]))
    bad = draw(st.sampled_from([None, None, "in_channels", "out_channels", "groups", *CONV_ARGS]))
    if bad in ("in_channels", "out_channels"):
        kw[bad] = draw(CHANNEL_VALUES)  # (0: refused, test_zero_channels_refused; the quaternion rule below)
    elif bad == "groups":
        kw[bad] = draw(st.one_of(st.integers(-1, 5), st.sampled_from([2.0, True, None])))
    elif bad in ("kernel_size", "stride", "padding", "dilation", "output_padding"):
        kw[bad] = draw(geometry_values(bad, dims))
    elif bad == "padding_mode":
        kw[bad] = draw(st.sampled_from(["zeros", "circular", "constant", "constant", "ZEROS", "", None]))
    elif bad == "bias":
        kw[bad] = draw(st.sampled_from([0, 1, None, "no"]))
    elif bad == "device":
        kw[bad] = draw(st.sampled_from(["cpu", torch.device("cpu"), "meta"]))
    elif bad == "dtype":
        kw[bad] = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.int64, None,
                                        torch.complex64, torch.complex128]))  # fmt: skip
    return dims, transposed, kw, bad, draw(st.booleans())


def build(cls, kw: dict, positional: bool, twin_cls: type):
    """``cls(**kw)``, or with the leading arguments passed positionally in the order of the TORCH class's signature
    (the same call made to both: a drop-in layer takes torch's positional order), the rest by keyword."""
    if not positional:
        return attempt(lambda: cls(**kw))
    params = inspect.signature(twin_cls.__init__).parameters.values()
    sig = [
        p.name for p in params if p.name != "self" and p.kind is p.POSITIONAL_OR_KEYWORD
    ]  # (not bias=: keyword-only)
    args, rest = [], dict(kw)
    for name in sig:
        if name not in rest:
            break
        args.append(rest.pop(name))
    return attempt(lambda: cls(*args, **rest))


CHANNEL_ARGS = ("in_channels", "out_channels", "in_features", "out_features", "num_features")


def quaternion_rule_broken(kw: dict) -> bool:
    """Channel counts torch takes that break the quaternion rule: not positive multiples of 4 * groups (a bool is
    an int to torch)."""
    g = kw.get("groups", 1)
    counts = [kw[a] for a in CHANNEL_ARGS if a in kw]
    if not all(isinstance(c, int) for c in counts) or not int_like(g) or g < 1:
        return False
    return any(c < 1 or c % (4 * g) for c in counts)


def module_dtype(kw: dict) -> torch.dtype:
    return kw.get("dtype") or torch.get_default_dtype()


def module_device(kw: dict) -> torch.device:
    return torch.device(kw.get("device") or "cpu")


def roomy_input(channels, spatial_dims: int, kw: dict, size: int = ROOMY) -> torch.Tensor:
    c = channels if int_like(channels) and channels >= 0 else 4
    x = torch.randn(2, c, *(size,) * spatial_dims, dtype=F64)
    return x.to(device=module_device(kw), dtype=module_dtype(kw)) if module_dtype(kw).is_floating_point else x


@st.composite
def conv_inputs(draw, spatial_dims: int, channels: int, kw: dict, transposed: bool):
    """An input: batched or unbatched or of a wrong rank; the right channel count or not; batch 0-2; spatial 0-6;
    the module's dtype or another; for a transposed conv, an output_size (none, torch's range, or anything)."""
    rank = draw(st.sampled_from(["batched", "batched", "unbatched", "low", "high"]))
    c = channels if draw(st.integers(0, 4)) else draw(st.sampled_from([channels + 4, max(channels - 4, 1), 3, 6]))
    batch = draw(st.integers(0, 2)) if draw(st.integers(0, 5)) == 0 else draw(st.integers(1, 2))
    spatial = [draw(st.integers(0, 6)) if draw(st.integers(0, 7)) == 0 else draw(st.integers(1, 6))
               for _ in range(spatial_dims)]  # fmt: skip
    if rank == "batched":
        shape = [batch, c, *spatial]
    elif rank == "unbatched":
        shape = [c, *spatial]
    elif rank == "low":
        shape = [c, *spatial[1:]]
    else:
        shape = [batch, c, *spatial, 2]
    dtype = module_dtype(kw) if draw(st.integers(0, 5)) else draw(st.sampled_from([torch.float32, F64]))
    x = torch.randn(shape, dtype=F64).to(dtype=dtype, device=module_device(kw))
    output_size = None
    if transposed and draw(st.integers(0, 2)):
        output_size = draw(st.lists(st.integers(0, 16), min_size=spatial_dims, max_size=spatial_dims + 2))
        if draw(st.integers(0, 3)):  # at or just outside the edges of torch's range
            geo = [as_tuple(kw[k], spatial_dims) for k in ("stride", "padding", "dilation", "kernel_size")]
            output_size = [  # offsets -1 and stride: just outside the range, its edges
                (s - 1) * st_ - 2 * p + d * (k - 1) + 1 + draw(st.sampled_from([-1, 0, st_ - 1, st_]))
                for s, st_, p, d, k in zip(spatial, *geo, strict=False)
            ]
    return x, output_size


def conv_values_via_twin(twin, ours, x, groups: int, transposed: bool, output_size):
    """Torch's layer given the expanded real weight: the channels reordered group-major around it."""
    with torch.no_grad():
        twin.weight.copy_(expand_weight_grouped(ours.weight, groups))
        if ours.bias is not None:
            twin.bias.copy_(to_group_major(ours.bias.view(1, -1), groups).view(-1))
    unbatched = x.dim() == ours._spatial_dims + 1
    xb = x.unsqueeze(0) if unbatched else x
    if output_size is not None:  # (torch reads the last spatial_dims of a longer one: its own rule, as given)
        output_size = list(output_size)[-ours._spatial_dims :]
    xg = to_group_major(xb, groups)
    y = twin(xg, output_size) if transposed else twin(xg)
    y = from_group_major(y, groups)
    return y.squeeze(0) if unbatched else y


def torch_contradicts_itself(dims: int, kw: dict) -> bool:
    """test_one_element_sequences_with_padding_mode: torch.nn refuses a one-element padding, dilation or stride of a
    2d/3d conv in a non-zero padding mode (or pads one dim), and takes it in mode 'zeros': the grid goes around it."""
    one = [isinstance(kw.get(a), (tuple, list)) and len(kw[a]) == 1 for a in ("padding", "dilation", "stride")]
    return dims > 1 and kw.get("padding_mode") != "zeros" and any(one)


GEOMETRY_ARGS = ("kernel_size", "stride", "padding", "dilation", "output_padding")


def documented_conv_refusal(dims: int, kw: dict) -> str | None:
    """The argument ours refuses where torch.nn may take it, as README's Conventions bullet 'Where the layers differ
    from torch.nn's on purpose' documents: a bool geometry (test_bool_geometry_refused), a negative padding in a
    non-zero padding mode (test_negative_padding_with_padding_mode_refused)."""
    for a in GEOMETRY_ARGS:
        value = kw.get(a)
        if isinstance(value, bool) or (isinstance(value, (tuple, list)) and any(isinstance(v, bool) for v in value)):
            return a
    if kw.get("padding_mode") != "zeros" and any(int_like(p) and p < 0 for p in as_tuple(kw.get("padding"), dims)):
        return "padding"
    return None


def torch_twin_kw(dims: int, kw: dict) -> dict:
    """The torch.nn arguments that mean what ours reads from ``kw``: a one-element kernel_size repeated for every
    dim (README, Conventions, 'differ from torch.nn's on purpose';
    test_one_element_kernel_size_repeated_for_2d_3d_layers)."""
    kernel = kw.get("kernel_size")
    if dims > 1 and isinstance(kernel, (tuple, list)) and len(kernel) == 1:
        return {**kw, "kernel_size": tuple(kernel) * dims}
    return kw


def check_conv_case(dims, transposed, kw, bad, positional, data) -> None:
    ours_cls, torch_cls = CONV[dims, transposed]
    what = f"{ours_cls.__name__}({kw}) [bad: {bad}]"
    t_layer = build(torch_cls, torch_twin_kw(dims, kw), positional, torch_cls)
    o_layer = build(ours_cls, kw, positional, torch_cls)
    refused_arg = documented_conv_refusal(dims, kw)
    if refused_arg is not None:  # documented (README, Conventions): ours refuses it whatever torch does
        assert refused(o_layer), f"{what}: {refused_arg} is refused as documented, yet ours builds"
        assert_named_refusal(o_layer, [refused_arg], what=what)
        return
    if (
        isinstance(kw.get("dtype"), torch.dtype) and kw["dtype"].is_complex
    ):  # test_complex_dtype_refused_at_construction
        assert refused(o_layer) and isinstance(o_layer.error, TypeError), f"{what}: {o_layer!r}"
        assert_named_refusal(o_layer, ["dtype"], what=what)
        return
    roomy = roomy_input(kw.get("in_channels"), dims, kw)
    torch_ok = not refused(t_layer) and not refused(attempt(lambda: t_layer(roomy)))
    if not torch_ok:
        # refused now, or on the same roomy input
        result = o_layer if refused(o_layer) else attempt(lambda: o_layer(roomy))
        assert refused(result), f"{what}: torch refuses ({t_layer!r}), ours accepts"
        names = CONV_NAMES.get(bad, []) + (["input"] if not refused(o_layer) else [])
        assert_named_refusal(result, names, t_layer, what)
        return
    if quaternion_rule_broken(kw):
        assert refused(o_layer), f"{what}: breaks the quaternion channel rule, yet ours builds"
        # (a bool channel count, True == 1 to torch, is refused as a TypeError: "4.0 or True is refused")
        kind = TypeError if any(isinstance(kw.get(a), bool) for a in CHANNEL_ARGS) else ValueError
        assert isinstance(o_layer.error, kind), f"{what}: {o_layer!r}"
        assert_named_refusal(o_layer, ["in_channels", "out_channels"], what=what)
        return
    assert not refused(o_layer), f"{what}: torch accepts, ours refuses: {o_layer!r}"
    randomise(o_layer)
    o_roomy = attempt(lambda: o_layer(roomy))
    assert not refused(o_roomy), f"{what}: torch convolves a roomy input, ours refuses: {o_roomy!r}"
    x, output_size = data.draw(conv_inputs(dims, kw["in_channels"], kw, transposed), label="input")
    empty_batch = x.dim() == dims + 2 and x.shape[0] == 0
    fwd = (lambda m: m(x, output_size)) if transposed else (lambda m: m(x))
    want, got = attempt(lambda: fwd(t_layer)), attempt(lambda: fwd(o_layer))
    what += f" on input {tuple(x.shape)} {x.dtype}, output_size={output_size}"
    if refused(want):
        assert refused(got), f"{what}: torch refuses ({want!r}), ours accepts"
        assert_named_refusal(got, ["input", "output_size", "output size"], want, what)
        return
    channels = x.shape[1] if x.dim() == dims + 2 else x.shape[0] if x.dim() == dims + 1 else None
    # torch's meta kernel of a transposed conv checks no channel count (its conv's does); ours does, as torch does on
    # the CPU
    meta_channels = x.device.type == "meta" and transposed and channels != kw["in_channels"]
    other_dtype = x.dtype != module_dtype(kw) and (empty_batch or x.device.type == "meta")
    if refused(got) and (meta_channels or other_dtype):
        # torch checks no dtype for an empty batch (documented, README, Conventions: ours does;
        # test_empty_batch_of_another_dtype_refused), nor on the meta device without a bias
        # (test_meta_dtype_mismatch_refused_naming_the_input: ours refuses, naming the input's dtype)
        assert_named_refusal(got, ["input"], what=what)
        assert meta_channels or "dtype" in str(got.error), f"{what}: {got!r}"
        return
    # test_transposed_conv_output_of_size_zero_refused (torch returns an empty output with groups > 1)
    assume(not (transposed and refused(got) and "too small" in str(got.error) and want.numel() == 0))
    assert not refused(got), f"{what}: torch accepts, ours refuses: {got!r}"
    values = x.dtype in (F64, torch.float32) and x.device.type != "meta"
    if values:
        want = conv_values_via_twin(t_layer, o_layer, x, kw["groups"], transposed, output_size)
    assert_like_torch(got, want, values=values, what=what)


@grid(600)
@given(case=conv_configs(), data=st.data())
def test_conv_modules_like_torch(case, data):
    dims, transposed, kw, bad, positional = case
    assume(not torch_contradicts_itself(dims, kw))
    check_conv_case(dims, transposed, kw, bad, positional, data)


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular", "constant", "ZEROS", "", None])
@grid(4)
@given(data=st.data())
def test_padding_modes_like_torch(mode, data):
    """Every padding mode, valid or not, in every conv (the grid draws them one argument among many)."""
    for dims, transposed in CONV:
        kw = {"in_channels": 8, "out_channels": 4, "kernel_size": 3, "stride": 1, "padding": 1, "dilation": 1,
              "groups": 1, "bias": True, "padding_mode": mode, "device": None, "dtype": F64}  # fmt: skip
        if transposed:
            kw["output_padding"] = 0
        check_conv_case(dims, transposed, kw, "padding_mode", False, data)


@grid(60)
@given(
    dims=st.integers(1, 3),
    kernel=st.integers(1, 3),
    stride=st.integers(1, 3),
    padding=st.integers(0, 2),
    dilation=st.integers(1, 2),
    size=st.integers(1, 5),
    offsets=st.lists(st.sampled_from([-1, 0, 1, 2, 3]), min_size=3, max_size=3),
    unbatched=st.booleans(),
)
def test_transposed_output_size_edges_like_torch(dims, kernel, stride, padding, dilation, size, offsets, unbatched):
    """``output_size`` at and just outside the edges of torch's range, ``[min, min + stride - 1]``."""
    ours_cls, torch_cls = CONV[dims, True]
    kw = {"in_channels": 4, "out_channels": 8, "kernel_size": kernel, "stride": stride, "padding": padding,
          "dilation": dilation, "dtype": F64}  # fmt: skip
    twin, ours = torch_cls(**kw), ours_cls(**kw)
    randomise(ours)
    x = torch.randn(*(() if unbatched else (2,)), 4, *(size,) * dims, dtype=F64)
    low = (size - 1) * stride - 2 * padding + dilation * (kernel - 1) + 1
    output_size = [low + min(o, stride) - (o == 3) * (stride + 1) for o in offsets[:dims]]  # (3: low - 1)
    want, got = attempt(lambda: twin(x, output_size)), attempt(lambda: ours(x, output_size))
    what = f"{ours_cls.__name__}({kw}) on {tuple(x.shape)}, output_size={output_size}"
    if refused(want):
        assert refused(got), f"{what}: torch refuses ({want!r}), ours accepts"
        assert_named_refusal(got, ["input", "output_size", "output size"], want, what)
        return
    assume(not (refused(got) and "too small" in str(got.error) and want.numel() == 0))  # (as in the grid)
    assert not refused(got), f"{what}: torch accepts, ours refuses: {got!r}"
    assert_like_torch(got, conv_values_via_twin(twin, ours, x, 1, True, output_size), values=True, what=what)


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_same_padding_of_even_kernels_like_torch(mode, dims):
    """padding='same' of an even effective kernel (2; 4 dilated by 1 or 3) puts the odd element on the right, as
    torch does: values equal to torch's conv on the expanded weight, in every padding mode."""
    for kernel, dilation in ((2, 1), ((4, 2, 2)[:dims], (1, 3, 1)[:dims])):
        kw = {"in_channels": 4, "out_channels": 8, "kernel_size": kernel, "padding": "same", "dilation": dilation,
              "padding_mode": mode, "dtype": F64}  # fmt: skip
        ours_cls, torch_cls = CONV[dims, False]
        twin, ours = torch_cls(**kw), ours_cls(**kw)
        randomise(ours)
        x = torch.randn(2, 4, *(7, 6, 5)[:dims], dtype=F64)
        want = conv_values_via_twin(twin, ours, x, 1, False, None)
        assert_like_torch(ours(x), want, values=True, what=f"{ours_cls.__name__}({kw})")


# ---------------------------------------------------------------------------------------------------------------------
# linear
# ---------------------------------------------------------------------------------------------------------------------

LINEAR_ARGS = ["in_features", "out_features", "bias", "device", "dtype"]


@st.composite
def linear_configs(draw):
    kw = {"in_features": 4 * draw(st.integers(1, 3)), "out_features": 4 * draw(st.integers(1, 3)),
          "bias": draw(st.booleans()), "device": None, "dtype": F64}  # fmt: skip
    bad = draw(st.sampled_from([None, None, *LINEAR_ARGS]))
    if bad in ("in_features", "out_features"):
        kw[bad] = draw(CHANNEL_VALUES)  # (0: refused, test_zero_channels_refused; the quaternion rule below)
    elif bad == "bias":
        kw[bad] = draw(st.sampled_from([0, 1, None]))
    elif bad == "device":
        kw[bad] = draw(st.sampled_from(["cpu", torch.device("cpu")]))
    elif bad == "dtype":
        kw[bad] = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.int64, None, torch.complex64]))
    return kw, bad, draw(st.booleans())


@grid(100)
@given(case=linear_configs(), data=st.data())
def test_linear_like_torch(case, data):
    kw, bad, positional = case
    what = f"QuaternionLinear({kw}) [bad: {bad}]"
    t_layer = build(nn.Linear, kw, positional, nn.Linear)
    o_layer = build(qnn.QuaternionLinear, kw, positional, nn.Linear)
    if (
        isinstance(kw.get("dtype"), torch.dtype) and kw["dtype"].is_complex
    ):  # test_complex_dtype_refused_at_construction
        assert refused(o_layer) and isinstance(o_layer.error, TypeError), f"{what}: {o_layer!r}"
        assert_named_refusal(o_layer, ["dtype"], what=what)
        return
    roomy = torch.randn(3, kw["in_features"] if int_like(kw["in_features"]) and kw["in_features"] >= 0 else 4)
    roomy = roomy.to(module_dtype(kw)) if module_dtype(kw).is_floating_point else roomy
    if refused(t_layer) or refused(attempt(lambda: t_layer(roomy))):
        result = o_layer if refused(o_layer) else attempt(lambda: o_layer(roomy))
        assert refused(result), f"{what}: torch refuses ({t_layer!r}), ours accepts"
        assert_named_refusal(result, [bad or "?", "features", "input"], t_layer, what)
        return
    if quaternion_rule_broken(kw):
        assert refused(o_layer), f"{what}: breaks the quaternion channel rule, yet ours builds"
        assert_named_refusal(o_layer, ["in_features", "out_features"], what=what)
        return
    assert not refused(o_layer), f"{what}: torch accepts, ours refuses: {o_layer!r}"
    randomise(o_layer)
    lead = data.draw(st.lists(st.integers(0, 3), min_size=0, max_size=3), label="lead")
    features = kw["in_features"] if data.draw(st.integers(0, 3)) else data.draw(st.sampled_from([3, 6, 2 * 4 + 4 * 4]))
    shape = data.draw(st.sampled_from([[*lead, features], [*lead, features], []]), label="shape")
    x = torch.randn(shape, dtype=F64).to(module_dtype(kw))
    want, got = attempt(lambda: t_layer(x)), attempt(lambda: o_layer(x))
    what += f" on input {tuple(x.shape)}"
    if refused(want):
        assert refused(got), f"{what}: torch refuses ({want!r}), ours accepts"
        assert_named_refusal(got, ["input", "features"], want, what)
        return
    assert not refused(got), f"{what}: torch accepts, ours refuses: {got!r}"
    with torch.no_grad():
        t_layer.weight.copy_(expand_weight(o_layer.weight))
        if o_layer.bias is not None:
            t_layer.bias.copy_(o_layer.bias)
        want = t_layer(x)
    assert_like_torch(got, want, values=True, what=what)


def read_channels(shape, dims: int, unbatched_ok: bool = True, batch_norm_1d: bool = False):
    """The channel count of an input of ``shape`` as torch reads it (dim 0 unbatched, dim 1 batched); None for a rank
    torch refuses anyway."""
    if len(shape) == dims + 2 or (batch_norm_1d and len(shape) == 2):
        return shape[1]
    if len(shape) == dims + 1 and unbatched_ok:
        return shape[0]
    return None


# ---------------------------------------------------------------------------------------------------------------------
# batch and instance norms
# ---------------------------------------------------------------------------------------------------------------------

NORM_ARGS = ["num_features", "eps", "momentum", "affine", "track_running_stats", "device", "dtype", "bias"]


@st.composite
def norm_configs(draw):
    instance, dims = draw(st.booleans()), draw(st.integers(1, 3))
    kw = {"num_features": 4 * draw(st.integers(1, 3)), "eps": draw(st.sampled_from([1e-5, 1e-3, 0.1])),
          "momentum": draw(st.sampled_from([0.1, 0.0, 1.0, 0.5, None])), "affine": draw(st.booleans()),
          "track_running_stats": draw(st.booleans()), "device": None, "dtype": F64}  # fmt: skip
    if draw(st.booleans()):  # torch's keyword-only bias= (test_norm_bias_keyword_like_torch)
        kw["bias"] = draw(st.booleans())
    bad = draw(st.sampled_from([None, None, *NORM_ARGS]))
    if bad == "num_features":
        # (0 or not an int: refused, even where torch never reads it; test_zero_channels_refused)
        kw[bad] = draw(CHANNEL_VALUES)
    elif bad == "eps":
        # (<= 0 in a batch norm: refused like torch, test_batch_norm_eps_not_positive_refused_like_torch)
        kw[bad] = draw(st.sampled_from([0.0, -1e-3, 1, 1e-12]))
    elif bad == "momentum":
        # (outside [0, 1]: refused, documented; test_norm_momentum_outside_unit_interval_refused)
        kw[bad] = draw(st.sampled_from([None, 0, 1, 0.999, 1.5, -0.1, 1 + 1e-9]))
    elif bad in ("affine", "track_running_stats", "bias"):
        kw[bad] = draw(st.sampled_from([0, 1, None]))
    elif bad == "device":
        kw[bad] = draw(st.sampled_from(["cpu", torch.device("cpu")]))
    elif bad == "dtype":
        kw[bad] = draw(st.sampled_from([torch.float32, torch.bfloat16, None, torch.complex64]))
    return instance, dims, kw, bad, draw(st.booleans())


def documented_norm_refusal(kw: dict, bad) -> str | None:
    """The argument ours refuses where torch.nn may take it (README, Conventions, 'differ from torch.nn's on
    purpose'): a num_features that is not a positive multiple of 4, though a norm without parameters or running
    statistics never reads it in torch (test_zero_channels_refused, test_parameterless_norm_checks_the_channel_count);
    a momentum outside [0, 1] (test_norm_momentum_outside_unit_interval_refused); a complex dtype
    (test_complex_dtype_refused_at_construction)."""
    n, m, dtype = kw["num_features"], kw["momentum"], kw["dtype"]
    if bad == "num_features" and not (int_like(n) and n > 0 and n % 4 == 0):
        return "num_features"
    if m is not None and not 0 <= m <= 1:
        return "momentum"
    if isinstance(dtype, torch.dtype) and dtype.is_complex:
        return "dtype"
    return None


@grid(300)
@given(case=norm_configs(), data=st.data())
def test_norms_like_torch(case, data):
    instance, dims, kw, bad, positional = case
    ours_cls, torch_cls = (INSTANCE_NORM if instance else BATCH_NORM)[dims]
    what = f"{ours_cls.__name__}({kw}) [bad: {bad}]"
    t_layer = build(torch_cls, kw, positional, torch_cls)
    o_layer = build(ours_cls, kw, positional, torch_cls)
    refused_arg = documented_norm_refusal(kw, bad)
    if refused_arg is not None:  # documented (README, Conventions): ours refuses it whatever torch does
        assert refused(o_layer), f"{what}: {refused_arg} is refused as documented, yet ours builds"
        assert_named_refusal(o_layer, [refused_arg], what=what)
        return
    c = kw["num_features"] if int_like(kw["num_features"]) and kw["num_features"] >= 0 else 4
    roomy = torch.randn(2, c, *(3,) * dims, dtype=F64).to(module_dtype(kw))
    if refused(t_layer) or refused(attempt(lambda: t_layer(roomy))):
        result = o_layer if refused(o_layer) else attempt(lambda: o_layer(roomy))
        assert refused(result), f"{what}: torch refuses ({t_layer!r}), ours accepts"
        assert_named_refusal(result, [bad or "?", "input"], t_layer, what)
        return
    if quaternion_rule_broken(kw):
        assert refused(o_layer), f"{what}: breaks the quaternion channel rule, yet ours builds"
        assert_named_refusal(o_layer, ["num_features"], what=what)
        return
    assert not refused(o_layer), f"{what}: torch accepts, ours refuses: {o_layer!r}"
    for name in ("weight", "bias", "running_mean", "running_var"):  # the same parameters and buffers as torch's
        assert (getattr(o_layer, name) is None) == (getattr(t_layer, name) is None), f"{what}: {name}"
    training = data.draw(st.booleans(), label="training")
    t_layer.train(training)
    o_layer.train(training)
    rank = data.draw(st.sampled_from(["batched", "batched", "unbatched", "low", "high"]), label="rank")
    good = kw["num_features"]
    channels = good if data.draw(st.integers(0, 2)) else data.draw(st.sampled_from([good + 4, good + 4, 6, 3]))
    batch = data.draw(st.integers(0, 3), label="batch")
    spatial = data.draw(st.lists(st.integers(0, 3), min_size=dims, max_size=dims), label="spatial")
    if dims == 1 and not instance and data.draw(st.booleans()):
        spatial = []  # BatchNorm1d's (N, C)
    shape = {"batched": [batch, channels, *spatial], "unbatched": [channels, *spatial],
             "low": [batch, channels, *spatial][:-1], "high": [batch, channels, *spatial, 2]}[rank]  # fmt: skip
    read = read_channels(shape, dims, unbatched_ok=instance, batch_norm_1d=dims == 1 and not instance)
    x = torch.randn(shape, dtype=F64).to(module_dtype(kw))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (InstanceNorm warns where num_features goes unread)
        want = attempt(lambda: t_layer(x))
    got = attempt(lambda: o_layer(x))
    what += f" ({'train' if training else 'eval'}) on input {tuple(x.shape)}"
    if refused(got) and not refused(want) and read is not None and read != good:
        # documented (README, Conventions): ours checks the channel count against num_features where torch reads
        # none (no parameters or running statistics: test_parameterless_norm_checks_the_channel_count; an empty
        # input: test_empty_input_of_another_channel_count_refused)
        assert not (kw["affine"] or kw["track_running_stats"]) or instance or x.numel() == 0, what
        assert_named_refusal(got, ["input"], what=what)
        return
    if refused(want) and not refused(got) and instance and x.numel() == 0:
        # documented (README, Conventions): an instance norm in training (or in eval by the input's statistics)
        # returns an empty batch empty, where torch refuses one of one spatial element
        # (test_instance_norm_returns_an_empty_batch_in_training); the same for
        # an input with no element at all, on which torch's instance norm crashes (IndexError from an internal
        # select on the empty tensor, in training or eval: not a check of torch's)
        crash = isinstance(want.error, IndexError) and "out of range for tensor of size [0]" in str(want.error)
        by_instance = training or not kw["track_running_stats"]  # (torch's eval without running stats: as training)
        assert crash or (by_instance and "spatial element" in str(want.error)), f"{what}: {want!r}"
        assert got.shape == x.shape and got.dtype == x.dtype, what
        return
    if refused(want):
        assert refused(got), f"{what}: torch refuses ({want!r}), ours accepts"
        assert_named_refusal(got, ["input", "expected more than 1"], want, what)
        return
    if read is not None and read % 4:
        assert refused(got), f"{what}: input breaks the quaternion rule, yet ours normalises it"
        assert_named_refusal(got, ["input"], what=what)
        return
    assert not refused(got), f"{what}: torch accepts, ours refuses: {got!r}"
    assert_like_torch(got, want, values=False, what=what)


@pytest.mark.parametrize("norm", [*BATCH_NORM.values(), *INSTANCE_NORM.values()], ids=lambda p: p[0].__name__)
@pytest.mark.parametrize("affine, track", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("training", [True, False])
def test_norm_channel_count_like_torch(norm, affine, track, training):
    """An input of num_features + 4 channels (whole quaternions, the wrong count) into a norm with parameters or running
    statistics: torch refuses it (the parameterless case: test_parameterless_norm_checks_the_channel_count), ours too,
    naming the input."""
    ours_cls, torch_cls = norm
    dims = ours_cls._ranks[-1] - 2
    kw = {"num_features": 8, "affine": affine, "track_running_stats": track, "dtype": F64}
    twin, ours = torch_cls(**kw).train(training), ours_cls(**kw).train(training)
    x = torch.randn(2, 12, *(3,) * dims, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = attempt(lambda: twin(x))
    got = attempt(lambda: ours(x))
    if not refused(want):  # (an instance norm without affine parameters in training: torch never reads the stats)
        assert torch_cls in (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d) and not affine and training
        return
    assert refused(got), f"{ours_cls.__name__}({kw}): torch refuses {tuple(x.shape)} ({want!r}), ours accepts"
    assert_named_refusal(got, ["input"], want, ours_cls.__name__)


# ---------------------------------------------------------------------------------------------------------------------
# pooling and dropout
# ---------------------------------------------------------------------------------------------------------------------


@st.composite
def pool_configs(draw):
    """Max or average, 1d-3d: a valid configuration (kernel 1-3, stride None or 1-3, padding to half the kernel,
    dilation 1-2, the flags), then (usually) one argument replaced by anything."""
    kind, dims = draw(st.sampled_from(["max", "avg"])), draw(st.integers(1, 3))
    k = draw(st.integers(1, 4))
    kw = {"kernel_size": k, "stride": draw(st.sampled_from([None, 1, 2, 3, 3])),
          "padding": draw(st.integers(0, k // 2)), "ceil_mode": draw(st.booleans())}  # fmt: skip
    if kind == "max":
        kw["dilation"], kw["return_indices"] = draw(st.integers(1, 2)), draw(st.booleans())
    else:
        kw["count_include_pad"] = draw(st.booleans())
        if dims > 1:
            kw["divisor_override"] = draw(st.sampled_from([None, None, 1, 3]))
    args = [a for a in kw if a not in ("ceil_mode",)] + ["ceil_mode"]
    bad = draw(st.sampled_from([None, None, *args, "divisor_override" if kind == "avg" else "dilation"]))
    if bad in ("kernel_size", "stride", "padding", "dilation"):
        # (stride=() in a max pool: refused, documented; test_max_pool_empty_stride_refused)
        kw[bad] = draw(st.one_of(int_or_tuple(-1, 4, dims), st.sampled_from([1.5, "2", (2.0,)])))
    elif bad == "divisor_override":
        kw[bad] = draw(st.sampled_from([0, -1, 2, 2.5]))
    elif bad is not None:
        kw[bad] = draw(st.sampled_from([0, 1, None]))
    # The positional order is torch's; ours is the same (test_signatures_like_torch)
    return kind, dims, kw, bad, draw(st.booleans())


@grid(300)
@given(case=pool_configs(), data=st.data())
def test_pools_like_torch(case, data):
    kind, dims, kw, bad, positional = case
    ours_cls, torch_cls = (MAX_POOL if kind == "max" else AVG_POOL)[dims]
    what = f"{ours_cls.__name__}({kw}) [bad: {bad}]"
    t_layer = build(torch_cls, kw, positional, torch_cls)
    o_layer = build(ours_cls, kw, positional, torch_cls)
    roomy = torch.randn(2, 8, *(9,) * dims, dtype=F64)
    if kind == "max" and kw.get("stride") == ():
        # documented (README, Conventions): a max pool's stride is not () (test_max_pool_empty_stride_refused)
        result = o_layer if refused(o_layer) else attempt(lambda: o_layer(roomy))
        assert refused(result), f"{what}: stride=() is refused as documented, yet ours pools"
        assert_named_refusal(result, ["stride"], what=what)
        return
    t_roomy = t_layer if refused(t_layer) else attempt(lambda: t_layer(roomy))
    if refused(t_roomy):
        result = o_layer if refused(o_layer) else attempt(lambda: o_layer(roomy))
        assert refused(result), f"{what}: torch refuses ({t_roomy!r}), ours accepts"
        # (padding against the kernel: ours leaves torch's max_pool to refuse it, "pad should be smaller than or equal
        # to half of kernel size", whichever of the two the draw made bad)
        names = {"padding": ["padding", "pad "], "divisor_override": ["divisor"]}.get(bad, [bad or "?", "pad "])
        assert_named_refusal(result, names, t_roomy, what)
        return
    assert not refused(o_layer), f"{what}: torch accepts, ours refuses: {o_layer!r}"
    o_roomy = attempt(lambda: o_layer(roomy))
    if refused(o_roomy) and kind == "max" and "holds only padding" in str(o_roomy.error):
        return  # documented, see below
    assert not refused(o_roomy), f"{what}: torch pools a roomy input, ours refuses: {o_roomy!r}"
    rank = data.draw(st.sampled_from(["batched", "batched", "unbatched", "low", "high"]), label="rank")
    channels = 8 if data.draw(st.integers(0, 4)) else data.draw(st.sampled_from([4, 6, 3, 0]))
    batch = data.draw(st.integers(0, 2), label="batch")
    spatial = data.draw(st.lists(st.integers(0, 8), min_size=dims, max_size=dims), label="spatial")
    shape = {"batched": [batch, channels, *spatial], "unbatched": [channels, *spatial],
             "low": [batch, channels, *spatial][:-1], "high": [batch, channels, *spatial, 2]}[rank]  # fmt: skip
    x = torch.randn(shape, dtype=F64)
    want, got = attempt(lambda: t_layer(x)), attempt(lambda: o_layer(x))
    what += f" on input {tuple(x.shape)}"
    if refused(want):
        assert refused(got), f"{what}: torch refuses ({want!r}), ours accepts"
        assert_named_refusal(got, ["input"], want, what)
        return
    read = read_channels(shape, dims)
    if read is not None and (read % 4 or read == 0):
        assert refused(got), f"{what}: input breaks the quaternion rule, yet ours pools it"
        assert_named_refusal(got, ["input"], what=what)
        return
    if refused(got) and kind == "max" and "holds only padding" in str(got.error):
        # Documented (nn/pool.py, _check_pool_output): "a window that holds no input element, only padding (a
        # dilation with padding can make one), has no quaternion to select, where torch's max pool returns -inf"
        torch_out = want[0] if isinstance(want, tuple) else want
        assert torch_out.numel() == 0 or torch_out.isneginf().any(), what
        return
    assert not refused(got), f"{what}: torch accepts, ours refuses: {got!r}"
    assert_like_torch(got, want, values=kind == "avg", what=what)


@grid(60)
@given(
    p=st.one_of(st.floats(-0.5, 1.5), st.sampled_from([0, 1, 0.0, 1.0, -1e-9, 1 + 1e-9])),
    inplace=st.booleans(),
    training=st.booleans(),
    shape=st.lists(st.integers(0, 9), min_size=0, max_size=4),
)
def test_dropout_like_torch(p, inplace, training, shape):
    what = f"QuaternionDropout(p={p}, inplace={inplace}) ({'train' if training else 'eval'}) on {shape}"
    t_layer, o_layer = attempt(lambda: nn.Dropout(p, inplace)), attempt(lambda: qnn.QuaternionDropout(p, inplace))
    if refused(t_layer):
        assert refused(o_layer), f"{what}: torch refuses ({t_layer!r}), ours accepts"
        assert_named_refusal(o_layer, ["probability", "p "], t_layer, what)
        return
    assert not refused(o_layer), f"{what}: torch accepts, ours refuses: {o_layer!r}"
    t_layer.train(training)
    o_layer.train(training)
    x = torch.randn(shape, dtype=F64)
    want, got = attempt(lambda: t_layer(x.clone())), attempt(lambda: o_layer(x.clone()))
    channel_dim = 0 if len(shape) == 1 else 1
    if refused(want):
        assert refused(got), f"{what}: torch refuses ({want!r}), ours accepts"
        return
    if len(shape) <= channel_dim or shape[channel_dim] % 4 or shape[channel_dim] == 0:
        # the quaternion rule: a channel dim (dim 1, or dim 0 of one vector) of whole quaternions
        assert refused(got), f"{what}: input has no quaternion channels, yet ours drops"
        assert_named_refusal(got, ["input"], what=what)
        return
    assert not refused(got), f"{what}: torch accepts, ours refuses: {got!r}"
    assert_like_torch(got, want, values=not training or p == 0, what=what)


# ---------------------------------------------------------------------------------------------------------------------
# the functional API
# ---------------------------------------------------------------------------------------------------------------------


@st.composite
def functional_conv_cases(draw):
    """A functional (transposed) conv: a weight ``(4, A, B, *k)``, a matching batched input, the geometry as
    :func:`conv_configs` draws it, usually one argument (or the input's channel count) made bad."""
    dims, transposed = draw(st.integers(1, 3)), draw(st.booleans())
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    a, b = groups * draw(st.integers(1, 2)), draw(st.integers(1, 2))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    weight = torch.randn(4, a, b, *kernel, dtype=F64)
    cin = 4 * a if transposed else 4 * b * groups
    cout = 4 * b * groups if transposed else 4 * a
    bias = torch.randn(cout, dtype=F64) if draw(st.booleans()) else None
    kw = {"stride": draw(st.sampled_from([1, 2, (1, 2, 1)[:dims]])), "padding": draw(st.sampled_from([0, 1])),
          "dilation": draw(st.sampled_from([1, 2])), "groups": groups}  # fmt: skip
    if transposed:
        kw["output_padding"] = 0
    elif draw(st.booleans()):
        kw["padding"], kw["stride"] = draw(st.sampled_from(["same", "valid"])), 1
    bad = draw(st.sampled_from([None, None, "input", *kw]))
    if bad in ("stride", "padding", "dilation", "output_padding"):
        kw[bad] = draw(geometry_values(bad, dims))
    elif bad == "groups":
        kw[bad] = draw(st.one_of(st.integers(-1, 5), st.sampled_from([2.0, True, None])))
    size = draw(st.lists(st.integers(1, 7), min_size=dims, max_size=dims))
    channels = cin if bad != "input" else draw(st.sampled_from([cin + 4, 3, cin + 1]))
    # unbatched (C, *spatial) sometimes, as F.conv*d takes it (test_functional_conv_takes_unbatched_input_like_torch)
    batch = draw(st.sampled_from([(1,), (2,), (2,), ()]))
    x = torch.randn(*batch, channels, *size, dtype=F64)
    return dims, transposed, x, weight, bias, kw, bad


def functional_twin(dims, transposed, x, weight, bias, kw):
    """torch's functional conv on the expanded weight, channels group-major where the groups hold whole
    quaternions (else the plain expansion, on which torch's own checks decide); an unbatched input given to torch
    unbatched."""
    _, f_torch = QF_CONV[dims, transposed]
    g = kw["groups"]
    unbatched = x.dim() == dims + 1
    c = x.shape[0 if unbatched else 1]
    grouped = int_like(g) and g >= 1 and weight.shape[1] % g == 0 and c % (4 * g) == 0
    w = expand_weight_grouped(weight, g) if grouped else expand_weight(weight)
    bb = bias if bias is None or not grouped else to_group_major(bias.view(1, -1), g).view(-1)
    args = [kw[k] for k in (("stride", "padding", "output_padding", "groups", "dilation") if transposed
                            else ("stride", "padding", "dilation", "groups"))]  # fmt: skip
    if not grouped:
        return f_torch(x, w, bb, *args)
    xg = to_group_major(x.unsqueeze(0) if unbatched else x, g)
    y = f_torch(xg.squeeze(0) if unbatched else xg, w, bb, *args)  # (unbatched to torch as given)
    y = from_group_major(y.unsqueeze(0) if unbatched else y, g)
    return y.squeeze(0) if unbatched else y


@grid(200)
@given(case=functional_conv_cases())
def test_functional_convs_like_torch(case):
    dims, transposed, x, weight, bias, kw, bad = case
    f_ours, _ = QF_CONV[dims, transposed]
    what = f"{f_ours.__name__}(x {tuple(x.shape)}, w {tuple(weight.shape)}, bias={bias is not None}, {kw}) [bad: {bad}]"
    want = attempt(lambda: functional_twin(dims, transposed, x, weight, bias, kw))
    got = attempt(lambda: f_ours(x, weight, bias, **kw))
    g = kw["groups"]
    refused_arg = documented_conv_refusal(dims, {**kw, "padding_mode": "zeros"})
    if refused_arg is not None:
        # a bool in a geometry argument, which F.conv_transpose*d takes in a tuple: refused as the layers refuse it
        # (README, Conventions, 'differ from torch.nn's on purpose'; the same parser, params.int_tuple)
        assert refused(got), f"{what}: {refused_arg} is refused as documented, yet ours convolves"
        assert_named_refusal(got, [refused_arg], what=what)
        return
    if refused(want):
        assert refused(got), f"{what}: torch refuses ({want!r}), ours accepts"
        assert_named_refusal(got, [bad or "?", "input", "weight", "groups", "bias"], want, what)
        return
    if int_like(g) and g >= 1 and weight.shape[1] % g:  # torch groups the 4A rows; ours wants whole quaternions
        assert refused(got), f"{what}: groups split quaternions, yet ours convolves"
        assert_named_refusal(got, ["groups"], what=what)
        return
    assert not refused(got), f"{what}: torch accepts, ours refuses: {got!r}"
    assert_like_torch(got, want, values=True, what=what)


@grid(40)
@given(
    a=st.integers(1, 3),
    b=st.integers(1, 3),
    lead=st.lists(st.integers(0, 3), min_size=0, max_size=3),
    features=st.sampled_from(["right", "right", 3, 6]),
    with_bias=st.booleans(),
)
def test_functional_linear_like_torch(a, b, lead, features, with_bias):
    weight = torch.randn(4, a, b, dtype=F64)
    bias = torch.randn(4 * a, dtype=F64) if with_bias else None
    x = torch.randn(*lead, 4 * b if features == "right" else features, dtype=F64)
    want = attempt(lambda: F.linear(x, expand_weight(weight), bias))
    got = attempt(lambda: QF.quaternion_linear(x, weight, bias))
    what = f"quaternion_linear(x {tuple(x.shape)}, w {tuple(weight.shape)})"
    if refused(want):
        assert refused(got), f"{what}: torch refuses ({want!r}), ours accepts"
        assert_named_refusal(got, ["input", "features"], want, what)
        return
    assert not refused(got), f"{what}: torch accepts, ours refuses: {got!r}"
    assert_like_torch(got, want, values=True, what=what)


# ---------------------------------------------------------------------------------------------------------------------
# signatures
# ---------------------------------------------------------------------------------------------------------------------

PAIRS = [*CONV.values(), (qnn.QuaternionLinear, nn.Linear), *BATCH_NORM.values(), *INSTANCE_NORM.values(),
         *MAX_POOL.values(), *AVG_POOL.values(), (qnn.QuaternionDropout, nn.Dropout)]  # fmt: skip


@pytest.mark.parametrize("ours, twin", PAIRS, ids=[o.__name__ for o, _ in PAIRS])
def test_signatures_like_torch(ours, twin):
    """torch's positional-or-keyword parameters, in torch's order, with torch's defaults (our extras are keyword-only,
    after them)."""
    mine = [p for p in inspect.signature(ours.__init__).parameters.values() if p.name != "self"]
    theirs = [p for p in inspect.signature(twin.__init__).parameters.values() if p.name != "self"]
    positional = [p for p in mine if p.kind is p.POSITIONAL_OR_KEYWORD]
    their_positional = [p for p in theirs if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert [p.name for p in positional] == [p.name for p in their_positional], (mine, theirs)
    for m, t in zip(positional, their_positional, strict=True):
        assert m.default == t.default or (m.default is None and t.default is None), (m, t)
    assert all(p.kind is p.KEYWORD_ONLY for p in mine[len(positional) :])
    keyword_only = {p.name: p.default for p in mine if p.kind is p.KEYWORD_ONLY}
    for t in theirs:
        if t.kind is t.KEYWORD_ONLY:  # (the norms' bias=: test_norm_bias_keyword_like_torch)
            assert keyword_only.get(t.name, "missing") == t.default, (t, keyword_only)


@pytest.mark.parametrize("norm", [*BATCH_NORM.values(), *INSTANCE_NORM.values()], ids=lambda p: p[0].__name__)
@pytest.mark.parametrize("affine", [True, False])
def test_norm_bias_keyword_like_torch(norm, affine):
    """torch's norms (2.13) take a keyword-only bias=True; affine=True, bias=False is a scale without a shift (no bias
    parameter). Ours take it too (README, Conventions, 'differ from torch.nn's on purpose': 'The norms take torch's
    keyword-only bias=False'): the same parameters, and the output of bias=True with a zero bias."""
    ours_cls, torch_cls = norm
    dims = ours_cls._ranks[-1] - 2
    twin = torch_cls(8, affine=affine, bias=False, dtype=F64)
    ours = ours_cls(8, affine=affine, bias=False, dtype=F64)
    assert twin.bias is None and ours.bias is None
    assert (twin.weight is None) == (ours.weight is None) == (not affine)
    assert "bias" not in dict(ours.named_parameters()) and "bias" not in ours.state_dict()
    full = ours_cls(8, affine=affine, dtype=F64)
    randomise(ours)
    state = {**ours.state_dict(), **({"bias": torch.zeros(8, dtype=F64)} if affine else {})}
    full.load_state_dict(state)
    x = torch.randn(3, 8, *(4,) * dims, dtype=F64)
    y = ours(x)
    assert_like_torch(y, twin(x), values=False, what=f"{ours_cls.__name__}(bias=False)")
    torch.testing.assert_close(y, full(x))
    if affine:
        y.square().sum().backward()
        assert ours.weight.grad is not None and ours.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------------------
# where ours follows torch.nn after a fix: one minimal case each (the grid draws these too)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("transposed", [False, True])
def test_conv_zero_spatial_size_refused_like_torch(transposed):
    """An input with a zero spatial size and a non-empty batch: torch refuses every such input ('Only zero batch or
    zero channel inputs are supported'), even where the padding makes room; ours too, naming the input."""
    x = torch.randn(1, 4, 0, 5)
    twin, ours_cls = (
        (nn.ConvTranspose2d, qnn.QuaternionConvTranspose2d) if transposed else (nn.Conv2d, qnn.QuaternionConv2d)
    )
    want = attempt(lambda: twin(4, 4, 1, padding=1)(x))
    assert refused(want)
    ours = attempt(lambda: ours_cls(4, 4, 1, padding=1)(x))
    assert refused(ours), f"torch refuses, ours returns {getattr(ours, 'shape', ours)}"
    assert_named_refusal(ours, ["input"], want, "zero spatial size")
    if not transposed:  # an empty batch: returned empty, as torch does
        empty = torch.randn(0, 4, 0, 5)
        assert ours_cls(4, 4, 1, padding=1)(empty).shape == twin(4, 4, 1, padding=1)(empty).shape


def test_meta_dtype_mismatch_refused_naming_the_input():
    """On the meta device, an input of another dtype than the layer's: torch refuses ('Input type (float) and bias
    type (double) should be the same'); ours too, naming the input's dtype (not autocast)."""
    x = torch.randn(1, 4, 5, 5, device="meta")
    want = attempt(lambda: nn.Conv2d(4, 4, 3, device="meta", dtype=F64)(x))
    assert refused(want)
    ours = attempt(lambda: qnn.QuaternionConv2d(4, 4, 3, device="meta", dtype=F64)(x))
    assert refused(ours) and "autocast" not in str(ours.error), f"ours: {ours!r}"
    assert_named_refusal(ours, ["input"], what="meta dtype mismatch")
    assert "dtype" in str(ours.error), ours


@pytest.mark.parametrize(
    "make, twin",
    [
        (
            lambda d: qnn.QuaternionConv2d(4, 4, 3, dtype=d),
            lambda d: nn.Conv2d(4, 4, 3, dtype=d)(torch.randn(1, 4, 5, 5, dtype=d)),
        ),
        (
            lambda d: qnn.QuaternionConvTranspose1d(4, 4, 3, dtype=d),
            lambda d: nn.ConvTranspose1d(4, 4, 3, dtype=d)(torch.randn(1, 4, 5, dtype=d)),
        ),
        (lambda d: qnn.QuaternionLinear(4, 8, dtype=d), lambda d: nn.Linear(4, 8, dtype=d)(torch.randn(3, 4, dtype=d))),
        (lambda d: qnn.QuaternionBatchNorm1d(4, dtype=d), None),
    ],
    ids=["conv2d", "conv_transpose1d", "linear", "batch_norm1d"],
)
@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_complex_dtype_refused_at_construction(make, twin, dtype):
    """A complex dtype: torch.nn's complex conv and linear run; a quaternion layer's components are real, so ours
    refuses the dtype in the constructor with a TypeError naming it (before: a complex layer that then refused
    every input)."""
    if twin is not None:
        assert twin(dtype).dtype == dtype
    ours = attempt(lambda: make(dtype))
    assert refused(ours) and isinstance(ours.error, TypeError), f"ours: {ours!r}"
    assert_named_refusal(ours, ["dtype"], what="complex dtype")
    assert str(dtype) in str(ours.error), ours


@pytest.mark.parametrize("eps", [0.0, -1e-3])
@pytest.mark.parametrize("training, track", [(True, True), (True, False), (False, True), (False, False)])
def test_batch_norm_eps_not_positive_refused_like_torch(eps, training, track):
    """A batch norm's eps <= 0: torch refuses it where it normalises by the batch's statistics ('batch_norm eps must
    be positive during training') and a negative one always; ours refuses the same calls with a ValueError naming
    eps, and normalises by the running statistics with eps = 0 in eval, as torch does."""
    x = torch.randn(2, 8, 3, 3, dtype=F64)
    twin = nn.BatchNorm2d(8, eps=eps, track_running_stats=track, dtype=F64).train(training)
    ours = qnn.QuaternionBatchNorm2d(8, eps=eps, track_running_stats=track, dtype=F64).train(training)
    want, got = attempt(lambda: twin(x)), attempt(lambda: ours(x))
    assert refused(want) == (eps < 0 or training or not track), want
    if refused(want):
        assert refused(got), f"torch refuses eps={eps}, ours normalises"
        assert isinstance(got.error, ValueError), got
        assert_named_refusal(got, ["eps"], what=f"eps={eps}")
    else:
        assert not refused(got), f"torch accepts, ours refuses: {got!r}"
        assert_like_torch(got, want, values=False, what=f"eps={eps}")


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("transposed", [False, True])
def test_functional_conv_takes_unbatched_input_like_torch(dims, transposed):
    """An unbatched (C, *spatial) input to a functional conv: F.conv*d / F.conv_transpose*d convolve it as a batch of
    one and drop the batch dim; ours too, with torch's values on the expanded weight."""
    f_ours, f_torch = QF_CONV[dims, transposed]
    x = torch.randn(8, *(5, 4, 3)[:dims], dtype=F64)
    # 8 real channels in, 4 out: (4, out/4, in/4, *k), or (4, in/4, out/4, *k) transposed
    w = torch.randn(4, *((2, 1) if transposed else (1, 2)), *(3, 2, 1)[:dims], dtype=F64)
    bias = torch.randn(4, dtype=F64)
    want = f_torch(x, expand_weight(w), bias, stride=2 if transposed else 1, padding=1)
    ours = attempt(lambda: f_ours(x, w, bias, stride=2 if transposed else 1, padding=1))
    assert not refused(ours), f"torch accepts, ours refuses: {ours!r}"
    assert_like_torch(ours, want, values=True, what=f"{f_ours.__name__} unbatched")
    batched = f_ours(x.unsqueeze(0), w, bias, stride=2 if transposed else 1, padding=1)
    torch.testing.assert_close(ours, batched.squeeze(0))  # ('auto' may pick another algorithm: not bit for bit)


# ---------------------------------------------------------------------------------------------------------------------
# where ours differs from torch.nn on purpose: README, Conventions, "Where the layers differ from torch.nn's on
# purpose." Each test asserts the documented behaviour (ours) next to torch's (so a change in torch is noticed); the
# grid asserts the same for the draws that reach these cases.
# ---------------------------------------------------------------------------------------------------------------------


def test_one_element_kernel_size_repeated_for_2d_3d_layers():
    """README (Conventions, 'differ from torch.nn's on purpose'): 'a one-element kernel_size (like stride, padding and
    dilation in torch's own functional convs) is repeated for every dim'. torch.nn keeps it as given and refuses the
    layer (a 1-d kernel for a 2d conv)."""
    x = torch.randn(2, 4, 7, 7, dtype=F64)
    assert refused(attempt(lambda: nn.Conv2d(4, 4, (3,), dtype=F64)(x)))
    ours = qnn.QuaternionConv2d(4, 4, (3,), dtype=F64)
    full = qnn.QuaternionConv2d(4, 4, (3, 3), dtype=F64)
    randomise(ours)
    full.load_state_dict(ours.state_dict())
    assert ours.weight.shape == full.weight.shape
    torch.testing.assert_close(ours(x), full(x))


def test_negative_padding_with_padding_mode_refused():
    """README (Conventions, 'differ from torch.nn's on purpose'): 'a padding is never negative, whatever the padding
    mode'. torch.nn crops with a negative padding in 'reflect'/'replicate'/'circular' (F.pad) and convolves."""
    x = torch.randn(2, 4, 11, 11)
    for mode in ("reflect", "replicate", "circular"):
        assert nn.Conv2d(4, 4, 3, padding=-1, padding_mode=mode)(x).shape == (2, 4, 7, 7)
        ours = attempt(lambda mode=mode: qnn.QuaternionConv2d(4, 4, 3, padding=-1, padding_mode=mode))
        assert refused(ours), f"{mode}: ours builds a conv with padding=-1"
        assert_named_refusal(ours, ["padding"], what=f"padding=-1, {mode}")


@pytest.mark.parametrize("arg", ["kernel_size", "stride", "padding", "dilation"])
def test_bool_geometry_refused(arg):
    """README (Conventions, 'differ from torch.nn's on purpose'): 'a bool is not taken for a size, stride, padding or
    dilation'. torch.nn takes kernel_size=True as 1 (a bool is an int; its functional convs refuse a bool stride,
    padding or dilation, as ours does)."""
    x = torch.randn(2, 8, 5)
    kw = {"kernel_size": 1, arg: True}
    for twin in (nn.Conv1d, nn.ConvTranspose1d):
        want = attempt(lambda twin=twin: twin(8, 4, **kw)(x))
        assert refused(want) == (arg != "kernel_size"), want
        if not refused(want):
            assert want.shape == (2, 4, 5)
    for ours_cls in (qnn.QuaternionConv1d, qnn.QuaternionConvTranspose1d):
        ours = attempt(lambda ours_cls=ours_cls: ours_cls(8, 4, **kw))
        assert refused(ours) and isinstance(ours.error, TypeError), f"ours: {ours!r}"
        assert_named_refusal(ours, [arg], what=f"{arg}=True")


def test_empty_batch_of_another_dtype_refused():
    """README (Conventions, 'differ from torch.nn's on purpose'): 'a conv checks the input's dtype against its
    weight's even for an empty batch'. torch.nn's conv returns an empty output without checking dtypes."""
    x = torch.randn(0, 4, 5, 5, dtype=torch.float32)
    assert nn.Conv2d(4, 4, 3, bias=False, dtype=F64)(x).shape == (0, 4, 3, 3)
    ours = attempt(lambda: qnn.QuaternionConv2d(4, 4, 3, bias=False, dtype=F64)(x))
    assert refused(ours), f"ours returns {getattr(ours, 'shape', ours)}"
    assert_named_refusal(ours, ["input"], what="empty batch of another dtype")
    assert qnn.QuaternionConv2d(4, 4, 3, bias=False, dtype=F64)(x.double()).shape == (0, 4, 3, 3)


def test_zero_channels_refused():
    """README (Conventions, 'differ from torch.nn's on purpose'): 'channel counts are positive multiples of 4 (0 is
    refused)'. torch.nn builds Conv2d(0, 4, 3), Linear(0, 4), BatchNorm1d(0) (and convolves a zero-channel input)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert nn.Linear(0, 4)(torch.randn(3, 0)).shape == (3, 4)
        assert not refused(attempt(lambda: nn.Conv2d(0, 4, 3)(torch.randn(2, 0, 5, 5))))
        assert nn.Conv2d(4, 0, 3).weight.shape[0] == 0
        assert nn.BatchNorm1d(0).weight.shape == (0,)
    for arg, make in [
        ("in_channels", lambda: qnn.QuaternionConv2d(0, 4, 3)),
        ("out_channels", lambda: qnn.QuaternionConv2d(4, 0, 3)),
        ("in_channels", lambda: qnn.QuaternionConvTranspose2d(0, 4, 3)),
        ("in_features", lambda: qnn.QuaternionLinear(0, 4)),
        ("out_features", lambda: qnn.QuaternionLinear(4, 0)),
        ("num_features", lambda: qnn.QuaternionBatchNorm1d(0)),
        ("num_features", lambda: qnn.QuaternionInstanceNorm2d(0)),
    ]:
        ours = attempt(make)
        assert refused(ours) and isinstance(ours.error, ValueError), f"{arg}=0: {ours!r}"
        assert_named_refusal(ours, [arg], what=f"{arg}=0")


def test_instance_norm_returns_an_empty_batch_in_training():
    """README (Conventions, 'differ from torch.nn's on purpose'): 'an instance norm in training returns an empty batch
    empty'. torch refuses one of one spatial element ('Expected more than 1 spatial element when training')."""
    x = torch.randn(0, 4, 1)
    assert refused(attempt(lambda: nn.InstanceNorm1d(4)(x)))
    for affine in (False, True):
        ours = attempt(lambda affine=affine: qnn.QuaternionInstanceNorm1d(4, affine=affine)(x))
        assert not refused(ours), f"ours: {ours!r}"
        assert ours.shape == x.shape and ours.dtype == x.dtype


def test_empty_input_of_another_channel_count_refused():
    """README (Conventions, 'differ from torch.nn's on purpose'): 'a norm checks the input's channel count against
    num_features ... even for an empty input'. torch's batch norm returns an empty input unchecked."""
    x = torch.randn(1, 8, 3, 0)
    assert nn.BatchNorm2d(4)(x).shape == (1, 8, 3, 0)
    ours = attempt(lambda: qnn.QuaternionBatchNorm2d(4)(x))
    assert refused(ours), f"ours returns {getattr(ours, 'shape', ours)}"
    assert_named_refusal(ours, ["input"], what="empty input, 8 channels into num_features=4")


def test_parameterless_norm_checks_the_channel_count():
    """README (Conventions, 'differ from torch.nn's on purpose'): 'a norm checks the input's channel count against
    num_features even when it has no parameters or running statistics'. torch never reads num_features there
    (InstanceNorm warns), so any channel count passes."""
    x = torch.randn(2, 4, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert nn.InstanceNorm1d(8)(x).shape == (2, 4, 5)
    assert nn.BatchNorm1d(4, affine=False, track_running_stats=False)(torch.randn(2, 8)).shape == (2, 8)
    for make, inp in [
        (lambda: qnn.QuaternionInstanceNorm1d(8), x),
        (lambda: qnn.QuaternionBatchNorm1d(4, affine=False, track_running_stats=False), torch.randn(2, 8)),
    ]:
        ours = attempt(lambda make=make, inp=inp: make()(inp))
        assert refused(ours), f"ours returns {getattr(ours, 'shape', ours)}"
        assert_named_refusal(ours, ["input"], what="parameterless norm, another channel count")


@pytest.mark.parametrize("momentum", [1.5, -0.1, 1 + 1e-9])
def test_norm_momentum_outside_unit_interval_refused(momentum):
    """README (Conventions, 'differ from torch.nn's on purpose'): 'a norm's momentum lies in [0, 1]'. torch.nn's norms
    take any momentum."""
    x = torch.randn(3, 8, dtype=F64)
    assert nn.BatchNorm1d(8, momentum=momentum, dtype=F64)(x).shape == (3, 8)
    for make in (qnn.QuaternionBatchNorm1d, qnn.QuaternionInstanceNorm1d):
        ours = attempt(lambda make=make: make(8, momentum=momentum, dtype=F64))
        assert refused(ours) and isinstance(ours.error, ValueError), f"{make.__name__}: {ours!r}"
        assert_named_refusal(ours, ["momentum"], what=f"momentum={momentum}")


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_max_pool_empty_stride_refused(dims):
    """README (Conventions, 'differ from torch.nn's on purpose'): 'a max pool's stride is an int, or one value per
    dim, or None (not ())'. torch reads stride=() as the default, the kernel. (QuaternionAvgPool*d passes it to
    torch: the grid holds it to torch's answer.)"""
    ours_cls, torch_cls = MAX_POOL[dims]
    x = torch.randn(2, 4, *(6,) * dims)
    assert torch_cls(2, stride=())(x).shape == (2, 4, *(3,) * dims)
    ours = attempt(lambda: ours_cls(2, stride=())(x))
    assert refused(ours), f"ours returns {getattr(ours, 'shape', ours)}"
    assert_named_refusal(ours, ["stride"], what="stride=()")


# ---------------------------------------------------------------------------------------------------------------------
# where torch.nn contradicts itself: ours is held to torch's consistent behaviour (the grid goes around these too)
# ---------------------------------------------------------------------------------------------------------------------


def test_one_element_sequences_with_padding_mode():
    """torch.nn's non-zero padding modes build F.pad's argument from the padding AS GIVEN: padding=[1] in a 2d conv
    pads one dim, and F.pad refuses that for a 4-d input (NotImplementedError), though padding=[1] with zeros pads
    both dims. Ours reads [1] as (1, 1) in every mode: the output of padding=(1, 1)."""
    x = torch.randn(2, 4, 11, 11, dtype=F64)
    assert refused(attempt(lambda: nn.Conv2d(4, 4, 3, padding=[1], padding_mode="reflect")(x)))
    ours = qnn.QuaternionConv2d(4, 4, 3, padding=[1], padding_mode="reflect", dtype=F64)
    full = qnn.QuaternionConv2d(4, 4, 3, padding=(1, 1), padding_mode="reflect", dtype=F64)
    full.load_state_dict(ours.state_dict())
    torch.testing.assert_close(ours(x), full(x))


@pytest.mark.parametrize("groups", [1, 2])
def test_transposed_conv_output_of_size_zero_refused(groups):
    """A transposed conv whose output would have a zero size: torch refuses it with one group ('Output size is too
    small') and returns an empty tensor with several; ours refuses both, naming the input's size."""
    x = torch.randn(1, 8, 2)
    twin = nn.ConvTranspose1d(8, 8, 1, stride=2, padding=2, dilation=2, output_padding=1, groups=groups)  # fmt: skip
    assert refused(attempt(lambda: twin(x))) == (groups == 1)
    kw = {"stride": 2, "padding": 2, "dilation": 2, "output_padding": 1, "groups": groups}
    ours = attempt(lambda: qnn.QuaternionConvTranspose1d(8, 8, 1, **kw)(x))
    assert refused(ours)
    assert_named_refusal(ours, ["input spatial size"], what="zero-size transposed output")
