"""What measuring costs: the fwd+bwd steps of a new signature under ``algorithm='auto'`` until its
choices are remembered, against steps whose choices are known.

Each case runs in a fresh tuning cache. The first training step measures three signatures (forward,
input gradient, weight gradient), the next few re-check the first runs on real calls
(``tuning.REFINE_SAMPLES``) and, for a close call, the leader computes ``tuning.CONFIRM_AFTER``
more before the close pairs are timed again in rounds (``tuning.CONFIRM_MAX_ROUNDS`` at most); the
extra time all those steps take over as many steps with the remembered choices, divided by one such
step's time, is the cost of measuring in "calls of the layer" (fwd+bwd steps).

    python tools/tuning_cost.py            # the conv benchmark's target cases
    python tools/tuning_cost.py --reps 5
    python tools/tuning_cost.py --only N1   # the one-sample cases (where cpp_im2col is a candidate)
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("AQCF_TUNING_CACHE", str(Path(tempfile.mkdtemp(prefix="aqcf-tuning-cost-")) / "tuning.json"))

import aqcf_kernels.functional as QF  # noqa: E402
from aqcf_kernels import tuning  # noqa: E402

CASES = {  # name: (spatial dims, quaternion channels, size, batch)
    "2d 64q N8 64²": (2, 64, 64, 8),
    "2d 32q N8 64²": (2, 32, 64, 8),
    "3d 32q N2 32³": (3, 32, 32, 2),
    "2d 16q N4 64²": (2, 16, 64, 4),
    "1d 16q N8 1024": (1, 16, 1024, 8),
    # one sample on few channels: the cpp engine's oneDNN route and PyTorch's im2col kernels (cpp_im2col)
    # are both timed; the host model's level 0, and a 3D level where oneDNN was far ahead
    "2d 2q N1 32²": (2, 2, 32, 1),
    "3d 4q N1 32³": (3, 4, 32, 1),
}


def step(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> float:
    start = time.perf_counter()
    y = QF.quaternion_conv(x, w, b, padding=1)
    y.backward(torch.ones_like(y))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3, help="fresh-cache repetitions per case (default 3)")
    parser.add_argument("--only", default="", help="run the cases whose name contains this text")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"{'case':<16} {'first step':>11} {'steps':>7} {'later step':>11} {'cost (calls)':>13}")
    for name, (dims, ch, size, batch) in CASES.items():
        if args.only not in name:
            continue
        x = torch.randn(batch, 4 * ch, *[size] * dims, requires_grad=True)
        w = (0.1 * torch.randn(4, ch, ch, *[3] * dims)).requires_grad_()
        b = torch.randn(4 * ch, requires_grad=True)
        with tuning.using("heuristic"):
            step(x, w, b)  # allocator and oneDNN warm-up, outside the measurement
        costs, firsts, laters, counts = [], [], [], []
        for _ in range(args.reps):
            tuning.clear(memory=True, disk=True)
            measuring = [step(x, w, b)]
            while tuning._pending:  # the first runs re-checked on the next calls
                measuring.append(step(x, w, b))
            # as many steps with the remembered choices: sums of equally many steps, so that the
            # machine's right-skewed step times weigh on both sides alike (a median of a few later
            # steps against the sum of twenty measuring ones billed that skew to measuring)
            remembered = [step(x, w, b) for _ in measuring]
            later = statistics.median(remembered)
            firsts.append(measuring[0])
            laters.append(later)
            counts.append(len(measuring))
            costs.append((sum(measuring) - sum(remembered)) / later)
        print(
            f"{name:<16} {statistics.median(firsts) * 1e3:9.0f}ms {statistics.median(counts):7.0f} "
            f"{statistics.median(laters) * 1e3:9.0f}ms {statistics.median(costs):13.2f}"
        )


if __name__ == "__main__":
    main()
