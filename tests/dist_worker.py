"""Worker processes for tests/test_distributed.py (importable by spawned children)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

import curvopt
from curvopt.extensions import (
    KFLR,
    KFRA,
    BatchGrad,
    BatchL2Grad,
    DiagGGNExact,
    DiagHessian,
    SumGradSquared,
    Variance,
)

EXTENSIONS = (BatchGrad, SumGradSquared, Variance, BatchL2Grad, DiagGGNExact, KFLR, KFRA,
              DiagHessian)


def make_problem(N=10, reduction="mean"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    X = torch.randn(N, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (N,))
    if reduction == "weighted":  # class weights and ignored targets: the mean's denominator
        y[1] = y[2] = -100       # is no longer proportional to the sample count
        weight = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)
        return model, nn.CrossEntropyLoss(weight=weight, ignore_index=-100), X, y
    return model, nn.CrossEntropyLoss(reduction=reduction), X, y


def run_single(N=10, reduction="mean"):
    model, lf, X, y = make_problem(N, reduction)
    with curvopt.collect(model, lf, *[E() for E in EXTENSIONS], distributed=False) as col:
        lf(model(X), y).backward()
    return col.results


def split(N, world):
    sizes = [N // world + (1 if r < N % world else 0) for r in range(world)]
    starts = [sum(sizes[:r]) for r in range(world)]
    return sizes, starts


def worker(rank, world, init_file, out_dir, N, reduction, ddp, hang=False):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        if hang and rank == 1:
            import time

            time.sleep(3600)
        model, lf, X, y = make_problem(N, reduction)
        sizes, starts = split(N, world)
        sl = slice(starts[rank], starts[rank] + sizes[rank])
        net = nn.parallel.DistributedDataParallel(model) if ddp else model
        with curvopt.collect(net, lf, *[E() for E in EXTENSIONS], gather=True) as col:
            lf(net(X[sl]), y[sl]).backward()
        res = {k.removeprefix("module."): v for k, v in col.results.items()}
        torch.save({k: {q: (list(t) if isinstance(t, list) else t) for q, t in v.items()}
                    for k, v in res.items()}, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # tear down together (see tests/optim/dist_optim_worker.py)
    finally:
        dist.destroy_process_group()
