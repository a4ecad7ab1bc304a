"""KFRA (Botev, Ritter & Barber 2017): a batch-averaged output Hessian passed back module by module.

.. math:: \\bar H_{\\text{top}} = f\\sum_n H_n,\\qquad
          \\bar H_{L} = \\tfrac1N \\sum_n J_{n}^\\top \\bar H_{L+1} J_{n},
          \\quad J_n = \\partial z_{L+1,n} / \\partial z_{L,n}

The recursion averages over the batch after every module, parameter-free
ones (activations, pooling) included, as BackPACK does; functional operations
between modules belong to the step they sit in.  ``G`` of layer ``L`` is
:math:`\\bar H_L` at its output (summed over positions
for convolutions and sequences), ``A`` is KFAC's.  Each step factorises
:math:`\\bar H = Q\\Lambda Q^\\top` (float64), broadcasts the columns of
:math:`Q\\Lambda^{1/2}` to every sample and sends them back through autograd
from one layer output to the next: no per-module backward code, so any
activation, pooling or padding between the layers works.

The recursion is defined when the layers form a chain: the loss depends on
each layer's output only through the next layer's output.  That is verified
numerically (the gradient passed back through the segment must equal the
gradient autograd delivers); residual connections and branches fail the
check with a clear error.  :math:`\\bar H` is a dense ``[D, D]`` matrix over
a sample's output elements: where it would be too large (:data:`MAX_KFRA_DIM`,
:data:`MAX_KFRA_FLOPS`; e.g. the early layers of a CNN on 32×32 images) the
recursion stops with a warning naming the skipped layers, and the other
requested quantities are unaffected.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ..errors import UnsupportedModuleError
from ..factors import BATCH, Factors
from ..rules import activations
from ..rules.layout import Dense, DenseBound, Elementwise
from ._backprop import KroneckerQuantity, grads, kronecker, sync_factors
from .base import KFRA_H, Quantity, sender

#: KFRA stops (with a warning) above a layer whose dense H̄ is larger than this per side ...
MAX_KFRA_DIM = 8192
#: ... or whose recursion step (columns × N × D²) would cost more than this many FLOPs.
MAX_KFRA_FLOPS = 4e10


def _sqrt_psd(H: torch.Tensor) -> torch.Tensor:
    """Columns ``L: [D, r]`` with ``L Lᵀ = H`` (H symmetric PSD), computed in float64."""
    Hd = H.double()
    Hd = (Hd + Hd.T) / 2
    lam, Q = torch.linalg.eigh(Hd)
    keep = lam > lam.abs().max().clamp_min(1e-300) * H.shape[0] * torch.finfo(H.dtype).eps
    return (Q[:, keep] * lam[keep].sqrt()).to(H.dtype)


@sender("kfra")
def propagate(ctx, kinds):
    """H̄ at every recorded layer output (``record.columns.kfra_H``), top to bottom."""
    o, recs = ctx.output, ctx.records
    N = o.shape[0]
    if ctx.rows_per_sample != 1:
        raise UnsupportedModuleError(
            f"KFRA: the loss sees {N} rows for {N // ctx.rows_per_sample} model samples "
            "(logits reshaped to [N*T, C]); its per-sample output Hessian recursion is "
            "defined on the model's own output shape. Apply the loss to [N, C, T] logits "
            "(logits.transpose(1, 2)), or use KFLR/KFAC."
        )
    if len({id(r.module) for r in recs}) != len(recs):
        raise UnsupportedModuleError(
            "KFRA: a layer is applied more than once in the forward pass; its recursion "
            "(one output Hessian per layer) is not defined. Use KFLR or KFAC."
        )
    # Every module output in forward order: parameterized records and parameter-free leaves.
    stops = sorted([*recs, *ctx.boundaries], key=lambda b: b.order)
    edges = [b.edge for b in stops]
    true = torch.autograd.grad(o, edges, ctx.grad_output, retain_graph=True, allow_unused=True)
    H = ctx.loss.mean_hessian(o, ctx.target)
    gb = ctx.global_batch() if ctx.global_batch is not None else None
    if gb is not None:  # KFRA's recursion needs the global batch's H̄ at every step
        H = gb.loss_sum_(H)
    src, src_grad, src_name, src_shape, src_stop = o, ctx.grad_output, "the loss input", tuple(o.shape), None
    src_dtype = o.dtype
    for i in reversed(range(len(stops))):
        b, g_true = stops[i], true[i]
        if g_true is None:
            continue
        D = int(torch.tensor(b.shape[1:]).prod()) if len(b.shape) > 1 else 1
        rank = H.shape[0]  # upper bound of the number of columns sent back
        closed = _closed_step(src_stop, b, H, src, src_shape, src_dtype, N)
        cost = 0 if closed is not None else rank * N * D * D
        if D > MAX_KFRA_DIM or cost > MAX_KFRA_FLOPS:
            skipped = [x.name for x in recs if x.order <= b.order]
            warnings.warn(
                f"KFRA: the output of '{b.name}' has {D} elements per sample; the dense "
                f"{D}x{D} batch-averaged Hessian there (and below) would cost about "
                f"{rank * N * D * D / 1e9:.0f} GFLOP. KFRA is skipped for layers "
                f"{', '.join(repr(x) for x in skipped)} (no 'kfra' attribute); the other "
                "quantities are unaffected. Use KFLR or KFAC for these layers.",
                RuntimeWarning,
                stacklevel=2,
            )
            return
        (g_pass,) = torch.autograd.grad(src, b.edge, src_grad, retain_graph=True, allow_unused=True)
        if g_pass is None or not torch.allclose(
                g_pass, g_true, rtol=1e-5, atol=1e-8 * g_true.abs().max().item()):
            raise UnsupportedModuleError(
                f"KFRA: the loss depends on the output of '{b.name}' through paths that "
                f"avoid {src_name} (a residual connection or a branch), so KFRA's module-by-"
                "module recursion is not defined on this graph. Use KFLR or KFAC."
            )
        H = closed if closed is not None else _columns_step(b, H, src, src_shape, src_dtype, N)
        if gb is not None:
            H = gb.mean_(H)
        if hasattr(b, "columns"):  # a parameterized layer: G is read off H̄ at its output
            b.columns.kfra_H = H
        src, src_grad, src_name, src_shape, src_stop = b.edge, g_true, f"'{b.name}'", b.shape, b
        src_dtype = b.output.dtype if hasattr(b, "output") else b.dtype


def _closed_step(src_stop, b, H, src, src_shape, src_dtype, N):
    """H̄ at ``b`` in closed form when the segment from ``b`` up to ``src`` is exactly one
    known module (its input is ``b``), else ``None``: a rule's ``kfra_step`` (Linear:
    Wᵀ H̄ W), an elementwise activation of :mod:`~curvopt.rules.activations`
    (H̄ ⊙ E_n[d_n d_nᵀ] with d_n its derivative), a reshape (H̄ itself)."""
    if src_stop is None or src_stop.in_edge is None or src_stop.in_edge != b.edge:
        return None
    if hasattr(src_stop, "rule"):
        return src_stop.rule.kfra_step(src_stop.module, H, src_shape)
    kind = activations.kind(src_stop.module)
    if kind == "reshape":
        return H
    if kind == "elementwise":
        ones = torch.ones(src_shape, dtype=src_dtype, device=H.device)
        (d,) = torch.autograd.grad(src, b.edge, ones, retain_graph=True)
        d = d.reshape(N, -1).to(H.dtype)
        return H * (d.T @ d) / N
    return None


def _columns_step(b, H, src, src_shape, src_dtype, N):
    """H̄ at ``b`` from H̄ at ``src``, (1/N) Σ_n J_nᵀ H̄ J_n over any segment: the columns of
    H̄^{1/2}, broadcast to every sample, go back through autograd."""
    L = _sqrt_psd(H)  # [D_src, r]
    D_b = int(torch.tensor(b.shape[1:]).prod()) if len(b.shape) > 1 else 1
    if L.shape[1] == 0:  # H̄ = 0 (a saturated loss): nothing flows further down
        return H.new_zeros(D_b, D_b)
    cols = L.T.reshape(-1, 1, *src_shape[1:]).expand(-1, N, *src_shape[1:]).to(src_dtype)
    (V,) = grads(src, [b.edge], cols, batched=True)  # [r, N, *out]
    if isinstance(V, list):
        V = torch.stack([torch.zeros(b.shape, dtype=src_dtype, device=H.device) if v is None
                         else v for v in V])
    Vf = V.reshape(V.shape[0], N, -1).to(H.dtype)
    return torch.einsum("jnd,jne->de", Vf, Vf) / N


@dataclass(frozen=True)
class KFRA(KroneckerQuantity, Quantity):
    """Kronecker factors with a batch-averaged output Hessian passed back layer by layer, ``kfra``.

    .. math:: \\bar H_{\\text{top}} = f \\sum_n H_n,\\quad
              \\bar H_{\\text{in}} = \\tfrac1N \\sum_n J_n^\\top \\bar H_{\\text{out}} J_n

    ``G`` of a layer is :math:`\\bar H` at its output (summed over positions
    for convolutions); ``A`` as in :class:`KFAC`.  Botev, Ritter & Barber (2017).
    """

    savefield = "kfra"
    needs_loss = True

    def columns(self):
        return {KFRA_H}

    def compute(self, ctx):
        """``[G, A]`` (or ``[G]``, ``[block]``) with G read off H̄ at the layer output."""
        if len(ctx.items) != 1:
            return None
        r, lay = ctx.items[0]
        H = r.columns.kfra_H
        if H is None:
            return None
        out_shape = r.output.shape
        N = out_shape[0]
        if isinstance(lay, Dense) or (isinstance(lay, Elementwise) and lay.Xhat is None):
            G = r.rule.kfra_G(r.module, H, out_shape)
            if G is not None:
                if isinstance(lay, Elementwise):
                    return Factors.of([G], (BATCH,))
                A = DenseBound(lay, None, lay.X, cot=True).kron_A()
                return Factors.of([A, G] if lay.kron_order == "AG" else [G, A], (BATCH, BATCH))
        # No Kronecker structure (norm parameters, fallback modules): the dense block of
        # (1/N) Σ_n J_θ,nᵀ H̄ J_θ,n, from the columns of H̄^{1/2} broadcast to every sample.
        L = _sqrt_psd(H)
        cols = L.T.reshape(-1, 1, *out_shape[1:]).expand(-1, N, *out_shape[1:]) / N**0.5
        f = kronecker(ctx, lambda c: cols if c is r.columns else None)
        return None if f is None else Factors.of(f, (BATCH,) * len(f))

    def sync(self, value, ctx, gb):
        return sync_factors(value, gb)

    def merge(self, a, b):
        raise UnsupportedModuleError(
            "KFRA over several backward passes (gradient accumulation): its recursion "
            "averages over the whole batch at every layer, which micro-batches cannot "
            "reproduce. Use one backward per step for KFRA, or KFLR/KFAC."
        )
