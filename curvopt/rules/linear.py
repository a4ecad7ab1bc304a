"""``nn.Linear``: inputs ``[N, *, Di]`` become rows ``X: [N, S, 1, Di]`` (S = prod of *)."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UnsupportedModuleError
from .layout import Dense, Elementwise, Rule
from .registry import register


@register(nn.Linear)
class LinearRule(Rule):
    transports_diagonal = True
    #: how the weight is stored (HF ``Conv1D``: transposed, factors ``[A, G]``)
    dense_options: dict = {}

    def jacobian(self, module):
        """``[out, in]``: ``y = x Jᵀ + b`` (the weight as ``nn.Linear`` stores it)."""
        return module.weight

    def kronecker(self, module):
        return {"weight", "bias"}

    def kfra_G(self, module, H, out_shape):
        # Per-sample output order (s, o): the S rows are extra batch ("expand"), so G sums
        # the per-row diagonal blocks of H̄.
        D, Do = H.shape[0], out_shape[-1]
        return torch.einsum("sasb->ab", H.reshape(D // Do, Do, D // Do, Do))

    def kfra_step(self, module, H, out_shape):
        if len(out_shape) != 2:
            return None
        J = self.jacobian(module).detach().to(H.dtype)  # the same for every sample
        return J.T @ H @ J

    def layouts(self, module, args, kwargs, output):
        x = args[0]
        if x.dim() < 2:
            raise UnsupportedModuleError(
                f"{module} was called on an unbatched input of shape {tuple(x.shape)}; "
                "per-sample quantities need a batch dimension first: use x.unsqueeze(0)."
            )
        (Do, Di), N = self.jacobian(module).shape, x.shape[0]
        X = x.reshape(N, -1, 1, Di)
        S = X.shape[1]

        def rows(cot):  # [K, N, *, Do] -> [K, N, S, 1, Do]
            return cot.reshape(cot.shape[0], N, S, 1, Do)

        out = {}
        if module.weight.requires_grad:
            # A is normalised by N·S: the S rows of a sample count as extra batch ("expand").
            out["weight"] = Dense(module.weight, N, X=X, rows=rows, expand=True,
                                  **self.dense_options)
        if module.bias is not None and module.bias.requires_grad:
            out["bias"] = Elementwise(
                module.bias, N, Xhat=None, rows=lambda cot: cot.reshape(cot.shape[0], N, S, Do)
            )
        return out
