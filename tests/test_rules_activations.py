"""DiagHessian through Hardswish, Hardsigmoid, ReLU6 and Mish (MobileNetV3, YOLO-style nets).

Autograd nodes (torch 2.13): ``HardswishBackward0`` (quadratic ``x(x+3)/6`` on
(-3, 3), so :math:`\\varphi'' = 1/3` there, 0 outside), ``MishBackward0`` (smooth),
``HardsigmoidBackward0`` and ``HardtanhBackward0`` (ReLU6; piecewise linear, no
residual).  Oracle: the diagonal of the autograd Hessian of the loss
(``oracle.hessian_matrix``).  torch has no double backward for Hardsigmoid, so its
oracle differentiates the same function written as ``clamp(x/6 + 1/2, 0, 1)``; torch's
Hardsigmoid backward multiplies by a float32 1/6 even in float64 (measured: every
gradient through it is off by 2^-23 relative), so that comparison allows 1e-6.
"""

from __future__ import annotations

import oracle
import pytest
import torch
from torch import nn
from util import assert_close, field_of, run

from curvopt.extensions import DiagGGNExact, DiagHessian
from curvopt.quantities.diag_hessian import LINEAR, SMOOTH

DT = torch.float64


class ClampHardsigmoid(nn.Module):
    """``Hardsigmoid`` as ``clamp(x/6 + 1/2, 0, 1)``: equal values, twice differentiable."""

    def forward(self, x):
        return torch.clamp(x / 6 + 0.5, 0.0, 1.0)


#: name -> (activation, activation of the oracle's twin model or None: the same)
ACTS = {
    "hardswish": (nn.Hardswish, None),
    "hardswish_inplace": (lambda: nn.Hardswish(inplace=True), None),
    "hardsigmoid": (nn.Hardsigmoid, ClampHardsigmoid),
    "relu6": (nn.ReLU6, None),
    "relu6_inplace": (lambda: nn.ReLU6(inplace=True), None),
    "mish": (nn.Mish, None),
}


def _mlp(act, sizes=(4, 5, 5, 3)):
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def _setup(name, N=4, seed=0):
    make, oracle_act = ACTS[name]
    torch.manual_seed(seed)
    model = _mlp(make).to(DT).eval()
    ref = model
    if oracle_act is not None:
        ref = _mlp(oracle_act).to(DT).eval()
        ref.load_state_dict(model.state_dict())
    # inputs scaled so that pre-activations fall on every piece (|a| > 3 and |a| < 3)
    X = 5 * torch.randn(N, 4, dtype=DT)
    y = torch.randint(0, 3, (N,))
    return model, ref, nn.CrossEntropyLoss(), X, y


@pytest.mark.parametrize("name", list(ACTS))
def test_diag_hessian_matches_oracle(name):
    model, ref, loss_fn, X, y = _setup(name)
    with torch.no_grad():
        pre = model[0](X)
    assert ((pre.abs() < 3).any() and (pre.abs() > 3).any()), "inputs must hit every piece"
    H = oracle.hessian_matrix(ref, loss_fn, X, y)
    expected = oracle.diag_by_param(H, ref)
    ggn = oracle.diag_by_param(oracle.ggn_matrix(ref, loss_fn, X, y), ref)
    results, _ = run(model, loss_fn, X, y, [DiagHessian(), DiagGGNExact()])
    rtol = 1e-6 if ref is not model else 1e-10  # see the module docstring
    for pname, exp in expected.items():
        assert_close(field_of(results, pname, "diag_h"), exp, f"{name}: {pname}.diag_h",
                     rtol=rtol)
        assert_close(field_of(results, pname, "diag_ggn_exact"), ggn[pname],
                     f"{name}: {pname}.diag_ggn_exact", rtol=rtol)
    if name.startswith(("hardswish", "mish")):
        # a curved activation: the Hessian differs from the GGN below it (the test has teeth)
        assert not torch.allclose(expected["0.weight"], ggn["0.weight"])


def test_tables():
    assert {"HardswishBackward0", "MishBackward0"} <= set(SMOOTH)
    assert {"HardsigmoidBackward0", "HardtanhBackward0"} <= LINEAR
    assert not set(SMOOTH) & LINEAR


@pytest.mark.parametrize("node,fn", [("HardswishBackward0", torch.nn.functional.hardswish),
                                     ("MishBackward0", torch.nn.functional.mish)])
def test_second_derivative_formula(node, fn):
    """φ'' of the table against autograd's double backward, on both sides of every kink."""
    x = torch.cat([torch.linspace(-6, 6, 97, dtype=DT), torch.tensor([-3.0001, 2.9999], dtype=DT)])
    xr = x.clone().requires_grad_(True)
    (d1,) = torch.autograd.grad(fn(xr).sum(), xr, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), xr)
    attr, phi2 = SMOOTH[node]
    y = fn(x.clone().requires_grad_(True))
    assert type(y.grad_fn).__name__ == node and hasattr(y.grad_fn, attr)
    away = (x.abs() - 3).abs() > 1e-9  # the kinks of Hardswish: measure zero
    assert_close(phi2(y.grad_fn, x)[away], d2[away], f"{node} φ''")
