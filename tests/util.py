"""Helpers shared by the engine tests: running curvopt and comparing with the oracle."""

from __future__ import annotations

import oracle
import torch
from cases import Case, LossSpec, setup
from torch import Tensor, nn

import curvopt

FIRST_ORDER_FIELDS = ("grad_batch", "sum_grad_squared", "variance", "batch_l2")


def ext_for(field: str, **kw):
    """The extension instance whose savefield is ``field``."""
    from curvopt import extensions as E

    cls = {
        "grad_batch": E.BatchGrad,
        "sum_grad_squared": E.SumGradSquared,
        "variance": E.Variance,
        "batch_l2": E.BatchL2Grad,
        "diag_ggn_exact": E.DiagGGNExact,
        "diag_ggn_mc": E.DiagGGNMC,
        "kfac": E.KFAC,
        "kflr": E.KFLR,
        "kfra": E.KFRA,
        "diag_h": E.DiagHessian,
    }[field]
    return cls(**kw)


def run(model: nn.Module, loss_fn, X: Tensor, y: Tensor, exts, pass_loss: bool = True):
    """One forward/backward inside ``curvopt.collect``; returns ``(results, loss)``."""
    model.zero_grad(set_to_none=True)
    with curvopt.collect(model, loss_fn if pass_loss else None, *exts) as col:
        loss = loss_fn(model(X), y)
        loss.backward()
    return col.results, loss.detach()


def scale_of(t: Tensor) -> float:
    return float(t.detach().abs().max()) if t.numel() else 0.0


def assert_close(actual, expected: Tensor, what: str, rtol=1e-10, atol_rel=1e-12, scale=None):
    """Elementwise ``|a - e| <= atol + rtol |e|`` with ``atol = atol_rel * max|e|`` (or ``scale``)."""
    assert isinstance(actual, Tensor), f"{what}: expected a tensor, got {type(actual).__name__}"
    assert actual.shape == expected.shape, (
        f"{what}: shape {tuple(actual.shape)} != oracle {tuple(expected.shape)}"
    )
    s = scale_of(expected) if scale is None else scale
    atol = atol_rel * max(s, 1e-300)
    a = actual.detach().to(expected.dtype)
    diff = (a - expected).abs()
    bad = diff > atol + rtol * expected.abs()
    if bad.any():
        idx = bad.nonzero()[0].tolist()
        ratio = (a.reshape(-1) @ expected.reshape(-1)) / (expected.reshape(-1) @ expected.reshape(-1))
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{bad.numel()} entries off; max |diff| "
            f"{float(diff.max()):.3e} (atol {atol:.1e}, max|oracle| {s:.3e}); "
            f"at {idx}: got {float(a[tuple(idx)]):.6e}, oracle {float(expected[tuple(idx)]):.6e}; "
            f"best scalar fit got/oracle = {float(ratio):.6g}"
        )


def field_of(results: dict, name: str, field: str):
    assert name in results, f"no results for parameter {name!r}; keys: {sorted(results)}"
    assert field in results[name], f"{name}: no {field!r}; has {sorted(results[name])}"
    return results[name][field]


_ORACLE_CACHE: dict = {}


def first_order_oracle(case: Case, spec: LossSpec, N: int):
    key = ("fo", case.name, spec, N)
    if key not in _ORACLE_CACHE:
        model, loss_fn, X, y = setup(case, spec, N)
        _ORACLE_CACHE[key] = oracle.first_order(model, loss_fn, X, y)
    return _ORACLE_CACHE[key]


def cached(key, fn):
    if key not in _ORACLE_CACHE:
        _ORACLE_CACHE[key] = fn()
    return _ORACLE_CACHE[key]


def hooks_snapshot(model: nn.Module) -> dict:
    """Every hook container reachable from the model and torch's global module hooks."""
    snap = {}
    for name, m in model.named_modules():
        for attr in (
            "_forward_hooks",
            "_forward_pre_hooks",
            "_backward_hooks",
            "_backward_pre_hooks",
            "_state_dict_hooks",
            "_load_state_dict_pre_hooks",
        ):
            d = getattr(m, attr, None)
            snap[(name, attr)] = len(d) if d is not None else 0
    for name, p in model.named_parameters():
        for attr in ("_backward_hooks", "_post_accumulate_grad_hooks"):
            d = getattr(p, attr, None)
            snap[(name, attr)] = len(d) if d else 0
    import torch.nn.modules.module as M

    for attr in (
        "_global_forward_hooks",
        "_global_forward_pre_hooks",
        "_global_backward_hooks",
        "_global_backward_pre_hooks",
        "_global_module_registration_hooks",
        "_global_parameter_registration_hooks",
    ):
        d = getattr(M, attr, None)
        snap[("global", attr)] = len(d) if d is not None else 0
    return snap


def assert_no_hooks(model: nn.Module, before: dict | None = None):
    snap = hooks_snapshot(model)
    if before is None:
        left = {k: v for k, v in snap.items() if v}
        assert not left, f"hooks left behind: {left}"
    else:
        changed = {k: (before.get(k), v) for k, v in snap.items() if before.get(k) != v}
        assert not changed, f"hooks left behind (before, after): {changed}"


def loss_kinds_ok(case: Case, spec: LossSpec) -> bool:
    return spec.kind not in ("ce", "nll") or case.ce


__all__ = [
    "FIRST_ORDER_FIELDS",
    "ext_for",
    "run",
    "assert_close",
    "field_of",
    "first_order_oracle",
    "cached",
    "hooks_snapshot",
    "assert_no_hooks",
    "loss_kinds_ok",
    "torch",
]
