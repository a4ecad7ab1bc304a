"""Normalization layers: affine parameters in the :class:`~.layout.Elementwise` layout.

``y = x̂ ⊙ γ + β`` where ``x̂`` is the normalized input, so per sample
:math:`\\nabla\\gamma = \\sum_s R_s \\odot \\hat x_s` and :math:`\\nabla\\beta = \\sum_s R_s`.
BatchNorm is supported in eval mode only (with running statistics): in train
mode it mixes samples and per-sample quantities do not exist.
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
    def check(self, module, name):
        if module.training or not module.track_running_stats or module.running_mean is None:
            raise CollectError(
                f"BatchNorm layer '{name}' ({module}) normalizes with statistics of the "
                "current batch (train mode or track_running_stats=False): samples are "
                "mixed, so per-sample and curvature quantities are not defined. Call "
                "model.eval() for this layer (or replace it by GroupNorm/LayerNorm)."
            )

    def layouts(self, module, args, kwargs, output):
        x = args[0]
        N, C = x.shape[0], module.num_features
        shape = (1, C) + (1,) * (x.dim() - 2)
        xhat = (x - module.running_mean.reshape(shape)) * torch.rsqrt(
            module.running_var.reshape(shape) + module.eps
        )
        X = xhat.reshape(N, C, -1).transpose(1, 2)
        return _affine(
            module, N, X, lambda cot: cot.reshape(cot.shape[0], N, C, -1).transpose(2, 3)
        )
