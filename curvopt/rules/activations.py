"""Parameter-free modules whose Jacobian curvopt knows in closed form (KFRA's fast steps).

KFRA passes the batch-averaged Hessian :math:`\\bar H` back through every module.
For a module listed here it needs no autograd columns:

* ``ELEMENTWISE`` (diagonal Jacobian :math:`\\operatorname{diag}(d_n)`):
  :math:`\\bar H_{in} = \\bar H \\odot E_n[d_n d_n^\\top]`;
* ``RESHAPE`` (a permutation-free reshape): :math:`\\bar H_{in} = \\bar H`.

A new activation: add its type to the tuple.
"""

from __future__ import annotations

from torch import nn

ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, nn.Sigmoid, nn.Tanh, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
               nn.SiLU, nn.Softplus, nn.LogSigmoid, nn.Hardtanh, nn.ReLU6, nn.Mish, nn.Hardswish,
               nn.Hardsigmoid, nn.Tanhshrink, nn.Softsign)
RESHAPE = (nn.Flatten, nn.Unflatten, nn.Identity)


def kind(module: nn.Module) -> str | None:
    """``"elementwise"``, ``"reshape"`` or ``None`` (unknown: autograd columns)."""
    if isinstance(module, RESHAPE):
        return "reshape"
    if isinstance(module, ELEMENTWISE):
        return "elementwise"
    return None
