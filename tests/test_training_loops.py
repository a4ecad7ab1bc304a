"""Engine behaviour in real training loops (issue 11): mixed precision, a loss computed twice,
another loss object, exceptions inside backward, edge inputs, compiled models, loss scaling."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvopt
from curvopt.errors import CollectError, CurvoptError
from curvopt.extensions import ALL

FIELDS = [q.savefield for q in ALL]


def _mlp(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Sigmoid(),
                         nn.Linear(8, 4)).to(dtype)


def _data(N=16, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, 6, generator=g, dtype=dtype), torch.randint(0, 4, (N,), generator=g)


def _all(mc=1):
    return [q(mc_samples=mc) if hasattr(q, "mc_samples") or "mc_samples" in q.__dataclass_fields__
            else q() for q in ALL]


def _run(model, loss_fn, X, y, exts, *, ctx=None):
    model.zero_grad(set_to_none=True)
    with curvopt.collect(model, loss_fn, *exts) as col:
        if ctx is None:
            loss = loss_fn(model(X), y)
        else:
            with ctx:
                loss = loss_fn(model(X), y)
        loss.backward()
    return col.results


def _flat(v):
    return torch.cat([t.reshape(-1).double() for t in v]) if isinstance(v, list) else v.double()


def _rel(a, b):
    a, b = _flat(a), _flat(b)
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ----------------------------------------------------------------------- mixed precision
@pytest.mark.parametrize("field", [f for f in FIELDS if f not in ("diag_ggn_mc", "kfac")])
def test_bf16_autocast_matches_float32(field):
    model, loss_fn = _mlp(), nn.CrossEntropyLoss()
    X, y = _data()
    ext = [q for q in _all() if q.savefield == field]
    ref = _run(model, loss_fn, X, y, ext)
    with _no_warning():  # no false "used outside its module" coverage warning in bfloat16
        got = _run(model, loss_fn, X, y, ext, ctx=torch.autocast("cpu", dtype=torch.bfloat16))
    for name, res in ref.items():
        v = got[name][field]
        assert (v.dtype if torch.is_tensor(v) else v[0].dtype) == torch.float32
        assert _rel(v, res[field]) < 0.05, (name, field, _rel(v, res[field]))


@pytest.mark.parametrize("field", ["diag_ggn_mc", "kfac"])
def test_bf16_autocast_mc_quantities_run(field):
    model, loss_fn = _mlp(), nn.CrossEntropyLoss()
    X, y = _data()
    ext = [q for q in _all(mc=200) if q.savefield == field]
    torch.manual_seed(0)
    ref = _run(model, loss_fn, X, y, ext)
    torch.manual_seed(0)
    got = _run(model, loss_fn, X, y, ext, ctx=torch.autocast("cpu", dtype=torch.bfloat16))
    for name, res in ref.items():
        assert _rel(got[name][field], res[field]) < 0.25  # 200 samples, bf16 logits


def test_bfloat16_parameters_give_bfloat16_results_close_to_float32():
    X, y = _data()
    loss_fn = nn.CrossEntropyLoss()
    exts = [q for q in _all() if q.savefield not in ("diag_ggn_mc", "kfac")]
    ref = _run(_mlp(), loss_fn, X, y, exts)
    with _no_warning():  # no false "tied weight" coverage warning for bf16 gradients
        got = _run(_mlp(torch.bfloat16), loss_fn, X.bfloat16(), y, exts)
    for name, res in ref.items():
        for f, v in res.items():
            g = got[name][f]
            assert (g.dtype if torch.is_tensor(g) else g[0].dtype) == torch.bfloat16
            assert _rel(g, v) < 0.1, (name, f, _rel(g, v))


class _no_warning:
    def __enter__(self):
        import warnings
        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("error", RuntimeWarning)

    def __exit__(self, *exc):
        self._w.__exit__(*exc)


# --------------------------------------------------------------------------- the loss
def test_loss_computed_twice_for_logging():
    model, loss_fn = _mlp(), nn.CrossEntropyLoss()
    X, y = _data()
    exts = [curvopt.KFLR(), curvopt.DiagGGNExact(), curvopt.BatchGrad()]
    ref = _run(model, loss_fn, X, y, exts)
    model.zero_grad(set_to_none=True)
    with curvopt.collect(model, loss_fn, *exts) as col:
        out = model(X)
        logged = loss_fn(out, y).item()
        loss_fn(out, y).backward()
    assert logged > 0
    for name, res in ref.items():
        for f, v in res.items():
            assert _rel(col.results[name][f], v) < 1e-6


@pytest.mark.parametrize("other", ["second_instance", "functional"])
def test_another_loss_object_raises(other):
    model, loss_fn = _mlp(), nn.CrossEntropyLoss()
    X, y = _data()
    used = nn.CrossEntropyLoss() if other == "second_instance" else nn.functional.cross_entropy
    col = curvopt.Collector(model, loss_fn, [curvopt.DiagGGNExact()]).attach()
    try:
        with pytest.raises(CollectError, match="loss module given to curvopt"):
            used(model(X), y).backward()
        # and the collector is not wedged: the right loss works next
        model.zero_grad(set_to_none=True)
        loss_fn(model(X), y).backward()
        assert col.results["0.weight"]["diag_ggn_exact"].abs().sum() > 0
    finally:
        col.detach()


# ----------------------------------------------------------------------- nothing wedges
@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_exception_inside_backward_then_normal_step(exc):
    model, loss_fn = _mlp(), nn.CrossEntropyLoss()
    X, y = _data()
    exts = [curvopt.KFLR(), curvopt.Variance(), curvopt.DiagHessian()]
    ref = _run(model, loss_fn, X, y, exts)
    col = curvopt.Collector(model, loss_fn, exts).attach()
    try:
        out = model(X)
        mid = model[2](torch.tanh(model[0](X)))  # noqa: F841 - an unrelated forward too
        h = out.register_hook(lambda g: (_ for _ in ()).throw(exc("boom")))
        with pytest.raises(exc):
            loss_fn(out, y).backward()
        h.remove()
        model.zero_grad(set_to_none=True)
        loss_fn(model(X), y).backward()
        for name, res in ref.items():
            for f, v in res.items():
                assert _rel(col.results[name][f], v) < 1e-6
    finally:
        col.detach()


def test_curvopt_error_inside_backward_then_normal_step():
    model, loss_fn = _mlp(), nn.CrossEntropyLoss()
    X, y = _data()
    col = curvopt.Collector(model, loss_fn, [curvopt.KFLR()]).attach()
    try:
        out = model(X)
        with pytest.raises(CollectError, match="two calls"):
            (loss_fn(out, y) + loss_fn(out, y)).backward()
        model.zero_grad(set_to_none=True)
        loss_fn(model(X), y).backward()
        assert "kflr" in col.results["0.weight"]
    finally:
        col.detach()


# ------------------------------------------------------------------------- edge inputs
@pytest.mark.parametrize("field", FIELDS)
def test_empty_batch_raises(field):
    model, loss_fn = _mlp(), nn.CrossEntropyLoss()
    X, y = _data(N=0)
    ext = [q for q in _all() if q.savefield == field]
    with pytest.raises(CurvoptError, match="empty batch|at least one sample"):
        _run(model, loss_fn, X, y, ext)


@pytest.mark.parametrize("field", FIELDS)
def test_unbatched_sample_raises(field):
    model, loss_fn = _mlp(), nn.CrossEntropyLoss()
    X, y = _data(N=1)
    ext = [q for q in _all() if q.savefield == field]
    with pytest.raises(CurvoptError, match="unbatched|batch dimension|at least one sample"):
        _run(model, loss_fn, X[0], y[0], ext)


@pytest.mark.parametrize("field", [f for f in FIELDS if f not in ("grad_batch", "sum_grad_squared",
                                                                  "variance", "batch_l2")])
def test_non_finite_input_raises(field):
    model, loss_fn = _mlp(), nn.CrossEntropyLoss()
    X, y = _data()
    X[3, 2] = float("nan")
    ext = [q for q in _all() if q.savefield == field]
    with pytest.raises(CollectError, match="NaN or inf"):
        _run(model, loss_fn, X, y, ext)


def test_kfra_with_saturated_loss_hessian():
    model, loss_fn = _mlp(torch.float64), nn.CrossEntropyLoss()
    with torch.no_grad():
        model[4].bias.copy_(torch.tensor([1e4, 0.0, 0.0, 0.0], dtype=torch.float64))
    X, y = _data(dtype=torch.float64)
    res = _run(model, loss_fn, X, y, [curvopt.KFRA()])
    assert all(torch.isfinite(f).all() for r in res.values() for f in r["kfra"])


def test_compiled_model_is_refused_with_a_fix():
    model = _mlp()
    compiled = torch.compile(model)
    with pytest.raises(CollectError, match="_orig_mod"):
        curvopt.collect(compiled, nn.CrossEntropyLoss(), curvopt.BatchGrad()).__enter__()
    model.compile()
    with pytest.raises(CollectError, match="compiled"):
        curvopt.collect(model, nn.CrossEntropyLoss(), curvopt.BatchGrad()).__enter__()


# ---------------------------------------------------------------------- loss scaling
def test_unscale_mode_describes_the_loss_module():
    model, loss_fn = _mlp(torch.float64), nn.CrossEntropyLoss()
    X, y = _data(dtype=torch.float64)
    exts = _all()
    torch.manual_seed(3)
    ref = _run(model, loss_fn, X, y, exts)
    model.zero_grad(set_to_none=True)
    col = curvopt.Collector(model, loss_fn, exts, loss_scaling="unscale").attach()
    try:
        torch.manual_seed(3)
        (loss_fn(model(X), y) * 1024.0).backward()
    finally:
        col.detach()
    assert col.loss_scale == 1024.0
    for name, res in ref.items():
        for f, v in res.items():
            assert _rel(col.results[name][f], v) < 1e-10, (name, f)
