"""Second-order quantities vs the float64 oracle.

* diag_ggn_exact: diagonal of ``J^T H J`` (``oracle.ggn_matrix``), diag_h: diagonal of
  the autograd Hessian (``oracle.hessian_matrix``).
* kflr: ``[G, A]`` from the definitions in ``oracle.kron_G`` / ``linear_A`` /
  ``conv_Omega``; Linear on ``[N, S, D]`` uses the *expand* G (per-row outer
  products), convolutions BackPACK's G (square root summed over positions, then
  outer product = exact GGN block of the bias).  Biases ``[G]``; a single
  factor for other parameters is their exact GGN block.
* kfra: the recursive definition (``oracle.kfra_factors``).
* kfac / diag_ggn_mc: reproducible under ``torch.manual_seed``; converge to
  kflr / diag_ggn_exact (relative Frobenius error <= 10 % with thousands of samples).

NLLLoss after ``nn.LogSoftmax``: NLL is linear in its input, so a GGN split at
the log-probabilities is zero; the tests take the split at the logits
(LogSoftmax counted as part of the loss), i.e. the GGN of cross-entropy.
Its Hessian is unambiguous.

Tolerances (float64): ``|got - oracle| <= 1e-12 * max|oracle| + 1e-10 |oracle|``.
"""

from __future__ import annotations

import oracle
import pytest
import torch
from cases import ALL_CASES, CASES_BY_NAME, MLP_CASES, Case, LossSpec, make_target, setup
from hypothesis import given, settings
from hypothesis import strategies as st
from test_first_order import _build_conv, conv_configs
from torch import nn
from util import assert_close, field_of
from util import run as _run

import curvopt
from curvopt.errors import CurvoptError, UnsupportedLossError, UnsupportedModuleError
from curvopt.extensions import (
    KFAC,
    KFLR,
    KFRA,
    BatchGrad,
    BatchL2Grad,
    DiagGGNExact,
    DiagGGNMC,
    DiagHessian,
    SumGradSquared,
    Variance,
)


def run(model, loss_fn, X, y, exts, **kw):
    """curvopt run; a documented refusal of CE with both label smoothing and class weights
    (UnsupportedLossError) is an expected failure, any other error a failure."""
    try:
        return _run(model, loss_fn, X, y, exts, **kw)
    except UnsupportedLossError as e:
        if (isinstance(loss_fn, nn.CrossEntropyLoss) and loss_fn.label_smoothing > 0
                and loss_fn.weight is not None):
            pytest.xfail(f"refused: {e}")
        raise

DT = torch.float64
SPECS = [LossSpec("ce", "mean"), LossSpec("mse", "sum")]
LOSS_VARIANTS = [
    LossSpec("ce", "mean"),
    LossSpec("ce", "sum"),
    LossSpec("ce", "mean", weight=True),
    LossSpec("ce", "mean", label_smoothing=0.2),
    LossSpec("ce", "mean", ignore_index=True),
    LossSpec("ce", "sum", weight=True, label_smoothing=0.1, ignore_index=True),
    LossSpec("mse", "mean"),
    LossSpec("mse", "sum"),
    LossSpec("bce", "mean"),
    LossSpec("bce", "sum"),
    LossSpec("nll", "mean"),
    LossSpec("nll", "sum", weight=True, ignore_index=True),
]


def _params(cases, specs):
    return [pytest.param(c, s, id=f"{c.name}-{s.id}") for c in cases for s in specs
            if s.kind not in ("ce", "nll") or c.ce]


# --------------------------------------------------------------------------- oracle glue


def _ggn_model_and_loss(model, loss_fn):
    """NLLLoss after LogSoftmax: split the GGN at the logits (cross-entropy)."""
    if isinstance(loss_fn, nn.NLLLoss) and isinstance(model[-1], nn.LogSoftmax):
        ce = nn.CrossEntropyLoss(weight=loss_fn.weight, ignore_index=loss_fn.ignore_index,
                                 reduction=loss_fn.reduction)
        return model[:-1], ce
    return model, loss_fn


def ggn(model, loss_fn, X, y):
    m, lf = _ggn_model_and_loss(model, loss_fn)
    return oracle.ggn_matrix(m, lf, X, y)


def kron_G(model, loss_fn, X, y, layer, channel_axis, positions):
    m, lf = _ggn_model_and_loss(model, loss_fn)
    return oracle.kron_G(m, lf, X, y, layer, channel_axis, positions)


def check_diag(results, expected: dict, field: str, what=""):
    for name, exp in expected.items():
        assert_close(field_of(results, name, field), exp, f"{what}{name}.{field}")


def check_factors(got, expected: list, what: str, alternative: list | None = None):
    assert isinstance(got, (list, tuple)), f"{what}: expected a list of factors, got {type(got)}"
    assert len(got) == len(expected), (
        f"{what}: {len(got)} factors of shapes {[tuple(g.shape) for g in got]}, "
        f"expected {len(expected)} of shapes {[tuple(e.shape) for e in expected]}"
    )
    for i, (g, e) in enumerate(zip(got, expected)):
        try:
            assert_close(g, e, f"{what}[{i}]")
        except AssertionError as err:
            if alternative is not None and g.shape == alternative[i].shape:
                alt = alternative[i]
                match = ((g - alt).abs().max() <= 1e-10 * alt.abs().max()).item()
                raise AssertionError(f"{err}\n  (matches the other convention: {match})") from None
            raise


def _linears_2d(model, X):
    """Linear modules called once on 2-D input."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            try:
                x, _ = oracle.capture_io(model, m, X)
            except AssertionError:
                continue  # called more than once
            if x.dim() == 2:
                out.append((name, m))
    return out


# --------------------------------------------------------------------------- diagonals


@pytest.mark.parametrize("case,spec", _params(ALL_CASES, SPECS))
def test_diag_ggn_exact(case: Case, spec: LossSpec):
    model, loss_fn, X, y = setup(case, spec, N=3)
    expected = oracle.diag_by_param(ggn(model, loss_fn, X, y), model)
    results, _ = run(model, loss_fn, X, y, [DiagGGNExact()])
    check_diag(results, expected, "diag_ggn_exact")


DIAG_H_CASES = [c for c in ALL_CASES if "attention" not in c.tags]


#: Curvature that does not decompose into elementwise terms: DiagHessian must refuse it
#: (never a silent wrong number): a hand-written RMSNorm (x · rsqrt(mean x²): a product of
#: two factors of the same input) and a layer applied on top of its own output.
DIAG_H_REFUSED = {
    "rmsnorm_custom": "RsqrtBackward0|same parameters", "weight_sharing": "same parameters",
}


@pytest.mark.parametrize("case,spec", _params(DIAG_H_CASES, SPECS))
def test_diag_h(case: Case, spec: LossSpec):
    model, loss_fn, X, y = setup(case, spec, N=3)
    if case.name in DIAG_H_REFUSED:
        with pytest.raises(UnsupportedModuleError, match=DIAG_H_REFUSED[case.name]):
            run(model, loss_fn, X, y, [DiagHessian()])
        return
    expected = oracle.diag_by_param(oracle.hessian_matrix(model, loss_fn, X, y), model)
    results, _ = run(model, loss_fn, X, y, [DiagHessian()])
    check_diag(results, expected, "diag_h")


def test_diag_h_attention_refused():
    """Attention multiplies q and k, both functions of in_proj_weight: refused, not wrong."""
    model, loss_fn, X, y = setup(CASES_BY_NAME["attention"], LossSpec("ce"), N=2)
    with pytest.raises(UnsupportedModuleError, match="same parameters|not known"):
        run(model, loss_fn, X, y, [DiagHessian()])


@pytest.mark.parametrize("spec", LOSS_VARIANTS, ids=lambda s: s.id)
@pytest.mark.parametrize("case_name", ["mlp_sigmoid", "conv1d_logits_nd"])
def test_diagonals_loss_variants(case_name, spec):
    model, loss_fn, X, y = setup(CASES_BY_NAME[case_name], spec, N=3)
    exp_ggn = oracle.diag_by_param(ggn(model, loss_fn, X, y), model)
    exp_h = oracle.diag_by_param(oracle.hessian_matrix(model, loss_fn, X, y), model)
    results, _ = run(model, loss_fn, X, y, [DiagGGNExact(), DiagHessian()])
    check_diag(results, exp_ggn, "diag_ggn_exact")
    check_diag(results, exp_h, "diag_h")


def _mse_model(kind):
    torch.manual_seed(0)
    if kind == "3d":
        model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
        X = torch.randn(3, 5, 4, dtype=DT)
    elif kind == "4d":
        model = nn.Sequential(nn.Conv2d(2, 3, 2), nn.Sigmoid(), nn.Conv2d(3, 2, 2))
        X = torch.randn(2, 2, 4, 4, dtype=DT)
    else:  # 1-d per sample output with an extra elementwise loss axis
        model = nn.Sequential(nn.Linear(4, 3), nn.ELU(), nn.Linear(3, 1), nn.Flatten(0))
        X = torch.randn(4, 4, dtype=DT)
    return model.to(DT).eval(), X


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kind", ["3d", "4d", "vector"])
@pytest.mark.parametrize("loss", ["mse", "bce"])
def test_diagonals_any_output_shape(kind, reduction, loss):
    model, X = _mse_model(kind)
    out = model(X)
    loss_fn = (nn.MSELoss if loss == "mse" else nn.BCEWithLogitsLoss)(reduction=reduction)
    y = make_target(LossSpec(loss), out)
    exp_ggn = oracle.diag_by_param(oracle.ggn_matrix(model, loss_fn, X, y), model)
    exp_h = oracle.diag_by_param(oracle.hessian_matrix(model, loss_fn, X, y), model)
    results, _ = run(model, loss_fn, X, y, [DiagGGNExact(), DiagHessian()])
    check_diag(results, exp_ggn, "diag_ggn_exact")
    check_diag(results, exp_h, "diag_h")


# --------------------------------------------------------------------------- KFLR


def expected_linear_kflr(model, loss_fn, X, y, name, lin, positions="expand"):
    G = kron_G(model, loss_fn, X, y, lin, -1, positions)
    A = oracle.linear_A(model, lin, X)
    exp = {f"{name}.weight": [G, A]}
    if lin.bias is not None:
        exp[f"{name}.bias"] = [G]
    return exp


KFLR_DENSE = [c for c in ALL_CASES if c.tags & {"mlp", "residual", "functional"}
              and "shared" not in c.tags]


@pytest.mark.parametrize("case,spec", _params(KFLR_DENSE, SPECS))
def test_kflr_linear(case, spec):
    model, loss_fn, X, y = setup(case, spec, N=4)
    results, _ = run(model, loss_fn, X, y, [KFLR()])
    for name, lin in _linears_2d(model, X):
        for pname, factors in expected_linear_kflr(model, loss_fn, X, y, name, lin).items():
            check_factors(field_of(results, pname, "kflr"), factors, f"{pname}.kflr")


@pytest.mark.parametrize("spec", LOSS_VARIANTS, ids=lambda s: s.id)
def test_kflr_linear_loss_variants(spec):
    model, loss_fn, X, y = setup(CASES_BY_NAME["mlp_tanh"], spec, N=4)
    results, _ = run(model, loss_fn, X, y, [KFLR()])
    for name, lin in _linears_2d(model, X):
        for pname, factors in expected_linear_kflr(model, loss_fn, X, y, name, lin).items():
            check_factors(field_of(results, pname, "kflr"), factors, f"{pname}.kflr")


@pytest.mark.parametrize("case", MLP_CASES, ids=lambda c: c.name)
def test_kflr_one_sample_is_exact_ggn_block(case):
    """Convention-free: with N = 1, kron(G, A) of a Linear weight is its exact GGN block."""
    model, loss_fn, X, y = setup(case, LossSpec("ce"), N=1)
    full = ggn(model, loss_fn, X, y)
    results, _ = run(model, loss_fn, X, y, [KFLR()])
    for name, _ in _linears_2d(model, X):
        got = field_of(results, f"{name}.weight", "kflr")
        assert_close(oracle.kron_list(list(got)), oracle.block(full, model, f"{name}.weight"),
                     f"kron({name}.weight.kflr)")
        got_b = field_of(results, f"{name}.bias", "kflr")
        assert_close(got_b[0], oracle.block(full, model, f"{name}.bias"), f"{name}.bias.kflr")


@pytest.mark.parametrize("spec", [LossSpec("ce", "mean"), LossSpec("mse", "sum")],
                         ids=lambda s: s.id)
@pytest.mark.parametrize("case_name", ["linear3d_mean", "linear3d_out"])
def test_kflr_linear_3d_expand(case_name, spec):
    case = CASES_BY_NAME[case_name]
    if spec.kind == "ce" and not case.ce:
        spec = LossSpec("mse", "mean")
    model, loss_fn, X, y = setup(case, spec, N=3)
    results, _ = run(model, loss_fn, X, y, [KFLR()])
    for name, lin in [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]:
        exp = expected_linear_kflr(model, loss_fn, X, y, name, lin, "expand")
        alt = expected_linear_kflr(model, loss_fn, X, y, name, lin, "sum")
        for pname, factors in exp.items():
            check_factors(field_of(results, pname, "kflr"), factors, f"{pname}.kflr (expand)",
                          alternative=alt[pname])


KFLR_CONV = [c for c in ALL_CASES if c.tags & {"conv", "pool"} and "groups" not in c.tags
             and not c.tags & {"norm", "residual", "functional", "nd_out"}]


#: G of a convolution weight: "sum" = BackPACK 1.7.1 (square root summed over output
#: positions, then outer product: ``einsum("cbij->cbi")`` in
#: backpack/extensions/secondorder/hbp/convnd.py; reference.md: "G from the GGN square root
#: summed over positions (|positions| times the Gamma of Grosse & Martens)"); "expand" =
#: per-position outer products.  Failures say whether the other convention matches.
CONV_G_POSITIONS = "sum"
OTHER_POSITIONS = {"sum": "expand", "expand": "sum"}[CONV_G_POSITIONS]


@pytest.mark.parametrize("case,spec", _params(KFLR_CONV, SPECS))
def test_kflr_conv_weight(case, spec):
    model, loss_fn, X, y = setup(case, spec, N=3)
    results, _ = run(model, loss_fn, X, y, [KFLR()])
    conv = model[0]
    G = kron_G(model, loss_fn, X, y, conv, 1, CONV_G_POSITIONS)
    G_alt = kron_G(model, loss_fn, X, y, conv, 1, OTHER_POSITIONS)
    Om = oracle.conv_Omega(model, conv, X)
    check_factors(field_of(results, "0.weight", "kflr"), [G, Om],
                  f"0.weight.kflr ({CONV_G_POSITIONS})", alternative=[G_alt, Om])
    # the Linear heads are unaffected by the convention
    for name, lin in _linears_2d(model, X):
        for pname, factors in expected_linear_kflr(model, loss_fn, X, y, name, lin).items():
            check_factors(field_of(results, pname, "kflr"), factors, f"{pname}.kflr")


KFLR_CONV_BIAS = [c for c in KFLR_CONV if "nobias" not in c.name]


@pytest.mark.parametrize("case,spec", _params(KFLR_CONV_BIAS, SPECS))
def test_kflr_conv_bias_is_exact_ggn_block(case, spec):
    """A single factor is the GGN block itself: for a conv bias (added at every position)
    that is sum_n (sum_p v)(sum_p v)^T, whatever the convention for the weight."""
    model, loss_fn, X, y = setup(case, spec, N=3)
    full = ggn(model, loss_fn, X, y)
    results, _ = run(model, loss_fn, X, y, [KFLR()])
    G_alt = kron_G(model, loss_fn, X, y, model[0], 1, "expand")
    check_factors(field_of(results, "0.bias", "kflr"), [oracle.block(full, model, "0.bias")],
                  "0.bias.kflr", alternative=[G_alt])


@pytest.mark.parametrize(
    "make,shape",
    [(lambda: nn.Conv2d(2, 3, 3), (2, 3, 3)), (lambda: nn.Conv1d(2, 3, 4, stride=2), (2, 4)),
     (lambda: nn.Conv3d(1, 2, 2), (1, 2, 2, 2))],
    ids=["conv2d", "conv1d", "conv3d"],
)
def test_kflr_conv_single_position_one_sample_is_exact_block(make, shape):
    """Convention-free: one sample, one output position -> kron(G, Omega) is exact."""
    torch.manual_seed(0)
    conv = make()
    model = nn.Sequential(conv, nn.Flatten(), nn.Sigmoid(), nn.Linear(conv.out_channels, 3))
    model = model.to(DT).eval()
    X = torch.randn(1, *shape, dtype=DT)
    y = torch.tensor([2])
    loss_fn = nn.CrossEntropyLoss()
    full = oracle.ggn_matrix(model, loss_fn, X, y)
    results, _ = run(model, loss_fn, X, y, [KFLR()])
    got = field_of(results, "0.weight", "kflr")
    assert_close(oracle.kron_list(list(got)), oracle.block(full, model, "0.weight"),
                 "kron(0.weight.kflr)")


def _embedding_kflr(results, pname):
    try:
        return field_of(results, pname, "kflr")
    except AssertionError:
        pytest.skip("no Kronecker factors for Embedding")


def _run_or_skip_unsupported(*args):
    try:
        return run(*args)
    except UnsupportedModuleError as e:
        pytest.skip(f"Embedding Kronecker factors not provided: {e}")


def test_kflr_embedding_one_sample_is_exact_block():
    """Row-major weight [V, D]: kron(A (V x V), G (D x D)) with N = 1 is the exact block."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(5, 3), nn.Tanh(), nn.Linear(3, 4)).to(DT).eval()
    X = torch.tensor([2])
    y = torch.tensor([1])
    loss_fn = nn.CrossEntropyLoss()
    full = oracle.ggn_matrix(model, loss_fn, X, y)
    results, _ = _run_or_skip_unsupported(model, loss_fn, X, y, [KFLR()])
    got = _embedding_kflr(results, "0.weight")
    assert_close(oracle.kron_list(list(got)), oracle.block(full, model, "0.weight"),
                 "kron(0.weight.kflr)")


@pytest.mark.parametrize("case_name", ["embedding_padding", "embedding_flat"])
def test_kflr_embedding_definition(case_name):
    """A = counts of (n, s) rows / (N S) (V x V, diagonal), G = expand G (D x D), kron(A, G)."""
    model, loss_fn, X, y = setup(CASES_BY_NAME[case_name], LossSpec("ce"), N=3)
    emb = model.emb
    A = oracle.embedding_A(model, emb, X)
    G = oracle.kron_G(model, loss_fn, X, y, emb, -1, "expand")
    # alternative reading: padding rows dropped from G (not from A's normaliser)
    G_nopad = oracle.kron_G(model, loss_fn, X, y, emb, -1, "expand",
                            row_weights=(X != emb.padding_idx) if emb.padding_idx is not None
                            else None)
    results, _ = _run_or_skip_unsupported(model, loss_fn, X, y, [KFLR()])
    got = _embedding_kflr(results, "emb.weight")
    check_factors(got, [A, G], "emb.weight.kflr (padding rows = zero input rows, as Linear)",
                  alternative=[A, G_nopad])


@pytest.mark.parametrize("case_name", ["layernorm", "layernorm_2d", "groupnorm",
                                       "batchnorm1d_eval", "batchnorm2d_eval", "rmsnorm_custom",
                                       "scaleshift_custom"])
def test_kflr_single_factor_is_exact_block(case_name):
    """Parameters without a Kronecker structure (norm layers, custom): [exact GGN block]."""
    model, loss_fn, X, y = setup(CASES_BY_NAME[case_name], LossSpec("ce"), N=3)
    full = ggn(model, loss_fn, X, y)
    results, _ = run(model, loss_fn, X, y, [KFLR()])
    norm_params = [n for n, m in model.named_modules()
                   if isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d))
                   or type(m).__name__ in ("RMSNorm", "ScaleShift")]
    assert norm_params
    for mname in norm_params:
        for pname, _ in model.get_submodule(mname).named_parameters():
            full_name = f"{mname}.{pname}"
            check_factors(field_of(results, full_name, "kflr"),
                          [oracle.block(full, model, full_name)], f"{full_name}.kflr")


# --------------------------------------------------------------------------- KFRA


KFRA_CASES = [c for c in MLP_CASES] + [CASES_BY_NAME[n] for n in
                                       ("linear_nobias", "dropout_eval")]


@pytest.mark.parametrize("case,spec", _params(KFRA_CASES, SPECS + [LossSpec("ce", "sum"),
                                                                   LossSpec("mse", "mean")]))
def test_kfra_mlp(case, spec):
    model, loss_fn, X, y = setup(case, spec, N=4)
    expected = oracle.kfra_factors(model, loss_fn, X, y)
    results, _ = run(model, loss_fn, X, y, [KFRA()])
    for pname, factors in expected.items():
        check_factors(field_of(results, pname, "kfra"), factors, f"{pname}.kfra")


@pytest.mark.parametrize("case_name", ["conv2d", "conv1d", "maxpool2d", "avgpool2d"])
def test_kfra_small_cnn(case_name):
    model, loss_fn, X, y = setup(CASES_BY_NAME[case_name], LossSpec("ce"), N=3)
    expected = oracle.kfra_factors(model, loss_fn, X, y, CONV_G_POSITIONS)
    other = oracle.kfra_factors(model, loss_fn, X, y, OTHER_POSITIONS)
    results, _ = run(model, loss_fn, X, y, [KFRA()])
    for pname, factors in expected.items():
        check_factors(field_of(results, pname, "kfra"), factors, f"{pname}.kfra",
                      alternative=other[pname])


# --------------------------------------------------------------------------- MC: KFAC, DiagGGNMC


def _mc_run(model, loss_fn, X, y, exts, seed):
    torch.manual_seed(seed)
    results, _ = run(model, loss_fn, X, y, exts)
    return results


@pytest.mark.parametrize("case_name", ["mlp_tanh", "conv2d"])
@pytest.mark.parametrize("ext", [DiagGGNMC(), KFAC(), DiagGGNMC(mc_samples=3), KFAC(mc_samples=2)],
                         ids=["diag_ggn_mc", "kfac", "diag_ggn_mc_M3", "kfac_M2"])
def test_mc_reproducible_under_manual_seed(case_name, ext):
    model, loss_fn, X, y = setup(CASES_BY_NAME[case_name], LossSpec("ce"), N=3)
    r1 = _mc_run(model, loss_fn, X, y, [ext], 123)
    r2 = _mc_run(model, loss_fn, X, y, [ext], 123)
    r3 = _mc_run(model, loss_fn, X, y, [ext], 456)
    field = ext.savefield
    differs = False
    for name in r1:
        a, b, c = r1[name][field], r2[name][field], r3[name][field]
        if isinstance(a, torch.Tensor):
            a, b, c = [a], [b], [c]
        for x1, x2, x3 in zip(a, b, c):
            assert torch.equal(x1, x2), f"{name}.{field}: same seed, different result"
            differs |= not torch.equal(x1, x3)
    assert differs, f"{field}: different seeds gave identical results (no sampling?)"


MC_SPECS = [
    ("mlp_tanh", LossSpec("ce", "mean")),
    ("mlp_tanh", LossSpec("ce", "sum")),
    ("mlp_tanh", LossSpec("ce", "mean", weight=True)),
    ("mlp_tanh", LossSpec("ce", "mean", label_smoothing=0.2)),
    ("mlp_tanh", LossSpec("ce", "mean", ignore_index=True)),
    ("mlp_tanh", LossSpec("mse", "mean")),
    ("mlp_tanh", LossSpec("mse", "sum")),
    ("mlp_tanh", LossSpec("bce", "mean")),
    ("mlp_tanh", LossSpec("nll", "mean")),
    ("conv1d_logits_nd", LossSpec("ce", "mean")),
    ("linear3d_out", LossSpec("mse", "mean")),
    ("conv2d", LossSpec("ce", "mean")),
]
MC_SAMPLES = 3000
MC_TOL = 0.10


@pytest.mark.parametrize("case_name,spec", [pytest.param(c, s, id=f"{c}-{s.id}")
                                            for c, s in MC_SPECS])
def test_mc_converges_to_exact(case_name, spec):
    """diag_ggn_mc -> diag_ggn_exact and kfac -> kflr (G; A exact) with many MC samples."""
    model, loss_fn, X, y = setup(CASES_BY_NAME[case_name], spec, N=2)
    full = ggn(model, loss_fn, X, y)
    exact = oracle.diag_by_param(full, model)
    torch.manual_seed(0)
    results, _ = run(model, loss_fn, X, y,
                     [DiagGGNMC(mc_samples=MC_SAMPLES), KFAC(mc_samples=MC_SAMPLES)])
    for name, exp in exact.items():
        got = field_of(results, name, "diag_ggn_mc")
        err = oracle.rel_err(got.detach().to(DT), exp)
        assert err <= MC_TOL, f"{name}.diag_ggn_mc: relative error {err:.3f} > {MC_TOL}"
    # KFAC on the first layer (and every 2-D Linear): G against the exact G, A exactly
    layers = []
    first = model[0] if isinstance(model, nn.Sequential) else None
    if isinstance(first, nn.Sequential):  # NLL wrapper
        first = first[0]
    if isinstance(first, nn.modules.conv._ConvNd):
        prefix = "0.0" if spec.kind == "nll" else "0"
        layers.append((prefix, first, 1, CONV_G_POSITIONS, oracle.conv_Omega(model, first, X)))
    for name, lin in [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]:
        layers.append((name, lin, -1, "expand", oracle.linear_A(model, lin, X)))
    assert layers
    for name, layer, ch, pos, A in layers:
        G = kron_G(model, loss_fn, X, y, layer, ch, pos)
        got = field_of(results, f"{name}.weight", "kfac")
        assert len(got) == 2, f"{name}.weight.kfac: {len(got)} factors"
        assert_close(got[1], A, f"{name}.weight.kfac[1] (A is deterministic)")
        err = oracle.rel_err(got[0].detach().to(DT), G)
        assert err <= MC_TOL, f"{name}.weight.kfac[0]: relative error {err:.3f} > {MC_TOL}"


def test_mc_error_shrinks_with_samples():
    model, loss_fn, X, y = setup(CASES_BY_NAME["mlp_sigmoid"], LossSpec("ce"), N=3)
    exact = oracle.diag_by_param(ggn(model, loss_fn, X, y), model)
    errs = []
    for M in (1, 1000):
        e = []
        for seed in range(3):
            torch.manual_seed(seed)
            results, _ = run(model, loss_fn, X, y, [DiagGGNMC(mc_samples=M)])
            e.append(oracle.rel_err(results["0.weight"]["diag_ggn_mc"].to(DT), exact["0.weight"]))
        errs.append(sum(e) / len(e))
    assert errs[1] < errs[0] / 5, f"MC error does not shrink: M=1 {errs[0]:.3f}, M=1000 {errs[1]:.3f}"
    assert errs[0] > 0.02, f"M=1 suspiciously exact ({errs[0]:.3g}): not a single-sample estimate?"


def test_categorical_sampler_draws_each_class_with_its_probability():
    """The MC targets' sampler (inverse CDF): frequencies within 5 standard errors of
    ``p`` over 200k draws, zero-probability classes never, every draw a valid class."""
    from curvopt.losses import _categorical

    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.5, 0.0, 0.2, 0.3, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0],
                      [1e-6, 0.25, 0.25, 0.25, 0.25 - 1e-6]], dtype=torch.float64)
    M = 200_000
    draws = _categorical(p, M, gen)
    assert draws.shape == (3, M) and draws.dtype == torch.int64
    freq = torch.nn.functional.one_hot(draws, 5).double().mean(1)  # [3, 5]
    se = (p * (1 - p) / M).sqrt()
    assert ((freq - p).abs() <= 5 * se + 1e-12).all(), (freq, p)
    assert (freq[p == 0] == 0).all()
    # a large vocabulary in float32: 50000 tail classes of p = 1e-8, below float32's
    # resolution near a running total of 1; the draws are those of the same probabilities
    # in float64 (a float32 running sum lumps the tail classes together)
    tail = torch.full((50_000,), 1e-8)
    big = torch.cat([torch.tensor([1.0 - float(tail.sum())]), tail]).unsqueeze(0)
    d32 = _categorical(big, 200_000, torch.Generator().manual_seed(1))
    d64 = _categorical(big.double(), 200_000, torch.Generator().manual_seed(1))
    assert int((d32 > 0).sum()) > 50 and torch.equal(d32, d64)
    # float32 probabilities whose cumulative sum falls short of 1 still give valid classes
    q = torch.softmax(torch.randn(64, 7, generator=gen), -1).float()
    d = _categorical(q, 50, gen)
    assert int(d.min()) >= 0 and int(d.max()) <= 6


# --------------------------------------------------------------------------- losses / errors


@pytest.mark.parametrize("ext", [DiagGGNExact(), DiagGGNMC(), KFAC(), KFLR(), KFRA(),
                                 DiagHessian()], ids=lambda e: e.savefield)
@pytest.mark.parametrize("kind", ["ce", "mse", "bce", "nll"])
def test_reduction_none_raises(kind, ext):
    spec = LossSpec(kind, "mean")
    model, _, X, _ = setup(CASES_BY_NAME["mlp_relu"], spec, N=3)
    out = model(X)
    loss_fn = LossSpec(kind, "none").make(3)
    y = make_target(spec, out)
    with pytest.raises(UnsupportedLossError):
        with curvopt.collect(model, loss_fn, ext):
            loss_fn(model(X), y).sum().backward()


@pytest.mark.parametrize("ext", [DiagGGNExact(), KFLR(), DiagHessian()],
                         ids=lambda e: e.savefield)
def test_second_order_without_loss_fn_raises(ext):
    model, loss_fn, X, y = setup(CASES_BY_NAME["mlp_relu"], LossSpec("ce"), N=3)
    with pytest.raises(CurvoptError):
        with curvopt.collect(model, None, ext):
            loss_fn(model(X), y).backward()


# --------------------------------------------------------------------------- all ten at once

ALL_TEN_MC = 1500


def _all_ten():
    return [BatchGrad(), SumGradSquared(), Variance(), BatchL2Grad(), DiagGGNExact(),
            DiagGGNMC(mc_samples=ALL_TEN_MC), KFAC(mc_samples=ALL_TEN_MC), KFLR(), KFRA(),
            DiagHessian()]


@pytest.mark.parametrize("case_name", ["mlp_sigmoid", "avgpool2d"])
def test_all_ten_at_once(case_name):
    case = CASES_BY_NAME[case_name]
    model, loss_fn, X, y = setup(case, LossSpec("ce"), N=3)
    # oracle
    fo = oracle.first_order(model, loss_fn, X, y)
    full = ggn(model, loss_fn, X, y)
    d_ggn = oracle.diag_by_param(full, model)
    d_h = oracle.diag_by_param(oracle.hessian_matrix(model, loss_fn, X, y), model)
    kfra = oracle.kfra_factors(model, loss_fn, X, y, CONV_G_POSITIONS)
    g_plain = oracle.grad(model, loss_fn, X, y)
    kflr = {}
    for name, m in model.named_children():
        if isinstance(m, nn.Linear):
            kflr.update(expected_linear_kflr(model, loss_fn, X, y, name, m))
        elif isinstance(m, nn.modules.conv._ConvNd):
            G = kron_G(model, loss_fn, X, y, m, 1, CONV_G_POSITIONS)
            kflr[f"{name}.weight"] = [G, oracle.conv_Omega(model, m, X)]
            kflr[f"{name}.bias"] = [G]

    torch.manual_seed(0)
    together, _ = run(model, loss_fn, X, y, _all_ten())
    for name, p in model.named_parameters():
        assert_close(p.grad, g_plain[name], f"{name}.grad")
        exp = fo[name]
        for f in ("grad_batch", "sum_grad_squared", "batch_l2"):
            assert_close(together[name][f], exp[f], f"{name}.{f}")
        assert_close(together[name]["variance"], exp["variance"], f"{name}.variance",
                     scale=float(exp["sum_grad_squared"].max()) / X.shape[0])
        assert_close(together[name]["diag_ggn_exact"], d_ggn[name], f"{name}.diag_ggn_exact")
        assert_close(together[name]["diag_h"], d_h[name], f"{name}.diag_h")
        check_factors(together[name]["kflr"], kflr[name], f"{name}.kflr")
        check_factors(together[name]["kfra"], kfra[name], f"{name}.kfra")
        err = oracle.rel_err(together[name]["diag_ggn_mc"].to(DT), d_ggn[name])
        assert err < 0.15, f"{name}.diag_ggn_mc rel. error {err:.3f}"
        err = oracle.rel_err(together[name]["kfac"][0].to(DT), kflr[name][0])
        assert err < 0.15, f"{name}.kfac[0] rel. error {err:.3f}"
        for field in ("grad_batch", "diag_ggn_exact", "kflr", "kfra", "diag_h"):
            assert getattr(p, field) is not None

    # each alone gives the same (deterministic ones exactly up to round-off)
    for ext in _all_ten():
        if ext.savefield in ("diag_ggn_mc", "kfac"):
            continue
        alone, _ = run(model, loss_fn, X, y, [ext])
        for name in alone:
            a, t = alone[name][ext.savefield], together[name][ext.savefield]
            if isinstance(a, torch.Tensor):
                a, t = [a], [t]
            for i, (ai, ti) in enumerate(zip(a, t)):
                assert_close(ti, ai, f"{name}.{ext.savefield}[{i}] together vs alone",
                             rtol=1e-12, atol_rel=1e-13)


# --------------------------------------------------------------------------- hypothesis


@settings(max_examples=15, deadline=None)
@given(cfg=conv_configs(), seed=st.integers(0, 2**16))
def test_hypothesis_conv_diagonals(cfg, seed):
    """DiagGGNExact and DiagHessian of random (transposed) convolutions vs the oracle."""
    torch.manual_seed(seed)
    built = _build_conv(cfg)
    if built is None:
        return
    model, X = built
    spec = cfg[-1]
    loss_fn = spec.make(3)
    y = make_target(spec, model(X), seed)
    results, _ = run(model, loss_fn, X, y, [DiagGGNExact(), DiagHessian()])
    check_diag(results, oracle.diag_by_param(ggn(model, loss_fn, X, y), model), "diag_ggn_exact",
               what=f"{cfg}: ")
    check_diag(results, oracle.diag_by_param(oracle.hessian_matrix(model, loss_fn, X, y), model),
               "diag_h", what=f"{cfg}: ")


@settings(max_examples=15, deadline=None)
@given(widths=st.lists(st.integers(1, 5), min_size=1, max_size=3),
       act=st.sampled_from([nn.Sigmoid, nn.Tanh, nn.ELU, nn.GELU, nn.Softplus, nn.ReLU]),
       N=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_hypothesis_mlp_second_order(widths, act, N, seed):
    """DiagHessian (fast paths and columns), DiagGGNExact and KFRA of random MLPs."""
    torch.manual_seed(seed)
    dims = [3, *widths, 2]
    layers = []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), act()]
    model = nn.Sequential(*layers[:-1]).double()
    X = torch.randn(N, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (N,))
    loss_fn = nn.CrossEntropyLoss()
    results, _ = run(model, loss_fn, X, y, [DiagGGNExact(), DiagHessian(), KFRA()])
    check_diag(results, oracle.diag_by_param(ggn(model, loss_fn, X, y), model), "diag_ggn_exact")
    check_diag(results, oracle.diag_by_param(oracle.hessian_matrix(model, loss_fn, X, y), model),
               "diag_h")
    for name, factors in oracle.kfra_factors(model, loss_fn, X, y).items():
        for got, exp in zip(results[name]["kfra"], factors):
            assert_close(got, exp, f"{name}.kfra")
