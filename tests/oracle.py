"""Brute-force float64 references for every quantity curvopt computes.

Everything here is built from ``torch.autograd`` / ``torch.func`` on the
model and loss as the user wrote them; nothing imports curvopt.  The
functions are slow (dense Jacobians, full Hessians, loops over samples) and
meant for tiny models only.

Conventions (BackPACK 1.7.1, see ``/tmp/contract.md``):

* The loss is :math:`\\mathcal L = \\sum_n f\\,\\ell_n`; ``f`` is fixed by the
  loss' reduction (``mean``: 1 / torch's own normaliser, e.g. ``N*D`` for
  MSE, ``sum_n w[y_n]`` for weighted cross-entropy; ``sum``: 1).
  :func:`per_sample_terms` returns the ``f * ell_n`` and checks that they sum
  to the loss torch computes, so every normaliser used in the tests is
  verified on the fly.
* Parameters are the trainable ones of ``model.named_parameters()`` (tied
  parameters once), flattened row-major and concatenated in that order.
* Kronecker factors are in row-major order, ``[G, A]`` for Linear/Conv
  weights; see the individual functions for the exact definitions.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

# --------------------------------------------------------------------------- parameters


def named_params(model: nn.Module) -> dict[str, Tensor]:
    """Trainable parameters by name, in ``named_parameters()`` order."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def param_slices(model: nn.Module) -> dict[str, tuple[slice, torch.Size]]:
    """Name -> (slice into the flat parameter vector, shape)."""
    out, start = {}, 0
    for n, p in named_params(model).items():
        out[n] = (slice(start, start + p.numel()), p.shape)
        start += p.numel()
    return out


def flat_params(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in named_params(model).values()])


def unflatten(model: nn.Module, theta: Tensor) -> dict[str, Tensor]:
    return {n: theta[s].reshape(shape) for n, (s, shape) in param_slices(model).items()}


def model_fn_of_theta(model: nn.Module, X: Tensor) -> Callable[[Tensor], Tensor]:
    """theta (flat) -> model output, the other parameters and buffers as in the module."""

    def fn(theta):
        return functional_call(model, unflatten(model, theta), (X,))

    return fn


# --------------------------------------------------------------------------- losses


def loss_normalizer(loss_fn: nn.Module, out: Tensor, y: Tensor) -> float:
    """The number torch divides the summed loss by for ``reduction='mean'``."""
    if loss_fn.reduction == "sum":
        return 1.0
    if loss_fn.reduction != "mean":
        raise ValueError(f"reduction {loss_fn.reduction!r} has no scalar loss")
    if isinstance(loss_fn, (nn.CrossEntropyLoss, nn.NLLLoss)):
        if y.is_floating_point():  # probability targets: divide by N * d1 ...
            return float(out.numel() // out.shape[1])
        valid = y != loss_fn.ignore_index
        if loss_fn.weight is None:
            return float(valid.sum())
        return float(loss_fn.weight[y[valid]].sum())
    # elementwise losses (MSE, BCEWithLogits, L1, ...): every element
    return float(out.numel())


def per_sample_terms(loss_fn: nn.Module, out: Tensor, y: Tensor, check: bool = True) -> Tensor:
    """``[N]`` tensor of ``f * ell_n``; they sum to ``loss_fn(out, y)`` (checked)."""
    unreduced = copy.copy(loss_fn)
    unreduced.reduction = "none"
    elem = unreduced(out, y)
    terms = elem.reshape(elem.shape[0], -1).sum(1) / loss_normalizer(loss_fn, out, y)
    if check:
        ref = loss_fn(out, y)
        err = (terms.sum() - ref).abs().item()
        assert err <= 1e-12 * max(1.0, ref.abs().item()), (
            f"oracle normaliser wrong for {loss_fn}: {terms.sum().item()} vs {ref.item()}"
        )
    return terms


def loss_factor(loss_fn: nn.Module, out: Tensor, y: Tensor) -> float:
    """``f`` of the contract: 1 / normaliser (mean) or 1 (sum)."""
    return 1.0 / loss_normalizer(loss_fn, out, y)


# --------------------------------------------------------------------------- generic Jacobians


def _jacobian(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """Dense Jacobian ``[out.numel(), x.numel()]`` of ``fn`` at ``x``.

    One plain ``torch.autograd.grad`` call per output element, on purpose no
    ``vmap``: in torch 2.13 ``torch.func.jacrev(jacrev(.))`` returns wrong
    Hessians through ``nn.LayerNorm`` (see ``test_oracle.py``), so the oracle
    relies on nothing but the ordinary autograd engine.
    """
    xr = x.detach().clone().requires_grad_(True)
    return _rows(fn(xr).reshape(-1), xr)


def _rows(out: Tensor, xr: Tensor) -> Tensor:
    """``[out.numel(), xr.numel()]``: one backward pass per entry of ``out``."""
    rows = []
    for i in range(out.numel()):
        if not out.requires_grad:
            rows.append(torch.zeros(xr.numel(), dtype=xr.dtype))
            continue
        (g,) = torch.autograd.grad(out[i], xr, retain_graph=True, allow_unused=True)
        rows.append(torch.zeros(xr.numel(), dtype=xr.dtype) if g is None else g.reshape(-1))
    return torch.stack(rows)


def _hessian(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """Dense Hessian ``[x.numel(), x.numel()]`` of a scalar ``fn`` (double backward, loop)."""
    xr = x.detach().clone().requires_grad_(True)
    # the fused CPU attention kernels have no double backward: use the math one
    with sdpa_kernel(SDPBackend.MATH):
        (g,) = torch.autograd.grad(fn(xr), xr, create_graph=True)
        return _rows(g.reshape(-1), xr)


def output_hessian(loss_fn: nn.Module, out: Tensor, y: Tensor) -> Tensor:
    """Hessian of the reduced loss w.r.t. the model output, ``[O, O]`` with O = out.numel()."""
    return _hessian(lambda o: loss_fn(o, y), out)


def model_output(model: nn.Module, X: Tensor) -> Tensor:
    with torch.no_grad():
        return model(X)


# --------------------------------------------------------------------------- first order


def per_sample_grads_from_terms(
    model: nn.Module, X: Tensor, terms_fn: Callable[[Tensor], Tensor]
) -> dict[str, Tensor]:
    """``grad_batch`` for any scalar ``sum(terms_fn(model(X)))``; ``terms_fn`` gives ``[N]``.

    One forward pass of the whole batch, then one backward pass per sample of
    that sample's term (valid for models that do not mix samples).
    """
    params = named_params(model)
    out = model(X)
    terms = terms_fn(out)
    N = terms.shape[0]
    result = {n: torch.zeros(N, *p.shape, dtype=p.dtype) for n, p in params.items()}
    for i in range(N):
        grads = torch.autograd.grad(
            terms[i], list(params.values()), retain_graph=True, allow_unused=True
        )
        for (name, _), g in zip(params.items(), grads):
            if g is not None:
                result[name][i] = g.detach()
    return result


def per_sample_grads(
    model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor, method: str = "loop"
) -> dict[str, Tensor]:
    """Name -> ``[N, *p.shape]`` of ``f * grad ell_n`` (BackPACK's ``grad_batch``).

    ``method='loop'``: full-batch graph, one ``autograd.grad`` per sample.
    ``method='vmap'``: ``vmap(grad)`` of ``functional_call`` on single samples
    (the model must be per-sample safe: no batch statistics).
    """
    if method == "loop":
        return per_sample_grads_from_terms(model, X, lambda o: per_sample_terms(loss_fn, o, y))

    if method == "vmap":
        with torch.no_grad():
            out = model(X)
        norm = loss_normalizer(loss_fn, out, y)
        unreduced = copy.copy(loss_fn)
        unreduced.reduction = "none"
        params = {n: p.detach() for n, p in named_params(model).items()}

        def sample_loss(ps, x, t):
            o = functional_call(model, ps, (x.unsqueeze(0),))
            return unreduced(o, t.unsqueeze(0)).sum() / norm

        return vmap(torch.func.grad(sample_loss), in_dims=(None, 0, 0))(params, X, y)
    raise ValueError(method)


def first_order_from_grad_batch(grad_batch: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """name -> {grad_batch, sum_grad_squared, variance, batch_l2} from the individual gradients."""
    res = {}
    for name, gb in grad_batch.items():
        N = gb.shape[0]
        sgs = (gb**2).sum(0)
        mean = gb.sum(0) / N
        res[name] = {
            "grad_batch": gb,
            "sum_grad_squared": sgs,
            "variance": sgs / N - mean**2,
            "batch_l2": gb.reshape(N, -1).pow(2).sum(1),
        }
    return res


def first_order(model, loss_fn, X, y) -> dict[str, dict[str, Tensor]]:
    return first_order_from_grad_batch(per_sample_grads(model, loss_fn, X, y))


# --------------------------------------------------------------------------- GGN / Hessian


def ggn_matrix(model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor) -> Tensor:
    """Full GGN ``J^T H J`` ``[P, P]`` of the loss as reduced (split at the model output)."""
    theta = flat_params(model)
    fn = model_fn_of_theta(model, X)
    out = fn(theta).detach()
    J = _jacobian(fn, theta)  # [O, P]
    H = output_hessian(loss_fn, out, y)  # [O, O]
    return J.T @ H @ J


def hessian_matrix(model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor) -> Tensor:
    """Full Hessian ``[P, P]`` of the reduced loss w.r.t. the flat parameters."""
    theta = flat_params(model)
    fn = model_fn_of_theta(model, X)
    return _hessian(lambda t: loss_fn(fn(t), y), theta)


def diag_by_param(M: Tensor, model: nn.Module) -> dict[str, Tensor]:
    """Diagonal of a ``[P, P]`` matrix, split by parameter and reshaped to ``p.shape``."""
    d = torch.diagonal(M)
    return {n: d[s].reshape(shape).clone() for n, (s, shape) in param_slices(model).items()}


def block(M: Tensor, model: nn.Module, name: str) -> Tensor:
    """The ``[p.numel(), p.numel()]`` diagonal block of parameter ``name`` (row-major)."""
    s, _ = param_slices(model)[name]
    return M[s, s].clone()


def grad(model, loss_fn, X, y) -> dict[str, Tensor]:
    params = named_params(model)
    loss = loss_fn(model(X), y)
    gs = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return {
        n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params.items(), gs)
    }


# --------------------------------------------------------------------------- layer capture


def capture_io(model: nn.Module, layer: nn.Module, X: Tensor) -> tuple[Tensor, Tensor]:
    """Input and output of ``layer`` (called once) during ``model(X)``, as they were at its
    call (copied: a later in-place op such as ``ReLU(inplace=True)`` does not change them;
    a tuple output such as attention's gives its first element)."""
    store = []

    def hook(mod, inp, out):
        out = out[0] if isinstance(out, tuple) else out
        store.append((inp[0].detach().clone(), out.detach().clone()))

    h = layer.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(X)
    finally:
        h.remove()
    assert len(store) == 1, f"layer called {len(store)} times; the oracle needs exactly one call"
    return store[0]


def jacobian_wrt_layer_output(model: nn.Module, layer: nn.Module, X: Tensor) -> Tensor:
    """``d model(X) / d z`` with z the output of ``layer`` over the whole batch, ``[O, Z]``."""
    _, z0 = capture_io(model, layer, X)

    def fn(z):
        h = layer.register_forward_hook(lambda mod, inp, out: z)
        try:
            return model(X)
        finally:
            h.remove()

    return _jacobian(fn, z0)


def layer_output_ggn(model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor, layer) -> Tensor:
    """``J_z^T H J_z`` ``[Z, Z]``: the GGN w.r.t. the output z of ``layer`` (whole batch)."""
    out = model_output(model, X)
    J = jacobian_wrt_layer_output(model, layer, X)
    H = output_hessian(loss_fn, out, y)
    return J.T @ H @ J


def _to_ncp(M: Tensor, z_shape: torch.Size, channel_axis: int) -> Tensor:
    """Reshape ``[Z, Z]`` into ``[N, C, P, N, C, P]`` (P: all non-batch, non-channel axes)."""
    nd = len(z_shape)
    ch = channel_axis % nd
    others = [a for a in range(1, nd) if a != ch]
    perm = [0, ch] + others
    N, C = z_shape[0], z_shape[ch]
    P = math.prod(z_shape[a] for a in others)
    M = M.reshape(*z_shape, *z_shape)
    M = M.permute(*perm, *[nd + a for a in perm])
    return M.reshape(N, C, P, N, C, P)


def kron_G(
    model: nn.Module,
    loss_fn: nn.Module,
    X: Tensor,
    y: Tensor,
    layer: nn.Module,
    channel_axis: int,
    positions: str,
    row_weights: Tensor | None = None,
) -> Tensor:
    """Output-side Kronecker factor ``G`` of KFLR from its definition.

    With ``M_n = J_{z,n}^T (f H_n) J_{z,n}`` the exact GGN w.r.t. the layer
    output of sample n, laid out as ``[C, P]`` (channels, positions):

    * ``positions='expand'``: ``G = sum_n sum_p M_n[(:, p), (:, p)]`` (per-position
      outer products of the backpropagated square root; Linear on ``[N, S, D]``,
      Eschenhagen et al. 2023).
    * ``positions='sum'``: ``G = sum_n sum_{p, p'} M_n[(:, p), (:, p')]`` (square root
      summed over positions, then outer product = the exact GGN of a bias added
      at every position; BackPACK's convolution convention, ``einsum('cbij->cbi')``).

    Both coincide for a single position (Linear on 2-D inputs).  ``row_weights``
    (``[N, P]``, expand only) weights the rows, e.g. to drop padding rows.
    """
    _, z0 = capture_io(model, layer, X)
    M = layer_output_ggn(model, loss_fn, X, y, layer)
    M6 = _to_ncp(M, z0.shape, channel_axis)
    if positions == "expand":
        if row_weights is not None:
            return torch.einsum("napnbp,np->ab", M6, row_weights.to(M6.dtype))
        return torch.einsum("napnbp->ab", M6)
    if positions == "sum":
        return torch.einsum("napnbq->ab", M6)
    raise ValueError(positions)


def linear_A(model: nn.Module, layer: nn.Linear, X: Tensor) -> Tensor:
    """``A = sum_{rows} x x^T / rows`` of the layer input (rows = N, or N*S for ``[N, S, D]``)."""
    x, _ = capture_io(model, layer, X)
    x = x.reshape(-1, x.shape[-1])
    return x.T @ x / x.shape[0]


def embedding_A(model: nn.Module, layer: nn.Embedding, X: Tensor) -> Tensor:
    """``A = sum_{rows} e e^T / rows`` of the one-hot indices (a diagonal of counts).

    Rows of ``padding_idx`` contribute nothing to the numerator (torch's embedding
    backward never sends gradient to that row, so its GGN rows and columns are
    exactly zero) but count in ``rows``.
    """
    idx, _ = capture_io(model, layer, X)
    onehot = F.one_hot(idx.reshape(-1), layer.num_embeddings).to(layer.weight.dtype)
    if layer.padding_idx is not None:
        onehot[:, layer.padding_idx] = 0
    return onehot.T @ onehot / onehot.shape[0]


# --------------------------------------------------------------------------- convolutions


def _conv_padding(module: nn.modules.conv._ConvNd, d: int) -> list[int]:
    """``F.pad`` list (last dim first) of the padding the convolution applies."""
    k, dil = module.kernel_size, module.dilation
    if isinstance(module.padding, str):
        if module.padding == "valid":
            per_dim = [(0, 0)] * d
        else:  # 'same': torch puts the extra element on the right
            per_dim = []
            for i in range(d):
                total = dil[i] * (k[i] - 1)
                per_dim.append((total // 2, total - total // 2))
    else:
        per_dim = [(p, p) for p in module.padding]
    pad = []
    for left, right in reversed(per_dim):
        pad += [left, right]
    return pad


def _onehot_kernel(C: int, kernel_size, dtype) -> Tensor:
    """``[C*K, 1, *k]`` one-hot kernels: channel ``c*K + j`` picks kernel offset j of channel c."""
    K = math.prod(kernel_size)
    eye = torch.eye(K, dtype=dtype).reshape(K, 1, *kernel_size)
    return eye.repeat(C, 1, *[1] * len(kernel_size))


def unfold_conv(module: nn.modules.conv._ConvNd, x: Tensor) -> Tensor:
    """Unfolded patches ``[N, C_in*K, L]`` of a ConvNd input (rows ordered like ``weight[o]``).

    Padding (zeros, 'same', reflect, circular) is applied first, then a
    one-hot convolution extracts every kernel offset of every channel.
    """
    d = x.dim() - 2
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    pad = _conv_padding(module, d)
    if any(pad):
        x = F.pad(x, pad, mode=mode)
    C = x.shape[1]
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[d]
    U = conv(
        x,
        _onehot_kernel(C, module.kernel_size, x.dtype),
        stride=module.stride,
        dilation=module.dilation,
        groups=C,
    )
    return U.reshape(x.shape[0], U.shape[1], -1)


def unfold_conv_transpose(module: nn.modules.conv._ConvTransposeNd, x: Tensor) -> Tensor:
    """Unfolded input ``[N, C_in*K, L]`` of a ConvTransposeNd (BackPACK's one-hot transpose conv).

    ``z[n, o, l] = sum_{i,k} weight[i, o, k] * U[n, i*K + k, l]`` (+ bias); output_padding included.
    """
    d = x.dim() - 2
    C = x.shape[1]
    conv_t = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[d]
    U = conv_t(
        x,
        _onehot_kernel(C, module.kernel_size, x.dtype).reshape(C, -1, *module.kernel_size),
        stride=module.stride,
        padding=module.padding,
        output_padding=module.output_padding,
        dilation=module.dilation,
        groups=C,
    )
    return U.reshape(x.shape[0], U.shape[1], -1)


def conv_Omega(model: nn.Module, layer: nn.Module, X: Tensor) -> Tensor:
    """``Omega = sum_n U_n U_n^T / N`` from the unfolded input of a (transpose) convolution.

    groups must be 1 (the Kronecker factor of a grouped convolution is not defined
    by the contract).
    """
    assert layer.groups == 1
    x, _ = capture_io(model, layer, X)
    if isinstance(layer, nn.modules.conv._ConvTransposeNd):
        U = unfold_conv_transpose(layer, x)
    else:
        U = unfold_conv(layer, x)
    return torch.einsum("nil,njl->ij", U, U) / U.shape[0]


def conv_from_unfold(layer: nn.Module, x: Tensor) -> Tensor:
    """The layer output rebuilt from the unfolded input (for self-tests of the unfold)."""
    g = layer.groups
    W = layer.weight
    if isinstance(layer, nn.modules.conv._ConvTransposeNd):
        U = unfold_conv_transpose(layer, x)  # [N, C_in*K, L]
        C_in, C_out_g = W.shape[:2]
        K = math.prod(W.shape[2:])
        Ug = U.reshape(U.shape[0], g, C_in // g, K, -1)
        Wg = W.reshape(g, C_in // g, C_out_g, K)
        z = torch.einsum("giok,ngikl->ngol", Wg, Ug)
        z = z.reshape(U.shape[0], g * C_out_g, -1)
    else:
        U = unfold_conv(layer, x)
        C_out, C_in_g = W.shape[:2]
        K = math.prod(W.shape[2:])
        Ug = U.reshape(U.shape[0], g, C_in_g * K, -1)
        Wg = W.reshape(g, C_out // g, C_in_g * K)
        z = torch.einsum("goj,ngjl->ngol", Wg, Ug).reshape(U.shape[0], C_out, -1)
    if layer.bias is not None:
        z = z + layer.bias.reshape(1, -1, 1)
    return z


# --------------------------------------------------------------------------- KFRA


def kfra_factors(
    model: nn.Sequential, loss_fn: nn.Module, X: Tensor, y: Tensor, conv_positions: str = "sum"
) -> dict[str, list[Tensor]]:
    """KFRA factors of a ``nn.Sequential`` from the recursive definition (Botev et al. 2017).

    ``Hbar_top = f sum_n H_n`` (per-sample Hessians of the loss w.r.t. the output,
    ``[D, D]``); through every module ``Hbar_in = (1/N) sum_n J_n^T Hbar_out J_n``
    with ``J_n`` the per-sample Jacobian of the module at its input.  A Linear's
    ``G`` is ``Hbar`` at its output; a convolution's ``G`` sums ``Hbar`` over all
    pairs of output positions (``conv_positions='sum'``: ``[C, S, C, S].sum((1, 3))``,
    BackPACK's convention) or over the diagonal pairs only (``'expand'``).
    ``A`` / ``Omega`` as for KFLR.  Biases: ``[G]``.
    """
    inputs = []
    x = X
    with torch.no_grad():
        for m in model:
            inputs.append(x)
            x = m(x)
    out = x
    N = X.shape[0]
    D = out[0].numel()
    H = output_hessian(loss_fn, out, y).reshape(N, D, N, D)
    Hbar = sum(H[n, :, n, :] for n in range(N))
    names = {id(m): name for name, m in model.named_children()}
    result: dict[str, list[Tensor]] = {}
    for i in reversed(range(len(model))):
        m = model[i]
        prefix = names[id(m)]
        if isinstance(m, nn.Linear):
            assert inputs[i].dim() == 2
            xin = inputs[i]
            result[f"{prefix}.weight"] = [Hbar.clone(), xin.T @ xin / N]
            if m.bias is not None:
                result[f"{prefix}.bias"] = [Hbar.clone()]
        elif isinstance(m, (nn.modules.conv._ConvNd,)):
            z_shape = m(inputs[i][:1]).shape
            C, S = z_shape[1], math.prod(z_shape[2:])
            H4 = Hbar.reshape(C, S, C, S)
            if conv_positions == "sum":
                G = H4.sum((1, 3))
            elif conv_positions == "expand":
                G = torch.einsum("apbp->ab", H4)
            else:
                raise ValueError(conv_positions)
            if isinstance(m, nn.modules.conv._ConvTransposeNd):
                U = unfold_conv_transpose(m, inputs[i])
            else:
                U = unfold_conv(m, inputs[i])
            result[f"{prefix}.weight"] = [G, torch.einsum("nil,njl->ij", U, U) / N]
            if m.bias is not None:
                result[f"{prefix}.bias"] = [G.clone()]
        if i == 0:
            break
        Jbar = torch.zeros(inputs[i][0].numel(), inputs[i][0].numel(), dtype=Hbar.dtype)
        for n in range(N):
            Jn = _jacobian(lambda v, m=m: m(v.unsqueeze(0)).reshape(-1), inputs[i][n])
            Jbar += Jn.T @ Hbar @ Jn
        Hbar = Jbar / N
    return result


# --------------------------------------------------------------------------- comparisons


def rel_err(a: Tensor, b: Tensor) -> float:
    """``||a - b|| / ||b||`` (Frobenius)."""
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def kron_list(factors: list[Tensor]) -> Tensor:
    out = factors[0]
    for f in factors[1:]:
        out = torch.kron(out, f)
    return out
