"""``KFESumGradSquared`` (EKFAC's request) against a float64 oracle.

Oracle: per-sample gradients from autograd (``oracle.per_sample_grads``, one backward per
sample), each projected into random orthogonal bases with an explicit loop over samples
and groups, :math:`\\sum_n (Q_1^\\top g_n Q_2)^{\\odot2}` (one factor: :math:`Q_1^\\top g_n`).
Every case runs twice: as the engine chooses (rotated rows and inputs where the layout
allows it) and with the rotation switched off (materialised per-sample gradients
projected), so both paths meet the same oracle.
"""

from __future__ import annotations

import oracle
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from util import assert_close

import curvopt
from curvopt.extensions import ALL
from curvopt.quantities import BY_SAVEFIELD, KFESumGradSquared
from curvopt.rules import layout

DT = torch.float64
FIELD = KFESumGradSquared.savefield


def orthogonal(d: int, gen: torch.Generator, groups: int | None = None) -> torch.Tensor:
    if groups is None:
        return torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=DT))[0]
    return torch.stack([orthogonal(d, gen) for _ in range(groups)])


def oracle_kfe(gb: torch.Tensor, Qs: list[torch.Tensor]) -> torch.Tensor:
    """Explicit loops over samples (and groups): Σ_n (Q_1ᵀ g_n Q_2)²."""
    grouped = Qs[0].dim() == 3
    sides = [Q.shape[-1] for Q in Qs]
    g = Qs[0].shape[0] if grouped else 1
    out = torch.zeros(g, *sides, dtype=DT)
    for gn in gb:
        v = gn.reshape(g, *sides)
        for j in range(g):
            Q = [Q[j] if grouped else Q for Q in Qs]
            t = Q[0].T @ v[j] if len(Q) == 1 else Q[0].T @ v[j] @ Q[1]
            out[j] += t * t
    return out.reshape(gb.shape[1:])


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)


def _conv(cin, cout, k, groups, hw):
    def make():
        torch.manual_seed(0)
        out = hw - k + 1
        return nn.Sequential(nn.Conv2d(cin, cout, k, groups=groups), nn.Tanh(), nn.Flatten(),
                             nn.Linear(cout * out * out, 3)).to(DT)
    return make


def _conv1d_hf():
    Conv1D = pytest.importorskip("transformers").pytorch_utils.Conv1D
    torch.manual_seed(0)
    return nn.Sequential(Conv1D(5, 4), nn.Tanh(), Conv1D(3, 5)).to(DT)


def _embedding():
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(7, 4), nn.Flatten(), nn.Linear(12, 3)).to(DT)


#: name -> (model factory, input [N=6 samples], target kind, bases spec per parameter)
#: bases spec: sides (and groups) of the factors in the layout's order.
CASES = {
    "linear": (_mlp, lambda g: torch.randn(6, 4, generator=g, dtype=DT), "ce"),
    "linear_sequence": (_mlp, lambda g: torch.randn(6, 3, 4, generator=g, dtype=DT),
                        "mse"),
    # S = 4 positions, d_G = 4, d_A = 16 per group: rotating every row is cheaper
    "conv_groups2_rotated": (_conv(8, 8, 2, 2, 3),
                             lambda g: torch.randn(6, 8, 3, 3, generator=g, dtype=DT), "ce"),
    # S = 9, d_G = 2, d_A = 18: projecting materialised gradients is cheaper
    "conv_groups2_projected": (_conv(4, 4, 3, 2, 5),
                               lambda g: torch.randn(6, 4, 5, 5, generator=g, dtype=DT), "ce"),
    "conv": (_conv(3, 5, 2, 1, 3), lambda g: torch.randn(6, 3, 3, 3, generator=g, dtype=DT), "ce"),
    "hf_conv1d": (_conv1d_hf, lambda g: torch.randn(6, 4, generator=g, dtype=DT), "ce"),
    "embedding": (_embedding, lambda g: torch.randint(0, 7, (6, 3), generator=g), "ce"),
}


def bases_for(model: nn.Module, gen: torch.Generator) -> dict[int, list[torch.Tensor]]:
    """Random orthogonal bases shaped like each parameter's Kronecker factors."""
    out = {}
    for m in model.modules():
        for name, p in m.named_parameters(recurse=False):
            if name == "bias":
                out[id(p)] = [orthogonal(p.shape[0], gen)]
            elif isinstance(m, nn.Conv2d):
                g = m.groups
                sides = (m.out_channels // g, p[0].numel())
                out[id(p)] = [orthogonal(sides[0], gen, g if g > 1 else None),
                              orthogonal(sides[1], gen, g if g > 1 else None)]
            else:  # Linear [out, in], HF Conv1D [in, out] ("AG"), Embedding [num, dim] ("AG")
                out[id(p)] = [orthogonal(p.shape[0], gen), orthogonal(p.shape[1], gen)]
    return out


def _target(kind, out, gen):
    if kind == "ce":
        return torch.randint(0, out.shape[-1], (out.shape[0],), generator=gen)
    return torch.randn(out.shape, generator=gen, dtype=DT)


@pytest.fixture(params=["engine", "projected"])
def path(request, monkeypatch):
    """``engine``: the layouts' rotations where they apply; ``projected``: none (the
    fallback, materialised per-sample gradients projected) for every layout."""
    if request.param == "projected":
        for cls in (layout.DenseBound, layout.ElementwiseBound):
            monkeypatch.setattr(cls, "rotated", lambda self, Qs: None)
    return request.param


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_projected_per_sample_gradients(case, reduction, path):
    make, inputs, kind = CASES[case]
    model = make()
    gen = torch.Generator().manual_seed(1)
    X = inputs(gen)
    with torch.no_grad():
        y = _target(kind, model(X), gen)
    loss_fn = (nn.CrossEntropyLoss if kind == "ce" else nn.MSELoss)(reduction=reduction)
    B = bases_for(model, gen)
    with curvopt.collect(model, loss_fn, KFESumGradSquared(bases=lambda p: B.get(id(p)))) as col:
        loss_fn(model(X), y).backward()
    ref = oracle.per_sample_grads(model, loss_fn, X, y)
    params = dict(model.named_parameters())
    for name, gb in ref.items():
        got = col.results[name][FIELD]
        assert_close(got, oracle_kfe(gb, B[id(params[name])]), f"{case}/{name}")


def test_rotation_is_used_where_cheaper(monkeypatch):
    """The fast path is taken for dense layers with one row per sample, small S, and biases."""
    used = []
    for cls in (layout.DenseBound, layout.ElementwiseBound):
        orig = cls.rotated
        monkeypatch.setattr(cls, "rotated",
                            lambda self, Qs, orig=orig: used.append(orig(self, Qs)) or used[-1])
    for case in ("linear", "linear_sequence", "conv_groups2_rotated", "conv_groups2_projected"):
        used.clear()
        make, inputs, kind = CASES[case]
        model = make()
        gen = torch.Generator().manual_seed(1)
        X = inputs(gen)
        y = _target(kind, model(X), gen)
        B = bases_for(model, gen)
        loss_fn = nn.CrossEntropyLoss() if kind == "ce" else nn.MSELoss()
        with curvopt.collect(model, loss_fn, KFESumGradSquared(bases=lambda p, B=B: B.get(id(p)))):
            loss_fn(model(X), y).backward()
        rotated = [u is not None for u in used]
        assert rotated == ([False, True, True, True] if case == "conv_groups2_projected"
                           else [True] * 4), (case, rotated)


def test_no_basis_means_nothing_computed():
    model = _mlp()
    X, y = torch.randn(6, 4, dtype=DT), torch.randint(0, 3, (6,))
    w = model[0].weight
    Q = [orthogonal(5, torch.Generator()), orthogonal(4, torch.Generator())]
    loss_fn = nn.CrossEntropyLoss()
    with curvopt.collect(model, loss_fn, KFESumGradSquared(bases=lambda p: Q if p is w else None)
                         ) as col:
        loss_fn(model(X), y).backward()
    assert FIELD in col.results["0.weight"]
    assert all(FIELD not in col.results[n] for n in ("0.bias", "2.weight", "2.bias"))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_two_micro_batches_equal_one_batch(reduction):
    gen = torch.Generator().manual_seed(2)
    X, y = torch.randn(7, 4, generator=gen, dtype=DT), torch.randint(0, 3, (7,), generator=gen)
    model = _mlp()
    B = bases_for(model, gen)
    q = KFESumGradSquared(bases=lambda p: B.get(id(p)))
    loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    with curvopt.collect(model, loss_fn, q) as one:
        loss_fn(model(X), y).backward()
    with curvopt.collect(model, loss_fn, q, accumulate=True) as acc:
        for sl in (slice(0, 3), slice(3, 7)):
            loss_fn(model(X[sl]), y[sl]).backward()
    for name in one.results:
        assert_close(acc.results[name][FIELD], one.results[name][FIELD], f"accumulated {name}")


@given(n=st.integers(1, 5), s=st.integers(1, 4), d_in=st.integers(1, 5), d_out=st.integers(1, 5),
       seed=st.integers(0, 2**16))
def test_linear_shapes(n, s, d_in, d_out, seed):
    gen = torch.Generator().manual_seed(seed)
    model = nn.Linear(d_in, d_out).to(DT)
    X = torch.randn(n, s, d_in, generator=gen, dtype=DT)
    y = torch.randn(n, s, d_out, generator=gen, dtype=DT)
    B = bases_for(model, gen)
    loss_fn = nn.MSELoss()
    with curvopt.collect(model, loss_fn, KFESumGradSquared(bases=lambda p: B.get(id(p)))) as col:
        loss_fn(model(X), y).backward()
    ref = oracle.per_sample_grads(model, loss_fn, X, y)
    for name, p in model.named_parameters():
        assert_close(col.results[name][FIELD], oracle_kfe(ref[name], B[id(p)]), name)


def test_not_one_of_the_ten():
    """An optimizer's request: the user-facing lists keep BackPACK's ten."""
    assert len(ALL) == 10 and KFESumGradSquared not in ALL
    assert FIELD not in BY_SAVEFIELD
    from curvopt.recipes.schema import SAVEFIELDS
    assert FIELD not in SAVEFIELDS and len(SAVEFIELDS) == 10
