"""BatchNorm in train mode: refused by default, rows as samples with batch_coupling='rows'."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from util import assert_close

import curvopt
from curvopt import losses
from curvopt.errors import CollectError, CurvoptError


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double()


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)


def test_train_mode_refused_without_opt_in():
    model, (X, y), loss_fn = _net(), _data(), nn.CrossEntropyLoss()
    with pytest.raises(CollectError, match="batch_coupling='rows'"):
        with curvopt.collect(model, loss_fn, curvopt.BatchGrad()):
            loss_fn(model(X), y).backward()


def _rows_reference(model, loss_fn, X, y):
    """The definition: the loss-Hessian columns (and the gradient) backpropagated through
    the coupled graph to each layer output; row n is sample n's cotangent."""
    out, ins = {}, {}
    def keep(k):
        def hook(m, a, o):
            out[k], ins[k] = o, a[0]

        return hook

    hooks = [m.register_forward_hook(keep(k)) for k, m in (("0", model[0]), ("1", model[1]),
                                                             ("3", model[3]))]
    o = model(X)
    for h in hooks:
        h.remove()
    loss = loss_fn(o, y)
    keys = ["0", "1", "3"]
    g = dict(zip(keys, torch.autograd.grad(loss, [out[k] for k in keys], retain_graph=True)))
    # The loss Hessian is block-diagonal over samples: each root column of one sample alone
    # (a column shared by all samples would add cross products through the coupling).
    S = losses.of(loss_fn).sqrt_hessian(o, y)
    cols = []
    for s in S:
        for n in range(len(X)):
            sn = torch.zeros_like(s)
            sn[n] = s[n]
            cols.append(dict(zip(keys, torch.autograd.grad(o, [out[k] for k in keys], sn,
                                                          retain_graph=True))))
    xhat = torch.nn.functional.batch_norm(ins["1"].detach(), None, None, training=True, eps=model[1].eps)

    def per_row(k, r):  # per-sample (row) gradients of each parameter of layer k
        if k in ("0", "3"):
            return {f"{k}.weight": r[:, :, None] * ins[k].detach()[:, None, :], f"{k}.bias": r}
        return {"1.weight": r * xhat, "1.bias": r}

    ref = {}
    for k in keys:
        for name, gb in per_row(k, g[k]).items():
            ref[name] = {"grad_batch": gb, "diag_ggn_exact": sum(per_row(k, c[k])[name].pow(2).sum(0)
                                                                 for c in cols)}
    return ref


def test_rows_as_samples_against_the_definition():
    model, (X, y) = _net(), _data()
    loss_fn = nn.CrossEntropyLoss()
    ref = _rows_reference(model, loss_fn, X, y)
    model.zero_grad(set_to_none=True)
    with curvopt.collect(model, loss_fn, curvopt.BatchGrad(), curvopt.DiagGGNExact(),
                         curvopt.KFLR(), batch_coupling="rows") as col:
        loss_fn(model(X), y).backward()
    for name, r in ref.items():
        got = col.results[name]
        assert_close(got["grad_batch"], r["grad_batch"], f"{name}.grad_batch")
        assert_close(got["diag_ggn_exact"], r["diag_ggn_exact"], f"{name}.diag_ggn_exact")
        p = dict(model.named_parameters())[name]
        assert_close(got["grad_batch"].sum(0), p.grad, f"{name}: rows sum to p.grad")
    assert len(col.results["0.weight"]["kflr"]) == 2  # [G, A]
    assert model[1].training  # the module's mode is left alone


@pytest.mark.parametrize("ext", [curvopt.KFRA, curvopt.DiagHessian])
def test_rows_refuses_per_sample_jacobian_quantities(ext):
    model, (X, y), loss_fn = _net(), _data(), nn.CrossEntropyLoss()
    with pytest.raises(CurvoptError, match="BatchNorm|batch normalization"):
        with curvopt.collect(model, loss_fn, ext(), batch_coupling="rows"):
            loss_fn(model(X), y).backward()
