"""VarianceAdaptiveSGD (M-SVAG) against a hand-written float64 reference (torch.func per-sample)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from curvopt.optim import VarianceAdaptiveSGD

from .cases import batches, gradients, per_sample_terms, snapshot, tiny_mlp, train


def reference(model, loss_fn, data, *, lr, momentum, weight_decay, variance):
    """M-SVAG with explicit weights over the whole history: s_t = Σ_i w_i² σ_i²."""
    model = copy.deepcopy(model)
    ps = list(model.parameters())
    hist_g = {p: [] for p in ps}
    hist_s = {p: [] for p in ps}
    snaps = []
    b = momentum
    for t, (X, y) in enumerate(data, 1):
        _, g = gradients(model, X, y, loss_fn)
        terms = per_sample_terms(model, X, y, loss_fn)
        N = X.shape[0]
        w = [(1 - b) * b ** (t - i) / (1 - b**t) for i in range(1, t + 1)]
        with torch.no_grad():
            for p in ps:
                hist_g[p].append(g[p])
                # variance of a sum of N iid terms, unbiased
                hist_s[p].append(N * terms[p].var(0, unbiased=True))
                m = sum(wi * gi for wi, gi in zip(w, hist_g[p], strict=True))
                if variance == "batch":
                    s = sum(wi**2 * si for wi, si in zip(w, hist_s[p], strict=True))
                else:
                    v = sum(wi * gi**2 for wi, gi in zip(w, hist_g[p], strict=True))
                    rho = sum(wi**2 for wi in w)
                    s = (
                        torch.zeros_like(m)
                        if t == 1
                        else rho * torch.clamp(v - m * m, min=0) / (1 - rho)
                    )
                gamma = m * m / (m * m + s)
                p.mul_(1 - lr * weight_decay).sub_(lr * gamma * m)
        snaps.append(snapshot(model))
    return snaps


@pytest.mark.parametrize("variance,wd", [("batch", 0.0), ("batch", 0.1), ("ema", 0.0)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_msvag_matches_reference(variance, wd, reduction):
    model = tiny_mlp(0)
    loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    data = batches(6, N=7)
    hp = dict(lr=0.2 if reduction == "mean" else 0.03, momentum=0.8, weight_decay=wd)
    ref = reference(model, loss_fn, data, variance=variance, **hp)
    m = copy.deepcopy(model)
    opt = VarianceAdaptiveSGD(m, loss_fn, variance=variance, **hp)
    for t, (X, y) in enumerate(data):
        train(opt, m, loss_fn, [(X, y)])
        for p, r in zip(m.parameters(), ref[t], strict=True):
            torch.testing.assert_close(p.detach(), r, rtol=1e-10, atol=1e-10)
    st = opt.state[m[0].weight]
    assert ((st["gamma"] >= 0) & (st["gamma"] <= 1)).all()
    assert ("variance" in st) == (variance == "batch")
    opt.close()


def test_first_order_only_needs_no_loss_module():
    m = tiny_mlp(0)
    opt = VarianceAdaptiveSGD(m, None, lr=0.1)
    assert [type(e).__name__ for e in opt.collector.extensions] == ["Variance"]
    X, y = batches(1, N=5)[0]
    opt.zero_grad()
    nn.functional.cross_entropy(m(X), y).backward()
    opt.step()
    assert int(opt.state[m[0].weight]["step"]) == 1
    opt.close()


def test_batch_of_one_is_momentum_sgd():
    """N = 1 gives no variance estimate: γ = 1, the first step is a plain gradient step."""
    model = tiny_mlp(0)
    loss_fn = nn.CrossEntropyLoss()
    data = batches(1, N=1)
    ref = copy.deepcopy(model)
    _, g = gradients(ref, *data[0], loss_fn)
    m1 = copy.deepcopy(model)
    o1 = VarianceAdaptiveSGD(m1, loss_fn, lr=0.1, momentum=0.5)
    train(o1, m1, loss_fn, data)
    for p1, p2 in zip(m1.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p1.detach(), p2.detach() - 0.1 * g[p2], rtol=1e-12, atol=1e-12)
    assert torch.equal(o1.state[m1[0].weight]["gamma"], torch.ones_like(m1[0].weight))
    o1.close()
