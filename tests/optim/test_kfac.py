"""KFACOptimizer against a hand-written float64 reference (explicit Kronecker products)."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

import curvopt
from curvopt.optim import KFACOptimizer

from .cases import DT, batches, gradients, kflr_factors, snapshot, tiny_mlp, train


def reference_kfac(
    model,
    loss_fn,
    data,
    *,
    lr,
    damping,
    factor_decay,
    Tf,
    Ti,
    mode,
    kl_clip,
    momentum,
    weight_decay,
    warmup=(),
):
    """K-FAC written out with dense Kronecker matrices: returns parameter snapshots per step.

    ``warmup``: statistics and inverses at these steps first, then every ``Tf``/``Ti`` steps
    counted from the last; an update ``k`` steps after the previous one decays by
    ``factor_decay ** (k / Tf)``."""
    model = copy.deepcopy(model)
    params = list(model.parameters())
    avg, cache, buf, snaps, inv_log = {}, {}, {}, [], []

    def due(t, T):
        if warmup:
            return t in warmup if t <= warmup[-1] else (t - warmup[-1]) % T == 0
        return (t - 1) % T == 0

    last = None
    for t, (X, y) in enumerate(data, 1):
        _, g = gradients(model, X, y, loss_fn)
        if due(t, Tf):
            raw = kflr_factors(model, X, y, loss_fn)
            eps = factor_decay ** ((t - last) / Tf) if last is not None else 0.0
            last = t
            for p in params:
                avg[p] = (
                    [r.clone() for r in raw[p]]
                    if p not in avg
                    else [
                        eps * a + (1 - eps) * r
                        for a, r in zip(avg[p], raw[p], strict=True)
                    ]
                )
        if due(t, Ti):
            inv_log.append(t)
            for p in params:
                fs = avg[p]
                if mode == "pi":
                    if len(fs) == 2:
                        Gm, Am = fs
                        pi = math.sqrt(
                            (torch.trace(Am) / Am.shape[0]) / (torch.trace(Gm) / Gm.shape[0])
                        )
                        K = torch.kron(
                            Gm + math.sqrt(damping) / pi * torch.eye(Gm.shape[0], dtype=DT),
                            Am + math.sqrt(damping) * pi * torch.eye(Am.shape[0], dtype=DT),
                        )
                    else:
                        K = fs[0] + damping * torch.eye(fs[0].shape[0], dtype=DT)
                    cache[p] = torch.linalg.inv(K)
                else:  # exact damping, the curvature frozen at this step
                    K = torch.kron(*fs) if len(fs) == 2 else fs[0]
                    cache[p] = K
        V = {}
        for p in params:
            if mode == "pi":
                V[p] = (cache[p] @ g[p].reshape(-1)).reshape(p.shape)
            else:
                K = cache[p] + damping * torch.eye(cache[p].shape[0], dtype=DT)
                V[p] = torch.linalg.solve(K, g[p].reshape(-1)).reshape(p.shape)
        nu = 1.0
        if kl_clip is not None:
            total = sum(lr**2 * float((V[p] * g[p]).sum()) for p in params)
            nu = min(1.0, math.sqrt(kl_clip / total))
        with torch.no_grad():
            for p in params:
                d = nu * V[p]
                if momentum:
                    buf[p] = d if p not in buf else momentum * buf[p] + d
                    d = buf[p]
                p.mul_(1 - lr * weight_decay).sub_(lr * d)
        snaps.append(snapshot(model))
    return snaps, inv_log


CONFIGS = {
    "plain": dict(Tf=1, Ti=1, mode="pi", kl_clip=None, momentum=0.0, weight_decay=0.0),
    "freqs_pi": dict(Tf=2, Ti=3, mode="pi", kl_clip=None, momentum=0.0, weight_decay=0.0),
    "kl_clip_momentum_wd": dict(
        Tf=1, Ti=2, mode="pi", kl_clip=1e-3, momentum=0.9, weight_decay=0.1
    ),
    "eigen_freqs": dict(Tf=2, Ti=3, mode="eigen", kl_clip=1e-2, momentum=0.5, weight_decay=0.0),
    # T_f > 3: statistics and inverses at the warm-up steps 1, 3, 6, then 10, 14, ...
    "warmup": dict(Tf=4, Ti=4, mode="pi", kl_clip=1e-2, momentum=0.5, weight_decay=0.0,
                   warmup=(1, 3, 6)),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_kfac_matches_reference(name):
    c = CONFIGS[name]
    model = tiny_mlp(0)
    loss_fn = nn.CrossEntropyLoss()
    data = batches(11, N=6)
    hp = dict(lr=0.3, damping=1e-2, factor_decay=0.8)
    ref, inv_steps = reference_kfac(model, loss_fn, data, **hp, **c)
    m = copy.deepcopy(model)
    opt = KFACOptimizer(
        m,
        loss_fn,
        lr=hp["lr"],
        damping=hp["damping"],
        curvature="kflr",
        factor_decay=hp["factor_decay"],
        factor_update_freq=c["Tf"],
        inverse_update_freq=c["Ti"],
        damping_mode=c["mode"],
        kl_clip=c["kl_clip"],
        momentum=c["momentum"],
        weight_decay=c["weight_decay"],
    )
    inv_ids = []
    for t, (X, y) in enumerate(data):
        opt.zero_grad()
        loss_fn(m(X), y).backward()
        opt.step()
        key = "inverses" if c["mode"] == "pi" else "eigenvectors"
        inv_ids.append(id(opt.state[m[0].weight][key][0]))
        for p, r in zip(m.parameters(), ref[t], strict=True):
            torch.testing.assert_close(p.detach(), r, rtol=1e-10, atol=1e-10)
    st = opt.state[m[0].weight]
    # inverses are recomputed exactly on the due steps and kept in between
    assert st["inverse_updates"] == len(inv_steps)
    changed = [t + 1 for t in range(len(inv_ids)) if t == 0 or inv_ids[t] != inv_ids[t - 1]]
    assert changed == inv_steps
    assert st["factor_updates"] == (4 if c.get("warmup") else len(range(0, 11, c["Tf"])))
    assert int(st["step"]) == 11
    opt.close()


def test_schedule_requests_statistics_only_when_due():
    m, loss_fn = tiny_mlp(0), nn.CrossEntropyLoss()
    opt = KFACOptimizer(m, loss_fn, curvature="kfac", mc_samples=2, factor_update_freq=3,
                        momentum=0.0)
    seen = []
    for X, y in batches(6, N=6):
        seen.append(tuple(type(e).__name__ for e in opt.collector.extensions))
        opt.zero_grad()
        loss_fn(m(X), y).backward()
        opt.step()
    assert seen == [("KFAC",), (), (), ("KFAC",), (), ()]
    assert opt.collector.extensions[0].mc_samples == 2 if opt.collector.extensions else True
    assert set(opt.state[m[0].weight]) == {
        "kfac",
        "step",
        "factors",
        "factor_updates",
        "inverses",
        "inverse_damping",
        "inverse_updates",
    }
    opt.close()


def test_kfac_raw_statistics_in_state_match_oracle():
    m, loss_fn = tiny_mlp(0), nn.CrossEntropyLoss()
    ((X, y),) = batches(1, N=6)
    ref = kflr_factors(m, X, y, loss_fn)  # before the optimizer's hooks are attached
    opt = KFACOptimizer(m, loss_fn, curvature="kflr")
    opt.zero_grad()
    loss_fn(m(X), y).backward()
    opt.step()
    for p in m.parameters():
        for a, b in zip(opt.state[p]["kflr"], ref[p], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    opt.close()


@pytest.mark.parametrize("curvature", ["kfac", "kfra"])
def test_other_curvatures_run_and_descend(curvature):
    torch.manual_seed(3)
    m, loss_fn = tiny_mlp(0, act=nn.ReLU), nn.CrossEntropyLoss()
    ((X, y),) = batches(1, N=32)
    opt = KFACOptimizer(
        m, loss_fn, lr=0.2, damping=1e-2, curvature=curvature, inverse_update_freq=1
    )
    losses = train(opt, m, loss_fn, [(X, y)] * 15)
    assert losses[-1] < 0.8 * losses[0]
    assert curvature in opt.state[m[0].weight]
    opt.close()


def test_base_optimizer_receives_preconditioned_gradient():
    model, loss_fn = tiny_mlp(0), nn.CrossEntropyLoss()
    data = batches(4, N=6)
    m1, m2 = copy.deepcopy(model), copy.deepcopy(model)
    o1 = KFACOptimizer(m1, loss_fn, lr=0.3, damping=1e-2, curvature="kflr", kl_clip=1e-2,
                       momentum=0.0)
    o2 = KFACOptimizer(
        m2,
        loss_fn,
        lr=0.3,
        damping=1e-2,
        curvature="kflr",
        kl_clip=1e-2,
        base_optimizer=torch.optim.SGD,
    )
    train(o1, m1, loss_fn, data)
    train(o2, m2, loss_fn, data)
    for a, b in zip(m1.parameters(), m2.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # the user's gradient is restored after the base step
    X, y = data[0]
    o2.zero_grad()
    loss_fn(m2(X), y).backward()
    g = [p.grad.clone() for p in m2.parameters()]
    o2.step()
    assert all(torch.equal(a, p.grad) for a, p in zip(g, m2.parameters(), strict=True))
    o1.close()
    o2.close()


def test_base_optimizer_from_torch_optimizer_and_state_dict():
    torch_optimizer = pytest.importorskip("torch_optimizer")
    m, loss_fn = tiny_mlp(0), nn.CrossEntropyLoss()
    opt = KFACOptimizer(
        m,
        loss_fn,
        lr=0.01,
        curvature="kflr",
        base_optimizer=torch_optimizer.Lamb,
        base_optimizer_kwargs=dict(weight_decay=1e-4),
    )
    train(opt, m, loss_fn, batches(3, N=6))
    sd = opt.state_dict()
    assert sd["curvopt"]["base_optimizer"]["state"]
    with pytest.raises(ValueError, match="base optimizer"):
        KFACOptimizer(tiny_mlp(1), loss_fn, momentum=0.9, base_optimizer=torch.optim.SGD)
    opt.close()


def test_fallback_to_diagonal_ggn(monkeypatch):
    """A parameter without Kronecker factors uses the damped diagonal GGN from the next update."""
    m, loss_fn = tiny_mlp(0), nn.CrossEntropyLoss()
    opt = KFACOptimizer(m, loss_fn, lr=0.1, damping=1e-2, curvature="kflr", kl_clip=None)
    orig = opt._fresh_stats
    bias = m[2].bias

    def drop(self=opt):
        stats = orig()
        if stats is not None:
            stats[bias] = {k: v for k, v in stats[bias].items() if k != "kflr"}
        return stats

    monkeypatch.setattr(opt, "_fresh_stats", drop)
    data = batches(3, N=6)
    before = bias.detach().clone()
    with pytest.warns(RuntimeWarning, match="no Kronecker factors"):
        train(opt, m, loss_fn, data[:1])
    assert torch.equal(bias.detach(), before)
    assert [type(e).__name__ for e in opt.collector.extensions] == ["KFLR", "DiagGGNExact"]
    from .cases import ggn_diagonal

    X, y = data[1]
    clean = tiny_mlp(0)  # a hook-free copy for the oracle
    clean.load_state_dict(m.state_dict())
    h = ggn_diagonal(clean, X, y, loss_fn)[clean[2].bias]
    _, g = gradients(clean, X, y, loss_fn)
    expected = bias.detach() - 0.1 * g[clean[2].bias] / (h + 1e-2)
    train(opt, m, loss_fn, data[1:2])
    torch.testing.assert_close(bias.detach(), expected, rtol=1e-10, atol=1e-12)
    assert "diag_avg" in opt.state[bias] and "factors" not in opt.state[bias]
    opt.close()


def test_fallback_error_refuses_a_parameter_without_kronecker_factors():
    m = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Linear(4, 3)).to(DT)
    with pytest.raises(curvopt.UnsupportedModuleError, match="no Kronecker factors") as err:
        KFACOptimizer(m, nn.CrossEntropyLoss(), fallback="error")
    assert "1.weight" in str(err.value) and "norm affine" in str(err.value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the failed one released the model: no take-over
        KFACOptimizer(m, nn.CrossEntropyLoss(), fallback="error", norm_blocks="dense").close()


def test_adaptive_damping_shrinks_on_a_quadratic():
    torch.manual_seed(0)
    m = nn.Linear(4, 2, bias=False).to(DT)
    loss_fn = nn.MSELoss()
    X = torch.randn(64, 4, dtype=DT)
    Y = X @ torch.randn(4, 2, dtype=DT) + 0.1 * torch.randn(64, 2, dtype=DT)
    opt = KFACOptimizer(
        m,
        loss_fn,
        lr=0.5,
        damping=1.0,
        curvature="kflr",
        kl_clip=None,
        momentum=0.0,
        factor_update_freq=1,
        inverse_update_freq=1,
        damping_mode="eigen",
        adaptive_damping=True,
        damping_adaptation_interval=1,
        damping_adaptation_decay=0.5,
    )
    losses = train(opt, m, loss_fn, [(X, Y)] * 6, closure=True)
    # every step's reduction ratio was above 3/4 (KFLR is the exact Hessian here)
    assert opt.param_groups[0]["damping"] == pytest.approx(0.5**6)
    assert losses[-1] < losses[0]
    with pytest.raises(ValueError, match="closure"):
        train(opt, m, loss_fn, [(X, Y)])
    opt.close()
    # 2.5 Newton steps overshoot: the loss rises, ρ < 1/4, and λ grows by 1/decay
    m.reset_parameters()
    opt = KFACOptimizer(m, loss_fn, lr=2.5, damping=1e-3, curvature="kflr", kl_clip=None,
                        momentum=0.0, damping_mode="eigen", adaptive_damping=True,
                        damping_adaptation_interval=1, damping_adaptation_decay=0.5)
    losses = train(opt, m, loss_fn, [(X, Y)] * 2, closure=True)
    assert losses[1] > losses[0]
    assert opt.param_groups[0]["damping"] == pytest.approx(1e-3 / 0.5**2)  # both steps
    opt.close()


def test_invalid_arguments():
    m, loss_fn = tiny_mlp(0), nn.CrossEntropyLoss()
    for kw in (
        dict(curvature="ekfac"),
        dict(damping=0.0),
        dict(damping_mode="x"),
        dict(inverse_update_freq=0),
        dict(factor_decay=1.0),
        dict(kl_clip=0.0),
    ):
        with pytest.raises(ValueError):
            KFACOptimizer(m, loss_fn, **kw)
    with pytest.raises(TypeError, match="nn.Module"):
        KFACOptimizer(list(m.parameters()), loss_fn)
    assert curvopt.KFACOptimizer is KFACOptimizer
