"""Convergence: steps to a target loss at tuned learning rates, against SGD and Adam.

Three deterministic float64 problems, each small enough to tune every
optimizer's learning rate on a grid inside the test: an ill-conditioned
quadratic (least squares with a rotated spectrum), logistic regression and an
MLP on a subset of scikit-learn's digits (mini-batches drawn with a fixed
seed; the target is on the full subset).  Every optimizer's learning rate is
tuned on a grid of the same density (a factor sqrt(2) apart); K-FAC's grid is
lr in {0.1, 0.3, 1} times kl_clip in {3e-3 (default), None}.  Claims checked:
KFACOptimizer needs fewer steps than both SGD (momentum 0.9) and Adam; EKFAC
(``eigen_correction=True``) fewer than KFACOptimizer on the MLP;
DiagGGNAdam and VarianceAdaptiveSGD match Adam, i.e. need at most 10 % more
steps -- the resolution of the tuning grid (measured, see the report in the
module's ``__main__``: on the MLP both need 21 steps against Adam's 20, on the
two other problems fewer than Adam).

``python -m tests.optim.test_convergence`` prints the full table.
"""

from __future__ import annotations

import math
import warnings
from functools import lru_cache

import pytest
import torch
from torch import nn

from curvopt.optim import DiagGGNAdam, KFACOptimizer, VarianceAdaptiveSGD

DT = torch.float64


def quadratic():
    g = torch.Generator().manual_seed(0)
    d, N = 10, 64
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=DT))
    X = (
        torch.randn(N, d, generator=g, dtype=DT) * torch.logspace(0, -1.5, d, dtype=DT)
    ) @ Q.T + 1.0
    Y = X @ torch.randn(d, 1, generator=g, dtype=DT) + 0.1 * torch.randn(
        N, 1, generator=g, dtype=DT
    )
    Xb = torch.cat([X, torch.ones(N, 1, dtype=DT)], 1)
    best = nn.functional.mse_loss(Xb @ torch.linalg.lstsq(Xb, Y).solution, Y).item()
    torch.manual_seed(0)
    model = nn.Linear(d, 1).to(DT)
    L0 = nn.functional.mse_loss(model(X), Y).item()
    return model, nn.MSELoss(), X, Y, None, best + 1e-3 * (L0 - best)


@lru_cache
def _digits(n=384):
    from sklearn.datasets import load_digits

    Xn, yn = load_digits(return_X_y=True)
    return torch.tensor(Xn[:n], dtype=DT) / 16.0, torch.tensor(yn[:n])


def logistic_regression():
    X, y = _digits()
    torch.manual_seed(0)
    return nn.Linear(64, 10).to(DT), nn.CrossEntropyLoss(), X, y, 64, 0.2


def mlp():
    X, y = _digits()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).to(DT)
    return model, nn.CrossEntropyLoss(), X, y, 64, 0.1


PROBLEMS = {"quadratic": quadratic, "logistic_regression": logistic_regression, "mlp": mlp}
MAX_STEPS = 150


def grid(lo: float, hi: float) -> list[float]:
    """Learning rates from lo to hi, a factor sqrt(2) apart (the same density for everyone)."""
    n = round(2 * math.log2(hi / lo))
    return [lo * 2 ** (k / 2) for k in range(n + 1)]


OPTIMIZERS = {
    "sgd": (
        lambda m, lf, lr, **kw: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9),
        grid(0.03, 3.0),
    ),
    "adam": (lambda m, lf, lr, **kw: torch.optim.Adam(m.parameters(), lr=lr), grid(0.01, 1.0)),
    # K-FAC's grid: lr and whether to clip the KL (full-batch-like problems need no clipping)
    "kfac": (
        lambda m, lf, lr, kl_clip=3e-3: KFACOptimizer(m, lf, lr=lr, kl_clip=kl_clip),
        [(lr, dict(kl_clip=c)) for lr in (0.1, 0.3, 1.0) for c in (3e-3, None)],
    ),
    # EKFAC on K-FAC's grid
    "ekfac": (
        lambda m, lf, lr, kl_clip=3e-3: KFACOptimizer(m, lf, lr=lr, kl_clip=kl_clip,
                                                      eigen_correction=True),
        [(lr, dict(kl_clip=c)) for lr in (0.1, 0.3, 1.0) for c in (3e-3, None)],
    ),
    "diag_ggn_adam": (lambda m, lf, lr, **kw: DiagGGNAdam(m, lf, lr=lr), grid(0.01, 1.0)),
    "variance_sgd": (lambda m, lf, lr, **kw: VarianceAdaptiveSGD(m, lf, lr=lr), grid(0.1, 30.0)),
}


def steps_to_target(problem: str, make, lr: float, **kw) -> float:
    model, loss_fn, X, Y, batch, target = PROBLEMS[problem]()
    opt = make(model, loss_fn, lr, **kw)
    g = torch.Generator().manual_seed(1)
    try:
        for step in range(1, MAX_STEPS + 1):
            if batch:
                idx = torch.randint(0, X.shape[0], (batch,), generator=g)
                xb, yb = X[idx], Y[idx]
            else:
                xb, yb = X, Y
            opt.zero_grad()
            loss = loss_fn(model(xb), yb)
            loss.backward()
            opt.step()
            if batch:
                with torch.no_grad():
                    loss = loss_fn(model(X), Y)
            value = loss.item()
            if not math.isfinite(value) or value > 1e6:
                return math.inf
            if value <= target:
                return step
        return math.inf
    finally:
        if hasattr(opt, "close"):
            opt.close()


@lru_cache
def tuned(problem: str, name: str) -> tuple[float, object]:
    """(fewest steps over the grid, the grid point)."""
    make, points = OPTIMIZERS[name]
    points = [p if isinstance(p, tuple) else (p, {}) for p in points]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = [(steps_to_target(problem, make, lr, **kw), lr, kw) for lr, kw in points]
    steps, lr, kw = min(results, key=lambda r: r[0])
    return steps, (round(lr, 4), kw) if kw else round(lr, 4)


@pytest.mark.slow
@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_kfac_beats_tuned_sgd_and_adam(problem):
    kfac, sgd, adam = (tuned(problem, n)[0] for n in ("kfac", "sgd", "adam"))
    assert math.isfinite(kfac)
    assert kfac < sgd and kfac < adam, (kfac, sgd, adam)


def test_ekfac_takes_fewer_steps_than_kfac_on_the_digits_mlp():
    """EKFAC's fitted diagonal against K-FAC's, both at their defaults on the same grid
    (measured: 12 against 14 steps).  Not claimed for the other two problems: there the
    diagonal, from the empirical Fisher of ``grad_batch``, loses to K-FAC's exact-damped
    factors (linear least squares: 25 against 12 steps; logistic regression: 8 against 5),
    see the ``eigen_correction`` docs."""
    ekfac, kfac = tuned("mlp", "ekfac")[0], tuned("mlp", "kfac")[0]
    assert math.isfinite(ekfac)
    assert ekfac < kfac, (ekfac, kfac)


@pytest.mark.slow
@pytest.mark.parametrize("problem", list(PROBLEMS))
@pytest.mark.parametrize("name", ["diag_ggn_adam", "variance_sgd"])
def test_other_optimizers_match_adam(problem, name):
    ours, adam = tuned(problem, name)[0], tuned(problem, "adam")[0]
    assert math.isfinite(ours)
    assert ours <= 1.1 * adam, (name, ours, adam)


if __name__ == "__main__":  # pragma: no cover - the table for the docs
    for problem in PROBLEMS:
        row = {n: tuned(problem, n) for n in OPTIMIZERS}
        print(problem, {n: f"{s} steps @ lr={lr}" for n, (s, lr) in row.items()})
