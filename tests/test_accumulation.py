"""Gradient accumulation: several backward passes (micro-batches) describe their union
exactly as one backward over the concatenated batch (float64, to 1e-10)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvopt
from curvopt.errors import CurvoptError

SIZES = (2, 3, 4)  # unequal micro-batches


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _data(loss):
    g = torch.Generator().manual_seed(1)
    X = torch.randn(sum(SIZES), 4, generator=g, dtype=torch.float64)
    y = (torch.randint(0, 3, (len(X),), generator=g) if loss == "ce"
         else torch.randn(len(X), 3, generator=g, dtype=torch.float64))
    return X, y


def _exts(loss):
    exts = [curvopt.BatchGrad(), curvopt.SumGradSquared(), curvopt.Variance(),
            curvopt.BatchL2Grad(), curvopt.DiagGGNExact(), curvopt.KFLR(), curvopt.DiagHessian()]
    return exts + [curvopt.DiagGGNMC(mc_samples=2), curvopt.KFAC(mc_samples=2)]


def _flat(v):
    return torch.cat([t.reshape(-1) for t in v]) if isinstance(v, list) else v.reshape(-1)


@pytest.fixture
def row_wise_samples(monkeypatch):
    """MC "samples" that are a function of each row, so that micro-batches draw exactly what
    the concatenated batch draws (the accumulation, not the RNG, is under test)."""
    from curvopt import losses

    def sample(self, o, y, M, gen):
        base = torch.sin(3 * o + 1)  # any per-row function of the output
        return torch.stack([base * (m + 1) for m in range(M)])

    for cls in (losses.MSE, losses.CrossEntropy):
        monkeypatch.setattr(cls, "_sample", sample)


@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_union_of_micro_batches_equals_one_backward(loss, reduction, row_wise_samples):
    model = _model()
    loss_fn = (nn.CrossEntropyLoss if loss == "ce" else nn.MSELoss)(reduction=reduction)
    X, y = _data(loss)
    exts = _exts(loss)

    def gen(dev):
        return g

    g = torch.Generator().manual_seed(5)
    col = curvopt.Collector(model, loss_fn, exts, set_attributes=False)
    col.mc_generator = gen
    with col:
        loss_fn(model(X), y).backward()
    ref = col.results

    g = torch.Generator().manual_seed(5)
    model.zero_grad(set_to_none=True)
    col = curvopt.Collector(model, loss_fn, exts, set_attributes=False, accumulate=True,
                            loss_scaling="unscale")
    col.mc_generator = gen
    with col:
        for Xi, yi in zip(X.split(SIZES), y.split(SIZES)):
            (loss_fn(model(Xi), yi) / len(SIZES)).backward()
    got = col.results
    assert set(got) == set(ref)
    for name, res in ref.items():
        assert set(got[name]) == set(res)
        for f, v in res.items():
            a, b = _flat(got[name][f]), _flat(v)
            err = float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))
            assert err < 1e-10, (name, f, err)
    # reset(): a new union starts
    col.reset()
    with col:
        loss_fn(model(X[:2]), y[:2]).backward()
    assert col.results["0.weight"]["grad_batch"].shape[0] == 2


def test_collect_block_accumulates_only_when_asked():
    model, (X, y) = _model(), _data("ce")
    loss_fn = nn.CrossEntropyLoss()
    with pytest.raises(CurvoptError, match="second backward"):
        with curvopt.collect(model, loss_fn, curvopt.BatchGrad()):
            for Xi, yi in zip(X.split(SIZES), y.split(SIZES)):
                loss_fn(model(Xi), yi).backward()
    with curvopt.collect(model, loss_fn, curvopt.BatchGrad(), accumulate=True) as col:
        for Xi, yi in zip(X.split(SIZES), y.split(SIZES)):
            loss_fn(model(Xi), yi).backward()
    assert col.results["0.weight"]["grad_batch"].shape[0] == sum(SIZES)


def test_kfra_refuses_a_second_micro_batch():
    model, (X, y) = _model(), _data("ce")
    loss_fn = nn.CrossEntropyLoss()
    with pytest.raises(CurvoptError, match="KFRA"):
        with curvopt.collect(model, loss_fn, curvopt.KFRA(), accumulate=True):
            for Xi, yi in zip(X.split(SIZES), y.split(SIZES)):
                loss_fn(model(Xi), yi).backward()


def test_union_does_not_alias_the_first_micro_batch_results():
    """Changing the first micro-batch's returned results in place leaves the union alone."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    lf = torch.nn.CrossEntropyLoss(reduction="sum")
    X, y = torch.randn(6, 4), torch.randint(0, 2, (6,))
    from curvopt.engine.collector import Collector
    from curvopt.extensions import SumGradSquared

    def union(mutate):
        model.zero_grad()
        col = Collector(model, lf, (SumGradSquared(),), accumulate=True)
        with col:
            lf(model(X[:3]), y[:3]).backward()
            if mutate:
                col.results["0.weight"]["sum_grad_squared"].mul_(4.0)
            lf(model(X[3:]), y[3:]).backward()
        return col.results["0.weight"]["sum_grad_squared"].clone()

    torch.testing.assert_close(union(True), union(False), rtol=0, atol=0)
