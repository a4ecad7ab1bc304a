"""Pure update rules against hand-written float64 references (explicit Kronecker products, sums)."""

from __future__ import annotations

import math

import pytest
import torch

from curvopt.optim import functional as F
from curvopt.optim.kronecker import DiagonalBlock, KroneckerBlock

DT = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)


def spd(d, rank=None, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(rank or 2 * d, d, generator=g, dtype=DT)
    return scale * X.T @ X / X.shape[0]


def rand(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


# ------------------------------------------------------------------------- Kronecker algebra
def test_kronecker_matvec_is_row_major_kron():
    G, A, W = spd(3), spd(4, seed=2), rand(3, 4)
    ref = (torch.kron(G, A) @ W.reshape(-1)).reshape(3, 4)
    torch.testing.assert_close(F.kronecker_matvec([G, A], W), ref, **TOL)


def test_kronecker_matvec_three_factors_and_conv_shape():
    fs = [spd(2), spd(3, seed=3), spd(4, seed=4)]
    W = rand(2, 3, 2, 2)  # conv-like weight: [C_out, C_in, k, k] with d = [2, 3, 4]
    ref = (torch.kron(torch.kron(fs[0], fs[1]), fs[2]) @ W.reshape(-1)).reshape(W.shape)
    torch.testing.assert_close(F.kronecker_matvec(fs, W), ref, **TOL)


def test_kronecker_dims_rejects_mismatch():
    with pytest.raises(ValueError, match="do not match"):
        F.kronecker_dims((3, 5), [spd(3), spd(4)])
    with pytest.raises(ValueError, match="square"):
        F.kronecker_dims((3, 4), [torch.zeros(3, 2), spd(4)])


def test_pi_dampings_two_factors():
    G, A = spd(3, scale=5.0), spd(4, seed=2)
    lam = 1e-2
    pi = math.sqrt((torch.trace(A).item() / 4) / (torch.trace(G).item() / 3))
    dG, dA = F.pi_dampings([G, A], lam)
    assert dA == pytest.approx(pi * math.sqrt(lam), rel=1e-12)
    assert dG == pytest.approx(math.sqrt(lam) / pi, rel=1e-12)
    assert F.pi_dampings([G], lam) == [lam]


def test_pi_dampings_dead_factor_gives_pi_one():
    assert F.pi_dampings([torch.zeros(3, 3, dtype=DT), spd(4)], 1e-4) == [1e-2, 1e-2]


def test_precondition_inverses_matches_dense_solve():
    G, A, W, lam = spd(3), spd(5, rank=2, seed=2), rand(3, 5), 1e-3
    dG, dA = F.pi_dampings([G, A], lam)
    dense = torch.kron(G + dG * torch.eye(3, dtype=DT), A + dA * torch.eye(5, dtype=DT))
    ref = torch.linalg.solve(dense, W.reshape(-1)).reshape(3, 5)
    out = F.precondition_inverses(W, F.damped_inverses([G, A], lam))
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-12)
    # a bias: one factor, plain Tikhonov
    b = rand(3, seed=5)
    ref_b = torch.linalg.solve(G + lam * torch.eye(3, dtype=DT), b)
    torch.testing.assert_close(
        F.precondition_inverses(b, F.damped_inverses([G], lam)), ref_b, **TOL
    )


def test_precondition_eigen_is_exact_damping():
    G, A, W, lam = spd(3), spd(5, rank=2, seed=2), rand(3, 5), 1e-2
    dense = torch.kron(G, A) + lam * torch.eye(15, dtype=DT)
    ref = torch.linalg.solve(dense, W.reshape(-1)).reshape(3, 5)
    Qs, ds = F.eigendecomposition([G, A])
    torch.testing.assert_close(F.precondition_eigen(W, Qs, ds, lam), ref, **TOL)
    fs = [spd(2), spd(3, seed=3), spd(2, seed=4)]
    V = rand(2, 3, 2)
    dense3 = torch.kron(torch.kron(fs[0], fs[1]), fs[2]) + lam * torch.eye(12, dtype=DT)
    Qs, ds = F.eigendecomposition(fs)
    torch.testing.assert_close(
        F.precondition_eigen(V, Qs, ds, lam),
        torch.linalg.solve(dense3, V.reshape(-1)).reshape(V.shape),
        **TOL,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_singular_and_broken_factors_never_nan(dtype):
    zero = torch.zeros(4, 4, dtype=dtype)
    rank1 = torch.ones(4, 4, dtype=dtype) * 1e6
    indefinite = -torch.eye(4, dtype=dtype) * 1e3
    for Fm in (zero, rank1, indefinite):
        inv = F.damped_inverse(Fm, 1e-8)
        assert inv.dtype == dtype and torch.isfinite(inv).all()
    for fs in ([zero, zero], [rank1, zero], [rank1, rank1]):
        v = F.precondition_inverses(torch.ones(4, 4, dtype=dtype), F.damped_inverses(fs, 1e-6))
        assert torch.isfinite(v).all()
        Qs, ds = F.eigendecomposition(fs)
        assert torch.isfinite(
            F.precondition_eigen(torch.ones(4, 4, dtype=dtype), Qs, ds, 1e-6)
        ).all()
    with pytest.raises(ValueError, match="positive"):
        F.damped_inverse(zero, 0.0)


def test_damped_inverse_is_float64_accurate_for_float32_input():
    A = spd(30, rank=5, seed=7).float()  # rank deficient, float32
    delta = 1e-5
    ref = torch.linalg.inv(A.double() + delta * torch.eye(30, dtype=DT))
    inv = F.damped_inverse(A, delta)
    assert inv.dtype == torch.float32
    torch.testing.assert_close(
        inv.double(), ref.float().double(), rtol=1e-6, atol=1e-6 * ref.abs().max().item()
    )


def test_precondition_diagonal():
    g, h = rand(5), rand(5, seed=3)
    ref = torch.tensor([g[i].item() / (max(h[i].item(), 0.0) + 0.1) for i in range(5)], dtype=DT)
    torch.testing.assert_close(F.precondition_diagonal(g, h, 0.1), ref, **TOL)


def test_kl_clip_coefficient():
    kappa = 1e-3
    pairs = [(0.1, 2.0), (0.5, 0.3)]
    total = 0.01 * 2.0 + 0.25 * 0.3
    assert F.kl_clip_coefficient(pairs, kappa) == pytest.approx(math.sqrt(kappa / total), rel=1e-14)
    assert F.kl_clip_coefficient([(0.1, 1e-9)], kappa) == 1.0
    assert F.kl_clip_coefficient([(0.1, -1.0)], kappa) == 1.0
    assert F.kl_clip_coefficient([(0.1, float("nan"))], kappa) == 1.0


def test_lm_damping_update():
    assert F.lm_damping_update(1.0, 0.9, 0.5) == 0.5
    assert F.lm_damping_update(1.0, 0.1, 0.5) == 2.0
    assert F.lm_damping_update(1.0, 0.5, 0.5) == 1.0
    assert F.lm_damping_update(1.0, float("nan"), 0.5) == 2.0
    assert F.lm_damping_update(1e-8, 0.9, 0.5) == 1e-8


def test_momentum_and_decoupled_weight_decay():
    b = None
    ds = [rand(3, seed=s) for s in range(4)]
    for d in ds:
        b = F.momentum(b, d, 0.9)
    ref = sum(0.9 ** (3 - i) * ds[i] for i in range(4))
    torch.testing.assert_close(b, ref, **TOL)
    p = rand(3)
    q = p.clone()
    assert F.apply_update_(q, ds[0], 0.1, 0.01) is q
    torch.testing.assert_close(q, p - 0.1 * 0.01 * p - 0.1 * ds[0], **TOL)


def test_ema_initialises_with_first_sample():
    a = F.ema(None, torch.ones(2, dtype=DT), 0.9)
    a = F.ema(a, 3 * torch.ones(2, dtype=DT), 0.9)
    torch.testing.assert_close(a, torch.full((2,), 0.9 + 0.3, dtype=DT), **TOL)


# ------------------------------------------------------------------------------ DiagGGNAdam
@pytest.mark.parametrize("power,clip", [(0.5, None), (1.0, None), (1.0, 0.05)])
def test_diag_ggn_adam_matches_explicit_sums(power, clip):
    b1, b2, lam, freq, T = 0.9, 0.99, 1e-3, 3, 8
    grads = [rand(4, seed=10 + t) for t in range(T)]
    curvs = [rand(4, seed=50 + t).abs() for t in range(T)]
    state: dict = {}
    for t in range(1, T + 1):
        due = (t - 1) % freq == 0
        d, state = F.diag_ggn_adam(
            grads[t - 1],
            curvs[t - 1] if due else None,
            state,
            beta1=b1,
            beta2=b2,
            damping=lam,
            power=power,
            clip=clip,
        )
        # reference, coordinate by coordinate
        refreshes = [s for s in range(1, t + 1) if (s - 1) % freq == 0]
        k = len(refreshes)
        for i in range(4):
            m_hat = sum(
                (1 - b1) * b1 ** (t - s) * grads[s - 1][i].item() for s in range(1, t + 1)
            ) / (1 - b1**t)
            h_hat = sum(
                (1 - b2) * b2 ** (k - j) * curvs[s - 1][i].item()
                for j, s in enumerate(refreshes, 1)
            ) / (1 - b2**k)
            den = (h_hat + lam) ** power
            ref = (
                m_hat / den if clip is None else max(-1.0, min(1.0, m_hat / max(clip * den, 1e-12)))
            )
            assert d[i].item() == pytest.approx(ref, rel=1e-10, abs=1e-13)
    assert state["step"] == T and state["curv_step"] == len(range(0, T, freq))


def test_diag_ggn_adam_needs_curvature_first():
    with pytest.raises(ValueError, match="curvature"):
        F.diag_ggn_adam(rand(3), None, {}, beta1=0.9, beta2=0.99, damping=1e-3, power=0.5)


# ----------------------------------------------------------------------------------- M-SVAG
def test_minibatch_gradient_variance_matches_sampling_variance():
    N = 5
    x = rand(N, 3)  # grad_batch rows f*g_n
    pop_var = x.var(0, unbiased=False)
    sigma2 = F.minibatch_gradient_variance(pop_var, N)
    # unbiased variance of the sum of N iid terms = N * unbiased per-term variance
    torch.testing.assert_close(sigma2, N * x.var(0, unbiased=True), **TOL)
    assert torch.equal(F.minibatch_gradient_variance(pop_var, 1), torch.zeros(3, dtype=DT))


def test_msvag_rho_is_variance_of_weighted_mean():
    beta = 0.9
    for t in (1, 2, 7):
        w = [(1 - beta) * beta ** (t - i) / (1 - beta**t) for i in range(1, t + 1)]
        assert F.msvag_rho(beta, t) == pytest.approx(sum(x * x for x in w), rel=1e-12)


def test_msvag_batch_variance_matches_explicit_weights():
    beta, T = 0.9, 6
    grads = [rand(3, seed=20 + t) for t in range(T)]
    sig = [rand(3, seed=70 + t).abs() for t in range(T)]
    state: dict = {}
    for t in range(1, T + 1):
        d, state = F.msvag(grads[t - 1], sig[t - 1], state, beta=beta, variance="batch")
        w = [(1 - beta) * beta ** (t - i) / (1 - beta**t) for i in range(1, t + 1)]
        for j in range(3):
            m = sum(w[i - 1] * grads[i - 1][j].item() for i in range(1, t + 1))
            s = sum(w[i - 1] ** 2 * sig[i - 1][j].item() for i in range(1, t + 1))
            assert d[j].item() == pytest.approx(m * m / (m * m + s) * m, rel=1e-10, abs=1e-14)


def test_msvag_ema_variance_is_the_paper_rule():
    beta, T = 0.8, 5
    grads = [rand(3, seed=30 + t) for t in range(T)]
    state: dict = {}
    for t in range(1, T + 1):
        d, state = F.msvag(grads[t - 1], None, state, beta=beta, variance="ema")
        for j in range(3):
            m = sum(
                (1 - beta) * beta ** (t - i) * grads[i - 1][j].item() for i in range(1, t + 1)
            ) / (1 - beta**t)
            v = sum(
                (1 - beta) * beta ** (t - i) * grads[i - 1][j].item() ** 2 for i in range(1, t + 1)
            ) / (1 - beta**t)
            rho = (1 - beta) ** 2 * (1 - beta ** (2 * t)) / ((1 - beta**t) ** 2 * (1 - beta**2))
            s = 0.0 if t == 1 else rho * max(v - m * m, 0.0) / (1 - rho)
            gamma = min(max(m * m / (m * m + s), 0.0), 1.0)
            assert d[j].item() == pytest.approx(gamma * m, rel=1e-10, abs=1e-14)


def test_msvag_zero_gradient_and_zero_variance():
    d, st = F.msvag(torch.zeros(2, dtype=DT), torch.zeros(2, dtype=DT), {}, beta=0.9)
    assert torch.equal(d, torch.zeros(2, dtype=DT)) and torch.equal(
        st["gamma"], torch.ones(2, dtype=DT)
    )
    with pytest.raises(ValueError):
        F.msvag(rand(2), None, {}, beta=0.9, variance="batch")


# ------------------------------------------------------------------------------ blocks
def test_kronecker_block_caches_until_asked():
    state: dict = {}
    blk = KroneckerBlock(state, "pi")
    G1, A1, G2, A2 = spd(3), spd(4, seed=2), spd(3, seed=5), spd(4, seed=6)
    blk.update_factors([G1, A1], decay=0.9)
    blk.update_inverse(1e-2)
    W = rand(3, 4)
    v1 = blk.multiply(W, 1e-2)
    blk.update_factors([G2, A2], decay=0.9)  # factors move, cache stays
    assert torch.equal(blk.multiply(W, 1e-2), v1)
    assert state["factor_updates"] == 2 and state["inverse_updates"] == 1
    blk.update_inverse(1e-2)
    Gbar, Abar = 0.9 * G1 + 0.1 * G2, 0.9 * A1 + 0.1 * A2
    torch.testing.assert_close(state["factors"][0], Gbar, **TOL)
    dG, dA = F.pi_dampings([Gbar, Abar], 1e-2)
    ref = torch.linalg.solve(
        torch.kron(Gbar + dG * torch.eye(3, dtype=DT), Abar + dA * torch.eye(4, dtype=DT)),
        W.reshape(-1),
    ).reshape(3, 4)
    torch.testing.assert_close(blk.multiply(W, 1e-2), ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(
        blk.curvature_matvec(W), (torch.kron(Gbar, Abar) @ W.reshape(-1)).reshape(3, 4), **TOL
    )


def test_eigen_block_applies_current_damping():
    state: dict = {}
    blk = KroneckerBlock(state, "eigen")
    G, A, W = spd(3), spd(4, seed=2), rand(3, 4)
    blk.update_factors([G, A], 0.95)
    blk.update_inverse(1.0)
    for lam in (1e-1, 1e-3):
        ref = torch.linalg.solve(
            torch.kron(G, A) + lam * torch.eye(12, dtype=DT), W.reshape(-1)
        ).reshape(3, 4)
        torch.testing.assert_close(blk.multiply(W, lam), ref, **TOL)
    with pytest.raises(ValueError):
        KroneckerBlock({}, "cholesky")


def test_diagonal_block():
    state: dict = {}
    blk = DiagonalBlock(state)
    h1, h2, g = rand(4).abs(), rand(4, seed=2).abs(), rand(4, seed=3)
    blk.update_factors(h1, 0.5)
    blk.update_factors(h2, 0.5)
    torch.testing.assert_close(blk.multiply(g, 0.1), g / (0.5 * h1 + 0.5 * h2 + 0.1), **TOL)


# ------------------------------------------------------ grouped factors (leading group dim)
def _grouped(g=3, dG=2, dA=4, dead=None):
    Gs = torch.stack([spd(dG, seed=10 + i, scale=1.0 + i) for i in range(g)])
    As = torch.stack([spd(dA, rank=2, seed=20 + i) for i in range(g)])
    if dead is not None:  # a dead group: zero G (π falls back to 1, Cholesky may not)
        Gs[dead] = 0.0
    return Gs, As


def test_grouped_kronecker_algebra_equals_a_per_group_loop():
    """Factors [g, d, d] act group by group; the weight [g·dG, dA] is viewed as [g, dG, dA]."""
    lam = 1e-3
    Gs, As = _grouped(dead=1)
    W = rand(3 * 2, 4)  # a grouped conv weight [C_out, (C_in/g)·k] with C_out = g·dG
    Wg = W.reshape(3, 2, 4)
    assert F.kronecker_dims(W.shape, [Gs, As]) == [3, 2, 4]
    mv = F.kronecker_matvec([Gs, As], W).reshape(3, 2, 4)
    V = F.precondition_inverses(W, F.damped_inverses([Gs, As], lam)).reshape(3, 2, 4)
    Qs, ds = F.eigendecomposition([Gs, As])
    E = F.precondition_eigen(W, Qs, ds, lam).reshape(3, 2, 4)
    deltas = F.pi_dampings([Gs, As], lam)
    for i in range(3):
        G, A, w = Gs[i], As[i], Wg[i]
        torch.testing.assert_close(mv[i], F.kronecker_matvec([G, A], w), **TOL)
        dG, dA = F.pi_dampings([G, A], lam)
        assert float(deltas[0][i]) == pytest.approx(dG, rel=1e-12)
        assert float(deltas[1][i]) == pytest.approx(dA, rel=1e-12)
        torch.testing.assert_close(V[i], F.precondition_inverses(w, F.damped_inverses([G, A], lam)),
                                   rtol=1e-9, atol=1e-12)
        ref = torch.linalg.solve(torch.kron(G, A) + lam * torch.eye(8, dtype=DT), w.reshape(-1))
        torch.testing.assert_close(E[i], ref.reshape(2, 4), **TOL)
    with pytest.raises(ValueError, match="group"):
        F.kronecker_dims(W.shape, [Gs, As[0]])


def test_grouped_three_factors_and_singular_groups():
    fs = [torch.stack([spd(d, seed=s + i) for i in range(2)]) for d, s in ((2, 1), (3, 5), (2, 9))]
    W = rand(2, 2, 3, 2)
    out = F.kronecker_matvec(fs, W)
    for i in range(2):
        torch.testing.assert_close(out[i], F.kronecker_matvec([f[i] for f in fs], W[i]), **TOL)
    # one group indefinite (Cholesky fails there only): each group's inverse is its own
    M = torch.stack([spd(4), -1e3 * torch.eye(4, dtype=DT)])
    inv = F.damped_inverse(M, torch.tensor([1e-2, 1e-3], dtype=DT))
    torch.testing.assert_close(inv[0], F.damped_inverse(M[0], 1e-2), **TOL)
    torch.testing.assert_close(inv[1], F.damped_inverse(M[1], 1e-3), **TOL)


@pytest.mark.parametrize("mode", ["pi", "eigen"])
def test_grouped_kronecker_block(mode):
    Gs, As = _grouped()
    state: dict = {}
    blk = KroneckerBlock(state, mode)
    blk.update_factors([Gs, As], 0.9)
    blk.update_inverse(1e-2)
    assert blk.inverse_cost == 3 * (2**3 + 4**3)
    assert [t.shape for t in blk.cache_buffers()] == [t.shape for t in blk.cache()]
    W = rand(6, 4)
    out = blk.multiply(W, 1e-2).reshape(3, 2, 4)
    for i in range(3):
        ref_state: dict = {}
        ref = KroneckerBlock(ref_state, mode)
        ref.update_factors([Gs[i], As[i]], 0.9)
        ref.update_inverse(1e-2)
        torch.testing.assert_close(out[i], ref.multiply(W.reshape(3, 2, 4)[i], 1e-2),
                                   rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(
        blk.curvature_matvec(W).reshape(3, 2, 4),
        torch.stack([torch.kron(Gs[i], As[i]) @ W.reshape(3, 8)[i] for i in range(3)]).reshape(3, 2, 4),
        **TOL,
    )
