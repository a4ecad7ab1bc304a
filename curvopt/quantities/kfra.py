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

import torch

from .. import losses
from ..engine import distributed
from ..engine.distributed import Factors
from ..errors import UnsupportedModuleError
from .second_order import grads, kronecker

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


def propagate(col, lrec, recs, g_out):
    o = lrec.input
    N = o.shape[0]
    if len({id(r.module) for r in recs}) != len(recs):
        raise UnsupportedModuleError(
            "KFRA: a layer is applied more than once in the forward pass; its recursion "
            "(one output Hessian per layer) is not defined. Use KFLR or KFAC."
        )
    # Every module output in forward order: parameterized records and parameter-free leaves.
    stops = sorted([*recs, *col._boundaries], key=lambda b: b.order)
    edges = [b.edge for b in stops]
    true = torch.autograd.grad(o, edges, g_out, retain_graph=True, allow_unused=True)
    H = losses.mean_hessian(col.loss_fn, o, lrec.target)
    dist_on = distributed.active()
    if dist_on:  # KFRA's recursion needs the global batch's H̄ at every step
        n_glob = distributed.global_batch(N, H.device)
        rho = N / n_glob if col.loss_fn.reduction == "mean" else 1.0
        H = H * rho
        torch.distributed.all_reduce(H)
    src, src_grad, src_name, src_shape = o, g_out, "the loss input", tuple(o.shape)
    for i in reversed(range(len(stops))):
        b, g_true = stops[i], true[i]
        if g_true is None:
            continue
        D = int(torch.tensor(b.shape[1:]).prod()) if len(b.shape) > 1 else 1
        rank = H.shape[0]  # upper bound of the number of columns sent back
        if D > MAX_KFRA_DIM or rank * N * D * D > MAX_KFRA_FLOPS:
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
        (g_pass,) = torch.autograd.grad(src, b.edge, src_grad, retain_graph=True)
        if not torch.allclose(g_pass, g_true, rtol=1e-5, atol=1e-8 * g_true.abs().max().item()):
            raise UnsupportedModuleError(
                f"KFRA: the loss depends on the output of '{b.name}' through paths that "
                f"avoid {src_name} (a residual connection or a branch), so KFRA's module-by-"
                "module recursion is not defined on this graph. Use KFLR or KFAC."
            )
        L = _sqrt_psd(H)  # [D_src, r]
        cols = L.T.reshape(-1, 1, *src_shape[1:]).expand(-1, N, *src_shape[1:])
        (V,) = grads(src, [b.edge], cols, batched=True)  # [r, N, *out]
        if isinstance(V, list):
            V = torch.stack(V)
        if hasattr(b, "columns"):  # a parameterized layer: its G reads these columns
            b.columns["kfra"] = V / N**0.5
        Vf = V.reshape(V.shape[0], N, -1)
        H = torch.einsum("jnd,jne->de", Vf, Vf) / N
        if dist_on:
            H = distributed.allreduce_mean_(H, N, n_glob)
        src, src_grad, src_name, src_shape = b.edge, g_true, f"'{b.name}'", b.shape


def factors(items):
    f = kronecker(items, "kfra")
    # G is already the global batch average: under torch.distributed it is averaged, not summed.
    return None if f is None else Factors.of(f, "A" * len(f))
