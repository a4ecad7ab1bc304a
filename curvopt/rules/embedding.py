"""``nn.Embedding``: integer indices ``[N, *]`` select rows; cotangents ``[K, N, S, dim]``."""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModuleError
from .layout import Embedding, Rule
from .registry import register


@register(nn.Embedding)
class EmbeddingRule(Rule):
    def kronecker(self, module):
        return {"weight"}

    def layouts(self, module, args, kwargs, output):
        if module.scale_grad_by_freq:
            raise UnsupportedModuleError(
                f"{module}: scale_grad_by_freq=True rescales gradients by counts over the "
                "whole batch, so per-sample quantities are not defined; set it to False."
            )
        if module.sparse:
            raise UnsupportedModuleError(
                f"{module}: sparse=True gradients are not supported; use sparse=False."
            )
        idx = args[0]
        N, dim = idx.shape[0], module.embedding_dim
        indices = idx.reshape(N, -1)
        S = indices.shape[1]
        if not module.weight.requires_grad:
            return {}
        return {
            "weight": Embedding(
                module.weight, N, indices=indices,
                rows=lambda cot: cot.reshape(cot.shape[0], N, S, dim),
                padding_idx=module.padding_idx,
            )
        }
