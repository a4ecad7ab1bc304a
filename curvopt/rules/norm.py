"""Normalization layers: affine parameters in the :class:`~.layout.Elementwise` layout.

``y = x̂ ⊙ γ + β`` where ``x̂`` is the normalized input, so per sample
:math:`\\nabla\\gamma = \\sum_s R_s \\odot \\hat x_s` and :math:`\\nabla\\beta = \\sum_s R_s`.
BatchNorm is exact in eval mode (with running statistics); in train mode it mixes
samples (see :class:`BatchNormRule` for the opt-in that treats rows as samples).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CollectError
from .layout import Elementwise, Rule
from .registry import register


def _affine(module, N, xhat_rows, rows_fn):
    out = {}
    w, b = getattr(module, "weight", None), getattr(module, "bias", None)
    if w is not None and w.requires_grad:
        out["weight"] = Elementwise(w, N, Xhat=xhat_rows, rows=rows_fn)
    if b is not None and b.requires_grad:
        # A norm bias has no Kronecker structure: its single factor is the exact GGN
        # block, which sums the rows of a sample before the outer product.
        out["bias"] = Elementwise(b, N, Xhat=None, rows=rows_fn, reduce_G=True)
    return out


@register(nn.LayerNorm)
class LayerNormRule(Rule):
    def layouts(self, module, args, kwargs, output):
        x = args[0]
        N, D = x.shape[0], module.weight.numel() if module.weight is not None else 1
        xhat = F.layer_norm(x, module.normalized_shape, None, None, module.eps)
        X = xhat.reshape(N, -1, D)
        S = X.shape[1]
        return _affine(module, N, X, lambda cot: cot.reshape(cot.shape[0], N, S, D))


if hasattr(nn, "RMSNorm"):

    @register(nn.RMSNorm)
    class RMSNormRule(Rule):
        def layouts(self, module, args, kwargs, output):
            x = args[0]
            N = x.shape[0]
            if module.weight is None:
                return {}
            D = module.weight.numel()
            xhat = F.rms_norm(x, module.normalized_shape, None, module.eps)
            X = xhat.reshape(N, -1, D)
            S = X.shape[1]
            return _affine(module, N, X, lambda cot: cot.reshape(cot.shape[0], N, S, D))


@register(nn.GroupNorm)
class GroupNormRule(Rule):
    def layouts(self, module, args, kwargs, output):
        x = args[0]
        N, C = x.shape[0], module.num_channels
        xhat = F.group_norm(x, module.num_groups, None, None, module.eps)
        X = xhat.reshape(N, C, -1).transpose(1, 2)
        return _affine(
            module, N, X, lambda cot: cot.reshape(cot.shape[0], N, C, -1).transpose(2, 3)
        )


@register(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
class BatchNormRule(Rule):
    """BatchNorm: exact in eval mode (running statistics: the layer is elementwise per sample).

    In train mode (or without running statistics) it normalizes with the statistics of the
    current batch, so every sample's output depends on every other sample: per-sample and
    curvature quantities are not defined.  With the collector's ``batch_coupling="rows"``
    the engine treats the rows of what flows back as samples (the K-FAC practice); the
    affine parameters then read ``x̂`` normalized with the batch statistics, as the forward
    pass did.
    """

    @staticmethod
    def couples(module) -> bool:
        return module.training or not module.track_running_stats or module.running_mean is None

    def check(self, module, name, coupling="error"):
        if self.couples(module) and coupling != "rows":
            raise CollectError(
                f"BatchNorm layer '{name}' ({module}) normalizes with statistics of the "
                "current batch (train mode or track_running_stats=False): samples are "
                "mixed, so per-sample and curvature quantities are not defined. Call "
                "model.eval() for this layer, or pass batch_coupling='rows' to treat the "
                "rows of what flows back as samples (the K-FAC practice; curvopt's "
                "optimizers do so by default)."
            )
        return self.couples(module)

    def layouts(self, module, args, kwargs, output):
        x = args[0]
        N, C = x.shape[0], module.num_features
        if self.couples(module):  # normalized with this batch's statistics, as in forward
            xhat = F.batch_norm(x, None, None, training=True, eps=module.eps)
        else:
            shape = (1, C) + (1,) * (x.dim() - 2)
            xhat = (x - module.running_mean.reshape(shape).to(x.dtype)) * torch.rsqrt(
                module.running_var.reshape(shape).to(x.dtype) + module.eps
            )
        X = xhat.reshape(N, C, -1).transpose(1, 2)
        return _affine(
            module, N, X, lambda cot: cot.reshape(cot.shape[0], N, C, -1).transpose(2, 3)
        )
