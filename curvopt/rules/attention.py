"""``nn.MultiheadAttention``: closed-form rules for its four projections.

The module calls ``F.multi_head_attention_forward`` with its weights as tensors
(hooks on ``out_proj`` never fire), so the rule takes the whole module.  Both
projections are linear maps of the module's inputs; the attention between them
only changes what flows back:

* ``out_proj`` (``y = a W_oᵀ + b_o``): rows ``X = a`` (the attention output before the
  projection, ``[N, L, E]``) and the cotangent at the module output;
* ``in_proj_weight`` (``[q; k; v] = x W_inᵀ + b_in``): rows ``X = x`` and the cotangent at
  the projections, obtained by sending the output cotangent back through the
  attention alone.  Self-attention (``query is key is value``) is one Linear with
  ``3E`` outputs; attention over other keys/values is three groups (``q``, ``k``, ``v``:
  a grouped Dense layout, Kronecker factors per group).

Both are computed by ``F.multi_head_attention_forward`` itself with identity projections,
so masks, causal attention and head splitting are torch's own.  Per-sample quantities,
diagonals and Kronecker factors (the *expand* convention over the sequence, as Linear
on ``[N, S, D]``) follow from the Dense/Elementwise layouts.  Configurations without a
closed form here (``kdim``/``vdim``, ``bias_k``/``bias_v``, ``add_zero_attn``, unbatched
inputs, keys of another length than the queries, dropout in train mode) take the
generic rule (exact, slower).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .fallback import FALLBACK
from .layout import Dense, Elementwise, Rule
from .registry import register


def _closed_form(module) -> bool:
    return (module._qkv_same_embed_dim and module.bias_k is None and module.bias_v is None
            and not module.add_zero_attn)


def _inputs(module, args, kwargs):
    names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask",
             "average_attn_weights", "is_causal")
    call = dict(zip(names, args))
    call.update({k: v for k, v in kwargs.items() if k in names})
    return call


@register(nn.MultiheadAttention)
class MultiheadAttentionRule(Rule):
    covers_subtree = True  # out_proj is read here: its own hooks never fire
    locates_batch = True

    def kronecker(self, module):
        if not _closed_form(module):
            return set()
        names = {"in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"}
        return {n for n, p in module.named_parameters() if n in names}

    def layouts(self, module, args, kwargs, output):
        c = _inputs(module, args, kwargs)
        q, k, v = c["query"], c.get("key", c["query"]), c.get("value", c["query"])
        same = q.shape == k.shape == v.shape
        if (not _closed_form(module) or q.dim() != 3 or not same
                or (module.training and module.dropout > 0)):
            return FALLBACK.layouts(module, args, kwargs, output)
        bf = module.batch_first
        self_attn = (q.data_ptr() == k.data_ptr() == v.data_ptr() and q.stride() == k.stride()
                     == v.stride())
        qs, ks, vs = (t.transpose(0, 1) if bf else t for t in (q, k, v))  # [L, N, E]
        L, N, E = qs.shape
        W_in = module.in_proj_weight.detach().to(qs.dtype)
        b_in = None if module.in_proj_bias is None else module.in_proj_bias.detach().to(qs.dtype)
        W_o = module.out_proj.weight.detach().to(qs.dtype)
        b_o = None if module.out_proj.bias is None else module.out_proj.bias.detach().to(qs.dtype)
        eye = torch.eye(E, dtype=qs.dtype, device=qs.device)
        mask, kpm = c.get("attn_mask"), c.get("key_padding_mask")
        causal = bool(c.get("is_causal", False))

        def attention(qkv):  # projected [L, N, 3E] -> attention output before out_proj
            qp, kp, vp = qkv.chunk(3, dim=-1)
            a, _ = F.multi_head_attention_forward(
                qp, kp, vp, E, module.num_heads, None, None, None, None, False, 0.0, eye, None,
                training=False, key_padding_mask=kpm, need_weights=False, attn_mask=mask,
                use_separate_proj_weight=True, q_proj_weight=eye, k_proj_weight=eye,
                v_proj_weight=eye, is_causal=causal)
            return a

        with torch.enable_grad():
            if self_attn:
                qkv = F.linear(qs, W_in, b_in)
            else:
                qkv = torch.cat([F.linear(t, w, None if b_in is None else bb) for t, w, bb in
                                 zip((qs, ks, vs), W_in.chunk(3), (b_in.chunk(3) if b_in is not None
                                                                    else (None,) * 3))], -1)
            qkv = qkv.detach().requires_grad_(True)
            a = attention(qkv)
            y = F.linear(a, W_o, b_o)
        a = a.detach()
        cache: dict = {}

        def seq_first(cot):  # [K, *module output] -> [K, L, N, E]
            return cot.transpose(1, 2) if bf else cot

        def cot_qkv(cot):  # [K, L, N, 3E], once per cotangent batch
            if cache.get("key") is not cot:
                K, c = cot.shape[0], seq_first(cot)
                (g,) = torch.autograd.grad(y, qkv, c if K > 1 else c[0], retain_graph=True,
                                           is_grads_batched=K > 1)
                cache.update(key=cot, value=g if K > 1 else g.unsqueeze(0))
            return cache["value"]

        def batch_first_rows(t, g):  # [K, L, N, g·D] -> [K, N, L, g, D]
            return t.transpose(1, 2).reshape(t.shape[0], N, L, g, -1)

        out = {}
        groups = 1 if self_attn else 3
        X_in = (qs.transpose(0, 1).unsqueeze(2) if self_attn
                else torch.stack([qs, ks, vs], 2).transpose(0, 1))  # [N, L, g, E]
        if module.in_proj_weight.requires_grad:
            out["in_proj_weight"] = Dense(
                module.in_proj_weight, N, X=X_in, expand=True,
                rows=lambda cot: batch_first_rows(cot_qkv(cot), groups))
        if module.in_proj_bias is not None and module.in_proj_bias.requires_grad:
            out["in_proj_bias"] = Elementwise(
                module.in_proj_bias, N, Xhat=None,
                rows=lambda cot: cot_qkv(cot).transpose(1, 2).reshape(cot.shape[0], N, L, 3 * E))
        if module.out_proj.weight.requires_grad:
            out["out_proj.weight"] = Dense(
                module.out_proj.weight, N, X=a.transpose(0, 1).unsqueeze(2), expand=True,
                rows=lambda cot: batch_first_rows(seq_first(cot), 1))
        if module.out_proj.bias is not None and module.out_proj.bias.requires_grad:
            out["out_proj.bias"] = Elementwise(
                module.out_proj.bias, N, Xhat=None,
                rows=lambda cot: seq_first(cot).transpose(1, 2).reshape(cot.shape[0], N, L, E))
        return out
