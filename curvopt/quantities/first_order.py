"""First-order quantities from the gradient that reaches each layer.

With :math:`g_n = f\\nabla\\ell_n` the per-sample gradients (``K = 1`` cotangent):

* ``grad_batch`` :math:`= [g_1, …, g_N]`, ``[N, *p.shape]``;
* ``sum_grad_squared`` :math:`= \\sum_n g_n^{\\odot 2}`;
* ``variance`` :math:`= \\tfrac1N\\sum_n g_n^{\\odot2} - (\\tfrac1N\\sum_n g_n)^{\\odot2}`;
* ``batch_l2`` :math:`= [\\lVert g_n\\rVert^2]_n`.

Per-sample gradients are materialised only when ``grad_batch`` is asked for
(or the layer has no closed form); otherwise the layout's closed forms are used
(:meth:`~curvopt.rules.layout.Bound.sum_sq`, ``l2``, ``total``).
"""

from __future__ import annotations

from ..rules.layout import concat


def compute(items, wanted: set[str], totals: dict | None = None, key=None, reuse=None,
            grad=None) -> dict:
    r"""``items``: ``[(record, layout)]`` of one parameter; ``wanted``: savefields.

    ``totals``: if given, ``totals[key]`` receives :math:`\sum_n g_n` (used to combine
    the variance over ranks under torch.distributed).
    ``reuse``: a ``[N, *p.shape]`` tensor nobody else holds (last step's ``grad_batch``):
    writing into it avoids the page faults of a fresh multi-MB allocation, which cost
    more than the arithmetic (measured 4x on the 784-256-256-10 MLP).
    ``grad``: ``p.grad`` if it holds exactly this backward's gradient (it was ``None``
    before); it replaces the :math:`\\sum_n g_n` product that Variance needs once a
    random projection confirms that it equals it (a hook rescaling gradients, or a use
    of the parameter outside the recorded layers, would fail the check).
    """
    bounds = concat([lay.bind(r.grad.unsqueeze(0)) for r, lay in items])
    N = items[0][1].N
    out = {}
    need_sgs = bool(wanted & {"sum_grad_squared", "variance"})
    if len(bounds) > 1:
        # A weight shared across layer types: sum per-sample gradients, derive the rest.
        gb = bounds[0].per_sample()[0]
        for b in bounds[1:]:
            gb = gb + b.per_sample()[0]
        if "grad_batch" in wanted:
            out["grad_batch"] = gb
        sgs = gb.pow(2).sum(0) if need_sgs else None
        l2 = gb.flatten(1).pow(2).sum(1) if "batch_l2" in wanted else None
        total = gb.sum(0) if "variance" in wanted else None
    else:
        # Closed forms even next to grad_batch: squaring the [N, *p.shape] tensor again
        # would cost more memory traffic than (G²)ᵀX² or the Gram identity.
        b = bounds[0]
        gb = None
        if "grad_batch" in wanted:
            if hasattr(b, "per_sample_into"):
                p = b.layout.param
                buf = reuse if reuse is not None else p.new_empty((N, *p.shape))
                gb = out["grad_batch"] = b.per_sample_into(buf)
            else:
                gb = out["grad_batch"] = b.per_sample()[0]
        if gb is not None and not b.closed_form:
            # the per-sample tensor exists and there is no cheaper formula: reuse it
            sgs = gb.pow(2).sum(0) if need_sgs else None
            l2 = gb.flatten(1).pow(2).sum(1) if "batch_l2" in wanted else None
            total = gb.sum(0) if "variance" in wanted else None
        else:
            sgs = b.sum_sq() if need_sgs else None
            l2 = b.l2() if "batch_l2" in wanted else None
            total = None
            if "variance" in wanted:
                total = grad if grad is not None and b.matches_total(grad) else b.total()
    if "sum_grad_squared" in wanted:
        out["sum_grad_squared"] = sgs
    if totals is not None and total is not None:
        totals[key] = total
    if "variance" in wanted:
        if totals is not None and "sum_grad_squared" not in wanted:
            out["_sgs"] = sgs  # consumed (and removed) by the distributed reduction
        # one allocation (fresh multi-MB tensors cost page faults): sgs/N − (total/N)²
        out["variance"] = (sgs / N).addcmul_(total, total, value=-1.0 / N**2).clamp_min_(0)
    if "batch_l2" in wanted:
        out["batch_l2"] = l2
    return out
