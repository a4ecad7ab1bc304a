"""Per-layer rules: bring every parameterized layer into one of a few canonical layouts.

A rule answers one question for a module call (its inputs, its output) and a
batch of *cotangents* arriving at its output (the gradient, the columns of
the GGN square root, MC samples, ...): how is the per-sample gradient of each
parameter formed?  The answer is a :class:`~curvopt.rules.layout.Layout`; the
layer-agnostic formulas in :mod:`curvopt.quantities` consume only layouts.

Adding a layer = writing a rule (a subclass of :class:`Rule` with
``layouts()``; optionally ``kronecker()``, ``kfra_G()``, ``kfra_step()``,
``check()``, ``transports_diagonal``: everything curvopt knows about a layer
type lives in its rule) in a new file here, registered with :func:`register`
and imported at the bottom of this module.  A class of an optional package
(Hugging Face ``transformers``, ``timm``) is registered with :func:`register_lazy`
by module path and class name, without importing that package (:mod:`.hf`, :mod:`.timm`).
Parameter-free modules (activations, reshapes) that KFRA steps over in closed form are
listed in :mod:`.activations`.  Unknown modules
that own parameters fall back to :class:`~curvopt.rules.fallback.FallbackRule`
(``torch.func`` per-sample gradients): slower, never wrong.
"""

from __future__ import annotations

# Importing the modules registers their rules.
from . import activations, attention, conv, embedding, hf, linear, norm, timm  # noqa: F401
from .fallback import FALLBACK
from .layout import Dense, Elementwise, Embedding, Layout, Materialized, Rule
from .registry import (
    Site,
    container_params,
    hooked,
    lookup,
    register,
    register_lazy,
    registered,
    walk,
)

__all__ = [
    "Rule",
    "Layout",
    "Dense",
    "Elementwise",
    "Embedding",
    "Materialized",
    "FALLBACK",
    "register",
    "register_lazy",
    "lookup",
    "registered",
    "hooked",
    "container_params",
    "walk",
    "Site",
    "activations",
]
