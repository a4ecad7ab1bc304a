"""Loss functions: symmetric square roots of their Hessians, and MC samples of them.

For a loss :math:`\\mathcal L = f\\sum_n \\ell(o_n, y_n)` (``f`` the mean
normalizer) the GGN is :math:`\\sum_n J_n^\\top (f H_n) J_n`.  Here we build,
for the model output ``o``, a batch of ``K`` column tensors ``s_k`` shaped
like ``o`` such that :math:`\\sum_k s_{k,n} s_{k,n}^\\top = f H_n` for every
sample (exact), or whose outer products do so in expectation (MC).  Autograd
carries each column back to every layer.

Supported: ``CrossEntropyLoss`` (``[N, C]`` or ``[N, C, d…]``, class weights,
``ignore_index``, ``label_smoothing`` without weights, probability targets),
``NLLLoss`` after a ``log_softmax`` (the GGN is taken at the logits, as for
cross-entropy), ``MSELoss`` (any shape), ``BCEWithLogitsLoss`` (``weight``,
``pos_weight`` for the exact Hessian).  ``reduction='none'`` has no single
curvature and is refused.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .errors import UnsupportedLossError

SUPPORTED = (nn.CrossEntropyLoss, nn.NLLLoss, nn.MSELoss, nn.BCEWithLogitsLoss)


def check_loss(loss_fn, what: str) -> None:
    """Refuse a loss that cannot give ``what`` (a quantity name), with a reason."""
    if not isinstance(loss_fn, SUPPORTED):
        raise UnsupportedLossError(
            f"{what} needs the Hessian of the loss; {type(loss_fn).__name__} is not supported. "
            f"Supported losses: {', '.join(t.__name__ for t in SUPPORTED)}."
        )
    if loss_fn.reduction not in ("mean", "sum"):
        raise UnsupportedLossError(
            f"{type(loss_fn).__name__}(reduction={loss_fn.reduction!r}): the curvature of an "
            "unreduced loss is not one matrix. Use reduction='mean' or 'sum' (and scale "
            "afterwards if you need per-sample losses)."
        )


def mean_normalizer(loss_fn, o: Tensor, y: Tensor) -> Tensor:
    """The denominator of a ``'mean'`` reduction on this batch (a 0-dim tensor).

    Element count for MSE/BCE and unweighted cross-entropy; the summed class weights
    of the non-ignored targets for weighted cross-entropy or with ``ignore_index``
    (torch's own normalizer).  Used to combine ranks under torch.distributed.
    """
    o = o.detach()
    if isinstance(loss_fn, (nn.CrossEntropyLoss, nn.NLLLoss)) and not y.is_floating_point():
        valid = y != loss_fn.ignore_index
        w = valid.to(o.dtype)
        if loss_fn.weight is not None:
            w = w * loss_fn.weight.to(o.dtype)[torch.where(valid, y, torch.zeros_like(y))]
        return w.sum()
    if isinstance(loss_fn, (nn.CrossEntropyLoss, nn.NLLLoss)):
        return o.new_tensor(o.numel() // o.shape[1])
    return o.new_tensor(o.numel())


# ---------------------------------------------------------------------- categorical
def _categorical_setup(loss_fn, o: Tensor, y: Tensor):
    """Probabilities ``p`` (``[N, C, d…]``) and per-position weights ``ω`` (``[N, d…]``).

    ``ω`` carries the class weight of the target, zero for ignored targets, and the
    mean normalizer, so that the Hessian at one position is ``ω (diag p − p pᵀ)``.
    """
    if isinstance(loss_fn, nn.NLLLoss):
        node = type(o.grad_fn).__name__ if o.grad_fn is not None else ""
        if "LogSoftmax" not in node:
            raise UnsupportedLossError(
                "NLLLoss is linear in its input, so its curvature is taken at the logits of a "
                "preceding log_softmax (as for CrossEntropyLoss). Its input here was produced "
                f"by {node or 'a leaf'}, not log_softmax: use nn.LogSoftmax(dim=1) before "
                "NLLLoss, or CrossEntropyLoss on the logits."
            )
        p = o.detach().exp()
    else:
        p = torch.softmax(o.detach(), dim=1)
    weight = loss_fn.weight
    smoothing = getattr(loss_fn, "label_smoothing", 0.0)
    if y.is_floating_point():  # probability targets
        if weight is not None:
            raise UnsupportedLossError(
                "CrossEntropyLoss with class weights and probability targets is not supported."
            )
        omega = y.detach().sum(1)
        norm = omega.new_tensor(o.numel() // o.shape[1])
    else:
        if smoothing and weight is not None:
            raise UnsupportedLossError(
                "CrossEntropyLoss with both label_smoothing and class weights: torch's "
                "normalization of that combination is not reproduced by curvopt; drop one."
            )
        valid = y != loss_fn.ignore_index
        safe_y = torch.where(valid, y, torch.zeros_like(y))
        omega = valid.to(p.dtype)
        if weight is not None:
            omega = omega * weight.to(p.dtype)[safe_y]
        norm = omega.sum()
    if loss_fn.reduction == "mean":
        omega = omega / norm
    return p, omega


def _onehot_columns(o: Tensor) -> Tensor:
    """``[D, *o.shape]``: column k is 1 at per-sample element k of every sample."""
    N = o.shape[0]
    D = o[0].numel()
    eye = torch.eye(D, dtype=o.dtype, device=o.device)
    return eye.unsqueeze(1).expand(D, N, D).reshape(D, *o.shape)


def _softmax_sqrt(p: Tensor) -> Tensor:
    """``C−1`` columns ``[C-1, M, C]`` with :math:`\\sum_i s_i s_i^\\top = \\operatorname{diag}(p) - pp^\\top`.

    The softmax Hessian :math:`D(I - qq^\\top)D` (:math:`q = \\sqrt p`, :math:`D = \\operatorname{diag} q`)
    has rank ``C−1``. The Householder reflection :math:`P = I - 2vv^\\top/v^\\top v`,
    :math:`v = q - e_j`, maps :math:`e_j` to :math:`q`, so its other columns are an
    orthonormal basis of :math:`q^\\perp`: :math:`s_i = D P e_i`, :math:`i \\ne j`. Taking
    ``j = argmin p`` keeps :math:`v^\\top v = 2 - 2q_j \\ge 2 - 2/\\sqrt C` away from 0.
    One column fewer than :math:`D - pq^\\top` means one backward pass fewer.
    """
    M, C = p.shape
    q = p.sqrt()
    j = p.argmin(1)
    v = q.clone()
    v[torch.arange(M, device=p.device), j] -= 1.0
    P = torch.eye(C, dtype=p.dtype, device=p.device) - 2 * v[:, :, None] * v[:, None, :] / (
        v * v).sum(1)[:, None, None]  # [M, C(row), C(col)], symmetric
    cols = q[:, None, :] * P  # row i of P is P e_i (symmetric): s_i = q ⊙ P e_i
    # drop column j of every position: order the columns so that j comes last
    order = torch.argsort((torch.arange(C, device=p.device)[None, :] == j[:, None]).to(torch.int8),
                          dim=1, stable=True)[:, : C - 1]
    cols = torch.gather(cols, 1, order[:, :, None].expand(M, C - 1, C))
    return cols.transpose(0, 1)  # [C-1, M, C]


def sqrt_hessian(loss_fn, o: Tensor, y: Tensor) -> Tensor:
    """Exact square root columns ``[K, *o.shape]`` with :math:`\\sum_k s_k s_k^\\top = f H`."""
    if isinstance(loss_fn, (nn.CrossEntropyLoss, nn.NLLLoss)):
        p, omega = _categorical_setup(loss_fn, o, y)
        C = p.shape[1]
        cols = _softmax_sqrt(p.movedim(1, -1).reshape(-1, C))  # [C-1, N·d, C]
        cols = cols.reshape(C - 1, *p.movedim(1, -1).shape).movedim(-1, 2)  # [C-1, N, C, d…]
        cols = cols * omega.sqrt().unsqueeze(0).unsqueeze(2)
        C = C - 1  # columns per position
        if p.dim() == 2:
            return cols
        # Positions are independent: one column per (class, position), else the outer
        # products would couple positions the Hessian keeps apart.
        P = p[0, 0].numel()
        cols = cols.reshape(C, 1, *p.shape[:2], P)
        pos = torch.eye(P, dtype=p.dtype, device=p.device).reshape(1, P, 1, 1, P)
        return (cols * pos).reshape(C * P, *p.shape)
    o = o.detach()
    if isinstance(loss_fn, nn.MSELoss):
        f = 1.0 / o.numel() if loss_fn.reduction == "mean" else 1.0
        return _onehot_columns(o) * (2.0 * f) ** 0.5
    if isinstance(loss_fn, nn.BCEWithLogitsLoss):
        s = torch.sigmoid(o)
        h = s * (1 - s)
        if loss_fn.pos_weight is not None:
            h = h * (loss_fn.pos_weight * y + 1 - y)
        if loss_fn.weight is not None:
            h = h * loss_fn.weight
        if loss_fn.reduction == "mean":
            h = h / o.numel()
        return _onehot_columns(o) * h.sqrt().unsqueeze(0)
    raise UnsupportedLossError(f"no Hessian square root for {type(loss_fn).__name__}")


def mc_sqrt_hessian(loss_fn, o: Tensor, y: Tensor, mc_samples: int,
                    generator: torch.Generator | None = None) -> Tensor:
    """MC columns ``[M, *o.shape]`` with :math:`E[\\sum_m s_m s_m^\\top] = f H`.

    Each column is :math:`\\sqrt{f/M}\\,\\nabla_o \\ell(o, \\tilde y_m)` with
    :math:`\\tilde y_m` drawn from the likelihood the loss is the negative log of.
    Draws use ``generator`` (torch's global RNG when ``None``).
    """
    M = mc_samples
    if isinstance(loss_fn, (nn.CrossEntropyLoss, nn.NLLLoss)):
        p, omega = _categorical_setup(loss_fn, o, y)
        C = p.shape[1]
        flat = p.movedim(1, -1).reshape(-1, C)
        draws = torch.multinomial(flat, M, replacement=True, generator=generator)  # [N·d, M]
        onehot = torch.nn.functional.one_hot(draws.T, C).to(p.dtype)  # [M, N·d, C]
        onehot = onehot.reshape(M, *p.movedim(1, -1).shape).movedim(-1, 2)
        return (p.unsqueeze(0) - onehot) * (omega / M).sqrt().unsqueeze(0).unsqueeze(2)
    o = o.detach()
    if isinstance(loss_fn, nn.MSELoss):
        f = 1.0 / o.numel() if loss_fn.reduction == "mean" else 1.0
        # ỹ ~ N(o, 1/2): ∇(o−ỹ)² = 2(o−ỹ) = −√2 ε, whose covariance is 2I = ∇²(o−y)².
        eps = torch.randn(M, *o.shape, dtype=o.dtype, device=o.device, generator=generator)
        return eps * (-(2.0 * f / M) ** 0.5)
    if isinstance(loss_fn, nn.BCEWithLogitsLoss):
        if loss_fn.pos_weight is not None:
            raise UnsupportedLossError(
                "BCEWithLogitsLoss(pos_weight=...) is not the negative log-likelihood of a "
                "Bernoulli, so its MC Fisher differs from the GGN; use the exact quantities."
            )
        s = torch.sigmoid(o)
        draws = torch.bernoulli(s.unsqueeze(0).expand(M, *o.shape), generator=generator)
        w = 1.0 if loss_fn.weight is None else loss_fn.weight
        f = 1.0 / o.numel() if loss_fn.reduction == "mean" else 1.0
        return (s - draws) * (w * f / M) ** 0.5
    raise UnsupportedLossError(f"no MC sampling for {type(loss_fn).__name__}")


def mean_hessian(loss_fn, o: Tensor, y: Tensor) -> Tensor:
    """:math:`f \\sum_n H_n` as a dense ``[D, D]`` matrix (D = per-sample output size), for KFRA."""
    S = sqrt_hessian(loss_fn, o, y)  # [K, N, *]
    S = S.flatten(2)  # [K, N, D]
    return torch.einsum("knd,kne->de", S, S)
