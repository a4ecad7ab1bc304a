"""Parameters a container uses itself (class tokens, position embeddings, layer scales),
calls on a batch of one broadcast later, and calls whose batch is not the model's."""

from __future__ import annotations

import oracle
import pytest
import torch
from torch import nn
from util import assert_close

import curvopt
from curvopt import rules
from curvopt.errors import CurvoptError

FIRST = ("grad_batch", "sum_grad_squared", "variance", "batch_l2")


class TinyViT(nn.Module):
    """torchvision's pattern: the model owns class_token [1, 1, D], the encoder
    pos_embedding [1, S, D]; timm's layer scale (x.mul(gamma.reshape(...)))."""

    def __init__(self, D=4, S=3, C=3):
        super().__init__()
        self.embed = nn.Linear(5, D)
        self.class_token = nn.Parameter(torch.randn(1, 1, D))
        self.pos_embedding = nn.Parameter(torch.randn(1, S + 1, D))
        self.gamma = nn.Parameter(torch.randn(D))
        self.shift = nn.Parameter(torch.randn(S + 1, 1))
        self.mlp = nn.Sequential(nn.Linear(D, D), nn.Tanh())
        self.head = nn.Linear(D, C)

    def forward(self, x):  # x: [N, S, 5]
        x = self.embed(x)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embedding
        x = x + self.mlp(x).mul(self.gamma.reshape(1, 1, -1))
        x = x - self.shift
        return self.head(x[:, 0])


class OwnMatmul(nn.Module):
    """A container using its own weight in a matmul: the generic rule, for that weight only."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(4, 4)
        self.w = nn.Parameter(torch.randn(3, 4))

    def forward(self, x):
        return torch.tanh(self.inner(x)) @ self.w.T


class PosEmb(nn.Module):
    """GPT-2's pattern: an Embedding called on position ids [1, T], broadcast-added."""

    def __init__(self, V=7, T=4, D=3):
        super().__init__()
        self.wte, self.wpe, self.head = nn.Embedding(V, D), nn.Embedding(T, D), nn.Linear(D, V)

    def forward(self, ids):
        pos = torch.arange(ids.shape[1]).unsqueeze(0)
        return self.head(torch.tanh(self.wte(ids) + self.wpe(pos))).transpose(1, 2)


class PosFirst(PosEmb):
    """The batch-1 call comes before any batched call: expanded to the model's input batch."""

    def forward(self, ids):
        pos = self.wpe(torch.arange(ids.shape[1]).unsqueeze(0))
        return self.head(torch.tanh(pos + self.wte(ids))).transpose(1, 2)


class Relative(nn.Module):
    """T5's pattern: an Embedding called on [T, T] relative positions, not on the batch."""

    def __init__(self):
        super().__init__()
        self.rel = nn.Embedding(5, 1)
        self.lin = nn.Linear(3, 3)

    def forward(self, x):  # [N, T, 3]
        T = x.shape[1]
        idx = (torch.arange(T)[:, None] - torch.arange(T)[None, :]).clamp(-2, 2) + 2
        bias = self.rel(idx)[..., 0]  # [T, T]
        return (torch.softmax(bias, -1) @ self.lin(x)).sum(1)


def _case(name):
    torch.manual_seed(0)
    if name == "vit":
        return TinyViT().double(), torch.randn(6, 3, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    if name == "matmul":
        return OwnMatmul().double(), torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    model = {"pos": PosEmb, "posfirst": PosFirst}[name]().double()
    return model, torch.randint(0, 7, (5, 4)), torch.randint(0, 7, (5, 4))


@pytest.mark.parametrize("name", ["vit", "matmul", "pos", "posfirst"])
def test_first_order_and_ggn_diagonal_match_the_oracle(name):
    model, X, y = _case(name)
    loss_fn = nn.CrossEntropyLoss()
    exp = oracle.first_order(model, loss_fn, X, y)
    ggn = oracle.ggn_matrix(model, loss_fn, X, y)
    dg = oracle.diag_by_param(ggn, model)
    exts = [curvopt.BatchGrad(), curvopt.SumGradSquared(), curvopt.Variance(),
            curvopt.BatchL2Grad(), curvopt.DiagGGNExact(), curvopt.KFLR()]
    model.zero_grad(set_to_none=True)
    with curvopt.collect(model, loss_fn, *exts) as col:
        loss_fn(model(X), y).backward()
    for pn, res in exp.items():
        got = col.results[pn]
        for f in FIRST:
            assert_close(got[f], res[f], f"{name}:{pn}.{f}", rtol=1e-9)
        assert_close(got["diag_ggn_exact"], dg[pn], f"{name}:{pn}.diag_ggn_exact", rtol=1e-9)
        kf = got["kflr"]
        if len(kf) == 1:  # a dense block: the GGN block itself
            assert_close(kf[0], oracle.block(ggn, model, pn), f"{name}:{pn}.kflr", rtol=1e-9)


def test_container_children_keep_their_fast_rules():
    model, _, _ = _case("vit")
    assert type(rules.lookup(model.embed)).__name__ == "LinearRule"
    assert rules.container_params(model) == ["class_token", "pos_embedding", "gamma", "shift"]
    assert rules.container_params(nn.MultiheadAttention(4, 2)) is None  # differentiated whole


def test_call_not_on_the_models_batch_raises():
    torch.manual_seed(0)
    model = Relative().double()
    X, y = torch.randn(4, 3, 3, dtype=torch.float64), torch.randint(0, 3, (4,))
    with pytest.raises(CurvoptError, match="rel"):
        with curvopt.collect(model, nn.CrossEntropyLoss(), curvopt.BatchGrad()):
            nn.CrossEntropyLoss()(model(X), y).backward()


class ChildUsedFunctionally(nn.Module):
    """A parent using its child's weight via F.linear: no call of the child is recorded."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(torch.nn.functional.linear(x, self.inner.weight))


def test_parameter_used_outside_recorded_calls_warns():
    torch.manual_seed(0)
    model, loss_fn = ChildUsedFunctionally(), nn.CrossEntropyLoss()
    X, y = torch.randn(3, 4), torch.randint(0, 2, (3,))
    with pytest.warns(RuntimeWarning, match="inner.weight"):
        with curvopt.collect(model, loss_fn, curvopt.BatchGrad()):
            loss_fn(model(X), y).backward()
