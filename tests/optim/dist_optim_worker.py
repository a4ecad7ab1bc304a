"""Worker processes for tests/optim/test_distributed_optim.py (importable by spawned children).

``train`` runs the same K-FAC training in one process (``world=1``, no process
group) or as one rank of a gloo group, on that rank's slice of every global batch.
"""

from __future__ import annotations

import copy
import os

import torch
import torch.distributed as dist
from torch import nn

from curvopt.optim import DiagGGNAdam, KFACOptimizer
from curvopt.optim.kronecker import KroneckerBlock

DT = torch.float64


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(),
                         nn.Linear(5, 3)).to(DT)


def make_data(steps, N):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(N, 4, generator=g, dtype=DT), torch.randint(0, 3, (N,), generator=g))
            for _ in range(steps)]


def shard(N, world, rank):
    sizes = [N // world + (1 if r < N % world else 0) for r in range(world)]
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def make_optimizer(model, cfg):
    if cfg.get("optimizer") == "diag_ggn_adam":
        return DiagGGNAdam(model, nn.CrossEntropyLoss(reduction=cfg.get("reduction", "mean")),
                           lr=0.05, seed=7)
    return KFACOptimizer(model, nn.CrossEntropyLoss(), lr=0.1, damping=cfg.get("damping", 1e-2),
                         curvature=cfg["curvature"], damping_mode=cfg.get("mode", "pi"),
                         inverse_update_freq=cfg.get("ifreq", 2), momentum=0.5, seed=7,
                         kl_clip=cfg.get("kl_clip", 1e-2))


def train(cfg, world=1, rank=0, resume=None):
    """Train ``cfg["steps"]`` steps; return per-step parameters and what the tests inspect."""
    model = make_model()
    counted = {"inverses": 0}
    original = KroneckerBlock.update_inverse

    def counting(self, damping):
        counted["inverses"] += 1
        return original(self, damping)

    KroneckerBlock.update_inverse = counting
    try:
        start = 0
        if resume is not None:
            model.load_state_dict(resume["model"])
            start = resume["step"]
        net = nn.parallel.DistributedDataParallel(model) if cfg.get("ddp") and world > 1 else model
        opt = make_optimizer(net, cfg)
        if resume is not None:
            opt.load_state_dict(resume["optimizer"])
        loss_fn = opt.loss_fn
        data = make_data(cfg["steps"], cfg["N"])
        sl = shard(cfg["N"], world, rank)
        params, saved = [], None
        for t in range(start, cfg["steps"]):
            X, y = data[t]
            opt.zero_grad()
            loss_fn(net(X[sl]), y[sl]).backward()
            opt.step()
            params.append([p.detach().clone() for p in model.parameters()])
            if cfg.get("save_at") == t + 1:
                saved = {"optimizer": copy.deepcopy(opt.state_dict()), "step": t + 1,
                         "model": {k: v.clone() for k, v in model.state_dict().items()}}
        return {"params": params, "saved": saved, "inverses": counted["inverses"],
                "mc_rng": opt.state_dict()["curvopt"]["mc_rng"],
                "inverse_updates": [opt.state[p].get("inverse_updates")
                                    for p in model.parameters()]}
    finally:
        KroneckerBlock.update_inverse = original


def worker(rank, world, init_file, out_path, cfg, resume_path=None):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        if cfg.get("hang") and rank == 1:
            import time

            time.sleep(3600)
        resume = torch.load(resume_path, weights_only=False) if resume_path else None
        out = train(cfg, world, rank, resume)
        torch.save(out, os.path.join(out_path, f"rank{rank}.pt"))
        # Tear down together: a rank that exits while its peer's gloo threads still talk
        # to it aborts ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()
