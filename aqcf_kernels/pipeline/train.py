"""``aqcf-train``: unpaired joint training of A-QCF-Net (or a baseline) from a YAML config.

    aqcf-train --config configs/lits_atlas.yaml --out runs/joint
    aqcf-train --config configs/lits_atlas.yaml --out runs/ct --set train.mode=ct
    aqcf-train --out runs/joint --resume                  # continue exactly where it stopped
    torchrun --nproc-per-node 2 -m aqcf_kernels.pipeline.train --config ... --out ...

Every step takes one CT batch and one MRI batch (independent, unpaired samplers) and sums MONAI's
DiceCELoss of each stream. AdamW with linear warm-up and a cosine decay per step; bf16 autocast on
CUDA; gradient clipping. Each epoch ends with sliding-window validation on whole volumes and writes
``last.pt`` (and ``best.pt`` on a better mean tumour Dice) atomically; ``metrics.jsonl`` and
``curves.png`` follow the run. ``--resume`` restores model, optimiser, scheduler, sampler position
and every RNG, so an interrupted run ends with the weights an uninterrupted one would have.
The data (cases, cache, split, samplers) comes from :mod:`aqcf_kernels.pipeline.data`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import build_model, load_checkpoint, save_atomic
from .config import RunConfig, load_config
from .data import SingleStream, make_loader, prepare_data
from .inference import predict_labels
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
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
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
            pred = predict_labels(model, case.image, modality, cfg, device)
            for region in scores:
                scores[region].append(dice(pred, np.asarray(case.label), region))
        for region, values in scores.items():
            defined = [v for v in values if not math.isnan(v)]
            out[f"{modality}_dice_{region}"] = float(np.mean(defined)) if defined else float("nan")
    out["score"] = selection_score(out)
    return out


def selection_score(val: dict[str, float]) -> float:
    """What ``best.pt`` maximises: mean tumour Dice over the modalities, ties (e.g. no tumour found yet,
    early in training) broken by liver Dice; NaN where nothing is defined."""
    tumour = [v for k, v in val.items() if k.endswith("dice_tumour") and not math.isnan(v)]
    liver = [v for k, v in val.items() if k.endswith("dice_liver") and not math.isnan(v)]
    if not tumour and not liver:
        return float("nan")
    return (float(np.mean(tumour)) if tumour else 0.0) + 1e-3 * (float(np.mean(liver)) if liver else 0.0)


def plot_curves(log_path: Path, png_path: Path) -> None:
    """Training loss per logged step and validation Dice per epoch, from ``metrics.jsonl``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    steps = [r for r in rows if r.get("kind") == "train"]
    epochs = [r for r in rows if r.get("kind") == "val"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for key in sorted({k for r in steps for k in r if k.startswith("loss")}):
        ax1.plot([r["step"] for r in steps if key in r], [r[key] for r in steps if key in r], label=key)
    ax1.set(xlabel="step", ylabel="loss", title="training loss", yscale="log")
    for key in sorted({k for r in epochs for k in r if "dice" in k}):
        ax2.plot([r["epoch"] for r in epochs], [r.get(key, float("nan")) for r in epochs], marker="o", label=key)
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
    best: float = -math.inf  # the best selection score so far (that of best.pt)

    @property
    def main_process(self) -> bool:
        return self.rank == 0

    @property
    def log_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"


def train(
    cfg: RunConfig, run_dir: str | Path, *, resume: bool = False, max_epochs_this_run: int | None = None
) -> dict[str, Any]:
    """Train until ``cfg.train.epochs`` (or ``max_epochs_this_run`` more epochs); returns the last record."""
    run_dir = Path(run_dir)
    run = setup_run(cfg, run_dir, resume=resume)
    t = run.cfg.train
    stop = t.epochs if max_epochs_this_run is None else min(t.epochs, run.start_epoch + max_epochs_this_run)
    record: dict[str, Any] = {}
    for epoch in range(run.start_epoch, stop):
        losses, seconds = train_epoch(run, epoch)
        if run.main_process:
            record = finish_epoch(run, epoch, losses, seconds)
        _barrier()
    if run.main_process:
        _ensure_best_checkpoint(run_dir)
    return record


def setup_run(cfg: RunConfig, run_dir: Path, *, resume: bool = False) -> TrainingRun:
    """This process's run, ready for its next epoch: DDP initialised, the run folder and data prepared,
    model/optimiser/scheduler/loader built and, on ``resume``, restored from ``last.pt`` (whose config
    replaces ``cfg``) with every RNG."""
    rank, world_size, device = _distributed()
    ckpt = None
    if resume:
        ckpt = load_checkpoint(run_dir / "last.pt")
        cfg = RunConfig.from_dict(ckpt["config"], f"{run_dir / 'last.pt'} (config)")
    else:
        cfg = cfg.with_absolute_paths()
    _seed_everything(cfg.train.seed)
    data = _prepare_run_folder(cfg, run_dir, main_process=rank == 0)
    model = build_model(cfg).to(device)
    optimizer, scheduler = build_optimizer(model, cfg.train)
    loader = make_loader(cfg, {m: data[m]["train"] for m in cfg.modalities}, rank, world_size)
    start_epoch, step, best = 0, 0, -math.inf
    if ckpt is not None:
        start_epoch, step, best = restore_training(ckpt, model, optimizer, scheduler, loader)
    # Solo steps leave the fusion blocks out of the graph: DDP must expect unused parameters.
    solo_steps = cfg.train.mode == "joint" and cfg.train.solo_prob > 0
    net: nn.Module = _Step(model)
    if world_size > 1:
        net = nn.parallel.DistributedDataParallel(net, find_unused_parameters=solo_steps)

    from monai.losses import DiceCELoss

    return TrainingRun(
        cfg=cfg,
        run_dir=run_dir,
        rank=rank,
        world_size=world_size,
        device=device,
        data=data,
        model=model,
        net=net,
        optimizer=optimizer,
        scheduler=scheduler,
        loader=loader,
        loss_fn=DiceCELoss(to_onehot_y=True, softmax=True),
        solo_steps=solo_steps,
        amp=cfg.train.amp and device.type == "cuda",
        start_epoch=start_epoch,
        step=step,
        best=best,
    )


def _distributed() -> tuple[int, int, torch.device]:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world_size, torch.device("cuda", local)
    return rank, world_size, torch.device("cpu")


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
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        data = prepare_data(cfg, run_dir)  # preprocessing writes the cache once, on rank 0
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
) -> tuple[int, int, float]:
    """Load a training checkpoint's states and RNGs in place; returns (next epoch, step, best score)."""
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    loader.load_state_dict(ckpt["loader"])
    set_rng_state(ckpt["rng"])
    return ckpt["epoch"] + 1, ckpt["step"], ckpt["best"]


def train_epoch(run: TrainingRun, epoch: int) -> tuple[list[dict[str, float]], float]:
    """The optimisation steps of one epoch; returns each step's losses and the seconds they took."""
    t = run.cfg.train
    run.net.train()
    started, losses = time.perf_counter(), []
    bar = _progress(t.steps_per_epoch, f"epoch {epoch + 1}/{t.epochs}", run.main_process)
    for _ in range(t.steps_per_epoch):
        losses.append(train_step(run))
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]['loss']:.3f}")
    bar.close()
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


def finish_epoch(run: TrainingRun, epoch: int, losses: list[dict[str, float]], seconds: float) -> dict[str, Any]:
    """Rank 0 after an epoch: its training row in ``metrics.jsonl``, validation when due (a row too),
    ``best.pt``/``last.pt``, ``curves.png``; returns (and prints) the validation record."""
    t = run.cfg.train
    mean = {k: float(np.mean([r[k] for r in losses])) for k in losses[0]}
    _append(run.log_path, {"kind": "train", "epoch": epoch + 1, "step": run.step,
                           "lr": run.scheduler.get_last_lr()[0], "seconds": seconds, **mean})  # fmt: skip
    record = {"kind": "val", "epoch": epoch + 1, "step": run.step}
    if (epoch + 1) % t.val_every == 0 or epoch + 1 == t.epochs:
        record.update(validate(run.model, run.cfg, {m: run.data[m]["val"] for m in run.cfg.modalities}, run.device))
    _append(run.log_path, record)
    save_checkpoints(run, epoch, record.get("score", float("nan")))
    plot_curves(run.log_path, run.run_dir / "curves.png")
    print(json.dumps(record), flush=True)
    return record


def checkpoint_state(run: TrainingRun, epoch: int) -> dict[str, Any]:
    """Everything an exact resume after ``epoch`` needs (the format of :mod:`.checkpoint`), RNGs as of now."""
    return {
        "config": run.cfg.to_dict(),
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "loader": run.loader.state_dict(),
        "rng": rng_state(),
        "epoch": epoch,
        "step": run.step,
        "best": run.best,
    }


def save_checkpoints(run: TrainingRun, epoch: int, score: float) -> None:
    """``best.pt`` if ``score`` beats the best so far, then ``last.pt``; each written atomically."""
    state = checkpoint_state(run, epoch)
    if not math.isnan(score) and score > run.best:
        run.best = state["best"] = score
        save_atomic(state, run.run_dir / "best.pt")
    save_atomic(state, run.run_dir / "last.pt")


def _ensure_best_checkpoint(run_dir: Path) -> None:
    if not (run_dir / "best.pt").exists() and (run_dir / "last.pt").exists():
        # no validation score yet (e.g. no tumour anywhere in val): the last weights stand in
        save_atomic(load_checkpoint(run_dir / "last.pt"), run_dir / "best.pt")


def _float(out):
    return [o.float() for o in out] if isinstance(out, (list, tuple)) else out.float()


def _append(path: Path, row: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", disable=not enabled or None, leave=False)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="aqcf-train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, help="YAML config (see configs/); defaults if omitted")
    p.add_argument("--out", type=Path, required=True, help="run folder: checkpoints, metrics.jsonl, curves.png")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from last.pt")
    p.add_argument("--max-epochs-this-run", type=int, default=None,
                   help="stop after this many epochs (a job-length limit); --resume continues")  # fmt: skip
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.resume:
            if args.config or args.set:
                raise ValueError("--resume takes the run's own config (from last.pt); drop --config/--set")
            cfg = RunConfig()
        else:
            cfg = load_config(args.config, args.set)
            cfg.check_data_roots()
            if (args.out / "last.pt").exists():
                raise ValueError(f"{args.out} already holds a run (last.pt): use --resume or another --out")
        train(cfg, args.out, resume=args.resume, max_epochs_this_run=args.max_epochs_this_run)
    except (ValueError, FileNotFoundError) as e:
        print(f"aqcf-train: error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
