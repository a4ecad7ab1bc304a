"""DiagGGNAdam: Adam with the GGN diagonal as its second moment (optionally Sophia-clipped)."""

from __future__ import annotations

import warnings
from typing import Any

from torch import Tensor, nn

from ..extensions import DiagGGNExact, DiagGGNMC, Extension
from . import functional as F
from ._base import (
    AUTO_EXACT_MAX_COLUMNS,
    CurvatureChoiceWarning,
    CurvatureOptimizer,
    Transaction,
    exact_columns,
)

__all__ = ["DiagGGNAdam"]


class DiagGGNAdam(CurvatureOptimizer):
    """Adam whose second moment is a running average of the diagonal GGN.

    .. math::
        m_t &= \\beta_1 m_{t-1} + (1-\\beta_1) g_t, \\qquad \\hat m_t = m_t / (1-\\beta_1^t)\\\\
        h_k &= \\beta_2 h_{k-1} + (1-\\beta_2)\\operatorname{diag}(\\mathrm{GGN}),
              \\qquad \\bar h_k = h_k/(1-\\beta_2^k)
              \\qquad \\text{(every } T \\text{ steps; } k \\text{ refreshes so far)}\\\\
        \\theta &\\leftarrow (1-\\eta\\omega)\\,\\theta
                 - \\eta\\, \\hat m_t \\oslash (\\bar h_k + \\lambda)^{p}

    ``power`` :math:`p = 1/2` is Adam's square root (Adam with
    :math:`g^2` replaced by the GGN diagonal, the damping inside the root);
    :math:`p = 1` is a damped diagonal Gauss-Newton step with momentum.  The
    default :math:`p = 1` (with ``damping=1e-3``) was chosen by measurement,
    each setting at its best learning rate on a grid: on the three problems of
    ``tests/optim/test_convergence.py`` :math:`p = 1` needed 62 / 14 / 21 steps
    (quadratic / logistic regression / MLP; Adam 107-148 / 15-16 / 19-24
    depending on the grid), :math:`p = 1/2` (``damping=1e-8``) 126 / 22 / 19,
    i.e. only :math:`p = 1` matched Adam on all three.  :math:`p = 1/2` was
    better late in training on a larger digits MLP 64-64-64-10 (training loss
    0.03 in 191 steps against 237 for :math:`p = 1`, Adam 291) and tolerates a
    wider learning-rate range; :math:`p = 1` needs its damping (1e-3 worked,
    1e-4 only at small learning rates).  Learning rates: best 0.01-0.1 for
    :math:`p = 1` on the classification problems (default ``lr=1e-2``).
    With ``clip`` :math:`= \\gamma` the step is clipped as in Sophia
    (Liu et al. 2023): :math:`\\operatorname{clip}(\\hat m_t \\oslash
    \\max(\\gamma(\\bar h_k+\\lambda)^p, \\epsilon), 1)`,
    which bounds every coordinate's move by :math:`\\eta` where the curvature
    is small or negative-looking.  See :func:`curvopt.optim.functional.diag_ggn_adam`.

    Args:
        model, loss_fn: the model and the loss module of the training loop.
        lr: :math:`\\eta` (per group).
        betas: :math:`(\\beta_1, \\beta_2)` (per group).
        damping: :math:`\\lambda \\ge 0` (per group; must be positive unless ``clip`` is set).
        params: parameters or parameter groups.
        curvature: ``"exact"`` (``DiagGGNExact``: ``C − 1`` columns per sample sent back
            for ``C`` classes), ``"mc"`` (``DiagGGNMC``: ``mc_samples`` columns), or
            ``"auto"`` (default): exact up to
            :data:`~curvopt.optim._base.AUTO_EXACT_MAX_COLUMNS` columns per sample, MC
            above (language models: one column set per token), decided at the first
            loss call and said once (:class:`~curvopt.optim.CurvatureChoiceWarning`).
        mc_samples: MC samples for ``curvature="mc"``.
        curvature_update_freq: :math:`T`; the GGN diagonal is computed only on
            steps :math:`1, 1+T, 1+2T, \\dots` (other steps are plain backward passes).
        power: :math:`p` (per group).
        clip: Sophia's :math:`\\gamma`, or ``None`` (per group).
        clip_eps: Sophia's :math:`\\epsilon` (per group).
        weight_decay: :math:`\\omega`, decoupled (per group).
        track, seed: see :class:`~curvopt.optim._base.CurvatureOptimizer`.

    State per parameter: ``step``, ``exp_avg``, ``exp_avg_curv``,
    ``curv_step``, and the raw ``diag_ggn_exact``/``diag_ggn_mc`` of the last refresh.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        lr: float = 1e-2,
        betas: tuple[float, float] = (0.9, 0.999),
        damping: float = 1e-3,
        *,
        params=None,
        curvature: str = "auto",
        mc_samples: int = 1,
        curvature_update_freq: int = 1,
        power: float = 1.0,
        clip: float | None = None,
        clip_eps: float = 1e-12,
        weight_decay: float = 0.0,
        track: Any = (),
        seed: int | None = None,
    ):
        if curvature not in ("exact", "mc", "auto"):
            raise ValueError(f"curvature must be 'exact', 'mc' or 'auto', got {curvature!r}")
        if int(curvature_update_freq) != curvature_update_freq or curvature_update_freq < 1:
            raise ValueError(
                f"curvature_update_freq must be a positive integer, got {curvature_update_freq}"
            )
        if int(mc_samples) < 1:
            raise ValueError(f"mc_samples must be >= 1, got {mc_samples}")
        if lr < 0:
            raise ValueError(f"lr must be non-negative, got {lr}")
        for b in betas:
            if not 0.0 <= b < 1.0:
                raise ValueError(f"betas must lie in [0, 1), got {betas}")
        if damping < 0 or (damping == 0 and clip is None):
            raise ValueError(f"damping must be positive (or >= 0 with clip), got {damping}")
        if power <= 0:
            raise ValueError(f"power must be positive, got {power}")
        self.curvature = curvature
        self._columns: int | None = None  # exact loss-Hessian columns per sample (first loss)
        self.mc_samples = int(mc_samples)
        self.curvature_update_freq = int(curvature_update_freq)
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            damping=damping,
            power=power,
            clip=clip,
            clip_eps=clip_eps,
            weight_decay=weight_decay,
        )
        super().__init__(model, loss_fn, defaults, params=params, track=track, seed=seed)

    def _exact(self) -> bool:
        """Whether the exact diagonal is used (``"auto"``: MC until the first loss call)."""
        if self.curvature != "auto":
            return self.curvature == "exact"
        return self._columns is not None and self._columns <= AUTO_EXACT_MAX_COLUMNS

    def _extension(self) -> Extension:
        return DiagGGNExact() if self._exact() else DiagGGNMC(mc_samples=self.mc_samples)

    def _choose_curvature(self, output: Tensor) -> bool:
        if self.curvature != "auto" or self._columns is not None:
            return False
        self._columns = exact_columns(self.loss_fn, output, self._batch_size,
                                      bool(self._collector.coupled_layers))
        which = "exact" if self._exact() else f"Monte Carlo, {self.mc_samples} sample(s)"
        warnings.warn(
            f"DiagGGNAdam(curvature='auto'): {self._columns} loss-Hessian columns per sample "
            f"-> {which} GGN diagonal (exact up to {AUTO_EXACT_MAX_COLUMNS} columns).",
            CurvatureChoiceWarning,
            stacklevel=2,
        )
        return self._exact()  # the schedule before the first loss call asked for MC

    def _curvature_due(self, step: int) -> bool:
        return (step - 1) % self.curvature_update_freq == 0

    def _extensions_for_step(self, step):
        return (self._extension(),) if self._curvature_due(step) else ()

    def _update(self, step, stats, loss, closure, tx: Transaction):
        key = self._extension().savefield
        due = self._curvature_due(step) and stats is not None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = tx.param_state(p)
                curv = stats.get(p, {}).get(key) if due else None
                if curv is None and "exp_avg_curv" not in st:
                    continue  # no curvature yet for this parameter
                inner = {
                    "step": int(st["step"].item()),
                    "curv_step": st.get("curv_step", 0),
                    "exp_avg": st.get("exp_avg"),
                    "exp_avg_curv": st.get("exp_avg_curv"),
                }
                d, new = F.diag_ggn_adam(
                    p.grad,
                    curv,
                    inner,
                    beta1=beta1,
                    beta2=beta2,
                    damping=group["damping"],
                    power=group["power"],
                    clip=group["clip"],
                    clip_eps=group["clip_eps"],
                )
                for k in ("exp_avg", "exp_avg_curv", "curv_step"):
                    st[k] = new[k]
                tx.count_step(p)
                tx.move(p, d, group["lr"], group["weight_decay"])
        if not tx.moves:
            return self._nothing_moved("no curvature yet")
        return None
