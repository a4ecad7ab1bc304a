"""DiagHessian: the GGN diagonal plus the residual terms of smooth elementwise operations.

For a scalar loss, the Hessian with respect to a layer's parameters is

.. math:: \\nabla^2_\\theta \\mathcal L = J^\\top (fH) J
          + \\sum_m J_m^\\top \\operatorname{diag}(r_m) J_m,
          \\qquad r_m = \\phi_m''(a_m) \\odot \\frac{\\partial\\mathcal L}{\\partial \\phi_m(a_m)},

where ``m`` runs over the smooth elementwise operations :math:`\\phi_m` above
the layer (sigmoid, tanh, GELU, ...) and :math:`J_m = \\partial a_m / \\partial\\theta`.
Piecewise-linear operations (ReLU, max pooling) and linear ones have no residual.

The operations are found in the autograd graph itself (so functional calls
such as ``torch.tanh`` count as much as ``nn.Tanh``), their inputs are read
from the graph's saved tensors, and for each one the per-sample unit vectors
:math:`e_k` at :math:`a_m` travel back through autograd to the layer outputs
below. The diagonal contribution is then
:math:`\\sum_{k,n} r_{m,nk} (\\nabla_\\theta a_{m,nk})^{\\odot 2}`, a weighted
sum of squares that the layouts compute (without per-sample tensors for
one-row-per-sample layers).

LayerNorm and GroupNorm are handled exactly: their residual per normalized
row is :math:`-\\tfrac{s}{M\\sigma^2} I` (an elementwise term as above) plus a
rank-3 matrix, sent back as three signed columns per row (:func:`_norm_residual`).

Operations whose curvature curvopt cannot decompose (softmax inside the
network, products of two factors that depend on the same parameters as in
attention or a layer applied on its own output) raise a clear error when
parameters lie below them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.graph import GradientEdge

from ..errors import UnsupportedModuleError
from ._backprop import diagonal, send_back
from .base import EXACT, RESIDUALS, Quantity, sender
from .diag_ggn import exact_diagonal

#: Residual columns are one backward pass per element of a sample's activation.
MAX_RESIDUAL_ELEMENTS = 8192


def _sig2(s):  # σ'' expressed through σ
    return s * (1 - s) * (1 - 2 * s)


def _elu(node, x):  # EluBackward0 saves the input, EluBackward1 (in-place) the output
    alpha, scale, iscale = node._saved_alpha, node._saved_scale, node._saved_input_scale
    if type(node).__name__ == "EluBackward1":  # x is the output y; y < 0 iff input < 0
        return torch.where(x < 0, iscale**2 * (x + scale * alpha), torch.zeros_like(x))
    return torch.where(x < 0, scale * alpha * iscale**2 * torch.exp(x * iscale), torch.zeros_like(x))


def _gelu(node, x):
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        y = F.gelu(x, approximate=node._saved_approximate)
        (d1,) = torch.autograd.grad(y.sum(), x, create_graph=True)
        (d2,) = torch.autograd.grad(d1.sum(), x)
    return d2


def _softplus(node, x):
    b, t = node._saved_beta, node._saved_threshold
    s = torch.sigmoid(b * x)
    return torch.where(b * x > t, torch.zeros_like(x), b * s * (1 - s))


def _silu(node, x):
    s = torch.sigmoid(x)
    return s * (1 - s) * (2 + x * (1 - 2 * s))


def _pow(node, x):
    e = node._saved_exponent
    return e * (e - 1) * x ** (e - 2)


def _hardswish(node, x):  # x·relu6(x+3)/6: quadratic x(x+3)/6 on (-3, 3), linear outside
    return ((x > -3) & (x < 3)).to(x.dtype) / 3


def _mish(node, x):  # x·tanh(softplus(x)); t' = (1-t²)σ
    s, t = torch.sigmoid(x), torch.tanh(F.softplus(x))
    return (1 - t * t) * s * (2 + x * (1 - s - 2 * t * s))


#: node name -> (saved tensor attribute, φ'' from it)
SMOOTH = {
    "SigmoidBackward0": ("_saved_result", lambda n, s: _sig2(s)),
    "TanhBackward0": ("_saved_result", lambda n, t: -2 * t * (1 - t * t)),
    "EluBackward0": ("_saved_self", _elu),
    "EluBackward1": ("_saved_result", _elu),
    "GeluBackward0": ("_saved_self", _gelu),
    "SoftplusBackward0": ("_saved_self", _softplus),
    "SiluBackward0": ("_saved_self", _silu),
    "LogSigmoidBackward0": ("_saved_self", lambda n, x: -torch.sigmoid(x) * torch.sigmoid(-x)),
    "ExpBackward0": ("_saved_result", lambda n, y: y),
    "LogBackward0": ("_saved_self", lambda n, x: -1 / (x * x)),
    "PowBackward0": ("_saved_self", _pow),
    "HardswishBackward0": ("_saved_self", _hardswish),
    "MishBackward0": ("_saved_self", _mish),
}

#: Linear or piecewise-linear in every input that carries a gradient (ReLU6 and Hardtanh
#: are HardtanhBackward0; Hardsigmoid is relu6(x+3)/6).
LINEAR = {
    "AddmmBackward0", "MmBackward0", "MvBackward0", "BmmBackward0", "AddBackward0",
    "SubBackward0", "NegBackward0", "ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0",
    "TBackward0", "PermuteBackward0", "TransposeBackward0", "TransposeBackward1",
    "ExpandBackward0", "CatBackward0", "StackBackward0", "SplitBackward0",
    "SplitWithSizesBackward0", "SliceBackward0", "SelectBackward0", "IndexBackward0",
    "SqueezeBackward0", "SqueezeBackward1", "SqueezeBackward2", "SqueezeBackward4",
    "UnsqueezeBackward0", "CloneBackward0", "ConvolutionBackward0", "ReluBackward0",
    "LeakyReluBackward0", "HardtanhBackward0", "ThresholdBackward0", "ConstantPadNdBackward0",
    "ReflectionPad1DBackward0", "ReflectionPad2DBackward0", "ReflectionPad3DBackward0",
    "ReplicationPad1DBackward0", "ReplicationPad2DBackward0", "ReplicationPad3DBackward0",
    "MeanBackward0", "MeanBackward1", "SumBackward0", "SumBackward1", "NativeDropoutBackward0",
    "MaxPool1DWithIndicesBackward0", "MaxPool2DWithIndicesBackward0",
    "MaxPool3DWithIndicesBackward0", "AvgPool2DBackward0", "AvgPool3DBackward0",
    "AdaptiveAvgPool2DBackward0", "AdaptiveAvgPool3DBackward0", "AdaptiveMaxPool2DBackward0",
    "AdaptiveMaxPool3DBackward0", "EmbeddingBackward0", "AccumulateGrad", "MulBackward0",
    "MulBackward1", "DivBackward0", "DivBackward1", "AliasBackward0", "AsStridedBackward0",
    "NativeBatchNormBackward0", "CudnnBatchNormBackward0", "RepeatBackward0",
    "FlipBackward0", "RollBackward0", "IndexSelectBackward0", "GatherBackward0",
    "PixelShuffleBackward0", "UpsampleNearest2DBackward0", "CopySlices", "ToCopyBackward0",
    "ViewAsRealBackward0", "MaxBackward0", "MaxBackward1", "MinBackward1", "AmaxBackward0",
    "ConvolutionBackwardBackward0", "LinearBackward0", "HardsigmoidBackward0",
}
#: nodes that are bilinear: nonlinear (and non-elementwise) when two inputs carry a gradient
BILINEAR = {"MulBackward0", "DivBackward0", "BmmBackward0", "MmBackward0", "MvBackward0",
            "AddmmBackward0", "AddbmmBackward0", "BaddbmmBackward0", "ConvolutionBackward0",
            "LinearBackward0", "NativeBatchNormBackward0", "CudnnBatchNormBackward0"}


#: normalizations: linear in their affine parameters, nonlinear (not elementwise) in the input
NORMS = {"NativeLayerNormBackward0", "NativeGroupNormBackward0"}


def _leaf_sets(root):
    """Map every node below ``root`` to the frozenset of leaf (AccumulateGrad) nodes below it."""
    leaves: dict = {}
    stack = [(root, False)]
    while stack:
        n, expanded = stack.pop()
        if n in leaves:
            continue
        kids = [nf for nf, _ in n.next_functions if nf is not None]
        if expanded:
            own = {n} if type(n).__name__ == "AccumulateGrad" else set()
            leaves[n] = frozenset(own.union(*(leaves[k] for k in kids)))
            continue
        stack.append((n, True))
        stack.extend((k, False) for k in kids if k not in leaves)
    return leaves


def find_smooth(root, skip=()):
    """Walk the graph from ``root``; return the smooth nodes (elementwise or normalizations)
    with parameters below.

    A node matters only if one of its inputs depends on trainable leaves. Raises
    for curvature that does not decompose into elementwise terms: a product whose
    two factors depend on a common parameter (attention's q·kᵀ, x·x, a weight
    applied on top of its own output), a normalization of a parameter-dependent
    input, or an operation whose second derivative curvopt does not know.
    """
    leaves = _leaf_sets(root)
    smooth = []
    for n in leaves:
        if n in skip:
            continue
        name = type(n).__name__
        inputs = [leaves[nf] for nf, _ in n.next_functions if nf is not None]
        if not any(inputs):
            continue
        if name in SMOOTH:
            if leaves.get(n.next_functions[0][0], frozenset()):
                smooth.append(n)
        elif name in ("DivBackward0",) and len(inputs) > 1 and inputs[1]:
            raise UnsupportedModuleError(
                "DiagHessian: a division by a parameter-dependent value (e.g. x / temperature "
                "with a learnable temperature) is nonlinear in that parameter; curvopt does not "
                "add its residual. Use DiagGGNExact, or multiply by a learnable inverse instead."
            )
        elif name in BILINEAR:
            for i in range(len(inputs)):
                for j in range(i + 1, len(inputs)):
                    if inputs[i] & inputs[j]:
                        raise UnsupportedModuleError(
                            f"DiagHessian: {name} multiplies two factors that depend on the same "
                            "parameters (attention's q·kᵀ, a gating product, or a module applied "
                            "on top of its own output); that curvature does not decompose into "
                            "elementwise terms. Use DiagGGNExact for this model."
                        )
        elif name in NORMS:
            if inputs[0]:
                smooth.append(n)
        elif name in ("NativeBatchNormBackward0", "CudnnBatchNormBackward0") and inputs[0] \
                and getattr(n, "_saved_training", False):
            raise UnsupportedModuleError(
                "DiagHessian: batch normalization with the statistics of the current batch "
                "(train mode) is nonlinear in the batch and couples its samples; curvopt does "
                "not add its residual. Use model.eval(), or DiagGGNExact."
            )
        elif name not in LINEAR:
            raise UnsupportedModuleError(
                f"DiagHessian: operation {name} acts on parameter-dependent values and its "
                "second derivative is not known to curvopt (only linear, piecewise-linear and "
                f"smooth elementwise operations are: {', '.join(sorted(SMOOTH))}). Use "
                "DiagGGNExact, or open an issue for this operation."
            )
    return smooth


def _store_residual(k, weights):
    def store(r, cols):
        r.columns.residuals[k] = (cols, weights)

    return store


@sender("residuals")
def propagate(ctx, kinds):
    """Residual columns and signed weights of every smooth operation above each record
    (``record.columns.residuals``), or closed-form diagonal residuals (``diag_residual``)."""
    o, recs = ctx.output, ctx.records
    if o.grad_fn is None:
        return
    skip = {o.grad_fn} if type(o.grad_fn).__name__ == "LogSoftmaxBackward0" else set()
    nodes = find_smooth(o.grad_fn, skip)
    if not nodes:
        return
    # Gradient arriving at each smooth node's output, in one nested pass.
    outs = torch.autograd.grad(
        o, [GradientEdge(n, 0) for n in nodes], ctx.grad_output, retain_graph=True,
        allow_unused=True,
    )
    by_edge = {r.edge: r for r in recs}

    k = 0  # one key per residual column batch, the same at every record it reaches
    for node, gb in zip(nodes, outs):
        if gb is None:
            continue
        name = type(node).__name__
        src = GradientEdge(*node.next_functions[0])
        below = [r for r in recs if r.edge.node in _nodes_below(src.node)]
        if name in NORMS:
            r_m, cols, w = _norm_residual(node, gb.detach())
            send_back(src, below, cols, _store_residual(k, w))
            k += 1
        else:
            attr, d2 = SMOOTH[name]
            r_m = d2(node, getattr(node, attr).detach()) * gb  # [N, *a]
        edge_dtype = gb.dtype  # columns sent from the node's input match its dtype
        r_m = r_m.to(torch.promote_types(r_m.dtype, torch.float32))
        # The diagonal part Σ_k r_k (∂a_k/∂θ)²: closed forms where the Jacobian from the
        # activation input to a layer output has one term per entry, columns elsewhere.
        handled = _diagonal_fast_paths(src, r_m, by_edge)
        rest = [r for r in below if r not in handled]
        if not rest:
            continue
        N = r_m.shape[0]
        D = r_m[0].numel()
        if D > MAX_RESIDUAL_ELEMENTS:
            raise UnsupportedModuleError(
                f"DiagHessian: {name} has {D} input elements per sample; its exact residual "
                f"needs {D} backward passes (limit {MAX_RESIDUAL_ELEMENTS}). Use DiagGGNExact, "
                "or a piecewise-linear activation."
            )
        eye = torch.eye(D, dtype=edge_dtype, device=r_m.device)
        E = eye.reshape(D, 1, *r_m.shape[1:]).expand(D, *r_m.shape)
        send_back(src, rest, E, _store_residual(k, r_m.reshape(N, D).T.contiguous()))
        k += 1


#: elementwise graph nodes (smooth or piecewise linear): diagonal Jacobians
_ELEMENTWISE_NODES = set(SMOOTH) | {"ReluBackward0", "LeakyReluBackward0", "ThresholdBackward0",
                                     "HardtanhBackward0"}


def _diag_ok(rec) -> bool:
    return all(hasattr(lay, "diag_weighted") for lay in rec.layouts().values())


def _diagonal_fast_paths(src, r, by_edge) -> set:
    """Exact closed forms of Σ_k r_k (J_k·)² for the layers right at and one below ``src``.

    * ``src`` is a layer's output (J = I): a diagonal residual ``r`` at that output.
    * that layer is a Linear whose input is an elementwise function φ of another layer's
      output: J = W diag(φ'), whose squared entries are W² diag(φ'²), so the residual
      moves down as ``(r @ W²) ⊙ φ'²`` (the hint of Dangel et al.: no column propagation).
    """
    handled = set()
    rec = by_edge.get(src)
    if rec is None or not _diag_ok(rec):
        return handled
    rec.columns.add_diag_residual(r)
    handled.add(rec)
    e = rec.in_edge
    if not rec.rule.transports_diagonal or e is None:
        return handled
    if type(e.node).__name__ not in _ELEMENTWISE_NODES or not e.node.next_functions:
        return handled
    below = by_edge.get(GradientEdge(*e.node.next_functions[0]))
    # Exact only if every parameter entry below feeds a single input feature of the
    # Linear above within a row: true for a Linear below, not for a convolution or a
    # norm whose parameters are shared across the positions that Linear mixes.
    if below is None or not _diag_ok(below) or not below.rule.transports_diagonal:
        return handled
    # φ' at the lower layer's output: one backward through the elementwise node alone
    (d,) = torch.autograd.grad(e, below.edge, torch.ones(rec.args[0].shape, dtype=below.output.dtype,
                                                         device=r.device), retain_graph=True)
    d = d.to(r.dtype)
    W2 = rec.module.weight.detach().to(r.dtype).pow(2)
    below.columns.add_diag_residual((r @ W2) * d.pow(2))
    handled.add(below)
    return handled


def _nodes_below(root) -> set:
    seen, stack = set(), [root]
    while stack:
        n = stack.pop()
        if n is None or n in seen:
            continue
        seen.add(n)
        stack.extend(nf for nf, _ in n.next_functions)
    return seen


def _norm_residual(node, g):
    """Residual of LayerNorm/GroupNorm w.r.t. its input, per normalized row of ``M`` entries.

    With :math:`y = (x-\\mu)/\\sigma`, :math:`c = g \\odot \\gamma`, :math:`a = c - \\bar c`,
    :math:`s = a^\\top y`, the Hessian of :math:`c^\\top y` in :math:`x` is

    .. math:: R = \\frac{1}{M\\sigma^2}\\Big[-(a y^\\top + y a^\\top) - s\\,(I - \\tfrac1M 11^\\top)
              + \\tfrac{3s}{M} y y^\\top\\Big],

    i.e. :math:`-\\tfrac{s}{M\\sigma^2} I` (returned as an elementwise residual ``r``)
    plus a rank-3 part in span{a, y, 1}: three signed columns per row (``cols``,
    ``[3·S, N, *x]`` nonzero in one row each, weights ``[3·S, N]``).
    """
    x = node._saved_input.detach()
    N = x.shape[0]
    if type(node).__name__ == "NativeLayerNormBackward0":
        M = int(torch.tensor(node._saved_normalized_shape).prod())
        gamma = node._saved_weight
        c = g * gamma if gamma is not None else g
        rows = x.reshape(N, -1, M)
        c = c.reshape(N, -1, M)
        rstd = node._saved_result2.detach().reshape(N, -1, 1)
    else:  # NativeGroupNormBackward0: rows are (sample, group)
        G = node._saved_group
        gamma = node._saved_weight
        C = x.shape[1]
        c = g * gamma.reshape(1, C, *([1] * (x.dim() - 2))) if gamma is not None else g
        rows = x.reshape(N, G, -1)
        c = c.reshape(N, G, -1)
        M = rows.shape[-1]
        rstd = node._saved_result2.detach().reshape(N, G, 1)
    y = (rows - rows.mean(-1, keepdim=True)) * rstd  # [N, S, M]
    a = c - c.mean(-1, keepdim=True)
    s = (a * y).sum(-1, keepdim=True)  # [N, S, 1]
    scale = rstd.pow(2) / M  # 1/(M σ²)
    r_diag = (-s * scale).expand_as(y).reshape(x.shape)
    # Rank-3 part B C Bᵀ with B = [a, y, 1] (orthonormalised per row).
    ones = torch.ones_like(y)
    B = torch.stack([a, y, ones], -1)  # [N, S, M, 3]
    Cm = torch.zeros(*s.shape[:2], 3, 3, dtype=x.dtype, device=x.device)
    Cm[..., 0, 1] = Cm[..., 1, 0] = -1.0
    Cm[..., 1, 1] = 3 * s[..., 0] / M
    Cm[..., 2, 2] = s[..., 0] / M
    Cm = Cm * scale[..., None]
    Q, Rr = torch.linalg.qr(B.double())
    lam, U = torch.linalg.eigh(Rr @ Cm.double() @ Rr.transpose(-1, -2))
    V = (Q @ U).to(x.dtype)  # [N, S, M, 3]
    S = y.shape[1]
    # Column (j, s): row s of every sample carries V[:, s, :, j]; all other rows are zero.
    cols = torch.zeros(3, S, N, S, M, dtype=x.dtype, device=x.device)
    idx = torch.arange(S, device=x.device)
    cols[:, idx, :, idx, :] = V.permute(1, 3, 0, 2)  # [S, 3, N, M] at positions s == s
    cols = cols.reshape(3 * S, *x.shape)
    w = lam.to(x.dtype).permute(2, 1, 0).reshape(3 * S, N)  # [3, S, N] -> [3S, N]
    return r_diag, cols, w


def residual_diagonal(ctx):
    """:math:`\\sum_m \\operatorname{diag}(J_m^\\top \\operatorname{diag}(r_m) J_m)` of one parameter."""
    out = torch.zeros_like(ctx.param)
    for r, lay in ctx.items:
        if r.columns.diag_residual is not None:
            out = out + lay.diag_weighted(r.columns.diag_residual)
    for k in sorted({k for r, _ in ctx.items for k in r.columns.residuals}):
        out = out + diagonal(
            ctx, lambda c, k=k: c.residuals[k][0] if k in c.residuals else None,
            weights=lambda c, k=k: c.residuals[k][1])
    return out


@dataclass(frozen=True)
class DiagHessian(Quantity):
    """Exact diagonal of the Hessian of the loss, ``diag_h`` (``p.shape``).

    The GGN diagonal plus the residual terms of every smooth elementwise
    activation above the parameter,
    :math:`\\sum_m \\operatorname{diag}(J_m^\\top \\operatorname{diag}(\\phi_m''(a_m) \\odot \\partial\\mathcal L/\\partial \\phi_m) J_m)`.
    Piecewise-linear activations (ReLU, LeakyReLU, max pooling) add nothing.
    """

    savefield = "diag_h"
    needs_loss = True

    def columns(self):
        return {EXACT, RESIDUALS}

    def compute(self, ctx):
        return exact_diagonal(ctx) + residual_diagonal(ctx)
