"""CPU inference benchmark: one LiTS-sized synthetic CT through ``aqcf-predict``, ours vs the baseline build.

    python -m benchmarks.predict                 # 512x512x100 CT, the paper's 2D A-QCF-Net, 2 threads
    python -m benchmarks.predict --quick         # 96x96x8 CT and a tiny net: checks the harness in seconds

What is timed is :func:`aqcf_kernels.pipeline.predict.predict` (what the ``aqcf-predict`` command runs)
on one case: reading the NIfTI, preprocessing (body crop, RAS, HU window), sliding-window inference
(2D, 256x256 windows, overlap 0.25, batches of 4 windows) and writing the mask and ``summary.csv``.
Providers, the same network and weights (random init, seed 0; inference cost does not depend on the
weights) from one run folder:

* ``baseline``: the model issue's baseline build: every quaternion conv and transposed conv computed
  with the expanded-weight reference conv (:func:`benchmarks.baselines.use_expanded_convs`: what other
  quaternion libraries do) and the quaternion norms composite, each followed by its activation as a
  separate pass (:func:`benchmarks.baselines.use_composite_norms`, as speechbrain writes them). One
  modality per case means no A-QCF block runs, so the attention does not enter this comparison.
* ``ours``: the model on this package's layers (``algorithm='auto'``).

Each provider runs in a fresh Python process (its own allocator state, tuning cache and peak RSS):
a warm-up batch of windows first (so ``auto``'s one-off measurements are not timed), then the case.
Reported per provider: seconds per case (median over ``--reps``), the peak resident set size of the
process during the case (``VmHWM`` after resetting it through ``/proc/self/clear_refs``, on Linux)
and its growth over the RSS before the case. Target (issue 15): ours >= 1.8x the baseline's speed.
The workers run ``aqcf-predict``'s ``--malloc`` (``keep`` by default, as the command) and inherit the
environment; the report names both (the allocator moves these numbers by 10-30%: README, Benchmarks).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PROVIDERS = ("baseline", "ours")
TARGET_SPEEDUP = 1.8

#: (x, y, z) voxels and (x, y, z) spacing in mm of the synthetic CT: LiTS-like (512², ~100 slices,
#: 0.77 mm in-plane, 2.5 mm slices), or a tiny one for --quick.
SIZES: dict[str, dict[str, Any]] = {
    "lits": {"shape": (512, 512, 100), "spacing": (0.77, 0.77, 2.5)},
    "quick": {"shape": (96, 96, 8), "spacing": (0.77, 0.77, 2.5)},
}
#: The run's model and windows: the paper's 2D recipe (configs/lits_atlas.yaml), or a tiny net for --quick.
MODELS: dict[str, list[str]] = {
    "lits": [
        "train.mode=joint",
        "model.spatial_dims=2",
        "model.features=[32, 64, 128, 256]",
        "model.bottleneck=512",
        "model.heads=auto",
        "model.deep_supervision=true",
        "data.slice_size=[256, 256]",
    ],
    "quick": [
        "train.mode=joint",
        "model.spatial_dims=2",
        "model.features=[16, 32]",
        "model.bottleneck=32",
        "model.heads=auto",
        "data.slice_size=[64, 64]",
    ],
}


def make_run(folder: Path, size: str) -> Path:
    """A run folder with ``best.pt`` (config + randomly initialised weights, seed 0), as aqcf-train writes it."""
    import torch

    from aqcf_kernels.pipeline.checkpoint import build_model, save_atomic
    from aqcf_kernels.pipeline.config import load_config

    cfg = load_config(None, MODELS[size])
    torch.manual_seed(0)
    model = build_model(cfg)
    save_atomic({"config": cfg.to_dict(), "model": model.state_dict()}, folder / "best.pt")
    return folder


def make_scan(path: Path, size: str) -> Path:
    """A synthetic CT phantom (int16 HU, stored LPS as LiTS volumes mostly are) written as NIfTI."""
    import nibabel as nib
    import numpy as np
    from nibabel import orientations as nio

    from aqcf_kernels.data.synth import make_phantom

    ph = make_phantom("ct", seed=0, shape=SIZES[size]["shape"], spacing=SIZES[size]["spacing"])
    data = np.clip(np.rint(ph.image), -1024, 3071).astype(np.int16)
    ornt = nio.ornt_transform(nio.axcodes2ornt("RAS"), nio.axcodes2ornt("LPS"))
    data, affine = nio.apply_orientation(data, ornt), ph.affine @ nio.inv_ornt_aff(ornt, data.shape)
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)
    return path


def _warm_up(run: Path, provider: str) -> None:
    """One batch of windows through the inference path (``auto`` measures each conv signature once)."""
    import numpy as np

    from aqcf_kernels.pipeline.inference import SW_BATCH_SIZE, predict_probabilities
    from aqcf_kernels.pipeline.predict import load_members

    member = load_members(run, prepare_model=_prepare(provider))[0]
    roi = tuple(member.cfg.data.slice_size)
    predict_probabilities(member.model, np.zeros((SW_BATCH_SIZE, *roi), np.float32), "ct", member.cfg)


def _prepare(provider: str):
    if provider == "ours":
        return None
    from .baselines import use_composite_norms, use_expanded_convs

    return lambda model: use_composite_norms(use_expanded_convs(model))


def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker(
    provider: str, run: Path, scan: Path, out: Path, reps: int, threads: int, malloc: str = "keep"
) -> dict[str, Any]:
    """One provider in this process: warm up, then ``reps`` predictions of the case; times and peak memory.
    ``malloc``: ``aqcf-predict --malloc``, applied first, as the command does."""
    import gc

    import torch

    from aqcf_kernels.pipeline.allocator import apply_malloc_choice
    from aqcf_kernels.pipeline.predict import predict

    apply_malloc_choice(malloc)
    torch.set_num_threads(threads)
    _warm_up(run, provider)
    seconds, wall, peaks, growths = [], [], [], []
    for rep in range(reps):
        gc.collect()
        resettable = _reset_peak()
        before = _status_kib("VmRSS")
        started = time.perf_counter()
        rows = predict([scan], out / f"{provider}-{rep}", run, modality="ct", device="cpu", progress=False,
                       prepare_model=_prepare(provider))  # fmt: skip
        wall.append(time.perf_counter() - started)
        seconds.append(float(rows[0]["seconds"]))
        peak = _status_kib("VmHWM") if resettable else None
        peaks.append(None if peak is None else peak * 1024)
        growths.append(None if peak is None or before is None else max(0, peak - before) * 1024)
    return {
        "provider": provider,
        "seconds_per_case": statistics.median(seconds),
        "seconds_all": seconds,
        "wall_seconds_all": wall,
        "peak_rss_bytes": max((p for p in peaks if p is not None), default=None),
        "peak_growth_bytes": max((g for g in growths if g is not None), default=None),
        "max_rss_bytes_process": _ru_maxrss(),
        "tumour_ml": float(rows[0]["tumour_ml"]),
    }


def _ru_maxrss() -> int | None:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    except (ImportError, OSError):
        return None


def _spawn(provider: str, run: Path, scan: Path, out: Path, reps: int, threads: int, malloc: str) -> dict[str, Any]:
    env = dict(os.environ)
    root = Path(__file__).resolve().parent.parent
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p)
    env.setdefault("AQCF_TUNING_CACHE", str(out / f"tuning-{provider}.json"))  # a fresh cache: auto measures
    env["OMP_NUM_THREADS"] = str(threads)
    result = out / f"{provider}.json"
    cmd = [sys.executable, "-m", f"{__package__}.predict", "--worker", provider, "--run", str(run), "--scan", str(scan),
           "--work", str(out), "--reps", str(reps), "--threads", str(threads), "--result", str(result),
           "--malloc", malloc]  # fmt: skip
    subprocess.run(cmd, env=env, check=True)
    return json.loads(result.read_text())


def run_benchmark(
    size: str = "lits",
    providers: Sequence[str] = PROVIDERS,
    reps: int = 1,
    threads: int = 2,
    workdir: str | os.PathLike | None = None,
    malloc: str = "keep",
) -> dict[str, Any]:
    """Write the run and the scan, run each provider in a fresh process, return the results with ratios.
    ``malloc``: ``aqcf-predict --malloc`` for both providers (its default, ``keep``, unless asked).

    Returns ``{"size", "shape", "spacing", "threads", "reps", "providers": {name: {...}}, "speedup",
    "peak_ratio", "target", "env"}``; ``speedup`` is baseline seconds / ours seconds.
    """
    import torch

    from . import common

    with tempfile.TemporaryDirectory(prefix="aqcf-bench-predict-", dir=workdir) as tmp:
        work = Path(tmp)
        run = make_run(work / "run", size)
        scan = make_scan(work / "scan" / "ct.nii.gz", size)
        results = {}
        for i, provider in enumerate(providers, 1):
            print(f"[{i}/{len(providers)}] {provider}: {SIZES[size]['shape']} CT through aqcf-predict",
                  file=sys.stderr, flush=True)  # fmt: skip
            results[provider] = _spawn(provider, run, scan, work, reps, threads, malloc)
    out: dict[str, Any] = {
        "size": size,
        "shape": list(SIZES[size]["shape"]),
        "spacing": list(SIZES[size]["spacing"]),
        "model": MODELS[size],
        "threads": threads,
        "reps": reps,
        "providers": results,
        "baseline_build": "expanded-weight convs + composite quaternion norms with separate activations",
        "malloc": malloc,
        "allocator": allocator_settings(),
        # the workers ran with ``threads``, this parent process never set its own: theirs is the run's
        "env": {**common.environment(torch.device("cpu"), threads), "threads": threads},
    }
    if "baseline" in results and "ours" in results:
        b, o = results["baseline"], results["ours"]
        out["speedup"] = b["seconds_per_case"] / o["seconds_per_case"]
        if b["peak_rss_bytes"] and o["peak_rss_bytes"]:
            out["peak_ratio"] = o["peak_rss_bytes"] / b["peak_rss_bytes"]
        out["target"] = {"speedup >= 1.8": out["speedup"] >= TARGET_SPEEDUP}
    return out


def allocator_settings(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The allocator-related environment variables set for this run (glibc's ``MALLOC_*`` tunables,
    ``GLIBC_TUNABLES``, jemalloc's ``MALLOC_CONF``, tcmalloc's, an ``LD_PRELOAD``); empty = defaults."""
    env = os.environ if environ is None else environ
    return {
        k: v
        for k, v in sorted(env.items())
        if k.startswith(("MALLOC_", "TCMALLOC_")) or k in ("LD_PRELOAD", "GLIBC_TUNABLES")
    }


def markdown(result: dict[str, Any]) -> str:
    """The result as a small markdown table (seconds per case, peak RSS, ratios to the baseline)."""
    from . import common

    mib = 2**20
    rows = []
    base = result["providers"].get("baseline")
    for name, r in result["providers"].items():
        speed = base["seconds_per_case"] / r["seconds_per_case"] if base else None
        peak = r["peak_rss_bytes"]
        rows.append([
            name,
            f"{r['seconds_per_case']:.2f}",
            f"{speed:.2f}x" if speed else "",
            f"{peak / mib:.0f}" if peak else "n/a",
            f"{r['peak_growth_bytes'] / mib:.0f}" if r["peak_growth_bytes"] is not None else "n/a",
        ])  # fmt: skip
    shape = "x".join(map(str, result["shape"]))
    head = f"aqcf-predict, one {shape} synthetic CT, {result['threads']} threads, median of {result['reps']}\n\n"
    table = common.markdown_table(["provider", "s/case", "speed vs baseline", "peak RSS MiB", "growth MiB"], rows)
    settings = " ".join(f"{k}={v}" for k, v in (result.get("allocator") or {}).items())
    allocator = f"--malloc {result.get('malloc', 'default')}" + (f", environment {settings}" if settings else "")
    return (
        head + table + f"\n\nbaseline: {result['baseline_build']}\nallocator: {allocator}\n"
        f"{common.environment_line(result['env'])}\n"
    )


def main(argv: Sequence[str] | None = None) -> int:
    from aqcf_kernels.pipeline.allocator import MALLOC_CHOICES

    from . import common

    p = argparse.ArgumentParser(prog="python -m benchmarks.predict", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a 96x96x8 CT and a tiny net (checks the harness)")
    p.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    p.add_argument(
        "--reps", type=common.positive_int, default=1, help="cases timed per provider (median reported; default 1)"
    )
    p.add_argument("--threads", type=common.positive_int, default=2, help="torch threads (default 2)")
    p.add_argument("--out", type=common.output_folder, default="bench-out", help="folder for predict.json / predict.md")
    p.add_argument("--malloc", choices=MALLOC_CHOICES, default="keep",
                   help="aqcf-predict's --malloc for both providers (default keep, the command's default)")  # fmt: skip
    # Internal: one provider in this process (started by run_benchmark).
    p.add_argument("--worker", choices=PROVIDERS, help=argparse.SUPPRESS)
    p.add_argument("--run", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--scan", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        result = worker(args.worker, args.run, args.scan, args.work, args.reps, args.threads, args.malloc)
        args.result.write_text(json.dumps(result))
        return 0
    result = run_benchmark("quick" if args.quick else "lits", args.providers, args.reps, args.threads,
                           malloc=args.malloc)  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "predict.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    text = markdown(result)
    (args.out / "predict.md").write_text(text)
    print(text)
    print(f"wrote {args.out}/predict.md, predict.json", file=sys.stderr)  # stdout is the report alone, as conv's
    return 0


if __name__ == "__main__":
    sys.exit(main())
