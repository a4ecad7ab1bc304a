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
and imported at the bottom of this module.  Parameter-free modules (activations,
reshapes) that KFRA steps over in closed form are listed in :mod:`.activations`.  Unknown modules
that own parameters fall back to :class:`~curvopt.rules.fallback.FallbackRule`
(``torch.func`` per-sample gradients): slower, never wrong.
"""

from __future__ import annotations

from torch import nn
from torch.nn.utils import parametrize

from .fallback import FALLBACK
from .layout import Dense, Elementwise, Embedding, Layout, Materialized, Rule

_REGISTRY: dict[type, Rule] = {}


def register(*module_types: type):
    """Class decorator: register a :class:`Rule` for ``module_types`` (overridable)."""

    def deco(rule_cls):
        for t in module_types:
            _REGISTRY[t] = rule_cls()
        return rule_cls

    return deco


def lookup(module: nn.Module) -> Rule:
    """The rule for ``module``: its type's, a base class's, else the generic fallback.

    A subclass inherits its base's rule only if it keeps the base's ``forward`` and adds
    no parameters of its own (a LoRA-style ``Linear`` subclass computes something else).
    A parametrized module (``weight_norm``, ``spectral_norm``: its parameters live in a
    ``ParametrizationList`` child called without arguments) is differentiated as a whole.
    """
    if parametrize.is_parametrized(module):
        return FALLBACK
    cls = type(module)
    for t in cls.__mro__:
        if t in _REGISTRY:
            if t is cls or (cls.forward is t.forward and _same_params(module)):
                return _REGISTRY[t]
            break
    return FALLBACK


def registered(module: nn.Module) -> Rule | None:
    """The rule registered for ``module``'s type or its nearest registered base, if any."""
    for t in type(module).__mro__:
        if t in _REGISTRY:
            return _REGISTRY[t]
    return None


def hooked(module: nn.Module) -> Rule | None:
    """The rule of a module whose call the engine records: one that owns trainable
    parameters directly (or through a parametrization); ``None`` for the others."""
    if parametrize.is_parametrized(module) or any(
            p.requires_grad for p in module.parameters(recurse=False)):
        return lookup(module)
    return None


def _same_params(module: nn.Module) -> bool:
    return {n for n, _ in module.named_parameters(recurse=False)} <= {"weight", "bias"}


# Importing the modules registers their rules.
from . import activations, conv, embedding, linear, norm  # noqa: E402,F401

__all__ = [
    "Rule",
    "Layout",
    "Dense",
    "Elementwise",
    "Embedding",
    "Materialized",
    "FALLBACK",
    "register",
    "lookup",
    "registered",
    "hooked",
    "activations",
]
