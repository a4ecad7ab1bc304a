"""The registry of per-layer rules: module type -> :class:`~.layout.Rule`."""

from __future__ import annotations

from torch import nn
from torch.nn.utils import parametrize

from .fallback import FALLBACK
from .layout import Rule

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
