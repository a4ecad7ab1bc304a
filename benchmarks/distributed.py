"""Distributed benchmark: KFACOptimizer with 2 gloo processes against 1, time and bytes per step.

Model: the MLP 784-256-256-10 ReLU of the engine benchmarks (:mod:`_common`),
a global batch of N=128 (one process: 128 samples; 2 processes: 64 each),
``KFACOptimizer(curvature="kfac", factor_update_freq=1, inverse_update_freq=10)``
on a plain model (the optimizer averages the gradients itself).

Measured per configuration, in fresh ``spawn``-ed processes (file:// rendezvous):

* **time per step** -- rank 0's wall time of ``zero_grad(); backward(); step()``
  averaged over whole blocks of ``inverse_update_freq`` steps after a warm-up
  (so inverse refreshes are amortized exactly); median over ``--repeats`` blocks;
* **bytes communicated per step** -- every tensor passed to
  ``torch.distributed.all_reduce`` / ``broadcast`` / ``all_gather`` (the functions
  are wrapped in the workers), counted once per rank as sent (payload size, not
  what the ring algorithm puts on the wire), split into steps that only update
  the factors and steps that also refresh the inverses.

Configurations: 1 process; 2 processes with the inverses sharded (default); 2
processes with every rank computing every inverse (``shard_inverses=False``).

Run::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/distributed.py
    python benchmarks/distributed.py --blocks 1 --repeats 1      # quick check
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import markdown_table, mlp  # noqa: E402

N_GLOBAL = 128
CONFIGS = [  # (label, processes, shard_inverses)
    ("1 process", 1, True),
    ("2 processes, inverses sharded", 2, True),
    ("2 processes, inverses on every rank", 2, False),
]


def _instrument(counter: dict):
    """Wrap the torch.distributed collectives to count the bytes passed to them."""
    import torch.distributed as dist

    def size(x):
        if isinstance(x, torch.Tensor):
            return x.numel() * x.element_size()
        if isinstance(x, (list, tuple)):
            return sum(size(t) for t in x)
        return 0

    for name, arg in (("all_reduce", 0), ("broadcast", 0), ("all_gather", 1),
                      ("all_gather_into_tensor", 1)):
        original = getattr(dist, name)

        def wrapped(*args, _original=original, _arg=arg, _name=name, **kwargs):
            counter["bytes"] += size(args[_arg] if len(args) > _arg else kwargs.get("tensor"))
            counter["calls"] += 1
            return _original(*args, **kwargs)

        setattr(dist, name, wrapped)


def worker(rank, world, init_file, out_file, shard, ifreq, warmup_blocks, blocks, threads):
    import torch.distributed as dist

    torch.set_num_threads(threads)
    counter = {"bytes": 0, "calls": 0}
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                world_size=world)
        _instrument(counter)
    from curvopt.optim import KFACOptimizer

    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = mlp()
    X = torch.randn(N_GLOBAL, 784, generator=g)
    y = torch.randint(0, 10, (N_GLOBAL,), generator=g)
    n = N_GLOBAL // world
    X, y = X[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n]
    loss_fn = torch.nn.CrossEntropyLoss()
    opt = KFACOptimizer(model, loss_fn, lr=0.01, curvature="kfac", inverse_update_freq=ifreq,
                        seed=0)
    opt.shard_inverses = shard

    def step():
        opt.zero_grad()
        loss_fn(model(X), y).backward()
        opt.step()

    per_step_bytes, per_step_calls, block_times = [], [], []
    for b in range(warmup_blocks + blocks):
        if world > 1:
            dist.barrier()
        t0 = time.perf_counter()
        for _ in range(ifreq):
            before = dict(counter)
            step()
            per_step_bytes.append(counter["bytes"] - before["bytes"])
            per_step_calls.append(counter["calls"] - before["calls"])
        if b >= warmup_blocks:
            block_times.append((time.perf_counter() - t0) / ifreq)
    if rank == 0:
        steps = per_step_bytes[warmup_blocks * ifreq :]
        calls = per_step_calls[warmup_blocks * ifreq :]
        torch.save({
            "ms_per_step": 1e3 * statistics.median(block_times),
            "bytes_mean": sum(steps) / len(steps),
            "bytes_inverse": steps[0],  # the first step of a block refreshes the inverses
            "bytes_factor": statistics.median(steps[1:]) if len(steps) > 1 else steps[0],
            "calls_mean": sum(calls) / len(calls),
        }, out_file)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def run_config(world, shard, args, timeout=600):
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.pt")
        procs = [ctx.Process(target=worker,
                             args=(r, world, os.path.join(tmp, "init"), out, shard,
                                   args.ifreq, args.warmup, args.repeats, args.threads))
                 for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        if any(p.exitcode != 0 for p in procs):
            raise RuntimeError(f"a worker failed: exit codes {[p.exitcode for p in procs]}")
        return torch.load(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ifreq", type=int, default=10, help="inverse_update_freq (block length)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed blocks")
    ap.add_argument("--repeats", type=int, default=3, help="timed blocks (median)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    rows, base = [], None
    for label, world, shard in CONFIGS:
        r = run_config(world, shard, args)
        base = base or r["ms_per_step"]
        rows.append([label, str(world), str(N_GLOBAL // world), f"{r['ms_per_step']:.1f}",
                     f"{base / r['ms_per_step']:.2f}x", f"{r['bytes_mean'] / 1e6:.2f}",
                     f"{r['bytes_factor'] / 1e6:.2f}", f"{r['bytes_inverse'] / 1e6:.2f}",
                     f"{r['calls_mean']:.1f}"])
        print(f"done: {label}", file=sys.stderr)
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"KFACOptimizer (kfac, inverse_update_freq={args.ifreq}) on MLP 784-256-256-10, "
          f"global N={N_GLOBAL}, {args.threads} thread(s) per process, gloo on localhost; "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average "
          f"{load[0]:.2f} at the end; bytes: payload passed to the collectives by rank 0\n")
    print(markdown_table(
        ["configuration", "processes", "samples/rank", "ms/step (rank 0)", "speed-up",
         "MB/step (mean)", "MB factor step", "MB inverse step", "collectives/step"], rows))


if __name__ == "__main__":
    main()
