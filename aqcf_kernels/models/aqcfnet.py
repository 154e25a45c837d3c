"""A-QCF-Net: a dual-stream (CT, MRI) quaternion U-Net with A-QCF cross-fusion (arXiv 2512.21760).

What the paper states, and this builds: twin quaternion encoder streams, one per modality; an A-QCF
block after each down-sampling stage exchanging information between the streams both ways; a shared
quaternion bottleneck giving a modality-agnostic representation; a decoder predicting background /
liver / tumour; quaternion layers for ~4x fewer parameters than the real-valued network.

Layout for ``features = (F0, ..., F_{L-1})`` and ``bottleneck = B`` (all REAL channel counts of
blocked ``[r|i|j|k]`` quaternion feature maps, so ``F/4`` quaternion channels each)::

    per stream s ∈ {ct, mri}:
      stem_s:     real conv 3 (in_channels -> F0) → quaternion norm → act
      level l:    [qconv 3 → qnorm → act] x 2  (F_{l-1} -> F_l; F_{-1} = F0)   ──► skip_s[l]
      down l:     qconv 3 stride 2 → qnorm → act   (down='conv')   or quaternion max-pool 2 (down='pool')
      fusion l:   (f_ct, f_mri) <- AQCFBlock_l(f_ct, f_mri)          (levels in ``fusion_levels``)
    shared, run once per modality:
      bottleneck: [qconv 3 → qnorm → act] x 2  (F_{L-1} -> B)
      decoder l = L-1 .. 0: qconvT 2 stride 2 (-> F_l), qcat with skip_s[l], [qconv → qnorm → act] x 2 (2F_l -> F_l)
        (the first qconv takes the pair and convolves their qcat without building it: layers.ConvBlock)
      head:       real conv 1 (F0 -> out_channels);  deep supervision: real conv 1 at decoder levels 1..n

Documented choices where the paper is silent (deviations):

* **Stem**: a learnable real 3×3 conv (``in_channels -> F0``) per stream, followed by the body's
  norm and activation. Each of the four quaternion components gets its own learned filters of the
  image; the alternatives (grey value in the real part and zeros elsewhere, or the value copied to
  all four) hand the first quaternion conv a degenerate quaternion. The stem and head convs are ``torch.nn``
  convs that run on oneDNN where PyTorch's rule would take its im2col kernel (a batch-1 3D stem:
  6.6 → 1.4 ms forward at 64³; :class:`~aqcf_kernels.models.layers.OneDNNConvMixin`).
* **Widths and depth**: ``features=(32, 64, 128, 256)``, ``bottleneck=512`` (real channels), two
  conv units per level, a MONAI/nnU-Net-like layout. ``features`` are multiples of 4; with an integer
  ``heads``, those at fused levels are multiples of ``4·heads`` (each head owns whole quaternion channels).
* **Attention heads**: ``heads='auto'`` (default) gives each head 16 real channels (4 quaternions),
  as MONAI's SwinUNETR does (2, 4, 8, 16 heads at the default widths). The paper does not publish its
  head count; 4 heads everywhere (this model's default before) left level 0 with 8 reals per head, where
  the block costs twice as much for the same width: measured on the 2D target's level-0 block (128²
  input, batch 4, fwd+bwd, AMD EPYC, 2 threads) 3.9 s with 4 heads, 1.8 s with 2
  (:data:`~aqcf_kernels.models.options.HEAD_CHANNELS`). An integer ``heads`` is used at every level.
* **Down-sampling**: ``down='conv'`` (default, as MONAI's UNet) is a strided quaternion conv unit at
  constant width; ``'pool'`` keeps the largest-modulus quaternion of each 2×…×2 window.
* **Fusion**: ``AQCFBlock`` (this package's definition, see :mod:`aqcf_kernels.nn.attention`) on the
  down-sampled features of level l, i.e. after each down-sampling stage; it feeds the next level of
  each stream, while skips are taken before fusion from each image's own stream. Blocks start as the
  identity (``alpha = 0``). ``kv_pool=256`` (default) average-pools keys/values to at most 256
  tokens per stream, which keeps the high-resolution levels linear in the query count (2D 128²:
  level 0 has 64² = 4096 tokens, keys pooled to 16²; 3D 64³: 32³ = 32768 tokens, keys pooled to 6³).
  Queries are never pooled, so every position receives its own update. ``kv_pool=None`` disables it.
  The paper does not say; measured (Intel Xeon, 2 threads, fwd+bwd of the joint net, ``heads='auto'``):
  2D 128² B4 step 1261 ms with no pooling (attention 42% of it), 977 ms at 1024 (26%), 870 ms at 256
  (17%), 830 ms at 64 (13%); 3D 64³ B1 4449 ms unpooled (72%), 1281 ms at 1024 (9%), 1198 ms at 256
  (7%). On the phantoms (``make demo``, one seed, 96² slices, keys of level 0 pooled to 32² at 1024
  and 16² at 256) the test tumour Dice was 78.5 / 84.1 % (CT / MRI) at 1024 and 79.1 / 84.4 % at
  256: no drop, so 256 (1024 before).
* **Shared bottleneck AND shared decoder**: one set of weights for both modalities after the
  encoders (the paper shares the bottleneck; sharing the decoder too halves the decoder parameters
  and keeps the representation modality-agnostic down to the logits). Each modality runs through
  them separately, so batch norm statistics are per modality and batch (never a CT/MRI mixture).
* **Activation**: ``act='leaky_relu'`` (slope 0.01, nnU-Net's), a split activation on every real
  component; ``'relu'`` and ``'gelu'`` are available.
* **Dropout**: ``dropout > 0`` adds dropout at the end of every two-unit block (whole quaternions
  in the quaternion network).
* **Odd sizes**: each input is zero-padded at the far end of every spatial dim to a multiple of
  ``2**len(features)`` and the logits are cropped back, so any size works and every stride-2 stage
  halves exactly. CT and MRI may have different sizes (the A-QCF block allows different token counts).
  The one limit is the norms': an image of at most ``2**len(features)`` in every dim leaves one token at
  the bottleneck, which instance norm, and batch norm in training at batch 1, cannot normalise; such an
  image is refused with a ``ValueError`` naming it, before anything runs.
* **Deep supervision** (``deep_supervision=True`` or an int n): extra real 1×1 heads at the n
  coarsest-but-one decoder levels (True: every decoder level below full resolution). In training mode
  each modality then maps to a list ``[full-res, 1/2, 1/4, ...]`` of logits at their own resolution
  (cropped to ``ceil(size / 2**k)``; resample the target for the loss, as nnU-Net does); in eval
  mode to the full-resolution logits only.
* **Batches**: sample n of the CT batch is fused with sample n of the MRI batch; an MRI batch of 1 is
  shared by every CT sample (the ``'mri'`` logits then have the CT batch size, one per pairing, where a
  fusion block runs; with ``fusion_levels='none'`` the streams never meet and they keep batch 1).
  Other mismatches are an error.
* **Memory format** (``memory_format='auto'``: channels_last on CPU): the stem writes its output
  channels_last (its input is given channels_last strides) and every later module keeps it (``qcat``
  concatenates channels_last maps into one, the A-QCF block returns its inputs' layout); the logits
  come back channels-first. oneDNN's convs read and write channels_last directly; from NCHW it
  reorders to its blocked layout and back around every conv (a 2D 8q 128² B4 conv: fwd 9.4 ms NCHW,
  3.6 ms channels_last). Measured, joint net, Intel Xeon 2 threads, fwd+bwd: 2D 128² B4 793 → 743
  ms, 3D 64³ B1 1067 → 960 ms; the same net on expanded convs with composite norms 1078 → 1060 and
  1627 → 1631 ms, the real twin 866 → 831 and 1513 → 1327 ms. ``'contiguous'`` keeps NCHW (the
  layout on other devices, where it is unmeasured).
* **Real twin** (``real_valued=True``): the same topology and real channel counts with ``torch.nn``
  convs, norms, pools and dropout (C² instead of C²/4 weights per tap), and
  :class:`~aqcf_kernels.models.layers.RealAQCFBlock` (the A-QCF block with real projections) for
  fusion. The stem and heads are real in both, so the parameter ratio is slightly above 1/4.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._fx import fx_leaf
from ..layout import channels_last_format, is_vmapped
from .layers import LayerFactory
from .options import MODES, AQCFNetOptions

MODALITIES = ("ct", "mri")
PARTS = ("stem", "encoder", "fusion", "bottleneck", "decoder", "head")

Output = Tensor | list[Tensor]


class _Stream(nn.Module):
    """One modality's encoder: ``levels[l]`` then ``downs[l]``, for every level (the stem is separate)."""

    def __init__(self, layers: LayerFactory, features: tuple[int, ...]) -> None:
        super().__init__()
        widths = (features[0], *features)
        self.levels = nn.ModuleList(layers.conv_block(widths[l], widths[l + 1]) for l in range(len(features)))
        self.downs = nn.ModuleList(
            layers.unit(f, f, stride=2) if layers.options.down == "conv" else layers.max_pool() for f in features
        )


class _Decoder(nn.Module):
    """``ups[l]`` (transposed conv into width ``F_l``), qcat with the skip, ``blocks[l]``; l from deep to shallow.
    (A block takes the pair; the quaternion flavour's first unit never builds their qcat: ConvBlock.)"""

    def __init__(self, layers: LayerFactory, features: tuple[int, ...], bottleneck: int) -> None:
        super().__init__()
        widths = (*features, bottleneck)
        self.ups = nn.ModuleList(layers.conv_transpose(widths[l + 1], widths[l]) for l in range(len(features)))
        self.blocks = nn.ModuleList(layers.conv_block(2 * f, f) for f in features)


class AQCFNet(nn.Module):
    """A-QCF-Net: two quaternion encoder streams (CT, MRI) fused by A-QCF blocks, a shared quaternion
    bottleneck and decoder, real output heads. ``forward(ct=None, mri=None) -> {'ct': logits, 'mri': logits}``.

    Architecture and every choice the paper leaves open: see the module docstring. The options are
    checked (a ``ValueError`` naming the option) and kept, in canonical form, as ``self.options``
    (:class:`~aqcf_kernels.models.options.AQCFNetOptions`); :meth:`from_options` builds from such a set.

    Args:
        spatial_dims: 2 (slices) or 3 (volumes).
        in_channels: image channels per modality (1 for CT and MRI).
        out_channels: classes (3: background, liver, tumour); the logits are ``(B, out_channels, *size)``.
        features: REAL channels of the quaternion feature maps of each encoder/decoder level (``F/4``
            quaternion channels); multiples of 4, and of ``4·heads`` at fused levels when ``heads`` is an
            int. Their number is
            the number of down-sampling stages.
        bottleneck: real channels of the shared bottleneck, a multiple of 4.
        fusion_levels: ``'all'`` (every level, the paper's), ``'none'``, or a sequence of level indices
            ``0 .. len(features)-1`` that get an A-QCF block after their down-sampling.
        heads: attention heads of every A-QCF block, or ``'auto'`` (default): one head per 16 real
            channels of the block's level (see the module docstring).
        kv_pool: A-QCF keys/values average-pooled to at most this many tokens (``None``: never).
        gate: the A-QCF gate, ``'token'``, ``'channel'`` or ``'none'``.
        norm: ``'batch'`` or ``'instance'`` (quaternion shared-variance normalisation; real in the twin).
        act: ``'leaky_relu'``, ``'relu'`` or ``'gelu'``, applied to every real component.
        down: ``'conv'`` (strided quaternion conv unit) or ``'pool'`` (quaternion max-pool).
        deep_supervision: ``False``, ``True`` (a head at every decoder level below full resolution) or the
            number of such extra heads; their logits are returned, as a list, in training mode only.
        mode: ``'joint'`` (both streams and fusion), or ``'ct'`` / ``'mri'``: the unimodal baseline with
            the same body, that stream only and no fusion.
        real_valued: build the real-valued twin (same topology and real channel counts, ~4x parameters).
        dropout: dropout probability at the end of every two-unit block (0: none).
        algorithm: quaternion product algorithm of every quaternion conv (``'auto'``, ``'hamilton'``, ``'fast8'``).
        memory_format: layout of the feature maps: ``'channels_last'`` (after the stem, every level keeps
            ``torch.channels_last(_3d)``), ``'contiguous'``, or ``'auto'`` (default): channels_last on CPU,
            contiguous elsewhere. The logits are returned contiguous either way. See the module docstring.
        device, dtype: of the parameters.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int = 1,
        out_channels: int = 3,
        features: Sequence[int] = (32, 64, 128, 256),
        bottleneck: int = 512,
        fusion_levels: str | Sequence[int] = "all",
        heads: int | str = "auto",
        kv_pool: int | None = 256,
        gate: str = "token",
        norm: str = "batch",
        act: str = "leaky_relu",
        down: str = "conv",
        deep_supervision: bool | int = False,
        mode: str = "joint",
        real_valued: bool = False,
        dropout: float = 0.0,
        algorithm: str = "auto",
        memory_format: str = "auto",
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        arguments = locals()  # every option is an argument of the same name (tests/models checks it)
        requested = AQCFNetOptions(**{f.name: arguments[f.name] for f in dataclasses.fields(AQCFNetOptions)})
        self.options = options = requested.validated()
        # What forward reads; every other option is in self.options.
        self.spatial_dims, self.in_channels, self.out_channels = spatial_dims, in_channels, out_channels
        self.features, self.fusion_levels = options.features, options.fusion_levels
        self.deep_supervision, self.mode, self.real_valued = options.deep_supervision, mode, real_valued
        self.modalities = MODALITIES if mode == "joint" else (mode,)

        features = options.features
        layers = LayerFactory(options, device, dtype)
        self.stem = nn.ModuleDict()
        self.encoder = nn.ModuleDict()
        for name in self.modalities:
            self.stem[name] = layers.stem(in_channels, features[0])
            self.encoder[name] = _Stream(layers, features)
        self.fusion = nn.ModuleDict({str(l): layers.fusion(features[l]) for l in options.fusion_levels})
        self.bottleneck = layers.conv_block(features[-1], bottleneck)
        self.decoder = _Decoder(layers, features, bottleneck)
        self.head = nn.ModuleList(
            layers.real_conv(features[l], out_channels, 1, bias=True) for l in range(options.deep_supervision + 1)
        )  # head[0]: the output; head[k]: deep supervision at decoder level k

    @classmethod
    def from_options(cls, options: AQCFNetOptions, device: Any = None, dtype: Any = None) -> AQCFNet:
        """The network of an option set (a run config's, or another model's ``options``)."""
        return cls(**dataclasses.asdict(options), device=device, dtype=dtype)

    # -----------------------------------------------------------------------------------------
    # Forward
    # -----------------------------------------------------------------------------------------

    def _check_inputs(self, inputs: dict[str, Tensor]) -> None:
        if not inputs:
            raise ValueError(f"AQCFNet.forward: pass at least one of {', '.join(f'{m}=' for m in self.modalities)}")
        for name, x in inputs.items():
            if name not in self.modalities:
                raise ValueError(
                    f"AQCFNet.forward: this model was built with mode={self.mode!r} and has no {name} stream; "
                    f"pass {self.mode}= only (or build mode='joint')"
                )
            n = self.spatial_dims
            if not isinstance(x, Tensor) or x.dim() != n + 2 or x.shape[1] != self.in_channels:
                shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
                raise ValueError(
                    f"AQCFNet.forward: {name} must be (batch, in_channels={self.in_channels}, "
                    f"{', '.join('DHW'[3 - n :])}), got {shape}"
                )
            self._check_dtype_and_device(name, x)
        if len(inputs) == 2:
            b_ct, b_mri = inputs["ct"].shape[0], inputs["mri"].shape[0]
            if b_mri not in (b_ct, 1):
                raise ValueError(
                    f"AQCFNet.forward: batch sizes ct={b_ct} and mri={b_mri} differ; sample n of ct is fused with "
                    "sample n of mri, or mri has batch 1 and is shared by every ct sample"
                )
        for name, x in inputs.items():
            self._check_size(name, x, inputs)

    def _check_size(self, name: str, x: Tensor, inputs: dict[str, Tensor]) -> None:
        """An image the norms can normalise, said before anything runs: every spatial dim is padded to a multiple of
        ``2**levels``, so an image of at most that in every dim leaves one token at the bottleneck, where instance
        norm (over each sample's tokens) and batch norm in training at batch 1 would see one value per channel."""
        size = tuple(x.shape[2:])
        if not all(isinstance(s, int) for s in size):  # (symbolic sizes, while tracing: no guard on them)
            return
        if 0 in size:
            raise ValueError(f"AQCFNet.forward: {name} has an empty spatial dim: {tuple(x.shape)}")
        m = 2 ** len(self.features)
        if any(s > m for s in size):
            return
        larger = f"pass an image larger than {m} in some spatial dim (it is padded to a multiple of {m})"
        if self.options.norm == "instance":
            raise ValueError(
                f"AQCFNet.forward: {name} of spatial size {size} leaves one token at the bottleneck, which instance "
                f"norm cannot normalise (one value per channel): {larger}"
            )
        if self.training and self._batch_through_bottleneck(name, inputs) == 1:
            raise ValueError(
                f"AQCFNet.forward: {name} of spatial size {size} and batch 1 leaves one value per channel at the "
                f"bottleneck, which batch norm cannot normalise in training: {larger}, or a batch of more than one"
            )

    def _batch_through_bottleneck(self, name: str, inputs: dict[str, Tensor]) -> int:
        """The smallest batch ``name``'s stream has where its maps are one token: at the last down-sampling unit (a
        strided conv unit with its norm) and at the bottleneck. A shared batch-1 MRI takes the CT's batch in the
        first fusion block that runs (after the down unit of that level)."""
        batch = inputs[name].shape[0]
        if name != "mri" or len(inputs) != 2 or not self.fusion_levels:
            return batch
        last = len(self.features) - 1
        fused_before_last_down = any(level < last for level in self.fusion_levels)
        if self.options.down == "conv" and not fused_before_last_down:
            return batch  # (the last down unit runs on the MRI's own batch)
        return max(batch, inputs["ct"].shape[0])

    def _check_dtype_and_device(self, name: str, x: Tensor) -> None:
        """The image in the parameters' dtype (any floating dtype under autocast, which casts it) and on their
        device: said here, naming the input, instead of by the stem conv's error."""
        weight = next(self.parameters())
        if x.device != weight.device:
            raise ValueError(f"AQCFNet.forward: {name} is on {x.device}, the model on {weight.device}")
        autocast = torch.is_autocast_enabled(x.device.type)
        if x.dtype != weight.dtype and not (autocast and x.is_floating_point()):
            if not x.is_floating_point():  # (a model can't be moved to an integer dtype, nor autocast take one)
                advice = f"pass a normalised {weight.dtype} image (e.g. a scanner's integers scaled to ~[-1, 1])"
            else:
                advice = (
                    f"pass a {weight.dtype} image, or move the model with .to({x.dtype}) (or run under torch.autocast)"
                )
            raise TypeError(f"AQCFNet.forward: {name} has dtype {x.dtype}, the model {weight.dtype}: {advice}")

    def _channels_last(self, x: Tensor) -> bool:
        fmt = self.options.memory_format
        if is_vmapped(x):  # torch.func.vmap: a sample's layout can be neither asked nor set
            return False
        return fmt == "channels_last" or (fmt == "auto" and x.device.type == "cpu")

    def _stem_input(self, x: Tensor) -> Tensor:
        """The image with channels_last strides, so that the stem conv writes its output channels_last
        itself (oneDNN follows its input's strides). A one-channel image is contiguous in both layouts,
        but its default strides read as channels-first, so it is copied (a few MB at most) into
        channels_last strides: without this, the stem's 16-channel output needed a strided copy
        afterwards (1×1×64³ → 16 on an Intel Xeon, 2 threads: conv 1.4 ms, then the copy ~10 ms)."""
        if not self._channels_last(x):
            return x
        fmt = channels_last_format(x)
        if x.shape[1] > 1 and x.is_contiguous(memory_format=fmt):
            return x
        return torch.empty_like(x, memory_format=fmt).copy_(x)

    def _in_feature_layout(self, x: Tensor) -> Tensor:
        """The stem's output in the feature maps' memory format, where the network's layout is set:
        every later module keeps it. (A no-op when the stem conv already wrote it so; not every conv
        follows its input's strides: PyTorch's own CPU kernels for a batch-1 3D conv don't.)"""
        if self._channels_last(x):
            return x.contiguous(memory_format=channels_last_format(x))
        return x

    def _pad(self, x: Tensor) -> Tensor:
        """Zero-pad the far end of every spatial dim to a multiple of ``2**levels``."""
        m = 2 ** len(self.features)
        # -(-s // m) * m - s, not -s % m: the same pad, and torch.compile's dynamic shapes can lower a floor division in
        # training, not a modulo (torch 2.13's TensorReferenceAnalysis has no python_mod)
        pads = [p for s in reversed(x.shape[2:]) for p in (0, -(-s // m) * m - s)]
        return F.pad(x, pads) if any(pads) else x

    def _decode(self, x: Tensor, skips: list[Tensor], size: Sequence[int]) -> Output:
        aux = self.deep_supervision if self.training else 0
        outputs: list[Tensor] = []
        for l in reversed(range(len(self.features))):
            x = self.decoder.ups[l](x)
            skip = skips[l]
            if skip.shape[0] != x.shape[0]:  # a shared batch-1 MRI stream, fused with every CT sample
                skip = skip.expand(x.shape[0], *skip.shape[1:])
            x = self.decoder.blocks[l](x, skip)  # their qcat (never built in the quaternion flavour)
            if l <= aux:
                crop = tuple(slice(0, -(-s // 2**l)) for s in size)
                outputs.append(self.head[l](x)[(..., *crop)].contiguous())  # channels-first logits
        outputs.reverse()  # full resolution first
        return outputs if aux else outputs[0]

    @fx_leaf
    def forward(self, ct: Tensor | None = None, mri: Tensor | None = None) -> dict[str, Output]:
        """Logits ``(B, out_channels, *size)`` per modality given, at each input's own size.

        With both, the streams are fused at ``fusion_levels``; with one, fusion is skipped. With deep
        supervision in training mode each value is a list ``[full-res, 1/2, ...]`` (see the module docstring).
        """
        inputs = {name: x for name, x in (("ct", ct), ("mri", mri)) if x is not None}
        self._check_inputs(inputs)
        sizes = {name: tuple(x.shape[2:]) for name, x in inputs.items()}
        feats = {
            name: self._in_feature_layout(self.stem[name](self._stem_input(self._pad(x)))) for name, x in inputs.items()
        }
        skips: dict[str, list[Tensor]] = {name: [] for name in inputs}
        for l in range(len(self.features)):
            for name in inputs:
                f = self.encoder[name].levels[l](feats[name])
                skips[name].append(f)
                feats[name] = self.encoder[name].downs[l](f)
            if len(inputs) == 2 and l in self.fusion_levels:
                feats["ct"], feats["mri"] = self.fusion[str(l)](feats["ct"], feats["mri"])
        return {name: self._decode(self.bottleneck(feats[name]), skips[name], sizes[name]) for name in inputs}

    def single_stream(self, modality: str) -> AQCFNet:
        """This network as a one-modality network: the same modules and weights (shared, not copied)
        without the other modality's stem and encoder and without the fusion blocks, none of which a
        forward with ``modality`` alone runs. ``aqcf-export`` traces it, so a modality's program
        carries only the weights it uses. Its ``forward`` takes ``modality=`` only."""
        if modality not in self.modalities:
            raise ValueError(f"AQCFNet.single_stream: no {modality!r} stream; this model has {self.modalities}")
        view = copy.copy(self)  # the module dicts are replaced below, never edited: self is untouched
        view._modules = dict(self._modules)
        view._parameters, view._buffers = dict(self._parameters), dict(self._buffers)
        view.stem = nn.ModuleDict({modality: self.stem[modality]})
        view.encoder = nn.ModuleDict({modality: self.encoder[modality]})
        view.fusion = nn.ModuleDict()
        view.modalities, view.mode = (modality,), modality
        return view

    # -----------------------------------------------------------------------------------------
    # Introspection
    # -----------------------------------------------------------------------------------------

    def _part_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(PARTS, 0)
        for name, p in self.named_parameters():
            counts[name.split(".", 1)[0]] += p.numel()
        return counts

    def count_parameters(self, twin: bool = True) -> dict[str, Any]:
        """Parameter counts: ``total``, ``trainable``, ``parts`` (stem, encoder, fusion, bottleneck,
        decoder, head), and with ``twin`` the same for the other flavour of this configuration
        (``'real_twin'`` for a quaternion model, ``'quaternion_twin'`` for a real one, built on the meta
        device: no memory, no init) with ``ratio`` = quaternion total / real total (~0.25)."""
        out: dict[str, Any] = {
            "total": sum(p.numel() for p in self.parameters()),
            "trainable": sum(p.numel() for p in self.parameters() if p.requires_grad),
            "parts": self._part_counts(),
        }
        if twin:
            twin_options = dataclasses.replace(self.options, real_valued=not self.real_valued)
            other = AQCFNet.from_options(twin_options, device="meta")
            counts = other.count_parameters(twin=False)
            out["quaternion_twin" if self.real_valued else "real_twin"] = counts
            q, r = (counts["total"], out["total"]) if self.real_valued else (out["total"], counts["total"])
            out["ratio"] = q / r
        return out

    def extra_repr(self) -> str:
        o = self.options
        s = (
            f"spatial_dims={o.spatial_dims}, in_channels={o.in_channels}, out_channels={o.out_channels}, "
            f"features={o.features}, bottleneck={o.bottleneck}, mode={o.mode!r}"
        )
        if o.mode == "joint":
            s += f", fusion_levels={o.fusion_levels}"
        if o.fusion_levels:
            s += f", heads={o.heads}, kv_pool={o.kv_pool}, gate={o.gate!r}"
        s += f", norm={o.norm!r}, act={o.act!r}, down={o.down!r}"
        if o.deep_supervision:
            s += f", deep_supervision={o.deep_supervision}"
        if o.dropout:
            s += f", dropout={o.dropout}"
        s += ", real_valued=True" if o.real_valued else f", algorithm={o.algorithm!r}"
        s += f", pad_to_multiple_of={2 ** len(o.features)}"
        return s


__all__ = ["AQCFNet", "MODALITIES", "MODES"]
