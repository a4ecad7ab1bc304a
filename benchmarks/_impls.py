"""Step builders for each benchmarked implementation.

Each builder returns a zero-argument callable performing one forward+backward
that computes the requested quantities, or raises :class:`Unsupported`.

Imports of ``curvopt``, ``backpack`` and ``opacus`` happen *inside* the
builders, so a worker process only ever imports the library it measures
(BackPACK and Opacus live in the peer venv, curvopt in the project venv).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from _common import Problem
from torch import nn

FIRST_ORDER = ("BatchGrad", "SumGradSquared", "Variance", "BatchL2Grad")
SECOND_ORDER = ("DiagGGNExact", "DiagGGNMC", "KFAC", "KFLR", "KFRA", "DiagHessian")
ALL_TEN = FIRST_ORDER + SECOND_ORDER

SAVEFIELDS = {
    "BatchGrad": "grad_batch",
    "SumGradSquared": "sum_grad_squared",
    "Variance": "variance",
    "BatchL2Grad": "batch_l2",
    "DiagGGNExact": "diag_ggn_exact",
    "DiagGGNMC": "diag_ggn_mc",
    "KFAC": "kfac",
    "KFLR": "kflr",
    "KFRA": "kfra",
    "DiagHessian": "diag_h",
}

#: rows that are not a list of extensions
PLAIN = "__plain__"
HOOKS = "__hooks__"
PLAIN_LABEL = "plain forward+backward"
HOOKS_LABEL = "hooks attached, nothing asked"


class Unsupported(Exception):
    """This implementation has no way to compute the row."""


def _clear(params, names):
    fields = [SAVEFIELDS[n] for n in names]
    for p in params:
        p.grad = None
        for f in fields:
            if hasattr(p, f):
                delattr(p, f)


def _ext_kwargs(name: str) -> dict:
    # BackPACK's and curvopt's defaults are both mc_samples=1; say it explicitly.
    return {"mc_samples": 1} if name in ("DiagGGNMC", "KFAC") else {}


# ----------------------------------------------------------------------------- curvopt
def curvopt_step(problem: Problem, names: tuple[str, ...] | str) -> Callable[[], None]:
    import curvopt
    import curvopt.extensions as E

    model, loss_fn, X, y = problem.model, problem.loss_fn, problem.X, problem.y
    params = [p for p in model.parameters() if p.requires_grad]

    if names == HOOKS:
        col = curvopt.Collector(model, loss_fn, extensions=(), set_attributes=False)
        col.attach()

        def hooks_step():
            for p in params:
                p.grad = None
            loss_fn(model(X), y).backward()

        hooks_step._keepalive = col  # keep the collector (and its hooks) alive
        return hooks_step

    exts = [getattr(E, n)(**_ext_kwargs(n)) for n in names]

    def step():
        _clear(params, names)
        with curvopt.collect(model, loss_fn, *exts):
            loss_fn(model(X), y).backward()

    return step


# ----------------------------------------------------------------------------- BackPACK
def backpack_step(problem: Problem, names: tuple[str, ...] | str) -> Callable[[], None]:
    import backpack
    import backpack.extensions as E
    from backpack import extend

    model = extend(problem.model)
    loss_fn = extend(problem.loss_fn)
    X, y = problem.X, problem.y
    params = [p for p in model.parameters() if p.requires_grad]

    if names == HOOKS:
        exts, names = [], ()
    else:
        exts = [getattr(E, n)(**_ext_kwargs(n)) for n in names]

    def step():
        _clear(params, names)
        with backpack.backpack(*exts):
            loss_fn(model(X), y).backward()

    return step


# ----------------------------------------------------------------------------- Opacus
def opacus_step(problem: Problem, names: tuple[str, ...] | str) -> Callable[[], None]:
    if names != ("BatchGrad",):
        raise Unsupported("Opacus column only for BatchGrad")
    from opacus import GradSampleModule

    model = GradSampleModule(problem.model, loss_reduction="mean")
    X, y, loss_fn = problem.X, problem.y, problem.loss_fn
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        for p in params:
            p.grad = None
            p.grad_sample = None
        loss_fn(model(X), y).backward()

    return step


# ----------------------------------------------------------------------------- torch.func
def _functional(problem: Problem):
    from torch.func import functional_call

    model = problem.model
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def logits_single(p, x):
        return functional_call(model, (p, buffers), (x.unsqueeze(0),)).squeeze(0)

    return params, logits_single


def torchfunc_step(problem: Problem, names: tuple[str, ...] | str) -> Callable[[], None]:
    """torch.func equivalents: per-sample gradients by ``vmap(grad)``.

    First order: grad_batch = f * vmap(grad(loss_n)); the other three (and the
    summed gradient) are reductions of it.  DiagGGNExact: for CrossEntropy the
    loss Hessian factors as S Sᵀ with S = diag(√p) − p √pᵀ; per class c,
    vmap(grad) of √f·⟨S[:, c], o_n⟩ (S detached) squared and summed over n and c
    (C passes of per-sample gradients: the straightforward torch.func route,
    bounded in memory by one [N, #params] tensor at a time).
    DiagGGNMC: vmap(grad) of √f·CE(o_n, ỹ_n), ỹ ~ Categorical(softmax(o_n)), squared.
    KFAC/KFLR/KFRA/DiagHessian have no comparable torch.func one-liner.
    """
    if names == HOOKS:
        raise Unsupported("no hooks in torch.func")
    from torch.func import grad, vmap

    if not isinstance(problem.loss_fn, nn.CrossEntropyLoss) or problem.loss_fn.reduction != "mean":
        raise Unsupported("benchmark torch.func path assumes mean CrossEntropyLoss")
    names = tuple(names)
    params, logits_single = _functional(problem)
    X, y = problem.X, problem.y
    N = X.shape[0]
    f = 1.0 / N
    sqrt_f = f**0.5
    unsupported = [n for n in names if n in ("KFAC", "KFLR", "KFRA", "DiagHessian")]
    if unsupported:
        raise Unsupported(f"no torch.func baseline for {', '.join(unsupported)}")
    first = [n for n in names if n in FIRST_ORDER]

    def ce_single(p, x, t):
        return nn.functional.cross_entropy(logits_single(p, x).unsqueeze(0), t.unsqueeze(0))

    per_sample = vmap(grad(ce_single), in_dims=(None, 0, 0))

    def lin_single(p, x, s):  # ⟨s, o_n(θ)⟩ with s fixed
        return (logits_single(p, x) * s).sum()

    per_sample_lin = vmap(grad(lin_single), in_dims=(None, 0, 0))

    def step():
        out = {}
        if first:
            # raw per-sample gradients g_n (unscaled); few full-size temporaries
            v = per_sample(params, X, y)
            grad = {k: f * t.sum(0) for k, t in v.items()}
            out["grad"] = grad
            if "BatchL2Grad" in first:
                out["batch_l2"] = {
                    k: (f * torch.linalg.vector_norm(t.flatten(1), dim=1)) ** 2
                    for k, t in v.items()
                }
            if "BatchGrad" in first:
                out["grad_batch"] = {k: t.mul_(f) for k, t in v.items()}  # in place: f g_n
            if "SumGradSquared" in first or "Variance" in first:
                if "BatchGrad" in first:  # keep grad_batch intact
                    sgs = {k: (t * t).sum(0) for k, t in out["grad_batch"].items()}
                else:  # square in place, scale the reduced result
                    sgs = {k: t.square_().sum(0).mul_(f * f) for k, t in v.items()}
                out["sum_grad_squared"] = sgs
                if "Variance" in first:
                    out["variance"] = {
                        k: (sgs[k] / N - (grad[k] / N) ** 2).clamp_min(0) for k in sgs
                    }
        if "DiagGGNExact" in names or "DiagGGNMC" in names:
            with torch.no_grad():
                logits = vmap(logits_single, in_dims=(None, 0))(params, X)
                prob = logits.softmax(-1)
        if "DiagGGNExact" in names:
            sq = prob.sqrt()
            # S[n] = diag(√p_n) − p_n √p_nᵀ ; column c is S[n, :, c]
            S = torch.diag_embed(sq) - prob.unsqueeze(-1) * sq.unsqueeze(-2)
            acc = {k: torch.zeros_like(v) for k, v in params.items()}
            for c in range(S.shape[-1]):
                g = per_sample_lin(params, X, sqrt_f * S[:, :, c])
                for k in acc:
                    acc[k] += (g[k] * g[k]).sum(0)
            out["diag_ggn_exact"] = acc
        if "DiagGGNMC" in names:
            yt = torch.multinomial(prob, 1).squeeze(1)
            g = per_sample(params, X, yt)  # ∇ CE_n, unscaled
            out["diag_ggn_mc"] = {k: f * (v * v).sum(0) for k, v in g.items()}
        step.last = out

    return step


BUILDERS = {
    "curvopt": curvopt_step,
    "backpack": backpack_step,
    "opacus": opacus_step,
    "torchfunc": torchfunc_step,
}
