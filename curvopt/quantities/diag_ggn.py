"""GGN diagonals and Kronecker factors from loss-Hessian square-root columns.

At the start of backward the exact square root (:math:`\\sum_k s_k s_k^\\top = fH`,
kind :data:`~.base.EXACT`) and/or ``M`` sampled columns (kind ``("mc", M)``) of
the loss Hessian at the model output are sent back through autograd to every
layer output; one set serves every quantity that reads it (DiagGGNExact, KFLR
and DiagHessian share the exact columns; DiagGGNMC and KFAC share a draw when
their ``mc_samples`` agree).  Per parameter the layouts reduce them
(:func:`~._backprop.diagonal`, :func:`~._backprop.kronecker`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._backprop import KroneckerQuantity, diagonal, kronecker, send_back, sync_factors
from .base import EXACT, Quantity, mc, sender


@sender("exact")
def _send_exact(ctx, kinds):
    S = per_sample_columns(ctx.loss.sqrt_hessian(ctx.output, ctx.target), ctx.rows_per_sample)
    if ctx.coupled:
        S = isolated_columns(S, ctx.output.shape[0] // ctx.rows_per_sample)
    send_back(ctx.output, ctx.records, S, lambda r, g: setattr(r.columns, "exact", g))


@sender("mc")
def _send_mc(ctx, kinds):
    o = ctx.output
    gen = ctx.mc_generator(o.device) if ctx.mc_generator is not None else None
    for _, M in sorted(kinds):
        S = ctx.loss.sample(o, ctx.target, M, gen)
        send_back(o, ctx.records, S, lambda r, g, M=M: r.columns.mc.__setitem__(M, g))


def per_sample_columns(S, T: int):
    """``[K, N·T, *c]`` columns of a loss whose ``N·T`` rows are ``T`` rows of each of the
    model's ``N`` samples (sample-major: ``logits.reshape(-1, V)``) -> ``[K·T, N·T, *c]``
    columns that are nonzero at one row per sample.

    The rows' Hessians are independent; a column spanning a sample's ``T`` rows would add
    cross terms between them once backpropagated into that sample's layers.
    """
    if T == 1:
        return S
    K, R = S.shape[:2]
    S = S.reshape(K, 1, R // T, T, *S.shape[2:])
    eye = torch.eye(T, dtype=S.dtype, device=S.device).reshape(1, T, 1, T, *[1] * (S.dim() - 4))
    return (S * eye).reshape(K * T, R, *S.shape[4:])


def isolated_columns(S, N: int):
    """``[K, N·T, *c]`` -> ``[K·N, N·T, *c]``: each column restricted to one sample's rows.

    A column shared by all samples is exact only while every sample's layers see their own
    sample alone: through a layer that couples the batch (train-mode BatchNorm) the cross
    products of different samples' roots would enter.  Isolated, the rows-as-samples GGN
    :math:`\\sum_n J_{z_n}^\\top [J^\\top H J]_{nn} J_{z_n}` is exact, at ``N`` times the columns.
    """
    K, R = S.shape[:2]
    S = S.reshape(K, 1, N, R // N, *S.shape[2:])
    eye = torch.eye(N, dtype=S.dtype, device=S.device).reshape(1, N, N, *[1] * (S.dim() - 3))
    return (S * eye).reshape(K * N, R, *S.shape[4:])


def exact_diagonal(ctx):
    """The GGN diagonal of one parameter (cached: DiagHessian adds its residuals to it)."""
    return ctx.cached("diag_exact", lambda: diagonal(ctx, lambda c: c.exact))


@dataclass(frozen=True)
class _MonteCarlo(Quantity):
    """A quantity read from ``mc_samples`` sampled targets per input (shared by every
    request with the same ``mc_samples``)."""

    mc_samples: int = 1
    needs_loss = True

    def __post_init__(self):
        if int(self.mc_samples) < 1:
            raise ValueError(f"{type(self).__name__}: mc_samples must be >= 1, got {self.mc_samples}")

    def columns(self):
        return {mc(self.mc_samples)}

    def _sampled(self, c):
        return c.mc.get(int(self.mc_samples))


@dataclass(frozen=True)
class DiagGGNExact(Quantity):
    """Diagonal of the generalized Gauss-Newton matrix, ``diag_ggn_exact`` (``p.shape``).

    .. math:: \\operatorname{diag}\\Big(f \\sum_n J_n^\\top H_n J_n\\Big),
              \\quad H_n = \\nabla^2_{o}\\ell_n,\\; J_n = \\partial o_n / \\partial\\theta

    Uses a symmetric factorisation :math:`H_n = S_n S_n^\\top` of the loss
    Hessian; its columns travel back through autograd.
    """

    savefield = "diag_ggn_exact"
    needs_loss = True

    def columns(self):
        return {EXACT}

    def compute(self, ctx):
        return exact_diagonal(ctx)


@dataclass(frozen=True)
class DiagGGNMC(_MonteCarlo):
    """Monte-Carlo estimate of the GGN diagonal, ``diag_ggn_mc`` (``p.shape``).

    .. math:: \\frac{f}{M}\\sum_{m=1}^M \\sum_n \\big(J_n^\\top \\nabla_o \\ell(o_n, \\tilde y_{n,m})\\big)^{\\odot2},
              \\quad \\tilde y_{n,m} \\sim p(y \\mid o_n)

    Targets are drawn from the loss's likelihood (CrossEntropy: categorical; MSE:
    :math:`\\mathcal N(o, 1/2)`; BCEWithLogits: Bernoulli) with torch's global RNG,
    so ``torch.manual_seed`` reproduces them, or with the collector's
    ``mc_generator`` (the optimizers' private streams).

    Args:
        mc_samples: number of sampled targets :math:`M` per input.
    """

    savefield = "diag_ggn_mc"

    def compute(self, ctx):
        return diagonal(ctx, self._sampled)


@dataclass(frozen=True)
class KFAC(KroneckerQuantity, _MonteCarlo):
    """Kronecker-factored GGN with Monte-Carlo loss Hessian, ``kfac`` (list of factors).

    Factors in row-major order (BackPACK's): weight of Linear/Conv:
    ``[G, A]`` with :math:`A = \\tfrac1N\\sum_n X_n^\\top X_n` (inputs or
    unfolded patches, uncentred, no bias column) and
    :math:`G = \\sum_n \\sum_s v_{n,s} v_{n,s}^\\top` from the backpropagated
    MC square root; biases: ``[G]``. A single factor is the dense block.
    Martens & Grosse (2015), Grosse & Martens (2016).

    Args:
        mc_samples: number of sampled targets per input.
    """

    savefield = "kfac"

    def compute(self, ctx):
        return kronecker(ctx, self._sampled)

    def sync(self, value, ctx, gb):
        return sync_factors(value, gb)


@dataclass(frozen=True)
class KFLR(KroneckerQuantity, Quantity):
    """Kronecker factors like :class:`KFAC` but from the exact loss Hessian square root, ``kflr``.

    Botev, Ritter & Barber (2017), extended to convolutions as Grosse & Martens (2016).
    """

    savefield = "kflr"
    needs_loss = True

    def columns(self):
        return {EXACT}

    def compute(self, ctx):
        return kronecker(ctx, lambda c: c.exact)

    def sync(self, value, ctx, gb):
        return sync_factors(value, gb)
