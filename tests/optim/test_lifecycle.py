"""Real training loops: take-over, param groups, checkpoints, interrupts, private MC streams."""

from __future__ import annotations

import copy
import threading
import warnings

import pytest
import torch
from torch import nn

import curvopt
from curvopt.optim import DiagGGNAdam, KFACOptimizer, OptimizerError, VarianceAdaptiveSGD
from curvopt.optim import functional as F

from .cases import batches, snapshot, tiny_mlp, train
from .test_contract import FACTORIES, LOSS, NAMES, _equal_tree

MC = ["kfac_mc", "diag_ggn_adam_mc"]


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


# ------------------------------------------------------------------------------ take-over
@pytest.mark.parametrize("name", NAMES)
def test_a_new_optimizer_takes_the_model_over_and_the_old_one_refuses(name):
    m = tiny_mlp(0)
    old = FACTORIES[name](m, LOSS)
    train(old, m, LOSS, batches(1, N=6))
    with pytest.warns(RuntimeWarning, match="still driven by"):
        new = KFACOptimizer(m, LOSS)  # a notebook cell run twice: `old` is still referenced
    train(new, m, LOSS, batches(2, N=6))
    with pytest.raises(curvopt.CollectError, match="took it over"):
        old.step()
    new.close()
    with pytest.raises(curvopt.CollectError, match="after close"):
        new.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # closed: no take-over warning
        FACTORIES[name](m, LOSS).close()


def test_a_model_inside_collect_is_not_taken_over():
    m = tiny_mlp(0)
    with curvopt.collect(m, LOSS, curvopt.extensions.BatchGrad()):
        with pytest.raises(curvopt.CollectError, match="already has an active"):
            VarianceAdaptiveSGD(m, LOSS)


# --------------------------------------------------------------------------- param groups
@pytest.mark.parametrize("name", ["kfac_mc", "kfac_base_adam", "diag_ggn_adam_mc", "msvag"])
def test_add_param_group_brings_unfrozen_parameters_under_the_engine(name):
    m = tiny_mlp(0)
    first = list(m[0].parameters())
    for p in first:
        p.requires_grad_(False)
    opt = FACTORIES[name](m, LOSS)
    data = batches(6, N=6)
    train(opt, m, LOSS, data[:2])
    frozen = snapshot(m[0])
    for p in first:  # progressive unfreezing
        p.requires_grad_(True)
    opt.add_param_group({"params": first})
    train(opt, m, LOSS, data[2:])
    assert not any(torch.equal(a, b) for a, b in zip(frozen, m[0].parameters(), strict=True))
    stat = {"kfac_mc": "factors", "kfac_base_adam": "factors", "diag_ggn_adam_mc": "exp_avg_curv",
            "msvag": "variance"}[name]
    assert all(stat in opt.state[p] for p in first)
    opt.close()


@pytest.mark.parametrize("name", ["kfac_mc", "msvag"])
def test_parameters_outside_the_model_are_refused(name):
    m, other = tiny_mlp(0), tiny_mlp(1)
    with pytest.raises(OptimizerError, match="not parameters of the model"):
        FACTORIES[name](m, LOSS, params=list(other.parameters()))
    opt = FACTORIES[name](m, LOSS)
    with pytest.raises(OptimizerError, match="not parameters of the model"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(3))]})
    assert len(opt.param_groups) == 1
    opt.close()


# ----------------------------------------------------------------------------- state dicts
@pytest.mark.parametrize("name", NAMES)
def test_state_dict_loads_with_torch_load_defaults(name, tmp_path):
    data = batches(6, N=6)
    m1 = tiny_mlp(0)
    o1 = FACTORIES[name](m1, LOSS, seed=1, track="all")
    train(o1, m1, LOSS, data[:3])
    path = tmp_path / "ckpt.pt"
    torch.save({"model": m1.state_dict(), "opt": o1.state_dict()}, path)
    ckpt = torch.load(path)  # weights_only=True: tensors, numbers, strings, plain containers
    assert ckpt["opt"]["curvopt"]["mc_rng"]["cpu"].dtype == torch.uint8 or name == "msvag"
    train(o1, m1, LOSS, data[3:])
    o1.close()
    m2 = tiny_mlp(3)
    m2.load_state_dict(ckpt["model"])
    o2 = FACTORIES[name](m2, LOSS, seed=2, track="all")
    o2.load_state_dict(ckpt["opt"])
    train(o2, m2, LOSS, data[3:])
    assert _same(snapshot(m1), snapshot(m2))
    o2.close()


@pytest.mark.parametrize("name", ["kfac_mc", "diag_ggn_adam_mc", "msvag"])
def test_load_state_dict_refuses_foreign_state_before_changing_anything(name):
    data = batches(4, N=6)
    m = tiny_mlp(0)
    opt = FACTORIES[name](m, LOSS, seed=0)
    train(opt, m, LOSS, data[:2])
    before = copy.deepcopy(opt.state_dict())

    other_cls = "msvag" if name != "msvag" else "kfac_mc"
    m_other = tiny_mlp(0)
    o_other = FACTORIES[other_cls](m_other, LOSS)
    train(o_other, m_other, LOSS, data[:1])
    foreign = o_other.state_dict()
    o_other.close()

    wide = tiny_mlp(0, sizes=(5, 6, 3))  # same parameter count, other shapes
    o_wide = FACTORIES[name](wide, LOSS)
    train(o_wide, wide, LOSS, data[:1])
    other_arch = o_wide.state_dict()
    o_wide.close()

    adam = torch.optim.Adam(tiny_mlp(0).parameters())
    deeper = tiny_mlp(0, sizes=(5, 4, 4, 3))
    o_deep = FACTORIES[name](deeper, LOSS)
    fewer = o_deep.state_dict()
    o_deep.close()
    cases = [
        (foreign, "saved by a"),
        (adam.state_dict(), "lacks the hyperparameter"),
        (other_arch, "saved for another architecture"),
        (fewer, "has 6 parameters"),
        ({"state": {}}, "not an optimizer state dict"),
    ]
    for sd, match in cases:
        with pytest.raises(OptimizerError, match=match):
            opt.load_state_dict(sd)
        assert _equal_tree(before, opt.state_dict())
    train(opt, m, LOSS, data[2:])  # and the optimizer works on
    opt.close()


# ------------------------------------------------------------------------ nothing wedges
def _interrupting_hook(module, args, output):
    """Raise inside backward, after the engine's loss hook has drawn its MC samples."""

    def boom(g):
        raise KeyboardInterrupt

    output.register_hook(boom)


@pytest.mark.parametrize("name", NAMES)
def test_an_interrupted_backward_leaves_the_optimizer_ready(name):
    data = batches(5, N=6)
    m1, m2 = tiny_mlp(0), tiny_mlp(0)
    o1, o2 = FACTORIES[name](m1, LOSS, seed=4), FACTORIES[name](m2, LOSS, seed=4)
    train(o1, m1, LOSS, data[:2])
    handle = m1[1].register_forward_hook(_interrupting_hook)
    o1.zero_grad()
    with pytest.raises(KeyboardInterrupt):
        LOSS(m1(data[2][0]), data[2][1]).backward()
    handle.remove()
    train(o1, m1, LOSS, data[3:])
    train(o2, m2, LOSS, data[:2] + data[3:])  # as if the interrupted iteration never was
    assert _same(snapshot(m1), snapshot(m2))
    assert _equal_tree(o1.state_dict(), o2.state_dict())
    o1.close()
    o2.close()


_MID_STEP = {  # a function each optimizer calls in the middle of its update
    "kfac_mc": "kl_clip_coefficient",
    "kflr_eigen": "kl_clip_coefficient",
    "kfac_base_adam": "kl_clip_coefficient",
    "diag_ggn_adam_mc": "diag_ggn_adam",
    "diag_ggn_adam_sophia": "diag_ggn_adam",
    "msvag": "msvag",
}


@pytest.mark.parametrize("name", NAMES)
def test_an_exception_inside_step_changes_nothing(name, monkeypatch):
    data = batches(5, N=6)
    m1, m2 = tiny_mlp(0), tiny_mlp(0)
    o1, o2 = FACTORIES[name](m1, LOSS, seed=4), FACTORIES[name](m2, LOSS, seed=4)
    train(o1, m1, LOSS, data[:2])
    original = getattr(F, _MID_STEP[name])
    calls = []

    def fail_on_second_call(*args, **kwargs):  # after some parameters were updated
        calls.append(1)
        if len(calls) == 2 or _MID_STEP[name] == "kl_clip_coefficient":
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(F, _MID_STEP[name], fail_on_second_call)
    with pytest.raises(KeyboardInterrupt):
        train(o1, m1, LOSS, data[2:3])
    monkeypatch.setattr(F, _MID_STEP[name], original)
    train(o1, m1, LOSS, data[3:])
    train(o2, m2, LOSS, data[:2] + data[3:])
    assert _same(snapshot(m1), snapshot(m2))
    assert _equal_tree(o1.state_dict(), o2.state_dict())
    o1.close()
    o2.close()


@pytest.mark.parametrize("name", ["kfac_mc", "diag_ggn_adam_mc", "msvag"])
def test_a_raising_loss_call_inside_backward_does_not_wedge(name):
    """An error the engine raises inside backward (here: two loss calls reached) is recoverable."""
    m = tiny_mlp(0)
    opt = FACTORIES[name](m, LOSS)
    X, y = batches(1, N=6)[0]
    out = m(X)
    try:
        (LOSS(out, y) + LOSS(out, y)).backward()
    except curvopt.CollectError:
        pass  # refused by the engine (the curvature needs one loss call)
    losses = train(opt, m, LOSS, [(X, y)] * 4)
    assert losses[-1] < losses[0]
    opt.close()


# --------------------------------------------------------------------- private MC streams
def _run(name, model, seed, data):
    loss_fn = nn.CrossEntropyLoss()  # one per thread: a loss module is hooked by its optimizer
    opt = FACTORIES[name](model, loss_fn, seed=seed)
    train(opt, model, loss_fn, data)
    opt.close()
    return snapshot(model)


@pytest.mark.parametrize("name", MC)
def test_mc_streams_are_thread_safe_and_leave_the_global_rng_alone(name):
    data = batches(6, N=6)
    models = [tiny_mlp(i % 2) for i in range(5)]  # (tiny_mlp seeds the global RNG itself)
    torch.manual_seed(0)
    rng = torch.get_rng_state()
    expected = [_run(name, models[i], i + 1, data) for i in (0, 1)]
    assert torch.equal(rng, torch.get_rng_state())
    got = [None, None]

    def work(i):
        got[i] = _run(name, models[2 + i], i + 1, data)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert torch.equal(rng, torch.get_rng_state())
    for e, g in zip(expected, got, strict=True):
        assert _same(e, g)
    assert not _same(expected[0], _run(name, models[4], 3, data))  # MC is in play


def test_skipped_step_gives_its_mc_draws_back():
    data = batches(4, N=6)
    m1, m2 = tiny_mlp(0), tiny_mlp(0)
    o1 = KFACOptimizer(m1, LOSS, seed=5, inverse_update_freq=1)
    o2 = KFACOptimizer(m2, LOSS, seed=5, inverse_update_freq=1)
    train(o1, m1, LOSS, data[:1])
    o1.zero_grad()
    LOSS(m1(data[1][0]), data[1][1]).backward()
    m1[2].bias.grad[0] = float("inf")
    with pytest.warns(RuntimeWarning, match="non-finite gradient"):
        o1.step()
    train(o1, m1, LOSS, data[2:])
    train(o2, m2, LOSS, data[:1] + data[2:])
    assert _same(snapshot(m1), snapshot(m2))
    o1.close()
    o2.close()


def test_default_seed_comes_from_the_global_rng():
    data = batches(3, N=6)
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        m = tiny_mlp(0)
        opt = DiagGGNAdam(m, LOSS, curvature="mc")
        train(opt, m, LOSS, data)
        opt.close()
        runs.append(snapshot(m))
    assert _same(*runs)


def test_an_interrupted_backward_without_a_loss_module_does_not_wedge():
    """First-order only (loss_fn=None): the engine is re-attached after the interrupt too."""
    data = batches(4, N=6)
    m1, m2 = tiny_mlp(0), tiny_mlp(0)
    o1, o2 = VarianceAdaptiveSGD(m1, None), VarianceAdaptiveSGD(m2, None)
    train(o1, m1, LOSS, data[:1])
    handle = m1[1].register_forward_hook(_interrupting_hook)
    o1.zero_grad()
    with pytest.raises(KeyboardInterrupt):
        LOSS(m1(data[1][0]), data[1][1]).backward()
    handle.remove()
    train(o1, m1, LOSS, data[2:])
    train(o2, m2, LOSS, data[:1] + data[2:])
    assert _same(snapshot(m1), snapshot(m2))
    o1.close()
    o2.close()
