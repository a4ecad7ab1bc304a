"""The optimizers' finiteness checks: fused norms, without false alarms from overflow."""

from __future__ import annotations

import torch

from curvopt.optim._base import _all_finite, _grads_finite


def test_large_finite_values_are_finite():
    # the 2-norm of these overflows (float32 above 1.8e19, float16 above 65504)
    assert _grads_finite([torch.full((4,), 1e20)])
    assert _grads_finite([torch.full((100_000,), 60000.0, dtype=torch.float16)])


def test_nan_and_inf_are_found_in_any_group():
    ok = torch.ones(3)
    assert not _grads_finite([ok, torch.tensor([1.0, float("nan")])])
    assert not _grads_finite([ok, torch.tensor([float("inf")], dtype=torch.float64)])
    assert not _all_finite({"a": [ok, {"b": torch.tensor([float("-inf")])}]})
    assert _grads_finite([]) and _grads_finite([torch.empty(0)])


def test_sparse_gradients():
    i = torch.tensor([[0, 2]])
    assert _grads_finite([torch.sparse_coo_tensor(i, torch.tensor([1.0, 2.0]), (4,))])
    assert not _grads_finite([torch.sparse_coo_tensor(i, torch.tensor([1.0, float("nan")]), (4,))])
