"""``aqcf-export``: a trained run's network as a ``torch.export`` program (``.pt2``) or as ONNX.

    aqcf-export runs/ct                                # runs/ct/export/best-ct.pt2
    aqcf-export runs/joint --format pt2 onnx           # best-{ct,mri}.pt2 and best-{ct,mri}.onnx
    aqcf-export runs/joint --modality ct --format onnx --checkpoint last -o deploy/
    aqcf-predict -i scans/ -o masks/ --run runs/ct --checkpoint export/best-ct.pt2

What is exported is the network as ``aqcf-predict`` runs it: one modality at a time, in eval mode
(running statistics, the full-resolution head only), ``image (B, 1, *S) -> logits (B, 3, *S)``. A
joint run gives one file per modality; a case arrives with one modality, so the fusion blocks,
which need both streams, are not part of either program.

Shapes: the batch and every spatial size are dynamic. Each spatial size must be a multiple of
``m = 2**len(model.features)`` and at least ``2m`` (``torch.export`` assumes sizes other than 0 and 1
for the coarsest level). The eager model pads odd sizes itself; the exported ones leave that to the
caller, as :class:`ExportedNet` (what ``aqcf-predict`` loads) does. The sliding window's windows are
the training crop, already such a size for the usual configurations.

* **pt2**: :func:`torch.export.export` of the model with its custom ops (``aqcf::qconv``, ``aqcf::qnorm``)
  as they are, captured through their fake implementations, saved with :func:`torch.export.save`.
  Loading it needs ``import aqcf_kernels`` (which registers the ops) but not the model's class, its
  options or the checkpoint: the run config (preprocessing, crop size, modality) travels inside as
  the extra file ``aqcf_export.json``. A program is specific to the device type it was exported on
  (on CPU the norms are the CPU extension's fused op): export with ``--device cuda`` to predict on a GPU.
* **onnx**: every quaternion op is lowered to standard ONNX operators (opset 18), so ONNX Runtime
  runs it with no custom domain: a quaternion (transposed) conv becomes one real ``Conv`` /
  ``ConvTranspose`` on its expanded weight (the 4x4 real blocks of the Hamilton product, computed
  once at export: :func:`lowered_for_onnx`); a rotation conv one real ``Conv`` on its derived weight
  (also computed once) of the pure blocks; the fused norm + activation the composite norm
  (``ReduceMean``, ``Sub``, ``Mul``, ``Sqrt`` ...) and the activation, a whitening norm one 4x4
  ``MatMul`` per quaternion channel (with running statistics the Cholesky is done at export; on the
  input's statistics it is unrolled into elementwise ops); the A-QCF attention
  ``MatMul``/``Softmax``/``MatMul`` per direction and its gated residual ``Sigmoid``/``Mul``/``Add``
  (:mod:`aqcf_kernels.ops.lowerings`, called while the exporter captures wherever a custom op remains:
  functional calls, the attention; a whitening norm called as a function unrolls its Cholesky there).
  The trained weights and the eager path are untouched: the lowering works on a copy.
  ``metadata_props["aqcf_export"]`` holds the same JSON as the pt2's extra file.

Each file is checked after writing against the eager model on a random input (``--no-verify`` skips
it). Errors (a missing run or checkpoint, an unknown format, ONNX packages not installed) print one
line and exit with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import importlib.util
import json
import logging
import os
import sys
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.outputs import check_output_dir, output_dir
from ..ops.lowerings import lowerings
from .config import RunConfig
from .device import DeviceError, resolve_device

__all__ = [
    "EXPORT_FORMATS",
    "ExportError",
    "ExportedNet",
    "InputSpec",
    "ModalityNet",
    "export_onnx",
    "export_program",
    "export_run",
    "load_exported",
    "lower_custom_ops",
    "lowered_for_onnx",
    "main",
    "onnx_program",
]

EXPORT_FORMATS = ("pt2", "onnx")
#: The JSON describing an exported file: the pt2's extra file, and the ONNX model's metadata key.
METADATA_FILE = "aqcf_export.json"
ONNX_METADATA_KEY = "aqcf_export"
METADATA_VERSION = 1
ONNX_OPSET = 18
INPUT_NAME, OUTPUT_NAME = "image", "logits"
#: Relative error (whole tensor) above which the check after writing fails: fp32 rounding of a
#: re-associated computation is ~1e-6; anything near this bound is a wrong lowering, not rounding.
VERIFY_TOLERANCE = 1e-4
ONNX_PACKAGES = ("onnx", "onnxscript")


class ExportError(ValueError):
    """A user-facing problem with the command's run, checkpoint, options or file (printed as one line)."""


# ---------------------------------------------------------------------------------- what is exported


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """The input an exported network takes: ``(batch, in_channels, *spatial)``, spatial sizes multiples of
    ``multiple`` and at least ``2 * multiple``; ``roi`` is the run's sliding-window size (its crop)."""

    spatial_dims: int
    in_channels: int
    out_channels: int
    multiple: int
    roi: tuple[int, ...]

    @staticmethod
    def of_run(cfg: RunConfig) -> InputSpec:
        options = cfg.model_options()
        roi = tuple(cfg.data.patch_size if cfg.model.spatial_dims == 3 else cfg.data.slice_size)
        m = 2 ** len(cfg.model.features)
        return InputSpec(cfg.model.spatial_dims, options.in_channels, options.out_channels, m, roi)

    @property
    def axes(self) -> tuple[str, ...]:
        return ("depth", "height", "width")[3 - self.spatial_dims :]

    @property
    def min_size(self) -> int:
        return 2 * self.multiple

    def example_size(self) -> tuple[int, ...]:
        """The ROI rounded up to an allowed size: what the export traces with (only its shape matters)."""
        return tuple(max(-(-s // self.multiple), 2) * self.multiple for s in self.roi)

    def padding(self, size: Sequence[int]) -> list[int]:
        """``F.pad`` amounts (far end of each dim) bringing ``size`` to an allowed size."""
        target = [max(-(-int(s) // self.multiple) * self.multiple, self.min_size) for s in size]
        return [p for s, t in zip(reversed(size), reversed(target), strict=True) for p in (0, t - int(s))]

    def dynamic_shapes(self) -> dict[str, dict[int, Any]]:
        from torch.export import Dim

        dims: dict[int, Any] = {0: Dim("batch", min=1)}
        for i, axis in enumerate(self.axes):
            dims[2 + i] = Dim(f"{axis}_blocks", min=2) * self.multiple
        return {INPUT_NAME: dims}

    def describe(self) -> str:
        axes = ", ".join(a[0].upper() for a in self.axes)
        return (
            f"{INPUT_NAME} float32 (batch, {self.in_channels}, {axes}) -> {OUTPUT_NAME} float32 "
            f"(batch, {self.out_channels}, {axes}); {axes} multiples of {self.multiple}, at least {self.min_size} "
            f"(sliding window {'x'.join(map(str, self.roi))})"
        )

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "roi": list(self.roi), "axes": list(self.axes), "min_size": self.min_size}

    @staticmethod
    def from_dict(data: dict[str, Any]) -> InputSpec:
        return InputSpec(
            int(data["spatial_dims"]),
            int(data["in_channels"]),
            int(data["out_channels"]),
            int(data["multiple"]),
            tuple(int(s) for s in data["roi"]),
        )


class ModalityNet(nn.Module):
    """``image -> logits`` of one modality of a run's network, as ``aqcf-predict`` calls it."""

    def __init__(self, net: nn.Module, modality: str) -> None:
        super().__init__()
        # Only the modality's own weights: a traced program keeps every parameter of the module it
        # was given, used or not (a joint network's CT program held the MRI stream and the fusion).
        single_stream = getattr(net, "single_stream", None)
        self.net, self.modality = (net if single_stream is None else single_stream(modality)), modality

    def forward(self, image: Tensor) -> Tensor:
        out = self.net(**{self.modality: image})[self.modality]
        return out[0] if isinstance(out, (list, tuple)) else out  # deep supervision: the full-resolution head


# ------------------------------------------------------------------------------------------ pt2


def export_program(net: nn.Module, modality: str, spec: InputSpec, device: Any = "cpu") -> torch.export.ExportedProgram:
    """The ``torch.export`` program of ``net``'s ``modality`` stream (eval mode), batch and spatial sizes dynamic.

    The custom ops stay in the graph (captured through their fake implementations).
    """
    wrapper = ModalityNet(net, modality).to(device).eval()
    # Batch 2, not 1: torch.export would specialise a dimension traced at size 1.
    example = torch.randn(2, spec.in_channels, *spec.example_size(), device=device)
    return torch.export.export(wrapper, (example,), dynamic_shapes=spec.dynamic_shapes())


class ExportedNet(nn.Module):
    """A loaded ``.pt2`` behind the interface ``aqcf-predict`` uses: ``forward(ct=, mri=) -> {modality: logits}``.

    Pads each input at the far end to an allowed size (:class:`InputSpec`) and crops the logits back,
    as the eager model does inside. Inference only: :meth:`train` keeps a flag and nothing else.
    """

    def __init__(self, program: nn.Module, modality: str, spec: InputSpec, metadata: dict[str, Any]) -> None:
        super().__init__()
        self.program, self.spec, self.metadata = program, spec, metadata
        #: read by aqcf-predict's ensemble members: the one modality this file predicts
        self.exported_modality = modality

    def train(self, mode: bool = True) -> ExportedNet:
        # An exported program has no train/eval switch (torch refuses the call); it is always eval.
        self.training = mode
        return self

    def forward(self, ct: Tensor | None = None, mri: Tensor | None = None) -> dict[str, Tensor]:
        given = {name: x for name, x in (("ct", ct), ("mri", mri)) if x is not None}
        if set(given) != {self.exported_modality}:
            raise ValueError(
                f"ExportedNet: this program predicts {self.exported_modality} only; "
                f"pass {self.exported_modality}= alone"
            )
        x = given[self.exported_modality]
        size = tuple(x.shape[2:])
        pads = self.spec.padding(size)
        y = self.program(F.pad(x, pads) if any(pads) else x)
        return {self.exported_modality: y[(..., *(slice(0, s) for s in size))]}


def _read_metadata(path: Path) -> dict[str, Any] | None:
    """The ``aqcf_export.json`` of a ``.pt2`` read straight from its zip archive (``<name>/extra/``), so a
    file for another device is refused before its program is deserialised; ``None`` if not found there."""
    try:
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.endswith(f"/extra/{METADATA_FILE}")), None)
            return None if name is None else json.loads(archive.read(name))
    except (zipfile.BadZipFile, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{path} is not a readable torch.export program ({type(e).__name__}: {e})") from None


def _read_pt2(path: Path) -> tuple[torch.export.ExportedProgram, dict[str, Any]]:
    extra = {METADATA_FILE: ""}
    try:
        program = torch.export.load(path, extra_files=extra)
    except Exception as e:  # noqa: BLE001 - any deserialisation failure means the same thing to the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ExportError(f"{path} is not a readable torch.export program ({type(e).__name__}: {first})") from None
    if not extra[METADATA_FILE]:
        raise ExportError(f"{path} was not written by aqcf-export (no {METADATA_FILE} inside)")
    return program, json.loads(extra[METADATA_FILE])


def load_exported(path: str | os.PathLike, device: Any = "cpu") -> tuple[ExportedNet, RunConfig]:
    """The network of an ``aqcf-export`` ``.pt2`` file, on ``device``, and the run config stored with it."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"exported program {path} does not exist")
    device = resolve_device(device)
    meta = _read_metadata(path)
    if meta is not None:
        _check_device(path, meta, device)
    program, meta = _read_pt2(path)
    exported_on = _check_device(path, meta, device)
    cfg = RunConfig.from_dict(meta["config"], f"{path} (config)")
    module = program.module()
    if exported_on != device:
        module = module.to(device)
    return ExportedNet(module, meta["modality"], InputSpec.from_dict(meta["input"]), meta), cfg


def _check_device(path: Path, meta: dict[str, Any], device: torch.device) -> torch.device:
    exported_on = torch.device(meta["device"])
    if exported_on.type != device.type:
        raise ExportError(
            f"{path} was exported for {exported_on.type} and cannot run on {device} (its ops are the "
            f"{exported_on.type} ones); export again with aqcf-export --device {device.type}, or predict with "
            f"--device {exported_on.type}"
        )
    return exported_on


# ----------------------------------------------------------------------------------- ONNX lowering


def _lowered_geometry(conv: Any, input: Tensor, output_padding: Sequence[int]) -> tuple[Tensor, Any]:
    """``input`` padded as ``conv`` pads it and the :class:`~aqcf_kernels.params.ConvParams` of the real conv
    that follows: non-zero padding modes and ``'same'`` become an explicit ``F.pad`` (``Pad`` in ONNX)."""
    from ..params import ConvParams

    n = conv._spatial_dims
    padding = conv.padding
    if conv.padding_mode != "zeros" or isinstance(padding, str):
        # _reversed_padding_repeated_twice is 'same' resolved too (odd element on the right).
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        input = F.pad(input, conv._reversed_padding_repeated_twice, mode=mode)
        padding = (0,) * n
    p = ConvParams(n, tuple(conv.stride), tuple(padding), tuple(conv.dilation), conv._transposed,
                   tuple(output_padding), conv.groups)  # fmt: skip
    return input, p


class _LoweredConvMixin:
    """A quaternion (transposed) conv computed as ONE real conv on its expanded weight (``expanded_weight``,
    the 16 signed blocks of the Hamilton product, fixed at lowering). Forward, padding modes, unbatched
    inputs and ``output_size`` are the parent class's; only the product changes."""

    expanded_weight: Tensor

    def _conv_forward(self, input: Tensor, output_padding: Sequence[int]) -> Tensor:
        from ..backends.torch.conv import add_bias, real_conv

        input, p = _lowered_geometry(self, input, output_padding)
        y = _reordered(
            real_conv(_reordered(input, self, "group_major_in"), self.expanded_weight, p), self, "blocked_out"
        )
        return add_bias(y, self.bias)


def _channel_order(channels: int, outer: int, inner: int, device: torch.device) -> Tensor:
    """The channel indices that take ``outer`` blocks, each split in ``inner`` parts, to ``inner`` blocks each
    split in ``outer`` parts: ``x.index_select(1, order)`` is ``to_group_major`` with ``(outer, inner) = (4, G)``
    (``(G, 4)`` undoes it; 3 for the pure blocks of a rotation conv)."""
    return torch.arange(channels, device=device).view(outer, inner, -1).transpose(0, 1).reshape(-1)


def _register_channel_orders(
    m: nn.Module, blocks: int, channels_in: int, channels_out: int, device: torch.device
) -> None:
    """A grouped lowered conv's channel reorders, as index buffers (not saved in its state dict).

    Why indices rather than the eager layers' reshape → transpose → reshape: torch 2.11's ``torch.export``
    (the lent GPU machines' torch) fails that reshape on a 1-d input whose length is dynamic (a guard
    ``min(L, 2·L) == L`` it cannot prove); ``index_select`` (ONNX ``Gather``) is the same single copy."""
    if m.groups > 1:  # (on the device of the layer's folded weight)
        m.register_buffer("group_major_in", _channel_order(channels_in, blocks, m.groups, device), persistent=False)
        m.register_buffer("blocked_out", _channel_order(channels_out, m.groups, blocks, device), persistent=False)


def _reordered(x: Tensor, m: nn.Module, order: str) -> Tensor:
    return x if m.groups == 1 else x.index_select(1, getattr(m, order))


class _LoweredRotationConvMixin:
    """A rotation (spinor) conv as ONE real conv of the pure blocks on its derived weight (``rotation_weight``,
    :func:`~aqcf_kernels.nn.rotation.rotation_real_weight` of the weight and ``scale``, fixed at lowering).

    Why a constant rather than the derivation (normalise, 3x3 rotation matrices, reorder) in the graph:
    it depends on the parameters only, so in an inference graph it would be recomputed on every call for
    the same result, and as a constant the graph is what the Hamilton convs' is (``Conv`` on a folded
    weight); the weight is the eager layer's own function of the same parameters, so nothing is re-derived.
    Around the conv, as :func:`~aqcf_kernels.nn.rotation.quaternion_rotation_conv` does: with
    ``quaternion_format`` the real input block is dropped (``Slice``) and the real output block is zero
    (``Pad`` on the channel axis) before the bias; groups reorder the three pure blocks group-major.
    """

    rotation_weight: Tensor

    def _conv_forward(self, input: Tensor, output_padding: Sequence[int]) -> Tensor:
        from ..backends.torch.conv import add_bias, real_conv

        input, p = _lowered_geometry(self, input, output_padding)
        if self.quaternion_format:
            input = input[:, self.in_channels // 4 :]
        y = _reordered(
            real_conv(_reordered(input, self, "group_major_in"), self.rotation_weight, p), self, "blocked_out"
        )
        if self.quaternion_format:  # the zero real block in front of [i|j|k] (F.pad lists the last dim first)
            y = F.pad(y, [0, 0] * self._spatial_dims + [self.out_channels // 4, 0])
        return add_bias(y, self.bias)


class _LoweredNormMixin:
    """A quaternion norm + activation in the fewest standard ops, for inference.

    Shared variance: with running statistics (batch norm in eval) ``(x - μ) · s + β`` with
    ``s = γ / sqrt(σ² + eps)`` per real channel, fixed at lowering (``lowered_mean``, ``lowered_scale``);
    otherwise the statistics of the input (instance norm), as the composite reference computes them.
    Why not the reference itself: it casts to the statistics dtype and reshapes for checks, ~2.5x the
    nodes, each of which costs the ONNX exporter time; the arithmetic is the same, in the same order.

    Whitening: ``M (x - μ) + β`` with one 4x4 ``M = γ L⁻¹`` per quaternion channel
    (:func:`_per_channel_4x4`). With running statistics ``M`` is folded at lowering (``lowered_matrix``,
    the eager layer's own Cholesky of ``running_cov``), so the graph has no factorisation at all;
    otherwise (instance norm) the covariance is the input's and ``L⁻¹`` is
    :func:`~aqcf_kernels.nn.norm._unrolled_whitening_matrix`, elementwise ops on the 4x4 entries.
    """

    def forward(self, input: Tensor) -> Tensor:
        from ..backends.base import activate

        if self.training:
            raise RuntimeError(f"{type(self).__name__}: a lowered norm is for inference (call .eval())")
        unbatched = self._check_input(input)
        x = input.unsqueeze(0) if unbatched else input
        cq, ones = self.num_features // 4, (1,) * (x.dim() - 2)
        if self.whiten:
            y = self._whitened(x)
        elif self.track_running_stats:
            centred, scale = x - self.lowered_mean.view(1, -1, *ones), self.lowered_scale.view(1, -1, *ones)
            y = centred * scale if self.bias is None else torch.addcmul(self.bias.view(1, -1, *ones), centred, scale)
        else:
            q = x.unflatten(1, (4, cq))  # (N, 4, Cq, *S)
            spatial = tuple(range(3, q.dim()))
            mean = q.mean(spatial if self._per_sample else (0, *spatial), keepdim=True)
            centred = q - mean
            var = centred.square().mean(spatial if self._per_sample else (0, *spatial), keepdim=True).sum(1, True)
            scale = (var + self.eps).rsqrt()
            if self.weight is not None:
                scale = scale * self.weight.view(1, 1, cq, *ones)
            y = centred * scale if self.bias is None else torch.addcmul(self.bias.view(1, 4, cq, *ones), centred, scale)
            y = y.flatten(1, 2)
        if self.activation is not None:
            y = activate(y, self.activation, self.negative_slope)
        return y.squeeze(0) if unbatched else y

    def _whitened(self, x: Tensor) -> Tensor:
        """``γ L⁻¹ (x - μ) + β`` of a batched ``(N, 4Cq, *S)`` input (before the activation)."""
        cq, ones = self.num_features // 4, (1,) * (x.dim() - 2)
        q = x.unflatten(1, (4, cq))  # (N, 4, Cq, *S)
        if self.track_running_stats:
            centred, matrix = q - self.lowered_mean.view(1, 4, cq, *ones), self.lowered_matrix
        else:
            spatial = tuple(range(3, q.dim()))
            centred = q - q.mean(spatial if self._per_sample else (0, *spatial), keepdim=True)
            # As the reference: components on the second-to-last axis, every sample of the statistic on
            # the last, (N, Cq, 4, S) for instance norm, (Cq, 4, N*S) for batch norm; V = Z Zᵀ / count.
            if self._per_sample:
                z = centred.transpose(1, 2).flatten(3)
            else:
                z = centred.permute(2, 1, 0, *spatial).flatten(2)
            from ..nn.norm import _unrolled_whitening_matrix

            matrix = _unrolled_whitening_matrix(z @ z.mT / z.shape[-1], self.eps)
            if self.weight is not None:
                matrix = self.weight @ matrix
        y = _per_channel_4x4(matrix, centred)
        if self.bias is not None:
            y = y + self.bias.view(1, 4, cq, *ones)
        return y.flatten(1, 2)


def _per_channel_4x4(matrix: Tensor, x: Tensor) -> Tensor:
    """``y[n, i, c] = Σ_j matrix[(n,) c, i, j] · x[n, j, c]`` at every position of ``x`` ``(N, 4, Cq, *S)``;
    ``matrix`` ``(Cq, 4, 4)`` or, per sample, ``(N, Cq, 4, 4)``.

    One batched ``MatMul`` (quaternion channels, and samples, as the batch: 4x4 times 4xS) between two
    ``Transpose``. Why not a grouped 1x1 ``Conv``: it needs the same two transposes (a group's four input
    channels must be adjacent, and the blocked layout puts them ``Cq`` apart) and cannot take a matrix
    per sample (instance norm); why not a dense 1x1 ``Conv`` on the blocked layout: a block-diagonal
    ``(4Cq, 4Cq)`` weight, ``Cq`` times the multiplications.
    """
    flat = x.flatten(3) if x.dim() > 3 else x.unsqueeze(3)  # (N, 4, Cq, S); S = 1 for a (N, C) batch norm input
    return (matrix @ flat.transpose(1, 2)).transpose(1, 2).reshape(x.shape)


def _lower_norm(norm: nn.Module) -> None:
    """Turn ``norm`` (in place) into its :class:`_LoweredNormMixin` class, running statistics folded."""
    if norm.track_running_stats:
        with torch.no_grad():
            if norm.whiten:
                from ..nn.norm import _stat_dtype, _whitening_matrix

                # The eager layer's own γ·L⁻¹ (LAPACK's Cholesky, in its statistics dtype), once.
                cov = norm.running_cov
                matrix = _whitening_matrix(cov.to(_stat_dtype(cov.dtype)), norm.eps, stored=cov.dtype)
                if norm.weight is not None:
                    matrix = norm.weight.to(matrix.dtype) @ matrix
                norm.register_buffer("lowered_matrix", matrix.to(cov.dtype).contiguous())
            else:
                scale = (norm.running_var + norm.eps).rsqrt()
                if norm.weight is not None:
                    scale = scale * norm.weight
                # per real channel: the blocked layout repeats the quaternion channels' scale for r, i, j, k
                norm.register_buffer("lowered_scale", scale.repeat(4).clone())
            norm.register_buffer("lowered_mean", norm.running_mean.clone())
    norm.__class__ = _lowered_class(type(norm), _LoweredNormMixin)


@functools.cache
def _lowered_class(cls: type, mixin: type = _LoweredConvMixin) -> type:
    return type(f"Lowered{cls.__name__}", (mixin, cls), {"__module__": __name__})


def lowered_for_onnx(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose quaternion convs and norms compute with standard PyTorch ops, for inference.

    Convs: one real conv on the expanded weight, or for a rotation conv on the derived rotation weight
    (:class:`_LoweredRotationConvMixin`); a buffer computed here, once, and the quaternion weight (and
    ``scale_param``) dropped from the copy. Norms: :class:`_LoweredNormMixin` (running statistics folded
    into a scale and shift, or for a whitening norm into one 4x4 matrix per quaternion channel). The
    lowered norms refuse to run in training mode. ``module`` itself is not changed.
    """
    from ..models.layers import RealConvNormAct
    from ..nn.conv import _QuaternionConvNd
    from ..nn.norm import _QuaternionNorm
    from ..nn.rotation import rotation_real_weight
    from ..nn.unit import QuaternionConvNormAct
    from ..quaternion import expand_weight_grouped

    lowered = copy.deepcopy(module)
    for m in lowered.modules():
        if isinstance(m, (QuaternionConvNormAct, RealConvNormAct)):
            # Its two modules are lowered on their own below; its eval-mode fold reads the quaternion
            # weight this copy drops (and the norm's statistics the lowered norm keeps as a scale and
            # shift), so it runs them in turn, as the nn.Sequential it extends (a ConvBlock gives a
            # quaternion unit the qcat of several inputs).
            m.__class__ = nn.Sequential
        elif isinstance(m, _QuaternionConvNd):
            with torch.no_grad():
                if m.rotation:
                    scale = None if m.scale_param is None else m.scale_param.detach()
                    folded = rotation_real_weight(m.weight.detach(), scale, m.groups)
                    buffer, mixin = "rotation_weight", _LoweredRotationConvMixin
                else:
                    folded = expand_weight_grouped(m.weight.detach(), m.groups)
                    buffer, mixin = "expanded_weight", _LoweredConvMixin
            # The copy computes with the folded weight only: no unused parameter is exported.
            del m.weight
            if m.rotation:
                m.scale_param = None
            m.register_buffer(buffer, folded.contiguous())
            pure = m.rotation and m.quaternion_format  # (its real blocks are dropped before the conv)
            blocks = 3 if m.rotation else 4
            c_in, c_out = (m.in_channels // 4 * 3, m.out_channels // 4 * 3) if pure else (m.in_channels, m.out_channels)
            _register_channel_orders(m, blocks, c_in, c_out, folded.device)
            m.__class__ = _lowered_class(type(m), mixin)
        elif isinstance(m, _QuaternionNorm):
            _lower_norm(m)
    return lowered


#: torch's own operators outside aten that the ONNX exporter translates: ``scan`` (ONNX ``Scan``), which the
#: recurrent lowering leaves over a dynamic sequence length.
EXPORTABLE_HIGHER_ORDER = ("scan",)


def _custom_ops(program: torch.export.ExportedProgram) -> list[str]:
    def custom(target: Any) -> bool:
        namespace = getattr(target, "namespace", None)
        if namespace == "higher_order":
            return getattr(target, "__name__", None) not in EXPORTABLE_HIGHER_ORDER
        return namespace not in (None, "aten", "prims")

    return sorted({str(n.target) for n in program.graph.nodes if n.op == "call_function" and custom(n.target)})


def lower_custom_ops(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """``program`` with every ``aqcf`` op replaced by its plain-PyTorch lowering
    (:func:`aqcf_kernels.ops.lowerings.lowerings`); a recurrent layer's over a dynamic sequence length is one
    ``scan``, which the ONNX exporter translates (:data:`EXPORTABLE_HIGHER_ORDER`).

    Raises :class:`ExportError` naming any custom op without a lowering.
    """
    if not _custom_ops(program):
        return program  # nothing to lower: a retrace would only cost time
    lowered = program.run_decompositions(lowerings())
    left = _custom_ops(lowered)
    if left:
        raise ExportError(f"no ONNX lowering for the custom op(s) {', '.join(left)}")
    return lowered


def _onnx_missing() -> list[str]:
    return [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]


def _check_onnx_packages() -> None:
    missing = _onnx_missing()
    if missing:
        raise ExportError(
            f"--format onnx needs the {' and '.join(missing)} package(s): pip install 'aqcf-kernels[export]' "
            f"(or pip install {' '.join(missing)})"
        )


def onnx_program(
    module: nn.Module,
    args: tuple[Tensor, ...],
    dynamic_shapes: Any,
    input_names: Sequence[str],
    output_names: Sequence[str],
) -> Any:
    """``module`` (eval mode, CPU) as a ``torch.onnx.ONNXProgram`` made of standard ONNX operators only.

    :func:`lowered_for_onnx` (weights folded once), then the dynamo ONNX exporter at opset
    :data:`ONNX_OPSET` with ``dynamic_shapes``: while it captures, any ``aqcf`` op left (functional calls,
    the A-QCF attention) is its lowering (:mod:`aqcf_kernels.ops.lowerings`), and a whitening norm called as
    a function unrolls its Cholesky. Raises :class:`ExportError` if a node outside the standard domain
    remains.
    """
    _check_onnx_packages()
    lowered = lowered_for_onnx(module).cpu().eval()
    exported = torch.onnx.export(
        lowered,
        args,
        dynamic_shapes=dynamic_shapes,
        dynamo=True,
        opset_version=ONNX_OPSET,
        input_names=list(input_names),
        output_names=list(output_names),
        verbose=False,
    )
    model = exported.model
    foreign = sorted({f"{n.domain}::{n.op_type}" for n in model.graph.all_nodes() if n.domain not in ("", "ai.onnx")})
    if foreign or len(model.functions):
        raise ExportError(
            f"the ONNX graph is not standard ONNX (custom nodes: {', '.join(foreign) or 'none'}; "
            f"{len(model.functions)} local functions)"
        )
    return exported


def export_onnx(
    net: nn.Module,
    modality: str,
    spec: InputSpec,
    path: str | os.PathLike,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write ``net``'s ``modality`` stream (eval mode) as ONNX with standard operators only, to ``path``.

    Traced on CPU (an ONNX file is device-neutral); batch and spatial axes dynamic (:class:`InputSpec`);
    ``metadata`` goes to ``metadata_props["aqcf_export"]`` as JSON.
    """
    example = torch.randn(2, spec.in_channels, *spec.example_size())
    exported = onnx_program(ModalityNet(net, modality), (example,), spec.dynamic_shapes(), [INPUT_NAME], [OUTPUT_NAME])
    if metadata is not None:
        exported.model.metadata_props[ONNX_METADATA_KEY] = json.dumps(metadata)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    exported.save(path, external_data=False)
    return path


@contextlib.contextmanager
def quiet_onnx_export() -> Iterator[None]:
    """Silence what torch's ONNX exporter prints on a successful export, for ``--quiet``: its log warnings
    (``torchvision is not installed. Skipping torchvision::nms`` ..., from the ``torch.onnx`` loggers)
    and FutureWarnings from torch internals (pytree deprecations). Nothing the user can act on; errors
    still raise, and everything is restored afterwards."""
    onnx_logger = logging.getLogger("torch.onnx")
    level = onnx_logger.level
    onnx_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        onnx_logger.setLevel(level)


# ------------------------------------------------------------------------------------------- run


@dataclasses.dataclass
class ExportedFile:
    """One file ``export_run`` wrote: its path, format, modality, input spec and check result."""

    path: Path
    format: str
    modality: str
    spec: InputSpec
    max_error: float | None  # relative to the eager output; None when not checked
    unchecked: str | None = None  # why it was not checked

    def describe(self) -> str:
        size = self.path.stat().st_size / 2**20
        text = f"wrote {self.path} ({self.format}, {self.modality}, {size:.1f} MiB): {self.spec.describe()}"
        if self.max_error is not None:
            text += f"; matches the eager model within {self.max_error:.1e} (relative)"
        elif self.unchecked:
            text += f"; not checked ({self.unchecked})"
        return text


def _relative_error(out: Tensor, ref: Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


@torch.no_grad()
def _verify(path: Path, fmt: str, net: nn.Module, modality: str, spec: InputSpec, device: torch.device) -> float | None:
    """Relative error of the written file against the eager model on one random input (ROI-sized, batch 2)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, spec.in_channels, *spec.example_size(), generator=generator)
    reference = ModalityNet(net, modality).eval()(x.to(device))
    if fmt == "pt2":
        exported, _ = load_exported(path, device)
        out = exported(**{modality: x.to(device)})[modality]
    else:
        if importlib.util.find_spec("onnxruntime") is None:
            return None  # the file is written; checking it needs ONNX Runtime
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        out = torch.from_numpy(session.run(None, {INPUT_NAME: x.numpy()})[0])
    error = _relative_error(out, reference)
    if not error <= VERIFY_TOLERANCE:
        raise ExportError(
            f"{path}: the exported {fmt} differs from the eager model by {error:.2e} (relative; allowed "
            f"{VERIFY_TOLERANCE:.0e}); please report it"
        )
    return error


def _metadata(cfg: RunConfig, modality: str, spec: InputSpec, device: torch.device, info: dict[str, Any]):
    from .. import __version__
    from .predict import CLASSES

    return {
        "format": "aqcf-export",
        "version": METADATA_VERSION,
        "modality": modality,
        "classes": list(CLASSES),
        "input": spec.to_dict(),
        "config": cfg.to_dict(),
        "device": str(device),
        "checkpoint": {"file": info["file"], "description": info["description"]},
        "torch": torch.__version__,
        "aqcf_kernels": __version__,
    }


def export_run(
    run_dir: str | os.PathLike,
    formats: Sequence[str] = ("pt2",),
    *,
    checkpoint: str = "best",
    modality: str = "all",
    output: str | os.PathLike | None = None,
    device: str = "cpu",
    verify: bool = True,
    quiet: bool = False,
) -> list[ExportedFile]:
    """Export a run's checkpoint: one file per format and modality, ``{output}/{checkpoint}-{modality}.{format}``.

    Args:
        run_dir: an ``aqcf-train`` run folder.
        formats: ``"pt2"`` and/or ``"onnx"``.
        checkpoint: ``"best"``, ``"last"`` or a checkpoint file (a bare name is looked up in ``run_dir``).
        modality: ``"ct"``, ``"mri"`` or ``"all"`` (every modality the run was trained for).
        output: the folder written to (default ``run_dir/export``).
        device: where the pt2 program runs (``cpu``, ``cuda[:N]`` or ``auto``); ONNX is traced on CPU.
        verify: compare each written file with the eager model on a random input.
        quiet: silence the ONNX exporter's warnings (:func:`quiet_onnx_export`).

    Raises:
        ExportError, DeviceError: one-line user-facing errors.
    """
    from .checkpoint import CheckpointMismatchError, load_run_checkpoint
    from .predict import PredictError, _checkpoint_path

    formats = list(dict.fromkeys(formats))
    unknown = [f for f in formats if f not in EXPORT_FORMATS]
    if unknown or not formats:
        raise ExportError(f"--format {' '.join(unknown) or '(none)'}: expected {' and/or '.join(EXPORT_FORMATS)}")
    if "onnx" in formats:
        _check_onnx_packages()
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise ExportError(f"run folder {run_dir} does not exist (expected the --out folder of aqcf-train)")
    out_argument = "-o" if output is not None else "output folder"
    out = check_output_dir(Path(output) if output is not None else run_dir / "export", out_argument)
    try:
        path = _checkpoint_path(run_dir, checkpoint, "aqcf-export")
    except PredictError as e:
        raise ExportError(str(e)) from None
    if path.suffix == ".pt2":
        raise ExportError(f"checkpoint {path} is already an exported program (choose a .pt checkpoint)")
    dev = resolve_device(device)
    try:
        net, cfg, info = load_run_checkpoint(path, dev)
    except CheckpointMismatchError as e:  # state dict and config disagree: a damaged or hand-edited checkpoint
        raise ExportError(str(e)) from e
    if modality == "all":
        modalities = list(cfg.modalities)
    elif modality in cfg.modalities:
        modalities = [modality]
    else:
        raise ExportError(
            f"--modality {modality}: the run (train.mode={cfg.train.mode}) was trained for "
            f"{'/'.join(cfg.modalities)} only"
        )
    spec = InputSpec.of_run(cfg)
    written = []
    # created now; removed again if no file gets written into it (an export error, Ctrl-C)
    with output_dir(out, out_argument):
        for fmt in formats:
            for mod in modalities:
                target = out / f"{path.stem}-{mod}.{fmt}"
                meta = _metadata(cfg, mod, spec, dev if fmt == "pt2" else torch.device("cpu"), info)
                if fmt == "pt2":
                    program = export_program(net, mod, spec, dev)
                    torch.export.save(program, target, extra_files={METADATA_FILE: json.dumps(meta)})
                else:
                    with quiet_onnx_export() if quiet else contextlib.nullcontext():
                        export_onnx(net, mod, spec, target, meta)
                error = _verify(target, fmt, net, mod, spec, dev) if verify else None
                why = None if error is not None else "--no-verify" if not verify else "onnxruntime is not installed"
                written.append(ExportedFile(target, fmt, mod, spec, error, why))
    return written


# ---------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    """The ``aqcf-export`` command line."""
    p = argparse.ArgumentParser(
        prog="aqcf-export",
        description="Export a trained run's network, one file per modality: a torch.export program (.pt2, which "
        "aqcf-predict --checkpoint FILE.pt2 loads without the model's code) and/or ONNX with standard operators "
        "only (ONNX Runtime). Batch and spatial sizes are dynamic (spatial sizes multiples of 2**levels).",
        epilog="Errors print one line and exit with status 2.",
    )
    p.add_argument("run", type=Path, metavar="RUN_DIR", help="the --out folder of aqcf-train")
    p.add_argument(
        "--format",
        nargs="+",
        default=["pt2"],
        metavar="FORMAT",
        help="pt2 (default) and/or onnx (needs pip install 'aqcf-kernels[export]')",
    )
    p.add_argument(
        "--checkpoint",
        default="best",
        help="best (default), last, or a checkpoint file (a bare file name is looked up in RUN_DIR)",
    )
    p.add_argument(
        "--modality",
        default="all",
        choices=("ct", "mri", "all"),
        help="the stream to export (default all: one file per modality the run was trained for)",
    )
    p.add_argument("-o", "--output", type=Path, metavar="OUT", help="output folder (default RUN_DIR/export)")
    p.add_argument(
        "--device",
        default="cpu",
        help="where the pt2 program will run: cpu (default), cuda[:N], or auto (CUDA when present, else CPU; "
        "a program keeps its device's ops); "
        "ONNX is always traced on CPU",
    )
    p.add_argument("--no-verify", action="store_true", help="skip comparing each file with the eager model")
    p.add_argument("--quiet", action="store_true", help="print nothing on success")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``aqcf-export``; returns the exit status (2 on a user-facing error, 130 on Ctrl-C)."""
    args = build_parser().parse_args(argv)
    try:
        written = export_run(
            args.run,
            args.format,
            checkpoint=args.checkpoint,
            modality=args.modality,
            output=args.output,
            device=args.device,
            verify=not args.no_verify,
            quiet=args.quiet,
        )
    except KeyboardInterrupt:
        print(
            "aqcf-export: interrupted; export again (a file being written may be incomplete)",
            file=sys.stderr,
            flush=True,
        )
        return 130
    except (ExportError, DeviceError, FileNotFoundError, ValueError) as e:
        print(f"aqcf-export: error: {e}", file=sys.stderr)
        return 2
    if not args.quiet:
        for item in written:
            print(item.describe(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
