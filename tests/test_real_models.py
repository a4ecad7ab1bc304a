"""The engine and the optimizers on the architectures people train (issue 10).

Models: tiny float64 copies of torchvision's ResNet basic block and MobileNetV3
inverted residual (depthwise conv, squeeze-excitation, Hardswish/Hardsigmoid),
torchvision's ViT encoder block (``nn.MultiheadAttention``, ``class_token`` and
``pos_embedding`` owned by containers) and timm's ConvNeXt block (depthwise 7x7,
channels-last LayerNorm, Linear MLP, layer scale ``gamma``), each as a small
classifier (``tests/real_models.py``), plus ``nn.MultiheadAttention`` in every
calling convention and a position embedding called on a batch of one.

What is checked, and against what:

* **eval mode, exactness**: every quantity against ``tests/oracle.py`` (per-sample
  gradients by one backward per sample; the GGN ``JᵀHJ`` and the Hessian from
  autograd), or a :class:`~curvopt.errors.CurvoptError` where an error is allowed
  (DiagHessian through products of activations, KFRA on graphs that are not chains).
  Kronecker factors (``[G, A]``) against their definitions where the layer is a
  module whose input and output can be captured: Linear (``expand`` convention over
  sequence/position rows), Conv2d (``G`` from the square root summed over positions,
  ``Ω = Σ UUᵀ/N``), grouped Conv2d per group (layout ``[g, ·, ·]``, the one
  ``curvopt.optim.functional`` takes), MultiheadAttention's projections (from a
  re-computation of the attention with the projections as explicit tensors); a single
  factor is the exact GGN block (norm layers, container parameters, generic rule).
* **train-mode BatchNorm**: without an opt-in every quantity is refused; with
  :func:`collect_rows` (``batch_coupling="rows"``) every quantity is checked against
  its own definition, in which the rows of what flows back are the samples:

  .. math:: g_n = J_{z_n,\\theta}^\\top (\\partial L/\\partial z)_n,\\qquad
            \\mathrm{GGN}^{rows}_\\theta = \\sum_n J_{z_n,\\theta}^\\top
            \\big[J_{o,z}^\\top H J_{o,z}\\big]_{nn} J_{z_n,\\theta}

  (``z`` the output of the parameter's module, ``o`` the model output, ``H`` the
  loss Hessian, ``J_{o,z}`` the Jacobian through the *batch-coupled* graph; ``[·]_{nn}``
  the block of row ``n``).  This GGN does not depend on the choice of the loss
  Hessian's square root, and it is what MC sampling (one joint draw of targets for the
  batch, backpropagated once, the K-FAC practice of kfac-pytorch) converges to, which
  :func:`test_rows_mc_converges_to_rows_ggn` checks.  Where the batch does not couple
  (eval mode) the opt-in must change nothing.
* **the optimizers**: each trains each small full model 12 steps on a fixed batch
  (float32, ResNet and MobileNet in train mode) and the loss goes down.

Tests of behaviour that issue 10 asked for were written before it existed and marked
``xfail(strict=True)`` with the missing feature; every feature has landed, so the marks
(:func:`_xfail`) are now no-ops that only name the feature each test covers.
"""

from __future__ import annotations

import math
import warnings
from functools import partial

import oracle
import pytest
import real_models as R
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from util import assert_close

import curvopt
from curvopt.errors import CurvoptError
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

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")

DT = torch.float64
N = 4
FIRST = ("grad_batch", "sum_grad_squared", "variance", "batch_l2")


def collect_rows(model, loss_fn, *exts):
    """The opt-in of issue 10 for ops that mix samples (train-mode BatchNorm): every
    quantity treats the rows of what flows back as samples.  Its name may still change:
    this is the one place to edit."""
    return curvopt.collect(model, loss_fn, *exts, batch_coupling="rows")


def _xfail(feature: str):
    """Was ``xfail(strict=True)`` until ``feature`` landed; now only names it."""
    return pytest.mark.skipif(False, reason=f"issue 10: {feature} (landed)")


ROWS = _xfail("no opt-in for batch-coupled layers (collect(..., batch_coupling='rows') "
              "raises TypeError: unexpected keyword argument)")
GROUPED = _xfail("no Kronecker factors for grouped/depthwise convolutions "
                 "(UnsupportedModuleError: 'Kronecker factors of a grouped convolution ...')")
CONTAINER = _xfail("a parameter owned by a container puts the container's whole subtree on "
                   "the generic rule, so its Linear/Conv children get a dense block, not [G, A]")
MHA = _xfail("nn.MultiheadAttention has no fast rule (generic rule: one dense block per "
             "parameter, not [G, A])")
BATCH1 = _xfail("a module called on a batch of one that is broadcast later gives "
                "grad_batch [1, ...] and wrong per-sample quantities, silently")


# --------------------------------------------------------------------------- running curvopt


def run(problem, exts, only=None, rows=False):
    """One forward/backward with ``exts``; ``only``: parameter names the quantities are
    restricted to (``Collector.only``); returns ``results`` keyed by parameter name."""
    model, loss_fn = problem.model, problem.loss_fn
    model.zero_grad(set_to_none=True)
    if rows:
        with collect_rows(model, loss_fn, *exts) as col:
            loss_fn(model(problem.X), problem.y).backward()
        return col.results
    col = curvopt.Collector(model, loss_fn, exts, set_attributes=False)
    if only is not None:
        params = dict(model.named_parameters())
        col.only = {e.savefield: [params[n] for n in only] for e in exts}
    col.attach()
    try:
        loss_fn(model(problem.X), problem.y).backward()
    finally:
        col.detach()
    return col.results


def field(results, name, savefield):
    assert name in results, f"no results for {name!r}; have {sorted(results)}"
    assert savefield in results[name], f"{name}: no {savefield}; has {sorted(results[name])}"
    return results[name][savefield]


def check_first_order(results, expected, what=""):
    for name, exp in expected.items():
        for f in FIRST:
            scale = None
            if f == "variance":  # a difference of two terms: absolute tolerance from them
                scale = float(exp["sum_grad_squared"].abs().max()) / exp["grad_batch"].shape[0]
            assert_close(field(results, name, f), exp[f], f"{what}{name}.{f}", scale=scale)


def check_factors(got, expected, what):
    assert isinstance(got, (list, tuple)), f"{what}: expected a list of factors, got {type(got)}"
    shapes = [tuple(g.shape) for g in got]
    assert len(got) == len(expected), (
        f"{what}: {len(got)} factors {shapes}, expected {[tuple(e.shape) for e in expected]}")
    for i, (g, e) in enumerate(zip(got, expected)):
        assert_close(g, e, f"{what}[{i}]")


# --------------------------------------------------------------------------- oracle helpers
# (tests/oracle.py's layer helpers assume no in-place op touches a layer's output; torchvision
# applies ReLU(inplace=True) to BatchNorm outputs and adds residuals in place, so these clone.)


def problem_of(name, train=False, **kw):
    return R.build(name, block=True, N=N, dtype=DT, train=train, **kw)


capture = oracle.capture_io


def output_ggn(problem, layer=None, replace=None, z0=None):
    """``M = J_{o,z}ᵀ H J_{o,z}`` ``[Z, Z]`` over the whole batch (through whatever couples it).

    ``z`` is the output of ``layer`` (its first element for tuple outputs), or, with
    ``replace(module_output_args, z) -> new output`` and ``z0``, any tensor the hook
    recomputes the module's output from."""
    model, loss_fn, X, y = problem.model, problem.loss_fn, problem.X, problem.y
    if z0 is None:
        _, z0 = capture(model, layer, X)
    zr = z0.clone().requires_grad_(True)

    def hook(mod, args, kwargs, out):
        if replace is not None:
            return replace(mod, args, kwargs, zr)
        new = zr.clone()  # a non-leaf: in-place ops downstream may modify it
        return (new, *out[1:]) if isinstance(out, tuple) else new

    h = layer.register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            out = model(X)
    finally:
        h.remove()
    J = oracle._rows(out.reshape(-1), zr)
    H = oracle.output_hessian(loss_fn, out.detach(), y)
    return z0, J.T @ H @ J


def kron_G(M, z_shape, channel_axis, positions):
    """Output-side factor from ``M`` (see ``oracle.kron_G``): rows n are the samples."""
    M6 = oracle._to_ncp(M, z_shape, channel_axis)
    if positions == "expand":
        return torch.einsum("napnbp->ab", M6)
    return torch.einsum("napnbq->ab", M6)


def row_gram(x: Tensor) -> Tensor:
    """``Σ_rows x xᵀ / rows`` over every leading axis."""
    x = x.reshape(-1, x.shape[-1])
    return x.T @ x / x.shape[0]


def conv_omega_groups(layer: nn.Conv2d, x: Tensor) -> Tensor:
    """Per-group ``Ω_g = Σ_n U_{n,g} U_{n,g}ᵀ / N`` ``[g, C_in/g·K, C_in/g·K]`` (groups=1: ``[1, …]``)."""
    U = oracle.unfold_conv(layer, x)  # [N, C_in*K, L], rows channel-major
    Ug = U.reshape(U.shape[0], layer.groups, -1, U.shape[-1])
    return torch.einsum("ngil,ngjl->gij", Ug, Ug) / U.shape[0]


def group_blocks(M: Tensor, g: int) -> Tensor:
    """The ``g`` diagonal blocks ``[g, d/g, d/g]`` of a ``[d, d]`` matrix."""
    d = M.shape[0] // g
    return torch.stack([M[i * d:(i + 1) * d, i * d:(i + 1) * d] for i in range(g)])


class _Cache(dict):
    def get_or(self, key, fn):
        if key not in self:
            self[key] = fn()
        return self[key]


CACHE = _Cache()


def full_ggn(name, problem):
    return CACHE.get_or(("ggn", name), lambda: oracle.ggn_matrix(
        problem.model, problem.loss_fn, problem.X, problem.y))


def first_order_oracle(name, problem):
    return CACHE.get_or(("fo", name), lambda: oracle.first_order(
        problem.model, problem.loss_fn, problem.X, problem.y))


def _parent(model, pname):
    mname, _, attr = pname.rpartition(".")
    return (model.get_submodule(mname) if mname else model), mname, attr


# --------------------------------------------------------------------------- MultiheadAttention


def mha_inner(mha: nn.MultiheadAttention, q, k, v, attn_mask=None, key_padding_mask=None):
    """The input of ``out_proj`` (heads concatenated), batch-first ``[N, L, E]``, from the
    *projected* ``q [N, L, E]``, ``k, v [N, S, E]`` (F.multi_head_attention_forward's maths)."""
    Nb, L, E = q.shape
    h = mha.num_heads
    d = E // h
    qh, kh, vh = (t.reshape(Nb, t.shape[1], h, d).transpose(1, 2) for t in (q, k, v))
    scores = qh @ kh.transpose(-1, -2) / math.sqrt(d)
    if attn_mask is not None:
        scores = scores.masked_fill(attn_mask, float("-inf"))
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    return (scores.softmax(-1) @ vh).transpose(1, 2).reshape(Nb, L, E)


def mha_projection_weights(mha):
    """``[(W_q, b_q), (W_k, b_k), (W_v, b_v)]`` packed or separate."""
    E = mha.embed_dim
    b = mha.in_proj_bias if mha.in_proj_bias is not None else torch.zeros(3 * E)
    if mha._qkv_same_embed_dim:
        W = mha.in_proj_weight
        return [(W[i * E:(i + 1) * E], b[i * E:(i + 1) * E]) for i in range(3)]
    return [(mha.q_proj_weight, b[:E]), (mha.k_proj_weight, b[E:2 * E]),
            (mha.v_proj_weight, b[2 * E:])]


def mha_from_projections(attn_mask, key_padding_mask):
    """A forward hook body ``(mha, args, kwargs, P) -> output``: the attention re-computed
    from the packed self-attention projections ``P = x W_inᵀ + b`` (batch-first ``[N, L, 3E]``)."""

    def replace(mha, args, kwargs, P):
        E = mha.embed_dim
        a = mha_inner(mha, P[..., :E], P[..., E:2 * E], P[..., 2 * E:], attn_mask,
                      key_padding_mask)
        o = mha.out_proj(a)
        return (o if mha.batch_first else o.transpose(0, 1), None)

    return replace


class AttentionModel(nn.Module):
    """``nn.MultiheadAttention`` self-attention in a chosen calling convention, tanh, mean
    over tokens, Linear head.  ``kdim``: separate q/k/v projections (keys and values from
    a Linear of the input); ``mask``: ``'causal'`` attn_mask and/or ``'padding'``."""

    def __init__(self, E=8, heads=2, classes=3, batch_first=True, kdim=None, mask="",
                 need_weights=False, L=5):
        super().__init__()
        self.attn = nn.MultiheadAttention(E, heads, batch_first=batch_first, kdim=kdim,
                                          vdim=kdim)
        self.kv = nn.Linear(E, kdim) if kdim else None
        self.head = nn.Linear(E, classes)
        self.batch_first, self.mask, self.need_weights = batch_first, mask, need_weights
        self.register_buffer("causal", torch.triu(torch.ones(L, L, dtype=torch.bool), 1))

    def masks(self, x):
        am = self.causal if "causal" in self.mask else None
        kpm = None
        if "padding" in self.mask:  # the last key of every other sample is padding
            kpm = torch.zeros(x.shape[0], x.shape[1], dtype=torch.bool)
            kpm[::2, -1] = True
        return am, kpm

    def forward(self, x):  # x [N, L, E] always (the sample axis of the batch is 0)
        am, kpm = self.masks(x)
        kv = self.kv(x) if self.kv is not None else x
        q, kv_ = (x, kv) if self.batch_first else (x.transpose(0, 1), kv.transpose(0, 1))
        a, _ = self.attn(q, kv_, kv_, attn_mask=am, key_padding_mask=kpm,
                         need_weights=self.need_weights)
        if not self.batch_first:
            a = a.transpose(0, 1)
        return self.head(torch.tanh(a).mean(1))


MHA_VARIANTS = {
    "packed": {},
    "need_weights": dict(need_weights=True),
    "causal_padding": dict(mask="causal,padding"),
    "separate_qkv": dict(kdim=6),
    "seq_first": dict(batch_first=False),
}


def attention_problem(variant, Nb=3, L=5, E=8):
    torch.manual_seed(0)
    model = AttentionModel(E=E, L=L, **MHA_VARIANTS[variant]).to(DT).eval()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(Nb, L, E, generator=g, dtype=DT)
    y = torch.randint(0, 3, (Nb,), generator=g)
    return R.Problem(f"attention-{variant}", model, nn.CrossEntropyLoss(), X, y)


def mha_kron_reference(problem, mha: nn.MultiheadAttention, pname_in_mha: str):
    """``[G, A]`` (weights) / ``[G]`` (biases) of a MultiheadAttention projection in the
    expand convention over the query/key rows, from the definitions.

    ``out_proj``: A from the concatenated head outputs, G from the GGN w.r.t. the module
    output.  ``in_proj`` (self-attention, packed): A from the module input, G from the GGN
    w.r.t. the packed projections ``x W_inᵀ + b``, obtained by re-computing the attention
    from them.
    """
    model, X = problem.model, problem.X
    call = {}

    def grab(mod, args, kwargs):
        call["args"], call["kwargs"] = args, kwargs

    h = mha.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model(X)
    h.remove()
    q, k, v = call["args"][:3]
    kw = call["kwargs"]
    bf = mha.batch_first
    if not bf:
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    am, kpm = kw.get("attn_mask"), kw.get("key_padding_mask")
    (Wq, bq), (Wk, bk), (Wv, bv) = mha_projection_weights(mha)
    if pname_in_mha.startswith("out_proj"):
        with torch.no_grad():
            a = mha_inner(mha, F.linear(q, Wq, bq), F.linear(k, Wk, bk), F.linear(v, Wv, bv),
                          am, kpm)
        # expand: a sum over every (sample, token) row, whichever of the two axes leads
        z0, M = output_ggn(problem, mha)
        G = kron_G(M, z0.shape, -1, "expand")
        return [G, row_gram(a)] if pname_in_mha.endswith("weight") else [G]
    # packed in_proj of self-attention: P = x W_inᵀ + b, [N, L, 3E]
    assert q is k is v or (torch.equal(q, k) and torch.equal(k, v)), "in_proj: self-attention only"
    with torch.no_grad():
        P0 = F.linear(q, mha.in_proj_weight, mha.in_proj_bias)
    _, M = output_ggn(problem, mha, replace=mha_from_projections(am, kpm), z0=P0)
    G = kron_G(M, P0.shape, -1, "expand")
    return [G, row_gram(q)] if pname_in_mha.endswith("weight") else [G]


# --------------------------------------------------------------------------- Kronecker references


def kron_reference(problem, pname):
    """Expected KFLR factors of parameter ``pname`` from the definitions, or ``None`` where
    there is no Kronecker definition (norm layers, container parameters)."""
    key = ("kron", problem.name, problem.model.training, pname)
    return CACHE.get_or(key, lambda: _kron_reference(problem, pname))


def _kron_reference(problem, pname):
    model = problem.model
    mod, mname, attr = _parent(model, pname)
    parent = model.get_submodule(mname.rpartition(".")[0]) if mname else None
    if isinstance(mod, nn.MultiheadAttention):
        return mha_kron_reference(problem, mod, attr)
    if isinstance(parent, nn.MultiheadAttention):  # out_proj: called functionally
        return mha_kron_reference(problem, parent, f"out_proj.{attr}")
    if isinstance(mod, nn.Linear):
        x, _ = capture(model, mod, problem.X)
        z0, M = output_ggn(problem, mod)
        G = kron_G(M, z0.shape, -1, "expand")
        return [G, row_gram(x)] if attr == "weight" else [G]
    if isinstance(mod, nn.Conv2d):
        x, _ = capture(model, mod, problem.X)
        z0, M = output_ggn(problem, mod)
        G = kron_G(M, z0.shape, 1, "sum")
        if attr == "bias":
            return [G]
        Om = conv_omega_groups(mod, x)
        if mod.groups == 1:
            return [G, Om[0]]
        return [group_blocks(G, mod.groups), Om]
    return None


def check_kron(problem, results, savefield, pname, full, what=""):
    """KFLR/KFAC of ``pname``: a single ``[P, P]`` factor is the exact GGN block (or, for a
    bias with a Kronecker definition, its ``G``); otherwise the factors of the definition
    (KFAC, whose ``G`` is random: shapes and ``A``)."""
    got = field(results, pname, savefield)
    what = f"{what}{pname}.{savefield}"
    block = oracle.block(full, problem.model, pname)
    ref = kron_reference(problem, pname)
    if len(got) == 1 and got[0].shape == block.shape:
        if savefield == "kfac":
            return
        candidates = [[block]] + ([ref] if ref is not None and len(ref) == 1 else [])
        errors = []
        for c in candidates:
            try:
                check_factors(got, c, what)
                return
            except AssertionError as e:
                errors.append(str(e))
        raise AssertionError(" / ".join(errors))
    assert ref is not None, f"{what}: factors {[tuple(g.shape) for g in got]} where a dense " \
                            "block was expected"
    if savefield == "kflr":
        check_factors(got, ref, what)
        return
    assert [tuple(g.shape) for g in got] == [tuple(r.shape) for r in ref], (
        f"{what}: shapes {[tuple(g.shape) for g in got]}, expected {[tuple(r.shape) for r in ref]}")
    if len(ref) == 2:
        assert_close(got[1], ref[1], f"{what}[1] (A is deterministic)")


# =========================================================================== eval mode: exactness

BLOCKS = list(R.NAMES)


@pytest.mark.parametrize("name", BLOCKS)
def test_first_order(name):
    problem = problem_of(name)
    results = run(problem, [BatchGrad(), SumGradSquared(), Variance(), BatchL2Grad()])
    check_first_order(results, first_order_oracle(name, problem), f"{name}: ")


@pytest.mark.parametrize("name", BLOCKS)
def test_diag_ggn_exact(name):
    problem = problem_of(name)
    results = run(problem, [DiagGGNExact()])
    expected = oracle.diag_by_param(full_ggn(name, problem), problem.model)
    for pname, exp in expected.items():
        assert_close(field(results, pname, "diag_ggn_exact"), exp, f"{name}: {pname}")


@pytest.mark.parametrize("name", BLOCKS)
def test_diag_ggn_mc_shapes(name):
    problem = problem_of(name)
    torch.manual_seed(0)
    results = run(problem, [DiagGGNMC()])
    for pname, p in problem.model.named_parameters():
        d = field(results, pname, "diag_ggn_mc")
        assert d.shape == p.shape and torch.isfinite(d).all() and (d >= 0).all(), pname


#: DiagHessian may refuse (a CurvoptError) where the Hessian does not decompose into
#: elementwise terms: squeeze-excitation's ``scale(x) * x``, attention, and what the
#: generic rule cannot decompose.  ResNet's must be exact.
DIAG_H_MAY_REFUSE = {"mobilenet", "vit", "convnext"}


@pytest.mark.parametrize("name", BLOCKS)
def test_diag_hessian_exact_or_refused(name):
    problem = problem_of(name)
    try:
        results = run(problem, [DiagHessian()])
    except CurvoptError:
        if name in DIAG_H_MAY_REFUSE:
            return
        raise
    expected = oracle.diag_by_param(oracle.hessian_matrix(
        problem.model, problem.loss_fn, problem.X, problem.y), problem.model)
    for pname, exp in expected.items():
        assert_close(field(results, pname, "diag_h"), exp, f"{name}: {pname}.diag_h")


@pytest.mark.parametrize("name", [pytest.param(n, marks=[GROUPED] if n == "mobilenet" else [])
                                  for n in BLOCKS])
@pytest.mark.parametrize("savefield", ["kflr", "kfac"])
def test_kronecker_exact(name, savefield):
    """Every parameter: two factors equal to their definitions, or one factor equal to the
    exact GGN block (KFAC: shapes and ``A`` only)."""
    problem = problem_of(name)
    torch.manual_seed(0)
    results = run(problem, [KFLR() if savefield == "kflr" else KFAC()])
    full = full_ggn(name, problem)
    for pname, _ in problem.model.named_parameters():
        check_kron(problem, results, savefield, pname, full, f"{name}: ")


@pytest.mark.parametrize("name", [pytest.param(n, marks=[CONTAINER] if n == "vit" else [])
                                  for n in BLOCKS])
def test_kfra_head_exact_or_refused(name):
    """KFRA's recursion is defined on chains of modules; elsewhere a CurvoptError.  Where it
    runs: the head's ``G`` is ``f Σ_n H_n`` and ``A`` its input's Gram matrix, and every
    parameter has factors of KFLR's shapes, finite and symmetric."""
    problem = problem_of(name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results = run(problem, [KFRA()])
    except CurvoptError:
        return
    model = problem.model
    head_name, head = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    x, out = capture(model, head, problem.X)
    Nb = out.shape[0]
    Hfull = oracle.output_hessian(problem.loss_fn, out, problem.y)
    C = out.shape[1]
    Hbar = sum(Hfull[n * C:(n + 1) * C, n * C:(n + 1) * C] for n in range(Nb))
    check_factors(field(results, f"{head_name}.weight", "kfra"), [Hbar, row_gram(x)],
                  f"{name}: {head_name}.weight.kfra")
    kflr = run(problem, [KFLR()]) if name != "mobilenet" else None
    for pname, _ in model.named_parameters():
        got = field(results, pname, "kfra")
        for f in got:
            assert torch.isfinite(f).all(), pname
            assert_close(f, f.transpose(-1, -2), f"{pname}.kfra symmetric")
        if kflr is not None:
            assert [g.shape for g in got] == [g.shape for g in kflr[pname]["kflr"]], pname


# =========================================================================== issue 10 features


def _linear_conv_weights(model, under=""):
    """Names of the weights of Linear and (non-grouped) Conv2d modules called as modules."""
    out = []
    for mname, m in model.named_modules():
        if not mname.startswith(under):
            continue
        if isinstance(m, (nn.Linear, nn.Conv2d)) and not mname.endswith("out_proj") and (
                not isinstance(m, nn.Conv2d) or m.groups == 1):
            out.append(f"{mname}.weight")
    return out


@pytest.mark.parametrize("name", [pytest.param("vit", marks=CONTAINER),
                                  pytest.param("convnext", marks=CONTAINER)])
def test_container_parameters_keep_child_rules(name):
    """A container owning parameters (ViT's class_token / pos_embedding, ConvNeXt's gamma)
    must not take its Linear/Conv children off their fast rules: their KFLR is ``[G, A]``
    from the definition, while the container's own parameters stay exact (dense block)."""
    problem = problem_of(name)
    model = problem.model
    names = _linear_conv_weights(model)
    own = [n for n, _ in model.named_parameters()
           if n.endswith(("class_token", "pos_embedding", "gamma"))]
    assert names and own
    results = run(problem, [KFLR()], only=names + own)
    full = full_ggn(name, problem)
    for pname in names:
        got = field(results, pname, "kflr")
        assert len(got) == 2, f"{pname}.kflr: {len(got)} factor(s) {[tuple(g.shape) for g in got]}"
        check_kron(problem, results, "kflr", pname, full)
    for pname in own:
        check_factors(field(results, pname, "kflr"), [oracle.block(full, model, pname)],
                      f"{pname}.kflr")


@pytest.mark.parametrize("name", [pytest.param("mobilenet", marks=GROUPED),
                                  pytest.param("convnext", marks=[GROUPED, CONTAINER])])
def test_grouped_conv_factors(name):
    """Depthwise conv weights: per-group factors ``[G [g, C_out/g, C_out/g], Ω [g, C_in/g·K, …]]``
    with ``G_g`` the group's block of the conv ``G`` (square root summed over positions) and
    ``Ω_g`` its unfolded input's Gram matrix over samples."""
    problem = problem_of(name)
    dw = [f"{n}.weight" for n, m in problem.model.named_modules()
          if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert dw
    results = run(problem, [KFLR()], only=dw)
    for pname in dw:
        check_factors(field(results, pname, "kflr"), kron_reference(problem, pname),
                      f"{pname}.kflr")


@GROUPED
@pytest.mark.parametrize("groups,cin,cout", [(4, 4, 4), (2, 4, 6)])
def test_grouped_conv_one_sample_one_position_is_exact(groups, cin, cout):
    """Convention-free: one sample, one output position: ``kron(G_g, Ω_g)`` is the exact
    GGN block of group g's weights."""
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, 3, groups=groups)
    model = nn.Sequential(conv, nn.Flatten(), nn.Tanh(), nn.Linear(cout, 3)).to(DT).eval()
    X = torch.randn(1, cin, 3, 3, dtype=DT)
    y = torch.tensor([1])
    problem = R.Problem("grouped", model, nn.CrossEntropyLoss(), X, y)
    results = run(problem, [KFLR()])
    got = field(results, "0.weight", "kflr")
    assert len(got) == 2 and got[0].dim() == 3, [tuple(g.shape) for g in got]
    block = group_blocks(oracle.block(oracle.ggn_matrix(model, problem.loss_fn, X, y), model,
                                      "0.weight"), groups)
    kron = torch.stack([torch.kron(G, A) for G, A in zip(*got)])
    assert_close(kron, block, "kron(G_g, Ω_g)")


@pytest.mark.parametrize("variant", list(MHA_VARIANTS))
def test_attention_first_order_and_diag_ggn(variant):
    """nn.MultiheadAttention in every calling convention (``batch_first=False``: the leading
    dimension of its input is not the sample dimension): per-sample quantities and the GGN
    diagonal equal the oracle."""
    problem = attention_problem(variant)
    results = run(problem, [BatchGrad(), SumGradSquared(), Variance(), BatchL2Grad(),
                            DiagGGNExact()])
    check_first_order(results, oracle.first_order(problem.model, problem.loss_fn, problem.X,
                                                  problem.y), f"{variant}: ")
    full = oracle.ggn_matrix(problem.model, problem.loss_fn, problem.X, problem.y)
    for pname, exp in oracle.diag_by_param(full, problem.model).items():
        assert_close(field(results, pname, "diag_ggn_exact"), exp, f"{variant}: {pname}")


@MHA
@pytest.mark.parametrize("variant", [v for v in MHA_VARIANTS if v != "separate_qkv"])
def test_attention_kronecker(variant):
    """A fast MultiheadAttention rule: its projections get ``[G, A]`` in the expand
    convention over the sequence (in_proj: ``A`` of the input, ``G`` w.r.t. the packed
    projections; out_proj: ``A`` of the concatenated heads, ``G`` w.r.t. the output)."""
    problem = attention_problem(variant)
    names = ["attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
             "attn.out_proj.bias"]
    results = run(problem, [KFLR()], only=names)
    for pname in names:
        check_factors(field(results, pname, "kflr"), kron_reference(problem, pname),
                      f"{variant}: {pname}.kflr")


def _store_call(store, mod, args, kwargs, out):
    store.update(o=out[0], a=args, kw=kwargs)


def test_attention_reference_is_the_module():
    """Self-test of the oracle: the re-computed attention equals nn.MultiheadAttention."""
    for variant in MHA_VARIANTS:
        problem = attention_problem(variant)
        mha = problem.model.attn
        outs = {}
        h = mha.register_forward_hook(partial(_store_call, outs), with_kwargs=True)
        with torch.no_grad():
            problem.model(problem.X)
        h.remove()
        q, k, v = outs["a"][:3]
        if not mha.batch_first:
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        (Wq, bq), (Wk, bk), (Wv, bv) = mha_projection_weights(mha)
        a = mha_inner(mha, F.linear(q, Wq, bq), F.linear(k, Wk, bk), F.linear(v, Wv, bv),
                      outs["kw"].get("attn_mask"), outs["kw"].get("key_padding_mask"))
        o = mha.out_proj(a)
        assert_close(o if mha.batch_first else o.transpose(0, 1), outs["o"], variant)


def test_attention_reference_factors_sum_to_the_bias_ggn_blocks():
    """Self-test of the G references: from the same layer-output GGN, the ``sum``
    convention (square root summed over tokens) is the exact GGN block of the bias of
    in_proj and of out_proj."""
    for variant in ("packed", "causal_padding", "seq_first"):
        problem = attention_problem(variant)
        mha = problem.model.attn
        full = oracle.ggn_matrix(problem.model, problem.loss_fn, problem.X, problem.y)
        z0, M = output_ggn(problem, mha)
        bf = mha.batch_first
        M6 = oracle._to_ncp(M, z0.shape, -1)  # [axis 0, E, axis 1, axis 0, E, axis 1]
        # sum over the tokens of each sample (seq-first: the tokens lead)
        G = torch.einsum("napnbq->ab" if bf else "napmbp->ab", M6)
        assert_close(G, oracle.block(full, problem.model, "attn.out_proj.bias"), variant)
        P0 = F.linear(problem.X, mha.in_proj_weight, mha.in_proj_bias).detach()  # batch-first
        replace = mha_from_projections(*problem.model.masks(problem.X))
        _, M = output_ggn(problem, mha, replace=replace, z0=P0)
        G = kron_G(M, P0.shape, -1, "sum")
        assert_close(G, oracle.block(full, problem.model, "attn.in_proj_bias"), variant)


def test_grouped_omega_reference():
    """Self-test: per-group Ω of a groups=1 conv is ``oracle.conv_Omega``; of a grouped conv,
    the group's diagonal block of the Ω of the same conv with its groups' inputs."""
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5, 5, dtype=DT)
    conv = nn.Conv2d(4, 6, 3, padding=1).to(DT)
    model = nn.Sequential(conv)
    assert_close(conv_omega_groups(conv, x)[0], oracle.conv_Omega(model, conv, x), "groups=1")
    grouped = nn.Conv2d(4, 6, 3, padding=1, groups=2).to(DT)
    Om = conv_omega_groups(grouped, x)
    for i in range(2):
        part = nn.Conv2d(2, 3, 3, padding=1).to(DT)
        xi = x[:, 2 * i:2 * i + 2]
        assert_close(Om[i], oracle.conv_Omega(nn.Sequential(part), part, xi), f"group {i}")


class PositionEmbeddingLM(nn.Module):
    """GPT-2's embedding pattern: ``wte(ids) + wpe(arange(T)[None])`` (a call on a batch of
    one, broadcast over the batch), LayerNorm, Linear LM head; logits ``[N, V, T]``."""

    def __init__(self, V=7, T=5, D=6):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(V, D), nn.Embedding(T, D)
        self.ln = nn.LayerNorm(D)
        self.head = nn.Linear(D, V)

    def forward(self, ids):
        pos = torch.arange(ids.shape[1]).unsqueeze(0)
        h = self.wte(ids) + self.wpe(pos)
        return self.head(torch.tanh(self.ln(h))).transpose(1, 2)


@BATCH1
def test_batch_of_one_call_position_embedding():
    """Per-sample quantities of a module called on a batch of one (broadcast later) equal the
    oracle, or the call is refused with a CurvoptError; never a silent ``[1, ...]``."""
    torch.manual_seed(0)
    model = PositionEmbeddingLM().to(DT).eval()
    X = torch.randint(0, 7, (N, 5))
    y = torch.randint(0, 7, (N, 5))
    problem = R.Problem("wpe", model, nn.CrossEntropyLoss(), X, y)
    try:
        results = run(problem, [BatchGrad(), SumGradSquared(), Variance(), BatchL2Grad(),
                                DiagGGNExact()])
    except CurvoptError:
        return
    check_first_order(results, oracle.first_order(model, problem.loss_fn, X, y))
    full = oracle.ggn_matrix(model, problem.loss_fn, X, y)
    for pname, exp in oracle.diag_by_param(full, model).items():
        assert_close(field(results, pname, "diag_ggn_exact"), exp, pname)


# =========================================================================== train-mode BatchNorm

BN_MODELS = ["resnet", "mobilenet"]
ALL_TEN = [BatchGrad, SumGradSquared, Variance, BatchL2Grad, DiagGGNExact, DiagGGNMC, KFAC,
           KFLR, KFRA, DiagHessian]


@pytest.mark.parametrize("ext", ALL_TEN, ids=lambda e: e.__name__)
@pytest.mark.parametrize("name", BN_MODELS)
def test_train_mode_batchnorm_refused_without_opt_in(name, ext):
    problem = problem_of(name, train=True)
    with pytest.raises(CurvoptError, match="BatchNorm"):
        run(problem, [ext()])


def _param_modules(model):
    """(module, [(param name, param)]) for every module owning parameters directly."""
    out = []
    for mname, m in model.named_modules():
        ps = [(f"{mname}.{n}" if mname else n, p) for n, p in m.named_parameters(recurse=False)]
        if ps:
            out.append((m, ps))
    return out


def _keep_output(store, mod, inp, out):
    """Keep a module's output (with its graph) and hand a copy on: in-place ops downstream
    (``ReLU(inplace=True)``, ``out += identity``) then leave the kept tensor intact."""
    store[mod] = out
    return out.clone()


def rows_first_order(problem):
    """``grad_batch[n] = J_{z_n,θ}ᵀ (∂L/∂z)_n`` (the batch-coupled backward, split by rows of
    each parameter's module output ``z``) and the other three first-order quantities."""
    model, loss_fn, X, y = problem.model, problem.loss_fn, problem.X, problem.y
    mods = _param_modules(model)
    z = {}
    hs = [m.register_forward_hook(partial(_keep_output, z)) for m, _ in mods]
    try:
        out = model(X)
    finally:
        for h in hs:
            h.remove()
    L = loss_fn(out, y)
    gz = dict(zip([m for m, _ in mods], torch.autograd.grad(L, [z[m] for m, _ in mods],
                                                            retain_graph=True)))
    gb = {}
    for m, ps in mods:
        rows = [torch.autograd.grad(z[m][n], [p for _, p in ps], gz[m][n], retain_graph=True)
                for n in range(X.shape[0])]
        for i, (pname, _) in enumerate(ps):
            gb[pname] = torch.stack([r[i] for r in rows])
    return oracle.first_order_from_grad_batch(gb)


def rows_ggn_blocks(problem):
    """Per parameter, the rows-as-samples GGN block ``Σ_n J_{z_n,θ}ᵀ M_{nn} J_{z_n,θ}`` with
    ``M = J_{o,z}ᵀ H J_{o,z}`` through the coupled graph; ``M_{nn}`` enters through its
    square root (eigendecomposition), so the result does not depend on any choice."""
    model, X = problem.model, problem.X
    out = {}
    for m, ps in _param_modules(model):
        z0, M = output_ggn(problem, m)
        Nb, Zn = z0.shape[0], z0[0].numel()
        M4 = M.reshape(Nb, Zn, Nb, Zn)
        z = {}
        h = m.register_forward_hook(partial(_keep_output, z))
        try:
            model(X)
        finally:
            h.remove()
        params = [p for _, p in ps]
        blocks = [torch.zeros(p.numel(), p.numel(), dtype=DT) for p in params]
        for n in range(Nb):
            lam, Q = torch.linalg.eigh(M4[n, :, n, :])
            keep = lam > lam.max() * 1e-13
            roots = (Q[:, keep] * lam[keep].sqrt()).T  # [r, Zn]
            for r in roots:
                us = torch.autograd.grad(z[m][n], params, r.reshape(z0.shape[1:]),
                                         retain_graph=True)
                for b, u in zip(blocks, us):
                    b += torch.outer(u.reshape(-1), u.reshape(-1))
        for (pname, _), b in zip(ps, blocks):
            out[pname] = b
    return out


@pytest.mark.parametrize("name", BN_MODELS)
def test_rows_oracle_is_the_oracle_without_coupling(name):
    """Self-test of the rows definitions: in eval mode (no coupling) they are the per-sample
    gradients and the GGN of ``oracle.py``; in train mode the rows sum to the gradient."""
    problem = problem_of(name)
    check_first_order(rows_first_order(problem), first_order_oracle(name, problem), "rows: ")
    full = full_ggn(name, problem)
    for pname, b in rows_ggn_blocks(problem).items():
        assert_close(b, oracle.block(full, problem.model, pname), f"rows GGN block {pname}")
    problem = problem_of(name, train=True)
    expected = rows_first_order(problem)
    grads = oracle.grad(problem.model, problem.loss_fn, problem.X, problem.y)
    for pname, g in grads.items():
        assert_close(expected[pname]["grad_batch"].sum(0), g, f"train: Σ_n rows {pname}")


@ROWS
@pytest.mark.parametrize("name", BN_MODELS)
def test_rows_first_order(name):
    """Train-mode BatchNorm, rows as samples: grad_batch from the coupled backward split by
    rows (they sum to p.grad), and the three quantities reduced from it."""
    problem = problem_of(name, train=True)
    expected = rows_first_order(problem_of(name, train=True))
    results = run(problem, [BatchGrad(), SumGradSquared(), Variance(), BatchL2Grad()],
                  rows=True)
    check_first_order(results, expected, f"{name} rows: ")
    for pname, p in problem.model.named_parameters():
        assert_close(field(results, pname, "grad_batch").sum(0), p.grad, f"{pname}: Σ_n = grad")


@ROWS
@pytest.mark.parametrize("name", BN_MODELS)
def test_rows_diag_ggn_exact(name):
    problem = problem_of(name, train=True)
    blocks = CACHE.get_or(("rows", name), lambda: rows_ggn_blocks(problem_of(name, train=True)))
    results = run(problem, [DiagGGNExact()], rows=True)
    for pname, p in problem.model.named_parameters():
        assert_close(field(results, pname, "diag_ggn_exact"),
                     torch.diagonal(blocks[pname]).reshape(p.shape), f"{name} rows: {pname}")


@ROWS
def test_rows_kflr():
    """Rows as samples, ResNet block: conv and Linear factors from the coupled layer-output
    GGN's row blocks (``oracle``'s G definitions, rows = samples), BatchNorm's affine
    parameters a single factor equal to the rows GGN block."""
    name = "resnet"
    problem = problem_of(name, train=True)
    blocks = CACHE.get_or(("rows", name), lambda: rows_ggn_blocks(problem_of(name, train=True)))
    results = run(problem, [KFLR()], rows=True)
    for pname, _ in problem.model.named_parameters():
        mod, _, _ = _parent(problem.model, pname)
        got = field(results, pname, "kflr")
        if isinstance(mod, (nn.Linear, nn.Conv2d)):
            check_factors(got, kron_reference(problem_of(name, train=True), pname),
                          f"rows: {pname}.kflr")
        else:
            check_factors(got, [blocks[pname]], f"rows: {pname}.kflr")


@ROWS
def test_rows_mc_converges_to_rows_ggn():
    """Joint MC targets for the batch, one backward, rows as samples (the K-FAC practice)
    converge to the rows GGN of :func:`rows_ggn_blocks`: the definition is the right one."""
    name = "resnet"
    problem = problem_of(name, train=True)
    blocks = CACHE.get_or(("rows", name), lambda: rows_ggn_blocks(problem_of(name, train=True)))
    torch.manual_seed(0)
    results = run(problem, [DiagGGNMC(mc_samples=2000)], rows=True)
    for pname, p in problem.model.named_parameters():
        exp = torch.diagonal(blocks[pname]).reshape(p.shape)
        err = oracle.rel_err(field(results, pname, "diag_ggn_mc").to(DT), exp)
        assert err < 0.1, f"{pname}: MC rows diagonal off by {err:.3f}"


@ROWS
@pytest.mark.parametrize("name", BN_MODELS)
def test_rows_opt_in_changes_nothing_without_coupling(name):
    """Eval mode (nothing couples the batch): every deterministic quantity under the opt-in
    is the default one."""
    exts = [BatchGrad, SumGradSquared, Variance, BatchL2Grad, DiagGGNExact]
    if name == "resnet":  # (MobileNet: no KFLR of its depthwise conv, no DiagHessian today)
        exts += [KFLR, DiagHessian]
    default = run(problem_of(name), [e() for e in exts])
    rows = run(problem_of(name), [e() for e in exts], rows=True)
    for pname, res in default.items():
        for f, v in res.items():
            got = field(rows, pname, f)
            for a, b in zip(got if isinstance(got, list) else [got],
                            v if isinstance(v, list) else [v]):
                assert_close(a, b, f"{name}: {pname}.{f} rows vs default", rtol=1e-12)


@ROWS
@pytest.mark.parametrize("ext", [KFRA, DiagHessian], ids=lambda e: e.__name__)
def test_rows_other_quantities_defined_or_refused(ext):
    """KFRA and DiagHessian under the opt-in: finite, of the parameters' shapes, or refused."""
    problem = problem_of("resnet", train=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results = run(problem, [ext()], rows=True)
    except CurvoptError:
        return
    for pname, _ in problem.model.named_parameters():
        v = field(results, pname, ext().savefield)
        for t in v if isinstance(v, list) else [v]:
            assert torch.isfinite(t).all(), pname


# =========================================================================== optimizers

OPTIMIZERS = {
    "KFACOptimizer": lambda m, lf: curvopt.KFACOptimizer(m, lf),
    "DiagGGNAdam": lambda m, lf: curvopt.DiagGGNAdam(m, lf),
    "VarianceAdaptiveSGD": lambda m, lf: curvopt.VarianceAdaptiveSGD(m, lf),
}
TRAIN_MODE = {"resnet": True, "mobilenet": True, "vit": False, "convnext": False}
STEPS = 12

#: (model, optimizer) pairs that fail today, with the error they raise.
OPT_FAILS_TODAY = {
    ("resnet", "KFACOptimizer"): "train-mode BatchNorm refused (CollectError)",
    ("resnet", "DiagGGNAdam"): "train-mode BatchNorm refused (CollectError)",
    ("resnet", "VarianceAdaptiveSGD"): "train-mode BatchNorm refused (CollectError)",
    ("mobilenet", "KFACOptimizer"): "train-mode BatchNorm refused (CollectError)",
    ("mobilenet", "DiagGGNAdam"): "train-mode BatchNorm refused (CollectError)",
    ("mobilenet", "VarianceAdaptiveSGD"): "train-mode BatchNorm refused (CollectError)",
    # KL clipping fixes the step length, so lr in 0.01-0.1 ends at the same loss; with
    # kl_clip=None the loss is NaN; damping=0.1 or curvature='kflr' do lower it.
    ("vit", "KFACOptimizer"): "defaults (MC curvature, damping 1e-3) raise the loss "
                              "0.94 -> 1.45 at any lr",
}


def _opt_params():
    out = []
    for name in R.NAMES:
        for opt in OPTIMIZERS:
            reason = OPT_FAILS_TODAY.get((name, opt))
            marks = [_xfail(f"{opt} on {name}: {reason}")] if reason else []
            out.append(pytest.param(name, opt, marks=marks, id=f"{name}-{opt}"))
    return out


@pytest.mark.parametrize("name,opt_name", _opt_params())
def test_optimizer_lowers_the_loss(name, opt_name):
    """Defaults, 12 steps on a fixed batch (float32): the loss after training is below the
    first step's."""
    problem = R.build(name, block=False, N=8, dtype=torch.float32, train=TRAIN_MODE[name],
                      perturb=False)
    model, loss_fn, X, y = problem.model, problem.loss_fn, problem.X, problem.y
    opt = OPTIMIZERS[opt_name](model, loss_fn)
    losses = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(STEPS):
                opt.zero_grad()
                loss = loss_fn(model(X), y)
                loss.backward()
                opt.step()
                losses.append(loss.item())
    finally:
        if hasattr(opt, "close"):
            opt.close()
    with torch.no_grad():
        final = loss_fn(model(X), y).item()
    assert math.isfinite(final) and final < losses[0], (
        f"{opt_name} on {name}: loss {losses[0]:.4f} -> {final:.4f} ({losses})")
