"""curvopt's optimizers: pure update rules (:mod:`.functional`) under thin ``torch.optim`` classes.

* :class:`KFACOptimizer` -- K-FAC / KFLR / KFRA natural gradient with π or
  eigenbasis damping, KL clipping, momentum, decoupled weight decay.
* :class:`DiagGGNAdam` -- Adam with the GGN diagonal as second moment
  (optionally Sophia-clipped).
* :class:`VarianceAdaptiveSGD` -- M-SVAG with in-batch gradient variance.

Each holds a :class:`curvopt.Collector` on the model: write the ordinary
``loss.backward(); opt.step()`` loop (``torch.amp.GradScaler`` included), read
statistics from ``opt.state[p]``.

Where things live:

* :mod:`._base` -- the shared adapter: engine schedule, private MC streams
  (``Collector.mc_generator``), finiteness checks, the :class:`~._base.Transaction`
  a step is staged in, life cycle (take-over, ``add_param_group``), checked
  ``state_dict`` / ``load_state_dict``;
* :mod:`.functional` -- the pure update rules (Kronecker algebra with optional
  group dimensions, damping, KL clipping, Adam with a curvature moment, M-SVAG);
* :mod:`.kronecker` -- curvature blocks as views over ``optimizer.state[p]``;
* :mod:`.plan` -- which parameter gets which block, and why;
* :mod:`._distributed` -- gradient averaging and inverse sharding over ranks;
* one file per optimizer, scheduling the above.  A new optimizer is a
  :class:`~._base.CurvatureOptimizer` subclass with ``_extensions_for_step`` and
  ``_update`` over functions in :mod:`.functional`.
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
