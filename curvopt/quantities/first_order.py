"""First-order quantities from the gradient that reaches each layer.

With :math:`g_n = f\\nabla\\ell_n` the per-sample gradients (``K = 1`` cotangent):

* ``grad_batch`` :math:`= [g_1, …, g_N]`, ``[N, *p.shape]``;
* ``sum_grad_squared`` :math:`= \\sum_n g_n^{\\odot 2}`;
* ``variance`` :math:`= \\tfrac1N\\sum_n g_n^{\\odot2} - (\\tfrac1N\\sum_n g_n)^{\\odot2}`;
* ``batch_l2`` :math:`= [\\lVert g_n\\rVert^2]_n`.

They need nothing sent back: autograd delivers the gradient at every layer
output anyway.  Per-sample gradients are materialised only when ``grad_batch``
is asked for (or the layout has no closed form); otherwise the layout's closed
forms are used (:meth:`~curvopt.rules.layout.Bound.sum_sq`, ``l2``, ``total``).
The four share work through the parameter's context cache; they are computed in
registration order, so ``grad_batch`` exists before the others look for it.

Scaling (identical to BackPACK): let the loss be
:math:`\\mathcal{L} = f \\sum_{n=1}^N \\ell_n` with :math:`f = 1/N'` for
``reduction='mean'`` (:math:`N'` counts every averaged element, e.g.
:math:`N \\cdot D` for ``MSELoss``) and :math:`f = 1` for ``reduction='sum'``.
"""

from __future__ import annotations

import sys
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import _dist
from .base import ParamContext, Quantity


def _grad_batch(ctx: ParamContext) -> Tensor | None:
    return ctx.cache.get("grad_batch")


def _per_sample(ctx: ParamContext) -> Tensor:
    """``[N, *p.shape]``: materialised once (into a recycled buffer when possible)."""
    def make():
        bounds = ctx.grad_bounds()
        if len(bounds) > 1:
            # A weight shared across layer types: sum per-sample gradients.
            gb = bounds[0].per_sample()[0]
            for b in bounds[1:]:
                gb = gb + b.per_sample()[0]
            return gb
        b = bounds[0]
        if hasattr(b, "per_sample_into"):
            p = ctx.param
            reuse = _reusable(p, ctx.N)
            buf = reuse if reuse is not None else p.new_empty((ctx.N, *p.shape))
            return b.per_sample_into(buf)
        return b.per_sample()[0]

    return ctx.cached("grad_batch", make)


def _derive_from_per_sample(ctx: ParamContext) -> bool:
    """Whether the per-sample tensor exists and no cheaper closed form applies: then the
    others reuse it (squaring it again would cost more memory traffic than (G²)ᵀX²)."""
    bounds = ctx.grad_bounds()
    return len(bounds) > 1 or (_grad_batch(ctx) is not None and not bounds[0].closed_form)


def _sum_sq(ctx: ParamContext) -> Tensor:
    def make():
        if _derive_from_per_sample(ctx):
            return _per_sample(ctx).pow(2).sum(0)
        return ctx.grad_bounds()[0].sum_sq()

    return ctx.cached("sum_sq", make)


#: Below this many multiply-adds (parameter entries x samples) the total is computed
#: rather than ``p.grad`` verified and reused: the check's dozen small operations cost
#: more than one such product.
_PROBE_WORTH = 1 << 20


def _total(ctx: ParamContext) -> Tensor:
    r""":math:`\sum_n g_n`: ``p.grad`` when it holds exactly this backward's gradient and a
    random projection confirms it equals the recorded calls' sum (a hook rescaling
    gradients, or a use outside the recorded layers, fails the check), else computed."""
    def make():
        if _derive_from_per_sample(ctx):
            return _per_sample(ctx).sum(0)
        b = ctx.grad_bounds()[0]
        g = ctx.fresh_grad
        if g is None or ctx.param.numel() * ctx.N <= _PROBE_WORTH:
            return b.total()
        return g if b.matches_total(g) else b.total()

    return ctx.cached("total", make)


@dataclass(frozen=True)
class BatchGrad(Quantity):
    """Individual gradients, ``grad_batch`` of shape ``[N, *p.shape]``.

    .. math:: \\texttt{grad\\_batch}[n] = f\\, \\nabla_\\theta \\ell_n

    With a mean-reduced loss these are :math:`\\tfrac1N g_n` (BackPACK's
    convention), so ``grad_batch.sum(0)`` equals ``p.grad``.  Only meaningful
    when samples are independent (no BatchNorm in train mode).
    """

    savefield = "grad_batch"
    per_sample = True

    def compute(self, ctx):
        gb = _per_sample(ctx)
        if gb._base is None:
            _cache_put(ctx.param, gb)
        return gb

    def sync(self, value, ctx, gb):  # stays on its rank, rescaled to the global loss
        return [], lambda parts: value * gb.rho


@dataclass(frozen=True)
class SumGradSquared(Quantity):
    """Second moment of the individual gradients, ``sum_grad_squared`` (``p.shape``).

    .. math:: \\texttt{sum\\_grad\\_squared} = \\sum_n (f\\, \\nabla_\\theta \\ell_n)^{\\odot 2}

    Computed without materialising ``[N, *p.shape]`` where the layer allows it
    (dense layers with one row per sample: :math:`(G^{\\odot2})^\\top X^{\\odot2}`).
    """

    savefield = "sum_grad_squared"
    power = 2

    def compute(self, ctx):
        return _sum_sq(ctx)

    def sync(self, value, ctx, gb):
        return [value * gb.rho**2], lambda parts: parts[0]


@dataclass(frozen=True)
class Variance(Quantity):
    """Population variance (``unbiased=False``) of ``grad_batch`` over the batch, ``variance``.

    .. math:: \\texttt{variance} = \\tfrac1N \\texttt{sum\\_grad\\_squared}
              - \\big(\\tfrac1N \\sum_n f \\nabla_\\theta \\ell_n\\big)^{\\odot 2}

    Clamped at zero against round-off.  Under ``torch.distributed`` it is formed from
    the global second moment and the global mean gradient.
    """

    savefield = "variance"

    def compute(self, ctx):
        N, sgs, total = ctx.N, _sum_sq(ctx), _total(ctx)
        # one allocation (fresh multi-MB tensors cost page faults): sgs/N − (total/N)²
        return (sgs / N).addcmul_(total, total, value=-1.0 / N**2).clamp_min_(0)

    def sync(self, value, ctx, gb):
        def finish(parts):
            sgs, total = parts
            n = gb.n_global
            return (sgs / n - (total / n) ** 2).clamp_min(0)

        return [_sum_sq(ctx) * gb.rho**2, _total(ctx) * gb.rho], finish

    def unnormalize(self, value, ctx, z, n):  # the second moment and the total, unscaled
        return (_sum_sq(ctx) * z**2, _total(ctx) * z)

    def merge(self, a, b):
        return (a[0] + b[0], a[1] + b[1])

    def normalize(self, state, Z, N):
        sgs, total = state[0] / Z**2, state[1] / Z
        return (sgs / N).addcmul_(total, total, value=-1.0 / N**2).clamp_min_(0)


@dataclass(frozen=True)
class BatchL2Grad(Quantity):
    """Squared L2 norm of each individual gradient, ``batch_l2`` of shape ``[N]``.

    .. math:: \\texttt{batch\\_l2}[n] = \\lVert f\\, \\nabla_\\theta \\ell_n \\rVert_2^2

    For layers with several rows per sample (sequences, convolutions) it uses
    the Gram identity :math:`\\lVert G_n^\\top X_n\\rVert_F^2 =
    \\langle G_n G_n^\\top, X_n X_n^\\top\\rangle` when that is cheaper.
    """

    savefield = "batch_l2"
    per_sample, power = True, 2

    def compute(self, ctx):
        if _derive_from_per_sample(ctx):
            return _per_sample(ctx).flatten(1).pow(2).sum(1)
        return ctx.grad_bounds()[0].l2()

    def sync(self, value, ctx, gb):
        return [], lambda parts: value * gb.rho**2


#: Per-sample quantities stay on their rank; ``gather=True`` concatenates them.
PER_SAMPLE = (BatchGrad, BatchL2Grad)


def gather(value: Tensor) -> Tensor:
    return _dist.all_gather_batch(value)


# ------------------------------------------------------------ grad_batch buffer recycling
#: The last ``grad_batch`` tensor handed out for each parameter (dropped with the
#: parameter).  Writing ``N × params`` floats into fresh memory costs more in page faults
#: than in arithmetic (measured 4x on the 784-256-256-10 MLP), so the memory is
#: recycled whenever nobody but curvopt still references the old tensor.
#: Keyed by ``id(param)``; a weak reference to the parameter removes the entry with it
#: (tensors cannot be WeakKeyDictionary keys: their ``==`` is elementwise).
_GRAD_BATCH_CACHE: dict[int, tuple] = {}


def release_buffers() -> None:
    """Free the per-sample gradient buffers curvopt keeps for reuse."""
    _GRAD_BATCH_CACHE.clear()


def _cache_put(p, t):
    key = id(p)
    ref = weakref.ref(p, lambda _r, key=key: _GRAD_BATCH_CACHE.pop(key, None))
    _GRAD_BATCH_CACHE[key] = (ref, t)


def _reusable(p, N: int) -> Tensor | None:
    """Last backward's ``grad_batch`` of ``p`` if only curvopt still references it.

    Known references: the cache and the attribute on ``p`` (when it holds the same
    tensor), plus the two of this check itself.  Any other Python reference (the
    user kept the tensor, or a results dict holding it) or any other tensor on the
    same storage (``.detach()``, ``.data``, ``.numpy()``, views) means a fresh tensor.
    """
    entry = _GRAD_BATCH_CACHE.get(id(p))
    cand = entry[1] if entry is not None and entry[0]() is p else None
    entry = None
    if cand is None or not hasattr(torch._C, "_storage_Use_Count"):
        return None
    known = 3  # cache entry + local variable + getrefcount's argument
    known += p.__dict__.get("grad_batch") is cand
    if (cand.shape != (N, *p.shape) or cand.dtype != p.dtype or cand.device != p.device
            or cand._base is not None or not cand.is_contiguous()):
        return None
    if sys.getrefcount(cand) != known:
        return None
    # 2 = this tensor + the temporary storage wrapper of the query
    if torch._C._storage_Use_Count(cand.untyped_storage()._cdata) != 2:
        return None
    return cand
