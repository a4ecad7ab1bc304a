"""``torch.amp.GradScaler`` with every optimizer: unscaled statistics, inf steps skipped."""

from __future__ import annotations

import warnings

import pytest
import torch

from .cases import batches, snapshot, tiny_mlp
from .test_contract import FACTORIES, LOSS, NAMES, _equal_tree

DETERMINISTIC = ["kflr_eigen", "diag_ggn_adam_sophia", "msvag"]  # no MC draws


def _float32(data, device):
    return [(X.float().to(device), y.to(device)) for X, y in data]


def _loop(name, data, device, scaler=None, poison=None, track=()):
    """Train on ``data``; ``poison``: iteration whose gradient gets an inf after backward."""
    model = tiny_mlp(0).float().to(device)
    opt = FACTORIES[name](model, LOSS, seed=3, track=track)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for t, (X, y) in enumerate(data):
            opt.zero_grad()
            loss = LOSS(model(X), y)
            if scaler is None:
                loss.backward()
                opt.step()
                continue
            scaler.scale(loss).backward()
            if t == poison:
                model[2].bias.grad[0] = float("inf")
            scaler.step(opt)
            scaler.update()
    if scaler is not None and hasattr(opt.collector, "loss_scaling"):
        # once the engine unscales (Collector.loss_scaling), it does not warn about the scale
        assert not [w for w in caught if "scaled" in str(w.message)]
    sd = opt.state_dict()
    opt.close()
    return snapshot(model), sd


def _check_same_trajectory(name, device):
    data = _float32(batches(6, N=8), device)
    plain, sd_plain = _loop(name, data, device, track=("variance",))
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**16)
    scaled, sd_scaled = _loop(name, data, device, scaler=scaler, track=("variance",))
    # Powers of two: unscaling is exact in float32, so the runs agree bit for bit,
    # first-order statistics (variance) included.
    assert all(torch.equal(a, b) for a, b in zip(plain, scaled, strict=True))
    assert _equal_tree(sd_plain["state"], sd_scaled["state"])


@pytest.mark.parametrize("name", NAMES)
def test_grad_scaler_gives_the_trajectory_of_no_scaler(name):
    _check_same_trajectory(name, torch.device("cpu"))


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_grad_scaler_skips_an_inf_step_as_torch_does(name):
    device = torch.device("cpu")
    data = _float32(batches(6, N=8), device)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    skipped, _ = _loop(name, data, device, scaler=scaler, poison=2)
    assert scaler.get_scale() == 2.0**15  # backed off once
    reference, _ = _loop(name, data[:2] + data[3:], device)
    assert all(torch.equal(a, b) for a, b in zip(skipped, reference, strict=True))


@pytest.mark.parametrize("name", ["kfac_mc", "diag_ggn_adam_mc"])
def test_grad_scaler_inf_step_leaves_mc_optimizers_unchanged(name):
    device = torch.device("cpu")
    data = _float32(batches(5, N=8), device)
    model = tiny_mlp(0).float()
    opt = FACTORIES[name](model, LOSS, seed=3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    for t, (X, y) in enumerate(data):
        opt.zero_grad()
        scaler.scale(LOSS(model(X), y)).backward()
        if t == 2:
            before = (snapshot(model), opt.state_dict())
            model[2].bias.grad[0] = float("nan")
        scaler.step(opt)
        if t == 2:
            assert all(torch.equal(a, b) for a, b in zip(before[0], model.parameters(), strict=True))
            assert _equal_tree(before[1], opt.state_dict())
        scaler.update()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    opt.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", NAMES)
def test_cuda_grad_scaler_gives_the_trajectory_of_no_scaler(name):
    _check_same_trajectory(name, torch.device("cuda"))
