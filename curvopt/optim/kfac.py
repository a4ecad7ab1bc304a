"""K-FAC: natural-gradient descent with Kronecker-factored curvature.

Martens & Grosse (2015), "Optimizing Neural Networks with Kronecker-factored
Approximate Curvature"; Grosse & Martens (2016) for convolutions; Ba, Grosse &
Martens (2017), "Distributed Second-Order Optimization using
Kronecker-Factored Approximations" for KL clipping; Botev, Ritter & Barber
(2017) for KFLR/KFRA.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import UnsupportedModuleError
from ..extensions import KFAC, KFLR, KFRA, BatchGrad, DiagGGNExact, DiagGGNMC, Extension
from ..quantities import KFESumGradSquared
from . import _distributed as D
from . import functional as F
from . import plan as P
from ._base import (
    AUTO_EXACT_MAX_COLUMNS,
    CurvatureChoiceWarning,
    CurvatureOptimizer,
    OptimizerError,
    Transaction,
    _weak_method,
    exact_columns,
)
from .kronecker import DAMPING_MODES, DiagonalBlock, EKFACBlock, KroneckerBlock

__all__ = ["KFACOptimizer"]

_CURVATURES = ("kfac", "kflr", "kfra", "auto")

#: ``factor_decay=None``: the running averages forget at this rate per *step*, so their
#: memory (about 20 steps) does not grow with ``factor_update_freq``; measured on the
#: digits MLP (64-128-128-10, batch 128) with factors every 10 steps, 0.95 per update
#: (a 200-step memory) needed 46 steps to the target loss, 0.5-0.7 per update 35-38.
STEP_DECAY = 0.95
#: ``curvature_warmup=True``: the first statistics (and inverses) are computed at these
#: steps, then every :math:`T_f` (:math:`T_i`) steps counted from the last of them.  The
#: initial model's curvature goes stale fastest: on a tiny GPT-2 (full batch, 12 steps,
#: defaults) statistics at steps 1 and 11 only let the loss rise above its step-4 value in
#: 6 of 10 MC seeds, statistics at 1, 3, 6 in none (median final loss 2.2 against 2.9);
#: on the digits MLP the same 31 steps to the target (median of 5 seeds) with one more
#: statistics step.  Used when :math:`T_f > 3` (denser schedules need no warm-up).
WARMUP_STEPS = (1, 3, 6)
#: ``momentum=None`` without a base optimizer (see *Defaults* of :class:`KFACOptimizer`).
DEFAULT_MOMENTUM = 0.5


class KFACOptimizer(CurvatureOptimizer):
    """K-FAC with π-corrected Tikhonov (or exact eigenbasis) damping, KL clipping and momentum.

    For a layer with weight :math:`W` (``[out, in]``; convolutions
    ``[C_out, C_in·k…]``) and factors in row-major order ``[G, A]``:

    .. math::
        \\bar A &\\leftarrow \\varepsilon \\bar A + (1-\\varepsilon) A, \\quad
        \\bar G \\leftarrow \\varepsilon \\bar G + (1-\\varepsilon) G
        \\qquad \\text{every } T_f \\text{ steps (first update: copy)} \\\\
        V &= (\\bar G + \\tfrac{\\sqrt\\lambda}{\\pi} I)^{-1}\\, \\nabla_W\\,
             (\\bar A + \\pi\\sqrt\\lambda I)^{-1},
        \\quad \\pi = \\sqrt{\\tfrac{\\operatorname{tr}\\bar A/d_A}{\\operatorname{tr}\\bar G/d_G}}
        \\qquad (\\text{inverses recomputed every } T_i \\text{ steps}) \\\\
        \\nu &= \\min\\Big(1, \\sqrt{\\kappa \\big/
              \\textstyle\\sum_l \\eta_l^2 \\langle V_l, \\nabla_{W_l}\\rangle}\\Big)
        \\qquad \\text{(KL clipping)} \\\\
        b &\\leftarrow \\mu b + \\nu V, \\qquad
        W \\leftarrow (1 - \\eta\\omega) W - \\eta\\, b .

    ``damping_mode="eigen"`` replaces the π-damped inverses by the exact
    damped inverse in the factors' eigenbasis,
    :math:`V = Q_G[(Q_G^\\top \\nabla_W Q_A) \\oslash (d_G d_A^\\top + \\lambda)]Q_A^\\top`.
    ``eigen_correction=True`` is **EKFAC** (George, Laurent, Bouthillier, Ballas &
    Vincent 2018, "Fast Approximate Natural Gradient Descent in a Kronecker-factored
    Eigenbasis"): the same eigenbases :math:`Q_G, Q_A` (recomputed every :math:`T_i`
    steps, float64), but the diagonal re-estimated on *every* step (their Algorithm 1:
    the diagonal is cheap next to an eigendecomposition) from the per-sample gradients
    :math:`g_n = f\\nabla\\ell_n` (``grad_batch``'s scaling, :math:`f = 1/z` the
    loss's normalizer) in the eigenbasis, and averaged with the per-step decay
    :math:`\\varepsilon^{1/T_f}` (0.95 by default):

    .. math::
        \\bar s \\leftarrow \\varepsilon^{1/T_f} \\bar s + (1-\\varepsilon^{1/T_f})\\,
            z\\sum_n \\big(Q_G^\\top g_n Q_A\\big)^{\\odot 2}, \\qquad
        V = Q_G\\big[(Q_G^\\top \\nabla_W Q_A) \\oslash (\\bar s + \\lambda)\\big]Q_A^\\top .

    :math:`\\bar s` is the exact diagonal of the curvature in that basis (the best
    diagonal there in Frobenius norm, where K-FAC's :math:`d_G d_A^\\top` is not);
    with several rows per sample (sequences, convolution positions) :math:`g_n` sums
    them (exact per-sample gradients).  When the eigenbasis is recomputed,
    :math:`\\bar s` is carried over as the old curvature's diagonal in the new basis,
    :math:`(P_G^{\\odot2})\\,\\bar s\\,(P_A^{\\odot2})^\\top`, :math:`P = Q_{new}^\\top Q_{old}`;
    until the first estimate :math:`d_G d_A^\\top` stands in.  Works for grouped
    factors, ``[A, G]``-ordered ones (Hugging Face ``Conv1D``) and single-factor blocks
    (biases).  The per-sample gradients come from the loss's real targets, so
    :math:`\\bar s` is the *empirical* Fisher's diagonal while the basis is that of
    ``curvature``'s factors.  Measured (steps to a target, lr tuned): fewer steps than
    K-FAC on digits MLPs (64-128-128-10: 28 against 30, median of 5 seeds, 28 against 28
    over 3; 12 against 14 on 64-32-10), more on linear least squares (25 against 12;
    the empirical Fisher vanishes with the residuals) and logistic regression (8 against
    5).  Cost: the engine's ``kfe_sum_grad_squared`` on every step after the first
    (:mod:`curvopt.quantities.kfe`: cotangent rows rotated by :math:`Q_G`, inputs by
    :math:`Q_A`; :math:`N(d_G^2 + d_A^2 + d_G d_A)` multiply-adds per dense layer with one
    row per sample, no per-sample gradients).  On a step that recomputes the basis this
    batch's estimate is taken in the basis the step starts with, folded into
    :math:`\\bar s`, and carried over to the new basis with it; only the first basis gets
    ``grad_batch`` ``[N, out, in]`` projected into it, :math:`N(d_G^2 d_A + d_G d_A^2)`
    (Algorithm 1's order there).  On the digits MLP (``benchmarks/optimizers.py``, 2
    cores, PASSIVE): 28 steps to the target at 7.4 ms per step, 3.5x an Adam step, 1.3x
    Adam's wall-clock; projecting on every basis step cost 12.5 ms per step, on every
    step 19-30 ms.
    ``damping_mode`` must be left unset (or ``"eigen"``).

    Biases (factor ``[G]``) and other single-factor blocks use
    :math:`(\\bar G + \\lambda I)^{-1}`.  Factors with a leading group
    dimension (grouped convolutions: ``G: [g, C_out/g, C_out/g]``) are one
    Kronecker block per group, each with its own π.  Factor inverses and
    eigendecompositions are computed in float64 (Cholesky, falling back to a
    clamped eigendecomposition) and applied in the parameter's dtype.

    **Blocks** (:mod:`curvopt.optim.plan`).  Every parameter gets a block:
    Kronecker where its layer's rule has Kronecker factors, otherwise the
    damped running average of its GGN diagonal,
    :math:`\\nabla \\oslash (\\bar h + \\lambda)`: norm-layer affine parameters
    (``norm_blocks="dense"``: their dense GGN block), modules without a
    Kronecker rule, tied parameters, factors above 4096 per side.  The engine
    computes the Kronecker factors only for the Kronecker parameters and the
    diagonal only for the others (``Collector.only``).  The diagonal is
    ``DiagGGNMC`` with ``curvature="kfac"`` (the same samples), ``DiagGGNExact``
    with ``"kflr"`` (the same columns), and by cost with ``"kfra"``.  A
    one-line summary is warned once at construction when some parameter gets a
    diagonal block (:class:`~curvopt.optim.CurvatureChoiceWarning`);
    :meth:`block_report` lists every parameter.  A Kronecker parameter for which
    the engine returns no factors moves to the diagonal from the next factor
    update on (warning; it is not moved on that one step).

    **Defaults** (issue 12: time to a target, not steps).  Statistics and inverses at
    steps 1, 3, 6 (:data:`WARMUP_STEPS`) and then every :math:`T_f = T_i = 10` steps
    (the other steps are a plain backward pass and two small products per layer), the
    averages forgetting 0.95 per *step* (:math:`0.95^{k}` for an update :math:`k` steps
    after the previous one), momentum 0.5 and :math:`\\kappa = 3\\cdot10^{-3}`.
    Measured on the digits MLP 64-128-128-10 (batch 128, training loss 0.05, lr tuned on
    a :math:`\\sqrt{10}` grid, median of 3 seeds, ``benchmarks/optimizers.py``, 2 cores,
    ``OMP_WAIT_POLICY=PASSIVE``): 28 steps at 1.43x an Adam step along the trajectory,
    0.58x Adam's wall-clock (Adam: 71 steps); amortized over 20-step blocks 1.19x an
    Adam step.  With OpenMP's default spin-waiting the same 28 steps cost 2.6x an Adam
    step, 1.06x its wall-clock: Adam's step is then 0.74 ms, and a statistics step (an
    extra backward, six factor products, nine float64 Cholesky inverses of sides up to
    128: about 1.6 ms of LAPACK alone) costs about five of them.  The previous defaults
    (statistics every step, 0.95 per update, no momentum, :math:`\\kappa = 10^{-2}`)
    took 35-37 steps at 2.9-4.5x, 1.4-2.3x Adam's wall-clock.  Statistics every 10
    steps with 0.95 per *update* (a 200-step memory) needed 46 steps.  With the same
    momentum and :math:`\\kappa` (5 seeds): statistics every 10 steps 32 steps, every 5
    30, every 15 or 20 35-37, inverses every 20 or 30 33-39; damping
    :math:`3\\cdot10^{-3}` 36 and :math:`10^{-2}` 53.
    Momentum 0.5-0.6 with :math:`\\kappa = 2\\text{-}5\\cdot10^{-3}` gave 26-32 steps,
    momentum 0 with :math:`\\kappa = 10^{-2}` 37 (the step length is set by
    :math:`\\kappa`, so the best lr spans the grid).  On the 3c3d CNN (N=64) the
    amortized step is 1.9x Adam's (previous defaults 4.3x).  A parameter with a
    gradient but no curvature yet (added by :meth:`add_param_group`, unfrozen, or moved
    to the diagonal) gets statistics at the next step, not at the next scheduled one.

    **Adaptive damping** (``adaptive_damping=True``, needs ``step(closure)``):
    every ``damping_adaptation_interval`` steps the closure is evaluated again
    after the update and λ follows the Levenberg-Marquardt rule of Martens &
    Grosse (2015, §6.5) on the reduction ratio
    :math:`\\rho = (h(\\theta+\\delta) - h(\\theta)) / M(\\delta)`, with the
    quadratic model :math:`M(\\delta) = \\nabla h^\\top\\delta
    + \\tfrac12\\delta^\\top(\\bar C + \\lambda I)\\delta`
    of the running-average curvature; :math:`\\omega = ` ``damping_adaptation_decay``.
    In ``"pi"`` mode a new λ takes effect at the next inverse update.

    **Distributed** (a ``torch.distributed`` group of more than one rank; the model
    plain or ``DistributedDataParallel``): the engine all-reduces the factors of
    the global batch on factor-update steps only; gradients are averaged by DDP
    or, for a plain model, by the optimizer (see :mod:`curvopt.optim._base`).  On
    inverse-update steps each Kronecker block's inverse or eigendecomposition is
    computed by one rank (greedy by :math:`\\sum_i d_i^3`) and broadcast, so the
    caches are bit-identical on all ranks (``shard_inverses=False`` attribute:
    every rank computes all).  Each rank's MC stream is seeded ``seed + rank``.

    Args:
        model: the model (``params`` default to its trainable parameters).
        loss_fn: the loss module used in the training loop.
        lr: :math:`\\eta` (per group).
        damping: :math:`\\lambda > 0` (per group).
        params: parameters or parameter groups.
        curvature: ``"kfac"`` (MC Fisher/GGN, ``mc_samples`` draws: affordable for any
            number of classes), ``"kflr"`` (exact GGN square root: ``C − 1`` columns
            per sample for ``C`` classes, warned about above
            :data:`~curvopt.optim._base.AUTO_EXACT_MAX_COLUMNS`), ``"kfra"``
            (recursive approximation), or ``"auto"``: ``"kflr"`` up to that many
            columns, ``"kfac"`` above (decided at the first loss call, said once).
        mc_samples: MC samples per input for ``curvature="kfac"``.
        factor_decay: :math:`\\varepsilon` per factor update (per group; a warm-up update
            :math:`k` steps after the previous one: :math:`\\varepsilon^{k/T_f}`); ``None``
            (default): :data:`STEP_DECAY` ``= 0.95`` per *step*, i.e.
            :math:`0.95^{T_f}` per update, so the averages remember about 20 steps
            whatever :math:`T_f`.
        factor_update_freq: :math:`T_f`; the statistics are computed only on
            steps :math:`1, 1 + T_f, \\dots` (other steps are plain backward passes:
            no extra backward, no engine work).  Default and the other defaults
            below: see *Defaults*.
        inverse_update_freq: :math:`T_i` (a multiple of :math:`T_f`: inverses of
            unchanged factors are unchanged).
        curvature_warmup: statistics and inverses also at the steps of
            :data:`WARMUP_STEPS` (1, 3, 6; the schedules then count from step 6), when
            :math:`T_f > 3`: the first curvature estimates go stale fastest.
        damping_mode: ``"pi"`` (default) or ``"eigen"`` (default with ``eigen_correction``).
        eigen_correction: EKFAC (see above): the eigenbasis diagonal fitted to per-sample
            gradients instead of K-FAC's eigenvalue products.
        kl_clip: :math:`\\kappa`, or ``None`` for no clipping (``None`` diverged on
            the digits MLPs for ``damping <= 1e-2``).  With clipping active the step
            length is set by :math:`\\kappa` rather than ``lr``.
        momentum: :math:`\\mu` (per group); ``None`` (default): 0.5, or 0 with a
            ``base_optimizer``.
        weight_decay: :math:`\\omega`, decoupled (per group).
        base_optimizer: optional ``torch.optim`` / ``torch_optimizer`` class; it
            receives :math:`\\nu V` as the gradient (its own momentum and weight
            decay then apply; ``momentum``/``weight_decay`` here must be 0).
            ``lr`` of each group is passed on (LR schedulers keep working).
        base_optimizer_kwargs: keyword arguments of ``base_optimizer``.
        fallback: ``"diag_ggn"`` (diagonal blocks, see above) or ``"error"`` (raise
            :class:`~curvopt.errors.UnsupportedModuleError` at construction if a
            parameter would get one).
        norm_blocks: ``"diagonal"`` or ``"dense"`` for norm-layer affine parameters.
        adaptive_damping, damping_adaptation_interval, damping_adaptation_decay,
        min_damping: Levenberg-Marquardt adaptation (see above).
        track: extra quantities stored in ``state[p]`` every step (``"all"``: ten).
        seed: seed of the private MC sampling streams.

    State per parameter: ``step``, the raw statistics of the last step that
    computed them (``"kfac"``/``"kflr"``/``"kfra"``, ...), ``factors``
    (running averages), ``factor_updates``, ``inverses`` or
    ``eigenvectors``/``eigenvalues``, ``inverse_damping``,
    ``inverse_updates``, ``momentum_buffer``; EKFAC: ``kfe_scale`` (:math:`\\bar s`,
    shaped like the parameter), ``kfe_updates``; diagonal blocks: ``diag_avg``.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        lr: float = 0.1,
        damping: float = 1e-3,
        *,
        params=None,
        curvature: str = "kfac",
        mc_samples: int = 1,
        factor_decay: float | None = None,
        factor_update_freq: int = 10,
        inverse_update_freq: int = 10,
        curvature_warmup: bool = True,
        damping_mode: str | None = None,
        eigen_correction: bool = False,
        kl_clip: float | None = 3e-3,
        momentum: float | None = None,
        weight_decay: float = 0.0,
        base_optimizer: type | None = None,
        base_optimizer_kwargs: dict | None = None,
        fallback: str = "diag_ggn",
        norm_blocks: str = "diagonal",
        adaptive_damping: bool = False,
        damping_adaptation_interval: int = 5,
        damping_adaptation_decay: float = 0.95**5,
        min_damping: float = 1e-8,
        track: Any = (),
        seed: int | None = None,
    ):
        if curvature not in _CURVATURES:
            raise ValueError(f"curvature must be one of {_CURVATURES}, got {curvature!r}")
        if damping_mode is None:
            damping_mode = "eigen" if eigen_correction else "pi"
        if damping_mode not in DAMPING_MODES:
            raise ValueError(f"damping_mode must be one of {DAMPING_MODES}, got {damping_mode!r}")
        if eigen_correction and damping_mode != "eigen":
            raise ValueError(
                "eigen_correction=True (EKFAC) damps its fitted diagonal exactly, (s + λ), in "
                f"the factors' eigenbasis; damping_mode={damping_mode!r} does not apply: leave "
                "damping_mode unset (or 'eigen')"
            )
        if fallback not in ("diag_ggn", "error"):
            raise ValueError(f"fallback must be 'diag_ggn' or 'error', got {fallback!r}")
        if norm_blocks not in P.NORM_BLOCKS:
            raise ValueError(f"norm_blocks must be one of {P.NORM_BLOCKS}, got {norm_blocks!r}")
        for name, v in (
            ("factor_update_freq", factor_update_freq),
            ("inverse_update_freq", inverse_update_freq),
            ("damping_adaptation_interval", damping_adaptation_interval),
            ("mc_samples", mc_samples),
        ):
            if int(v) < 1 or int(v) != v:
                raise ValueError(f"{name} must be a positive integer, got {v}")
        if not damping > 0:
            raise ValueError(f"damping must be positive, got {damping}")
        if lr < 0:
            raise ValueError(f"lr must be non-negative, got {lr}")
        if factor_decay is not None and not 0.0 <= factor_decay < 1.0:
            raise ValueError(f"factor_decay must lie in [0, 1) or be None, got {factor_decay}")
        if kl_clip is not None and not kl_clip > 0:
            raise ValueError(f"kl_clip must be positive or None, got {kl_clip}")
        if not 0.0 < damping_adaptation_decay < 1.0:
            raise ValueError("damping_adaptation_decay must lie in (0, 1)")
        if momentum is None:
            momentum = 0.0 if base_optimizer is not None else DEFAULT_MOMENTUM
        if base_optimizer is not None and (momentum or weight_decay):
            raise ValueError(
                "with a base_optimizer, set momentum and weight decay on the base optimizer "
                "(base_optimizer_kwargs), not on KFACOptimizer"
            )
        self.curvature = curvature
        self.mc_samples = int(mc_samples)
        self.factor_update_freq = int(factor_update_freq)
        self.inverse_update_freq = int(inverse_update_freq)
        self.curvature_warmup = bool(curvature_warmup)
        self.damping_mode = damping_mode
        self.eigen_correction = bool(eigen_correction)
        self._needs_normalizer = self.eigen_correction
        self.kl_clip = kl_clip
        self.fallback = fallback
        self.norm_blocks = norm_blocks
        self.adaptive_damping = bool(adaptive_damping)
        self.damping_adaptation_interval = int(damping_adaptation_interval)
        self.damping_adaptation_decay = float(damping_adaptation_decay)
        self.min_damping = float(min_damping)
        #: Under ``torch.distributed``: compute each Kronecker block's inverse on one
        #: rank (by cost) and broadcast it, instead of on every rank.
        self.shard_inverses = True
        self._columns: int | None = None  # exact loss-Hessian columns per sample (first loss)
        self._blocks: dict[int, P.Block] = {}
        self._demoted: dict[int, P.Block] = {}  # Kronecker parameters the engine gave no factors
        self._warned_idle: set[int] = set()
        defaults = dict(
            lr=lr,
            damping=damping,
            momentum=momentum,
            weight_decay=weight_decay,
            factor_decay=factor_decay,
        )
        super().__init__(model, loss_fn, defaults, params=params, track=track, seed=seed)
        self.base_optimizer = None
        try:
            self._report_plan()
            if base_optimizer is not None:
                groups = [{"params": g["params"], "lr": g["lr"]} for g in self.param_groups]
                self.base_optimizer = base_optimizer(groups, **(base_optimizer_kwargs or {}))
        except BaseException:
            self.close()  # a half-built optimizer must not hold the model
            raise

    # ------------------------------------------------------------------------- blocks
    def _params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _engine_attached(self) -> None:
        """(Re-)plan the blocks whenever the engine is (re-)attached."""
        self._blocks = P.plan_blocks(self.model, self._params(), self.norm_blocks)
        self._blocks.update(self._demoted)
        self._curvature_missing = self._missing_in_state()

    def _missing_in_state(self) -> bool:
        """Whether a trainable parameter has no curvature yet (new, unfrozen): it then gets
        statistics at the next step (see :meth:`_factor_due`)."""
        return any(p.requires_grad and not ({"factors", "diag_avg"} & set(self.state.get(p, ())))
                   for p in self._params())

    def _block_of(self, p: Tensor) -> P.Block:
        return self._blocks[id(p)]

    def _report_plan(self, params: list[Tensor] | None = None) -> None:
        """Say once which parameters get a diagonal block (all Kronecker: nothing to say)."""
        blocks = [self._block_of(p) for p in (params or self._params())]
        if self.fallback == "error" and any(b.kind == P.DIAGONAL for b in blocks):
            raise UnsupportedModuleError(
                "KFACOptimizer(fallback='error'): some parameters have no Kronecker factors:\n"
                + self.block_report() + "\nUse fallback='diag_ggn' or leave them out via params=."
            )
        if any(b.kind == P.DIAGONAL for b in blocks):
            warnings.warn(
                P.summary("KFACOptimizer", blocks)
                + "; the diagonal ones use the damped GGN diagonal. opt.block_report() lists "
                "every parameter.",
                CurvatureChoiceWarning,
                stacklevel=3,
            )

    def block_report(self) -> str:
        """A table: each parameter's name, shape, block (Kronecker/diagonal) and why."""
        names = self._param_names()
        rows = [(names.get(id(p), "?"), tuple(p.shape), self._block_of(p)) for p in self._params()]
        head = (P.summary("KFACOptimizer", [b for _, _, b in rows])
                + f"; curvature {self._curvature_key()!r}, diagonal blocks from "
                + f"{self._diag_extension().savefield}")
        return head + "\n" + P.table(rows)

    def _params_added(self, params: list[Tensor]) -> None:
        if self.base_optimizer is not None:
            self.base_optimizer.add_param_group({"params": params, "lr": self.param_groups[-1]["lr"]})

    # ----------------------------------------------------------------------- schedule
    def _curvature_key(self) -> str:
        """The resolved curvature (``"auto"`` is ``"kfac"`` until the first loss call)."""
        if self.curvature != "auto":
            return self.curvature
        return "kflr" if self._columns is not None and self._exact_affordable() else "kfac"

    def _exact_affordable(self) -> bool:
        return self._columns is not None and self._columns <= AUTO_EXACT_MAX_COLUMNS

    def _curvature_extension(self) -> Extension:
        key = self._curvature_key()
        if key == "kfac":
            return KFAC(mc_samples=self.mc_samples)
        return KFLR() if key == "kflr" else KFRA()

    def _diag_extension(self) -> Extension:
        key = self._curvature_key()
        exact = key == "kflr" or (key == "kfra" and self._exact_affordable())
        return DiagGGNExact() if exact else DiagGGNMC(mc_samples=self.mc_samples)

    def _choose_curvature(self, output: Tensor) -> bool:
        if self._columns is not None or not isinstance(self.loss_fn, nn.Module):
            return False
        before = (self._curvature_extension(), self._diag_extension())
        self._columns = exact_columns(self.loss_fn, output, self._batch_size,
                                      bool(self._collector.coupled_layers))
        cols = f"{self._columns} loss-Hessian columns per sample"
        if self.curvature == "auto":
            key = self._curvature_key()
            warnings.warn(
                f"KFACOptimizer(curvature='auto'): {cols} -> {key!r} ("
                + ("exact" if key == "kflr" else f"Monte Carlo, {self.mc_samples} sample(s)")
                + f"; exact up to {AUTO_EXACT_MAX_COLUMNS} columns).",
                CurvatureChoiceWarning,
                stacklevel=2,
            )
        elif self.curvature == "kflr" and not self._exact_affordable():
            warnings.warn(
                f"KFACOptimizer(curvature='kflr'): {cols}, each sent back through the model "
                "(cost grows with them); curvature='kfac' samples instead.",
                CurvatureChoiceWarning,
                stacklevel=2,
            )
        return before != (self._curvature_extension(), self._diag_extension())

    def _decay(self, group: dict, steps: int | None = None) -> float:
        """The running averages' decay over ``steps`` steps (default: since the previous
        scheduled statistics, :math:`T_f` after the warm-up): the group's
        :math:`\\varepsilon` per :math:`T_f` steps, or (``None``) :data:`STEP_DECAY` per step.
        EKFAC's diagonal, re-estimated every step, decays by ``steps=1``."""
        decay, T = group["factor_decay"], self.factor_update_freq
        steps = self._steps_since_statistics(self._global_step + 1) if steps is None else steps
        if decay is None:
            return STEP_DECAY**steps
        return decay if steps == T else decay ** (steps / T)

    @property
    def _warmup(self) -> bool:
        return self.curvature_warmup and self.factor_update_freq > 3

    def _on_schedule(self, step: int, period: int) -> bool:
        """Steps :math:`1, 1 + T, \\dots`; with the warm-up :data:`WARMUP_STEPS`, then every
        ``period`` steps after the last of them."""
        if self._warmup:
            if step <= WARMUP_STEPS[-1]:
                return step in WARMUP_STEPS
            return (step - WARMUP_STEPS[-1]) % period == 0
        return (step - 1) % period == 0

    def _steps_since_statistics(self, step: int) -> int:
        """Steps since the previous scheduled statistics (the decay of this update)."""
        if self._warmup and step in WARMUP_STEPS[1:]:
            i = WARMUP_STEPS.index(step)
            return step - WARMUP_STEPS[i - 1]
        return self.factor_update_freq

    def _factor_due(self, step: int) -> bool:
        """Statistics on the schedule (:meth:`_on_schedule` with :math:`T_f`), and at the next
        step whenever a parameter with a gradient has no curvature yet (added, unfrozen, or
        moved to the diagonal), so that it is not left unmoved until the next scheduled
        update."""
        return self._on_schedule(step, self.factor_update_freq) or self._curvature_missing

    def _inverse_due(self, step: int) -> bool:
        return self._on_schedule(step, self.inverse_update_freq)

    def _kinds(self) -> dict[str, list[Tensor]]:
        out: dict[str, list[Tensor]] = {P.KRONECKER: [], P.DIAGONAL: []}
        for p in self._params():
            out[self._block_of(p).kind].append(p)
        return out

    def _extensions_for_step(self, step: int) -> tuple[Extension, ...]:
        # EKFAC re-estimates its diagonal on every step (George et al. 2018, Alg. 1)
        ekfac = self._ekfac_requests(step)
        if not self._factor_due(step):
            return ekfac
        kinds = self._kinds()
        exts = []
        if kinds[P.KRONECKER]:
            exts.append(self._curvature_extension())
            exts.extend(ekfac)
        if kinds[P.DIAGONAL]:
            exts.append(self._diag_extension())
        return tuple(exts)

    def _ekfac_requests(self, step: int) -> tuple[Extension, ...]:
        """EKFAC's requests for ``step``, and the Kronecker parameters each is for
        (``self._ekfac_split``, read by :meth:`_only`).

        A parameter with an eigenbasis gets :class:`~curvopt.quantities.KFESumGradSquared`
        in the basis it has before the step (computed in the engine, no per-sample
        gradients); on a step that recomputes the basis, that estimate is folded into the
        running average first and carried over to the new basis with it
        (:meth:`_update_scales` before :meth:`_update_inverses`): the batch is used in the
        basis it was measured in.  A parameter whose *first* basis is computed in the step
        has nothing to rotate into yet: it gets ``grad_batch``, projected into the new basis
        after the step computes it (George et al.'s Algorithm 1 order).
        """
        self._ekfac_split: dict[str, list[Tensor]] = {}
        if not self.eigen_correction:
            return ()
        kron = self._kinds()[P.KRONECKER]
        rotate = [p for p in kron if "eigenvectors" in self.state.get(p, ())]
        project = ([p for p in kron if "eigenvectors" not in self.state.get(p, ())]
                   if self._factor_due(step) else [])
        exts = []
        if project:
            exts.append(BatchGrad())
            self._ekfac_split[BatchGrad.savefield] = project
        if rotate:
            exts.append(self._kfe_request)
            self._ekfac_split[KFESumGradSquared.savefield] = rotate
        return tuple(exts)

    @property
    def _kfe_request(self) -> KFESumGradSquared:
        """One request per optimizer (the engine compares requests by identity); its bases
        are read from the state at the end of each backward, without keeping ``self``."""
        req = self.__dict__.get("_kfe_req")
        if req is None:
            req = self._kfe_req = KFESumGradSquared(bases=_weak_method(self, "_kfe_basis"))
        return req

    def _kfe_basis(self, p: Tensor):
        st = self.state.get(p)
        return None if st is None else st.get("eigenvectors")

    def _only(self, extensions):
        if not extensions:
            return None
        kinds = self._kinds()
        tracked = {e.savefield for e in self.track}
        only = {}
        for ext, kind in ((self._curvature_extension(), P.KRONECKER),
                          (self._diag_extension(), P.DIAGONAL)):
            if ext in extensions and ext.savefield not in tracked:
                only[ext.savefield] = kinds[kind]
        fields = {e.savefield for e in extensions}
        for field, params in getattr(self, "_ekfac_split", {}).items():
            if field in fields and field not in tracked:
                only[field] = params
        return only or None

    # --------------------------------------------------------------------------- step
    def _update(self, step, stats, loss, closure, tx: Transaction):
        """One K-FAC step, staged in ``tx``: the named steps below, in order."""
        self._check_closure(step, closure)
        blocks, missing = self._update_factors(step, stats, tx)
        with_grad = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        self._curvature_missing = bool(missing) or len(blocks) < len(
            [p for p in with_grad if id(p) not in self._warned_idle])
        if self.eigen_correction:  # measured in the basis the step starts with
            self._update_scales(stats, blocks, tx, KFESumGradSquared.savefield)
        self._update_inverses([(g, b) for g, _, b in blocks
                               if self._inverse_due(step) or not b.has_inverse])
        if self.eigen_correction:  # first bases: projected into them
            self._update_scales(stats, blocks, tx, "grad_batch")
        directions = self._precondition(blocks)
        self._demote(missing)
        if not directions:
            return self._nothing_moved("no curvature yet")
        nu = self._kl_clip(directions)
        adapt = self.adaptive_damping and step % self.damping_adaptation_interval == 0
        old = [p.detach().clone() for _, p, _ in directions] if adapt else None
        for _, p, _ in directions:
            tx.count_step(p)
        if self.base_optimizer is not None:
            tx.commit()
            self._base_step(directions, nu)
        else:
            self._momentum_and_decay(directions, nu, tx)
            tx.commit()
        if adapt:
            self._adapt_damping(directions, old, loss, closure)
        return None

    def _check_closure(self, step: int, closure) -> None:
        if (self.adaptive_damping and closure is None
                and step % self.damping_adaptation_interval == 0):
            raise ValueError("KFACOptimizer(adaptive_damping=True) needs step(closure)")

    def _kronecker_block(self, st: dict) -> KroneckerBlock:
        return EKFACBlock(st) if self.eigen_correction else KroneckerBlock(st, self.damping_mode)

    def _block(self, p: Tensor, st: dict):
        """The curvature block over ``st`` if it has statistics yet, else ``None``."""
        if self._block_of(p).kind == P.KRONECKER:
            return self._kronecker_block(st) if "factors" in st else None
        return DiagonalBlock(st) if "diag_avg" in st else None

    def _update_factors(self, step, stats, tx):
        """Factor update: running averages of the fresh statistics (on factor-update steps).

        Returns ``[(group, p, block)]`` of the parameters with curvature and the
        Kronecker parameters the engine gave no factors for.
        """
        due = self._factor_due(step)
        if due and stats is None:
            warnings.warn(
                "KFACOptimizer: no curvature statistics from a backward pass for this step "
                "(step() without a new backward?); reusing the running averages.",
                RuntimeWarning,
                stacklevel=5,
            )
        kron_key, diag_key = self._curvature_key(), self._diag_extension().savefield
        blocks, missing = [], []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = tx.param_state(p)
                if due and stats is not None:
                    res = stats.get(p, {})
                    if self._block_of(p).kind == P.KRONECKER:
                        if kron_key in res:
                            self._kronecker_block(st).update_factors(
                                res[kron_key], self._decay(group))
                        else:
                            missing.append(p)
                    elif diag_key in res:
                        DiagonalBlock(st).update_factors(res[diag_key], self._decay(group))
                blk = self._block(p, st)
                if blk is not None:
                    blocks.append((group, p, blk))
                elif (due and stats is not None and self._block_of(p).kind == P.DIAGONAL
                      and id(p) not in self._warned_idle):
                    self._warned_idle.add(id(p))
                    warnings.warn(
                        f"KFACOptimizer: no GGN diagonal for parameter "
                        f"'{self._param_names().get(id(p), '?')}' from the engine (is it "
                        "used outside its module?); it is not moved until there is one.",
                        RuntimeWarning, stacklevel=5)
        return blocks, missing

    def _update_inverses(self, todo) -> None:
        """Inverse update: recompute the caches of ``todo`` (``[(group, block)]``), sharded.

        In one process (or with ``shard_inverses=False``) every block is computed
        here.  Under ``torch.distributed`` each Kronecker block is computed by one
        rank, chosen by cost (:func:`curvopt.optim._distributed.assign_by_cost`), and
        broadcast; the caches are bit-identical on every rank.
        """
        kron = [(g, b) for g, b in todo if isinstance(b, KroneckerBlock)]
        world = D.world_size()
        if world == 1 or not self.shard_inverses or len(kron) < 2:
            for group, blk in todo:
                blk.update_inverse(group["damping"])
            return
        for group, blk in todo:
            if not isinstance(blk, KroneckerBlock):
                blk.update_inverse(group["damping"])
        owners = D.assign_by_cost([b.inverse_cost for _, b in kron], world)
        me = D.rank()
        tensors = []
        for (group, blk), owner in zip(kron, owners, strict=True):
            if owner == me:
                blk.update_inverse(group["damping"])
                tensors.append(blk.cache())
            else:
                tensors.append(blk.cache_buffers())
        received = D.broadcast_from_owners(tensors, owners, world)
        for (group, blk), owner, ts in zip(kron, owners, received, strict=True):
            blk.set_cache(ts, group["damping"], computed_here=owner == me)

    def _update_scales(self, stats, blocks, tx, source: str) -> None:
        """EKFAC: the eigenbasis diagonal re-estimated from this batch's per-sample gradients.

        On every step (George et al. 2018, Algorithm 1: the diagonal is cheap next to the
        eigendecomposition), :math:`\\hat s = z \\sum_n (Q_G^\\top g_n Q_A)^{\\odot2}`, then
        averaged into ``kfe_scale`` with the per-step decay.  :math:`\\sum_n (\\dots)^{\\odot2}`
        is the engine's ``kfe_sum_grad_squared`` where the basis was there before the
        backward (already the global batch's under ``torch.distributed``), else
        ``grad_batch`` projected here (:meth:`~curvopt.optim.kronecker.EKFACBlock.projected_sum`)
        and summed over ranks; :math:`z` is summed over ranks.  Neither is kept in the state
        (``grad_batch`` unless tracked).  ``source``: which of the two this call folds in
        (the engine's before the basis is recomputed, the projected ones after).
        """
        if stats is None:
            return
        kfe = KFESumGradSquared.savefield
        todo, local = [], []  # (group, block, value), indices of rank-local values
        for g, p, b in blocks:
            res = stats.get(p, {})
            if not isinstance(b, EKFACBlock) or "eigenvectors" not in b.state:
                continue
            if source == kfe and kfe in res:
                todo.append((g, b, res[kfe]))
            elif source == "grad_batch" and kfe not in res and "grad_batch" in res:
                local.append(len(todo))
                todo.append((g, b, b.projected_sum(res["grad_batch"])))
        if todo:
            values = [v for _, _, v in todo]
            z = self._batch_normalizer(values)
            if D.active():
                zs = [z] if isinstance(z, Tensor) else []
                reduced = D.allreduce_sum([values[i] for i in local] + zs)
                for i, v in zip(local, reduced, strict=False):
                    values[i] = v
                z = reduced[-1] if zs else z
            for (group, blk, _), value in zip(todo, values, strict=True):
                zz = z.to(value.device).reshape(()) if isinstance(z, Tensor) else z
                blk.update_scale(value, zz, self._decay(group, steps=1))
        if source == kfe:
            return  # the state entries are dropped after the second call
        tracked = any(e.savefield == "grad_batch" for e in self.track)
        for p, res in stats.items():
            if kfe in res:
                tx[p].pop(kfe, None)
            if "grad_batch" in res and not tracked:
                tx[p].pop("grad_batch", None)

    def _batch_normalizer(self, like: list[Tensor]) -> Tensor | float:
        """The loss normalizer :math:`z` of this rank's batch (float64 tensor ``[1]``), or 1.0
        for a ``'sum'`` loss."""
        z = self._normalizer()
        if not isinstance(z, Tensor):
            if getattr(self.loss_fn, "reduction", "mean") == "sum":
                return 1.0
            raise OptimizerError(
                "KFACOptimizer(eigen_correction=True): the loss module's normalizer was not "
                "seen in this step's forward pass (call it as loss_fn(output, target), with "
                "the target as a positional tensor)")
        return z.to(device=like[0].device, dtype=torch.float64).reshape(1)

    @staticmethod
    def _precondition(blocks):
        """Preconditioning: ``[(group, p, V)]``, V the damped inverse curvature times the gradient."""
        return [(group, p, blk.multiply(p.grad, group["damping"])) for group, p, blk in blocks]

    def _demote(self, missing: list[Tensor]) -> None:
        """Kronecker parameters without factors from the engine get the diagonal from now on."""
        if not missing:
            return
        names = self._param_names()
        for p in missing:
            blk = P.Block(P.DIAGONAL, P.NO_FACTORS, self._block_of(p).detail)
            self._demoted[id(p)] = self._blocks[id(p)] = blk
        warnings.warn(
            f"KFACOptimizer: no Kronecker factors for {[names.get(id(p), '?') for p in missing]}; "
            "they use the diagonal GGN from the next factor update on and are not moved before.",
            RuntimeWarning,
            stacklevel=5,
        )

    def _kl_clip(self, directions) -> float:
        """KL clipping: the factor ν ≤ 1 that bounds the step's approximate KL divergence."""
        if self.kl_clip is None:
            return 1.0
        # Σ η² ⟨V, ∇⟩ summed on the device per (lr, device): one sync per step on a GPU
        parts: dict = {}
        for g, p, V in directions:
            ip = torch.dot(V.reshape(-1), p.grad.reshape(-1))
            parts.setdefault((g["lr"], ip.device), []).append(ip)
        sums = [lr**2 * torch.stack(ips).double().sum() for (lr, _), ips in parts.items()]
        total = sums[0] if len(sums) == 1 else sum(float(t) for t in sums)
        return F.kl_clip_coefficient([(1.0, total)], self.kl_clip)

    @staticmethod
    def _momentum_and_decay(directions, nu: float, tx: Transaction) -> None:
        """Momentum, then the move with decoupled weight decay (staged in ``tx``); fused over
        the parameters that share a momentum (the per-parameter calls cost more than their
        arithmetic on small layers)."""
        Vs = [V for _, _, V in directions]
        ds = Vs if nu == 1.0 else list(torch._foreach_mul(Vs, nu))
        by_mu: dict = {}
        for i, (group, _, _) in enumerate(directions):
            if group["momentum"]:
                by_mu.setdefault(group["momentum"], []).append(i)
        for mu, idx in by_mu.items():
            states = [tx[directions[i][1]] for i in idx]
            new = F.momenta([st.get("momentum_buffer") for st in states],
                            [ds[i] for i in idx], mu)
            for i, st, b in zip(idx, states, new, strict=True):
                st["momentum_buffer"] = ds[i] = b
        for (group, p, _), d in zip(directions, ds, strict=True):
            tx.move(p, d, group["lr"], group["weight_decay"])

    def _base_step(self, directions, nu: float) -> None:
        """Base-optimizer branch: ``base_optimizer.step()`` on ν V as the gradient."""
        saved = []
        for _, p, V in directions:
            saved.append((p, p.grad))
            p.grad = V if nu == 1.0 else nu * V
        # parameters without curvature yet are not moved by the base optimizer either
        moved = {id(p) for _, p, _ in directions}
        hidden = []
        for g_self, g_base in zip(self.param_groups, self.base_optimizer.param_groups, strict=True):
            g_base["lr"] = g_self["lr"]
            for p in g_self["params"]:
                if p.grad is not None and id(p) not in moved:
                    hidden.append((p, p.grad))
                    p.grad = None
        try:
            self.base_optimizer.step()
        finally:
            for p, g in saved + hidden:
                p.grad = g

    def _adapt_damping(self, directions, old, loss, closure) -> None:
        """Adaptive damping: Levenberg-Marquardt update of every group's λ from the reduction ratio."""
        with torch.no_grad():
            model_change = 0.0
            for (group, p, _), p_old in zip(directions, old, strict=True):
                delta = p.detach() - p_old
                c_delta = self._block(p, self.state[p]).curvature_matvec(delta)
                model_change += float(torch.dot(p.grad.flatten(), delta.flatten()))
                model_change += 0.5 * float(torch.dot(delta.flatten(), c_delta.flatten()))
                model_change += 0.5 * group["damping"] * float(delta.pow(2).sum())
        grads = [(p, p.grad) for _, p, _ in directions]
        exts = self._collector.extensions
        self._collector.extensions = ()
        try:
            with torch.enable_grad():
                new_loss = closure()
        finally:
            self._collector.extensions = exts
            for p, g in grads:
                p.grad = g
        rho = (float(new_loss) - float(loss)) / model_change if model_change < 0 else float("nan")
        for group in self.param_groups:
            group["damping"] = F.lm_damping_update(
                group["damping"], rho, self.damping_adaptation_decay, self.min_damping
            )

    # --------------------------------------------------------------------- state dict
    def _extra_state(self) -> dict:
        index = {id(p): i for i, p in enumerate(self._params())}
        out: dict = {"diagonal_fallback": sorted(index[k] for k in self._demoted if k in index)}
        if self.base_optimizer is not None:
            out["base_optimizer"] = self.base_optimizer.state_dict()
        return out

    def _check_extra_state(self, extra: dict) -> str | None:
        n = len(self._params())
        if any(not 0 <= i < n for i in extra.get("diagonal_fallback", [])):
            return "its diagonal_fallback indices do not fit this optimizer's parameters"
        return None

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._curvature_missing = self._missing_in_state()  # the loaded state's, not before
        self._schedule()

    def _load_extra_state(self, extra: dict) -> None:
        if self.base_optimizer is not None and "base_optimizer" in extra:
            self.base_optimizer.load_state_dict(copy.deepcopy(extra["base_optimizer"]))
        params = self._params()
        self._demoted = {
            id(params[i]): P.Block(P.DIAGONAL, P.NO_FACTORS, self._block_of(params[i]).detail)
            for i in extra.get("diagonal_fallback", [])
        }
        self._engine_attached()
