"""PyTorch's data-parallel wrappers over the layers, 2 processes on CPU (gloo): DistributedDataParallel and
FSDP2 (``fully_shard``: each quaternion weight ``(4, A, B, *k)`` sharded on dim 0, gathered before its
layer runs). After three SGD steps on each rank's half of the batch, the parameters equal those of one
process that steps on the same halves' summed loss: the gradient hooks, reductions and shards see our
ops' gradients as they see torch's. The model mixes hamilton and fast8 convs, a fused batch norm + ReLU
(per-rank batch statistics, as the reference computes them half by half), a transposed conv and a linear.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from aqcf_kernels import nn as qnn

WORLD = 2
STEPS = 3


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        qnn.QuaternionConv2d(8, 16, 3, padding=1, algorithm="hamilton"),
        qnn.QuaternionBatchNorm2d(16, activation="relu"),
        qnn.QuaternionConvTranspose2d(16, 8, 2, stride=2, algorithm="fast8"),
        nn.Flatten(),
        qnn.QuaternionLinear(8 * 10 * 10, 4),
    ).double()


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return (
        torch.randn(2 * WORLD, 8, 5, 5, generator=gen, dtype=torch.float64),
        torch.randn(2 * WORLD, 4, generator=gen, dtype=torch.float64),
    )


def _half_loss(model: nn.Module, x: torch.Tensor, t: torch.Tensor, rank: int) -> torch.Tensor:
    part = slice(2 * rank, 2 * rank + 2)
    return (model(x[part]) - t[part]).square().sum()


def _reference() -> dict[str, torch.Tensor]:
    model, (x, t) = _model(), _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(STEPS):
        sum(_half_loss(model, x, t, r) for r in range(WORLD)).backward()
        opt.step()
        opt.zero_grad()
    return {k: v.detach() for k, v in model.named_parameters()}


def _train(wrap: str, rank: int) -> dict[str, torch.Tensor]:
    model, (x, t) = _model(), _data()
    if wrap == "ddp":
        model = nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            if any(True for _ in layer.parameters(recurse=False)):
                fully_shard(layer)
        fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(STEPS):
        # (both wrappers average the ranks' gradients: scaled by WORLD, the sum of the halves')
        (WORLD * _half_loss(model, x, t, rank)).backward()
        opt.step()
        opt.zero_grad()
    params = dict(model.named_parameters())
    return {
        k.removeprefix("module."): (v.full_tensor() if hasattr(v, "full_tensor") else v).detach()
        for k, v in params.items()
    }


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        for wrap in ("ddp", "fsdp2"):
            result = _train(wrap, rank)
            if rank == 0:
                torch.save(result, os.path.join(out_dir, f"{wrap}.pt"))
            dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or sys.platform == "win32", reason="needs torch.distributed with gloo")
def test_ddp_and_fsdp2_steps_equal_one_process_steps(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    want = _reference()
    for wrap in ("ddp", "fsdp2"):
        got = torch.load(tmp_path / f"{wrap}.pt")
        assert list(got) == list(want)
        for k, w in want.items():
            torch.testing.assert_close(got[k], w, msg=lambda m, k=k, wrap=wrap: f"{wrap}, {k}: {m}")
