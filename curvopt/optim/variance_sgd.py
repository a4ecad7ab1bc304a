"""VarianceAdaptiveSGD: M-SVAG with the gradient variance measured inside each mini-batch."""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

from ..extensions import Variance
from . import functional as F
from ._base import CurvatureOptimizer, Transaction

__all__ = ["VarianceAdaptiveSGD"]


class VarianceAdaptiveSGD(CurvatureOptimizer):
    """M-SVAG: momentum SGD with variance-adapted per-coordinate step factors.

    Balles & Hennig (2018), "Dissecting Adam: The Sign, Magnitude and Variance
    of Stochastic Gradients", Alg. 2 (M-SVAG).  The formula implemented
    (``variance="batch"``, the default):

    .. math::
        \\sigma_t^2 &= \\frac{N^2}{N-1}\\,\\texttt{variance}_t
            \\qquad\\text{(this mini-batch gradient's variance, engine's } \\texttt{Variance)}\\\\
        m_t &= \\beta m_{t-1} + (1-\\beta) g_t, \\qquad \\hat m_t = m_t/(1-\\beta^t)\\\\
        u_t &= \\beta^2 u_{t-1} + (1-\\beta)^2 \\sigma_t^2, \\qquad s_t = u_t / (1-\\beta^t)^2
            = \\operatorname{Var}(\\hat m_t)\\\\
        \\gamma_t &= \\frac{\\hat m_t^2}{\\hat m_t^2 + s_t}, \\qquad
        \\theta \\leftarrow (1-\\eta\\omega)\\,\\theta - \\eta\\, \\gamma_t \\odot \\hat m_t

    ``variance`` is the population variance of the per-sample terms
    ``grad_batch`` whose sum is the gradient, so :math:`\\sigma_t^2` is the
    unbiased variance of the mini-batch gradient (mean or sum reduction alike)
    and :math:`s_t` the exact variance of :math:`\\hat m_t` for independent
    batches -- no lag of running averages, also when the noise level changes.
    For a constant :math:`\\sigma^2` it equals the paper's
    :math:`\\rho_t\\sigma^2`.  ``variance="ema"`` is the paper's estimator from
    running averages of :math:`g` and :math:`g^2` only (no engine quantity
    needed).  With a batch of one there is no variance estimate and the step
    is momentum SGD.  See :func:`curvopt.optim.functional.msvag`.

    Args:
        model: the model.
        loss_fn: the loss module (may be ``None``: only first-order quantities are used).
        lr: :math:`\\eta` (per group).  :math:`\\hat m` is an average of
            gradients (not a sum as in ``torch.optim.SGD``'s momentum buffer),
            so learning rates are :math:`1/(1-\\beta)` times those of SGD with
            momentum; the best on the digits problems were 1-3.
        momentum: :math:`\\beta` (per group).
        params: parameters or parameter groups.
        variance: ``"batch"`` or ``"ema"``.
        weight_decay: :math:`\\omega`, decoupled (per group).
        track, seed: see :class:`~curvopt.optim._base.CurvatureOptimizer`.

    State per parameter: ``step``, ``exp_avg``, ``var_avg`` (:math:`u_t`) or
    ``exp_avg_sq``, ``gamma`` (:math:`\\gamma_t`), the raw ``variance``.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module | None = None,
        lr: float = 0.5,
        momentum: float = 0.9,
        *,
        params=None,
        variance: str = "batch",
        weight_decay: float = 0.0,
        track: Any = (),
        seed: int | None = None,
    ):
        if variance not in ("batch", "ema"):
            raise ValueError(f"variance must be 'batch' or 'ema', got {variance!r}")
        if lr < 0:
            raise ValueError(f"lr must be non-negative, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum}")
        self.variance = variance
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay)
        super().__init__(model, loss_fn, defaults, params=params, track=track, seed=seed)

    def _extensions_for_step(self, step):
        return (Variance(),) if self.variance == "batch" else ()

    def _global_batch_size(self) -> int:
        """N of the statistics: the samples of every backward since the last step (all
        ranks' when the engine reduces over torch.distributed)."""
        return self._collector.samples or 1

    def _update(self, step, stats, loss, closure, tx: Transaction):
        n = self._global_batch_size()
        if self.variance == "batch" and stats is None and self._global_step > 0:
            warnings.warn(
                "VarianceAdaptiveSGD: no gradient variance from a backward pass for this "
                "step (step() without a new backward?); nothing moved.",
                RuntimeWarning,
                stacklevel=5,
            )
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                sigma2 = None
                if self.variance == "batch":
                    var = stats.get(p, {}).get("variance") if stats is not None else None
                    if var is None:
                        continue
                    sigma2 = F.minibatch_gradient_variance(var, n)
                st = tx.param_state(p)
                inner = {k: st[k] for k in ("exp_avg", "var_avg", "exp_avg_sq") if k in st}
                inner["step"] = int(st["step"].item())
                d, new = F.msvag(
                    p.grad, sigma2, inner, beta=group["momentum"], variance=self.variance
                )
                for k in ("exp_avg", "var_avg", "exp_avg_sq", "gamma"):
                    if k in new:
                        st[k] = new[k]
                tx.count_step(p)
                tx.move(p, d, group["lr"], group["weight_decay"])
        if not tx.moves:
            return self._nothing_moved("no gradient variance")
        return None
