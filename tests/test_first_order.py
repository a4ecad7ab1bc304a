"""First-order quantities (grad_batch, sum_grad_squared, variance, batch_l2) vs the oracle.

Every expected value comes from ``oracle.py`` (plain autograd, one backward
pass per sample); nothing is compared with curvopt itself.  Tolerances
(float64): ``|got - oracle| <= 1e-12 * max|oracle| + 1e-10 * |oracle|``;
``variance`` is a difference of two terms, its absolute tolerance is scaled
by ``max(sum_grad_squared) / N`` instead.  float32: ``1e-5 * scale + 1e-4 * |oracle|``.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import oracle
import pytest
import torch
from cases import ALL_CASES, CASES_BY_NAME, Case, LossSpec, make_target, setup
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from util import (
    FIRST_ORDER_FIELDS,
    assert_close,
    assert_no_hooks,
    ext_for,
    field_of,
    first_order_oracle,
    hooks_snapshot,
    run,
)

import curvopt
from curvopt.errors import CollectError, CurvoptError
from curvopt.extensions import BatchGrad, BatchL2Grad, SumGradSquared, Variance

SPECS = [LossSpec("ce", "mean"), LossSpec("ce", "sum"), LossSpec("mse", "mean"),
         LossSpec("mse", "sum")]
ALONE_SPECS = [LossSpec("ce", "sum"), LossSpec("mse", "mean")]


def check_first_order(results, expected, fields, what="", rtol=1e-10, atol_rel=1e-12):
    for name, exp in expected.items():
        N = exp["grad_batch"].shape[0]
        for field in fields:
            scale = None
            if field == "variance":
                scale = float(exp["sum_grad_squared"].abs().max()) / N
            assert_close(field_of(results, name, field), exp[field], f"{what}{name}.{field}",
                         rtol=rtol, atol_rel=atol_rel, scale=scale)


def _params(case, spec):
    return [pytest.param(c, s, id=f"{c.name}-{s.id}") for c in case for s in spec
            if s.kind != "ce" or c.ce]


# --------------------------------------------------------------------------- every case


@pytest.mark.parametrize("case,spec", _params(ALL_CASES, SPECS))
def test_all_four_at_once(case: Case, spec: LossSpec):
    model, loss_fn, X, y = setup(case, spec, N=3)
    exts = [ext_for(f) for f in FIRST_ORDER_FIELDS]
    results, _ = run(model, loss_fn, X, y, exts)
    check_first_order(results, first_order_oracle(case, spec, 3), FIRST_ORDER_FIELDS)


@pytest.mark.parametrize("field", FIRST_ORDER_FIELDS)
@pytest.mark.parametrize("case,spec", _params(ALL_CASES, ALONE_SPECS))
def test_each_alone(case: Case, spec: LossSpec, field: str):
    model, loss_fn, X, y = setup(case, spec, N=3)
    results, _ = run(model, loss_fn, X, y, [ext_for(field)])
    check_first_order(results, first_order_oracle(case, spec, 3), [field])
    for name, res in results.items():
        assert set(res) == {field}, f"{name}: asked for {field} only, got {sorted(res)}"


@pytest.mark.parametrize("case", ALL_CASES, ids=lambda c: c.name)
def test_batch_of_one(case: Case):
    spec = LossSpec("ce", "mean") if case.ce else LossSpec("mse", "mean")
    model, loss_fn, X, y = setup(case, spec, N=1)
    exts = [ext_for(f) for f in FIRST_ORDER_FIELDS]
    results, _ = run(model, loss_fn, X, y, exts)
    check_first_order(results, first_order_oracle(case, spec, 1), FIRST_ORDER_FIELDS)


# --------------------------------------------------------------------------- losses


LOSS_VARIANTS = [
    LossSpec("ce", "mean", weight=True),
    LossSpec("ce", "mean", label_smoothing=0.2),
    LossSpec("ce", "mean", ignore_index=True),
    LossSpec("ce", "sum", weight=True, ignore_index=True),
    LossSpec("bce", "mean"),
    LossSpec("bce", "sum"),
    LossSpec("nll", "mean"),
    LossSpec("nll", "sum", weight=True),
]


@pytest.mark.parametrize("spec", LOSS_VARIANTS, ids=lambda s: s.id)
@pytest.mark.parametrize("case_name", ["mlp_tanh", "conv1d_logits_nd", "linear3d_mean"])
def test_loss_variants(case_name, spec):
    case = CASES_BY_NAME[case_name]
    model, loss_fn, X, y = setup(case, spec, N=4)
    exts = [ext_for(f) for f in FIRST_ORDER_FIELDS]
    results, _ = run(model, loss_fn, X, y, exts)
    expected = oracle.first_order(model, loss_fn, X, y)
    check_first_order(results, expected, FIRST_ORDER_FIELDS)


@pytest.mark.parametrize("case_name", ["mse_3d_out", "mse_4d_out"])
def test_mse_any_output_shape(case_name):
    torch.manual_seed(0)
    if case_name == "mse_3d_out":
        model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double().eval()
        X = torch.randn(3, 5, 4, dtype=torch.float64)
    else:
        model = nn.Sequential(nn.Conv2d(2, 3, 2), nn.Sigmoid(), nn.Conv2d(3, 2, 2)).double()
        X = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    out = model(X)
    for red in ("mean", "sum"):
        loss_fn = nn.MSELoss(reduction=red)
        y = torch.randn_like(out)
        results, _ = run(model, loss_fn, X, y, [ext_for(f) for f in FIRST_ORDER_FIELDS])
        check_first_order(results, oracle.first_order(model, loss_fn, X, y), FIRST_ORDER_FIELDS,
                          what=f"{red}: ")


# --------------------------------------------------------------------------- hypothesis


@st.composite
def conv_configs(draw):
    d = draw(st.integers(1, 3))
    transpose = draw(st.booleans())
    groups = draw(st.integers(1, 2))
    cin = groups * draw(st.integers(1, 2))
    cout = groups * draw(st.integers(1, 2))
    k = draw(st.integers(1, 3)) if d < 3 else draw(st.integers(1, 2))
    stride = draw(st.integers(1, 2))
    dilation = draw(st.integers(1, 2))
    bias = draw(st.booleans())
    N = draw(st.integers(1, 3))
    kw = dict(stride=stride, dilation=dilation, groups=groups, bias=bias)
    if transpose:
        kw["padding"] = draw(st.integers(0, 1))
        if draw(st.booleans()) and max(stride, dilation) > 1:
            kw["output_padding"] = 1
        size = draw(st.integers(1, 3))
    else:
        mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "circular", "replicate"]))
        if stride == 1 and draw(st.booleans()):
            kw["padding"] = "same"
        else:
            kw["padding"] = draw(st.integers(0, 2))
        kw["padding_mode"] = mode
        size = draw(st.integers(max(dilation * (k - 1) + 1 - 0, 2), 5 if d < 3 else 3))
    spatial = tuple(draw(st.integers(size, size + 1)) for _ in range(d))
    loss = draw(st.sampled_from(SPECS))
    return d, transpose, cin, cout, k, kw, spatial, N, loss


def _build_conv(cfg):
    d, transpose, cin, cout, k, kw, spatial, N, spec = cfg
    cls = {(1, False): nn.Conv1d, (2, False): nn.Conv2d, (3, False): nn.Conv3d,
           (1, True): nn.ConvTranspose1d, (2, True): nn.ConvTranspose2d,
           (3, True): nn.ConvTranspose3d}[(d, transpose)]
    try:
        conv = cls(cin, cout, k, **kw)
        x = torch.randn(N, cin, *spatial)
        z = conv(x)
        if kw.get("padding_mode") == "reflect":  # reflect needs padding < input size
            pass
    except (RuntimeError, ValueError):
        return None
    if z.numel() == 0:
        return None
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(z[0].numel(), 3))
    return model.double().eval(), x.double()


@settings(max_examples=20)
@given(cfg=conv_configs(), seed=st.integers(0, 2**16))
def test_hypothesis_conv(cfg, seed):
    torch.manual_seed(seed)
    built = _build_conv(cfg)
    if built is None:
        return
    model, X = built
    spec = cfg[-1]
    out = model(X)
    loss_fn = spec.make(3)
    y = make_target(spec, out, seed)
    results, _ = run(model, loss_fn, X, y, [ext_for(f) for f in FIRST_ORDER_FIELDS])
    check_first_order(results, oracle.first_order(model, loss_fn, X, y), FIRST_ORDER_FIELDS,
                      what=f"{cfg}: ")


@settings(max_examples=20)
@given(
    N=st.integers(1, 4),
    S=st.sampled_from([None, 1, 3]),
    sizes=st.lists(st.integers(1, 5), min_size=2, max_size=4),
    act=st.sampled_from(["relu", "tanh", "sigmoid", "gelu", "elu"]),
    bias=st.booleans(),
    spec=st.sampled_from(SPECS),
    seed=st.integers(0, 2**16),
)
def test_hypothesis_mlp(N, S, sizes, act, bias, spec, seed):
    from cases import ACTIVATIONS

    torch.manual_seed(seed)
    layers = []
    for i in range(len(sizes) - 1):
        layers += [nn.Linear(sizes[i], sizes[i + 1], bias=bias), ACTIVATIONS[act]()]
    layers.append(nn.Linear(sizes[-1], 3))
    model = nn.Sequential(*layers).double().eval()
    shape = (N, sizes[0]) if S is None else (N, S, sizes[0])
    X = torch.randn(shape, dtype=torch.float64)
    out = model(X)
    if spec.kind == "ce" and S is not None:
        spec = LossSpec("mse", spec.reduction)
    loss_fn = spec.make(out.shape[1])
    y = make_target(spec, out, seed)
    results, _ = run(model, loss_fn, X, y, [ext_for(f) for f in FIRST_ORDER_FIELDS])
    check_first_order(results, oracle.first_order(model, loss_fn, X, y), FIRST_ORDER_FIELDS)


@settings(max_examples=10)
@given(N=st.integers(1, 4), S=st.integers(1, 5), vocab=st.integers(2, 6),
       padding=st.booleans(), seed=st.integers(0, 2**16))
def test_hypothesis_embedding(N, S, vocab, padding, seed):
    torch.manual_seed(seed)
    emb = nn.Embedding(vocab, 3, padding_idx=0 if padding else None)
    model = nn.Sequential(emb, nn.Flatten(), nn.Linear(3 * S, 2)).double().eval()
    X = torch.randint(0, vocab, (N, S))
    loss_fn = nn.CrossEntropyLoss()
    y = torch.randint(0, 2, (N,))
    results, _ = run(model, loss_fn, X, y, [ext_for(f) for f in FIRST_ORDER_FIELDS])
    check_first_order(results, oracle.first_order(model, loss_fn, X, y), FIRST_ORDER_FIELDS)


# --------------------------------------------------------------------------- float32


@pytest.mark.parametrize("case_name", ["mlp_sigmoid", "conv2d", "convT2d", "layernorm",
                                       "embedding_padding", "linear3d_mean", "residual_mlp",
                                       "maxpool2d"])
def test_float32_close_to_float64_oracle(case_name):
    """float32 engine vs float64 oracle: atol 1e-5 * max|oracle| + rtol 1e-4."""
    case = CASES_BY_NAME[case_name]
    spec = LossSpec("ce", "mean")
    model, loss_fn, X, y = setup(case, spec, N=4)
    expected = oracle.first_order(model, loss_fn, X, y)
    m32 = copy.deepcopy(model).float()
    X32 = X.float() if X.is_floating_point() else X
    results, _ = run(m32, loss_fn, X32, y, [ext_for(f) for f in FIRST_ORDER_FIELDS])
    for name, res in results.items():
        for f, v in res.items():
            assert v.dtype == torch.float32, f"{name}.{f} has dtype {v.dtype}"
    check_first_order(results, expected, FIRST_ORDER_FIELDS, rtol=1e-4, atol_rel=1e-5)


# --------------------------------------------------------------------------- contract


@pytest.mark.parametrize("case_name", ["mlp_relu", "conv2d_groups", "layernorm", "attention",
                                       "weight_sharing", "embedding_padding", "residual_conv"])
def test_grad_unchanged_and_attributes_match_results(case_name):
    case = CASES_BY_NAME[case_name]
    model, loss_fn, X, y = setup(case, LossSpec("ce"), N=3)
    model.zero_grad(set_to_none=True)
    loss_fn(model(X), y).backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    results, _ = run(model, loss_fn, X, y, [ext_for(f) for f in FIRST_ORDER_FIELDS])
    for name, p in model.named_parameters():
        assert_close(p.grad, plain[name], f"{name}.grad", rtol=1e-13, atol_rel=1e-14)
        assert_close(p.grad_batch.sum(0), plain[name], f"{name}.grad_batch.sum(0)")
        for field in FIRST_ORDER_FIELDS:
            attr = getattr(p, field)
            assert torch.equal(attr, results[name][field]), f"{name}.{field} != results"
    assert set(results) == {n for n, _ in model.named_parameters()}


def test_frozen_parameters_get_nothing_and_rest_is_right():
    case = CASES_BY_NAME["mlp_tanh"]
    model, loss_fn, X, y = setup(case, LossSpec("ce"), N=3)
    model[0].weight.requires_grad_(False)
    results, _ = run(model, loss_fn, X, y, [BatchGrad(), Variance()])
    assert "0.weight" not in results
    assert not hasattr(model[0].weight, "grad_batch")
    check_first_order(results, oracle.first_order(model, loss_fn, X, y),
                      ["grad_batch", "variance"])


def test_hooks_removed_after_exit():
    model, loss_fn, X, y = setup(CASES_BY_NAME["residual_conv"], LossSpec("ce"), N=2)
    before = hooks_snapshot(model)
    run(model, loss_fn, X, y, [ext_for(f) for f in FIRST_ORDER_FIELDS])
    assert_no_hooks(model, before)
    assert_no_hooks(model)
    # functionally: a plain backward after exit stores nothing new
    for p in model.parameters():
        for f in FIRST_ORDER_FIELDS:
            if hasattr(p, f):
                delattr(p, f)
    loss_fn(model(X), y).backward()
    for n, p in model.named_parameters():
        for f in FIRST_ORDER_FIELDS:
            assert not hasattr(p, f), f"{n}.{f} written outside collect"


@pytest.mark.parametrize("where", ["before_forward", "after_forward", "after_backward"])
def test_hooks_removed_after_exception(where):
    model, loss_fn, X, y = setup(CASES_BY_NAME["mlp_relu"], LossSpec("ce"), N=2)
    before = hooks_snapshot(model)
    with pytest.raises(ValueError, match="boom"):
        with curvopt.collect(model, loss_fn, BatchGrad(), SumGradSquared()):
            if where == "before_forward":
                raise ValueError("boom")
            loss = loss_fn(model(X), y)
            if where == "after_forward":
                raise ValueError("boom")
            loss.backward()
            raise ValueError("boom")
    assert_no_hooks(model, before)
    # and the model works normally / with a new collect afterwards
    results, _ = run(model, loss_fn, X, y, [BatchGrad()])
    check_first_order(results, oracle.first_order(model, loss_fn, X, y), ["grad_batch"])


def test_second_collect_on_same_model():
    case = CASES_BY_NAME["conv2d"]
    model, loss_fn, X, y = setup(case, LossSpec("ce"), N=3)
    expected = oracle.first_order(model, loss_fn, X, y)
    r1, _ = run(model, loss_fn, X, y, [BatchGrad()])
    check_first_order(r1, expected, ["grad_batch"])
    r2, _ = run(model, loss_fn, X, y, [BatchL2Grad(), Variance()])
    check_first_order(r2, expected, ["batch_l2", "variance"])
    assert "grad_batch" not in r2[next(iter(r2))]
    # a different batch in a third collect
    model3, loss_fn3, X3, y3 = setup(case, LossSpec("ce"), N=2, seed=5)
    r3, _ = run(model, loss_fn3, X3, y3, [BatchGrad()])
    check_first_order(r3, oracle.first_order(model, loss_fn3, X3, y3), ["grad_batch"])


@pytest.mark.parametrize("field", ["grad_batch", "batch_l2", "variance"])
def test_batchnorm_train_raises_and_names_layer(field):
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(
        fc=nn.Linear(4, 3), my_bn_layer=nn.BatchNorm1d(3), act=nn.ReLU(), head=nn.Linear(3, 2)
    )).double().train()
    X = torch.randn(5, 4, dtype=torch.float64)
    y = torch.randint(0, 2, (5,))
    loss_fn = nn.CrossEntropyLoss()
    before = hooks_snapshot(model)
    with pytest.raises(CurvoptError) as info:
        with curvopt.collect(model, loss_fn, ext_for(field)):
            loss_fn(model(X), y).backward()
    assert isinstance(info.value, CollectError), f"expected CollectError, got {info.type}"
    assert "my_bn_layer" in str(info.value), f"message does not name the layer: {info.value}"
    assert_no_hooks(model, before)


def test_batchnorm_eval_is_fine_in_same_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.Linear(3, 2))
    model = model.double()
    model(torch.randn(8, 4, dtype=torch.float64))  # running stats
    model.eval()
    X = torch.randn(5, 4, dtype=torch.float64)
    y = torch.randint(0, 2, (5,))
    loss_fn = nn.CrossEntropyLoss()
    results, _ = run(model, loss_fn, X, y, [ext_for(f) for f in FIRST_ORDER_FIELDS])
    check_first_order(results, oracle.first_order(model, loss_fn, X, y), FIRST_ORDER_FIELDS)


@pytest.mark.parametrize("how", ["retain_graph", "new_forward"])
def test_backward_twice_in_one_collect_raises(how):
    model, loss_fn, X, y = setup(CASES_BY_NAME["mlp_relu"], LossSpec("ce"), N=2)
    before = hooks_snapshot(model)
    with pytest.raises(CurvoptError) as info:
        with curvopt.collect(model, loss_fn, BatchGrad()):
            loss = loss_fn(model(X), y)
            loss.backward(retain_graph=True)
            if how == "new_forward":
                loss = loss_fn(model(X), y)
            loss.backward()
    assert isinstance(info.value, CollectError), f"expected CollectError, got {info.type}"
    assert "backward" in str(info.value).lower(), f"unclear message: {info.value}"
    assert_no_hooks(model, before)


def test_nested_collect_raises():
    model, loss_fn, X, y = setup(CASES_BY_NAME["mlp_relu"], LossSpec("ce"), N=2)
    before = hooks_snapshot(model)
    with pytest.raises(CurvoptError) as info:
        with curvopt.collect(model, loss_fn, BatchGrad()):
            with curvopt.collect(model, loss_fn, Variance()):
                loss_fn(model(X), y).backward()
    assert isinstance(info.value, CollectError), f"expected CollectError, got {info.type}"
    assert str(info.value).strip(), "empty message"
    assert_no_hooks(model, before)
    # still usable afterwards
    results, _ = run(model, loss_fn, X, y, [BatchGrad()])
    check_first_order(results, oracle.first_order(model, loss_fn, X, y), ["grad_batch"])


@pytest.mark.parametrize("case_name", ["mlp_tanh", "conv2d", "layernorm", "linear3d_mean"])
def test_loss_fn_none(case_name):
    case = CASES_BY_NAME[case_name]
    model, loss_fn, X, y = setup(case, LossSpec("ce", "mean"), N=3)
    results, _ = run(model, loss_fn, X, y, [ext_for(f) for f in FIRST_ORDER_FIELDS],
                     pass_loss=False)
    check_first_order(results, oracle.first_order(model, loss_fn, X, y), FIRST_ORDER_FIELDS)


def test_loss_fn_none_arbitrary_scalar():
    """Any scalar that sums per-sample terms: grad_batch[n] = gradient of term n."""
    model, _, X, _ = setup(CASES_BY_NAME["mlp_sigmoid"], LossSpec("mse"), N=4)
    w = torch.tensor([0.3, -1.0, 2.0, 0.5], dtype=torch.float64)

    def terms(out):
        return w * (out**3).sum(1) + torch.sin(out).sum(1)

    with curvopt.collect(model, None, *[ext_for(f) for f in FIRST_ORDER_FIELDS]) as col:
        terms(model(X)).sum().backward()
    gb = oracle.per_sample_grads_from_terms(model, X, terms)
    check_first_order(col.results, oracle.first_order_from_grad_batch(gb), FIRST_ORDER_FIELDS)


# --------------------------------------------------------------------------- Collector object


def test_collector_long_lived():
    case = CASES_BY_NAME["mlp_tanh"]
    model, loss_fn, X, y = setup(case, LossSpec("ce"), N=3)
    _, _, X2, y2 = setup(case, LossSpec("ce"), N=2, seed=9)
    # oracle values first: the oracle must not run through an attached collector
    exp1 = oracle.first_order(model, loss_fn, X, y)
    exp2 = oracle.first_order(model, loss_fn, X2, y2)
    g = oracle.grad(model, loss_fn, X, y)
    before = hooks_snapshot(model)
    c = curvopt.Collector(model, loss_fn, extensions=(BatchGrad(),), set_attributes=False)
    c.attach()
    try:
        loss_fn(model(X), y).backward()
        check_first_order(c.results, exp1, ["grad_batch"])
        for n, p in model.named_parameters():
            assert not hasattr(p, "grad_batch"), "set_attributes=False wrote attributes"
            assert c.param_results(p)["grad_batch"] is c.results[n]["grad_batch"] or torch.equal(
                c.param_results(p)["grad_batch"], c.results[n]["grad_batch"])
        # change the request between backward passes; results are those of the last pass
        c.extensions = (Variance(), BatchL2Grad())
        model.zero_grad()
        loss_fn(model(X2), y2).backward()
        check_first_order(c.results, exp2, ["variance", "batch_l2"])
        assert all("grad_batch" not in r for r in c.results.values())
        # () = plain backward; gradient still right
        c.extensions = ()
        model.zero_grad()
        loss_fn(model(X), y).backward()
        for n, p in model.named_parameters():
            assert_close(p.grad, g[n], f"{n}.grad")
    finally:
        c.detach()
    assert_no_hooks(model, before)


def test_collector_as_context_manager():
    model, loss_fn, X, y = setup(CASES_BY_NAME["conv1d"], LossSpec("mse", "sum"), N=3)
    before = hooks_snapshot(model)
    with curvopt.Collector(model, loss_fn, extensions=(SumGradSquared(),)) as c:
        loss_fn(model(X), y).backward()
    assert_no_hooks(model, before)
    check_first_order(c.results, oracle.first_order(model, loss_fn, X, y), ["sum_grad_squared"])
    for n, p in model.named_parameters():
        assert torch.equal(p.sum_grad_squared, c.results[n]["sum_grad_squared"])
