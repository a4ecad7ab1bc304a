"""Every parameter gets a block; affordable curvature for many classes; real models train."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from curvopt.optim import CurvatureChoiceWarning, DiagGGNAdam, KFACOptimizer, VarianceAdaptiveSGD
from curvopt.rules import lookup

from .cases import DT, ggn_diagonal, gradients

CE = nn.CrossEntropyLoss()


def ln_mlp(dtype=DT, classes=5):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 16), nn.LayerNorm(16),
        nn.GELU(), nn.Linear(16, classes),
    ).to(dtype)


def data(N=16, d=8, classes=5, dtype=DT):
    g = torch.Generator().manual_seed(1)
    return torch.randn(N, d, generator=g, dtype=dtype), torch.randint(0, classes, (N,), generator=g)


def _choices(record):
    return [w for w in record if issubclass(w.category, CurvatureChoiceWarning)]


# ---------------------------------------------------------------------------- block plan
def test_norm_affine_parameters_get_diagonal_blocks_and_the_engine_computes_only_those():
    m = ln_mlp()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        opt = KFACOptimizer(m, CE, curvature="kflr")
    (summary,) = _choices(rec)
    assert "KFACOptimizer: 6 Kronecker, 4 diagonal (norm affine: 4)" in str(summary.message)
    only = opt.collector.only
    assert {id(p) for p in only["kflr"]} == {id(p) for i in (0, 3, 6) for p in m[i].parameters()}
    assert {id(p) for p in only["diag_ggn_exact"]} == {id(p) for i in (1, 4) for p in m[i].parameters()}
    X, y = data()
    opt.zero_grad()
    CE(m(X), y).backward()
    opt.step()
    for i in (1, 4):
        for p in m[i].parameters():
            assert "diag_avg" in opt.state[p] and "kflr" not in opt.state[p]
            assert "factors" not in opt.state[p]
    assert "factors" in opt.state[m[0].weight] and "diag_ggn_exact" not in opt.state[m[0].weight]
    report = opt.block_report()
    rows = report.splitlines()[2:]
    assert sum("norm affine" in r for r in rows) == 4 and sum("kronecker" in r for r in rows) == 6
    assert "0.weight" in report and "(16, 8)" in report
    opt.close()


def test_diagonal_block_step_equals_the_damped_ggn_diagonal_oracle():
    """First step of a LayerNorm weight: θ − η g / (diag GGN + λ), the GGN from torch.func."""
    m = ln_mlp()
    X, y = data()
    h = ggn_diagonal(m, X, y, CE)[m[1].weight]
    _, g = gradients(m, X, y, CE)
    expected = m[1].weight.detach() - 0.1 * g[m[1].weight] / (h + 1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CurvatureChoiceWarning)
        opt = KFACOptimizer(m, CE, lr=0.1, damping=1e-2, curvature="kflr", kl_clip=None)
    opt.zero_grad()
    CE(m(X), y).backward()
    opt.step()
    torch.testing.assert_close(m[1].weight.detach(), expected, rtol=1e-10, atol=1e-12)
    opt.close()


def test_dense_norm_blocks_on_request():
    m = ln_mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("error", CurvatureChoiceWarning)  # all Kronecker: nothing to say
        opt = KFACOptimizer(m, CE, curvature="kflr", norm_blocks="dense")
    X, y = data()
    opt.zero_grad()
    CE(m(X), y).backward()
    opt.step()
    assert [f.shape for f in opt.state[m[1].weight]["factors"]] == [(16, 16)]
    opt.close()


def test_parameters_the_engine_cannot_factor_get_the_diagonal():
    """A 5000-row embedding (A would be 5000², refused by the engine) and a grouped conv."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(5000, 4)
            self.conv = nn.Conv1d(4, 4, 3, padding=1, groups=2)
            self.head = nn.Linear(4, 3)

        def forward(self, ids):
            return self.head(self.conv(self.emb(ids).transpose(1, 2)).mean(2))

    torch.manual_seed(0)
    m = Net().to(DT)
    with pytest.warns(CurvatureChoiceWarning, match="Kronecker factor above 4096: 1"):
        opt = KFACOptimizer(m, CE, lr=0.3)
    grouped_kron = "weight" in lookup(m.conv).kronecker(m.conv)
    report = opt.block_report()
    assert ("conv.weight" in report) and (("no Kronecker rule" in report) != grouped_kron)
    ids = torch.randint(0, 5000, (16, 6), generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = CE(m(ids), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert "diag_avg" in opt.state[m.emb.weight]
    opt.close()


# ---------------------------------------------------------------- curvature for many classes
@pytest.mark.parametrize("classes, exact", [(5, True), (40, False)])
def test_auto_curvature_is_exact_for_few_classes_and_mc_for_many(classes, exact):
    m = ln_mlp(classes=classes)
    X, y = data(classes=classes)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        adam = DiagGGNAdam(m, CE)
        for _ in range(3):
            adam.zero_grad()
            CE(m(X), y).backward()
            adam.step()
    (said,) = _choices(rec)  # said once
    assert ("exact" if exact else "Monte Carlo") in str(said.message)
    assert ("diag_ggn_exact" if exact else "diag_ggn_mc") in adam.state[m[0].weight]
    assert type(adam.collector.extensions[0]).__name__ == ("DiagGGNExact" if exact else "DiagGGNMC")
    adam.close()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        kfac = KFACOptimizer(m, CE, curvature="auto")
        kfac.zero_grad()
        CE(m(X), y).backward()
        kfac.step()
    assert len([w for w in _choices(rec) if "auto" in str(w.message)]) == 1
    assert ("kflr" if exact else "kfac") in kfac.state[m[0].weight]
    kfac.close()


def test_kflr_with_many_classes_says_what_it_costs():
    m = ln_mlp(classes=40)
    X, y = data(classes=40)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CurvatureChoiceWarning)
        opt = KFACOptimizer(m, CE, curvature="kflr")
    with pytest.warns(CurvatureChoiceWarning, match="39 loss-Hessian columns"):
        opt.zero_grad()
        CE(m(X), y).backward()
    opt.step()
    opt.close()


# -------------------------------------------------------------------------- real-ish models
def _gpt2():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=32, n_positions=16)
    torch.manual_seed(0)

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.gpt = transformers.GPT2LMHeadModel(cfg)

        def forward(self, ids):
            return self.gpt(ids).logits

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 32, (4, 12), generator=g)
    return LM().eval(), ids, torch.randint(0, 32, (4, 12), generator=g)


def _mlp():
    X, y = data(N=32, dtype=torch.float32)
    return ln_mlp(torch.float32), X, y


OPTIMIZERS = {
    "kfac": lambda m: KFACOptimizer(m, CE),
    "diag_ggn_adam": lambda m: DiagGGNAdam(m, CE),
    "variance_sgd": lambda m: VarianceAdaptiveSGD(m, CE),
}


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("model_name", ["gpt2", "layernorm_mlp"])
def test_real_models_train_with_defaults(model_name, opt_name):
    model, X, y = _gpt2() if model_name == "gpt2" else _mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CurvatureChoiceWarning)
        opt = OPTIMIZERS[opt_name](model)
    losses = []
    for _ in range(12):
        opt.zero_grad()
        out = model(X)
        loss = CE(out.reshape(-1, out.shape[-1]), y.reshape(-1))  # tokens as rows
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert torch.isfinite(torch.tensor(losses)).all()
    assert max(losses[-3:]) < 0.95 * losses[0], losses
    assert all(int(opt.state[p]["step"]) > 0 for p in model.parameters())  # none left out
    opt.close()


def test_gpt2_block_report_names_every_parameter():
    model, _, _ = _gpt2()
    with pytest.warns(CurvatureChoiceWarning, match="diagonal .*norm affine: 6"):
        opt = KFACOptimizer(model, CE)
    report = opt.block_report()
    for name, _ in model.named_parameters():
        assert name in report
    assert "shared by several modules" in report  # the tied embedding / LM head
    opt.close()


def test_exact_columns_count_what_the_engine_sends_back():
    from curvopt.optim._base import exact_columns

    mse = nn.MSELoss()
    assert exact_columns(CE, torch.zeros(4, 10)) == 9
    assert exact_columns(CE, torch.zeros(4, 10, 3, 2)) == 9 * 6
    assert exact_columns(mse, torch.zeros(4, 7)) == 7
    assert exact_columns(CE, torch.zeros(4 * 12, 32), batch=4) == 31 * 12  # logits.reshape(-1, V)
    assert exact_columns(CE, torch.zeros(4, 32), batch=4) == 31
