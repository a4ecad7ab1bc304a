"""Second-order quantities from cotangent columns sent back through autograd.

At the start of backward (the loss-input hook), :func:`propagate` builds the
columns of the loss-Hessian square root at the model output ``o``
(:mod:`curvopt.losses`) and sends each back to every recorded layer output
with ``torch.autograd.grad(o, edges, s_k, retain_graph=True)``.  One set of
columns serves every quantity that needs it:

* ``"exact"`` (:math:`\\sum_k s_k s_k^\\top = fH`): DiagGGNExact, KFLR, DiagHessian;
* ``"mc"`` (sampled): DiagGGNMC and KFAC (shared when their ``mc_samples`` agree);
* ``"kfra"``: the KFRA recursion (:mod:`.kfra`);
* residual columns of smooth activations for DiagHessian (:mod:`.diag_hessian`).

Then, per parameter, :func:`compute` reads the columns through the layer's
layout:

* diagonal: :math:`\\operatorname{diag} = \\sum_{k,n} (\\nabla\\ell_{kn})^{\\odot2}`
  (``Bound.sum_sq``, no per-sample tensor for one-row-per-sample layers);
* Kronecker: ``[G, A]`` with :math:`G = \\sum_{k,n,s} r r^\\top`,
  :math:`A = \\tfrac1N\\sum_{n,s} x x^\\top`.
"""

from __future__ import annotations

import torch

from .. import losses
from ..engine.distributed import Factors
from ..errors import UnsupportedModuleError
from ..extensions import KFAC, KFLR, KFRA, DiagGGNExact, DiagGGNMC, DiagHessian
from ..rules.layout import MAX_DENSE_BLOCK, DenseBound, ElementwiseBound, EmbeddingBound, concat


def _mc_kinds(exts) -> dict:
    """Map each MC extension type to the column kind it reads; equal M share one draw."""
    kinds = {}
    ms = {t: exts[t].mc_samples for t in (DiagGGNMC, KFAC) if t in exts}
    if len(set(ms.values())) == 1:
        for t in ms:
            kinds[t] = "mc"
    else:
        for t in ms:
            kinds[t] = f"mc_{t.__name__}"
    return kinds


#: How K cotangent columns travel back: "loop" (one autograd.grad call per column) or
#: "batched" (one call with is_grads_batched=True, i.e. vmap over the backward formulas).
#: "auto" picks batched for few-row layers (MLPs: one large matmul instead of K small ones)
#: and the loop when any recorded output has spatial extent (convolutions), where the
#: measured batched backward was slower.
MECHANISM = "auto"


def _batched_ok(recs) -> bool:
    if MECHANISM != "auto":
        return MECHANISM == "batched"
    return all(r.output.dim() <= 2 for r in recs)


def grads(output, edges, columns, batched):
    """``[per edge: [K, *edge shape] or None]`` for columns ``[K, *output.shape]``."""
    if batched and len(columns) > 1:
        return list(
            torch.autograd.grad(
                output, edges, columns, retain_graph=True, allow_unused=True,
                is_grads_batched=True,
            )
        )
    per = [[] for _ in edges]
    for s in columns:
        gs = torch.autograd.grad(output, edges, s, retain_graph=True, allow_unused=True)
        for lst, gi in zip(per, gs):
            lst.append(gi)
    return [None if all(x is None for x in lst) else lst for lst in per]


def send_back(output, recs, columns, kind, weights=None):
    """``columns: [K, *output.shape]`` → ``rec.columns[kind]: [K, *rec.output.shape]``.

    ``weights`` (``[K, N]``, DiagHessian's signed residual weights) go to
    ``rec.columns[kind + ':w']`` of every record the columns reach.
    """
    if not recs:
        return
    res = grads(output, [r.edge for r in recs], columns, _batched_ok(recs))
    for r, g in zip(recs, res):
        if g is None:
            continue
        if isinstance(g, list):
            g = torch.stack([torch.zeros_like(r.output) if x is None else x for x in g])
        r.columns[kind] = g
        if weights is not None:
            r.columns[kind + ":w"] = weights


def propagate(col, lrec, recs, g_out):
    """Send every column kind the requested extensions need back to ``recs``."""
    exts = col._by_type
    loss_fn, o, y = col.loss_fn, lrec.input, lrec.target
    if any(t in exts for t in (DiagGGNExact, KFLR, DiagHessian)):
        send_back(o, recs, losses.sqrt_hessian(loss_fn, o, y), "exact")
    mc = _mc_kinds(exts)
    for t, kind in mc.items():
        if kind in recs[0].columns or any(kind in r.columns for r in recs):
            continue
        gen = col.mc_generator(o.device) if col.mc_generator is not None else None
        S = losses.mc_sqrt_hessian(loss_fn, o, y, exts[t].mc_samples, gen)
        send_back(o, recs, S, kind)
    if KFRA in exts:
        from . import kfra

        kfra.propagate(col, lrec, recs, g_out)
    if DiagHessian in exts:
        from . import diag_hessian

        diag_hessian.propagate(col, lrec, recs, g_out)


def _bounds(items, kind):
    return concat([lay.bind(r.columns[kind]) for r, lay in items if kind in r.columns])


def diagonal(items, kind, weights=False):
    """:math:`\\sum_{k,n} w_{kn} (\\nabla\\ell_{kn})^{\\odot2}` for one parameter.

    With ``weights`` (DiagHessian residuals) the per-column, per-sample weights
    ``rec.columns[kind + ':w']`` (``[K, N]``) are signed.
    """
    p = items[0][1].param
    bounds = _bounds(items, kind)
    if not bounds:
        return torch.zeros_like(p)
    w = next(r.columns[kind + ":w"] for r, _ in items if kind in r.columns) if weights else None
    if len(bounds) == 1:
        return bounds[0].sum_sq(w)
    # A weight shared across layer types: sum the per-sample gradients before squaring.
    sq = sum(b.per_sample() for b in bounds).pow(2)
    if w is not None:
        sq = sq * w.reshape(*w.shape, *([1] * p.dim()))
    return sq.sum((0, 1))


def kronecker(items, kind):
    """Kronecker factors in row-major order (BackPACK's), or ``[dense block]``."""
    bounds = _bounds(items, kind)
    p = items[0][1].param
    if not bounds:
        return None
    if len(bounds) == 1:
        b = bounds[0]
        if isinstance(b, DenseBound):
            # ConvTranspose as BackPACK: [G (C_out²), Ω ((C_in·k…)²)], a Kronecker
            # approximation of the GGN w.r.t. weight.transpose(0, 1).
            return Factors.of([b.kron_G(), b.kron_A()], "GA")
        if isinstance(b, ElementwiseBound) and b.Xhat is None:
            return Factors.of([b.kron_G()], "G")
        if isinstance(b, EmbeddingBound):
            return Factors.of([b.kron_A(), b.kron_G()], "AG")
        return Factors.of([b.dense_block()], "G")
    ps = sum(b.per_sample() for b in bounds).flatten(2).flatten(0, 1)
    if ps.shape[1] > MAX_DENSE_BLOCK:
        raise UnsupportedModuleError(
            f"a dense curvature block of a parameter with {p.numel()} entries (shared by "
            f"layers of different types) exceeds {MAX_DENSE_BLOCK} per side; use the diagonal."
        )
    return Factors.of([ps.T @ ps], "G")


def compute(col, items) -> dict:
    p = items[0][1].param
    exts = {t: e for t, e in col._by_type.items()
            if col.only is None or t.savefield not in col.only
            or any(q is p for q in col.only[t.savefield])}
    out = {}
    mc = _mc_kinds(col._by_type)
    if DiagGGNExact in exts:
        out["diag_ggn_exact"] = diagonal(items, "exact")
    if DiagGGNMC in exts:
        out["diag_ggn_mc"] = diagonal(items, mc[DiagGGNMC])
    if KFLR in exts:
        out["kflr"] = kronecker(items, "exact")
    if KFAC in exts:
        out["kfac"] = kronecker(items, mc[KFAC])
    if KFRA in exts:
        from . import kfra

        out["kfra"] = kfra.factors(items)
    if DiagHessian in exts:
        d = out["diag_ggn_exact"] if "diag_ggn_exact" in out else diagonal(items, "exact")
        from . import diag_hessian

        out["diag_h"] = d + diag_hessian.residual_diagonal(items)
    return {k: v for k, v in out.items() if v is not None}
