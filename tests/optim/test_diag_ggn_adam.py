"""DiagGGNAdam against a hand-written float64 reference (GGN diagonal from full Jacobians)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from curvopt.optim import DiagGGNAdam

from .cases import batches, ggn_diagonal, gradients, snapshot, tiny_mlp, train


def reference(model, loss_fn, data, *, lr, betas, damping, power, clip, T, weight_decay):
    model = copy.deepcopy(model)
    ps = list(model.parameters())
    m = {p: torch.zeros_like(p) for p in ps}
    h = {p: torch.zeros_like(p) for p in ps}
    k, snaps = 0, []
    for t, (X, y) in enumerate(data, 1):
        _, g = gradients(model, X, y, loss_fn)
        if (t - 1) % T == 0:
            diag = ggn_diagonal(model, X, y, loss_fn)
            k += 1
            for p in ps:
                h[p] = betas[1] * h[p] + (1 - betas[1]) * diag[p]
        with torch.no_grad():
            for p in ps:
                m[p] = betas[0] * m[p] + (1 - betas[0]) * g[p]
                m_hat = m[p] / (1 - betas[0] ** t)
                den = (h[p] / (1 - betas[1] ** k) + damping) ** power
                d = (
                    m_hat / den
                    if clip is None
                    else torch.clamp(m_hat / torch.clamp(clip * den, min=1e-12), -1, 1)
                )
                p.mul_(1 - lr * weight_decay).sub_(lr * d)
        snaps.append(snapshot(model))
    return snaps


@pytest.mark.parametrize(
    "power,clip,T,wd", [(0.5, None, 1, 0.0), (1.0, None, 3, 0.1), (1.0, 0.05, 2, 0.0)]
)
@pytest.mark.parametrize("loss_name", ["ce", "mse"])
def test_diag_ggn_adam_matches_reference(power, clip, T, wd, loss_name):
    model = tiny_mlp(0)
    loss_fn = nn.CrossEntropyLoss() if loss_name == "ce" else nn.MSELoss()
    data = batches(6, N=6)
    if loss_name == "mse":
        g = torch.Generator().manual_seed(5)
        data = [(X, torch.randn(X.shape[0], 3, generator=g, dtype=X.dtype)) for X, _ in data]
    hp = dict(lr=0.05, betas=(0.8, 0.9), damping=1e-3, power=power, clip=clip, weight_decay=wd)
    ref = reference(model, loss_fn, data, T=T, **hp)
    mm = copy.deepcopy(model)
    opt = DiagGGNAdam(mm, loss_fn, curvature_update_freq=T, **hp)
    for t, (X, y) in enumerate(data):
        train(opt, mm, loss_fn, [(X, y)])
        for p, r in zip(mm.parameters(), ref[t], strict=True):
            torch.testing.assert_close(p.detach(), r, rtol=1e-10, atol=1e-10)
    assert opt.state[mm[0].weight]["curv_step"] == len(range(0, 6, T))
    opt.close()


def test_schedule_and_mc_curvature():
    m, loss_fn = tiny_mlp(0), nn.CrossEntropyLoss()
    opt = DiagGGNAdam(m, loss_fn, curvature="mc", mc_samples=3, curvature_update_freq=2, lr=0.01)
    seen = []
    for X, y in batches(4, N=6):
        seen.append(tuple(repr(e) for e in opt.collector.extensions))
        train(opt, m, loss_fn, [(X, y)])
    assert seen == [("DiagGGNMC(mc_samples=3)",), (), ("DiagGGNMC(mc_samples=3)",), ()]
    assert set(opt.state[m[0].weight]) == {
        "diag_ggn_mc",
        "step",
        "exp_avg",
        "exp_avg_curv",
        "curv_step",
    }
    opt.close()


def test_invalid_arguments():
    m, loss_fn = tiny_mlp(0), nn.CrossEntropyLoss()
    for kw in (
        dict(curvature="hessian"),
        dict(damping=0.0),
        dict(power=0.0),
        dict(betas=(1.0, 0.9)),
        dict(curvature_update_freq=0),
    ):
        with pytest.raises(ValueError):
            DiagGGNAdam(m, loss_fn, **kw)
    DiagGGNAdam(m, loss_fn, damping=0.0, clip=0.05).close()  # Sophia: no damping needed
