"""The contract of every curvopt optimizer: resume, schedulers, groups, closure, tracking."""

from __future__ import annotations

import copy
import gc
import io

import pytest
import torch
from torch import nn

from curvopt.extensions import BatchGrad
from curvopt.optim import DiagGGNAdam, KFACOptimizer, VarianceAdaptiveSGD
from curvopt.optim._base import ALL_EXTENSIONS

from .cases import batches, snapshot, tiny_mlp, train

FACTORIES = {
    "kfac_mc": lambda m, lf, **kw: KFACOptimizer(
        m,
        lf,
        lr=0.1,
        damping=1e-2,
        curvature="kfac",
        mc_samples=2,
        factor_update_freq=2,
        inverse_update_freq=3,
        momentum=0.9,
        weight_decay=1e-3,
        **kw,
    ),
    "kflr_eigen": lambda m, lf, **kw: KFACOptimizer(
        m, lf, lr=0.1, damping=1e-2, curvature="kflr", damping_mode="eigen", kl_clip=1e-2, **kw
    ),
    "kfac_base_adam": lambda m, lf, **kw: KFACOptimizer(
        m, lf, lr=0.01, damping=1e-2, inverse_update_freq=2, base_optimizer=torch.optim.Adam, **kw
    ),
    "diag_ggn_adam_mc": lambda m, lf, **kw: DiagGGNAdam(
        m, lf, lr=0.01, curvature="mc", curvature_update_freq=2, weight_decay=1e-2, **kw
    ),
    "diag_ggn_adam_sophia": lambda m, lf, **kw: DiagGGNAdam(m, lf, lr=0.01, clip=0.05, **kw),
    "msvag": lambda m, lf, **kw: VarianceAdaptiveSGD(m, lf, lr=0.1, momentum=0.9, **kw),
}
NAMES = list(FACTORIES)
LOSS = nn.CrossEntropyLoss()


def _equal_tree(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal_tree(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal_tree(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_continues_bit_exactly(name):
    data = batches(11, N=6)
    m1 = tiny_mlp(0)
    o1 = FACTORIES[name](m1, LOSS, seed=1)
    train(o1, m1, LOSS, data[:5])
    buf = io.BytesIO()
    torch.save({"model": m1.state_dict(), "opt": o1.state_dict()}, buf)
    train(o1, m1, LOSS, data[5:])
    expected = snapshot(m1)
    expected_state = copy.deepcopy(o1.state_dict())

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    m2 = tiny_mlp(7)  # different initial values, overwritten by the checkpoint
    m2.load_state_dict(ckpt["model"])
    o2 = FACTORIES[name](m2, LOSS, seed=99)  # a different MC stream, overwritten too
    o2.load_state_dict(ckpt["opt"])
    torch.manual_seed(12345)  # the user's global RNG plays no part
    train(o2, m2, LOSS, data[5:])
    for a, b in zip(expected, m2.parameters(), strict=True):
        assert torch.equal(a, b.detach())
    assert _equal_tree(expected_state, o2.state_dict())
    o1.close()
    o2.close()


@pytest.mark.parametrize("name", NAMES)
def test_lr_scheduler_changes_the_step(name):
    m = tiny_mlp(0)
    opt = FACTORIES[name](m, LOSS)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0 if epoch == 0 else 0.0)
    data = batches(3, N=6)
    before = snapshot(m)
    train(opt, m, LOSS, data[:1])
    assert any(not torch.equal(a, b) for a, b in zip(before, m.parameters(), strict=True))
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.0
    frozen = snapshot(m)
    train(opt, m, LOSS, data[1:])
    assert all(torch.equal(a, b) for a, b in zip(frozen, m.parameters(), strict=True))
    opt.close()


@pytest.mark.parametrize("name", NAMES)
def test_param_groups_with_different_hyperparameters(name):
    m = tiny_mlp(0)
    groups = [{"params": list(m[0].parameters()), "lr": 0.0}, {"params": list(m[2].parameters())}]
    opt = FACTORIES[name](m, LOSS, params=groups)
    assert opt.param_groups[0]["lr"] == 0.0 and opt.param_groups[1]["lr"] > 0
    first, second = snapshot(m[0]), snapshot(m[2])
    train(opt, m, LOSS, batches(3, N=6))
    assert all(torch.equal(a, b) for a, b in zip(first, m[0].parameters(), strict=True))
    assert all(not torch.equal(a, b) for a, b in zip(second, m[2].parameters(), strict=True))
    opt.close()


def test_per_group_damping_and_momentum_are_used():
    m1, m2 = tiny_mlp(0), tiny_mlp(0)
    kw = dict(lr=0.1, curvature="kflr", kl_clip=None)
    o1 = KFACOptimizer(m1, LOSS, damping=1e-1, momentum=0.5, **kw)
    o2 = KFACOptimizer(
        m2,
        LOSS,
        damping=1e-3,
        momentum=0.0,
        params=[
            {"params": list(m2[0].parameters()), "damping": 1e-1, "momentum": 0.5},
            {"params": list(m2[2].parameters())},
        ],
        **kw,
    )
    data = batches(1, N=6)  # one step: afterwards layer 0 sees a different layer 2
    train(o1, m1, LOSS, data)
    train(o2, m2, LOSS, data)
    for a, b in zip(m1[0].parameters(), m2[0].parameters(), strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(m1[2].weight, m2[2].weight)
    assert (
        "momentum_buffer" in o2.state[m2[0].weight]
        and "momentum_buffer" not in o2.state[m2[2].weight]
    )
    assert o2.state[m2[2].weight]["inverse_damping"] == 1e-3
    o1.close()
    o2.close()


@pytest.mark.parametrize("name", NAMES)
def test_closure_path_equals_the_ordinary_loop(name):
    data = batches(5, N=6)
    m1, m2 = tiny_mlp(0), tiny_mlp(0)
    o1, o2 = FACTORIES[name](m1, LOSS, seed=3), FACTORIES[name](m2, LOSS, seed=3)
    l1 = train(o1, m1, LOSS, data)
    l2 = train(o2, m2, LOSS, data, closure=True)
    assert l1 == l2
    for a, b in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(a, b)
    o1.close()
    o2.close()


@pytest.mark.parametrize("name", ["kfac_mc", "diag_ggn_adam_mc", "msvag"])
def test_track_all_fills_the_ten_keys(name):
    m = tiny_mlp(0)
    opt = FACTORIES[name](m, LOSS, track="all")
    train(opt, m, LOSS, batches(2, N=6))  # step 2 is idle for the update, not for tracking
    for p in m.parameters():
        for cls in ALL_EXTENSIONS:
            assert cls.savefield in opt.state[p], cls.savefield
        assert opt.state[p]["grad_batch"].shape == (6, *p.shape)
    opt.close()


@pytest.mark.parametrize("name", NAMES)
def test_track_every_computes_the_tracked_quantities_on_those_steps_only(name):
    m = tiny_mlp(0)
    opt = FACTORIES[name](m, LOSS, track=["batch_l2"])
    opt.track_every = 3
    seen = []
    for X, y in batches(6, N=6):
        seen.append("batch_l2" in {e.savefield for e in opt.collector.extensions})
        train(opt, m, LOSS, [(X, y)])
    assert seen == [False, False, True, False, False, True]
    assert opt.state[m[0].weight]["batch_l2"].shape == (6,)
    with pytest.raises(ValueError, match="track_every"):
        opt.track_every = 0
    opt.close()


def test_track_accepts_names_classes_and_instances():
    m = tiny_mlp(0)
    opt = VarianceAdaptiveSGD(m, LOSS, track=["batch_l2", BatchGrad, "DiagGGNExact"])
    assert [e.savefield for e in opt.collector.extensions] == [
        "variance",
        "batch_l2",
        "grad_batch",
        "diag_ggn_exact",
    ]
    train(opt, m, LOSS, batches(1, N=4))
    assert set(opt.state[m[0].bias]) >= {"variance", "batch_l2", "grad_batch", "diag_ggn_exact"}
    with pytest.raises(ValueError, match="unknown quantity"):
        VarianceAdaptiveSGD(tiny_mlp(1), LOSS, track=["hessian"])
    opt.close()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_non_finite_step_is_skipped_and_state_kept(name, where):
    m = tiny_mlp(0)
    opt = FACTORIES[name](m, LOSS)
    data = batches(3, N=6)
    train(opt, m, LOSS, data[:2])
    state = copy.deepcopy(opt.state_dict())
    params = snapshot(m)
    X, y = data[2]
    opt.zero_grad()
    if where == "loss":
        X = X.clone()
        X[0, 0] = float("nan")
        loss = LOSS(m(X), y)
    else:
        loss = LOSS(m(X), y)
    loss.backward()
    if where == "gradient":
        m[2].bias.grad[0] = float("inf")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(params, m.parameters(), strict=True))
    assert _equal_tree(state, opt.state_dict())
    train(opt, m, LOSS, data[2:])  # and training goes on
    assert all(torch.isfinite(p).all() for p in m.parameters())
    opt.close()


@pytest.mark.parametrize("mode", ["pi", "eigen"])
def test_singular_factors_never_give_nan(mode):
    m = tiny_mlp(0, act=nn.ReLU)
    with torch.no_grad():
        m[0].bias.fill_(
            -100.0
        )  # every hidden unit dead: G of layer 0 is zero, A of layer 2 is zero
    opt = KFACOptimizer(m, LOSS, damping=1e-8, curvature="kflr", damping_mode=mode, kl_clip=None)
    X, y = batches(1, N=6)[0]
    train(opt, m, LOSS, [(torch.zeros_like(X), y), (X, y)])
    for p in m.parameters():
        assert torch.isfinite(p).all()
        assert all(
            torch.isfinite(v).all()
            for k in ("inverses", "eigenvectors", "eigenvalues")
            for v in opt.state[p].get(k, [])
        )
    opt.close()


@pytest.mark.parametrize("name", ["kfac_mc", "diag_ggn_adam_mc"])
def test_mc_sampling_leaves_the_global_rng_alone(name):
    m = tiny_mlp(0)
    opt = FACTORIES[name](m, LOSS)
    X, y = batches(1, N=6)[0]
    torch.manual_seed(0)
    before = torch.get_rng_state()
    train(opt, m, LOSS, [(X, y)])
    assert torch.equal(before, torch.get_rng_state())
    assert opt.state_dict()["curvopt"]["mc_rng"]  # the private stream advanced and is saved
    opt.close()


def test_state_is_created_lazily_and_hooks_are_removed():
    m = tiny_mlp(0)
    opt = KFACOptimizer(m, LOSS)
    assert len(opt.state) == 0
    del opt
    gc.collect()
    opt = KFACOptimizer(m, LOSS)  # the first one released the model
    opt.close()
    opt = DiagGGNAdam(m, LOSS)
    opt.close()
    assert not m._forward_hooks and not m._forward_pre_hooks and not LOSS._forward_hooks


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["kfac_mc", "diag_ggn_adam_mc", "msvag"])
def test_cuda_resume_is_bit_exact_and_leaves_the_cuda_rng_alone(name):
    dev = torch.device("cuda")
    data = [(X.to(dev), y.to(dev)) for X, y in batches(8, N=6)]
    m1 = tiny_mlp(0).to(dev)
    o1 = FACTORIES[name](m1, LOSS, seed=1)
    train(o1, m1, LOSS, data[:3])
    ckpt = copy.deepcopy({"model": m1.state_dict(), "opt": o1.state_dict()})
    before = torch.cuda.get_rng_state(dev)
    train(o1, m1, LOSS, data[3:])
    assert torch.equal(before, torch.cuda.get_rng_state(dev))
    m2 = tiny_mlp(5).to(dev)
    m2.load_state_dict(ckpt["model"])
    o2 = FACTORIES[name](m2, LOSS, seed=2)
    o2.load_state_dict(ckpt["opt"])
    train(o2, m2, LOSS, data[3:])
    for a, b in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(a, b)
    for p in m2.parameters():
        tensors = [v for v in o2.state[p].values() if isinstance(v, torch.Tensor)]
        assert all(v.device == p.device for v in tensors if v.dim() > 0)
    o1.close()
    o2.close()
