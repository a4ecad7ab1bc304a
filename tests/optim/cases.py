"""Tiny float64 problems and brute-force oracles (autograd / torch.func) for the optimizer tests.

Nothing here uses curvopt: the oracles are the independent references the
optimizers are compared against.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

DT = torch.float64


def tiny_mlp(seed: int = 0, act=nn.Tanh, sizes=(5, 4, 3)) -> nn.Sequential:
    torch.manual_seed(seed)
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers).to(DT)


def batches(T: int, N: int = 8, d: int = 5, C: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(N, d, generator=g, dtype=DT), torch.randint(0, C, (N,), generator=g))
        for _ in range(T)
    ]


def loss_hessian(o: torch.Tensor, y: torch.Tensor, loss_fn) -> torch.Tensor:
    """Per-sample Hessians of the reduced loss wrt the output: ``[N, C, C]`` (f included)."""
    N, C = o.shape
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        p = o.softmax(1)
        H = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)
        return H / N if loss_fn.reduction == "mean" else H
    if isinstance(loss_fn, nn.MSELoss):
        f = 1.0 / (N * C) if loss_fn.reduction == "mean" else 1.0
        return 2.0 * f * torch.eye(C, dtype=o.dtype).expand(N, C, C)
    raise NotImplementedError(type(loss_fn))


def kflr_factors(model: nn.Sequential, X, y, loss_fn) -> dict:
    """Exact-GGN Kronecker factors of every Linear of a Sequential, as ``[G, A]`` / ``[G]``.

    A = X_lᵀX_l / N (layer input), G = Σ_n J_nᵀ H_n J_n with J_n = ∂o_n/∂z_{l,n}
    (z_l the layer output), computed by autograd Jacobians sample by sample.
    """
    out = {}
    N = X.shape[0]
    h = X
    mods = list(model)
    with torch.no_grad():
        o = model(X)
    H = loss_hessian(o, y, loss_fn)
    for i, m in enumerate(mods):
        if isinstance(m, nn.Linear):
            A = h.T @ h / N
            z = m(h).detach()
            rest = nn.Sequential(*mods[i + 1 :])
            G = torch.zeros(z.shape[1], z.shape[1], dtype=DT)
            for n in range(N):
                J = torch.autograd.functional.jacobian(
                    lambda zz, rest=rest: rest(zz.unsqueeze(0))[0], z[n]
                )
                G += J.T @ H[n] @ J
            out[m.weight] = [G, A]
            if m.bias is not None:
                out[m.bias] = [G.clone()]
        with torch.no_grad():
            h = m(h)
    return out


def ggn_diagonal(model: nn.Module, X, y, loss_fn) -> dict:
    """Diagonal of Σ_n J_nᵀ H_n J_n with full per-sample Jacobians wrt all parameters."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(p, x):
        return functional_call(model, p, (x.unsqueeze(0),))[0]

    with torch.no_grad():
        o = model(X)
    H = loss_hessian(o, y, loss_fn)
    J = vmap(jacrev(f), in_dims=(None, 0))(params, X)  # name -> [N, C, *shape]
    out = {}
    named = dict(model.named_parameters())
    for k, Jk in J.items():
        Jf = Jk.flatten(2)  # [N, C, P]
        out[named[k]] = torch.einsum("ncp,ncd,ndp->p", Jf, H, Jf).reshape(named[k].shape)
    return out


def per_sample_terms(model: nn.Module, X, y, loss_fn) -> dict:
    """The per-sample terms x_n = f ∇ℓ_n whose sum is the gradient, ``[N, *shape]``."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    N = X.shape[0]
    f = 1.0 / N if loss_fn.reduction == "mean" else 1.0
    unreduced = type(loss_fn)(reduction="sum")

    def sample_loss(p, x, t):
        return unreduced(functional_call(model, p, (x.unsqueeze(0),)), t.unsqueeze(0))

    gs = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, X, y)
    named = dict(model.named_parameters())
    return {named[k]: f * v for k, v in gs.items()}


def gradients(model, X, y, loss_fn) -> dict:
    model.zero_grad()
    loss = loss_fn(model(X), y)
    loss.backward()
    out = {p: p.grad.detach().clone() for p in model.parameters()}
    model.zero_grad()
    return loss.detach(), out


def train(opt, model, loss_fn, data, closure=False):
    """The ordinary loop; returns the list of losses."""
    losses = []
    for X, y in data:
        if closure:

            def cl(X=X, y=y):
                opt.zero_grad()
                loss = loss_fn(model(X), y)
                loss.backward()
                return loss

            losses.append(float(opt.step(cl).detach()))
        else:
            opt.zero_grad()
            loss = loss_fn(model(X), y)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    return losses


def snapshot(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]
