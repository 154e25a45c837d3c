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
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import build_model, load_checkpoint, save_atomic
from .config import RunConfig, load_config
from .inference import predict_labels
from .metrics import dice

SPLIT_FILE = "split_{modality}.json"


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def preprocess_config(cfg: RunConfig):
    from ..data import PreprocessConfig

    return PreprocessConfig(ct_window=tuple(cfg.data.hu_window), target_spacing=cfg.data.target_spacing)


def prepare_data(cfg: RunConfig, run_dir: Path, *, progress: bool = True) -> dict[str, dict[str, list]]:
    """Per modality: the cached cases of each split (train/val/test), the split written to ``run_dir``."""
    from ..data import find_cases, load_or_create_split, preprocess_cases

    cfg.check_data_roots()
    d = cfg.data
    fractions = (1.0 - d.val_fraction - d.test_fraction, d.val_fraction, d.test_fraction)
    out: dict[str, dict[str, list]] = {}
    for modality in cfg.modalities:
        root, layout = getattr(d, f"{modality}_root"), getattr(d, f"{modality}_layout") or "auto"
        cases = find_cases(root, layout, modality=modality)
        cached = preprocess_cases(cases, Path(d.cache_dir) / modality, preprocess_config(cfg), progress=progress)
        split = load_or_create_split(
            run_dir / SPLIT_FILE.format(modality=modality), [c.case_id for c in cached], fractions, d.split_seed
        )
        by_id = {c.case_id: c for c in cached}
        out[modality] = {part: [by_id[i] for i in ids] for part, ids in split.items()}
        if not out[modality]["train"]:
            raise ValueError(f"{modality}: the split leaves no training case ({len(cached)} cases under {root})")
    return out


def make_loader(cfg: RunConfig, train_cases: dict[str, list], rank: int, world_size: int):
    """The unpaired training stream: ``next(loader) -> {modality: {"image", "label", "case"}}``."""
    from ..data import InfiniteLoader, JointLoader, PatchDataset, SliceDataset, flip_intensity_augment

    d, t = cfg.data, cfg.train
    transform = flip_intensity_augment() if t.augment else None

    def dataset(modality: str, seed: int):
        cases = train_cases[modality]
        common = {"tumour_prob": d.tumour_prob, "seed": seed, "transform": transform}
        if cfg.model.spatial_dims == 3:
            return PatchDataset(cases, d.patch_size, **common)
        return SliceDataset(cases, d.slice_size, **common)

    kw = {"num_workers": d.num_workers, "rank": rank, "world_size": world_size}
    if len(cfg.modalities) == 2:
        return JointLoader(dataset("ct", t.seed), dataset("mri", t.seed + 1), t.batch_size, **kw)
    (modality,) = cfg.modalities
    return _SingleStream(modality, InfiniteLoader(dataset(modality, t.seed), t.batch_size, **kw))


class _SingleStream:
    """One modality's loader with the joint loader's interface (a dict per step, state_dict)."""

    def __init__(self, modality: str, loader) -> None:
        self.modality, self.loader = modality, loader

    def __next__(self) -> dict[str, Any]:
        return {self.modality: next(self.loader)}

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)


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
# The run
# ---------------------------------------------------------------------------------------------


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


def train(
    cfg: RunConfig, run_dir: str | Path, *, resume: bool = False, max_epochs_this_run: int | None = None
) -> dict[str, Any]:
    """Train until ``cfg.train.epochs`` (or ``max_epochs_this_run`` more epochs); returns the last record."""
    run_dir = Path(run_dir)
    rank, world_size, device = _distributed()
    main_process = rank == 0
    ckpt = None
    if resume:
        ckpt = load_checkpoint(run_dir / "last.pt")
        cfg = RunConfig.from_dict(ckpt["config"], f"{run_dir / 'last.pt'} (config)")
    else:
        cfg = cfg.with_absolute_paths()
    torch.manual_seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    if main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        data = prepare_data(cfg, run_dir)  # preprocessing writes the cache once, on rank 0
    _barrier()
    if not main_process:
        data = prepare_data(cfg, run_dir, progress=False)

    model = build_model(cfg).to(device)
    t = cfg.train
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    total_steps = t.epochs * t.steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t.warmup_steps, total_steps))
    loader = make_loader(cfg, {m: data[m]["train"] for m in cfg.modalities}, rank, world_size)
    start_epoch, step, best = 0, 0, -math.inf
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        loader.load_state_dict(ckpt["loader"])
        set_rng_state(ckpt["rng"])
        start_epoch, step, best = ckpt["epoch"] + 1, ckpt["step"], ckpt["best"]
    # Solo steps leave the fusion blocks out of the graph: DDP must expect unused parameters.
    solo_steps = cfg.train.mode == "joint" and cfg.train.solo_prob > 0
    net = _Step(model)
    if world_size > 1:
        net = nn.parallel.DistributedDataParallel(net, find_unused_parameters=solo_steps)

    from monai.losses import DiceCELoss

    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    amp = t.amp and device.type == "cuda"
    log_path, record = run_dir / "metrics.jsonl", {}
    end_epoch = t.epochs if max_epochs_this_run is None else min(t.epochs, start_epoch + max_epochs_this_run)
    for epoch in range(start_epoch, end_epoch):
        net.train()
        started, losses = time.perf_counter(), []
        bar = _progress(t.steps_per_epoch, f"epoch {epoch + 1}/{t.epochs}", main_process)
        for _ in range(t.steps_per_epoch):
            batch = next(loader)
            inputs = {m: batch[m]["image"].to(device, non_blocking=True) for m in cfg.modalities}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                outputs = net(inputs, solo_steps and solo_step(cfg.train, step))
            parts = {
                m: deep_supervision_loss(loss_fn, _float(outputs[m]), batch[m]["label"].to(device))
                for m in cfg.modalities
            }
            loss = sum(parts.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if t.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            losses.append(
                {k: v.item() for k, v in {"loss": loss, **{f"loss_{m}": p for m, p in parts.items()}}.items()}
            )
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]['loss']:.3f}")
        bar.close()
        if main_process:
            mean = {k: float(np.mean([r[k] for r in losses])) for k in losses[0]}
            _append(log_path, {"kind": "train", "epoch": epoch + 1, "step": step, "lr": scheduler.get_last_lr()[0],
                               "seconds": time.perf_counter() - started, **mean})  # fmt: skip
            record = {"kind": "val", "epoch": epoch + 1, "step": step}
            if (epoch + 1) % t.val_every == 0 or epoch + 1 == t.epochs:
                record.update(validate(model, cfg, {m: data[m]["val"] for m in cfg.modalities}, device))
            _append(log_path, record)
            state = {
                "config": cfg.to_dict(),
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "loader": loader.state_dict(),
                "rng": rng_state(),
                "epoch": epoch,
                "step": step,
                "best": best,
            }
            score = record.get("score", float("nan"))
            if not math.isnan(score) and score > best:
                best = state["best"] = score
                save_atomic(state, run_dir / "best.pt")
            save_atomic(state, run_dir / "last.pt")
            plot_curves(log_path, run_dir / "curves.png")
            print(json.dumps(record), flush=True)
        _barrier()
    if main_process and not (run_dir / "best.pt").exists() and (run_dir / "last.pt").exists():
        # no validation score yet (e.g. no tumour anywhere in val): the last weights stand in
        save_atomic(load_checkpoint(run_dir / "last.pt"), run_dir / "best.pt")
    return record


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
