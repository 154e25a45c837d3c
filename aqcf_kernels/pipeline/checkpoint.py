"""Checkpoints written atomically, read safely, and the models a run config describes.

A checkpoint is one ``torch.save`` dict of tensors and plain Python values only (dicts, lists,
tuples, str, int, float, bool, None), so that it is read with ``torch.load(weights_only=True)``:
a checkpoint from someone else (``aqcf-predict`` on a shared run) can hold no code that runs on load.
Keys: ``config`` (the run's :class:`RunConfig` as a plain dict), ``model`` (state dict), and for
training ``optimizer``, ``scheduler``, ``loader`` (sampler position), ``rng`` (torch, numpy,
python, CUDA; numpy's as plain parts, see :func:`~aqcf_kernels.pipeline.train.rng_state`),
``epochs_done`` (how many epochs had finished: the 1-based number of the last one, as in
``metrics.jsonl``), ``step``, ``best`` (the best selection value so far), ``selection`` (the
best-checkpoint criterion's state: ``criterion`` text, ``alpha``, ``ema``, ``best``,
``best_epoch``), ``role`` (``"best"`` or ``"last"``) and ``selected_by`` (why ``best.pt`` holds
these weights). :func:`checkpoint_info` turns these into what evaluation reports.

A file that needs anything else to load (a code-executing pickle, or a checkpoint of an older
aqcf-train, which kept numpy arrays) is refused by :func:`load_checkpoint` with
:class:`UnsafeCheckpointError`, naming what it would import; nothing in it is run, and there is no
unsafe fallback.

A checkpoint is written to a temporary file in the same folder, flushed to disk and renamed over
the old one: an interruption leaves the previous checkpoint intact, never a torn file.
"""

from __future__ import annotations

import math
import os
import pickletools
import re
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..models import AQCFNet
from .config import RunConfig


def _umask() -> int:
    """The process's umask (reading it means setting it: put back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` through a temporary file in the same folder, flushed and renamed over it.

    The file gets the mode a plain ``open(path, "wb")`` would give it (``0o666 & ~umask``): mkstemp
    creates its file 0600, which would make checkpoints the only files of a run others cannot read.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # before the rename: the final name never has mkstemp's 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:  # the rename itself must reach the disk too
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


class CheckpointMismatchError(ValueError):
    """A checkpoint whose weights do not load into the model its own config describes (one line naming it)."""


class UnsafeCheckpointError(ValueError):
    """A file that ``torch.load(weights_only=True)`` refuses because its pickle imports or calls more
    than tensors and plain values need; it was not run."""


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint dict at ``path``, read with ``torch.load(weights_only=True)`` onto the CPU.

    Raises:
        FileNotFoundError: no such file.
        UnsafeCheckpointError: its pickle would import anything beyond tensors and plain values (a
            code-executing file, or a checkpoint of an older aqcf-train); one line naming the file
            and what it would import. Nothing in it is run and there is no unsafe retry.
        ValueError: a damaged file, or not an aqcf-train checkpoint (no ``config``/``model``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with warnings.catch_warnings():
            # A bare pickle's protocol warns before it is refused; the refusal below says all there is.
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means one of the two things below
        refused = _refused_globals(path, e)
        if refused:
            older = all(name.startswith("numpy.") for name in refused)
            why = (
                "a checkpoint of aqcf-train from before safe loading, whose RNG state held numpy arrays: retrain"
                if older
                else "no aqcf-train checkpoint does: the file may run code when unpickled"
            )
            raise UnsafeCheckpointError(
                f"checkpoint {path} cannot be loaded safely: its pickle imports {', '.join(refused)}, beyond the "
                f"tensors and plain values torch.load(weights_only=True) allows ({why}); nothing in it was run"
            ) from None
        if _is_exported_program(path):
            # torch's reader says "failed locating file data.pkl ... corrupted": it is not damaged, it is a program
            raise ValueError(
                f"checkpoint {path} is an exported program (aqcf-export's .pt2 format, which aqcf-predict runs), "
                "not a training checkpoint: give a .pt file aqcf-train wrote (best, last or its path)"
            ) from None
        if not _looks_like_torch_save(path):
            # torch's unpickler fails on such a file with e.g. "KeyError: 105" (a byte it takes for an opcode)
            raise ValueError(
                f"checkpoint {path} is not readable: not a checkpoint of aqcf_kernels (aqcf-train writes torch.save "
                "files, .pt; this is neither a torch zip archive nor a pickle)"
            ) from None
        raise ValueError(f"checkpoint {path} is not readable ({type(e).__name__}: {_first_line(e)})") from None
    if not isinstance(ckpt, dict) or "config" not in ckpt or "model" not in ckpt:
        raise ValueError(f"checkpoint {path} is not an aqcf-train checkpoint (no config/model)")
    return ckpt


def _is_exported_program(path: Path) -> bool:
    """Whether the file is a ``torch.export.save`` archive (``*/archive_format``, no ``data.pkl``), whatever
    its name."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
    return any(n.endswith("/archive_format") for n in names) and not any(n.endswith("/data.pkl") for n in names)


def _looks_like_torch_save(path: Path) -> bool:
    """Whether the file starts as a ``torch.save`` file does: a zip archive, or a pickle (the legacy format,
    and bare pickles): a damaged one of those is "not readable", anything else not a checkpoint at all."""
    with path.open("rb") as f:
        head = f.read(4)
    return head.startswith((b"PK\x03\x04", b"\x80"))


def _first_line(error: BaseException) -> str:
    """The informative line of an error: torch's weights-only refusals wrap it in a paragraph of advice."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    boilerplate = ("Weights only load failed", "(1)", "(2)", "Please file an issue", "Check the documentation")
    useful = [line for line in lines if not line.startswith(boilerplate)]
    return (useful or lines or [type(error).__name__])[0]


def _refused_globals(path: Path, error: BaseException) -> list[str]:
    """``module.name`` of each global the file's pickle imports that weights-only loading does not
    allow, found by reading the pickle (never running it); empty for a damaged file."""
    try:  # a zip checkpoint (torch.save's format): torch lists them itself
        names = list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001 - a bare pickle or a legacy (non-zip) torch.save file
        names = _pickle_globals(path)
    # The refusal itself names the global it stopped at (legacy files pickle the data after a header).
    names += re.findall(r"GLOBAL ([\w.]+)", str(error))
    try:
        from torch._weights_only_unpickler import _get_allowed_globals

        allowed = set(_get_allowed_globals())
    except ImportError:  # a future torch without the private list: report every global
        allowed = set()
    return sorted({n for n in names if n not in allowed})


def _pickle_globals(path: Path) -> list[str]:
    """The globals every pickle in the file refers to (``GLOBAL`` and ``STACK_GLOBAL`` opcodes), read by
    :mod:`pickletools`, which decodes opcodes and runs nothing; stops at the first undecodable byte."""
    names: list[str] = []
    strings: list[str] = []
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        try:
            while f.tell() < size:
                for opcode, arg, _ in pickletools.genops(f):
                    if opcode.name == "GLOBAL":
                        names.append(str(arg).replace(" ", "."))
                    elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                        names.append(f"{strings[-2]}.{strings[-1]}")
                    elif isinstance(arg, str):
                        strings.append(arg)
        except Exception:  # noqa: BLE001 - raw tensor bytes or damage: the globals found so far
            pass
    return names


class UnimodalPair(nn.Module):
    """One independent network per modality behind the joint interface ``forward(ct=, mri=) -> dict``."""

    def __init__(self, nets: dict[str, nn.Module]) -> None:
        super().__init__()
        self.nets = nn.ModuleDict(nets)

    def forward(self, ct: Tensor | None = None, mri: Tensor | None = None) -> dict[str, Tensor]:
        return {m: self.nets[m](x) for m, x in (("ct", ct), ("mri", mri)) if x is not None}


def _dynunet(cfg: RunConfig) -> nn.Module:
    from monai.networks.nets import DynUNet

    m, levels = cfg.model, len(cfg.model.features)
    kernel = [[3] * m.spatial_dims] * (levels + 1)
    strides = [[1] * m.spatial_dims] + [[2] * m.spatial_dims] * levels
    # nnU-Net's topology with this run's widths (the real channel counts of AQCF-Net's levels).
    return DynUNet(
        m.spatial_dims,
        in_channels=1,
        out_channels=3,
        kernel_size=kernel,
        strides=strides,
        upsample_kernel_size=strides[1:],
        filters=[*m.features, m.bottleneck],
        norm_name="instance",
        res_block=True,
    )


def build_model(cfg: RunConfig) -> nn.Module:
    """The network of ``cfg.train.mode``: A-QCF-Net (joint), its unimodal baselines, or two DynUNets."""
    if cfg.train.mode == "dynunet":
        return UnimodalPair({"ct": _dynunet(cfg), "mri": _dynunet(cfg)})
    return AQCFNet.from_options(cfg.model_options())


def checkpoint_info(ckpt: dict[str, Any], path: str | os.PathLike) -> dict[str, Any]:
    """Which weights a checkpoint holds and why: plain values for reports, and one ``description`` line.

    Keys: ``file``, ``role`` (``best``/``last``/None), ``epoch`` (of the weights: the checkpoint's
    ``epochs_done``, 1-based as ``metrics.jsonl``),
    ``epochs`` (planned), ``step``, ``fold``, ``selected_by`` (the criterion that made it best, or
    why best is the last epoch), ``criterion`` (the run's best-checkpoint criterion), ``best_epoch``,
    ``best_value`` (the criterion's value at ``best_epoch``), ``description``.
    """
    path = Path(path)
    config = ckpt.get("config") or {}
    selection = ckpt.get("selection") or {}
    epoch = ckpt.get("epochs_done")
    info: dict[str, Any] = {
        "file": str(path),
        "role": ckpt.get("role"),
        "epoch": epoch if isinstance(epoch, int) else None,
        "epochs": (config.get("train") or {}).get("epochs"),
        "step": ckpt.get("step"),
        "fold": (config.get("data") or {}).get("fold"),
        "selected_by": ckpt.get("selected_by"),
        "criterion": selection.get("criterion"),
        "best_epoch": selection.get("best_epoch"),
        "best_value": selection.get("best") if isinstance(selection.get("best"), float) else None,
    }
    if info["best_value"] is not None and not math.isfinite(info["best_value"]):
        info["best_value"] = None
    of = f"/{info['epochs']}" if info["epochs"] else ""
    text = f"{path.name}: weights of epoch {info['epoch'] if info['epoch'] is not None else '?'}{of}"
    if info["step"] is not None:
        text += f" (step {info['step']})"
    if info["fold"] is not None:
        text += f", fold {info['fold']}"
    if info["role"] == "best" and info["selected_by"]:
        text += f"; best by {info['selected_by']}"
        if info["best_value"] is not None and info["best_epoch"] == info["epoch"]:
            text += f" = {info['best_value']:.4f}"
    elif info["role"] == "last":
        text += "; the last saved epoch"
        if info["best_epoch"] is not None and info["criterion"]:
            text += f" (best.pt: epoch {info['best_epoch']}, by {info['criterion']})"
    else:
        text += "; how these weights were chosen is not recorded (a checkpoint from before the criterion was)"
    info["description"] = text
    return info


def load_run_checkpoint(
    path: str | os.PathLike, device: str | torch.device = "auto"
) -> tuple[nn.Module, RunConfig, dict[str, Any]]:
    """The model of a checkpoint (weights loaded, eval mode, on ``device``), its config and :func:`checkpoint_info`."""
    from .device import resolve_device

    device = resolve_device(device)
    ckpt = load_checkpoint(path)
    cfg = RunConfig.from_dict(ckpt["config"], f"{path} (config)")
    model = build_model(cfg)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:  # state dict and config disagree: a damaged or hand-edited checkpoint
        raise CheckpointMismatchError(
            f"checkpoint {path} does not load into the model its config describes ({_first_line(e)})"
        ) from e
    return model.to(device).eval(), cfg, checkpoint_info(ckpt, path)


def load_for_inference(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, RunConfig]:
    """The model of a checkpoint, weights loaded, in eval mode, and its run config."""
    model, cfg, _ = load_run_checkpoint(path, device)
    return model, cfg
