"""Optimizer benchmark: amortized time per step, and steps / wall time to a target loss.

Part ``time``: amortized time per ``zero_grad(); loss.backward(); step()`` of
curvopt's optimizers against ``torch.optim.SGD`` and ``Adam`` on the MLP
784-256-256-10 (N=128) and the 3c3d CNN (N=64) of the engine benchmarks
(:mod:`_common`).  Each optimizer runs blocks of ``--block`` steps (a multiple
of every update period, so inverse and curvature refreshes are amortized
exactly); blocks are interleaved with an SGD block and the reported ratio is
the median over repeats of (block time / SGD block time).

Part ``digits``: scikit-learn's digits (x/16, the recipes' 75 % training
split), MLP 64-64-64-10 ReLU, mini-batches of 64 drawn with a fixed seed.
Every optimizer's learning rate is tuned on a grid; reported: the fewest steps
(median over seeds) to reach the target *training* loss (full training set,
evaluated after every step, not timed) and the wall time of those training
steps.

Run::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/optimizers.py            # both parts
    python benchmarks/optimizers.py --parts time --models mlp --quick
    python benchmarks/optimizers.py --json results.json

Both parts together take about 15-20 minutes on two busy cores; ``--parts``
runs one of them (``time`` with ``--models cnn`` alone is about 8 minutes).

Targets of the issue: KFACOptimizer (inverse_update_freq=10) <= 2x an SGD
step on the MLP; steps to target <= 0.5x Adam's on digits.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import environment_line, make_problem, markdown_table, setup_threads  # noqa: E402

from curvopt.optim import DiagGGNAdam, KFACOptimizer, VarianceAdaptiveSGD  # noqa: E402

Factory = Callable[[nn.Module, nn.Module, float], torch.optim.Optimizer]

# ------------------------------------------------------------------------------ part 1
TIME_CONFIGS: dict[str, Factory] = {
    "SGD (momentum 0.9)": lambda m, lf, lr: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9),
    "Adam": lambda m, lf, lr: torch.optim.Adam(m.parameters(), lr=lr),
    "KFAC (T_inv=10)": lambda m, lf, lr: KFACOptimizer(m, lf, lr=lr, inverse_update_freq=10),
    "KFAC (T_f=10, T_inv=10)": lambda m, lf, lr: KFACOptimizer(
        m, lf, lr=lr, factor_update_freq=10, inverse_update_freq=10
    ),
    "KFAC eigen (T_f=10, T_inv=10)": lambda m, lf, lr: KFACOptimizer(
        m, lf, lr=lr, factor_update_freq=10, inverse_update_freq=10, damping_mode="eigen"
    ),
    "DiagGGNAdam (T=1)": lambda m, lf, lr: DiagGGNAdam(m, lf, lr=lr),
    "DiagGGNAdam MC (T=10)": lambda m, lf, lr: DiagGGNAdam(
        m, lf, lr=lr, curvature="mc", curvature_update_freq=10
    ),
    "VarianceAdaptiveSGD": lambda m, lf, lr: VarianceAdaptiveSGD(m, lf, lr=lr),
}


def _block(model, loss_fn, opt, X, y, steps: int) -> Callable[[], float]:
    def run() -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            loss_fn(model(X), y).backward()
            opt.step()
        return time.perf_counter() - t0

    return run


def time_part(models: list[str], block: int, repeats: int, configs: list[str] | None) -> dict:
    out = {}
    for name in models:
        prob = make_problem(name, seed=0)
        pristine = copy.deepcopy(prob.model)  # before any optimizer attaches hooks
        runners = {}
        for cname, make in TIME_CONFIGS.items():
            if configs and cname not in configs and not cname.startswith("SGD"):
                continue
            m = copy.deepcopy(pristine)
            # a tiny lr keeps the parameters (and the cost of every step) stationary
            opt = make(m, prob.loss_fn, 1e-5)
            runners[cname] = (_block(m, prob.loss_fn, opt, prob.X, prob.y, block), opt)
        sgd_run = runners["SGD (momentum 0.9)"][0]
        for run, _ in runners.values():  # warm-up: one full block each
            run()
        times = {c: [] for c in runners}
        ratios = {c: [] for c in runners}
        for _ in range(repeats):
            for c, (run, _) in runners.items():
                tb = sgd_run()
                tc = run()
                times[c].append(tc / block)
                ratios[c].append(tc / tb)
        rows = {}
        for c in runners:
            r = sorted(ratios[c])
            rows[c] = {
                "ms_per_step": 1e3 * statistics.median(times[c]),
                "ratio_to_sgd": statistics.median(r),
                "ratio_q1": r[len(r) // 4],
                "ratio_q3": r[(3 * len(r)) // 4],
            }
        for _, opt in runners.values():
            if hasattr(opt, "close"):
                opt.close()
        out[name] = {
            "description": prob.description,
            "block": block,
            "repeats": repeats,
            "rows": rows,
        }
    return out


# ------------------------------------------------------------------------------ part 2
def digits_data(dtype=torch.float32):
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.as_tensor(bunch.data, dtype=dtype) / 16.0
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    train = order[round(0.25 * x.shape[0]) :]
    return x[train], y[train]


def digits_mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)
    )


DIGITS_CONFIGS: dict[str, tuple[Factory, list[float]]] = {
    "SGD (momentum 0.9)": (
        lambda m, lf, lr: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9),
        [0.01, 0.03, 0.1, 0.3, 1.0],
    ),
    "Adam": (
        lambda m, lf, lr: torch.optim.Adam(m.parameters(), lr=lr),
        [0.001, 0.003, 0.01, 0.03, 0.1],
    ),
    "KFACOptimizer (defaults: T_inv=10, kl_clip=1e-2)": (
        lambda m, lf, lr: KFACOptimizer(m, lf, lr=lr),
        [0.01, 0.03, 0.1],
    ),
    "KFACOptimizer eigen": (
        lambda m, lf, lr: KFACOptimizer(m, lf, lr=lr, damping_mode="eigen"),
        [0.01, 0.03, 0.1],
    ),
    "DiagGGNAdam (defaults)": (
        lambda m, lf, lr: DiagGGNAdam(m, lf, lr=lr),
        [0.001, 0.003, 0.01, 0.03, 0.1],
    ),
    "VarianceAdaptiveSGD": (
        lambda m, lf, lr: VarianceAdaptiveSGD(m, lf, lr=lr),
        [0.1, 0.3, 1.0, 3.0, 10.0],
    ),
}


def steps_to_target(
    make: Factory,
    lr: float,
    target: float,
    max_steps: int,
    seed: int,
    X: torch.Tensor,
    y: torch.Tensor,
    batch: int,
) -> tuple[int | None, float]:
    model = digits_mlp(seed)
    loss_fn = nn.CrossEntropyLoss()
    opt = make(model, loss_fn, lr)
    g = torch.Generator().manual_seed(1000 + seed)
    wall = 0.0
    reached = None
    try:
        for step in range(1, max_steps + 1):
            idx = torch.randint(0, X.shape[0], (batch,), generator=g)
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss_fn(model(X[idx]), y[idx]).backward()
            opt.step()
            wall += time.perf_counter() - t0
            with torch.no_grad():
                full = loss_fn(model(X), y).item()
            if not math.isfinite(full) or full > 1e3:
                break
            if full <= target:
                reached = step
                break
    finally:
        if hasattr(opt, "close"):
            opt.close()
    return reached, wall


def digits_part(
    target: float, max_steps: int, seeds: list[int], batch: int, configs: list[str] | None
) -> dict:
    X, y = digits_data()
    rows = {}
    for name, (make, lrs) in DIGITS_CONFIGS.items():
        if configs and name not in configs and name not in ("Adam", "SGD (momentum 0.9)"):
            continue
        per_lr = {}
        for lr in lrs:
            runs = [steps_to_target(make, lr, target, max_steps, s, X, y, batch) for s in seeds]
            steps = [r[0] if r[0] is not None else math.inf for r in runs]
            per_lr[lr] = {
                "median_steps": statistics.median(steps),
                "steps": steps,
                "median_wall_s": statistics.median(r[1] for r in runs),
            }
        best_lr = min(
            per_lr, key=lambda lr: (per_lr[lr]["median_steps"], per_lr[lr]["median_wall_s"])
        )
        rows[name] = {"best_lr": best_lr, **per_lr[best_lr], "grid": per_lr}
    adam = rows["Adam"]["median_steps"]
    for r in rows.values():
        r["steps_vs_adam"] = r["median_steps"] / adam if math.isfinite(adam) else math.nan
    return {
        "target_train_loss": target,
        "max_steps": max_steps,
        "seeds": seeds,
        "batch": batch,
        "model": "MLP 64-64-64-10 ReLU, float32",
        "rows": rows,
    }


# ------------------------------------------------------------------------------ report
def report(results: dict) -> str:
    lines = [f"# curvopt optimizer benchmark\n\n{results['environment']}\n"]
    for res in results.get("time", {}).values():
        lines.append(
            f"## Amortized time per step, {res['description']} "
            f"(blocks of {res['block']} steps, {res['repeats']} repeats)\n"
        )
        rows = [
            [
                c,
                f"{r['ms_per_step']:.2f}",
                f"{r['ratio_to_sgd']:.2f} [{r['ratio_q1']:.2f}-{r['ratio_q3']:.2f}]",
            ]
            for c, r in res["rows"].items()
        ]
        lines.append(markdown_table(["optimizer", "ms / step", "x SGD step"], rows) + "\n")
    if "digits" in results:
        d = results["digits"]
        lines.append(
            f"## Steps to training loss <= {d['target_train_loss']} on digits "
            f"({d['model']}, batch {d['batch']}, median over seeds {d['seeds']}, "
            f"best lr of a grid, at most {d['max_steps']} steps)\n"
        )
        rows = []
        for c, r in d["rows"].items():
            steps = r["median_steps"]
            rows.append(
                [
                    c,
                    f"{r['best_lr']:g}",
                    "not reached" if math.isinf(steps) else f"{steps:g}",
                    f"{r['steps_vs_adam']:.2f}",
                    f"{r['median_wall_s']:.2f}",
                ]
            )
        lines.append(
            markdown_table(["optimizer", "best lr", "steps", "x Adam steps", "wall s"], rows)
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default="time,digits", help="comma list of: time, digits")
    ap.add_argument("--models", default="mlp,cnn", help="time part: mlp, cnn")
    ap.add_argument("--configs", default=None, help="only these rows (comma list of names)")
    ap.add_argument("--block", type=int, default=20, help="steps per timed block (multiple of 10)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--target", type=float, default=0.05, help="digits: target training loss")
    ap.add_argument("--max-steps", type=int, default=600)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help="repeats=3, one seed, mlp only")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    if os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE" and not os.environ.get(
        "_CURVOPT_BENCH"
    ):
        env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", _CURVOPT_BENCH="1")
        os.execve(
            sys.executable,
            [sys.executable, os.path.abspath(__file__), *(argv or sys.argv[1:])],
            env,
        )
    if args.quick:
        args.repeats, args.seeds = 3, "0"
        if args.models == "mlp,cnn":
            args.models = "mlp"
    setup_threads()
    warnings.simplefilter("ignore", RuntimeWarning)
    parts = args.parts.split(",")
    configs = args.configs.split(",") if args.configs else None
    results: dict = {"environment": environment_line()}
    if "time" in parts:
        results["time"] = time_part(args.models.split(","), args.block, args.repeats, configs)
    if "digits" in parts:
        results["digits"] = digits_part(
            args.target,
            args.max_steps,
            [int(s) for s in args.seeds.split(",")],
            args.batch,
            configs,
        )
    print(report(results))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2, default=float)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
