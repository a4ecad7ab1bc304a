"""Self-tests of the brute-force oracle (no curvopt involved).

The oracle is the ground truth of the other test files, so it is checked
here against independent facts: per-sample gradients sum to autograd's
gradient and agree between two implementations, loss normalisers reproduce
torch's reductions, GGN == Hessian for models linear in their parameters,
closed-form loss Hessians, finite differences, and Kronecker factors that
are exact in the cases where the Kronecker structure is exact (one sample,
one position).
"""

from __future__ import annotations

import oracle
import pytest
import torch
import torch.nn.functional as F
from cases import (
    ALL_CASES,
    CASES_BY_NAME,
    CONV_CASES,
    MLP_CASES,
    LossSpec,
    make_target,
    setup,
)
from torch import nn

DT = torch.float64
LOSS_SPECS = [
    LossSpec("ce", "mean"),
    LossSpec("ce", "sum"),
    LossSpec("ce", "mean", weight=True),
    LossSpec("ce", "mean", label_smoothing=0.2),
    LossSpec("ce", "mean", weight=True, label_smoothing=0.1, ignore_index=True),
    LossSpec("ce", "sum", ignore_index=True),
    LossSpec("mse", "mean"),
    LossSpec("mse", "sum"),
    LossSpec("bce", "mean"),
    LossSpec("bce", "sum"),
    LossSpec("nll", "mean"),
    LossSpec("nll", "mean", weight=True, ignore_index=True),
]


def close(a, b, rtol=1e-10, atol_rel=1e-12):
    scale = max(float(b.abs().max()) if b.numel() else 0.0, 1e-30)
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol_rel * scale)


# --------------------------------------------------------------------------- first order


@pytest.mark.parametrize("case", ALL_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("spec", [LossSpec("ce"), LossSpec("mse", "sum")], ids=lambda s: s.id)
def test_per_sample_grads_sum_to_gradient(case, spec):
    if spec.kind == "ce" and not case.ce:
        pytest.skip("output is not logits")
    model, loss_fn, X, y = setup(case, spec, N=3)
    gb = oracle.per_sample_grads(model, loss_fn, X, y)
    g = oracle.grad(model, loss_fn, X, y)
    for name in g:
        close(gb[name].sum(0), g[name])


@pytest.mark.parametrize("case", ALL_CASES, ids=lambda c: c.name)
def test_loop_equals_vmap_single_sample(case):
    """Full-batch graph + per-sample backward == vmap(grad) of single-sample forwards."""
    spec = LossSpec("ce") if case.ce else LossSpec("mse")
    model, loss_fn, X, y = setup(case, spec, N=3)
    a = oracle.per_sample_grads(model, loss_fn, X, y, method="loop")
    b = oracle.per_sample_grads(model, loss_fn, X, y, method="vmap")
    for name in a:
        close(a[name], b[name])


@pytest.mark.parametrize("spec", LOSS_SPECS, ids=lambda s: s.id)
@pytest.mark.parametrize("case_name", ["mlp_tanh", "conv1d_logits_nd"])
def test_loss_normalizer_reproduces_reduction(spec, case_name):
    # per_sample_terms asserts internally that the terms sum to torch's loss
    model, loss_fn, X, y = setup(CASES_BY_NAME[case_name], spec, N=4)
    out = model(X)
    terms = oracle.per_sample_terms(loss_fn, out, y)
    assert terms.shape == (4,)
    close(terms.sum(), loss_fn(out, y))
    gb = oracle.per_sample_grads(model, loss_fn, X, y)
    g = oracle.grad(model, loss_fn, X, y)
    for name in g:
        close(gb[name].sum(0), g[name])


def test_loss_normalizer_values():
    out = torch.randn(4, 3, 5, dtype=DT)
    y = torch.randint(0, 3, (4, 5))
    assert oracle.loss_normalizer(nn.CrossEntropyLoss(), out, y) == 20
    assert oracle.loss_normalizer(nn.MSELoss(), out, out) == 60
    assert oracle.loss_normalizer(nn.MSELoss(reduction="sum"), out, out) == 1
    w = torch.tensor([1.0, 2.0, 3.0], dtype=DT)
    assert oracle.loss_normalizer(nn.CrossEntropyLoss(weight=w), out, y) == pytest.approx(
        float(w[y].sum())
    )


def test_first_order_derived_quantities():
    gb = {"w": torch.randn(5, 3, 2, dtype=DT)}
    res = oracle.first_order_from_grad_batch(gb)["w"]
    close(res["variance"], gb["w"].var(0, unbiased=False))
    close(res["sum_grad_squared"], (gb["w"] ** 2).sum(0))
    close(res["batch_l2"], gb["w"].flatten(1).norm(dim=1) ** 2)


# --------------------------------------------------------------------------- GGN / Hessian


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.Sequential(nn.Linear(4, 3)),
        lambda: nn.Sequential(nn.Conv2d(2, 2, 2), nn.Flatten()),
        lambda: nn.Sequential(nn.Conv2d(2, 3, 2, bias=False), nn.Flatten(), nn.Tanh()),  # not
    ],
    ids=["linear", "conv", "conv_tanh_nonlinear_control"],
)
@pytest.mark.parametrize("spec", [LossSpec("mse"), LossSpec("ce", "sum")], ids=lambda s: s.id)
def test_ggn_equals_hessian_for_models_linear_in_params(make, spec):
    torch.manual_seed(0)
    model = make().to(DT)
    X = torch.randn(3, 4, dtype=DT) if isinstance(model[0], nn.Linear) else torch.randn(
        3, 2, 3, 3, dtype=DT
    )
    out = model(X)
    loss_fn = spec.make(out.shape[1])
    y = make_target(spec, out)
    G = oracle.ggn_matrix(model, loss_fn, X, y)
    H = oracle.hessian_matrix(model, loss_fn, X, y)
    close(G, G.T)
    assert torch.linalg.eigvalsh(G).min() > -1e-10 * G.abs().max()
    linear_in_params = not isinstance(model[-1], nn.Tanh)
    if linear_in_params:
        close(G, H)
    else:  # the control: a nonlinearity after the parameters makes them differ
        assert (G - H).abs().max() > 1e-6 * H.abs().max()


def test_output_hessian_closed_forms():
    out = torch.randn(4, 3, dtype=DT)
    y = torch.randint(0, 3, (4,))
    H = oracle.output_hessian(nn.CrossEntropyLoss(), out, y).reshape(4, 3, 4, 3)
    p = out.softmax(1)
    for n in range(4):
        close(H[n, :, n, :], (torch.diag(p[n]) - torch.outer(p[n], p[n])) / 4)
        for m in range(4):
            if m != n:
                assert H[n, :, m, :].abs().max() == 0
    Hm = oracle.output_hessian(nn.MSELoss(), out, out.clone())
    close(Hm, 2.0 / 12 * torch.eye(12, dtype=DT))
    t = torch.randint(0, 2, (4, 3)).to(DT)
    Hb = oracle.output_hessian(nn.BCEWithLogitsLoss(reduction="sum"), out, t)
    s = out.sigmoid().reshape(-1)
    close(Hb, torch.diag(s * (1 - s)))


@pytest.mark.parametrize("case_name", ["mlp_sigmoid", "residual_mlp", "conv2d_nobias",
                                       "layernorm", "attention"])
def test_hessian_matches_finite_differences(case_name):
    model, loss_fn, X, y = setup(CASES_BY_NAME[case_name], LossSpec("ce"), N=3)
    H = oracle.hessian_matrix(model, loss_fn, X, y)
    theta = oracle.flat_params(model)
    fn = oracle.model_fn_of_theta(model, X)

    def g(t):
        t = t.clone().requires_grad_(True)
        (gr,) = torch.autograd.grad(loss_fn(fn(t), y), t)
        return gr

    v = torch.randn(theta.shape, dtype=DT, generator=torch.Generator().manual_seed(1))
    eps = 1e-5
    fd = (g(theta + eps * v) - g(theta - eps * v)) / (2 * eps)
    torch.testing.assert_close(H @ v, fd, rtol=1e-6, atol=1e-7 * fd.abs().max())
    close(H, H.T)


@pytest.mark.parametrize("case", MLP_CASES[:3], ids=lambda c: c.name)
def test_ggn_is_sum_of_per_sample_sqrt_outer_products(case):
    """GGN == sum_n J_n^T (f H_n) J_n with J_n from per-sample functional calls (MSE: 2f I)."""
    model, loss_fn, X, y = setup(case, LossSpec("mse"), N=3)
    G = oracle.ggn_matrix(model, loss_fn, X, y)
    theta = oracle.flat_params(model)
    f = 1.0 / (3 * 3)
    ref = torch.zeros_like(G)
    for n in range(3):
        Jn = oracle._jacobian(oracle.model_fn_of_theta(model, X[n : n + 1]), theta)
        ref += 2 * f * Jn.T @ Jn
    close(G, ref)


# --------------------------------------------------------------------------- unfolding


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: c.name)
def test_unfold_rebuilds_conv_output(case):
    model, X = case.build(3)
    convs = [
        m
        for m in model.modules()
        if isinstance(m, (nn.modules.conv._ConvNd,))
    ]
    assert convs
    for conv in convs:
        x, z = oracle.capture_io(model, conv, X)
        close(oracle.conv_from_unfold(conv, x), z.reshape(z.shape[0], z.shape[1], -1))


def test_unfold_conv2d_equals_F_unfold():
    conv = nn.Conv2d(3, 2, (2, 3), stride=(2, 1), padding=(1, 2), dilation=(1, 2)).to(DT)
    x = torch.randn(2, 3, 5, 6, dtype=DT)
    U = oracle.unfold_conv(conv, x)
    ref = F.unfold(x, (2, 3), dilation=(1, 2), padding=(1, 2), stride=(2, 1))
    close(U, ref)


# --------------------------------------------------------------------------- Kronecker factors


def _linears(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]


@pytest.mark.parametrize("case", MLP_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("spec", [LossSpec("ce"), LossSpec("mse", "sum")], ids=lambda s: s.id)
def test_kron_at_one_sample_is_exact_ggn_block(case, spec):
    model, loss_fn, X, y = setup(case, spec, N=1)
    G_full = oracle.ggn_matrix(model, loss_fn, X, y)
    for name, lin in _linears(model):
        G = oracle.kron_G(model, loss_fn, X, y, lin, -1, "expand")
        A = oracle.linear_A(model, lin, X)
        close(torch.kron(G, A), oracle.block(G_full, model, f"{name}.weight"))
        close(G, oracle.block(G_full, model, f"{name}.bias"))


@pytest.mark.parametrize("case", MLP_CASES[:4], ids=lambda c: c.name)
def test_linear_bias_factor_is_exact_block_any_batch(case):
    model, loss_fn, X, y = setup(case, LossSpec("ce"), N=4)
    G_full = oracle.ggn_matrix(model, loss_fn, X, y)
    for name, lin in _linears(model):
        G = oracle.kron_G(model, loss_fn, X, y, lin, -1, "expand")
        close(G, oracle.block(G_full, model, f"{name}.bias"))
        # the weight block is NOT Kronecker for N > 1 (control: the test can fail)
        A = oracle.linear_A(model, lin, X)
        assert (torch.kron(G, A) - oracle.block(G_full, model, f"{name}.weight")).abs().max() > 1e-8


def test_kron_embedding_one_sample_is_exact_block():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(5, 3), nn.Tanh(), nn.Linear(3, 3)).to(DT)
    X = torch.tensor([2])
    y = torch.tensor([1])
    loss_fn = nn.CrossEntropyLoss()
    G_full = oracle.ggn_matrix(model, loss_fn, X, y)
    A = oracle.embedding_A(model, model[0], X)
    G = oracle.kron_G(model, loss_fn, X, y, model[0], -1, "expand")
    close(torch.kron(A, G), oracle.block(G_full, model, "0.weight"))


@pytest.mark.parametrize("index", [1, 2])
def test_kron_embedding_padding_idx_one_sample(index):
    """padding_idx row: zero GGN block and zero A entry; other rows exact."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(4, 3, padding_idx=2), nn.Tanh(), nn.Linear(3, 3)).to(DT)
    X = torch.tensor([index])
    y = torch.tensor([0])
    loss_fn = nn.CrossEntropyLoss()
    G_full = oracle.ggn_matrix(model, loss_fn, X, y)
    A = oracle.embedding_A(model, model[0], X)
    G = oracle.kron_G(model, loss_fn, X, y, model[0], -1, "expand")
    blk = oracle.block(G_full, model, "0.weight")
    close(torch.kron(A, G), blk)
    if index == 2:
        assert blk.abs().max() == 0 and A.abs().max() == 0
    else:
        assert blk.abs().max() > 0


@pytest.mark.parametrize(
    "make,shape",
    [
        (lambda: nn.Conv2d(2, 3, 3), (2, 3, 3)),
        (lambda: nn.Conv1d(2, 3, 4, stride=2), (2, 4)),
        (lambda: nn.Conv3d(1, 2, 2), (1, 2, 2, 2)),
    ],
    ids=["conv2d", "conv1d", "conv3d"],
)
def test_kron_conv_single_position_one_sample_is_exact_block(make, shape):
    torch.manual_seed(0)
    conv = make()
    model = nn.Sequential(conv, nn.Flatten(), nn.Sigmoid(), nn.Linear(conv.out_channels, 3)).to(DT)
    X = torch.randn(1, *shape, dtype=DT)
    y = torch.tensor([2])
    loss_fn = nn.CrossEntropyLoss()
    G_full = oracle.ggn_matrix(model, loss_fn, X, y)
    Om = oracle.conv_Omega(model, model[0], X)
    for mode in ("expand", "sum"):
        G = oracle.kron_G(model, loss_fn, X, y, model[0], 1, mode)
        close(torch.kron(G, Om), oracle.block(G_full, model, "0.weight"))
        close(G, oracle.block(G_full, model, "0.bias"))


@pytest.mark.parametrize("case_name", ["conv2d", "conv1d", "conv2d_stride_dilation", "conv3d",
                                       "convT2d"])
def test_conv_G_sum_convention_is_bias_block(case_name):
    """BackPACK's G (square root summed over positions) == exact GGN block of the bias."""
    model, loss_fn, X, y = setup(CASES_BY_NAME[case_name], LossSpec("ce"), N=3)
    G_full = oracle.ggn_matrix(model, loss_fn, X, y)
    G = oracle.kron_G(model, loss_fn, X, y, model[0], 1, "sum")
    close(G, oracle.block(G_full, model, "0.bias"))
    G_exp = oracle.kron_G(model, loss_fn, X, y, model[0], 1, "expand")
    assert (G - G_exp).abs().max() > 1e-8  # the two conventions differ (control)
    # the expand G is the sum of the per-position diagonal blocks: trace identity
    close(torch.trace(G_exp), oracle.layer_output_ggn(model, loss_fn, X, y, model[0]).trace())


def test_linear3d_expand_factors_one_sample_one_row_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).to(DT)
    X = torch.randn(1, 1, 4, dtype=DT)
    loss_fn = nn.MSELoss()
    y = torch.randn(1, 1, 2, dtype=DT)
    G_full = oracle.ggn_matrix(model, loss_fn, X, y)
    G = oracle.kron_G(model, loss_fn, X, y, model[0], -1, "expand")
    A = oracle.linear_A(model, model[0], X)
    close(torch.kron(G, A), oracle.block(G_full, model, "0.weight"))
    # with S > 1 rows, A averages over N*S rows
    X = torch.randn(2, 3, 4, dtype=DT)
    A = oracle.linear_A(model, model[0], X)
    close(A, torch.einsum("nsi,nsj->ij", X, X) / 6)


# --------------------------------------------------------------------------- KFRA


@pytest.mark.parametrize("act", ["relu", "sigmoid", "tanh"])
def test_kfra_one_sample_equals_kflr(act):
    """With N = 1 the batch averages of KFRA are exact, so KFRA == KFLR."""
    case = CASES_BY_NAME[f"mlp_{act}"]
    model, loss_fn, X, y = setup(case, LossSpec("ce"), N=1)
    kfra = oracle.kfra_factors(model, loss_fn, X, y)
    for name, lin in _linears(model):
        G = oracle.kron_G(model, loss_fn, X, y, lin, -1, "expand")
        close(kfra[f"{name}.weight"][0], G)
        close(kfra[f"{name}.weight"][1], oracle.linear_A(model, lin, X))
        close(kfra[f"{name}.bias"][0], G)


def test_kfra_linear_network_mse_equals_kflr_any_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Identity(), nn.Linear(3, 2)).to(DT)
    X = torch.randn(5, 4, dtype=DT)
    y = torch.randn(5, 2, dtype=DT)
    loss_fn = nn.MSELoss()
    kfra = oracle.kfra_factors(model, loss_fn, X, y)
    for name, lin in _linears(model):
        close(kfra[f"{name}.weight"][0], oracle.kron_G(model, loss_fn, X, y, lin, -1, "expand"))


def test_kfra_differs_from_kflr_for_nonlinear_batch():
    model, loss_fn, X, y = setup(CASES_BY_NAME["mlp_tanh"], LossSpec("ce"), N=4)
    kfra = oracle.kfra_factors(model, loss_fn, X, y)
    G = oracle.kron_G(model, loss_fn, X, y, model[0], -1, "expand")
    assert (kfra["0.weight"][0] - G).abs().max() > 1e-8
    # top layer: both are f * sum_n H_n
    close(kfra["4.weight"][0], oracle.kron_G(model, loss_fn, X, y, model[4], -1, "expand"))


def test_kfra_conv_one_sample_single_position():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3, 3)).to(DT)
    X = torch.randn(1, 2, 3, 3, dtype=DT)
    y = torch.tensor([0])
    loss_fn = nn.CrossEntropyLoss()
    kfra = oracle.kfra_factors(model, loss_fn, X, y)
    G = oracle.kron_G(model, loss_fn, X, y, model[0], 1, "sum")
    close(kfra["0.weight"][0], G)
    close(kfra["0.weight"][1], oracle.conv_Omega(model, model[0], X))


def test_all_cases_have_small_parameter_counts():
    for case in ALL_CASES:
        model, _ = case.build(2)
        assert sum(p.numel() for p in model.parameters()) < 400, case.name


@pytest.mark.parametrize("case_name", ["maxpool2d", "avgpool2d", "conv1d", "adaptivemax2d"])
@pytest.mark.parametrize("positions", ["sum", "expand"])
def test_kfra_cnn_one_sample_equals_kflr(case_name, positions):
    model, loss_fn, X, y = setup(CASES_BY_NAME[case_name], LossSpec("ce"), N=1)
    kfra = oracle.kfra_factors(model, loss_fn, X, y, positions)
    close(kfra["0.weight"][0], oracle.kron_G(model, loss_fn, X, y, model[0], 1, positions))
    close(kfra["0.weight"][1], oracle.conv_Omega(model, model[0], X))
