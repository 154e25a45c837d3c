"""What every quaternion layer shares: one ``weight`` ``(4, A, B, ...)``, init, component I/O."""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import Tensor, nn

from ..quaternion import check_algorithm
from .init import check_init, init_quaternion_

COMPONENTS = ("r", "i", "j", "k")


def check_quaternion_channels(cls_name: str, name: str, value: Any, groups: int = 1, blocks: int = 4) -> int:
    """Real channel counts must be positive multiples of 4 (blocked [r|i|j|k]) and of 4*groups.

    ``blocks=3``: the pure ``[i|j|k]`` tensors of a rotation layer with ``quaternion_format=False``.
    """
    try:  # an int-like (numpy's) counts as torch.nn counts it; 4.0 or True is refused, not truncated
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{cls_name}: {name} must be an int (real channels), got {value!r}") from None
    if value <= 0 or value % (blocks * groups):
        why = f"{blocks} * groups = {blocks * groups}" if groups > 1 else str(blocks)
        layout = "[r|i|j|k] quaternion" if blocks == 4 else "[i|j|k] pure-quaternion"
        raise ValueError(
            f"{cls_name}: {name} must be a positive multiple of {why} (real channels of a blocked "
            f"{layout} tensor{', each block split in groups' if groups > 1 else ''}), got {value!r}"
        )
    return value


def check_rotation_options(cls_name: str, rotation: Any, quaternion_format: Any, scale: Any, algorithm: str) -> None:
    """Checks of ``rotation`` / ``quaternion_format`` / ``scale`` (see :mod:`aqcf_kernels.nn.rotation`)."""
    for name, value in (("rotation", rotation), ("quaternion_format", quaternion_format), ("scale", scale)):
        if not isinstance(value, bool):
            raise TypeError(f"{cls_name}: {name} must be a bool, got {value!r}")
    if not rotation and (scale or not quaternion_format):
        given = "scale=True" if scale else "quaternion_format=False"
        raise ValueError(f"{cls_name}: {given} only applies to a rotation layer (pass rotation=True)")
    if rotation and algorithm != "auto":
        # A rotation layer is one real conv on a derived (non-Hamilton) weight: there is no
        # Hamilton product for 'hamilton' or 'fast8' to organise.
        raise ValueError(
            f"{cls_name}: rotation=True runs one real conv on the derived rotation weight; "
            f"algorithm={algorithm!r} cannot serve it (leave algorithm='auto')"
        )


def check_layer_options(cls_name: str, algorithm: str, init_criterion: str, init: str = "quaternion") -> None:
    """Checks of the options every quaternion layer takes; each error names its argument."""
    check_algorithm(cls_name, algorithm)
    check_init(cls_name, init, init_criterion)


def check_real_dtype(cls_name: str, dtype: Any) -> None:
    """A layer's ``dtype`` argument: None (the default dtype) or a real floating dtype; a quaternion layer's
    components are real (a complex dtype would build a layer that refuses every input)."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"{cls_name}: dtype must be a real floating-point dtype or None, got {dtype!r}")


class QuaternionModule(nn.Module):
    """Base of the quaternion layers: ``weight`` is ONE ``(4, A, B, ...)`` parameter, index r, i, j, k.

    Subclasses set ``weight``, ``bias``, ``init_criterion``, ``init`` and implement
    :meth:`_args_from_component_shape`.
    """

    weight: nn.Parameter
    bias: nn.Parameter | None
    init_criterion: str
    algorithm: str
    rotation: bool
    quaternion_format: bool
    scale: bool
    #: The weight init scheme (``aqcf_kernels.nn.init.INITS``); a class attribute so subclasses that
    #: predate ``init=`` keep Parcollet's quaternion init.
    init: str = "quaternion"
    #: Parcollet's ``r_weight`` is the transpose of our component (his linear layers store (in, out)).
    _parcollet_transposed = False

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """The weight from its ``init`` scheme and ``init_criterion``; the bias starts at zero.

        Zero bias follows Parcollet (his layers ``bias.data.zero_()``) rather than torch's uniform
        ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``: the bias is a real per-channel shift with no
        quaternion structure, and starting at zero keeps the output statistics those of the
        quaternion init alone. ``generator`` makes the weight reproducible without touching the
        global RNG; without it ``torch.manual_seed`` does.
        """
        init_quaternion_(self.weight, self.init, self.init_criterion, generator)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        # Rotation layers' per-weight scale: Xavier-uniform, as Parcollet's and speechbrain's.
        scale = getattr(self, "scale_param", None)
        if scale is not None:
            nn.init.xavier_uniform_(scale, generator=generator)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 (nn.Module's signature)
        """``nn.Module._apply``, except that a 5-d weight takes a memory format through its 4-d view.

        ``model.to(memory_format=torch.channels_last)`` converts every 4-d and 5-d tensor, and a 2d conv's
        weight ``(4, A, B, kh, kw)`` is 5-d without being a 3d map: ``channels_last`` refuses rank 5. Its
        ``(4·A, B, kh, kw)`` view (the expanded weight's row blocks) takes the format instead, as
        ``nn.Conv2d``'s 4-d weight would; any other conversion does the same on either view.
        """

        def convert(t: Tensor) -> Tensor:
            try:
                return fn(t)
            except RuntimeError:
                if t.dim() != 5:
                    raise
                return fn(t.flatten(0, 1)).unflatten(0, t.shape[:2])

        return super()._apply(convert, recurse)

    def _options_repr(self) -> str:
        """The ``extra_repr`` suffix of the options every quaternion layer has, where not the default."""
        s = ""
        if self.algorithm != "auto":
            s += f", algorithm={self.algorithm!r}"
        if self.init != "quaternion":
            s += f", init={self.init!r}"
        if self.init_criterion != "glorot":
            s += f", init_criterion={self.init_criterion!r}"
        if self.rotation:
            s += ", rotation=True"
            if not self.quaternion_format:
                s += ", quaternion_format=False"
            if self.scale:
                s += ", scale=True"
        return s

    @classmethod
    def _args_from_component_shape(cls, shape: torch.Size, kwargs: dict[str, Any]) -> tuple:
        """Positional constructor arguments (channels, kernel size) for components of ``shape``."""
        raise NotImplementedError

    @classmethod
    def from_components(
        cls, r: Tensor, i: Tensor, j: Tensor, k: Tensor, bias: Tensor | None = None, **kwargs: Any
    ) -> QuaternionModule:
        """Build a layer whose ``weight`` is ``stack([r, i, j, k])`` (copied) and whose bias is ``bias``.

        The components are in this layer's layout (``weight[0]`` etc.); channel counts and kernel
        size are read from their shape, every other constructor argument goes in ``kwargs``.
        The layer has a bias exactly when ``bias`` is given; device and dtype default to ``r``'s.
        """
        comps = (r, i, j, k)
        if any(not isinstance(c, Tensor) for c in comps) or any(c.shape != r.shape for c in comps):
            shapes = [tuple(c.shape) if isinstance(c, Tensor) else type(c).__name__ for c in comps]
            raise ValueError(f"{cls.__name__}.from_components: r, i, j, k must be tensors of one shape, got {shapes}")
        kwargs.setdefault("device", r.device)
        kwargs.setdefault("dtype", r.dtype)
        layer = cls(*cls._args_from_component_shape(r.shape, kwargs), bias=bias is not None, **kwargs)
        with torch.no_grad():
            layer.weight.copy_(torch.stack(comps))
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        # Parcollet-style checkpoints (Pytorch-Quaternion-Neural-Networks, speechbrain) hold four
        # component tensors; stack them into our single weight and load normally (shape errors and
        # strictness then behave as for any state dict). load_state_dict hands us its own copy.
        keys = [f"{prefix}{c}_weight" for c in COMPONENTS]
        if prefix + "weight" not in state_dict and all(key in state_dict for key in keys):
            comps = [state_dict.pop(key) for key in keys]
            if self._parcollet_transposed:
                comps = [c.transpose(0, 1) for c in comps]
            shapes = [tuple(c.shape) if isinstance(c, Tensor) else type(c).__name__ for c in comps]
            if len(set(shapes)) == 1:
                state_dict[prefix + "weight"] = torch.stack(comps)
            else:  # torch's wording for a shape that does not fit; the weight keeps its value
                error_msgs.append(
                    f"size mismatch for {', '.join(keys)}: the four components must have one shape, got "
                    f"{', '.join(f'{c} {s}' for c, s in zip(COMPONENTS, shapes, strict=True))} (as this layer "
                    f"lays them out); the shape in current model is {tuple(self.weight.shape[1:])} each."
                )
                state_dict[prefix + "weight"] = self.weight.detach()
            # Rotation (spinor) layers: their per-weight ``scale_param`` is laid out as a component.
            scale = state_dict.get(prefix + "scale_param")
            if self._parcollet_transposed and isinstance(scale, Tensor) and scale.dim() == 2:
                state_dict[prefix + "scale_param"] = scale.transpose(0, 1)
            # speechbrain's QLinear names its bias ``b``.
            if prefix + "b" in state_dict and prefix + "bias" not in state_dict:
                state_dict[prefix + "bias"] = state_dict.pop(prefix + "b")
            # Their ``zero_kernel`` is a frozen all-zero Parameter that only pads their matrix: a rotation
            # layer of ours drops it (non-zero, or into a plain layer: left in, so an unexpected key).
            zero = state_dict.get(prefix + "zero_kernel")
            if getattr(self, "rotation", False) and isinstance(zero, Tensor) and not zero.any():
                del state_dict[prefix + "zero_kernel"]
            # speechbrain's QConv2d(bias=False) registers an all-zero "bias" BUFFER (its state dict
            # has the key); a bias-free layer of ours computes the same function without it.
            bias = state_dict.get(prefix + "bias")
            if self.bias is None and isinstance(bias, Tensor) and not bias.any():
                del state_dict[prefix + "bias"]
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
