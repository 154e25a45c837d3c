"""``aqcf-train``: unpaired joint training of A-QCF-Net (or a baseline) from a YAML config.

    aqcf-train --config configs/lits_atlas.yaml --out runs/joint
    aqcf-train --config configs/lits_atlas.yaml --out runs/ct --set train.mode=ct
    aqcf-train --config configs/lits_atlas.yaml --out runs/fold0 --fold 0      # 5-fold cross-validation
    aqcf-train --config configs/lits_atlas.yaml --out runs/joint --resume       # continue where it stopped
    torchrun --nproc-per-node 2 -m aqcf_kernels.pipeline.train --config ... --out ...

Every step takes one CT batch and one MRI batch (independent, unpaired samplers) and sums MONAI's
DiceCELoss of each stream. AdamW with linear warm-up and a cosine decay per step; bf16 autocast on
CUDA; gradient clipping. Each epoch ends with sliding-window validation on whole volumes and writes
``last.pt`` atomically; ``metrics.jsonl`` and ``curves.png`` follow the run.

**best.pt** is chosen much as nnU-Net chooses its best checkpoint: the highest exponential moving
average (alpha 0.9) of the mean foreground Dice, the mean of liver and tumour Dice over the
modalities (:func:`selection_score`, :class:`BestSelection`). A tumour Dice of 0 early in training
counts as 0 rather than deciding alone, and one lucky validation cannot win by itself: the EMA
starts at 0, so even the first validation weighs only 10% (nnU-Net starts it at the first score,
which lets a lucky first epoch win a short run; the two agree after a few dozen validations). The
checkpoint, the ``metrics.jsonl`` rows (``best_epoch``, ``ema``) and ``curves.png`` record which
epoch won and by what criterion. A run without validation cases (``--fold all``) keeps the last
epoch as best.

**Folds**: ``--fold k`` (``data.fold``) trains fold k of ``data.folds`` (5) patient-level folds
(nnU-Net's convention; the same held-out test set for every fold of a seed), ``--fold all`` on
every non-test case. ``--device`` (``train.device``, default ``auto``) picks the device; under
torchrun each rank uses its own GPU.

**Interrupting and resuming**: Ctrl-C ends with one line saying what was saved (``last.pt`` is
written at that moment if an epoch finished since the last save) and the exact command that
continues. ``--resume`` restores model, optimiser, scheduler, sampler position and every RNG, so an
interrupted run ends with the weights an uninterrupted one would have; it takes the run's own
config from ``last.pt``, or the original command line if its config equals that one (a different
config is an error naming each differing key; only ``train.device`` may change).
The data (cases, cache, split, samplers) comes from :mod:`aqcf_kernels.pipeline.data`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .._help import plain_text
from ..data.outputs import check_output_dir, output_dir
from .checkpoint import build_model, load_checkpoint, save_atomic
from .config import (
    RESUME_MAY_CHANGE,
    RunConfig,
    apply_override,
    apply_overrides,
    config_diff,
    format_diff,
    load_config,
)
from .data import SPLIT_FILE, SingleStream, make_loader, prepare_data
from .device import DEVICE_CHOICES_HELP, resolve_device
from .inference import predict_case_labels
from .metrics import dice

if TYPE_CHECKING:
    from ..data import CachedCase, JointLoader
    from .config import TrainConfig


# ---------------------------------------------------------------------------------------------
# Optimisation
# ---------------------------------------------------------------------------------------------


def lr_lambda(warmup: int, total: int):
    """Linear warm-up to the base rate, then a cosine decay to 0 at ``total`` steps."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def deep_supervision_loss(loss_fn, outputs: Tensor | Sequence[Tensor], label: Tensor) -> Tensor:
    """The loss of the full-resolution head, plus nnU-Net-style halving weights for coarser heads."""
    if isinstance(outputs, Tensor):
        return loss_fn(outputs, label[:, None])
    weights = [0.5**i for i in range(len(outputs))]
    total = 0.0
    for w, out in zip(weights, outputs, strict=True):
        target = label[:, None].float()
        if out.shape[2:] != label.shape[1:]:
            target = F.interpolate(target, size=out.shape[2:], mode="nearest-exact")
        total = total + w * loss_fn(out, target)
    return total / sum(weights)


class _Step(nn.Module):
    """One training forward as ONE module call (DDP allows one forward per backward): the joint
    forward, or each modality on its own (a solo step; shared layers then run twice)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: dict[str, Tensor], solo: bool) -> dict[str, Any]:
        if solo:
            return {m: self.model(**{m: x})[m] for m, x in inputs.items()}
        return self.model(**inputs)


def solo_step(t, step: int) -> bool:
    """Whether joint step ``step`` runs the modalities apart: a function of (seed, step) alone, so a
    resumed run and every DDP rank agree."""
    return random.Random(t.seed * 1_000_003 + step).random() < t.solo_prob


def rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors and plain values (what :func:`~.checkpoint.load_checkpoint` reads safely).

    numpy's legacy MT19937 state becomes its parts, the 624-word key as an int64 tensor; python's is
    ``(version, tuple of 625 ints, gauss)`` already; torch's and CUDA's are uint8 tensors.
    """
    bit_generator, key, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "bit_generator": str(bit_generator),
            "key": torch.from_numpy(key.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved, bit for bit."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    key = n["key"].numpy().astype(np.uint32)
    np.random.set_state((n["bit_generator"], key, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------
# Validation, logs, plots
# ---------------------------------------------------------------------------------------------


def validate(model: nn.Module, cfg: RunConfig, val_cases: dict[str, list], device) -> dict[str, float]:
    """Mean liver/tumour Dice (nnU-Net's rule) of whole-volume predictions per modality."""
    out: dict[str, float] = {}
    for modality, cases in val_cases.items():
        cases = cases[: cfg.train.val_cases] if cfg.train.val_cases else cases
        scores: dict[str, list[float]] = {"liver": [], "tumour": []}
        for case in cases:
            pred = predict_case_labels(model, case, modality, cfg, device)
            for region in scores:
                scores[region].append(dice(pred, np.asarray(case.label), region))
        for region, values in scores.items():
            defined = [v for v in values if not math.isnan(v)]
            out[f"{modality}_dice_{region}"] = float(np.mean(defined)) if defined else float("nan")
    out["score"] = selection_score(out)
    return out


#: Smoothing of the best-checkpoint criterion (as nnU-Net: ``ema = 0.9 * ema + 0.1 * pseudo_dice``).
EMA_ALPHA = 0.9


def selection_score(val: dict[str, float]) -> float:
    """One validation's value for the best-checkpoint criterion: the mean foreground Dice.

    The mean of every defined ``{modality}_dice_liver`` and ``{modality}_dice_tumour`` (NaN ones,
    e.g. no tumour in any validation case, are skipped); NaN where none is defined. A tumour Dice of
    0 (typical early in training) weighs as one region of four, never as the whole score.
    """
    values = [v for k, v in val.items() if k.endswith(("_dice_liver", "_dice_tumour")) and not math.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def criterion_text(modalities: Sequence[str], alpha: float = EMA_ALPHA) -> str:
    """The best-checkpoint criterion in words, as checkpoints, logs and evaluations record it."""
    return (
        f"the highest EMA (alpha {alpha}, from 0) of the mean foreground Dice (liver and tumour, "
        f"{' and '.join(m.upper() for m in modalities)}) on the validation cases"
    )


def no_validation_text(fold: int | str | None) -> str:
    """What best.pt is in a run without validation cases."""
    why = "fold 'all' trains on every non-test case" if fold == "all" else "the run has no validation cases"
    return f"being the last epoch ({why}, so there is no validation to choose by)"


@dataclass
class BestSelection:
    """The rule for ``best.pt``: the epoch with the highest exponential moving average of
    :func:`selection_score`, ``ema = alpha * ema + (1 - alpha) * score`` from ``ema = 0``.

    nnU-Net's rule, but for the start: nnU-Net starts the EMA at the first score, so in a short run
    a lucky first validation stays best unless later ones beat it by a wide margin. From 0, the
    EMA after validation t is nnU-Net's minus ``alpha**t`` times the first score: a handicap on
    early epochs (a first validation weighs 10%, not 100%) that fades after a few dozen
    validations, where the two choose alike. The EMA is therefore no Dice estimate early on.
    Epochs are 1-based, as in ``metrics.jsonl``; validations with a NaN score leave the EMA as is.
    """

    criterion: str = ""
    alpha: float = EMA_ALPHA
    ema: float | None = None  # after the last validation (None before the first)
    best: float = -math.inf  # the highest EMA so far
    best_epoch: int | None = None  # the epoch it was reached at (that of best.pt)

    def update(self, epoch: int, score: float) -> bool:
        """Fold in the score of ``epoch``; True when this epoch becomes the best."""
        if math.isnan(score):
            return False
        self.ema = self.alpha * (self.ema or 0.0) + (1.0 - self.alpha) * score
        if self.ema > self.best:
            self.best, self.best_epoch = self.ema, epoch
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_state(cls, state: dict[str, Any] | None, criterion: str) -> BestSelection:
        """A selection restored from a checkpoint (a fresh one for checkpoints from before the criterion)."""
        if not state or state.get("criterion") != criterion:
            return cls(criterion=criterion)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in state.items() if k in known})


def best_epoch_by_ema(scores: Sequence[float], alpha: float = EMA_ALPHA) -> int | None:
    """The epoch (1-based) :class:`BestSelection` picks from one score per epoch (None if all are NaN)."""
    selection = BestSelection(alpha=alpha)
    for epoch, score in enumerate(scores, start=1):
        selection.update(epoch, score)
    return selection.best_epoch


def plot_curves(log_path: Path, png_path: Path) -> None:
    """Training loss per logged step and validation Dice per epoch, from ``metrics.jsonl``; the EMA that
    selects ``best.pt`` dashed, and the epoch of ``best.pt`` marked on both panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    steps = [r for r in rows if r.get("kind") == "train"]
    epochs = [r for r in rows if r.get("kind") == "val"]
    sessions = [r for r in rows if r.get("kind") == "run"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for key in sorted({k for r in steps for k in r if k.startswith("loss")}):
        ax1.plot([r["step"] for r in steps if key in r], [r[key] for r in steps if key in r], label=key)
    ax1.set(xlabel="step", ylabel="loss", title="training loss", yscale="log")
    for key in sorted({k for r in epochs for k in r if "dice" in k}):
        ax2.plot([r["epoch"] for r in epochs], [r.get(key, float("nan")) for r in epochs], marker="o", label=key)
    smoothed = [r for r in epochs if r.get("ema") is not None]
    if smoothed:
        ax2.plot([r["epoch"] for r in smoothed], [r["ema"] for r in smoothed], "k--", lw=1.2,
                 label=f"EMA ({EMA_ALPHA}) of mean fg Dice (selects best.pt)")  # fmt: skip
    best = next((r["best_epoch"] for r in reversed(epochs) if r.get("best_epoch") is not None), None)
    if best is not None:
        validated = not sessions or sessions[-1].get("validates", True)
        label = f"best.pt: epoch {best}" + (" (highest EMA)" if validated else " (= last, no validation)")
        ax2.axvline(best, color="tab:red", ls=":", lw=1.5, label=label)
        step = next((r["step"] for r in epochs if r.get("epoch") == best), None)
        if step is not None:
            ax1.axvline(step, color="tab:red", ls=":", lw=1.5, label=label)
    ax2.set(xlabel="epoch", ylabel="Dice", title="validation (whole volumes)", ylim=(0, 1))
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# The run: train() = setup_run, then per epoch train_epoch and (rank 0) finish_epoch
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainingRun:
    """One process's training state: what it was built from, what it trains, and where it stands."""

    cfg: RunConfig  # the resolved config (absolute paths; on resume, the checkpoint's own)
    run_dir: Path
    rank: int
    world_size: int
    device: torch.device
    data: dict[str, dict[str, list[CachedCase]]]  # modality -> split part -> cases
    model: nn.Module
    net: nn.Module  # the model as one module call per step (_Step), wrapped in DDP across processes
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    loader: JointLoader | SingleStream
    loss_fn: nn.Module
    solo_steps: bool  # some joint steps run the modalities apart (solo_step)
    amp: bool  # bf16 autocast
    start_epoch: int = 0  # the first epoch this process runs (0-based)
    step: int = 0  # optimiser steps taken so far, over every session of the run
    selection: BestSelection = field(default_factory=BestSelection)  # what chose best.pt so far
    validates: bool = True  # False without validation cases (fold 'all'): best.pt is the last epoch
    current_epoch: int = -1  # the epoch (0-based) being trained or finished now
    trained_epoch: int = -1  # the last epoch (0-based) whose optimisation steps all ran
    saved_epoch: int = -1  # the epoch (0-based) last.pt holds
    # An epoch is finished (finish_epoch, rank 0) once its validation is in `selection` and its rows are logged. A
    # Ctrl-C between its training and that end saves it as unfinished: its training row and every RNG as its
    # training left them (validation may draw from them), so that --resume finishes it as an unbroken run would.
    finished_epoch: int = -1  # the last epoch (0-based) finished
    logged_epoch: int = -1  # the last epoch (0-based) whose training row is in metrics.jsonl
    epoch_row: dict[str, Any] | None = None  # trained_epoch's training row
    epoch_rng: dict[str, Any] | None = None  # every RNG's state as trained_epoch's training steps left it

    @property
    def main_process(self) -> bool:
        return self.rank == 0

    @property
    def log_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"


class TrainingInterrupted(Exception):
    """Ctrl-C during training, after :func:`train` saved what could be saved; ``str()`` says what that was."""

    def __init__(
        self,
        run_dir: Path,
        epoch: int,
        epochs: int,
        saved_epoch: int | None,
        written_now: bool,
        main_process: bool,
        unvalidated: bool = False,
    ) -> None:
        self.run_dir, self.epoch, self.epochs = run_dir, epoch, epochs
        self.saved_epoch, self.written_now, self.main_process = saved_epoch, written_now, main_process
        self.unvalidated = unvalidated
        super().__init__(self.summary())

    def summary(self) -> str:
        where = f"interrupted in epoch {self.epoch}/{self.epochs}"
        last = self.run_dir / "last.pt"
        if self.saved_epoch is None:
            return f"{where} before any epoch finished: nothing saved"
        if self.written_now:
            validation = "; its validation runs first when resumed" if self.unvalidated else ""
            return f"{where}: saved {last} (epoch {self.saved_epoch}, written now{validation})"
        return f"{where}: {last} holds epoch {self.saved_epoch}, the last completed"

    @property
    def resumable(self) -> bool:
        return self.saved_epoch is not None


class RunComplete(Exception):
    """``--resume`` of a run whose ``last.pt`` already holds its last epoch: nothing to train; ``str()`` says so."""


def train(
    cfg: RunConfig | None,
    run_dir: str | Path,
    *,
    resume: bool = False,
    max_epochs_this_run: int | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Train until ``cfg.train.epochs`` (or ``max_epochs_this_run`` more epochs); returns the last record.

    Args:
        cfg: the run's config; with ``resume``, None takes the run's own (from ``last.pt``), and a
            config must equal it (except ``train.device``) or it is a ValueError listing the differences.
        run_dir: the run folder (``--out``).
        resume: continue the run in ``run_dir`` from ``last.pt``.
        max_epochs_this_run: stop after this many epochs of this session (a job-length limit).
        device: overrides ``train.device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``).

    A ``resume`` of a run that already finished all its epochs says so (one line, rank 0), trains
    nothing, appends nothing to ``metrics.jsonl`` and returns ``{}``.

    Raises:
        TrainingInterrupted: on KeyboardInterrupt, after writing ``last.pt`` if an epoch finished since
            the last save.
        DeviceError: a device this machine cannot provide (a ValueError).
        ValueError: ``max_epochs_this_run`` below 1.
    """
    if max_epochs_this_run is not None and max_epochs_this_run < 1:
        raise ValueError(f"--max-epochs-this-run must be at least 1, got {max_epochs_this_run}")
    run_dir = Path(run_dir)
    try:
        run = setup_run(cfg, run_dir, resume=resume, device=device)
    except RunComplete as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"aqcf-train: {e}", flush=True)
        return {}
    t = run.cfg.train
    stop = t.epochs if max_epochs_this_run is None else min(t.epochs, run.start_epoch + max_epochs_this_run)
    record: dict[str, Any] = {}
    try:
        if run.finished_epoch < run.trained_epoch:  # resumed from a Ctrl-C in that epoch's validation
            run.current_epoch = run.trained_epoch
            if run.main_process:
                record = finish_epoch(run, run.trained_epoch)
            _barrier()
        for epoch in range(run.start_epoch, stop):
            run.current_epoch = epoch
            losses, seconds = train_epoch(run, epoch)
            if run.main_process:
                run.epoch_row, run.epoch_rng = training_row(run, epoch, losses, seconds), rng_state()
            run.trained_epoch = epoch
            if run.main_process:
                record = finish_epoch(run, epoch)
            _barrier()
    except KeyboardInterrupt:
        raise save_on_interrupt(run) from None
    if run.main_process:
        _ensure_best_checkpoint(run)
        if stop < t.epochs:  # the job-length limit, not the run's end: say where it is and how it goes on
            print(
                f"aqcf-train: stopped after epoch {stop} of {t.epochs} (--max-epochs-this-run {max_epochs_this_run}); "
                f"{run.run_dir / 'last.pt'} holds it; continue with: aqcf-train --out {shlex.quote(str(run.run_dir))} "
                "--resume",
                flush=True,
            )
    return record


def save_on_interrupt(run: TrainingRun) -> TrainingInterrupted:
    """After a KeyboardInterrupt: write ``last.pt`` (rank 0, atomically) if an epoch's training finished since
    the last save, and say what the run folder now holds. An epoch interrupted before it was finished (its
    validation) is saved as unfinished: ``--resume`` finishes it first, from the RNG states its training left."""
    written = unfinished = False
    if run.main_process and run.trained_epoch > run.saved_epoch:
        selection = dataclasses.replace(run.selection)
        if not run.validates:
            selection.best_epoch = run.trained_epoch + 1
        unfinished = run.finished_epoch < run.trained_epoch
        save_checkpoints(run, run.trained_epoch, selection, best=not run.validates, unfinished=unfinished)
        written = True
    saved = run.saved_epoch + 1 if run.saved_epoch >= 0 else None
    epochs = run.cfg.train.epochs
    return TrainingInterrupted(
        run.run_dir, run.current_epoch + 1, epochs, saved, written, run.main_process,
        unfinished and _validation_due(run, run.trained_epoch),
    )  # fmt: skip


def resolve_run_config(cfg: RunConfig | None, run_dir: Path, ckpt: dict[str, Any]) -> RunConfig:
    """The config a resumed run continues with: the run's own (``ckpt``'s), ``train.device`` taken from
    ``cfg`` when given; a ``cfg`` that differs in any other key is a ValueError listing each
    (``section.key: old → new``)."""
    source = run_dir / "last.pt"
    saved = RunConfig.from_dict(ckpt["config"], f"{source} (config)")
    if cfg is None:
        return saved
    diff = config_diff(saved, cfg.with_absolute_paths(), ignore=RESUME_MAY_CHANGE)
    if diff:
        raise ValueError(
            f"--resume: this command's config differs from the run's own (in {source}): {format_diff(diff)}; "
            f"give the original command line, or just --out {run_dir} --resume"
        )
    for key in RESUME_MAY_CHANGE:
        section, name = key.split(".")
        apply_override(saved, key, getattr(getattr(cfg, section), name))
    return saved


def setup_run(cfg: RunConfig | None, run_dir: Path, *, resume: bool = False, device: str | None = None) -> TrainingRun:
    """This process's run, ready for its next epoch: DDP initialised, the run folder and data prepared,
    model/optimiser/scheduler/loader built and, on ``resume``, restored from ``last.pt`` (whose config
    replaces ``cfg``: :func:`resolve_run_config`) with every RNG. ``device`` overrides ``train.device``."""
    ckpt = None
    if resume:
        ckpt = load_checkpoint(run_dir / "last.pt")
        cfg = resolve_run_config(cfg, run_dir, ckpt)
        if int(os.environ.get("RANK", "0")) == 0:
            _log_saved_validation(run_dir, ckpt)
        done = ckpt.get("epochs_done")
        if isinstance(done, int) and done >= cfg.train.epochs and not ckpt.get("unfinished"):
            # before anything is set up or logged: a repeated --resume must not add "resume" rows
            raise RunComplete(
                f"{run_dir} is already complete ({run_dir / 'last.pt'} holds epoch {done} of "
                f"{cfg.train.epochs}); nothing to train"
            )
    elif cfg is None:
        raise ValueError("a new run needs a config")
    else:
        cfg = cfg.with_absolute_paths()
    if device is not None:
        apply_override(cfg, "train.device", device, "--device")
    rank, world_size, torch_device = _distributed(cfg.train.device)
    _seed_everything(cfg.train.seed)
    data = _prepare_run_folder(cfg, run_dir, main_process=rank == 0)
    model = build_model(cfg).to(torch_device)
    optimizer, scheduler = build_optimizer(model, cfg.train)
    loader = make_loader(cfg, {m: data[m]["train"] for m in cfg.modalities}, rank, world_size)
    validates = any(data[m]["val"] for m in cfg.modalities)
    criterion = criterion_text(cfg.modalities) if validates else no_validation_text(cfg.data.fold)
    start_epoch, step, selection = 0, 0, BestSelection(criterion=criterion)
    if ckpt is not None:
        start_epoch, step, selection = restore_training(ckpt, model, optimizer, scheduler, loader, criterion)
    # Solo steps leave the fusion blocks out of the graph: DDP must expect unused parameters.
    solo_steps = cfg.train.mode == "joint" and cfg.train.solo_prob > 0
    net: nn.Module = _Step(model)
    if world_size > 1:
        net = nn.parallel.DistributedDataParallel(net, find_unused_parameters=solo_steps)

    from monai.losses import DiceCELoss

    run = TrainingRun(
        cfg=cfg,
        run_dir=run_dir,
        rank=rank,
        world_size=world_size,
        device=torch_device,
        data=data,
        model=model,
        net=net,
        optimizer=optimizer,
        scheduler=scheduler,
        loader=loader,
        loss_fn=DiceCELoss(to_onehot_y=True, softmax=True),
        solo_steps=solo_steps,
        amp=cfg.train.amp and torch_device.type == "cuda",
        start_epoch=start_epoch,
        step=step,
        selection=selection,
        validates=validates,
        current_epoch=start_epoch - 1,
        trained_epoch=start_epoch - 1,
        saved_epoch=start_epoch - 1,
        finished_epoch=start_epoch - 1,
        logged_epoch=start_epoch - 1,
    )
    unfinished = ckpt.get("unfinished") if ckpt is not None else None
    if unfinished:  # a Ctrl-C in its last epoch's validation: train() finishes that epoch first
        run.finished_epoch = start_epoch - 2
        run.logged_epoch = start_epoch - (1 if unfinished["logged"] else 2)
        run.epoch_row, run.epoch_rng = unfinished["training_row"], ckpt["rng"]
    if run.main_process:
        _append(run.log_path, {"kind": "run", "session": "resume" if resume else "start", "from_epoch": start_epoch + 1,
                               "device": str(torch_device), "world_size": world_size, "fold": cfg.data.fold,
                               "folds": cfg.data.folds, "validates": validates, "criterion": criterion})  # fmt: skip
        if not validates:
            print(f"aqcf-train: no validation cases (fold {cfg.data.fold!r}): best.pt will be the last epoch's weights",
                  flush=True)  # fmt: skip
    return run


def _distributed(spec: str = "auto") -> tuple[int, int, torch.device]:
    """(rank, world size, device): ``spec`` resolved (:func:`resolve_device`, a one-line DeviceError for a
    device this machine lacks); under torchrun a CUDA device is each rank's own (``LOCAL_RANK``)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(spec)
    if device.type == "cuda":
        if world_size > 1:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        elif device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, world_size, device


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _prepare_run_folder(cfg: RunConfig, run_dir: Path, *, main_process: bool) -> dict[str, dict[str, list]]:
    """``config.json`` and the data (:func:`prepare_data`): rank 0 first, the other ranks once it is done."""
    if main_process:
        with output_dir(run_dir, "--out"):
            config = run_dir / "config.json"
            fresh = not config.exists()  # (a resumed run's folder is never cleaned)
            config.write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
            try:
                data = prepare_data(cfg, run_dir)  # preprocessing writes the cache once, on rank 0
            except BaseException:
                # Bad data, or Ctrl-C while preparing: a new run's folder keeps nothing of this attempt
                # (output_dir then removes the folder it created, now empty), so the same command runs again.
                if fresh:
                    for path in (config, *(run_dir / SPLIT_FILE.format(modality=m) for m in cfg.modalities)):
                        path.unlink(missing_ok=True)
                raise
    _barrier()
    if not main_process:
        data = prepare_data(cfg, run_dir, progress=False)
    return data


def build_optimizer(
    model: nn.Module, t: TrainConfig
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW, and its per-step warm-up + cosine schedule over the whole run (:func:`lr_lambda`)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    total_steps = t.epochs * t.steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t.warmup_steps, total_steps))
    return optimizer, scheduler


def restore_training(
    ckpt: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    loader: JointLoader | SingleStream,
    criterion: str = "",
) -> tuple[int, int, BestSelection]:
    """Load a training checkpoint's states and RNGs in place; returns (next epoch 0-based, step, best selection).

    A checkpoint from before the EMA criterion (or with another ``criterion``) starts a fresh selection.
    """
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    loader.load_state_dict(ckpt["loader"])
    set_rng_state(ckpt["rng"])
    # epochs_done is also the 0-based index of the next epoch
    return ckpt["epochs_done"], ckpt["step"], BestSelection.from_state(ckpt.get("selection"), criterion)


def train_epoch(run: TrainingRun, epoch: int) -> tuple[list[dict[str, float]], float]:
    """The optimisation steps of one epoch; returns each step's losses and the seconds they took."""
    t = run.cfg.train
    run.net.train()
    started, losses = time.perf_counter(), []
    bar = _progress(t.steps_per_epoch, f"epoch {epoch + 1}/{t.epochs}", run.main_process)
    try:
        for _ in range(t.steps_per_epoch):
            losses.append(train_step(run))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]['loss']:.3f}")
    finally:
        bar.close()  # also on Ctrl-C: what is printed next starts on a clean line
    return losses, time.perf_counter() - started


def train_step(run: TrainingRun) -> dict[str, float]:
    """One optimiser step on the loader's next batch; returns the loss and each modality's part of it."""
    modalities, device, t = run.cfg.modalities, run.device, run.cfg.train
    batch = next(run.loader)
    inputs = {m: batch[m]["image"].to(device, non_blocking=True) for m in modalities}
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=run.amp):
        outputs = run.net(inputs, run.solo_steps and solo_step(t, run.step))
    parts = {
        m: deep_supervision_loss(run.loss_fn, _float(outputs[m]), batch[m]["label"].to(device)) for m in modalities
    }
    loss = sum(parts.values())
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if t.grad_clip > 0:
        nn.utils.clip_grad_norm_(run.model.parameters(), t.grad_clip)
    run.optimizer.step()
    run.scheduler.step()
    run.step += 1
    return {k: v.item() for k, v in {"loss": loss, **{f"loss_{m}": p for m, p in parts.items()}}.items()}


def training_row(run: TrainingRun, epoch: int, losses: list[dict[str, float]], seconds: float) -> dict[str, Any]:
    """The ``metrics.jsonl`` row of an epoch's training: its step count, learning rate, seconds and mean losses."""
    mean = {k: float(np.mean([r[k] for r in losses])) for k in losses[0]}
    return {"kind": "train", "epoch": epoch + 1, "step": run.step, "lr": run.scheduler.get_last_lr()[0],
            "seconds": seconds, **mean}  # fmt: skip


def finish_epoch(run: TrainingRun, epoch: int) -> dict[str, Any]:
    """Rank 0 after an epoch's training: its training row (``run.epoch_row``) in ``metrics.jsonl``, validation
    when due, the best-epoch criterion (:class:`BestSelection`), ``best.pt``/``last.pt``, then the validation
    row and ``curves.png``; returns (and prints) the validation record.

    The row is written after the checkpoints, so a Ctrl-C in between never leaves a log naming a
    best epoch that ``best.pt`` does not hold; ``last.pt`` carries the row (``val_row``), and ``--resume``
    appends it if the Ctrl-C came before it was (:func:`_log_saved_validation`).
    """
    if run.logged_epoch < epoch:
        _append(run.log_path, run.epoch_row)
        run.logged_epoch = epoch
    record: dict[str, Any] = {"kind": "val", "epoch": epoch + 1, "step": run.step}
    selection = dataclasses.replace(run.selection)
    new_best = False
    if not run.validates:
        selection.best_epoch, new_best = epoch + 1, True  # best = last
    elif _validation_due(run, epoch):
        record.update(validate(run.model, run.cfg, {m: run.data[m]["val"] for m in run.cfg.modalities}, run.device))
        new_best = selection.update(epoch + 1, record["score"])
        record["ema"] = selection.ema
    record["best_epoch"], record["new_best"] = selection.best_epoch, new_best
    save_checkpoints(run, epoch, selection, best=new_best, val_row=record)
    run.selection = selection  # (not before last.pt holds it: a Ctrl-C saves the epoch unvalidated until then)
    _append(run.log_path, record)
    run.finished_epoch = epoch
    plot_curves(run.log_path, run.run_dir / "curves.png")
    print(json.dumps(record), flush=True)
    return record


def _log_saved_validation(run_dir: Path, ckpt: dict[str, Any]) -> None:
    """Append ``last.pt``'s validation row to ``metrics.jsonl`` (and redraw ``curves.png``) unless the log has it:
    :func:`finish_epoch` writes it just after ``last.pt``, so a Ctrl-C in between left the log without it."""
    row = ckpt.get("val_row")
    if not isinstance(row, dict) or ckpt.get("unfinished"):
        return
    log = run_dir / "metrics.jsonl"
    for line in log.read_text().splitlines() if log.is_file() else []:
        try:
            logged = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(logged, dict) and logged.get("kind") == "val" and logged.get("epoch") == row.get("epoch"):
            return
    _append(log, row)
    plot_curves(log, run_dir / "curves.png")


def _validation_due(run: TrainingRun, epoch: int) -> bool:
    """Whether ``epoch`` (0-based) ends with a validation: every ``val_every`` epochs and the last, given cases."""
    t = run.cfg.train
    return run.validates and ((epoch + 1) % t.val_every == 0 or epoch + 1 == t.epochs)


def checkpoint_state(
    run: TrainingRun, epoch: int, selection: BestSelection | None = None, *, unfinished: bool = False
) -> dict[str, Any]:
    """Everything an exact resume after ``epoch`` (0-based loop index) needs, in the format of
    :mod:`.checkpoint` (``epochs_done = epoch + 1``, tensors and plain values only), RNGs as of now; for an
    ``unfinished`` epoch (trained, not validated: :class:`TrainingRun`), RNGs as its training left them and
    ``unfinished``: its training row and whether ``metrics.jsonl`` has it."""
    selection = run.selection if selection is None else selection
    state = {
        "config": run.cfg.to_dict(),
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "loader": run.loader.state_dict(),
        "rng": run.epoch_rng if unfinished and run.epoch_rng is not None else rng_state(),
        "epochs_done": epoch + 1,
        "step": run.step,
        "best": selection.best,
        "selection": selection.state_dict(),
    }
    if unfinished:
        state["unfinished"] = {"training_row": run.epoch_row, "logged": run.logged_epoch >= epoch}
    return state


def save_checkpoints(
    run: TrainingRun,
    epoch: int,
    selection: BestSelection,
    *,
    best: bool,
    unfinished: bool = False,
    val_row: dict[str, Any] | None = None,
) -> None:
    """``best.pt`` when ``best`` (this epoch is the new best of ``selection``), then ``last.pt``; each
    written atomically (``unfinished``: :func:`checkpoint_state`). ``last.pt`` also holds ``val_row``, the
    ``metrics.jsonl`` row about to follow it (:func:`_log_saved_validation`)."""
    state = checkpoint_state(run, epoch, selection, unfinished=unfinished)
    if best:
        save_atomic({**state, "role": "best", "selected_by": selection.criterion}, run.run_dir / "best.pt")
    last = {**state, "role": "last", "selected_by": None}
    if val_row is not None:
        last["val_row"] = val_row
    save_atomic(last, run.run_dir / "last.pt")
    run.saved_epoch = epoch


def _ensure_best_checkpoint(run: TrainingRun) -> None:
    best, last = run.run_dir / "best.pt", run.run_dir / "last.pt"
    if not best.exists() and last.exists():
        # no validation Dice was ever defined (no liver or tumour in any val case): the last weights stand in
        ckpt = load_checkpoint(last)
        ckpt["role"] = "best"
        ckpt["selected_by"] = "being the last epoch (no validation Dice was ever defined, so none to choose by)"
        save_atomic(ckpt, best)


def _float(out):
    return [o.float() for o in out] if isinstance(out, (list, tuple)) else out.float()


def _append(path: Path, row: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", disable=not enabled or None, leave=False)


RESUME_HELP = """\
resuming: --resume continues the run in --out from its last.pt (written atomically after every
epoch, and at the moment of a Ctrl-C if an epoch's training finished since; an epoch interrupted
in its validation is validated first): model, optimiser, scheduler, sampler position and every RNG,
so the result equals an uninterrupted run's. Give either just
--out DIR --resume (the run's own config), or the original command line plus --resume: its config
(--config, --set, --fold) must then equal the run's, else the differing keys are listed and nothing
runs; only --device (train.device) may change. --set and --fold without --config apply to the run's
own config. Ctrl-C prints the exact command that continues.

best.pt: the epoch with the highest EMA (alpha 0.9, started at 0 so that a lucky early validation
cannot win) of the mean foreground Dice (liver and tumour, every modality) on the validation
cases, much as nnU-Net; --fold all (no validation) keeps the last epoch."""


def _fold(text: str) -> int | str:
    if text == "all":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fold number or 'all', got {text!r}") from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``aqcf-train`` command line."""
    p = argparse.ArgumentParser(
        prog="aqcf-train",
        description=plain_text(__doc__.split("\n\n")[0]),
        epilog=RESUME_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", type=Path, help="YAML config (see configs/); defaults if omitted")
    p.add_argument("--out", type=Path, required=True, help="run folder: checkpoints, metrics.jsonl, curves.png")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
    p.add_argument("--fold", type=_fold, metavar="K|all",
                   help="cross-validation fold (data.fold): K in 0..data.folds-1 (5 folds by default, patient-level, "
                        "the test set held out), or 'all' (train on every non-test case, no validation)")  # fmt: skip
    p.add_argument("--device", help=f"train.device: {DEVICE_CHOICES_HELP} (default auto; torchrun: each rank's GPU)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from last.pt (see 'resuming' below)")  # fmt: skip
    p.add_argument("--max-epochs-this-run", type=_positive_int, default=None, metavar="N",
                   help="stop after N >= 1 epochs (a job-length limit); --resume continues")  # fmt: skip
    return p


def _command_config(args: argparse.Namespace, base: Path | None = None) -> RunConfig:
    """The config the command line describes: --config (or the run's own, from the checkpoint ``base``: a
    ``--resume`` with ``--set`` but no ``--config`` is compared on what it sets, not on every default), then
    --set, then --fold and --device."""
    if base is None:
        cfg = load_config(args.config, args.set)
    else:
        cfg = RunConfig.from_dict(load_checkpoint(base)["config"], f"{base} (config)")
        apply_overrides(cfg, args.set)
    if args.fold is not None:
        apply_override(cfg, "data.fold", args.fold, "--fold")
    if args.device is not None:
        apply_override(cfg, "train.device", args.device, "--device")
    cfg.validate()
    return cfg


def continue_command(argv: Sequence[str], resume: bool) -> str:
    """The shell command that continues (``resume``) or restarts this run: the same arguments, plus or
    minus ``--resume``, under ``aqcf-train`` (or ``torchrun ... -m aqcf_kernels.pipeline.train``)."""
    args = [a for a in argv if a != "--resume"] + (["--resume"] if resume else [])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        nodes = [f"--nnodes={world // local}"] if world > local else []
        launcher = ["torchrun", *nodes, f"--nproc-per-node={local}", "-m", "aqcf_kernels.pipeline.train"]
    else:
        launcher = ["aqcf-train"]
    return shlex.join([*launcher, *args])


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``aqcf-train``; returns the exit status (2 on a user-facing error, 130 on Ctrl-C)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    main_process = int(os.environ.get("RANK", "0")) == 0
    try:
        check_output_dir(args.out, "--out")  # a file in the way: one line now, not a traceback after the data
        if args.resume:
            if not (args.out / "last.pt").is_file():
                raise FileNotFoundError(f"--resume: {args.out} holds no run to continue (no last.pt)")
            if args.config is not None:
                cfg = _command_config(args)
            elif args.set or args.fold is not None:
                cfg = _command_config(args, base=args.out / "last.pt")
            else:
                cfg = None
        else:
            cfg = _command_config(args)
            cfg.check_data_roots()
            if (args.out / "last.pt").exists():
                raise ValueError(
                    f"{args.out} already holds a run (last.pt): add --resume to continue it, or use another --out"
                )
        resolve_device(cfg.train.device if cfg is not None and args.device is None else args.device)
        train(cfg, args.out, resume=args.resume, max_epochs_this_run=args.max_epochs_this_run, device=args.device)
    except TrainingInterrupted as e:
        if e.main_process:
            resumable = e.resumable or (args.out / "last.pt").is_file()
            verb = "continue with" if resumable else "start again with"
            print(f"aqcf-train: {e}; {verb}: {continue_command(argv, resumable)}", file=sys.stderr, flush=True)
        return 130
    except KeyboardInterrupt:  # before the first epoch began (preparing data), or a second Ctrl-C while saving
        if main_process:
            last = args.out / "last.pt"
            if last.is_file():
                state = f"{last} is unchanged; continue with: {continue_command(argv, True)}"
            else:
                state = f"nothing saved; start again with: {continue_command(argv, False)}"
            print(f"aqcf-train: interrupted; {state}", file=sys.stderr, flush=True)
        return 130
    except (ValueError, FileNotFoundError) as e:
        print(f"aqcf-train: error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
