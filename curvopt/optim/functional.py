"""Pure update rules of curvopt's optimizers.

Every function here is a small, side-effect-free piece of maths: it takes
tensors (and plain numbers) and returns new tensors, never modifying its
arguments.  The optimizer classes (:mod:`curvopt.optim.kfac`,
:mod:`~curvopt.optim.diag_ggn_adam`, :mod:`~curvopt.optim.variance_sgd`) are
thin adapters that schedule these functions and keep their state in
``optimizer.state[p]`` -- the optax / ``torch.optim`` split.

Composite rules follow the signature ``(grad, ..., state, hyperparameters) ->
(direction, new_state)``: ``state`` is a plain ``dict`` of the quantities the
rule carries from step to step and ``direction`` is what the parameter is
moved *against*: the optimizer applies :func:`apply_update_`
(:math:`\\theta \\leftarrow (1 - \\eta\\,\\omega)\\,\\theta - \\eta\\, d`).

Conventions: tensors keep the dtype of ``grad``; quantities whose
computation is numerically delicate (factor inverses and eigendecompositions)
are computed in float64 and returned in the dtype of their inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .._threads import SMALL_SIDE, one_thread

__all__ = [
    "ema",
    "bias_correction",
    "apply_update_",
    "apply_updates_",
    "momentum",
    "momenta",
    # Kronecker-factored curvature
    "kronecker_dims",
    "kronecker_matvec",
    "pi_dampings",
    "damped_inverse",
    "damped_inverses",
    "eigendecomposition",
    "precondition_inverses",
    "precondition_eigen",
    "kfe_carry_over",
    "precondition_kfe",
    "kfe_matvec",
    "eigenvalue_products",
    "precondition_diagonal",
    "kl_clip_coefficient",
    "lm_damping_update",
    # Adam with a curvature second moment
    "diag_ggn_adam",
    # M-SVAG
    "minibatch_gradient_variance",
    "msvag_rho",
    "msvag",
]


# =============================================================================== generic
def ema(average: Tensor | None, sample: Tensor, decay: float) -> Tensor:
    """Exponential moving average, initialised with the first sample.

    .. math:: a \\leftarrow \\varepsilon\\, a + (1 - \\varepsilon)\\, \\hat a,
              \\qquad a_1 = \\hat a_1 .

    Starting from the first estimate (not from zero) needs no bias
    correction; Martens & Grosse (2015) initialise K-FAC's factors the same way.

    Args:
        average: the running average, or ``None`` before the first sample.
        sample: the new estimate :math:`\\hat a` (same shape).
        decay: :math:`\\varepsilon \\in [0, 1)`.
    """
    if average is None:
        return sample.clone()
    return decay * average + (1.0 - decay) * sample


def bias_correction(decay: float, count: int) -> float:
    """:math:`1 - \\beta^t`: normaliser of a zero-initialised average after ``t`` updates."""
    return 1.0 - decay**count


def apply_update_(param: Tensor, direction: Tensor, lr: float, weight_decay: float = 0.0) -> Tensor:
    """Move ``param`` in place with *decoupled* weight decay (Loshchilov & Hutter 2019).

    .. math:: \\theta \\leftarrow (1 - \\eta\\,\\omega)\\,\\theta - \\eta\\, d
    """
    if weight_decay:
        param.mul_(1.0 - lr * weight_decay)
    return param.add_(direction, alpha=-lr)


def apply_updates_(params: Sequence[Tensor], directions: Sequence[Tensor], lr: float,
                   weight_decay: float = 0.0) -> None:
    """:func:`apply_update_` for a list of parameters sharing ``lr`` and ``weight_decay``
    (and device and dtype): fused ``torch._foreach`` kernels."""
    if weight_decay:
        torch._foreach_mul_(list(params), 1.0 - lr * weight_decay)
    torch._foreach_add_(list(params), list(directions), alpha=-lr)


def momentum(buffer: Tensor | None, direction: Tensor, mu: float) -> Tensor:
    """Heavy-ball momentum in ``torch.optim.SGD``'s form (no dampening).

    .. math:: b \\leftarrow \\mu\\, b + d, \\qquad b_1 = d
    """
    if buffer is None:
        return direction.clone()
    return torch.add(direction, buffer, alpha=mu)  # one kernel, a new tensor


def momenta(buffers: Sequence[Tensor | None], directions: Sequence[Tensor], mu: float
            ) -> list[Tensor]:
    """:func:`momentum` for many parameters: one fused ``torch._foreach_add`` per (device,
    dtype) group of existing buffers (new tensors; the buffers are not modified)."""
    out: list = [None] * len(directions)
    groups: dict = {}
    for i, (b, d) in enumerate(zip(buffers, directions, strict=True)):
        if b is None or b.dtype != d.dtype or b.device != d.device:
            out[i] = momentum(b, d, mu)
        else:
            groups.setdefault((d.device, d.dtype), []).append(i)
    for idx in groups.values():
        new = torch._foreach_add([directions[i] for i in idx], [buffers[i] for i in idx],
                                 alpha=mu)
        for i, t in zip(idx, new, strict=True):
            out[i] = t
    return out


# ================================================================ Kronecker-factored blocks
def _batch_and_sides(factors: Sequence[Tensor]) -> tuple[torch.Size, list[int]]:
    """The common leading (group) shape ``B`` and the sides ``d_i`` of ``[*B, d_i, d_i]`` factors."""
    for F in factors:
        if F.ndim < 2 or F.shape[-1] != F.shape[-2]:
            raise ValueError(
                f"Kronecker factor must be a square matrix, got shape {tuple(F.shape)}"
            )
    batch = factors[0].shape[:-2]
    if any(F.shape[:-2] != batch for F in factors):
        raise ValueError(
            "Kronecker factors of one parameter must share their leading (group) dimensions, "
            f"got shapes {[tuple(F.shape) for F in factors]}"
        )
    return batch, [F.shape[-1] for F in factors]


def kronecker_dims(shape: Sequence[int], factors: Sequence[Tensor]) -> list[int]:
    """Check that ``factors`` (square, row-major order) tile a parameter of ``shape``.

    A parameter :math:`W` with factors :math:`[F_1, \\dots, F_k]` of sizes
    :math:`d_1, \\dots, d_k` is viewed as ``[d_1, ..., d_k]`` and its
    curvature block is :math:`F_1 \\otimes \\dots \\otimes F_k` acting on
    ``vec(W)`` (row-major, so a Linear weight ``[out, in]`` has ``[G, A]``).

    Factors may carry common leading *group* dimensions ``B`` (``[*B, d_i, d_i]``):
    the block is then block-diagonal, one Kronecker product per group, and the
    parameter is viewed as ``[*B, d_1, ..., d_k]`` (a grouped convolution's weight
    ``[C_out, C_in/g, k…]`` with ``G: [g, C_out/g, C_out/g]``,
    ``A: [g, (C_in/g)·k…, (C_in/g)·k…]`` is viewed as ``[g, C_out/g, (C_in/g)·k…]``).

    Returns:
        the view shape ``[*B, d_1, ..., d_k]``.

    Raises:
        ValueError: if a factor is not square, the group dimensions differ, or the sizes
            do not multiply to ``numel``.
    """
    batch, dims = _batch_and_sides(factors)
    numel = math.prod(shape)
    if math.prod(batch) * math.prod(dims) != numel:
        raise ValueError(
            f"Kronecker factors of sizes {[*batch, *dims]} do not match a parameter of shape "
            f"{tuple(shape)} ({numel} entries)"
        )
    return [*batch, *dims]


def _mode_product(mats: Sequence[Tensor], t: Tensor) -> Tensor:
    """Apply ``mats[i]`` along axis ``i`` of the trailing ``k`` axes of ``t``.

    That is :math:`(M_1 \\otimes \\dots \\otimes M_k)\\,\\mathrm{vec}(t)` (row-major
    ``vec``) for every leading group index; ``mats[i]``: ``[*B, d_i, d_i]``, ``t``:
    ``[*B, d_1, ..., d_k]``.
    """
    k = len(mats)
    if k == 1:
        M = mats[0]
        return M @ t if t.dim() == 1 else (M @ t.unsqueeze(-1)).squeeze(-1)
    if k == 2:
        # M_1 T M_2^T ; factors are symmetric in every use here but keep the general form.
        return mats[0] @ t @ mats[1].mT
    nb = t.dim() - k
    for i, M in enumerate(mats):
        # axis i last: t @ M^T with M broadcast over the other k-2 axes of each group
        Mb = M.reshape(*M.shape[:-2], *([1] * (k - 2)), *M.shape[-2:])
        t = (t.movedim(nb + i, -1) @ Mb.mT).movedim(-1, nb + i)
    return t


def kronecker_matvec(factors: Sequence[Tensor], v: Tensor) -> Tensor:
    """:math:`(F_1 \\otimes \\dots \\otimes F_k)\\,\\mathrm{vec}(v)`, returned in ``v``'s shape.

    Args:
        factors: square matrices ``[*B, d_i, d_i]`` (``B``: optional group dimensions).
        v: tensor with ``numel == prod(B) * prod(d_i)``.
    """
    view = kronecker_dims(v.shape, factors)
    return _mode_product(factors, v.reshape(view)).reshape(v.shape)


def pi_dampings(factors: Sequence[Tensor], damping: float) -> list:
    """Per-factor Tikhonov terms with the π correction (Martens & Grosse 2015, §6.3).

    For two factors :math:`[G, A]` (row-major order):

    .. math:: \\pi = \\sqrt{\\frac{\\operatorname{tr}(A)/d_A}{\\operatorname{tr}(G)/d_G}},\\qquad
              A + \\pi\\sqrt{\\lambda}\\, I,\\qquad G + \\frac{\\sqrt{\\lambda}}{\\pi}\\, I .

    The product of the two terms is :math:`\\lambda`, and π balances them by
    the factors' average eigenvalues.  For :math:`k` factors the same rule
    reads :math:`\\delta_i = \\lambda^{1/k}\\, t_i / (\\prod_j t_j)^{1/k}` with
    :math:`t_i = \\operatorname{tr}(F_i)/d_i` (one factor: :math:`\\lambda`).
    A factor with zero or non-finite trace (a dead layer) makes every
    :math:`\\pi = 1`, never a division by zero.  Factors with group dimensions
    ``[*B, d, d]`` get one π per group.

    Returns:
        ``[delta_1, ..., delta_k]``: Python floats, or float64 tensors ``[*B]`` for
        grouped factors.
    """
    k = len(factors)
    if k == 1:
        return [float(damping)]
    base = damping ** (1.0 / k)
    t = torch.stack([
        torch.diagonal(F, dim1=-2, dim2=-1).to(torch.float64).sum(-1) / F.shape[-1]
        for F in factors
    ])  # [k, *B]
    bad = (~torch.isfinite(t) | (t <= 0.0)).any(0)
    log_t = torch.where(bad, 1.0, t).log()
    deltas = torch.where(bad, base, base * torch.exp(log_t - log_t.mean(0)))
    if deltas.dim() == 1:
        return [float(d) for d in deltas]
    return list(deltas)


def _lapack(F: Tensor):
    """A factorization of ``F`` on one CPU thread when its side is small
    (:data:`curvopt._threads.SMALL_SIDE`: the thread hand-offs cost more than the work)."""
    return one_thread(F.device.type == "cpu" and F.shape[-1] <= SMALL_SIDE)


def _symmetric64(F: Tensor) -> Tensor:
    F = F.to(torch.float64)
    return 0.5 * (F + F.mT)


def damped_inverse(F: Tensor, delta) -> Tensor:
    """:math:`(F + \\delta I)^{-1}` computed in float64, returned in ``F``'s dtype.

    Cholesky first (fast); if the factorisation fails (an indefinite or
    badly scaled estimate) the inverse is taken in the eigenbasis with
    eigenvalues clamped at zero, :math:`Q\\,\\mathrm{diag}(1/(\\max(d, 0) + \\delta))\\,Q^\\top`,
    which is finite for every :math:`\\delta > 0`.

    Args:
        F: symmetric positive semi-definite ``[*B, d, d]`` (``B``: optional group dimensions,
            each group inverted on its own).
        delta: Tikhonov term, positive: a number or a tensor ``[*B]`` (one per group).
    """
    # Cholesky reads the lower triangle only: no symmetrization needed (round-off asymmetry
    # of a float32 estimate is below float32's resolution)
    M = F.to(torch.float64, copy=True)
    delta = torch.as_tensor(delta, dtype=torch.float64, device=M.device)
    if not bool((delta > 0.0).all()):
        raise ValueError(f"damping must be positive to invert a curvature factor, got {delta}")
    delta = delta.reshape(*delta.shape, 1)  # [*B, 1]: one δ per matrix
    M.diagonal(dim1=-2, dim2=-1).add_(delta)
    with _lapack(M):
        L, info = torch.linalg.cholesky_ex(M)
        inv = torch.cholesky_inverse(L)
    # an SPD inverse's largest entries sit on its diagonal (|m_ij| <= sqrt(m_ii m_jj)):
    # checking the diagonal finds any overflow
    ok = (info == 0) & torch.isfinite(inv.diagonal(dim1=-2, dim2=-1)).all(-1)
    if bool(ok.all()):
        return inv.to(F.dtype)
    with _lapack(M):
        d, Q = torch.linalg.eigh(_symmetric64(F))
    fallback = (Q / (d.clamp_min(0.0) + delta).unsqueeze(-2)) @ Q.mT
    return torch.where(ok[..., None, None], inv, fallback).to(F.dtype)


def damped_inverses(factors: Sequence[Tensor], damping: float) -> list[Tensor]:
    """π-damped inverses :math:`[(F_i + \\delta_i I)^{-1}]` (:func:`pi_dampings`)."""
    deltas = pi_dampings(factors, damping)
    return [damped_inverse(F, delta) for F, delta in zip(factors, deltas, strict=True)]


def eigendecomposition(factors: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """Eigenbases of the factors, :math:`F_i = Q_i\\,\\mathrm{diag}(d_i)\\,Q_i^\\top`, in float64.

    Eigenvalues are clamped at zero (round-off can make a PSD estimate's
    smallest eigenvalues slightly negative).  Returned in the factors' dtype.

    Returns:
        ``(eigenvectors, eigenvalues)``: lists of ``[*B, d_i, d_i]`` and ``[*B, d_i]``.
    """
    Qs, ds = [], []
    for F in factors:
        with _lapack(F):
            d, Q = torch.linalg.eigh(_symmetric64(F))
        Qs.append(Q.to(F.dtype))
        ds.append(d.clamp_min(0.0).to(F.dtype))
    return Qs, ds


def precondition_inverses(grad: Tensor, inverses: Sequence[Tensor]) -> Tensor:
    """K-FAC direction with cached damped inverses (row-major ``[G, A]``).

    .. math:: V = (G + \\tfrac{\\sqrt\\lambda}{\\pi} I)^{-1}\\, \\nabla_W\\,
              (A + \\pi\\sqrt\\lambda I)^{-1}

    Args:
        grad: the parameter's gradient, any shape with ``numel == prod(B) * prod(d_i)``.
        inverses: ``[*B, d_i, d_i]`` matrices, e.g. from :func:`damped_inverses`.

    Returns:
        :math:`V`, shape and dtype of ``grad``.
    """
    mats = [M.to(grad.dtype) for M in inverses]
    view = kronecker_dims(grad.shape, mats)
    return _mode_product(mats, grad.reshape(view)).reshape(grad.shape)


def precondition_eigen(
    grad: Tensor, eigenvectors: Sequence[Tensor], eigenvalues: Sequence[Tensor], damping: float
) -> Tensor:
    """K-FAC direction with exact damping in the Kronecker eigenbasis.

    .. math:: V = Q_G\\Big[\\big(Q_G^\\top \\nabla_W\\, Q_A\\big) \\oslash
              \\big(d_G d_A^\\top + \\lambda\\big)\\Big] Q_A^\\top
              = \\big(G \\otimes A + \\lambda I\\big)^{-1} \\mathrm{vec}(\\nabla_W)

    (George et al. 2018 use the same basis for EKFAC.)  Generalises to
    :math:`k` factors with the outer product of all eigenvalue vectors, and to
    grouped factors (one product per group).

    Args:
        grad: gradient with ``numel == prod(B) * prod(d_i)``.
        eigenvectors, eigenvalues: from :func:`eigendecomposition`.
        damping: :math:`\\lambda > 0`.
    """
    scale = eigenvalue_products(eigenvalues, grad.dtype)
    return _in_eigenbasis(grad, eigenvectors, lambda t: t / (scale + damping))


def eigenvalue_products(eigenvalues: Sequence[Tensor], dtype=None) -> Tensor:
    """:math:`d_1 \\circ d_2 \\circ \\dots` (outer product per group), ``[*B, d_1, ..., d_k]``:
    the eigenvalues of :math:`F_1 \\otimes \\dots`, K-FAC's diagonal in its eigenbasis."""
    dtype = dtype or eigenvalues[0].dtype
    out = eigenvalues[0].to(dtype)
    for j, d in enumerate(eigenvalues[1:], 1):
        out = out.unsqueeze(-1) * d.to(dtype).reshape(*d.shape[:-1], *([1] * j), d.shape[-1])
    return out


def _in_eigenbasis(v: Tensor, eigenvectors: Sequence[Tensor], fn) -> Tensor:
    """:math:`Q\\, \\mathrm{fn}(Q^\\top v)` with :math:`Q = Q_1 \\otimes \\dots` (row-major
    ``vec``); ``fn`` acts on ``[*B, d_1, ..., d_k]``.  Returned in ``v``'s shape and dtype."""
    Qs = [Q.to(v.dtype) for Q in eigenvectors]
    view = kronecker_dims(v.shape, Qs)
    t = fn(_mode_product([Q.mT for Q in Qs], v.reshape(view)))
    return _mode_product(Qs, t).reshape(v.shape)


# ------------------------------------------------------------------------------ EKFAC
def kfe_carry_over(scale: Tensor, old: Sequence[Tensor], new: Sequence[Tensor]) -> Tensor:
    """A KFE diagonal moved to a new eigenbasis: the diagonal of the same curvature there.

    The old estimate is the matrix :math:`C = Q\\,\\mathrm{diag}(s)\\,Q^\\top` with
    :math:`Q = Q_1 \\otimes \\dots`; its diagonal in the new basis :math:`Q'` is
    :math:`\\mathrm{diag}(Q'^\\top C Q') = (P_1^{\\odot2} \\otimes \\dots)\\, s` with
    :math:`P_i = Q_i'^\\top Q_i`: elementwise squares of the rotations between the bases.
    (Identity when the basis did not change; a running average of :math:`s`
    continues from it instead of restarting at a single batch.)

    Args:
        scale: :math:`s`, ``[*B, d_1, ..., d_k]``.
        old, new: the eigenvectors :math:`[Q_i]` and :math:`[Q_i']`.
    """
    P2 = []
    for Qo, Qn in zip(old, new, strict=True):
        P = Qn.mT.to(torch.float64) @ Qo.to(torch.float64)
        P2.append((P * P).to(scale.dtype))
    return _mode_product(P2, scale)


def precondition_kfe(grad: Tensor, eigenvectors: Sequence[Tensor], scale: Tensor,
                     damping: float) -> Tensor:
    """EKFAC direction: exact damping of the diagonal ``scale`` in the Kronecker eigenbasis.

    .. math:: V = Q_G\\Big[\\big(Q_G^\\top \\nabla_W\\, Q_A\\big) \\oslash
              (s + \\lambda)\\Big] Q_A^\\top

    (George et al. 2018, Algorithm 1; :func:`precondition_eigen` with
    :math:`s = d_G d_A^\\top` is K-FAC's).  ``scale`` is clamped at zero.

    Args:
        grad: gradient with ``numel == prod(B) * prod(d_i)``.
        eigenvectors: :math:`[Q_i]`, ``[*B, d_i, d_i]``.
        scale: :math:`s`, ``[*B, d_1, ..., d_k]`` (e.g. the engine's ``kfe_sum_grad_squared``).
        damping: :math:`\\lambda > 0`.
    """
    return _in_eigenbasis(
        grad, eigenvectors, lambda t: t / (scale.to(t.dtype).reshape(t.shape).clamp_min(0.0)
                                           + damping))


def kfe_matvec(v: Tensor, eigenvectors: Sequence[Tensor], scale: Tensor) -> Tensor:
    """:math:`Q\\,\\mathrm{diag}(s)\\,Q^\\top v`: the EKFAC curvature times ``v``."""
    return _in_eigenbasis(
        v, eigenvectors, lambda t: t * scale.to(t.dtype).reshape(t.shape).clamp_min(0.0))


def precondition_diagonal(grad: Tensor, diagonal: Tensor, damping: float) -> Tensor:
    """Damped diagonal preconditioning, :math:`\\nabla \\oslash (\\max(h, 0) + \\lambda)`.

    curvopt's K-FAC fallback for parameters without Kronecker factors
    (``h`` = running average of the GGN diagonal).
    """
    return grad / (diagonal.clamp_min(0.0) + damping)


def kl_clip_coefficient(
    inner_products: Sequence[tuple[float, Tensor | float]], kl_clip: float
) -> float:
    """KL clipping of the natural-gradient step (Ba, Grosse & Martens 2017, §5).

    .. math:: \\nu = \\min\\Big(1, \\sqrt{\\frac{\\kappa}
              {\\sum_l \\eta_l^2\\, \\langle V_l, \\nabla_{W_l}\\rangle}}\\Big)

    :math:`\\sum_l \\eta_l^2 \\langle V_l, \\nabla_{W_l}\\rangle` is the
    (approximate) KL divergence between the model's predictive distributions
    before and after the step :math:`-\\eta V`; the step is scaled by
    :math:`\\nu` so that it never exceeds :math:`\\kappa`.

    Args:
        inner_products: pairs ``(lr_l, <V_l, grad_l>)`` over all layers.
        kl_clip: :math:`\\kappa > 0`.

    Returns:
        :math:`\\nu \\in (0, 1]`; 1 if the sum is not positive or not finite.
    """
    total = sum(float(lr) ** 2 * float(ip) for lr, ip in inner_products)
    if not math.isfinite(total) or total <= 0.0:
        return 1.0
    return min(1.0, math.sqrt(kl_clip / total))


def lm_damping_update(
    damping: float, rho: float, decay: float, min_damping: float = 1e-8, max_damping: float = 1e8
) -> float:
    """Levenberg-Marquardt adaptation of the damping (Martens & Grosse 2015, §6.5; kfac-jax).

    .. math:: \\rho = \\frac{h(\\theta + \\delta) - h(\\theta)}{M(\\delta)},\\quad
              \\lambda \\leftarrow \\begin{cases} \\omega\\lambda & \\rho > 3/4\\\\
              \\lambda/\\omega & \\rho < 1/4\\\\ \\lambda & \\text{otherwise}\\end{cases}

    with :math:`\\omega = ` ``decay`` :math:`< 1`, and
    :math:`M(\\delta) = \\nabla h^\\top\\delta + \\tfrac12 \\delta^\\top (C + \\lambda I)\\delta`
    the quadratic model.  A non-finite ``rho`` counts as a failure (λ grows).
    """
    if not math.isfinite(rho) or rho < 0.25:
        damping = damping / decay
    elif rho > 0.75:
        damping = damping * decay
    return min(max(damping, min_damping), max_damping)


# ============================================================ Adam with a curvature moment
def diag_ggn_adam(
    grad: Tensor,
    curvature: Tensor | None,
    state: dict,
    *,
    beta1: float,
    beta2: float,
    damping: float,
    power: float,
    clip: float | None = None,
    clip_eps: float = 1e-12,
) -> tuple[Tensor, dict]:
    """Adam whose second moment is a running average of a curvature diagonal.

    With :math:`t` the step count and :math:`k` the number of curvature
    refreshes so far:

    .. math::
        m_t &= \\beta_1 m_{t-1} + (1 - \\beta_1)\\, g_t,
            & \\hat m_t &= m_t / (1 - \\beta_1^t) \\\\
        h_k &= \\beta_2 h_{k-1} + (1 - \\beta_2)\\, \\hat h
            \\quad\\text{(only when a new } \\hat h \\text{ arrives)},
            & \\bar h_k &= h_k / (1 - \\beta_2^k) \\\\
        d &= \\hat m_t \\oslash (\\bar h_k + \\lambda)^{p}

    :math:`\\hat h` is the GGN diagonal (exact or Monte Carlo).  ``power``
    :math:`p = 1/2` is Adam's square root (with the damping inside it),
    :math:`p = 1` a damped diagonal Gauss-Newton step.  With ``clip``
    :math:`= \\gamma` the step is clipped elementwise as in Sophia
    (Liu et al. 2023, Alg. 3):

    .. math:: d = \\operatorname{clip}\\big(\\hat m_t \\oslash
              \\max(\\gamma (\\bar h_k + \\lambda)^p, \\epsilon), 1\\big)

    (Sophia proper: :math:`p = 1`, :math:`\\lambda = 0`.)

    Args:
        grad: the gradient :math:`g_t`.
        curvature: a fresh estimate :math:`\\hat h` (``grad``'s shape) or ``None``
            on steps that do not refresh the curvature.
        state: ``{"exp_avg", "exp_avg_curv", "step", "curv_step"}`` (empty dict
            before the first step; counts are ints).
        beta1, beta2, damping, power, clip, clip_eps: as above.

    Returns:
        ``(d, new_state)``.
    """
    t = state.get("step", 0) + 1
    m = state.get("exp_avg")
    m = (1.0 - beta1) * grad if m is None else beta1 * m + (1.0 - beta1) * grad
    k = state.get("curv_step", 0)
    h = state.get("exp_avg_curv")
    if curvature is not None:
        k += 1
        curvature = curvature.clamp_min(0.0)
        h = (1.0 - beta2) * curvature if h is None else beta2 * h + (1.0 - beta2) * curvature
    if h is None:
        raise ValueError("diag_ggn_adam: no curvature estimate yet (pass one on the first step)")
    m_hat = m / bias_correction(beta1, t)
    h_hat = h / bias_correction(beta2, k)
    denom = (h_hat + damping) ** power
    if clip is None:
        d = m_hat / denom
    else:
        d = (m_hat / (clip * denom).clamp_min(clip_eps)).clamp(-1.0, 1.0)
    return d, {"exp_avg": m, "exp_avg_curv": h, "step": t, "curv_step": k}


# ==================================================================================== M-SVAG
def minibatch_gradient_variance(variance: Tensor, batch_size: int) -> Tensor:
    """Variance of the mini-batch gradient from curvopt's ``variance`` field.

    The gradient is a sum of the per-sample terms :math:`x_n = f\\,\\nabla\\ell_n`
    (``grad_batch``), whose population variance is ``variance``
    :math:`= \\tfrac1N\\sum_n x_n^2 - (\\tfrac1N\\sum_n x_n)^2`.  For i.i.d.
    samples the unbiased variance of the gradient :math:`\\sum_n x_n` is

    .. math:: \\sigma^2 = N\\cdot\\frac{N}{N-1}\\,\\texttt{variance}
              = \\frac{N^2}{N-1}\\,\\texttt{variance}

    for ``reduction='mean'`` and ``'sum'`` alike.  With :math:`N = 1` there is
    no estimate; zero is returned (the optimizer then behaves as momentum SGD).
    """
    if batch_size < 2:
        return torch.zeros_like(variance)
    return variance.clamp_min(0.0) * (batch_size**2 / (batch_size - 1))


def msvag_rho(beta: float, t: int) -> float:
    """The variance factor of the bias-corrected momentum average.

    :math:`\\rho_t = \\frac{(1-\\beta)^2 (1 - \\beta^{2t})}{(1-\\beta^t)^2 (1 - \\beta^2)}`, so
    that :math:`\\operatorname{Var}(\\hat m_t) = \\rho_t \\sigma^2` for i.i.d. gradients of
    variance :math:`\\sigma^2`.
    """
    if beta == 0.0:
        return 1.0
    return (1 - beta) ** 2 * (1 - beta ** (2 * t)) / ((1 - beta**t) ** 2 * (1 - beta**2))


def msvag(
    grad: Tensor,
    grad_variance: Tensor | None,
    state: dict,
    *,
    beta: float,
    variance: str = "batch",
) -> tuple[Tensor, dict]:
    """M-SVAG: momentum SGD with variance adaptation (Balles & Hennig 2018, "Dissecting Adam").

    .. math::
        m_t &= \\beta m_{t-1} + (1-\\beta) g_t, \\qquad \\hat m_t = m_t/(1-\\beta^t)\\\\
        s_t &\\approx \\operatorname{Var}(\\hat m_t)\\\\
        \\gamma_t &= \\frac{\\hat m_t^2}{\\hat m_t^2 + s_t} \\in [0, 1],
            \\qquad d = \\gamma_t \\odot \\hat m_t

    :math:`\\gamma` is the variance-adapted factor that minimises the expected
    squared distance of :math:`\\gamma \\hat m` to the true gradient.  Two
    estimates of :math:`s_t`:

    * ``variance="batch"`` (curvopt's default): from the variance
      :math:`\\sigma_i^2` of each step's mini-batch gradient, measured inside
      the batch (:func:`minibatch_gradient_variance`).  Since :math:`\\hat m_t`
      is a weighted sum of independent mini-batch gradients with weights
      :math:`w_i = (1-\\beta)\\beta^{t-i}/(1-\\beta^t)`,

      .. math:: u_t = \\beta^2 u_{t-1} + (1-\\beta)^2 \\sigma_t^2, \\qquad
                s_t = \\sum_i w_i^2 \\sigma_i^2 = u_t / (1-\\beta^t)^2

      which is exact under independence, also when the variance changes over
      training (for a constant :math:`\\sigma^2` it equals :math:`\\rho_t\\sigma^2`).
    * ``variance="ema"`` (the paper's): from running averages only,
      :math:`v_t = \\beta v_{t-1} + (1-\\beta) g_t^2`, :math:`\\hat v_t = v_t/(1-\\beta^t)`,
      :math:`\\sigma^2 = \\max(\\hat v_t - \\hat m_t^2, 0)/(1 - \\rho_t)` (0 at :math:`t=1`),
      :math:`s_t = \\rho_t \\sigma^2` with :func:`msvag_rho`.

    Where :math:`\\hat m_t^2 + s_t = 0` the factor is 1.

    Args:
        grad: :math:`g_t`.
        grad_variance: :math:`\\sigma_t^2` (``"batch"`` mode; ignored by ``"ema"``).
        state: ``{"exp_avg", "var_avg" | "exp_avg_sq", "step"}`` (empty before step 1).
        beta: :math:`\\beta \\in [0, 1)`.
        variance: ``"batch"`` or ``"ema"``.

    Returns:
        ``(d, new_state)``; ``new_state["gamma"]`` holds :math:`\\gamma_t`.
    """
    t = state.get("step", 0) + 1
    m = state.get("exp_avg")
    m = (1.0 - beta) * grad if m is None else beta * m + (1.0 - beta) * grad
    corr = bias_correction(beta, t) if beta > 0 else 1.0
    m_hat = m / corr
    new = {"exp_avg": m, "step": t}
    if variance == "batch":
        if grad_variance is None:
            raise ValueError("msvag(variance='batch') needs the mini-batch gradient variance")
        u = state.get("var_avg")
        contrib = (1.0 - beta) ** 2 * grad_variance
        u = contrib if u is None else beta**2 * u + contrib
        s = u / corr**2
        new["var_avg"] = u
    elif variance == "ema":
        v = state.get("exp_avg_sq")
        g2 = grad * grad
        v = (1.0 - beta) * g2 if v is None else beta * v + (1.0 - beta) * g2
        new["exp_avg_sq"] = v
        rho = msvag_rho(beta, t)
        if rho >= 1.0:
            s = torch.zeros_like(m_hat)
        else:
            sigma2 = (v / corr - m_hat * m_hat).clamp_min(0.0) / (1.0 - rho)
            s = rho * sigma2
    else:
        raise ValueError(f"variance must be 'batch' or 'ema', got {variance!r}")
    m2 = m_hat * m_hat
    denom = m2 + s
    gamma = torch.where(denom > 0, m2 / torch.where(denom > 0, denom, 1.0), 1.0)
    new["gamma"] = gamma
    return gamma * m_hat, new
