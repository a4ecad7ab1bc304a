"""The ten quantities read off a model and summarised, for ``[track]`` and ``curvopt stats``.

The quantities come from :func:`curvopt.collect` (``Collector.results``, keyed
by parameter name, or the ``param.<savefield>`` attributes it sets), or from a
curvopt optimizer that was asked to ``track`` them (``optimizer.state[p]``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from curvopt.engine import collect
from curvopt.quantities import BY_SAVEFIELD
from curvopt.recipes.schema import RecipeError

__all__ = ["extension_for", "collect_fn", "read", "summarize", "describe"]

_KRONECKER = {"kfac", "kflr", "kfra"}


def extension_for(savefield: str) -> Any:
    """An instance of the :mod:`curvopt.extensions` request stored under ``savefield``."""
    if savefield not in BY_SAVEFIELD:
        raise RecipeError(f"no curvopt extension stores {savefield!r}")  # pragma: no cover
    return BY_SAVEFIELD[savefield]()


def collect_fn() -> Any:
    """:func:`curvopt.collect`."""
    return collect


def read(model: nn.Module, savefield: str, results: Any = None) -> dict[str, Any]:
    """``{param name: value}`` of ``savefield`` for every parameter that has it.

    Args:
        model: the model whose parameters carry the quantity.
        savefield: e.g. ``"kflr"``.
        results: param name → savefield → value (``Collector.results``, or an optimizer's
            state by name); where it lacks a value the ``param.<savefield>`` attribute is read.
    """
    out = {}
    for name, p in model.named_parameters():
        value = None
        if results is not None and name in results:
            value = results[name].get(savefield)
        if value is None:
            value = getattr(p, savefield, None)
        if value is not None:
            out[name] = value
    return out


def summarize(savefield: str, values: dict[str, Any]) -> float | None:
    """One number for a quantity over all parameters (what ``[track]`` logs).

    * ``grad_batch``: mean over samples of the per-sample gradient norm (all parameters).
    * ``batch_l2``: mean over samples of the squared per-sample gradient norm.
    * ``kfac``, ``kflr``, ``kfra``: trace of the Kronecker-factored curvature,
      :math:`\\sum_\\text{params} \\prod_i \\operatorname{tr} F_i`.
    * the diagonal ones (``sum_grad_squared``, ``variance``, ``diag_*``): their sum (a trace).
    """
    if not values:
        return None
    with torch.no_grad():
        if savefield == "grad_batch":
            sq = sum(v.flatten(1).pow(2).sum(1) for v in values.values())
            return float(sq.sqrt().mean())
        if savefield == "batch_l2":
            return float(sum(values.values()).mean())
        if savefield in _KRONECKER:
            return float(sum(math.prod(float(f.trace()) for f in v) for v in values.values()))
        return float(sum(float(v.sum()) for v in values.values()))


def _cond(eig: torch.Tensor) -> float:
    top, low = float(eig.max()), float(eig.min())
    if top <= 0:
        return float("nan")
    return float("inf") if low <= 0 else top / low


def describe(savefield: str, value: Any) -> list[dict[str, Any]]:
    """Rows of per-parameter statistics of one quantity (for ``curvopt stats``).

    Each row has ``part`` (``""``; for Kronecker quantities ``G``/``A``/...), ``shape``,
    ``norm`` (Frobenius), ``trace`` (sum of the diagonal quantities, trace of a factor,
    sum of ``batch_l2``), ``min``, ``max`` and ``cond`` (eigenvalue ratio of a factor,
    max/min ratio of a non-negative diagonal; ``None`` where it has no meaning).
    """
    with torch.no_grad():
        if savefield in _KRONECKER:
            factors = list(value)
            names = ["G", "A"] if len(factors) == 2 else ["G"] if len(factors) == 1 else [
                f"F{i}" for i in range(len(factors))
            ]
            rows = []
            for part, f in zip(names, factors, strict=True):
                f = f.detach().double()
                eig = torch.linalg.eigvalsh((f + f.T) / 2)
                rows.append({
                    "part": part, "shape": list(f.shape), "norm": float(f.norm()),
                    "trace": float(f.trace()), "min": float(eig.min()),
                    "max": float(eig.max()), "cond": _cond(eig),
                })
            return rows
        v = value.detach().double()
        row = {"part": "", "shape": list(v.shape), "norm": float(v.norm()),
               "trace": float(v.sum()), "min": float(v.min()), "max": float(v.max()),
               "cond": None}
        if savefield == "grad_batch":
            per_sample = v.flatten(1).norm(dim=1)
            row.update(trace=None, min=float(per_sample.min()), max=float(per_sample.max()))
            row["part"] = "per-sample norms"
        elif savefield != "batch_l2" and float(v.min()) >= 0:
            row["cond"] = _cond(v.abs().flatten())
        return [row]
