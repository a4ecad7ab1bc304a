"""curvopt: per-sample statistics and curvature from one backward pass, and optimizers using them.

Architecture (where a new layer or a new quantity goes)::

    curvopt/
      extensions.py        the ten requests (BatchGrad ... DiagHessian): names, options, formulas
      engine/collector.py  hooks: capture layer inputs/outputs on forward; at the start of
                           backward send loss-Hessian columns back through autograd to every
                           layer output; at the end of backward compute everything
      losses.py            square roots (exact / MC) of each loss's Hessian
      rules/               one small rule per layer type -> a canonical layout
        layout.py            Dense (Linear/Conv/ConvT), Elementwise (bias, norms), Embedding,
                             Materialized (anything else); their maths
        linear.py conv.py embedding.py norm.py   fast rules (register a new layer here)
        fallback.py          torch.func per-sample gradients for any other module
      quantities/          layer-agnostic formulas: first_order.py, second_order.py
                           (diagonals, Kronecker factors), kfra.py, diag_hessian.py
      optim/               optimizers: pure update functions + thin torch.optim classes
      recipes/, cli.py     TOML recipes and the ``curvopt`` command

A new layer: write a rule that maps (module, inputs, output) to a layout and
``@register`` it.  A new quantity: an extension class plus a formula over
layouts in ``quantities/``.
"""

from . import extensions
from .engine import Collector, collect
from .errors import CollectError, CurvoptError, UnsupportedLossError, UnsupportedModuleError
from .extensions import (
    KFAC,
    KFLR,
    KFRA,
    BatchGrad,
    BatchL2Grad,
    DiagGGNExact,
    DiagGGNMC,
    DiagHessian,
    SumGradSquared,
    Variance,
)

__version__ = "0.1.0"


def __getattr__(name):
    # Optimizers are imported lazily so that the engine stays importable on its own.
    if name in ("KFACOptimizer", "DiagGGNAdam", "VarianceAdaptiveSGD"):
        from . import optim

        return getattr(optim, name)
    raise AttributeError(f"module 'curvopt' has no attribute {name!r}")


__all__ = [
    "collect", "Collector", "extensions",
    "BatchGrad", "SumGradSquared", "Variance", "BatchL2Grad",
    "DiagGGNExact", "DiagGGNMC", "KFAC", "KFLR", "KFRA", "DiagHessian",
    "CurvoptError", "UnsupportedModuleError", "UnsupportedLossError", "CollectError",
    "KFACOptimizer", "DiagGGNAdam", "VarianceAdaptiveSGD",
]
