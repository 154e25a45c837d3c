"""``aqcf-explain``: Grad-CAM / Grad-CAM++ maps (MONAI) of the tumour class, as PNG overlays.

    aqcf-explain runs/joint                                   # both methods, default layer per stream, 3 test cases
    aqcf-explain runs/joint --list-layers                     # the layer names accepted by --layers
    aqcf-explain runs/joint --modality ct --layers encoder.ct.levels.3 decoder.blocks.0 --cases 5
    aqcf-explain runs/dynunet --method gradcampp --out figs/cam

For each modality and each of the first ``--cases`` cases of the run's saved split (test by default),
the case is predicted whole-volume (sliding window, as ``aqcf-evaluate``) and one axial slice is
chosen: the slice with the most tumour in the label, else in the prediction, else the most liver,
else the middle one. A 2D model gets that whole slice; a 3D model gets a patch of the training patch
size centred on the slice's tumour (or liver), clipped to the volume. MONAI's ``GradCAM`` /
``GradCAMpp`` then explain the tumour class (index 2) at each chosen layer, and one PNG per case,
method and layer is written to ``OUT/{modality}/{case}_{method}_{layer}.png`` with four panels:
image, ground truth, prediction, and the heat map over the image (label tumour outlined). Slices are
drawn in the radiological convention (patient's right on the viewer's left, anterior up). Which
weights are explained (checkpoint file, epoch, the criterion that made it ``best.pt``) is printed
first, in the words of ``aqcf-evaluate`` (:func:`~aqcf_kernels.pipeline.checkpoint.checkpoint_info`).

**The wrapper** (:class:`ClassScores`). MONAI's CAMs back-propagate ``logits[:, class_idx]``, which
for a segmentation net is a whole map; Grad-CAM++ moreover multiplies ``exp(score)`` into the
feature-map gradient, which only broadcasts when the score is one number per sample. So the network
is wrapped into ``x -> (B, 3)``: the score of class c is the mean of class c's logits over a region of
interest (Seg-Grad-CAM, Vinogradova et al., AAAI 2020). Here the region is the tumour the model
predicts on the input, or, if it predicts none, the tumour of the label, or else the whole input; the
same region serves every class. Without a region set, each class uses its own predicted (argmax)
region (the whole input where that is empty). The wrapper holds the network as ``model``, so MONAI
sees every layer name with a ``model.`` prefix (``model.encoder.ct.levels.3``); ``--list-layers``
prints the names without it, as the PNG file names spell them, and ``--layers`` accepts either. Only
layers that run in a single-modality forward can be explained: the A-QCF fusion blocks only run when
CT and MRI are given together, which evaluation never does; a name that is no layer at all is an
error listing the known ones.

Default layers (the deepest encoder level of each stream, before its down-sampling): A-QCF-Net
``encoder.{ct,mri}.levels.{L-1}``; DynUNet pair ``nets.{ct,mri}.downsamples.{L-2}``.

MONAI's default CAM post-processing maps (min, max) to (1, 0), i.e. *inverts* the map; maps are
instead scaled here to [0, 1] with the maximum at 1 (an all-zero map stays zero and says so).
"""

from __future__ import annotations

import argparse
import re
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.outputs import check_output_dir, output_dir
from .checkpoint import load_run_checkpoint
from .config import apply_overrides
from .data import SPLITS, check_splits, prepare_data
from .device import DEVICE_CHOICES_HELP, resolve_device
from .evaluate import note
from .inference import predict_case_labels, resolve_checkpoint

__all__ = ["METHODS", "ClassScores", "available_layers", "default_layers", "explain", "main", "short_name"]

#: Method name -> MONAI class name in :mod:`monai.visualize`.
METHODS = {"gradcam": "GradCAM", "gradcampp": "GradCAMpp"}
#: torch's warning (a regex for warnings.filterwarnings) when a module's full backward hook fires with no input
#: needing a gradient: for a CAM at the first layer, which reads only the output's gradient
FULL_BACKWARD_HOOK_WARNING = "Full backward hook is firing when gradients are computed with respect to module outputs"
TUMOUR = 2
PREFIX = "model."


class ClassScores(nn.Module):
    """A segmentation net as ``x -> (B, classes)`` scores for MONAI's CAMs (see the module docstring).

    Args:
        model: the run's network, ``forward(ct=, mri=) -> {modality: logits}``.
        modality: the stream to run (``"ct"`` or ``"mri"``).

    Set :attr:`region` to a ``(B, 1, *spatial)`` mask to average every class's logits over it;
    ``None`` averages each class over its own argmax region. The last logits are kept (detached) in
    :attr:`logits`.
    """

    def __init__(self, model: nn.Module, modality: str) -> None:
        super().__init__()
        self.model = model
        self.modality = modality
        self.region: Tensor | None = None
        self.logits: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        out = self.model(**{self.modality: x})[self.modality]
        if isinstance(out, (list, tuple)):  # deep supervision in training mode: the full-resolution head
            out = out[0]
        self.logits = out.detach()
        if self.region is not None:
            weight = self.region.to(out.dtype).expand_as(out)
        else:
            weight = F.one_hot(out.detach().argmax(1), out.shape[1]).movedim(-1, 1).to(out.dtype)
        dims = tuple(range(2, out.dim()))
        empty = weight.sum(dims, keepdim=True) == 0
        weight = torch.where(empty, torch.ones_like(weight), weight)
        return (out * weight).sum(dims) / weight.sum(dims)


# ------------------------------------------------------------------------------------------ layers


def available_layers(model: nn.Module, modality: str, spatial_dims: int, size: int = 32) -> dict[str, tuple[int, ...]]:
    """Wrapper-prefixed names of the modules that run for ``modality``, with their output shapes ``(C, *S)``.

    Found by one forward pass on a zero input of ``size`` voxels per side (a multiple of
    ``2**levels``, at least twice it); only modules returning a feature map (``spatial_dims + 2``
    dims) are listed, in execution order.
    """
    wrapper = ClassScores(model, modality)
    seen: dict[str, tuple[int, ...]] = {}
    names = {m: n for n, m in wrapper.named_modules() if n}
    hooks = []

    def hook(module: nn.Module, _inputs: Any, output: Any) -> None:
        if isinstance(output, Tensor) and output.dim() == spatial_dims + 2 and module in names:
            seen.setdefault(names[module], tuple(output.shape[1:]))

    for module in names:
        hooks.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            device = next(model.parameters()).device
            wrapper(torch.zeros(1, 1, *[size] * spatial_dims, device=device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return seen


def default_layers(model: nn.Module, modality: str) -> list[str]:
    """The deepest encoder level of ``modality``'s stream (wrapper-prefixed name)."""
    encoder = getattr(model, "encoder", None)
    if isinstance(encoder, nn.ModuleDict) and modality in encoder:  # AQCFNet
        return [f"{PREFIX}encoder.{modality}.levels.{len(encoder[modality].levels) - 1}"]
    nets = getattr(model, "nets", None)
    if isinstance(nets, nn.ModuleDict) and modality in nets:  # UnimodalPair of DynUNets
        downs = getattr(nets[modality], "downsamples", None)
        if downs is not None and len(downs):
            return [f"{PREFIX}nets.{modality}.downsamples.{len(downs) - 1}"]
        return [f"{PREFIX}nets.{modality}.input_block"]
    raise ValueError(f"no default layer for {type(model).__name__}; pass --layers (see --list-layers)")


def short_name(layer: str) -> str:
    """A layer's name without the wrapper's ``model.`` prefix: as ``--list-layers`` prints it and the PNG
    file names spell it."""
    return layer[len(PREFIX) :] if layer.startswith(PREFIX) else layer


def _resolve_layers(
    requested: Sequence[str], available: dict[str, dict[str, tuple[int, ...]]], model: nn.Module
) -> dict[str, list[str]]:
    """Per modality, the requested layers (prefixed) that run for it. A name that is no module of the
    model is an error listing the known layers; a module that runs for none of the modalities (a
    fusion block) is an error saying so."""
    out: dict[str, list[str]] = {m: [] for m in available}
    modules = {name for name, _ in model.named_modules() if name}
    for name in requested:
        full = PREFIX + short_name(name)
        hits = [m for m, layers in available.items() if full in layers]
        if not hits and short_name(name) not in modules:
            known = list(dict.fromkeys(short_name(layer) for layers in available.values() for layer in layers))
            raise ValueError(f"no such layer {name!r}; known layers: {', '.join(known)}")
        if not hits:
            raise ValueError(
                f"layer {name!r} does not run for {' or '.join(available)} "
                "(fusion blocks only run with both modalities at once); see --list-layers"
            )
        for m in hits:
            out[m].append(full)
    return out


# ------------------------------------------------------------------------------------------- views


def _sanitise(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "x"


def _radiological(a: np.ndarray) -> np.ndarray:
    """An (x, y) RAS slice as displayed: rows anterior to posterior, columns patient right to left."""
    return np.ascontiguousarray(a[::-1, ::-1].T)


def _pick_slice(label: np.ndarray | None, pred: np.ndarray) -> tuple[int, str, np.ndarray]:
    """The axial slice with the most tumour in the label, else the prediction, else the most liver.

    Returns the slice index, what chose it, and the mask (z, x, y) it was chosen by (3D patches are
    centred on that mask's part of the slice).
    """
    candidates = (
        ("label tumour", label, (2,)),
        ("predicted tumour", pred, (2,)),
        ("label liver", label, (1, 2)),
        ("predicted liver", pred, (1, 2)),
    )
    for source, volume, values in candidates:
        if volume is not None:
            mask = np.isin(np.asarray(volume), values)
            counts = mask.sum(axis=(1, 2))
            if counts.max() > 0:
                return int(counts.argmax()), source, mask
    return pred.shape[0] // 2, "middle slice", np.zeros(pred.shape, bool)


def _pad_to(x: Tensor, multiple: int, value: float) -> Tensor:
    pads = [p for s in reversed(x.shape[2:]) for p in (0, -s % multiple)]
    return F.pad(x, pads, value=value) if any(pads) else x


def _window(centre: int, size: int, n: int) -> slice:
    size = min(size, n)
    start = int(np.clip(centre - size // 2, 0, n - size))
    return slice(start, start + size)


def _identity(t: Tensor) -> Tensor:
    return t


def _score_region(
    wrapper: ClassScores, x: Tensor, label: np.ndarray | None, multiple: int
) -> tuple[Tensor | None, str]:
    """The tumour the model predicts on ``x``; else the label's tumour (padded like ``x``); else None (all)."""
    wrapper.region = None
    with torch.no_grad():
        wrapper.eval()(x)
    assert wrapper.logits is not None
    predicted = wrapper.logits.argmax(1, keepdim=True) == TUMOUR
    if predicted.any():
        return predicted, "predicted tumour"
    if label is not None and (label == 2).any():
        mask = torch.from_numpy(np.ascontiguousarray(label == 2)).float()
        mask = mask.reshape(1, 1, *mask.shape[mask.dim() - (x.dim() - 2) :])  # 2D: label is (1, x, y)
        return _pad_to(mask, multiple, 0.0).bool().to(x.device), "label tumour"
    return None, "whole input"


def _unit(cam: Tensor) -> tuple[np.ndarray, float]:
    """A raw CAM (1, 1, *S) as a [0, 1] numpy map (max at 1) and its raw maximum."""
    a = cam.detach().float().cpu().numpy()[0, 0]
    a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
    top = float(a.max())
    return (a / top if top > 0 else np.zeros_like(a)), top


def _overlay_labels(ax: Any, image: np.ndarray, labels: np.ndarray | None, title: str) -> None:
    ax.imshow(image, cmap="gray", interpolation="nearest")
    if labels is not None:
        rgba = np.zeros((*labels.shape, 4))
        rgba[labels == 1] = (0.1, 0.8, 0.2, 0.35)
        rgba[labels == 2] = (1.0, 0.1, 0.1, 0.6)
        ax.imshow(rgba, interpolation="nearest")
    ax.set_title(title, fontsize=9)


def _figure(
    path: Path,
    image: np.ndarray,
    label: np.ndarray | None,
    pred: np.ndarray,
    heat: np.ndarray,
    title: str,
    heat_title: str,
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image, pred, heat = _radiological(image), _radiological(pred), _radiological(heat)
    label = _radiological(label) if label is not None else None
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.8))
    axes[0].imshow(image, cmap="gray", interpolation="nearest")
    axes[0].set_title("image", fontsize=9)
    _overlay_labels(axes[1], image, label, "ground truth" if label is not None else "ground truth (none)")
    _overlay_labels(axes[2], image, pred, "prediction")
    axes[3].imshow(image, cmap="gray", interpolation="nearest")
    shown = axes[3].imshow(heat, cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0, interpolation="bilinear")
    if label is not None and (label == 2).any():
        axes[3].contour(label == 2, levels=[0.5], colors="white", linewidths=0.8)
    axes[3].set_title(heat_title, fontsize=9)
    fig.colorbar(shown, ax=axes[3], fraction=0.046, pad=0.02)
    for ax in axes:
        ax.set_axis_off()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------- run


def _cam_input(case: Any, z: int, region_source: np.ndarray, cfg: Any) -> tuple[Tensor, tuple[slice, ...], int]:
    """The network input around slice ``z`` (2D: the slice; 3D: a patch), its crop, and ``z`` inside it."""
    image = np.asarray(case.image)
    if cfg.model.spatial_dims == 2:
        return torch.from_numpy(np.array(image[z], dtype=np.float32))[None, None], (slice(z, z + 1),), 0
    # 3D: a training-size patch centred on the slice's region (tumour, else liver, else the slice centre).
    mask = region_source[z]
    centre = np.argwhere(mask).mean(0).round().astype(int) if mask.any() else np.array(mask.shape) // 2
    window = (
        _window(z, cfg.data.patch_size[0], image.shape[0]),
        _window(int(centre[0]), cfg.data.patch_size[1], image.shape[1]),
        _window(int(centre[1]), cfg.data.patch_size[2], image.shape[2]),
    )
    patch = np.array(image[window], dtype=np.float32)
    return torch.from_numpy(patch)[None, None], window, z - window[0].start


def explain(
    run_dir: str | Path,
    checkpoint: str | Path = "best",
    modality: str = "both",
    layers: Sequence[str] | None = None,
    method: str = "both",
    cases: int = 3,
    out: str | Path | None = None,
    *,
    split: str = "test",
    device: str = "auto",
    data_overrides: Sequence[str] = (),
    progress: bool | None = None,
    echo: bool = True,
) -> list[Path]:
    """Write Grad-CAM / Grad-CAM++ overlays of the tumour class; returns the PNG paths.

    Args:
        run_dir: the ``--out`` folder of ``aqcf-train``.
        checkpoint: ``"best"``, ``"last"`` or a checkpoint path.
        modality: ``"ct"``, ``"mri"`` or ``"both"`` (those of the run's mode).
        layers: layer names (with or without the ``model.`` prefix; see :func:`available_layers`);
            ``None``: :func:`default_layers` of each stream.
        method: ``"gradcam"``, ``"gradcampp"`` or ``"both"``.
        cases: explain the first ``cases`` cases of the split per modality.
        out: output folder (default ``run_dir / "explain"``).
        split: which part of the run's saved split.
        device: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"``, ``"cuda:N"`` (a DeviceError, a
            ValueError, for one this machine lacks).
        data_overrides: ``"data.KEY=VALUE"`` overrides of the run's data section.
        progress: tqdm bars (``None``: only on a terminal).
        echo: print which weights are explained (:func:`~aqcf_kernels.pipeline.checkpoint.checkpoint_info`'s
            line, as ``aqcf-evaluate`` prints it) before the first case.
    """
    from monai import visualize
    from tqdm.auto import tqdm

    device = resolve_device(device)
    if method not in (*METHODS, "both"):
        raise ValueError(f"method must be one of {(*METHODS, 'both')}, got {method!r}")
    if cases < 1:
        raise ValueError(f"--cases must be at least 1, got {cases}")
    run_dir = Path(run_dir)
    out_argument = "--out" if out is not None else "output folder"
    out = check_output_dir(out if out is not None else run_dir / "explain", out_argument)
    ckpt_path = resolve_checkpoint(run_dir, checkpoint, command="aqcf-explain")
    model, cfg, info = load_run_checkpoint(ckpt_path, device)
    apply_overrides(cfg, data_overrides, sections=("data",))
    cfg.validate()  # an override is checked as in training, not met deep in preprocessing
    modalities = _modalities(modality, cfg.modalities)
    dims = cfg.model.spatial_dims
    multiple = 2 ** len(cfg.model.features)
    available = {m: available_layers(model, m, dims, _probe_size(cfg)) for m in modalities}
    chosen = _resolve_layers(layers, available, model) if layers else {m: default_layers(model, m) for m in modalities}
    methods = list(METHODS) if method == "both" else [method]
    check_splits(run_dir, cfg.modalities)
    data = prepare_data(cfg, run_dir, progress=progress)
    if echo:
        print(f"Checkpoint {info['description']}.", flush=True)
    epoch = "" if info["epoch"] is None else f" (epoch {info['epoch']})"

    # created now; removed again if no PNG gets written into it (an error or Ctrl-C on the first case)
    with output_dir(out, out_argument):
        written: list[Path] = []
        for m in modalities:
            wrapper = ClassScores(model, m)
            cams = {}  # (layer, method) -> CAM; one hooked model per layer, shared by both methods
            for layer in chosen[m]:
                hooked = visualize.class_activation_maps.ModelWithHooks(
                    wrapper, layer, register_forward=True, register_backward=True
                )
                for name in methods:
                    cam_cls = getattr(visualize, METHODS[name])
                    cams[layer, name] = cam_cls(nn_module=hooked, target_layers=layer, postprocessing=_identity)
            selected = data[m][split][:cases]
            if not selected:
                note(f"{m}: the {split} split of {run_dir} is empty; nothing to explain")
            bar = tqdm(selected, desc=f"explain {m}", unit="case", disable=None if progress is None else not progress)
            try:
                for case in bar:
                    pred = predict_case_labels(model, case, m, cfg, device)
                    label = np.asarray(case.label) if case.label is not None else None
                    z, why, focus = _pick_slice(label, pred)
                    x, window, z_in = _cam_input(case, z, focus, cfg)
                    size = x.shape[2:]
                    x = _pad_to(x, multiple, case.pad_value).to(device)
                    label_in = label[window] if label is not None else None
                    wrapper.region, region_name = _score_region(wrapper, x, label_in, multiple)
                    image_in, pred_in = np.asarray(case.image[window]), pred[window]
                    for (layer, name), cam in cams.items():
                        with warnings.catch_warnings():
                            # a layer whose input is the image (no gradient): torch warns that the full backward
                            # hook sees the output's gradient only, which is the one a CAM reads
                            warnings.filterwarnings("ignore", FULL_BACKWARD_HOOK_WARNING, UserWarning)
                            raw = cam(x, class_idx=TUMOUR)[(..., *[slice(0, s) for s in size])]
                        heat, top = _unit(raw)
                        if dims == 2:
                            heat = heat[None]  # (1, x, y): the slice, like image_in
                        short = short_name(layer)
                        path = out / m / f"{_sanitise(case.case_id)}_{name}_{_sanitise(short)}.png"
                        title = f"{case.case_id} ({m}), axial slice {z} ({why}); {cfg.train.mode} model, "
                        title += f"{ckpt_path.name}{epoch}"
                        heat_title = f"{METHODS[name]}, tumour, at {short}\nscore region: {region_name}"
                        if top <= 0:
                            heat_title += " (map all zero)"
                        panels = (
                            image_in[z_in],
                            None if label_in is None else label_in[z_in],
                            pred_in[z_in],
                            heat[z_in],
                        )
                        written.append(_figure(path, *panels, title, heat_title))
                    wrapper.region = None
            finally:
                bar.close()  # also on an error: the message then starts on a clean line
    return written


def _probe_size(cfg: Any) -> int:
    """Side of the zero input that finds the layers: 32, or twice ``2**levels`` for deeper nets."""
    return max(32, 2 ** (len(cfg.model.features) + 1))


def _modalities(modality: str, run_modalities: Sequence[str]) -> list[str]:
    if modality == "both":
        return list(run_modalities)
    if modality not in ("ct", "mri"):
        raise ValueError(f"modality must be ct, mri or both, got {modality!r}")
    if modality not in run_modalities:
        raise ValueError(f"this run's model has no {modality} stream (its modalities: {', '.join(run_modalities)})")
    return [modality]


def build_parser() -> argparse.ArgumentParser:
    """The ``aqcf-explain`` command line."""
    p = argparse.ArgumentParser(
        prog="aqcf-explain",
        description="Grad-CAM / Grad-CAM++ (MONAI) maps of the tumour class of a trained run, as PNG overlays "
        "(image, ground truth, prediction, heat map) under OUT/{modality}/{case}_{method}_{layer}.png.",
    )
    p.add_argument("run_dir", type=Path, help="the --out folder of aqcf-train")
    p.add_argument("--checkpoint", default="best", help="best (default), last, or a path to a checkpoint")
    p.add_argument(
        "--modality",
        default="both",
        choices=["ct", "mri", "both"],
        help="stream(s) to explain (default both: every stream of the run)",
    )
    p.add_argument("--layers", nargs="+", metavar="NAME", help="layers to explain (default: deepest encoder level)")
    p.add_argument(
        "--method", default="both", choices=[*METHODS, "both"], help="Grad-CAM, Grad-CAM++ or both (default both)"
    )
    p.add_argument("--cases", type=int, default=3, help="cases per modality (the first of the split; default 3)")
    p.add_argument("--split", default="test", choices=SPLITS, help="which part of the saved split (default test)")
    p.add_argument("--out", type=Path, help="output folder (default RUN_DIR/explain)")
    p.add_argument("--device", default="auto", help=f"{DEVICE_CHOICES_HELP} (default auto)")
    p.add_argument("--set", action="append", default=[], metavar="data.KEY=VALUE", help="override a data path")
    p.add_argument(
        "--list-layers", action="store_true", help="print the layer names --layers accepts (as PNG names spell them)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _list_layers(run_dir: Path, checkpoint: str, modality: str, device: str) -> None:
    device = resolve_device(device)
    model, cfg, _ = load_run_checkpoint(resolve_checkpoint(run_dir, checkpoint, command="aqcf-explain"), device)
    size = _probe_size(cfg)
    for m in _modalities(modality, cfg.modalities):
        defaults = set(default_layers(model, m))
        print(f"{m} stream ({cfg.train.mode} model; output shapes (C, *S) for a {size}-voxel input; * = default):")
        for name, shape in available_layers(model, m, cfg.model.spatial_dims, size).items():
            print(f"  {'*' if name in defaults else ' '} {short_name(name):<48} {tuple(shape)}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``aqcf-explain``; returns the exit status (2 on a user-facing error, 130 on Ctrl-C)."""
    args = build_parser().parse_args(argv)
    try:
        if args.list_layers:
            _list_layers(args.run_dir, args.checkpoint, args.modality, args.device)
            return 0
        paths = explain(
            args.run_dir,
            checkpoint=args.checkpoint,
            modality=args.modality,
            layers=args.layers,
            method=args.method,
            cases=args.cases,
            out=args.out,
            split=args.split,
            device=args.device,
            data_overrides=args.set,
            progress=False if args.quiet else None,
        )
    except KeyboardInterrupt:
        print("aqcf-explain: interrupted; the PNGs written so far are kept", file=sys.stderr, flush=True)
        return 130
    except (ValueError, FileNotFoundError) as e:
        print(f"aqcf-explain: error: {e}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
