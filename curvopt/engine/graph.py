"""Reading the autograd graph of one module call: where its own parameters meet the batch.

A container's own parameters (class tokens, position embeddings, layer scales) carry
per-sample information only at the output of the operation that broadcasts them over
the batch.  :func:`find_uses` walks the graph of the container's call, from its outputs
down to its inputs, and returns for each such parameter that operation (a
:class:`~curvopt.rules.param_use.Use` and the node whose output is recorded), or reports
the parameter as unsupported (used in a matmul, say), for the generic rule.
"""

from __future__ import annotations

import torch
from torch.autograd.graph import GradientEdge

from ..rules.param_use import KINDS, Use, split

#: operations that only reshape (followed from the parameter to the operation using it)
VIEWS = {"ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "UnsqueezeBackward0",
         "SqueezeBackward0", "SqueezeBackward1", "SqueezeBackward2", "SqueezeBackward4",
         "AliasBackward0", "ToCopyBackward0"}


def _consumers(roots, stop) -> dict:
    """``node -> [(consumer node, input index)]`` for the graph between ``roots`` and ``stop``."""
    out: dict = {}
    seen = set(stop)
    stack = [r for r in roots if r is not None and r not in seen]
    seen.update(stack)
    while stack:
        n = stack.pop()
        for i, (nf, _) in enumerate(n.next_functions):
            if nf is None:
                continue
            out.setdefault(nf, []).append((n, i))
            if nf not in seen:
                seen.add(nf)
                stack.append(nf)
    return out


def find_uses(outputs, inputs, params: dict, batch: int):
    """``([(Use, GradientEdge)], unsupported names)`` for ``params`` (``name -> Parameter``)
    used in the call that produced ``outputs`` from ``inputs`` (tensors)."""
    roots = [t.grad_fn for t in outputs if torch.is_tensor(t) and t.grad_fn is not None]
    stop = {t.grad_fn for t in inputs if torch.is_tensor(t) and t.grad_fn is not None}
    consumers = _consumers(roots, stop)
    by_param = {id(p): n for n, p in params.items()}
    found, unsupported = [], set()
    for node, uses in consumers.items():
        name = by_param.get(id(getattr(node, "variable", None)))
        if name is None:
            continue
        p = params[name]
        for c, i in uses:
            V = tuple(p.shape)
            while type(c).__name__ in VIEWS and len(consumers.get(c, ())) == 1:
                V = tuple(c._input_metadata[0].shape)
                c, i = consumers[c][0]
            use = _use(name, c, i, V, batch)
            if use is None:
                unsupported.add(name)
            else:
                found.append((use, GradientEdge(c, 0)))
    return found, unsupported


def _use(name, c, i, V, batch) -> Use | None:
    kind = KINDS.get(type(c).__name__)
    O = tuple(c._input_metadata[0].shape)
    if kind is None or not O or O[0] != batch or split(O, V) is None:
        return None
    if kind == "expand":
        return Use(name, V, O)
    if kind == "add":
        alpha = getattr(c, "_saved_alpha", 1)
        coef = 1.0 if i == 0 else float(alpha)
        if type(c).__name__ == "SubBackward0" and i == 1:
            coef = -coef
        return Use(name, V, O, coef)
    other = c._saved_other if i == 0 else c._saved_self  # mul: ∂(a·b)/∂a = b
    if other is None:
        return None
    return Use(name, V, O, 1.0, other.detach())
