"""Lazily registered rules: Hugging Face ``Conv1D`` and timm's ``LayerNorm2d``/``LayerNorm``.

* ``transformers.pytorch_utils.Conv1D`` (weight ``[in, out]``, ``y = x W + b``): the
  Dense layout of ``nn.Linear`` with a transposed weight.  Every quantity against
  the float64 oracle; Kronecker factors ``[A, G]`` defined as for ``nn.Linear``
  (``oracle.linear_A``, expand ``oracle.kron_G``), and ``kron(A, G)`` is the exact GGN
  block of ``weight.flatten()`` for one sample and one row.
* timm is not installed here: its ``LayerNorm2d`` and channels-last ``LayerNorm`` are
  copied below (timm/layers/norm.py, non-fast path) with ``__module__`` set to
  ``timm.layers.norm``, which is all the lazy registration looks at.
"""

from __future__ import annotations

import subprocess
import sys

import oracle
import pytest
import torch
import torch.nn.functional as F
from test_first_order import check_first_order
from torch import nn
from util import assert_close, field_of, run

from curvopt import losses, rules
from curvopt.extensions import (
    KFAC,
    KFLR,
    KFRA,
    BatchGrad,
    BatchL2Grad,
    DiagGGNExact,
    DiagHessian,
    SumGradSquared,
    Variance,
)
from curvopt.factors import BATCH, LOSS
from curvopt.rules.fallback import FallbackRule
from curvopt.rules.hf import Conv1DRule
from curvopt.rules.norm import LayerNormRule
from curvopt.rules.timm import LayerNorm2dRule

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

DT = torch.float64
FIRST = [BatchGrad(), SumGradSquared(), Variance(), BatchL2Grad()]
FIRST_FIELDS = ("grad_batch", "sum_grad_squared", "variance", "batch_l2")


def test_registration_imports_no_third_party_package():
    code = ("import sys, curvopt; curvopt.rules.lookup; "
            "print(sorted(m for m in ('transformers', 'timm', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# ------------------------------------------------------------------------------ Conv1D


def test_conv1d_lookup():
    assert isinstance(rules.lookup(Conv1D(3, 2)), Conv1DRule)
    assert isinstance(rules.registered(Conv1D(3, 2)), Conv1DRule)

    class Same(Conv1D):  # a subclass that keeps forward and parameters: same rule
        pass

    class Other(Conv1D):  # a subclass that computes something else: the generic rule
        def forward(self, x):
            return super().forward(x) * 2

    assert isinstance(rules.lookup(Same(3, 2)), Conv1DRule)
    assert isinstance(rules.lookup(Other(3, 2)), FallbackRule)
    assert rules.lookup(Conv1D(3, 2)).kronecker(Conv1D(3, 2)) == {"weight", "bias"}


class SeqConv1D(nn.Module):
    """Conv1D on ``[N, S, 4]``, tanh, mean over S, Conv1D head (logits ``[N, 3]``)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = Conv1D(5, 4), Conv1D(3, 5)
        for c in (self.c1, self.c2):
            nn.init.normal_(c.weight, std=0.7)
            nn.init.normal_(c.bias, std=0.3)

    def forward(self, x):
        return self.c2(torch.tanh(self.c1(x)).mean(1))


class SeqConv1DOut(nn.Module):
    """Conv1D, sigmoid, Conv1D on ``[N, S, 4]``: output ``[N, S, 2]`` (MSE)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = Conv1D(3, 4), Conv1D(2, 3)
        for c in (self.c1, self.c2):
            nn.init.normal_(c.weight, std=0.7)

    def forward(self, x):
        return self.c2(torch.sigmoid(self.c1(x)))


def _conv1d_setup(kind, N=3, S=4):
    torch.manual_seed(0)
    if kind == "ce":
        model = SeqConv1D().to(DT).eval()
        X = torch.randn(N, S, 4, dtype=DT)
        return model, nn.CrossEntropyLoss(), X, torch.randint(0, 3, (N,))
    model = SeqConv1DOut().to(DT).eval()
    X = torch.randn(N, S, 4, dtype=DT)
    return model, nn.MSELoss(reduction="sum"), X, torch.randn(N, S, 2, dtype=DT)


def by_role(factors) -> dict:
    """``{"A": ..., "G": ...}`` of a KFLR/KFAC result, whatever its order: ``G`` scales
    with the loss, ``A`` is a batch average."""
    assert len(factors) == 2 and sorted(factors.scaling) == sorted([LOSS, BATCH])
    return {"G" if s == LOSS else "A": f for s, f in zip(factors.scaling, factors)}


@pytest.mark.parametrize("kind", ["ce", "mse"])
def test_conv1d_all_quantities_match_oracle(kind):
    model, loss_fn, X, y = _conv1d_setup(kind)
    fo = oracle.first_order(model, loss_fn, X, y)
    full = oracle.ggn_matrix(model, loss_fn, X, y)
    d_ggn = oracle.diag_by_param(full, model)
    d_h = oracle.diag_by_param(oracle.hessian_matrix(model, loss_fn, X, y), model)
    torch.manual_seed(0)
    results, _ = run(model, loss_fn, X, y, [*FIRST, DiagGGNExact(), DiagHessian(), KFLR(),
                                            KFAC()])
    check_first_order(results, fo, FIRST_FIELDS)
    for name in d_ggn:
        assert_close(field_of(results, name, "diag_ggn_exact"), d_ggn[name], f"{name}.diag_ggn")
        assert_close(field_of(results, name, "diag_h"), d_h[name], f"{name}.diag_h")
    for lname in ("c1", "c2"):
        layer = getattr(model, lname)
        A = oracle.linear_A(model, layer, X)  # rows of every sample and position: expand
        G = oracle.kron_G(model, loss_fn, X, y, layer, -1, "expand")
        got = by_role(field_of(results, f"{lname}.weight", "kflr"))
        assert_close(got["A"], A, f"{lname}.weight.kflr A")
        assert_close(got["G"], G, f"{lname}.weight.kflr G")
        (Gb,) = field_of(results, f"{lname}.bias", "kflr")
        assert_close(Gb, G, f"{lname}.bias.kflr")
        kfac = by_role(field_of(results, f"{lname}.weight", "kfac"))
        assert_close(kfac["A"], A, f"{lname}.weight.kfac A (deterministic)")
        assert kfac["G"].shape == G.shape


def _one_row():
    torch.manual_seed(1)
    model = nn.Sequential(Conv1D(4, 3), nn.Tanh(), Conv1D(3, 4)).to(DT).eval()
    for c in (model[0], model[2]):
        nn.init.normal_(c.weight)
    return model, nn.CrossEntropyLoss(), torch.randn(1, 3, dtype=DT), torch.tensor([2])


def test_conv1d_kflr_one_sample_is_exact_ggn_block():
    """kron(A, G) (A: [in, in], G: [out, out]) is the GGN block of weight.flatten()."""
    model, loss_fn, X, y = _one_row()
    full = oracle.ggn_matrix(model, loss_fn, X, y)
    results, _ = run(model, loss_fn, X, y, [KFLR()])
    for name in ("0.weight", "2.weight"):
        f = by_role(field_of(results, name, "kflr"))
        block = oracle.block(full, model, name)
        assert_close(torch.kron(f["A"], f["G"]), block, f"kron(A, G) of {name}")
        assert not torch.allclose(torch.kron(f["G"], f["A"]), block)  # the order matters


def test_conv1d_layout_kron_factors_order():
    """The layout returns ``[A, G]`` with roles "AG": row-major order of the stored weight."""
    torch.manual_seed(2)
    layer = Conv1D(3, 4).to(DT)
    nn.init.normal_(layer.weight)
    model = nn.Sequential(layer)
    loss_fn = nn.CrossEntropyLoss()
    X, y = torch.randn(1, 4, dtype=DT), torch.tensor([1])
    o = layer(X)
    lay = Conv1DRule().layouts(layer, (X,), {}, o.detach())["weight"]
    cols = losses.of(loss_fn).sqrt_hessian(o.detach(), y)
    (A, G), roles = lay.bind(cols).kron_factors()
    assert roles == "AG" and A.shape == (4, 4) and G.shape == (3, 3)
    block = oracle.block(oracle.ggn_matrix(model, loss_fn, X, y), model, "0.weight")
    assert_close(torch.kron(A, G), block, "kron(A, G)")


def _linear_twin(model):
    """The same network with ``nn.Linear`` (weight ``Conv1D.weight.T``): the oracle's KFRA
    knows Linear layers."""
    twin = nn.Sequential(*[nn.Linear(*m.weight.shape) if isinstance(m, Conv1D) else m
                           for m in model]).to(DT)
    with torch.no_grad():
        for m, t in zip(model, twin):
            if isinstance(m, Conv1D):
                t.weight.copy_(m.weight.T)
                t.bias.copy_(m.bias)
    return twin


def test_conv1d_kfra_matches_linear_twin():
    """KFRA through Conv1D layers (closed step W H̄ Wᵀ, Linear's G) vs the recursive
    definition on the Linear twin; the factors compared by shape (in ≠ out)."""
    torch.manual_seed(3)
    model = nn.Sequential(Conv1D(3, 5), nn.Tanh(), Conv1D(4, 3)).to(DT).eval()
    for c in (model[0], model[2]):
        nn.init.normal_(c.weight)
        nn.init.normal_(c.bias)
    X, y, loss_fn = torch.randn(4, 5, dtype=DT), torch.tensor([0, 3, 1, 1]), nn.CrossEntropyLoss()
    expected = oracle.kfra_factors(_linear_twin(model), loss_fn, X, y)
    results, _ = run(model, loss_fn, X, y, [KFRA()])
    for name, factors in expected.items():
        got = field_of(results, name, "kfra")
        assert len(got) == len(factors), name
        by_shape = {tuple(f.shape): f for f in got}
        for e in factors:
            assert_close(by_shape[tuple(e.shape)], e, f"{name}.kfra {tuple(e.shape)}")


def test_conv1d_kronecker_order_is_A_G():
    model, loss_fn, X, y = _one_row()
    results, _ = run(model, loss_fn, X, y, [KFLR(), KFRA()])
    f = field_of(results, "0.weight", "kflr")
    assert f.scaling == (BATCH, LOSS) and f[0].shape == (3, 3) and f[1].shape == (4, 4)
    f = field_of(results, "0.weight", "kfra")
    assert f[0].shape == (3, 3) and f[1].shape == (4, 4)


# ----------------------------------------------------------------------- timm norms


def _ln2d_class(module_path: str):
    """A fresh copy of timm's ``LayerNorm2d`` (timm/layers/norm.py) living in ``module_path``."""

    class LayerNorm2d(nn.LayerNorm):
        """LayerNorm for channels of '2D' spatial NCHW tensors."""

        def __init__(self, num_channels, eps=1e-6, affine=True, **kwargs):
            super().__init__(num_channels, eps=eps, elementwise_affine=affine, **kwargs)

        def forward(self, x):
            x = x.permute(0, 2, 3, 1)
            x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
            x = x.permute(0, 3, 1, 2)
            return x

    LayerNorm2d.__module__ = module_path
    LayerNorm2d.__qualname__ = "LayerNorm2d"
    return LayerNorm2d


def _timm_ln_class():
    """A copy of timm's channels-last ``LayerNorm`` (overrides forward, same maths)."""

    class LayerNorm(nn.LayerNorm):
        def __init__(self, num_channels, eps=1e-6, affine=True, **kwargs):
            super().__init__(num_channels, eps=eps, elementwise_affine=affine, **kwargs)

        def forward(self, x):
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    LayerNorm.__module__ = "timm.layers.norm"
    LayerNorm.__qualname__ = "LayerNorm"
    return LayerNorm


class ConvNeXtish(nn.Module):
    """Stem conv, LayerNorm2d, depthwise conv, channels-last LayerNorm, pointwise Linear."""

    def __init__(self, ln2d, ln):
        super().__init__()
        self.stem = nn.Conv2d(2, 3, 2)
        self.norm2d = ln2d(3)
        self.dw = nn.Conv2d(3, 3, 3, padding=1, groups=3)
        self.norm = ln(3)
        self.pw = nn.Linear(3, 4)
        self.head = nn.Linear(4 * 2 * 2, 3)
        for m in (self.norm2d, self.norm):
            nn.init.normal_(m.weight, 1.0, 0.5)
            nn.init.normal_(m.bias, 0.0, 0.5)

    def forward(self, x):
        h = self.dw(torch.tanh(self.norm2d(self.stem(x)))).permute(0, 2, 3, 1)
        h = torch.tanh(self.pw(self.norm(h)))
        return self.head(h.flatten(1))


def _norm_setup(module_path, N=3):
    torch.manual_seed(0)
    model = ConvNeXtish(_ln2d_class(module_path), _timm_ln_class()).to(DT).eval()
    X = torch.randn(N, 2, 3, 3, dtype=DT)
    return model, nn.CrossEntropyLoss(), X, torch.randint(0, 3, (N,))


@pytest.mark.parametrize("module_path,rule", [
    ("timm.layers.norm", LayerNorm2dRule),
    ("torchvision.models.convnext", LayerNorm2dRule),
    ("my_project.layers", FallbackRule),  # unknown: the generic rule, still exact
])
def test_layernorm2d_all_quantities_match_oracle(module_path, rule):
    model, loss_fn, X, y = _norm_setup(module_path)
    assert isinstance(rules.lookup(model.norm2d), rule)
    assert isinstance(rules.lookup(model.norm), LayerNormRule)
    fo = oracle.first_order(model, loss_fn, X, y)
    full = oracle.ggn_matrix(model, loss_fn, X, y)
    d_ggn = oracle.diag_by_param(full, model)
    d_h = oracle.diag_by_param(oracle.hessian_matrix(model, loss_fn, X, y), model)
    results, _ = run(model, loss_fn, X, y, [*FIRST, DiagGGNExact(), DiagHessian(), KFLR()])
    check_first_order(results, fo, FIRST_FIELDS)
    for name in d_ggn:
        assert_close(field_of(results, name, "diag_ggn_exact"), d_ggn[name], f"{name}.diag_ggn")
        assert_close(field_of(results, name, "diag_h"), d_h[name], f"{name}.diag_h")
    for name in ("norm2d.weight", "norm2d.bias", "norm.weight", "norm.bias"):
        # no Kronecker structure: the single factor is the exact GGN block
        (got,) = field_of(results, name, "kflr")
        assert_close(got, oracle.block(full, model, name), f"{name}.kflr")
