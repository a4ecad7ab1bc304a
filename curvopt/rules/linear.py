"""``nn.Linear``: inputs ``[N, *, Di]`` become rows ``X: [N, S, 1, Di]`` (S = prod of *)."""

from __future__ import annotations

from torch import nn

from . import register
from .layout import Dense, Elementwise, Rule


@register(nn.Linear)
class LinearRule(Rule):
    def kronecker(self, module):
        return {"weight", "bias"}

    def layouts(self, module, args, kwargs, output):
        x = args[0]
        N, Di, Do = x.shape[0], module.in_features, module.out_features
        X = x.reshape(N, -1, 1, Di)
        S = X.shape[1]

        def rows(cot):  # [K, N, *, Do] -> [K, N, S, 1, Do]
            return cot.reshape(cot.shape[0], N, S, 1, Do)

        out = {}
        if module.weight.requires_grad:
            # A is normalised by N·S: the S rows of a sample count as extra batch ("expand").
            out["weight"] = Dense(module.weight, N, X=X, rows=rows, expand=True)
        if module.bias is not None and module.bias.requires_grad:
            out["bias"] = Elementwise(
                module.bias, N, Xhat=None, rows=lambda cot: cot.reshape(cot.shape[0], N, S, Do)
            )
        return out
