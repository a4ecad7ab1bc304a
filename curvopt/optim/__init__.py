"""curvopt's optimizers: pure update rules (:mod:`.functional`) under thin ``torch.optim`` classes.

* :class:`KFACOptimizer` -- K-FAC / KFLR / KFRA natural gradient with π or
  eigenbasis damping, KL clipping, momentum, decoupled weight decay.
* :class:`DiagGGNAdam` -- Adam with the GGN diagonal as second moment
  (optionally Sophia-clipped).
* :class:`VarianceAdaptiveSGD` -- M-SVAG with in-batch gradient variance.

Each holds a :class:`curvopt.Collector` on the model: write the ordinary
``loss.backward(); opt.step()`` loop, read statistics from ``opt.state[p]``.
"""

from ._base import CurvatureChoiceWarning, OptimizerError
from .diag_ggn_adam import DiagGGNAdam
from .kfac import KFACOptimizer
from .variance_sgd import VarianceAdaptiveSGD

__all__ = [
    "KFACOptimizer",
    "DiagGGNAdam",
    "VarianceAdaptiveSGD",
    "OptimizerError",
    "CurvatureChoiceWarning",
]
