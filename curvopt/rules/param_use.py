"""A parameter used directly in a container's ``forward`` through a broadcasting operation.

Class tokens, position embeddings and layer scales are ``nn.Parameter`` objects a
container uses itself (``torch.cat([self.cls_token.expand(N, -1, -1), x], 1)``,
``x + self.pos_embed``, ``x * self.gamma``), not through a child module.  Their
per-sample information exists only in the gradient at the *output* of the first
operation that broadcasts them over the batch; the engine finds that operation
in the autograd graph (:mod:`curvopt.engine.graph`) and records its output.

With ``O = [N, o_1, …]`` the operation's output shape and ``V`` the shape of the
parameter as it enters the operation (after views such as ``reshape``), the
per-sample gradient is

.. math:: \\nabla_p \\ell_n = c\\,\\operatorname{sum\\_to}_V(g_n \\,[\\odot\\, x_n])

(``c`` the operation's coefficient, ``x`` the other factor of a product): an
:class:`~.layout.Elementwise` layout whose rows are the output entries summed
over the dimensions ``V`` broadcasts, and whose features are the parameter's
entries.  Its curvature block is exact (rows summed before the outer product).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .layout import Elementwise, Rule

#: autograd nodes of the broadcasting operations read here (view chains are followed)
KINDS = {"ExpandBackward0": "expand", "AddBackward0": "add", "SubBackward0": "add",
         "MulBackward0": "mul"}


@dataclass
class Use:
    """One use: the parameter's name in its module, the view shape ``V`` entering the
    operation, its output shape ``O``, the coefficient and (products) the other factor."""

    name: str
    V: tuple
    O: tuple
    coef: float = 1.0
    other: torch.Tensor | None = None


def split(O, V):
    """Permutation of ``O``'s dimensions to ``[batch, summed…, kept…]`` and the sizes
    ``(S, D)``; ``None`` if ``V`` does not broadcast over the batch dimension alone."""
    V = (1,) * (len(O) - len(V)) + tuple(V)
    if len(V) != len(O) or V[0] != 1:
        return None
    summed = [i for i in range(1, len(O)) if V[i] == 1 and O[i] != 1]
    kept = [i for i in range(1, len(O)) if i not in summed]
    if any(V[i] != O[i] for i in kept):
        return None
    S = int(torch.tensor([O[i] for i in summed]).prod()) if summed else 1
    D = int(torch.tensor([O[i] for i in kept]).prod()) if kept else 1
    return [0, *summed, *kept], S, D


class ParamUseRule(Rule):
    """The layout of one :class:`Use` of a parameter (see the module docstring)."""

    def __init__(self, use: Use):
        self.use = use

    def layouts(self, module, args, kwargs, output):
        use = self.use
        p = module._parameters[use.name]
        perm, S, D = split(use.O, use.V)
        N = use.O[0]

        def rows(cot):  # [K, N, *O[1:]] -> [K, N, S, D]
            r = cot.permute(0, *[1 + i for i in perm]).reshape(cot.shape[0], N, S, D)
            return r if use.coef == 1.0 else r * use.coef

        Xhat = None
        if use.other is not None:
            x = torch.broadcast_to(use.other.to(output.dtype), use.O)
            Xhat = x.permute(*perm).reshape(N, S, D)
        return {use.name: Elementwise(p, N, Xhat=Xhat, rows=rows, reduce_G=True)}
