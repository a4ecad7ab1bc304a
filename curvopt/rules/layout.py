"""The canonical layouts every layer is brought into, and their maths.

Notation: a batch of ``K`` cotangents arrives at a layer's output (``K = 1``
for the gradient, ``C`` columns of the GGN square root, ``M`` MC samples, ...),
the batch has ``N`` samples, each sample has ``S`` rows that share the
parameter (sequence positions, convolution output positions), ``g`` groups.

* :class:`Dense` -- Linear, Conv, ConvTranspose weights:
  :math:`\\nabla_W \\ell_{k,n} = \\sum_s R_{k,n,s}^\\top X_{n,s}` per group, with
  ``X: [N, S, g, Di]`` (inputs or unfolded patches, fixed by the forward pass) and
  ``R: [K, N, S, g, Do]`` (rows of the cotangent).
* :class:`Elementwise` -- biases and norm affine parameters:
  :math:`\\nabla \\ell_{k,n} = \\sum_s R_{k,n,s} \\odot \\hat X_{n,s}` with
  ``R, X̂: [.., S, D]`` (``X̂`` absent for a bias).
* :class:`Embedding` -- rows selected by integer indices.
* :class:`Materialized` -- anything else: per-sample gradients computed directly.

A :class:`Layout` is fixed by the forward pass; :meth:`Layout.bind` attaches a
batch of cotangents and returns a :class:`Bound`, which offers the few
reductions every quantity is made of: per-sample gradients, weighted sums of
squares, squared norms, the total, and Kronecker factors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import UnsupportedModuleError

# Materialised per-sample tensors are processed in chunks of about this many elements,
# so that peak memory stays bounded for wide layers and many cotangent columns.
_CHUNK_ELEMENTS = 1 << 24
#: The largest side of a dense (non-Kronecker) curvature block we are willing to build.
MAX_DENSE_BLOCK = 4096


class Rule:
    """Base class of the per-module rules (see :mod:`curvopt.rules`)."""

    def kronecker(self, module) -> set[str]:
        """Names of ``module``'s own parameters whose ``kfac``/``kflr`` are Kronecker factors.

        The others get a single dense GGN block (refused above :data:`MAX_DENSE_BLOCK`
        entries per side); optimizers give them a diagonal instead.
        """
        return set()

    #: DiagHessian: a diagonal residual at this layer's output moves one layer down in
    #: closed form, ``(r @ W²) ⊙ φ'²`` (true for a plain Linear: each weight entry feeds
    #: one output feature per row).
    transports_diagonal = False
    #: the rule finds the batch dimension itself (the generic rule, attention without
    #: batch_first): its batch need not be the model input's leading dimension
    locates_batch = False

    def layouts(self, module, args, kwargs, output) -> dict[str, Layout]:
        """Map each own parameter name of ``module`` to its :class:`Layout`."""
        raise NotImplementedError

    def check(self, module, name: str, coupling: str = "error") -> bool:
        """Before the forward: raise if the call is outside what the rule defines, and say
        whether it couples the samples of the batch (BatchNorm in train mode), which
        ``coupling="rows"`` accepts.  Runs for every module of the type, parameters or not."""
        return False

    def kfra_G(self, module, H: Tensor, out_shape) -> Tensor | None:
        """KFRA: the Kronecker factor ``G`` read off the batch-averaged Hessian ``H``
        (``[D, D]`` over one sample's output elements); ``None``: no Kronecker form (the
        parameters get the dense block of :math:`E_n[J_n^\\top \\bar H J_n]`)."""
        return None

    def kfra_step(self, module, H: Tensor, out_shape) -> Tensor | None:
        """KFRA: :math:`\\bar H` at the module's input from :math:`\\bar H` at its output
        in closed form, when the Jacobian is the same for every sample; ``None``: curvopt
        sends the columns of :math:`\\bar H^{1/2}` back through autograd instead."""
        return None


@dataclass
class Layout:
    """Base: how one parameter's per-sample gradients are formed for one module call."""

    param: torch.nn.Parameter
    N: int

    @property
    def shape(self) -> torch.Size:
        return self.param.shape

    def bind(self, cot: Tensor) -> Bound:  # cot: [K, N, *out]
        raise NotImplementedError

    def kind(self) -> tuple:
        """Records of one parameter with equal ``kind()`` are concatenated along S."""
        return (type(self).__name__, id(self))


class Bound:
    """A layout with a batch of cotangents attached."""

    layout: Layout
    #: whether sum_sq/l2 have a formula cheaper than squaring per-sample gradients
    closed_form = False

    # -- everything can be derived from the per-sample gradients ...
    def per_sample(self) -> Tensor:  # [K, N, *shape]
        raise NotImplementedError

    # ... but the subclasses override what has a cheaper closed form.
    def sum_sq(self, w: Tensor | None = None) -> Tensor:
        """:math:`\\sum_{k,n} w_{kn} (\\nabla \\ell_{kn})^{\\odot 2}`, shape ``param.shape``."""
        return _sum_sq_of_per_sample(self.per_sample, w, self.layout.shape)

    def l2(self) -> Tensor:  # [N], K == 1
        ps = self.per_sample()[0]
        return ps.flatten(1).pow(2).sum(1)

    def total(self) -> Tensor:  # sum over n of the K == 1 per-sample gradients
        return self.per_sample()[0].sum(0)

    def matches_total(self, t: Tensor, tol: float | None = None) -> bool:
        """Whether ``t`` equals :meth:`total`; only layouts with a cheap check say yes."""
        return False

    def dense_block(self) -> Tensor:
        """:math:`\\sum_{k,n} \\mathrm{vec}(\\nabla\\ell_{kn}) \\mathrm{vec}(\\nabla\\ell_{kn})^\\top`."""
        _refuse_dense(self.layout.param.numel())
        ps = self.per_sample().flatten(2).flatten(0, 1)
        return ps.T @ ps

    def kron_G(self) -> Tensor | None:
        return None

    def rotated(self, Qs: list[Tensor]) -> Bound | None:
        """This bound with every per-sample gradient rotated into a Kronecker eigenbasis,
        :math:`Q_1^\\top g_n Q_2` (one factor: :math:`Q_1^\\top g_n`), in the parameter's
        shape; ``None`` when the layout cannot rotate its parts more cheaply than
        materialising and projecting the per-sample gradients (the caller does that).

        ``Qs``: eigenvectors ``[*B, d_i, d_i]`` of the parameter's Kronecker factors, in
        the order the layout returns the factors (:meth:`DenseBound.kron_factors`).
        """
        return None


def _rotate(T: Tensor, Q: Tensor) -> Tensor:
    """``T: [..., g, d]`` times ``Q`` per group (``Q: [d, d]`` for one group, ``[g, d, d]``)."""
    Q = Q.to(T.dtype)
    if Q.dim() == 2:
        return T @ Q
    return torch.einsum("...gd,gde->...ge", T, Q)


def _refuse_dense(d: int) -> None:
    """Refuse a dense curvature block of a parameter with ``d`` entries above
    :data:`MAX_DENSE_BLOCK` per side."""
    if d > MAX_DENSE_BLOCK:
        raise UnsupportedModuleError(
            f"a dense curvature block of a parameter with {d} entries would be {d}x{d}; "
            f"above {MAX_DENSE_BLOCK} curvopt refuses it. Ask for the diagonal "
            "(DiagGGNExact/DiagGGNMC) for this parameter instead."
        )


def round_off(dtype: torch.dtype) -> float:
    """Relative tolerance of numerical self-checks on values stored in ``dtype``."""
    return {torch.float64: 1e-9, torch.float16: 4e-3, torch.bfloat16: 3e-2}.get(dtype, 1e-4)


def concat(bounds: list[Bound]) -> list[Bound]:
    """Merge bounds of one parameter that share a layout kind (weight sharing)."""
    if len(bounds) <= 1:
        return bounds
    groups: dict[tuple, list[Bound]] = {}
    for b in bounds:
        groups.setdefault(b.layout.kind(), []).append(b)
    out = []
    for members in groups.values():
        out.append(members[0].merge(members) if len(members) > 1 else members[0])
    return out


def _sum_sq_of_per_sample(per_sample_fn, w, shape):
    ps = per_sample_fn()
    sq = ps * ps
    if w is not None:
        sq = sq * w.reshape(*w.shape, *([1] * len(shape)))
    return sq.sum((0, 1))


def _chunks(total: int, per_item: int) -> int:
    return max(1, min(total, _CHUNK_ELEMENTS // max(per_item, 1)))


# ----------------------------------------------------------------------------------- Dense
@dataclass
class Dense(Layout):
    """``X: [N, S, g, Di]``; ``rows(cot) -> [K, N, S, g, Do]``.

    ``transposed`` (ConvTranspose): the gradient is :math:`X^\\top R`, of shape
    ``[g, Di, Do]`` instead of ``[g, Do, Di]``.
    ``expand``: the Kronecker factor A is normalised by ``N·S`` (Linear on
    ``[N, S, D]`` inputs: the "expand" convention of Eschenhagen et al. 2023)
    instead of ``N`` (convolutions, as BackPACK and Grosse & Martens 2016).

    Kronecker factors (:meth:`DenseBound.kron_factors`), per group ``j`` of ``g``:

    .. math:: A_j = \\frac1{N(\\cdot S)} \\sum_{n,s} x_{n,s,j} x_{n,s,j}^\\top,\\qquad
              G_j = \\sum_{k,n,s} r_{k,n,s,j} r_{k,n,s,j}^\\top

    (``reduce_G``: ``r`` summed over ``s`` first).  One group: ``A: [Di, Di]``,
    ``G: [Do, Do]``; ``g > 1`` (grouped/depthwise convolutions): a leading group
    dimension, ``A: [g, Di, Di]``, ``G: [g, Do, Do]``, and ``G_j ⊗ A_j`` approximates the
    GGN block of the group's weight slice ``weight[j·Do:(j+1)·Do]`` (row-major).
    ``kron_order`` is the order of the returned factors: ``"GA"`` (``weight: [Do, Di·k…]``;
    ConvTranspose: BackPACK's ``[G, Ω]``, a block of ``weight.transpose(0, 1)``) or
    ``"AG"`` (a weight stored ``[Di, Do]``, Hugging Face's ``Conv1D``: then
    ``kron(A, G)`` acts on ``weight.flatten()``).
    """

    X: Tensor = None
    rows: Callable[[Tensor], Tensor] = None
    transposed: bool = False
    expand: bool = False
    #: Kronecker G from the cotangent rows summed over S *before* the outer product
    #: (convolutions, as BackPACK: G is then the GGN of the bias), instead of per row.
    reduce_G: bool = False
    #: ConvTranspose only: ``cot -> [K, N, C_out]`` (summed over positions) for G, and
    #: ``() -> [N, P_out, C_in·k…]`` (the transposed convolution's own unfold) for A.
    kron_rows: Callable[[Tensor], Tensor] | None = None
    kron_X: Callable[[], Tensor] | None = None
    kron_order: str = "GA"

    def kind(self):
        return ("dense", self.X.shape[2:], self.transposed)

    def diag_weighted(self, w: Tensor) -> Tensor:
        """:math:`\\sum_{n} \\mathrm{diag}(J_n^\\top \\mathrm{diag}(w_n) J_n)` for weights ``w``
        shaped like the layer output: each output entry depends on a weight entry
        through one term, so the result is :math:`\\sum_{n,s} w_{n,s,o} X_{n,s,i}^2`."""
        R = self.rows(w.unsqueeze(0))[0]
        if self.transposed:
            return torch.einsum("nsgi,nsgo->gio", self.X.pow(2), R).reshape(self.shape)
        return torch.einsum("nsgo,nsgi->goi", R, self.X.pow(2)).reshape(self.shape)

    def bind(self, cot):
        return DenseBound(self, self.rows(cot), self.X, cot)


_PROBE_GENERATORS: dict = {}


def _probe_generator(device) -> torch.Generator:
    key = str(device)
    if key not in _PROBE_GENERATORS:
        _PROBE_GENERATORS[key] = torch.Generator(device=device).manual_seed(0x5EED)
    return _PROBE_GENERATORS[key]


_PROBE_VECTORS: dict = {}


def _probe_vectors(n: int, m: int, dtype, device) -> tuple[Tensor, Tensor, float]:
    """Random ``u [n]``, ``v [m]`` and ``‖u‖‖v‖``, drawn once per shape, dtype and device
    (the user's RNG stream stays untouched)."""
    key = (n, m, dtype, str(device))
    if key not in _PROBE_VECTORS:
        gen = _probe_generator(device)
        u = torch.randn(n, dtype=dtype, device=device, generator=gen)
        v = torch.randn(m, dtype=dtype, device=device, generator=gen)
        _PROBE_VECTORS[key] = (u, v, float(torch.linalg.vector_norm(u) * torch.linalg.vector_norm(v)))
    return _PROBE_VECTORS[key]


def _gram(R: Tensor, X: Tensor, transposed: bool) -> Tensor:
    """:math:`\\sum_n R_n^\\top X_n` per group for ``R: [n, g, Do]``, ``X: [n, g, Di]``.

    One group goes to a plain ``mm``: einsum routes the size-1 group through ``bmm``,
    measured 2x slower here for the weight-gradient-shaped products.
    """
    if transposed:
        R, X = X, R
    if R.shape[1] == 1:
        return (R[:, 0].T @ X[:, 0]).unsqueeze(0)
    return torch.einsum("ngo,ngi->goi", R, X)


def _group_gram(M: Tensor) -> Tensor:
    """:math:`\\sum_i m_{i,j} m_{i,j}^\\top` per group ``j`` for ``M: [rows, g, d]``.

    ``[d, d]`` for one group (today's 2-D factors), ``[g, d, d]`` otherwise.
    """
    if M.shape[1] == 1:
        M = M[:, 0]
        return M.T @ M
    M = M.transpose(0, 1)  # [g, rows, d]
    return M.transpose(1, 2) @ M


class DenseBound(Bound):
    def __init__(self, layout: Dense, R: Tensor, X: Tensor, cot: Tensor | None = None):
        self.layout, self.R, self.X, self.cot = layout, R, X, cot
        self.closed_form = R is not None and R.shape[2] == 1

    def merge(self, members):
        R = torch.cat([m.R for m in members], dim=2)
        X = torch.cat([m.X for m in members], dim=1)
        return DenseBound(self.layout, R, X)  # no single cotangent: see kron_G

    def per_sample(self):
        K, N = self.R.shape[:2]
        return self._einsum(self.X, self.R).reshape(K, N, *self.layout.shape)

    def per_sample_into(self, out: Tensor) -> Tensor:
        """``per_sample()[0]`` (K = 1) written into ``out`` (``[N, *shape]``, reused memory)."""
        R, X = self.R[0], self.X  # [N, S, g, Do], [N, S, g, Di]
        N, S, g, Do = R.shape
        Di = X.shape[-1]
        if self.layout.transposed:
            R, X, Do, Di = X, R, Di, Do  # the gradient is Xᵀ R: swap the roles
        if S == 1:
            torch.mul(R[:, 0, :, :, None], X[:, 0, :, None, :], out=out.view(N, g, Do, Di))
        else:
            torch.bmm(R.permute(0, 2, 3, 1).reshape(N * g, Do, S),
                      X.permute(0, 2, 1, 3).reshape(N * g, S, Di),
                      out=out.view(N * g, Do, Di))
        return out

    def _einsum(self, X, R):
        if self.layout.transposed:
            return torch.einsum("nsgi,knsgo->kngio", X, R)
        return torch.einsum("knsgo,nsgi->kngoi", R, X)

    def _per_sample_slice(self, k0, k1, n0, n1):
        out = self._einsum(self.X[n0:n1], self.R[k0:k1, n0:n1])
        return out.reshape(k1 - k0, n1 - n0, *self.layout.shape)

    def sum_sq(self, w=None):
        R, X = self.R, self.X
        K, N, S = R.shape[:3]
        if S == 1:
            # (Σ_k w R²)ᵀ X² : no per-sample tensor needed
            R1 = R[:, :, 0]  # [K, N, g, Do]
            # (elementwise square, then sum over k: einsum's contraction route was 4x slower)
            if w is not None:
                R2 = (R1 * R1 * w[:, :, None, None]).sum(0)
            elif K == 1:
                R2 = R1[0] * R1[0]
            else:
                R2 = (R1 * R1).sum(0)
            X1 = X[:, 0]
            return _gram(R2, X1 * X1, self.layout.transposed).reshape(self.layout.shape)
        per = self.layout.param.numel()
        out = torch.zeros(self.layout.shape, dtype=R.dtype, device=R.device)
        step = _chunks(N, per)
        for k in range(K):
            for n0 in range(0, N, step):
                n1 = min(N, n0 + step)
                g = self._per_sample_slice(k, k + 1, n0, n1)[0].pow(2)
                if w is not None:
                    g = g * w[k, n0:n1].reshape(-1, *([1] * len(self.layout.shape)))
                out += g.sum(0)
        return out

    def l2(self):
        R, X = self.R[0], self.X  # [N, S, g, Do], [N, S, g, Di]
        N, S, g, Do = R.shape
        Di = X.shape[-1]
        if S == 1:
            return (R[:, 0].pow(2).sum(-1) * X[:, 0].pow(2).sum(-1)).sum(-1)
        if S * S * (Do + Di) < S * Do * Di:
            # Gram identity ‖Rᵀ X‖²_F = ⟨R Rᵀ, X Xᵀ⟩ : cheaper when S² < Do·Di/(Do+Di)
            gr = torch.einsum("nsgo,ntgo->ngst", R, R)
            gx = torch.einsum("nsgi,ntgi->ngst", X, X)
            return (gr * gx).sum((1, 2, 3))
        step = _chunks(N, self.layout.param.numel())
        return torch.cat(
            [
                self._per_sample_slice(0, 1, n0, min(N, n0 + step))[0].flatten(1).pow(2).sum(1)
                for n0 in range(0, N, step)
            ]
        )

    def matches_total(self, t: Tensor, tol: float | None = None) -> bool:
        """``uᵀ t v == Σ_n (uᵀR_n)(X_nᵀ v)`` for random ``u, v``: O(N·(Do+Di)), not a product.

        Exact equality has probability one to be detected as a mismatch when ``t`` differs
        from the total; the tolerance only absorbs round-off.
        """
        tol = round_off(t.dtype) if tol is None else tol
        probe = self.total_residual(t, tol)
        if probe is None:
            return False
        residual, bound = probe
        return bool(residual <= bound) or bool(residual <= self.cancellation_bound(tol))

    def _probe_rows(self):
        """Every row of every sample, ``Rf: [N·S, Do]``, ``Xf: [N·S, Di]``, and the probe
        vectors ``u, v`` with ``‖u‖‖v‖``; ``None`` for transposed or grouped layouts."""
        R, X = self.R[0], self.X  # [N, S, g, Do], [N, S, g, Di]
        if self.layout.transposed or R.shape[2] != 1:
            return None
        u, v, uv = _probe_vectors(R.shape[-1], X.shape[-1], R.dtype, R.device)
        return R[:, :, 0].reshape(-1, R.shape[-1]), X[:, :, 0].reshape(-1, X.shape[-1]), u, v, uv

    def total_residual(self, t: Tensor, tol: float) -> tuple[Tensor, Tensor] | None:
        """``(|uᵀtv − Σ_n (uᵀR_n)(X_nᵀv)|, tol·‖u‖‖v‖‖t‖)`` as tensors (no device sync: a
        caller checks many parameters at once); ``t`` matches the total up to round-off
        when the first is at most the second.  ``None``: no cheap check for this layout.

        ``u, v`` are drawn once per shape from a private stream: independent of whatever
        makes ``t`` differ, so a mismatch is detected with probability one.
        """
        rows = self._probe_rows()
        if rows is None:
            return None
        Rf, Xf, u, v, uv = rows
        t2 = t.reshape(u.shape[0], v.shape[0]).to(Rf.dtype)
        residual = (torch.dot(u, t2 @ v) - torch.dot(Rf @ u, Xf @ v)).abs()
        # Cauchy-Schwarz scale of uᵀtv: round-off stays far below it, a real mismatch not
        return residual, torch.linalg.vector_norm(t2) * (tol * uv) + 1e-30

    def cancellation_bound(self, tol: float) -> Tensor:
        """The residual's round-off bound when the summed terms cancel (a weight before a
        train-mode BatchNorm): the scale of the terms, not of their sum (layouts that
        :meth:`total_residual` checks)."""
        Rf, Xf, _, _, uv = self._probe_rows()
        terms = (torch.linalg.vector_norm(Rf, dim=1) * torch.linalg.vector_norm(Xf, dim=1)).sum()
        return terms * (tol * uv) + 1e-30

    def total(self):
        R, X = self.R[0], self.X
        N, S, g = R.shape[:3]
        return _gram(R.reshape(N * S, g, -1), X.reshape(N * S, g, -1),
                     self.layout.transposed).reshape(self.layout.shape)

    def _needs_cot(self):
        if self.cot is None:
            raise UnsupportedModuleError(
                "Kronecker factors of a ConvTranspose applied more than once are not "
                "supported; use DiagGGNExact/DiagGGNMC for it."
            )

    def kron_A(self):
        """A, ``[Di, Di]`` or ``[g, Di, Di]`` per group (see :class:`Dense`)."""
        lay = self.layout
        g = self.X.shape[2]
        if lay.kron_X is not None:  # ConvTranspose: its own unfold over output positions
            self._needs_cot()
            U = lay.kron_X()  # [N, P_out, C_in·k…], channel-major: groups are contiguous
            N = U.shape[0]
            return _group_gram(U.reshape(-1, g, U.shape[-1] // g)) / N
        N, S = self.X.shape[:2]
        return _group_gram(self.X.flatten(0, 1)) / (N * S if lay.expand else N)

    def kron_G(self):
        """G, ``[Do, Do]`` or ``[g, Do, Do]`` per group (see :class:`Dense`)."""
        lay = self.layout
        g = self.X.shape[2]
        if lay.kron_rows is not None:
            self._needs_cot()
            R = lay.kron_rows(self.cot).flatten(0, 1)  # [K·N, C_out]
            return _group_gram(R.reshape(R.shape[0], g, -1))
        if lay.reduce_G:
            return _group_gram(self.R.sum(2).flatten(0, 1))
        return _group_gram(self.R.flatten(0, 2))

    def kron_factors(self) -> tuple[list[Tensor], str]:
        """``([F_1, F_2], roles)`` in the layout's ``kron_order``: ``[G, A]`` or ``[A, G]``."""
        G, A = self.kron_G(), self.kron_A()
        return ([A, G], "AG") if self.layout.kron_order == "AG" else ([G, A], "GA")

    def rotated(self, Qs):
        """Rows and inputs rotated: the per-sample gradient per group is
        :math:`\\sum_s R_{n,s}^\\top X_{n,s}`, so in the eigenbasis it is
        :math:`\\sum_s (R_{n,s} Q_G)^\\top (X_{n,s} Q_A)` (``"AG"`` order, HF ``Conv1D``:
        :math:`Q_A^\\top X^\\top R\\, Q_G`, the same rotations).  Cost
        :math:`N S (d_G^2 + d_A^2)` against :math:`N d_G d_A (d_G + d_A)` for projecting
        materialised gradients; with one row per sample :meth:`sum_sq` of the result is then
        the closed form :math:`(R'^{\\odot2})^\\top X'^{\\odot2}`.  ``None`` when the factors do
        not come from ``X`` and the rows (ConvTranspose) or when ``S`` is so large that
        rotating every row costs more than projecting (wide-image convolutions)."""
        lay = self.layout
        if len(Qs) != 2 or lay.kron_X is not None or lay.kron_rows is not None:
            return None
        Q_R, Q_X = (Qs[1], Qs[0]) if lay.kron_order == "AG" else (Qs[0], Qs[1])
        S, Do, Di = self.R.shape[2], self.R.shape[-1], self.X.shape[-1]
        if S > 1 and S * (Do * Do + Di * Di) >= Do * Di * (Do + Di):
            return None
        return DenseBound(lay, _rotate(self.R, Q_R), _rotate(self.X, Q_X))


# ------------------------------------------------------------------------------ Elementwise
@dataclass
class Elementwise(Layout):
    """``rows(cot) -> [K, N, S, D]``; ``Xhat: [N, S, D]`` or ``None`` (a bias)."""

    Xhat: Tensor | None = None
    rows: Callable[[Tensor], Tensor] = None
    #: bias of a convolution: Kronecker G from rows summed over S first (see Dense)
    reduce_G: bool = False

    def kind(self):
        return ("elementwise", self.Xhat is None)

    def diag_weighted(self, w: Tensor) -> Tensor:
        """See :meth:`Dense.diag_weighted`: :math:`\\sum_{n,s} w_{n,s,d} \\hat X_{n,s,d}^2`."""
        R = self.rows(w.unsqueeze(0))[0]
        out = R.sum((0, 1)) if self.Xhat is None else (R * self.Xhat.pow(2)).sum((0, 1))
        return out.reshape(self.shape)

    def bind(self, cot):
        return ElementwiseBound(self, self.rows(cot), self.Xhat)


class ElementwiseBound(Bound):
    def __init__(self, layout, R, Xhat):
        self.layout, self.R, self.Xhat = layout, R, Xhat

    def merge(self, members):
        R = torch.cat([m.R for m in members], dim=2)
        X = None if self.Xhat is None else torch.cat([m.Xhat for m in members], dim=1)
        return ElementwiseBound(self.layout, R, X)

    def per_sample(self):
        R = self.R
        if self.Xhat is None:
            g = R[:, :, 0] if R.shape[2] == 1 else R.sum(2)
        else:
            g = (R * self.Xhat).sum(2)
        return g.reshape(*R.shape[:2], *self.layout.shape)

    def rotated(self, Qs):
        """A bias (no ``X̂``): :math:`Q^\\top \\sum_s R_{n,s} = \\sum_s (R_{n,s} Q)`, the rows
        rotated.  With ``X̂`` (norm affine parameters) ``None``."""
        if self.Xhat is not None or len(Qs) != 1 or Qs[0].dim() != 2:
            return None
        return ElementwiseBound(self.layout, self.R @ Qs[0].to(self.R.dtype), None)

    def kron_G(self):
        # A bias has the Kronecker factor G of its layer alone (BackPACK: ``[G]``).
        if self.Xhat is not None:
            return None
        _refuse_dense(self.R.shape[-1])
        R = self.R.sum(2).flatten(0, 1) if self.layout.reduce_G else self.R.flatten(0, 2)
        return R.T @ R


# -------------------------------------------------------------------------------- Embedding
@dataclass
class Embedding(Layout):
    """``indices: [N, S]`` into ``num`` rows; ``rows(cot) -> [K, N, S, dim]``."""

    indices: Tensor = None
    rows: Callable[[Tensor], Tensor] = None
    padding_idx: int | None = None

    def kind(self):
        return ("embedding",)

    def bind(self, cot):
        return EmbeddingBound(self, self.rows(cot), self.indices)


class EmbeddingBound(Bound):
    closed_form = True

    def __init__(self, layout, R, indices):
        self.layout, self.R, self.indices = layout, R, indices

    def merge(self, members):
        R = torch.cat([m.R for m in members], dim=2)
        idx = torch.cat([m.indices for m in members], dim=1)
        return EmbeddingBound(self.layout, R, idx)

    def kron_A(self):
        """Row-usage factor ``diag(counts)/(N·S)`` over the ``num`` rows (the "input" side)."""
        num = self.layout.param.shape[0]
        if num > MAX_DENSE_BLOCK:
            raise UnsupportedModuleError(
                f"the Kronecker factor A of an Embedding with {num} rows would be "
                f"{num}x{num}; above {MAX_DENSE_BLOCK} curvopt refuses it. Use the diagonal GGN."
            )
        idx = self.indices.flatten()
        counts = torch.zeros(num, dtype=self.R.dtype, device=idx.device)
        counts.index_add_(0, idx, torch.ones_like(idx, dtype=counts.dtype))
        if self.layout.padding_idx is not None:
            counts[self.layout.padding_idx] = 0
        return torch.diag(counts) / idx.numel()

    def kron_G(self):
        # Every row counts, padding rows included: they are rows with a zero input,
        # as in Linear's expand convention (A has zeros for them).
        R = self.R.flatten(0, 2)
        return R.T @ R

    def _coalesced(self):
        """Per (k, n, row) summed gradient rows: keys ``b·num + row``, values ``[U, dim]``."""
        K, N, S, dim = self.R.shape
        num = self.layout.param.shape[0]
        idx = self.indices.unsqueeze(0).expand(K, N, S)
        b = torch.arange(K * N, device=idx.device).reshape(K, N, 1).expand(K, N, S)
        keys = (b * num + idx).flatten()
        vals = self.R.reshape(-1, dim)
        if self.layout.padding_idx is not None:
            keep = idx.flatten() != self.layout.padding_idx
            keys, vals = keys[keep], vals[keep]
        uniq, inv = torch.unique(keys, return_inverse=True)
        summed = torch.zeros(len(uniq), dim, dtype=vals.dtype, device=vals.device)
        summed.index_add_(0, inv, vals)
        return uniq // num, uniq % num, summed

    def per_sample(self):
        K, N = self.R.shape[:2]
        b, row, summed = self._coalesced()
        out = torch.zeros(K * N, *self.layout.shape, dtype=summed.dtype, device=summed.device)
        out[b, row] = summed
        return out.reshape(K, N, *self.layout.shape)

    def sum_sq(self, w=None):
        b, row, summed = self._coalesced()
        sq = summed.pow(2)
        if w is not None:
            sq = sq * w.flatten()[b, None]
        out = torch.zeros(self.layout.shape, dtype=sq.dtype, device=sq.device)
        return out.index_add_(0, row, sq)

    def l2(self):
        N = self.R.shape[1]
        b, _, summed = self._coalesced()
        out = torch.zeros(N, dtype=summed.dtype, device=summed.device)
        return out.index_add_(0, b % N if self.R.shape[0] > 1 else b, summed.pow(2).sum(1))

    def total(self):
        _, row, summed = self._coalesced()
        out = torch.zeros(self.layout.shape, dtype=summed.dtype, device=summed.device)
        return out.index_add_(0, row, summed)


# ----------------------------------------------------------------------------- Materialized
@dataclass
class Materialized(Layout):
    """Anything else: ``fn(cot) -> [K, N, *shape]`` per-sample gradients."""

    fn: Callable[[Tensor], Tensor] = None

    def bind(self, cot):
        return MaterializedBound(self, self.fn(cot))


class MaterializedBound(Bound):
    def __init__(self, layout, G):
        self.layout, self.G = layout, G

    def merge(self, members):  # pragma: no cover - kinds are unique per layout object
        return MaterializedBound(self.layout, sum(m.G for m in members))

    def per_sample(self):
        return self.G

