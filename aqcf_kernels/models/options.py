"""The options of :class:`~aqcf_kernels.models.AQCFNet`, declared and checked in one place.

* :class:`ArchitectureOptions`: what shapes the network (widths, fusion, attention, norm, ...). It is
  also the ``model`` section of the pipeline's run config (:mod:`aqcf_kernels.pipeline.config`), so an
  option declared here can be set in a YAML file or with ``--set model.KEY=VALUE`` as it is.
* :class:`AQCFNetOptions`: those plus what a run fixes elsewhere: the input and output channels (the
  data's) and the mode (the run's ``train.mode``).

:meth:`AQCFNetOptions.validated` is the one check of an option set, for the constructor and the run
config alike; each error is a ``ValueError`` naming the option. ``AQCFNet``'s signature lists the same
options with the same defaults (``spatial_dims`` has none there); ``tests/models`` keeps them in step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..nn.attention import GATES
from ..quaternion import ALGORITHM_CHOICES

MODES = ("joint", "ct", "mri")
DOWNS = ("conv", "pool")
NORMS = ("batch", "instance")
ACTIVATIONS = ("relu", "leaky_relu", "gelu")
MEMORY_FORMATS = ("auto", "channels_last", "contiguous")

#: Real channels per attention head under ``heads='auto'`` (MONAI's SwinUNETR keeps 16 per head too).
#: Narrower heads make the A-QCF block cost several times more for the same width: each head's
#: softmax over the keys costs as much as a wide head's, and the CPU attention kernel runs tiny
#: matmuls. Measured on the 2D target's level-0 block (32 real channels, 64² queries, keys pooled to
#: 1024, batch 4, fwd+bwd, AMD EPYC 2 threads): 4 heads of 8 reals 3.9 s, 2 heads of 16 reals 1.8 s,
#: 1 head of 32 reals 1.6 s; at level 1 (64 reals, 32² tokens) 4 heads of 16: 0.94 s, 2 of 32: 0.72 s.
HEAD_CHANNELS = 16

#: The options that must be one of a fixed list of names.
CHOICES: dict[str, tuple[str, ...]] = {
    "gate": GATES,
    "norm": NORMS,
    "act": ACTIVATIONS,
    "down": DOWNS,
    "mode": MODES,
    "algorithm": ALGORITHM_CHOICES,
    "memory_format": MEMORY_FORMATS,
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_positive_int(value: Any) -> bool:
    return _is_int(value) and value > 0


def _is_quaternion_width(value: Any) -> bool:
    """A positive multiple of 4: the real channels of a blocked ``[r|i|j|k]`` feature map."""
    return _is_positive_int(value) and value % 4 == 0


@dataclass(kw_only=True)
class ArchitectureOptions:
    """The architecture of an A-QCF-Net; every field is the :class:`~aqcf_kernels.models.AQCFNet`
    argument of the same name (documented there). The ``model`` section of a run config."""

    spatial_dims: int = 2
    features: tuple[int, ...] = (32, 64, 128, 256)
    bottleneck: int = 512
    fusion_levels: str | tuple[int, ...] = "all"
    heads: int | str = "auto"
    kv_pool: int | None = 256
    gate: str = "token"
    norm: str = "batch"
    act: str = "leaky_relu"
    down: str = "conv"
    deep_supervision: bool | int = False
    real_valued: bool = False
    dropout: float = 0.0
    algorithm: str = "auto"
    memory_format: str = "auto"


@dataclass(kw_only=True)
class AQCFNetOptions(ArchitectureOptions):
    """Every option of :class:`~aqcf_kernels.models.AQCFNet` (all its arguments but ``device`` and ``dtype``)."""

    in_channels: int = 1
    out_channels: int = 3
    mode: str = "joint"

    def validated(self, prefix: str = "AQCFNet: ") -> AQCFNetOptions:
        """These options in canonical form, or a ``ValueError`` ``prefix + 'OPTION must ...'``.

        Canonical: ``features`` a tuple, ``fusion_levels`` the sorted tuple of fused levels (``'all'``
        resolved against ``mode``), ``deep_supervision`` the number of extra heads. Validating the
        result again returns it unchanged.
        """
        if not _is_int(self.spatial_dims) or self.spatial_dims not in (2, 3):
            raise ValueError(f"{prefix}spatial_dims must be 2 or 3, got {self.spatial_dims!r}")
        for name in ("in_channels", "out_channels"):
            if not _is_positive_int(getattr(self, name)):
                raise ValueError(f"{prefix}{name} must be a positive int, got {getattr(self, name)!r}")
        if self.heads != "auto" and not _is_positive_int(self.heads):
            raise ValueError(f"{prefix}heads must be 'auto' or a positive int, got {self.heads!r}")
        if self.kv_pool is not None and not _is_positive_int(self.kv_pool):
            raise ValueError(f"{prefix}kv_pool must be None or a positive int, got {self.kv_pool!r}")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{prefix}{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not isinstance(self.real_valued, bool):
            raise ValueError(f"{prefix}real_valued must be a bool, got {self.real_valued!r}")
        dropout = self.dropout
        if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"{prefix}dropout must be a probability in [0, 1), got {dropout!r}")
        features = self._validated_features(prefix)
        fusion_levels = self._validated_fusion_levels(prefix, len(features))
        for level in fusion_levels if self.heads != "auto" else ():
            if features[level] % (4 * self.heads):
                raise ValueError(
                    f"{prefix}features[{level}] = {features[level]} must be a multiple of 4 * heads = "
                    f"{4 * self.heads} at a fused level (each attention head owns whole quaternion channels); "
                    "change features, heads or fusion_levels"
                )
        deep_supervision = self._validated_deep_supervision(prefix, len(features))
        return dataclasses.replace(
            self, features=features, fusion_levels=fusion_levels, deep_supervision=deep_supervision
        )

    def heads_at(self, width: int) -> int:
        """The attention heads of an A-QCF block on ``width`` real channels: ``heads``, or under
        ``'auto'`` one head per :data:`HEAD_CHANNELS` real channels (at least one; each head owns
        whole quaternion channels, so the count divides ``width / 4``)."""
        if self.heads != "auto":
            return self.heads
        heads = max(1, width // HEAD_CHANNELS)
        while (width // 4) % heads:
            heads -= 1
        return heads

    def _validated_features(self, prefix: str) -> tuple[int, ...]:
        features = self.features
        if isinstance(features, (str, bytes)) or not isinstance(features, Sequence) or not features:
            raise ValueError(f"{prefix}features must be a non-empty sequence of ints, got {features!r}")
        for level, width in enumerate(features):
            if not _is_quaternion_width(width):
                raise ValueError(
                    f"{prefix}features[{level}] must be a positive multiple of 4 (real channels of a quaternion "
                    f"feature map), got {width!r}"
                )
        if not _is_quaternion_width(self.bottleneck):
            raise ValueError(
                f"{prefix}bottleneck must be a positive multiple of 4 (real channels of a quaternion feature "
                f"map), got {self.bottleneck!r}"
            )
        return tuple(features)

    def _validated_fusion_levels(self, prefix: str, levels: int) -> tuple[int, ...]:
        requested = self.fusion_levels
        if requested == "all":
            # A unimodal model has nothing to fuse: 'all' (the default) means no block there.
            return tuple(range(levels)) if self.mode == "joint" else ()
        if requested is None or requested == "none":
            return ()
        if isinstance(requested, str) or not isinstance(requested, Sequence):
            raise ValueError(
                f"{prefix}fusion_levels must be 'all', 'none' or a sequence of level indices, got {requested!r}"
            )
        if any(not _is_int(l) or not 0 <= l < levels for l in requested) or len(set(requested)) != len(requested):
            raise ValueError(
                f"{prefix}fusion_levels must hold distinct level indices in 0..{levels - 1} (one per entry of "
                f"features), got {requested!r}"
            )
        if requested and self.mode != "joint":
            raise ValueError(
                f"{prefix}fusion_levels={requested!r} needs both streams, but mode={self.mode!r} has one stream "
                "and no fusion"
            )
        return tuple(sorted(requested))

    def _validated_deep_supervision(self, prefix: str, levels: int) -> int:
        value = self.deep_supervision
        if isinstance(value, bool):
            return levels - 1 if value else 0
        if not _is_int(value) or not 0 <= value <= levels - 1:
            raise ValueError(
                f"{prefix}deep_supervision must be a bool or an int in 0..{levels - 1} (extra heads at the decoder "
                f"levels below full resolution), got {value!r}"
            )
        return value


__all__ = [
    "ACTIVATIONS",
    "CHOICES",
    "HEAD_CHANNELS",
    "DOWNS",
    "MODES",
    "NORMS",
    "AQCFNetOptions",
    "ArchitectureOptions",
]
