"""Hugging Face ``transformers.pytorch_utils.Conv1D`` (GPT-2 family), registered lazily.

``Conv1D(nf, nx)`` is a Linear with a transposed weight: ``weight: [nx, nf]`` (in, out)
and :math:`y = x W + b` on inputs ``[N, *, nx]``.  It is the :class:`~.layout.Dense`
layout of ``nn.Linear`` (rows ``X: [N, S, 1, nx]``, S = prod of *, the "expand"
convention for A) with ``transposed=True``: the per-sample gradient is
:math:`\\sum_s x_s^\\top r_s`, shaped ``[nx, nf]`` like the weight.

Kronecker factors (``kfac``/``kflr``) are ``[A, G]`` (``kron_order="AG"``), with
``A: [nx, nx]``, ``G: [nf, nf]`` defined as for ``nn.Linear``: row-major order of the
weight *as stored*, so ``kron(A, G)`` is the GGN block of ``weight.flatten()`` (exactly,
for one sample and one row) and ``kron(A, G) @ weight.flatten()`` is what an optimizer
applies.  The bias gets ``[G]``.

KFRA: ``G`` as for ``nn.Linear`` (per-row blocks of :math:`\bar H`), and on 2-D
inputs the closed step :math:`\bar H_{in} = W \bar H W^\top` (the Jacobian is ``Wᵀ``).

``transformers`` is never imported here: the rule is matched by class path and name.
"""

from __future__ import annotations

import torch

from .layout import Dense, Elementwise, Rule
from .registry import register_lazy


@register_lazy("transformers.pytorch_utils", "Conv1D")
class Conv1DRule(Rule):
    def kronecker(self, module):
        return {"weight", "bias"}

    def kfra_G(self, module, H, out_shape):
        D, Do = H.shape[0], out_shape[-1]  # per-sample order (s, o): rows are extra batch
        return torch.einsum("sasb->ab", H.reshape(D // Do, Do, D // Do, Do))

    def kfra_step(self, module, H, out_shape):
        if len(out_shape) != 2:
            return None
        W = module.weight.detach().to(H.dtype)  # [in, out]: y = x W, Jacobian Wᵀ
        return W @ H @ W.T

    def layouts(self, module, args, kwargs, output):
        x = args[0]
        Di, Do = module.weight.shape
        N = x.shape[0]
        X = x.reshape(N, -1, 1, Di)
        S = X.shape[1]

        def rows(cot):  # [K, N, *, Do] -> [K, N, S, 1, Do]
            return cot.reshape(cot.shape[0], N, S, 1, Do)

        out = {}
        if module.weight.requires_grad:
            out["weight"] = Dense(module.weight, N, X=X, rows=rows, transposed=True, expand=True,
                                  kron_order="AG")
        if module.bias is not None and module.bias.requires_grad:
            out["bias"] = Elementwise(
                module.bias, N, Xhat=None, rows=lambda cot: cot.reshape(cot.shape[0], N, S, Do)
            )
        return out
