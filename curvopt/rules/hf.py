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

from .linear import LinearRule
from .registry import register_lazy


@register_lazy("transformers.pytorch_utils", "Conv1D")
class Conv1DRule(LinearRule):
    # DiagHessian's transport assumes an [out, in] weight
    transports_diagonal = False
    dense_options = {"transposed": True, "kron_order": "AG"}

    def jacobian(self, module):
        return module.weight.T  # stored [in, out]: y = x W + b
