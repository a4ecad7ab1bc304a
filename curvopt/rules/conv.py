"""Convolutions (1d/2d/3d) and transposed convolutions, as :class:`~.layout.Dense` layouts.

Conv: the unfolded input patches ``U: [N, P, g, (C_in/g)·k…]`` (P output
positions) are the rows ``X``; the output gradient ``[K, N, C_out, *spatial]``
becomes ``R: [K, N, P, g, C_out/g]``, so :math:`\\nabla W = \\sum_p R_p^\\top U_p`.

ConvTranspose is the adjoint of a convolution with the same hyperparameters:
its weight gradient pairs the *input* (``[N, P_in, g, C_in/g]``) with the
unfolded *output gradient* (``[K, N, P_in, g, (C_out/g)·k…]``); hence the
layout is ``transposed``.

Kronecker factors (``kfac``/``kflr``), BackPACK's for ``groups == 1``:

* Conv, ``weight: [C_out, C_in/g, k…]``: ``[G, A]``, ``A = Σ_n U_n U_nᵀ / N`` over the
  unfolded patches, ``G`` from the output cotangent summed over positions.
* ConvTranspose, ``weight: [C_in, C_out/g, k…]``: ``[G, Ω]`` as BackPACK, ``G`` over
  output channels and ``Ω`` from the transposed convolution's own unfold, a Kronecker
  approximation of the GGN block of ``weight.transpose(0, 1)``.

Grouped and depthwise (``g > 1``): the same definitions per group, stacked along a
leading group dimension: ``G: [g, C_out/g, C_out/g]`` and ``A: [g, (C_in/g)·k…,
(C_in/g)·k…]``.  ``G[j] ⊗ A[j]`` belongs to group ``j``'s weight slice
``weight[j·C_out/g:(j+1)·C_out/g]`` (Conv) or ``weight[j·C_in/g:(j+1)·C_in/g]
.transpose(0, 1)`` (ConvTranspose), row-major; the blocks between groups are not
approximated (zero).  Depthwise (``g = C_in``): ``A: [g, k…, k…]`` and ``G: [g, m, m]``
for ``C_out = m·C_in`` (``m = 1``: scalars).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layout import Dense, Elementwise, Rule
from .registry import register


def _same_or_explicit_pads(module, nd) -> list[int]:
    """F.pad-style padding (last dim first) reproducing the module's padding, 'same' included."""
    pad = getattr(module, "_reversed_padding_repeated_twice", None)
    if pad is not None and len(pad) == 2 * nd:
        return list(pad)
    p = module.padding
    out = []
    for i in reversed(range(nd)):
        out += [p[i], p[i]]
    return out


def unfold(x, kernel, stride, dilation, pads, mode="constant"):
    """Patches of ``x: [N, C, *spatial]`` as ``[N, P, C·prod(kernel)]`` (any spatial rank).

    Padding ``pads`` is in F.pad order; ``mode`` one of F.pad's modes.  The patch
    entries are ordered ``(c, k_1, …, k_d)`` row-major, as in a conv weight.
    """
    nd = x.dim() - 2
    if any(pads):
        x = F.pad(x, pads, mode=mode) if mode != "constant" else F.pad(x, pads)
    if nd == 2 and x.dim() == 4:
        # F.unfold is the fastest path for the common case.
        u = F.unfold(x, kernel, dilation=dilation, stride=stride)  # [N, C·k, P]
        return u.transpose(1, 2)
    N, C = x.shape[:2]
    for i in range(nd):
        span = dilation[i] * (kernel[i] - 1) + 1
        x = x.unfold(2 + i, span, stride[i])  # appends a window dim
        if dilation[i] > 1:
            x = x[..., :: dilation[i]]
    # x: [N, C, P_1..P_d, k_1..k_d]
    P = x.shape[2 : 2 + nd]
    perm = [0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd)]
    x = x.permute(perm)
    return x.reshape(N, int(torch.tensor(P).prod()), -1)


def _mode(module):
    return {"zeros": "constant", "reflect": "reflect", "replicate": "replicate",
            "circular": "circular"}[module.padding_mode]


@register(nn.Conv1d, nn.Conv2d, nn.Conv3d)
class ConvRule(Rule):
    def kronecker(self, module):
        return {"weight", "bias"}

    def kfra_G(self, module, H, out_shape):
        # Per-sample output order (c, p): all position pairs (BackPACK's G); grouped: the
        # diagonal block of each group, [g, C_out/g, C_out/g], beside the per-group A.
        D, C, g = H.shape[0], out_shape[1], module.groups
        G = torch.einsum("apbq->ab", H.reshape(C, D // C, C, D // C))
        if g == 1:
            return G
        return G.reshape(g, C // g, g, C // g).diagonal(0, 0, 2).permute(2, 0, 1)

    def layouts(self, module, args, kwargs, output):
        x = args[0]
        if x.dim() == module.weight.dim() - 1:
            x = x.unsqueeze(0)  # unbatched input: a batch of one
        nd = x.dim() - 2
        N, g, C_out = x.shape[0], module.groups, module.out_channels
        pads = _same_or_explicit_pads(module, nd)
        U = unfold(x, module.kernel_size, module.stride, module.dilation, pads, _mode(module))
        P = U.shape[1]
        X = U.reshape(N, P, g, -1)

        def rows(cot):  # [K, N, C_out, *spatial] -> [K, N, P, g, C_out/g]
            K = cot.shape[0]
            return cot.reshape(K, N, g, C_out // g, P).permute(0, 1, 4, 2, 3)

        out = {}
        if module.weight.requires_grad:
            out["weight"] = Dense(module.weight, N, X=X, rows=rows, reduce_G=True)
        if module.bias is not None and module.bias.requires_grad:
            out["bias"] = Elementwise(
                module.bias, N, Xhat=None, reduce_G=True,
                rows=lambda cot: cot.reshape(cot.shape[0], N, C_out, P).transpose(2, 3),
            )
        return out


@register(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
class ConvTransposeRule(Rule):
    def kronecker(self, module):
        return {"weight", "bias"}

    kfra_G = ConvRule.kfra_G

    def layouts(self, module, args, kwargs, output):
        x = args[0]
        if x.dim() == module.weight.dim() - 1:
            x = x.unsqueeze(0)
        nd = x.dim() - 2
        N, g, C_in, C_out = x.shape[0], module.groups, module.in_channels, module.out_channels
        P_in = x[0, 0].numel()
        X = x.reshape(N, g, C_in // g, P_in).permute(0, 3, 1, 2)  # [N, P_in, g, C_in/g]
        pads = []
        for i in reversed(range(nd)):
            pads += [module.padding[i], module.padding[i]]
        ks, st, dil = module.kernel_size, module.stride, module.dilation

        def rows(cot):  # unfold the output gradient at the input positions
            K = cot.shape[0]
            c = cot.reshape(K * N, C_out, *cot.shape[3:])
            # The adjoint of conv_transpose is conv with the same stride/padding/dilation.
            U = unfold(c, ks, st, dil, pads, "constant")  # [K·N, P', C_out·k]
            # With output_padding >= stride it yields more positions than the input has
            # (rows that pair with no input entry): keep the first L_in per dimension.
            L = [(Lo + 2 * p - d * (k - 1) - 1) // s + 1 for Lo, p, d, k, s in
                 zip(c.shape[2:], module.padding, dil, ks, st)]
            if list(L) != list(x.shape[2:]):
                U = U.reshape(K * N, *L, -1)[(slice(None), *(slice(0, n) for n in x.shape[2:]))]
            return U.reshape(K, N, P_in, g, -1)

        def kron_rows(cot):  # [K, N, C_out]: summed over output positions (BackPACK's G)
            return cot.reshape(cot.shape[0], N, C_out, -1).sum(-1)

        def kron_X():  # the transposed convolution's unfold: [N, P_out, C_in·k…]
            Kk = int(torch.tensor(ks).prod())
            eye = torch.eye(C_in * Kk, dtype=x.dtype, device=x.device)
            w = eye.reshape(C_in * Kk, C_in, *ks).transpose(0, 1)  # [C_in, C_in·K, *k]
            conv_t = getattr(F, f"conv_transpose{nd}d")
            U = conv_t(x, w, None, st, module.padding, module.output_padding, 1, dil)
            return U.reshape(N, C_in * Kk, -1).transpose(1, 2)

        out = {}
        if module.weight.requires_grad:
            out["weight"] = Dense(module.weight, N, X=X, rows=rows, transposed=True,
                                  kron_rows=kron_rows, kron_X=kron_X)
        if module.bias is not None and module.bias.requires_grad:
            P_out = output[0, 0].numel() if output.dim() == x.dim() else output[0].numel()
            out["bias"] = Elementwise(
                module.bias, N, Xhat=None, reduce_G=True,
                rows=lambda cot: cot.reshape(cot.shape[0], N, C_out, P_out).transpose(2, 3),
            )
        return out
