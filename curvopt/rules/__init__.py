"""Per-layer rules: bring every parameterized layer into one of a few canonical layouts.

A rule answers one question for a module call (its inputs, its output) and a
batch of *cotangents* arriving at its output (the gradient, the columns of
the GGN square root, MC samples, ...): how is the per-sample gradient of each
parameter formed?  The answer is a :class:`~curvopt.rules.layout.Layout`; the
layer-agnostic formulas in :mod:`curvopt.quantities` consume only layouts.

Adding a layer = writing a rule (a subclass of :class:`Rule` with
``layouts()``) and registering it with :func:`register`.  Unknown modules
that own parameters fall back to :class:`~curvopt.rules.fallback.FallbackRule`
(``torch.func`` per-sample gradients): slower, never wrong.
"""

from __future__ import annotations

from torch import nn

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
    """
    cls = type(module)
    for t in cls.__mro__:
        if t in _REGISTRY:
            if t is cls or (cls.forward is t.forward and _same_params(module, t)):
                return _REGISTRY[t]
            break
    from .fallback import FALLBACK

    return FALLBACK


def _same_params(module: nn.Module, base: type) -> bool:
    known = {"weight", "bias"}
    return {n for n, _ in module.named_parameters(recurse=False)} <= known


def fast_rule_types() -> list[str]:
    """Names of the module types with a fast (closed-form) rule; for the docs."""
    return sorted(t.__name__ for t in _REGISTRY)


# Importing the modules registers their rules.
from . import conv, embedding, linear, norm  # noqa: E402,F401

__all__ = [
    "Rule",
    "Layout",
    "Dense",
    "Elementwise",
    "Embedding",
    "Materialized",
    "register",
    "lookup",
    "fast_rule_types",
]
