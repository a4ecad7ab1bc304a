"""Generic rule for any module that owns parameters and has no fast rule.

Per-sample gradients come from ``torch.func``: the module's own function is
re-evaluated on one sample at a time (``vmap`` over the batch) and its
vector-Jacobian product with each cotangent gives the gradient of every
parameter in the module's subtree.  Slower than a closed-form rule, never
wrong: it differentiates the module's actual code.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from ..errors import UnsupportedModuleError
from .layout import Materialized, Rule


def batch_dim(module) -> int:
    """Where the batch lives in the module's inputs/outputs (MHA without batch_first: 1)."""
    if isinstance(module, nn.MultiheadAttention) and not module.batch_first:
        return 1
    return 0


class FallbackRule(Rule):
    """``torch.func`` per-sample gradients of every parameter in the module's subtree
    (``names``: of these parameters the module owns directly; its children keep theirs)."""

    locates_batch = True

    def __init__(self, names: frozenset | None = None):
        self.names = names  # None: the whole subtree; else these own parameters only
        self.covers_subtree = names is None

    def layouts(self, module, args, kwargs, output):
        if self.names is not None:
            params = {n: p for n, p in module.named_parameters(recurse=False)
                      if p.requires_grad and n in self.names}
        else:
            params = {n: p for n, p in module.named_parameters() if p.requires_grad}
        if not params:
            return {}
        bd = batch_dim(module)
        N = args[0].shape[bd]
        # float32 (or wider) like the captured inputs: statistics of low-precision models
        detached = {n: p.detach().to(torch.promote_types(p.dtype, torch.float32))
                    if p.is_floating_point() else p.detach() for n, p in params.items()}
        tensor_pos = [i for i, a in enumerate(args) if torch.is_tensor(a)]
        # Tensor keyword arguments that carry the batch (e.g. key_padding_mask) are vmapped too.
        batched_kw = {k: v for k, v in kwargs.items()
                      if torch.is_tensor(v) and k in ("key_padding_mask",)}
        static_kw = {k: v for k, v in kwargs.items() if k not in batched_kw}
        args_d = [a.detach() if torch.is_tensor(a) else a for a in args]
        kw_d = {k: v.detach() for k, v in batched_kw.items()}

        def first_output(out):
            return out[0] if isinstance(out, (tuple, list)) else out

        def loss_one(p, xs, kws, c):
            call_args = list(args_d)
            for i, x in zip(tensor_pos, xs):
                call_args[i] = x.unsqueeze(bd)
            call_kw = dict(static_kw)
            call_kw.update({k: v.unsqueeze(0) for k, v in kws.items()})
            out = first_output(functional_call(module, p, tuple(call_args), call_kw))
            return (out * c.unsqueeze(bd)).sum()

        g = grad(loss_one)
        xs = tuple(args_d[i] for i in tensor_pos)

        def per_sample(cot):  # [K, *out] with batch at 1 + bd -> {name: [K, N, *shape]}
            try:
                over_n = vmap(g, in_dims=(None, bd, 0, bd), randomness="error")
                over_k = vmap(over_n, in_dims=(None, None, None, 0), randomness="error")
                return over_k(detached, xs, kw_d, cot)
            except RuntimeError as e:
                raise UnsupportedModuleError(
                    f"the generic per-sample rule could not differentiate {type(module).__name__} "
                    f"sample by sample ({e}). Register a rule for it with "
                    "curvopt.rules.register, or put the module in eval mode if it uses randomness."
                ) from e

        cache: dict[int, dict] = {}

        def make(name):
            def fn(cot):
                key = id(cot)
                if key not in cache:
                    cache.clear()
                    cache[key] = (cot, per_sample(cot))
                return cache[key][1][name]

            return fn

        return {n: Materialized(p, N, fn=make(n)) for n, p in params.items()}


FALLBACK = FallbackRule()
