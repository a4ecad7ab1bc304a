"""nn.MultiheadAttention's closed-form rule against the float64 oracle."""

from __future__ import annotations

import oracle
import pytest
import torch
from torch import nn
from util import assert_close

import curvopt
from curvopt import rules
from curvopt.rules.layout import Dense, Materialized

FIRST = ("grad_batch", "sum_grad_squared", "variance", "batch_l2")


class Net(nn.Module):
    def __init__(self, batch_first=True, cross=False, mask=None, kpm=False, need_weights=False,
                 bias=True, causal=False):
        super().__init__()
        self.attn = nn.MultiheadAttention(6, 2, batch_first=batch_first, bias=bias)
        self.kv = nn.Linear(6, 6) if cross else None
        self.head = nn.Linear(6, 3)
        self.bf, self.mask, self.kpm, self.nw, self.causal = batch_first, mask, kpm, need_weights, causal

    def forward(self, x):  # x: [N, L, 6]
        kv = torch.tanh(self.kv(x)) if self.kv is not None else x
        q, kv = (x, kv) if self.bf else (x.transpose(0, 1), kv.transpose(0, 1))
        kw = dict(need_weights=self.nw)
        L = x.shape[1]
        if self.mask == "causal":
            kw["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(L, dtype=x.dtype)
            kw["is_causal"] = self.causal
        if self.kpm:
            m = torch.zeros(x.shape[0], L, dtype=torch.bool)
            m[0, -1] = True
            kw["key_padding_mask"] = m
        a, _ = self.attn(q, kv, kv, **kw)
        a = a if self.bf else a.transpose(0, 1)
        return self.head(torch.tanh(a).mean(1))


CASES = {
    "self": dict(),
    "seq_first": dict(batch_first=False),
    "cross": dict(cross=True),
    "causal_mask": dict(mask="causal", causal=True),
    "padding_mask_weights": dict(kpm=True, need_weights=True),
    "no_bias": dict(bias=False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_the_oracle(case):
    torch.manual_seed(0)
    model = Net(**CASES[case]).double()
    X = torch.randn(4, 5, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (4,))
    loss_fn = nn.CrossEntropyLoss()
    exp = oracle.first_order(model, loss_fn, X, y)
    ggn = oracle.ggn_matrix(model, loss_fn, X, y)
    dg = oracle.diag_by_param(ggn, model)
    model.zero_grad(set_to_none=True)
    with curvopt.collect(model, loss_fn, curvopt.BatchGrad(), curvopt.SumGradSquared(),
                         curvopt.Variance(), curvopt.BatchL2Grad(), curvopt.DiagGGNExact(),
                         curvopt.KFLR()) as col:
        loss_fn(model(X), y).backward()
    for pn, res in exp.items():
        for f in FIRST:
            assert_close(col.results[pn][f], res[f], f"{case}:{pn}.{f}", rtol=1e-9)
        assert_close(col.results[pn]["diag_ggn_exact"], dg[pn], f"{case}:{pn}.diag", rtol=1e-9)
    kf = col.results["attn.in_proj_weight"]["kflr"]
    assert len(kf) == 2 and kf[0].shape == ((18, 18) if case != "cross" else (3, 6, 6))


def test_closed_form_layouts_not_the_generic_rule():
    torch.manual_seed(0)
    m = nn.MultiheadAttention(6, 2, batch_first=True).double()
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    out, _ = m(x, x, x)
    lays = rules.lookup(m).layouts(m, (x, x, x), {}, out)
    assert all(isinstance(lays[n], Dense) for n in ("in_proj_weight", "out_proj.weight"))
    kd = nn.MultiheadAttention(6, 2, kdim=4, vdim=4, batch_first=True).double()
    kv = torch.randn(2, 3, 4, dtype=torch.float64)
    out, _ = kd(x, kv, kv)
    lays = rules.lookup(kd).layouts(kd, (x, kv, kv), {}, out)
    assert all(isinstance(v, Materialized) for v in lays.values())
    assert rules.lookup(kd).kronecker(kd) == set()


def test_kronecker_block_is_the_ggn_block_at_one_sample_one_token():
    torch.manual_seed(0)
    model = Net().double()
    X = torch.randn(1, 1, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (1,))
    loss_fn = nn.CrossEntropyLoss()
    ggn = oracle.ggn_matrix(model, loss_fn, X, y)
    with curvopt.collect(model, loss_fn, curvopt.KFLR()) as col:
        loss_fn(model(X), y).backward()
    for pn in ("attn.in_proj_weight", "attn.out_proj.weight"):
        G, A = col.results[pn]["kflr"]
        assert_close(torch.kron(G, A), oracle.block(ggn, model, pn), f"{pn}: kron(G, A)", rtol=1e-9)
