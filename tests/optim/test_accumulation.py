"""Gradient accumulation in the optimizers: k micro-batches (``loss / k`` of a mean loss, or
a sum loss) between two steps give the trajectory of one backward over the whole batch."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import curvopt

MAKERS = {
    "kflr": lambda m, l: curvopt.KFACOptimizer(m, l, lr=0.05, curvature="kflr", seed=0),
    "diag_ggn_adam": lambda m, l: curvopt.DiagGGNAdam(m, l, lr=0.01, curvature="exact", seed=0),
    "msvag": lambda m, l: curvopt.VarianceAdaptiveSGD(m, l, lr=0.1, seed=0),
}


def _run(name, reduction, k, steps=4):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    g = torch.Generator().manual_seed(1)
    X = torch.randn(12, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (12,), generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = MAKERS[name](model, loss_fn)
        for _ in range(steps):
            opt.zero_grad()
            for Xi, yi in zip(X.chunk(k), y.chunk(k)):
                loss = loss_fn(model(Xi), yi)
                (loss / k if reduction == "mean" else loss).backward()
            opt.step()
    opt.close()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("name", list(MAKERS))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_micro_batches_follow_the_full_batch_trajectory(name, reduction):
    full = _run(name, reduction, k=1)
    acc = _run(name, reduction, k=3)
    moved = (full - _run(name, reduction, k=1, steps=0)).abs().max()
    assert moved > 1e-3  # the optimizer did move
    assert (acc - full).abs().max() <= 1e-10 * full.abs().max()
