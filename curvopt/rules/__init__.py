"""Per-layer rules: bring every parameterized layer into one of a few canonical layouts.

A rule answers one question for a module call (its inputs, its output) and a
batch of *cotangents* arriving at its output (the gradient, the columns of
the GGN square root, MC samples, ...): how is the per-sample gradient of each
parameter formed?  The answer is a :class:`~curvopt.rules.layout.Layout`; the
layer-agnostic formulas in :mod:`curvopt.quantities` consume only layouts.

Adding a layer = writing a rule (a subclass of :class:`Rule` with
``layouts()``) and registering it with :func:`register`, or, for a class of
an optional third-party package (Hugging Face ``transformers``, ``timm``), with
:func:`register_lazy` by module path and class name, which never imports that
package: the name is matched when a module of that class is looked up.  Unknown modules
that own parameters fall back to :class:`~curvopt.rules.fallback.FallbackRule`
(``torch.func`` per-sample gradients): slower, never wrong.
"""

from __future__ import annotations

from torch import nn

from .layout import Dense, Elementwise, Embedding, Layout, Materialized, Rule

_REGISTRY: dict[type, Rule] = {}
#: ``(class.__module__, class.__qualname__) -> rule`` for classes of optional packages.
_LAZY: dict[tuple[str, str], Rule] = {}


def register(*module_types: type):
    """Class decorator: register a :class:`Rule` for ``module_types`` (overridable)."""

    def deco(rule_cls):
        for t in module_types:
            _REGISTRY[t] = rule_cls()
        return rule_cls

    return deco


def register_lazy(module_path: str, qualname: str):
    """Class decorator: register a :class:`Rule` for the class ``module_path.qualname``
    without importing ``module_path``.

    A class whose ``__module__`` and ``__qualname__`` are these gets the rule at
    :func:`lookup` time (and is then registered by type), so a rule for
    ``transformers.pytorch_utils.Conv1D`` costs nothing when ``transformers`` is absent.
    """

    def deco(rule_cls):
        _LAZY[(module_path, qualname)] = rule_cls()
        return rule_cls

    return deco


def _rule_of(t: type) -> Rule | None:
    rule = _REGISTRY.get(t)
    if rule is None and _LAZY:
        rule = _LAZY.get((getattr(t, "__module__", None), getattr(t, "__qualname__", None)))
        if rule is not None:
            _REGISTRY[t] = rule  # resolved once: later lookups of t are a dict hit
    return rule


def lookup(module: nn.Module) -> Rule:
    """The rule for ``module``: its type's, a base class's, else the generic fallback.

    A subclass inherits its base's rule only if it keeps the base's ``forward`` and adds
    no parameters of its own (a LoRA-style ``Linear`` subclass computes something else).
    """
    cls = type(module)
    for t in cls.__mro__:
        rule = _rule_of(t)
        if rule is not None:
            if t is cls or (cls.forward is t.forward and _same_params(module, t)):
                return rule
            break
    from .fallback import FALLBACK

    return FALLBACK


def _same_params(module: nn.Module, base: type) -> bool:
    known = {"weight", "bias"}
    return {n for n, _ in module.named_parameters(recurse=False)} <= known


def fast_rule_types() -> list[str]:
    """Names of the module types with a fast (closed-form) rule; for the docs.

    Lazily registered classes are named ``module.qualname`` (their package may be absent).
    """
    known = {(t.__module__, t.__qualname__) for t in _REGISTRY}
    return sorted([t.__name__ for t in _REGISTRY]
                  + [f"{m}.{q}" for m, q in _LAZY if (m, q) not in known])


# Importing the modules registers their rules (hf and timm lazily: no third-party import).
from . import conv, embedding, hf, linear, norm, timm  # noqa: E402,F401

__all__ = [
    "Rule",
    "Layout",
    "Dense",
    "Elementwise",
    "Embedding",
    "Materialized",
    "register",
    "register_lazy",
    "lookup",
    "fast_rule_types",
]
