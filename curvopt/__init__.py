"""curvopt: per-sample statistics and curvature from one backward pass, and optimizers using them.

Architecture (imports only go down this list; ``tests/test_architecture.py`` checks it)::

    curvopt/
      errors.py, factors.py, _dist.py   errors; Kronecker factor lists; torch.distributed calls
      _threads.py          small CPU work on one thread when OpenMP's pool sleeps
      rules/               what curvopt knows about each layer type, one rule per type:
        layout.py            the canonical layouts (Dense: Linear/Conv/ConvT, Elementwise:
                             biases and norms, Embedding, Materialized) and their maths
        registry.py          module type -> rule; subclasses, parametrizations, the fallback
        linear.py conv.py embedding.py norm.py   fast rules
        fallback.py          torch.func per-sample gradients for any other module
        activations.py       parameter-free modules KFRA steps over in closed form
      losses.py            one class per loss: Hessian square roots, MC samples, normalizer
      quantities/          one registered class per quantity (base.py: Quantity, Record,
                           the contexts); first_order.py, diag_ggn.py (DiagGGN, KFAC, KFLR),
                           kfra.py, diag_hessian.py; kfe.py (EKFAC's request, not public)
      extensions.py        the user-facing names of the quantities (BackPACK's)
      engine/              hooks (collector.py) and the reduction over ranks (distributed.py)
      optim/               optimizers: pure update functions + thin torch.optim classes
      recipes/, cli.py     TOML recipes and the ``curvopt`` command (extra ``[recipes]``)

Where things go:

* **a new layer**: a rule file in ``rules/`` (``@register(MyLayer)``, ``layouts()`` mapping
  the call to a layout; ``kronecker()``, ``kfra_G()``, ``kfra_step()``, ``check()`` where
  it has them), imported in ``rules/__init__.py``;
* **a new quantity**: a :class:`curvopt.quantities.base.Quantity` subclass (``savefield``,
  ``columns()``, ``compute()``, ``sync()``) in a file in ``quantities/``, imported in its
  ``__init__`` and named in ``extensions.py``: the engine, ``torch.distributed``, the
  optimizers' ``track=`` and the recipes pick it up from the registry;
* **a new loss**: a :class:`curvopt.losses.Loss` subclass and an entry in ``losses.LOSSES``;
* **a new optimizer**: a pure update function in ``optim/functional.py`` and a thin
  subclass of ``optim/_base.CurvatureOptimizer`` naming the quantities it needs.
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
from .optim import DiagGGNAdam, KFACOptimizer, VarianceAdaptiveSGD

__version__ = "0.1.0"


__all__ = [
    "collect", "Collector", "extensions",
    "BatchGrad", "SumGradSquared", "Variance", "BatchL2Grad",
    "DiagGGNExact", "DiagGGNMC", "KFAC", "KFLR", "KFRA", "DiagHessian",
    "CurvoptError", "UnsupportedModuleError", "UnsupportedLossError", "CollectError",
    "KFACOptimizer", "DiagGGNAdam", "VarianceAdaptiveSGD",
]
