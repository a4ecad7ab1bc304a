"""EKFAC (``KFACOptimizer(eigen_correction=True)``) against float64 oracles.

The rescaling :math:`s = f \\sum_n (Q_G^\\top \\nabla\\ell_n Q_A)^{\\odot2}` is recomputed
here from per-sample gradients of ``torch.func`` (one sample's unreduced loss at a
time, so a sequence's rows are summed as one sample's gradient) and the
eigenbases of independently computed factors; the update is checked against a
dense solve with the explicit EKFAC matrix :math:`(Q_G \\otimes Q_A)\\,
\\mathrm{diag}(s + \\lambda)\\,(Q_G \\otimes Q_A)^\\top`.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from curvopt.optim import KFACOptimizer
from curvopt.optim import functional as F
from curvopt.optim.kronecker import EKFACBlock

from .cases import DT, batches, kflr_factors, tiny_mlp

TOL = dict(rtol=1e-9, atol=1e-12)


def sample_grads(model, X, y, loss_fn, rows=1):
    """``{param: [N, *shape]}``: gradients of each sample's *unreduced* loss, and ``f``.

    ``rows``: loss rows per sample (the model's ``[N, T, C]`` output is flattened to
    ``[N·T, C]`` as the training loop does); the sample's gradient sums them.
    """
    params = {k: v.detach() for k, v in model.named_parameters()}
    unreduced = type(loss_fn)(reduction="sum")

    def one(p, x, t):
        out = functional_call(model, p, (x.unsqueeze(0),))
        return unreduced(out.reshape(-1, out.shape[-1]), t.reshape(-1))

    gs = vmap(grad(one), in_dims=(None, 0, 0))(params, X, y)
    named = dict(model.named_parameters())
    f = 1.0 / (X.shape[0] * rows) if loss_fn.reduction == "mean" else 1.0
    return {named[k]: v for k, v in gs.items()}, f


def oracle_scale(g, Qs, f):
    """:math:`f \\sum_n (Q_1^\\top g_n Q_2)^{\\odot 2}` with explicit loops over samples."""
    out = torch.zeros(g.shape[1:], dtype=DT)
    for gn in g:
        if len(Qs) == 1:
            t = Qs[0].T @ gn
        else:
            t = Qs[0].T @ gn @ Qs[1]
        out += t * t
    return f * out


def ekfac_matrix(Qs, s):
    """The dense EKFAC curvature :math:`Q\\,\\mathrm{diag}(s)\\,Q^\\top`, :math:`Q = Q_1 \\otimes Q_2`."""
    Q = Qs[0] if len(Qs) == 1 else torch.kron(Qs[0], Qs[1])
    return Q @ torch.diag(s.reshape(-1)) @ Q.T


def eigenvectors(fs):
    return [torch.linalg.eigh(f)[1] for f in fs]


def make(model, loss_fn, **kw):
    hp = dict(lr=0.3, damping=1e-2, curvature="kflr", eigen_correction=True, kl_clip=None,
              factor_decay=0.7)
    hp.update(kw)
    return KFACOptimizer(model, loss_fn, **hp)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_first_rescaling_and_update_match_oracle(reduction):
    model = tiny_mlp(0)
    loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    (X, y), = batches(1, N=6)
    factors = kflr_factors(model, X, y, loss_fn)  # autograd Jacobians, sample by sample
    g, f = sample_grads(model, X, y, loss_fn)
    lam, lr = 1e-2, 0.3
    m = copy.deepcopy(model)
    opt = KFACOptimizer(m, loss_fn, lr=lr, damping=lam, curvature="kflr",
                        eigen_correction=True, kl_clip=None)
    before = {p: p.detach().clone() for p in model.parameters()}
    opt.zero_grad()
    loss_fn(m(X), y).backward()
    grads = {p: q.grad.detach().clone() for p, q in zip(model.parameters(), m.parameters())}
    opt.step()
    for p, q in zip(model.parameters(), m.parameters(), strict=True):
        Qs = eigenvectors(factors[p])
        s = oracle_scale(g[p], Qs, f)
        torch.testing.assert_close(opt.state[q]["kfe_scale"], s, **TOL)
        M = ekfac_matrix(Qs, s) + lam * torch.eye(p.numel(), dtype=DT)
        V = torch.linalg.solve(M, grads[p].reshape(-1)).reshape(p.shape)
        torch.testing.assert_close(q.detach(), before[p] - lr * V, **TOL)
        # the per-sample gradients served the estimate and are not kept in the state
        assert "grad_batch" not in opt.state[q]
    opt.close()


def test_running_average_and_carry_over_to_a_new_basis():
    """Factors and eigenbasis every T_f = 2 steps, the diagonal every step (per-step decay
    ε^(1/T_f)).  When the basis changes, the step's estimate is taken in the old basis and
    folded in, then the average moves to the new basis (the first basis: estimated in it)."""
    model = tiny_mlp(1)
    loss_fn = nn.CrossEntropyLoss()
    data = batches(4, N=5, seed=4)
    eps, Tf = 0.7, 2
    m = copy.deepcopy(model)
    opt = make(m, loss_fn, factor_decay=eps, factor_update_freq=Tf, inverse_update_freq=Tf,
               lr=0.1)
    avg, s, Q = {}, {}, {}
    ref = tiny_mlp(1)  # the oracles' copy of the current weights (no optimizer hooks)
    for t, (X, y) in enumerate(data, 1):
        ref.load_state_dict(m.state_dict())
        gr, f = sample_grads(ref, X, y, loss_fn)
        g = dict(zip(m.parameters(), gr.values(), strict=True))
        for p in m.parameters():  # this batch's estimate in the basis the step starts with
            if p in Q:
                new = oracle_scale(g[p], Q[p], f)
                s[p] = eps ** (1 / Tf) * s[p] + (1 - eps ** (1 / Tf)) * new
        if t % Tf == 1:  # factors and eigenbasis (steps 1, 3)
            kf = kflr_factors(ref, X, y, loss_fn).values()
            for p, r in zip(m.parameters(), kf, strict=True):
                avg[p] = r if t == 1 else [eps * a + (1 - eps) * b
                                           for a, b in zip(avg[p], r, strict=True)]
                Qn = eigenvectors(avg[p])
                if p in s:  # the old curvature's diagonal in the new basis, densely
                    C = ekfac_matrix(Q[p], s[p])
                    Qk = Qn[0] if len(Qn) == 1 else torch.kron(*Qn)
                    s[p] = torch.diagonal(Qk.T @ C @ Qk).reshape(p.shape)
                else:  # the first basis: the estimate in it
                    s[p] = oracle_scale(g[p], Qn, f)
                Q[p] = Qn
        opt.zero_grad()
        loss_fn(m(X), y).backward()
        opt.step()
        for p in m.parameters():
            torch.testing.assert_close(opt.state[p]["kfe_scale"], s[p], **TOL)
            assert "grad_batch" not in opt.state[p]
    st = opt.state[m[0].weight]
    assert (st["kfe_updates"], st["factor_updates"], st["inverse_updates"]) == (4, 2, 2)
    opt.close()


def test_sequence_rows_are_summed_per_sample():
    """A Linear on [N, T, D] inputs: the sample's gradient is the sum over its T rows."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    loss_fn = nn.CrossEntropyLoss()
    g_ = torch.Generator().manual_seed(3)
    N, T = 4, 3
    X = torch.randn(N, T, 4, generator=g_, dtype=DT)
    y = torch.randint(0, 3, (N, T), generator=g_)
    g, f = sample_grads(model, X, y, loss_fn, rows=T)
    opt = KFACOptimizer(model, loss_fn, lr=0.1, curvature="kflr", eigen_correction=True)
    opt.zero_grad()
    loss_fn(model(X).reshape(-1, 3), y.reshape(-1)).backward()
    opt.step()
    for p in model.parameters():
        st = opt.state[p]
        Qs = eigenvectors(st["factors"])
        torch.testing.assert_close(st["kfe_scale"], oracle_scale(g[p], Qs, f), **TOL)
    opt.close()


def _grouped_conv():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Tanh(), nn.Flatten(),
                         nn.Linear(16, 3)).to(DT)


def test_grouped_conv_and_hf_conv1d_factors():
    """Factors with a group dimension ([g, d, d]) and the [A, G] order of HF's Conv1D."""
    transformers = pytest.importorskip("transformers")
    Conv1D = transformers.pytorch_utils.Conv1D
    torch.manual_seed(1)
    cases = [
        (_grouped_conv(), torch.randn(5, 4, 4, 4, dtype=DT)),
        (nn.Sequential(Conv1D(4, 3), nn.Tanh(), Conv1D(3, 4)).to(DT),
         torch.randn(5, 3, dtype=DT)),
    ]
    loss_fn = nn.CrossEntropyLoss()
    for model, X in cases:
        y = torch.randint(0, 3, (5,))
        g, f = sample_grads(model, X, y, loss_fn)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = KFACOptimizer(model, loss_fn, lr=0.1, curvature="kflr",
                                eigen_correction=True)
        opt.zero_grad()
        loss_fn(model(X), y).backward()
        opt.step()
        for p in model.parameters():
            st = opt.state[p]
            if "factors" not in st:
                continue
            fs = st["factors"]
            view = F.kronecker_dims(p.shape, fs)
            gv = g[p].reshape(g[p].shape[0], *view)
            Qs = [torch.linalg.eigh(F_)[1] for F_ in fs]
            if fs[0].dim() == 3:  # one Kronecker product per group
                ref = torch.stack([oracle_scale(gv[:, j], [Q[j] for Q in Qs], f)
                                   for j in range(fs[0].shape[0])])
            else:
                ref = oracle_scale(gv, Qs, f)
            torch.testing.assert_close(st["kfe_scale"], ref.reshape(p.shape), **TOL)
        opt.close()


def test_carry_over_is_identity_in_the_same_basis_and_exact_in_another():
    g = torch.Generator().manual_seed(0)
    Qa = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=DT))[0]
    Qb = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=DT))[0]
    s = torch.rand(3, 4, generator=g, dtype=DT)
    torch.testing.assert_close(F.kfe_carry_over(s, [Qa, Qb], [Qa, Qb]), s, **TOL)
    Qa2 = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=DT))[0]
    Qb2 = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=DT))[0]
    C = ekfac_matrix([Qa, Qb], s)
    Q2 = torch.kron(Qa2, Qb2)
    ref = torch.diagonal(Q2.T @ C @ Q2).reshape(3, 4)
    torch.testing.assert_close(F.kfe_carry_over(s, [Qa, Qb], [Qa2, Qb2]), ref, **TOL)


def test_block_without_scale_is_kfac_in_the_eigenbasis():
    """Before its first estimate the block uses d_G d_Aᵀ: the exact-damping K-FAC step."""
    g = torch.Generator().manual_seed(0)
    fs = [(lambda M: M @ M.T)(torch.randn(3, 3, generator=g, dtype=DT)),
          (lambda M: M @ M.T)(torch.randn(4, 4, generator=g, dtype=DT))]
    st: dict = {}
    blk = EKFACBlock(st)
    blk.update_factors(fs, 0.9)
    blk.update_inverse(1e-2)
    v = torch.randn(3, 4, generator=g, dtype=DT)
    ref = torch.linalg.solve(torch.kron(*fs) + 1e-2 * torch.eye(12, dtype=DT), v.reshape(-1))
    torch.testing.assert_close(blk.multiply(v, 1e-2), ref.reshape(3, 4), **TOL)


def test_eigen_correction_refuses_pi_damping_and_sets_eigen():
    model = tiny_mlp(0)
    with pytest.raises(ValueError, match="eigen_correction"):
        KFACOptimizer(model, nn.CrossEntropyLoss(), eigen_correction=True, damping_mode="pi")
    opt = KFACOptimizer(model, nn.CrossEntropyLoss(), eigen_correction=True)
    assert opt.damping_mode == "eigen"
    opt.close()


def test_state_dict_round_trip_continues_identically():
    data = batches(6, N=6)
    a, loss_a = tiny_mlp(0), nn.CrossEntropyLoss()
    opt_a = make(a, loss_a, curvature="kfac", inverse_update_freq=2, seed=3)
    for X, y in data[:3]:
        opt_a.zero_grad()
        loss_a(a(X), y).backward()
        opt_a.step()
    b, loss_b = tiny_mlp(0), nn.CrossEntropyLoss()
    b.load_state_dict(a.state_dict())
    opt_b = make(b, loss_b, curvature="kfac", inverse_update_freq=2, seed=99)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    for X, y in data[3:]:
        for m, lf, o in ((a, loss_a, opt_a), (b, loss_b, opt_b)):
            o.zero_grad()
            lf(m(X), y).backward()
            o.step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
    opt_a.close()
    opt_b.close()


def test_adaptive_damping_uses_the_ekfac_curvature():
    model = tiny_mlp(0)
    loss_fn = nn.CrossEntropyLoss()
    opt = make(model, loss_fn, adaptive_damping=True, damping_adaptation_interval=1)
    for X, y in batches(3, N=6):
        def closure(X=X, y=y):
            opt.zero_grad()
            loss = loss_fn(model(X), y)
            loss.backward()
            return loss
        opt.step(closure)
    assert math.isfinite(opt.param_groups[0]["damping"])
    opt.close()


def _seq_mlp():
    torch.manual_seed(2)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)


def _hf_mlp():
    from transformers.pytorch_utils import Conv1D
    torch.manual_seed(2)
    return nn.Sequential(Conv1D(4, 3), nn.Tanh(), Conv1D(3, 4)).to(DT)


def _inputs(*shape):
    def make(n, g_):
        return torch.randn(n, *shape, generator=g_, dtype=DT)
    return make


#: name -> (model factory, inputs(n, generator), loss rows per sample)
TWO_STEP_CASES = {
    "mlp": (lambda: tiny_mlp(3), _inputs(5), 1),
    "sequence": (_seq_mlp, _inputs(3, 4), 3),
    "grouped_conv": (_grouped_conv, _inputs(4, 4, 4), 1),
    "hf_conv1d": (_hf_mlp, _inputs(3), 1),
}


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("case", list(TWO_STEP_CASES))
def test_rescaling_between_basis_updates_from_the_engine(case, reduction):
    """Steps whose eigenbasis was there before the backward take Σ_n (Q_Gᵀ g_n Q_A)² from
    the engine (``kfe_sum_grad_squared``: rotated rows and inputs, no per-sample
    gradients): factors every step, the basis of step 1 kept (T_i = 100)."""
    if case == "hf_conv1d":
        pytest.importorskip("transformers")
    factory, inputs, rows = TWO_STEP_CASES[case]
    model = factory()
    loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    eps = 0.6
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = make(model, loss_fn, factor_decay=eps, factor_update_freq=1,
                   inverse_update_freq=100, lr=0.05)
    g_ = torch.Generator().manual_seed(5)
    s, Q = {}, {}
    for t, n in enumerate((5, 7), 1):
        X = inputs(n, g_)
        y = torch.randint(0, 3, (n, 3) if rows > 1 else (n,), generator=g_)
        ref = factory()  # the oracle's copy of the current weights (no optimizer hooks)
        ref.load_state_dict(model.state_dict())
        gr, f = sample_grads(ref, X, y, loss_fn, rows=rows)
        g = dict(zip(model.parameters(), gr.values(), strict=True))
        fields = {e.savefield for e in opt.collector.extensions}
        assert ("grad_batch" in fields) == (t == 1)
        assert ("kfe_sum_grad_squared" in fields) == (t == 2)
        opt.zero_grad()
        out = model(X)
        loss_fn(out.reshape(-1, out.shape[-1]), y.reshape(-1)).backward()
        opt.step()
        for p in model.parameters():
            st = opt.state[p]
            if "eigenvectors" not in st:
                continue
            if t == 1:
                Q[p] = [Qi.clone() for Qi in st["eigenvectors"]]
            view = F.kronecker_dims(p.shape, Q[p])
            gv = g[p].reshape(g[p].shape[0], *view)
            if Q[p][0].dim() == 3:  # one Kronecker product per group
                new = torch.stack([oracle_scale(gv[:, j], [Qi[j] for Qi in Q[p]], f)
                                   for j in range(Q[p][0].shape[0])]).reshape(p.shape)
            else:
                new = oracle_scale(gv, Q[p], f).reshape(p.shape)
            s[p] = new if t == 1 else eps * s[p] + (1 - eps) * new
            torch.testing.assert_close(st["kfe_scale"], s[p], **TOL)
            assert "kfe_sum_grad_squared" not in st and "grad_batch" not in st
    assert s
    opt.close()


def test_requests_per_step():
    """BatchGrad only where the first basis is computed in the step (step 1); the engine's
    second moment in the step's starting basis on every later step, basis updates (T_i = 4:
    step 5) included."""
    model, loss_fn = tiny_mlp(0), nn.CrossEntropyLoss()
    opt = make(model, loss_fn, factor_update_freq=2, inverse_update_freq=4)
    fields = {}
    for t, (X, y) in enumerate(batches(5, N=4), 1):
        fields[t] = {e.savefield for e in opt.collector.extensions}
        opt.zero_grad()
        loss_fn(model(X), y).backward()
        opt.step()
    assert "grad_batch" in fields[1] and "kfe_sum_grad_squared" not in fields[1]
    assert fields[2] == {"kfe_sum_grad_squared"}
    assert "kfe_sum_grad_squared" in fields[3] and "grad_batch" not in fields[3]
    assert fields[5] == {"kfe_sum_grad_squared", "kflr"}
    opt.close()


@pytest.mark.parametrize("steps,split", [(1, 4), (2, 3)], ids=["projected", "from_engine"])
def test_micro_batches_equal_one_batch(steps, split):
    """Micro-batches (each loss weighted by its share) give the statistics of the whole
    batch: on the first step (``grad_batch`` projected into the new basis) and on a step
    that reads the engine's second moment in the basis of step 1 (T_i = 10)."""
    data = batches(steps, N=8, seed=7)
    one, two, lf1, lf2 = tiny_mlp(2), tiny_mlp(2), nn.CrossEntropyLoss(), nn.CrossEntropyLoss()
    opt1 = make(one, lf1, factor_update_freq=1, inverse_update_freq=10)
    opt2 = make(two, lf2, factor_update_freq=1, inverse_update_freq=10)
    for X, y in data:
        opt1.zero_grad()
        lf1(one(X), y).backward()
        opt1.step()
        opt2.zero_grad()
        for sl in (slice(0, split), slice(split, 8)):
            (lf2(two(X[sl]), y[sl]) * (sl.stop - sl.start) / 8).backward()
        opt2.step()
    for p, q in zip(one.parameters(), two.parameters(), strict=True):
        torch.testing.assert_close(opt1.state[p]["kfe_scale"], opt2.state[q]["kfe_scale"], **TOL)
        torch.testing.assert_close(p, q, **TOL)
    opt1.close()
    opt2.close()
