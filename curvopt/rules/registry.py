"""The registry of per-layer rules: module type -> :class:`~.layout.Rule`."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from torch.nn.utils import parametrize

from .fallback import FALLBACK
from .layout import Rule

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

    A class whose ``__module__`` and ``__qualname__`` are these gets the rule when a
    module of it is looked up (and is registered by type from then on), so the rule of
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
    A parametrized module (``weight_norm``, ``spectral_norm``: its parameters live in a
    ``ParametrizationList`` child called without arguments) is differentiated as a whole.
    """
    if parametrize.is_parametrized(module):
        return FALLBACK
    cls = type(module)
    for t in cls.__mro__:
        rule = _rule_of(t)
        if rule is not None:
            if t is cls or (cls.forward is t.forward and _same_params(module)):
                return rule
            break
    return FALLBACK


def registered(module: nn.Module) -> Rule | None:
    """The rule registered for ``module``'s type or its nearest registered base, if any."""
    for t in type(module).__mro__:
        rule = _rule_of(t)
        if rule is not None:
            return rule
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


def container_params(module: nn.Module) -> list[str] | None:
    """Names of the parameters a *container* uses itself, or ``None`` if ``module`` is not
    a container.

    A container has no registered rule and children that own parameters (a ViT owning its
    class token, a block owning a layer scale): its children keep their own rules, and
    only the parameters it owns directly (and shares with no child) take the slower path
    of :mod:`.param_use` or the generic rule.
    """
    if registered(module) is not None or parametrize.is_parametrized(module):
        return None
    if not any(True for c in module.children() for _ in c.parameters()):
        return None
    in_children = {id(p) for c in module.children() for p in c.parameters()}
    return [n for n, p in module.named_parameters(recurse=False)
            if p.requires_grad and id(p) not in in_children]


@dataclass(frozen=True)
class Site:
    """One place where the engine reads a model (see :func:`walk`).

    ``role``: ``"layer"`` (a module call recorded with ``rule``), ``"container"`` (the
    parameters ``names`` a container uses itself), ``"leaf"`` (a parameter-free leaf
    module: a KFRA boundary).  ``check``: the rule whose ``check`` runs before the call.
    ``params``: ``(name relative to the module, parameter)`` of every parameter read here.
    """

    name: str
    module: nn.Module
    role: str
    rule: Rule | None = None
    check: Rule | None = None
    params: tuple = ()


def walk(model: nn.Module):
    """The engine's view of ``model``, one :class:`Site` per module it reads: the one loop
    the collector's hooks and the optimizers' block plans share."""
    covered: list[str] = []  # modules whose whole subtree a generic rule handles
    for name, module in model.named_modules():
        if any(c == "" or name.startswith(c + ".") for c in covered):
            continue
        reg = registered(module)
        check = reg if reg is not None and type(reg).check is not Rule.check else None
        own = container_params(module)
        if own is not None:  # children keep their rules; the container's own parameters
            yield Site(name, module, "container", None, check,
                       tuple((n, module._parameters[n]) for n in own))
            continue
        rule = hooked(module)
        if rule is None:
            if not any(True for _ in module.children()):
                yield Site(name, module, "leaf", None, check)
            elif check is not None:
                yield Site(name, module, "check", None, check)
            continue
        if getattr(rule, "covers_subtree", False):
            covered.append(name)
            params = tuple((n, p) for n, p in module.named_parameters() if p.requires_grad)
        else:
            params = tuple((n, p) for n, p in module.named_parameters(recurse=False)
                           if p.requires_grad)
        yield Site(name, module, "layer", rule, check, params)
