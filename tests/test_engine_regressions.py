"""Regression tests for engine bugs found in review: each compares with the oracle or
checks that a clear error replaces a silent wrong number."""

from __future__ import annotations

import gc

import oracle
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import curvopt
from curvopt.errors import CollectError, UnsupportedModuleError
from curvopt.extensions import KFLR, BatchGrad, DiagGGNExact, DiagHessian

DT = torch.float64


class ScaledRoot(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.t = nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        return self.lin(x) * self.t


class LoRALinear(nn.Linear):
    def __init__(self, i, o, r=2):
        super().__init__(i, o)
        self.lora_A = nn.Parameter(0.1 * torch.randn(r, i))
        self.lora_B = nn.Parameter(0.1 * torch.randn(o, r))

    def forward(self, x):
        return super().forward(x) + x @ self.lora_A.T @ self.lora_B.T


def _weight_norm_model():
    from torch.nn.utils.parametrizations import weight_norm

    return nn.Sequential(weight_norm(nn.Linear(3, 4)), nn.Tanh(), nn.Linear(4, 2))


@pytest.mark.parametrize("make", [ScaledRoot, lambda: nn.Sequential(LoRALinear(3, 2)),
                                  _weight_norm_model],
                         ids=["parameterized-root", "lora-subclass", "weight-norm"])
def test_generic_rule_cases_match_oracle(make):
    torch.manual_seed(0)
    model = make().to(DT)
    X, y = torch.randn(4, 3, dtype=DT), torch.randn(4, 2, dtype=DT)
    loss_fn = nn.MSELoss(reduction="sum")
    params = {k: v.detach() for k, v in model.named_parameters()}
    ref = vmap(grad(lambda p, x, t: loss_fn(functional_call(model, p, (x[None],)), t[None])),
               in_dims=(None, 0, 0))(params, X, y)
    with curvopt.collect(model, loss_fn, BatchGrad(), DiagGGNExact()) as col:
        loss_fn(model(X), y).backward()
    exp_ggn = oracle.diag_by_param(oracle.ggn_matrix(model, loss_fn, X, y), model)
    for name, g in ref.items():
        torch.testing.assert_close(col.results[name]["grad_batch"], g, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(col.results[name]["diag_ggn_exact"], exp_ggn[name],
                                   rtol=1e-10, atol=1e-12)


def test_kept_results_are_never_overwritten():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    lf = nn.MSELoss()
    hist, snaps, kept = [], [], []
    with curvopt.Collector(m, lf, [BatchGrad()]) as col:
        for _ in range(4):
            lf(m(torch.randn(4, 3)), torch.randn(4, 2)).backward()
            hist.append(col.results)
            snaps.append(col.results["0.weight"]["grad_batch"].clone())
            gb = m[0].weight.grad_batch
            kept.append((gb.detach(), gb.clone()))
            del gb
    assert all(torch.equal(h["0.weight"]["grad_batch"], s) for h, s in zip(hist, snaps))
    assert all(torch.equal(a, b) for a, b in kept)


def test_evaluation_forward_without_backward_leaks_nothing():
    m = nn.Sequential(nn.Linear(30, 40), nn.Tanh(), nn.Linear(40, 2))
    lf = nn.MSELoss()
    with curvopt.Collector(m, lf, [BatchGrad(), KFLR()]) as col:
        for _ in range(3):
            lf(m(torch.randn(8, 30)), torch.randn(8, 2))  # no backward
            lf(m(torch.randn(8, 30)), torch.randn(8, 2)).backward()
            gc.collect()
            assert len(col._pending) == 0
            assert "kflr" in col.results["0.weight"]


def test_two_loss_calls_in_one_backward_raise():
    m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4))
    lf = nn.MSELoss()
    X, y = torch.randn(5, 3), torch.randn(5, 4)
    with pytest.raises(CollectError, match="two calls of the loss"):
        with curvopt.collect(m, lf, DiagGGNExact()):
            out = m(X)
            (lf(out[:, :2], y[:, :2]) + lf(out[:, 2:], y[:, 2:])).backward()


class Temperature(nn.Module):
    def __init__(self):
        super().__init__()
        self.t = nn.Parameter(torch.tensor(0.7))

    def forward(self, x):
        return x / self.t


def test_diag_h_refuses_learnable_divisor():
    m = nn.Sequential(nn.Linear(3, 4), Temperature())
    lf = nn.CrossEntropyLoss()
    with pytest.raises(UnsupportedModuleError, match="division"):
        with curvopt.collect(m, lf, DiagHessian()):
            lf(m(torch.randn(3, 3)), torch.randint(0, 4, (3,))).backward()


@pytest.mark.parametrize("lower", ["conv", "conv-bn"])
def test_diag_h_transport_only_onto_plain_linear(lower):
    """A Linear above a convolution mixes positions that share the conv's parameters."""
    torch.manual_seed(0)
    layers = [nn.Conv2d(2, 3, 3, padding=1)]
    if lower == "conv-bn":
        layers.append(nn.BatchNorm2d(3))
    m = nn.Sequential(*layers, nn.Sigmoid(), nn.Linear(4, 2), nn.Tanh(), nn.Flatten()).to(DT)
    if lower == "conv-bn":
        m(torch.randn(4, 2, 4, 4, dtype=DT))
    m.eval()
    X, y = torch.randn(3, 2, 4, 4, dtype=DT), torch.randn(3, 24, dtype=DT)
    lf = nn.MSELoss()
    with curvopt.collect(m, lf, DiagHessian()) as col:
        lf(m(X), y).backward()
    exp = oracle.diag_by_param(oracle.hessian_matrix(m, lf, X, y), m)
    for name, e in exp.items():
        torch.testing.assert_close(col.results[name]["diag_h"], e, rtol=1e-9, atol=1e-12)


class TiedEmbedding(nn.Module):
    """An embedding whose weight is reused functionally as the output layer."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.lin = nn.Linear(4, 4)

    def forward(self, idx):
        h = torch.tanh(self.lin(self.emb(idx))).mean(1)
        return torch.nn.functional.linear(h, self.emb.weight)


def test_use_outside_the_module_warns_instead_of_silent_partial_results():
    m = TiedEmbedding()
    lf = nn.CrossEntropyLoss()
    X, y = torch.randint(0, 7, (5, 3)), torch.randint(0, 7, (5,))
    with pytest.warns(RuntimeWarning, match="emb.weight"):
        with curvopt.collect(m, lf, BatchGrad()):
            lf(m(X), y).backward()


def test_coverage_check_runs_on_its_schedule():
    """``coverage_every=k``: the first backward with results and every k-th after it."""
    import warnings

    from curvopt.engine.collector import Collector

    m = TiedEmbedding()
    lf = nn.CrossEntropyLoss()
    X, y = torch.randint(0, 7, (5, 3)), torch.randint(0, 7, (5,))
    col = Collector(m, lf, (BatchGrad(),))
    col.coverage_every = 3
    warned = []
    with col:
        for _ in range(7):
            m.zero_grad(set_to_none=True)
            with warnings.catch_warnings(record=True) as rec:
                warnings.simplefilter("always")
                lf(m(X), y).backward()
            warned.append(any("emb.weight" in str(w.message) for w in rec))
    assert warned == [True, False, False, True, False, False, True]
    col.coverage_every = 0  # never
    with col, warnings.catch_warnings():
        warnings.simplefilter("error")
        m.zero_grad(set_to_none=True)
        lf(m(X), y).backward()


def test_fully_recorded_model_does_not_warn():
    import warnings

    m = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 2))
    lf = nn.CrossEntropyLoss()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with curvopt.collect(m, lf, BatchGrad(), KFLR()):
            lf(m(torch.randn(4, 2, 4, 4)), torch.randint(0, 2, (4,))).backward()
