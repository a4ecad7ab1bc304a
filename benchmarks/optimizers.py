"""Optimizer benchmark: amortized time per step, and steps / wall time to a target loss.

Part ``time``: amortized time per ``zero_grad(); loss.backward(); step()`` of
curvopt's optimizers against ``torch.optim.SGD`` and ``Adam`` on the digits MLP
64-128-128-10 (N=128), the MLP 784-256-256-10 (N=128) and the 3c3d CNN (N=64)
of the engine benchmarks (:mod:`_common`).  Each optimizer runs blocks of
``--block`` steps (a multiple of every update period, so inverse and curvature
refreshes are amortized exactly); blocks are interleaved with an SGD block and
the reported ratio is the median over repeats of (block time / SGD block time).

Part ``digits`` (issue 12's set-up): scikit-learn's digits (x/16, the recipes'
75 % training split), MLP 64-128-128-10 ReLU, mini-batches of 128 drawn with a
fixed seed, until the *training* loss on the full training split is <= 0.05
(evaluated after every step, not timed).  Every optimizer's learning rate is
tuned on a grid a factor sqrt(10) apart (fewest median steps over the seeds);
then the runs at that learning rate are timed in ``--time-repeats`` rounds that
interleave all optimizers (background load hits all alike), and the ratios to
Adam are medians over the rounds.  Reported: steps, ms per step along the real
trajectory (statistics steps included at their frequency), wall time per run.

Run::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/optimizers.py            # both parts
    python benchmarks/optimizers.py --parts digits
    python benchmarks/optimizers.py --parts time --models digits --quick
    python benchmarks/optimizers.py --parts digits --configs "KFACOptimizer (defaults)"
    python benchmarks/optimizers.py --json results.json

``--parts digits`` takes about 2-4 minutes on two busy cores, the ``time`` part
on the digits MLP about a minute, with ``--models cnn`` about 8 minutes.

Targets of issue 12 on the digits MLP: KFACOptimizer's wall-clock <= 0.6x Adam's,
steps <= 0.6x, amortized step <= 1.5x an Adam step; <= 0.5x kfac-pytorch's wall-clock.

kfac-pytorch 0.4.2 is a row of the digits part when ``import kfac`` works: install it
from its repository into a side environment (with this project's torch, scikit-learn
and numpy) and run this script there with ``PYTHONPATH`` set to this checkout; its code
is never part of this project.
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
from _common import (  # noqa: E402
    Problem,
    environment_line,
    make_problem,
    markdown_table,
    setup_threads,
)

from curvopt.optim import DiagGGNAdam, KFACOptimizer, VarianceAdaptiveSGD  # noqa: E402

Factory = Callable[[nn.Module, nn.Module, float], torch.optim.Optimizer]

#: The defaults KFACOptimizer had before issue 12 (statistics every step).
KFAC_BEFORE = dict(factor_update_freq=1, inverse_update_freq=10, factor_decay=0.95,
                   momentum=0.0, kl_clip=1e-2)

# ------------------------------------------------------------------------------ part 1
TIME_CONFIGS: dict[str, Factory] = {
    "SGD (momentum 0.9)": lambda m, lf, lr: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9),
    "Adam": lambda m, lf, lr: torch.optim.Adam(m.parameters(), lr=lr),
    "KFACOptimizer (defaults)": lambda m, lf, lr: KFACOptimizer(m, lf, lr=lr),
    "KFACOptimizer (before)": lambda m, lf, lr: KFACOptimizer(m, lf, lr=lr, **KFAC_BEFORE),
    "KFACOptimizer (no statistics after step 1)": lambda m, lf, lr: KFACOptimizer(
        m, lf, lr=lr, factor_update_freq=10**6, inverse_update_freq=10**6),
    "EKFAC (defaults)": lambda m, lf, lr: KFACOptimizer(m, lf, lr=lr, eigen_correction=True),
    "DiagGGNAdam (T=1)": lambda m, lf, lr: DiagGGNAdam(m, lf, lr=lr),
    "DiagGGNAdam (T=10)": lambda m, lf, lr: DiagGGNAdam(m, lf, lr=lr, curvature_update_freq=10),
    "VarianceAdaptiveSGD": lambda m, lf, lr: VarianceAdaptiveSGD(m, lf, lr=lr),
}


def _time_problem(name: str):
    if name != "digits":
        return make_problem(name, seed=0)
    X, y = digits_data()
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, X.shape[0], (128,), generator=g)
    return Problem("digits", "digits MLP 64-128-128-10 ReLU, N=128", digits_mlp(0),
                   nn.CrossEntropyLoss(), X[idx], y[idx])


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
        prob = _time_problem(name)
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
    """MLP 64-128-128-10 ReLU (issue 12's digits problem)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
    )


def sqrt10_grid(lo: int, hi: int) -> list[float]:
    """Learning rates :math:`10^{k/2}`, ``lo <= k <= hi`` (a factor sqrt(10) apart)."""
    return [round(10 ** (k / 2), 6) for k in range(lo, hi + 1)]


DIGITS_CONFIGS: dict[str, tuple[Factory, list[float]]] = {
    "Adam": (lambda m, lf, lr: torch.optim.Adam(m.parameters(), lr=lr), sqrt10_grid(-8, -1)),
    "SGD (momentum 0.9)": (
        lambda m, lf, lr: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9),
        sqrt10_grid(-4, 1),
    ),
    "KFACOptimizer (defaults)": (
        lambda m, lf, lr: KFACOptimizer(m, lf, lr=lr), sqrt10_grid(-4, 0)),
    "KFACOptimizer (before: T_f=1 kl_clip=1e-2 mu=0)": (
        lambda m, lf, lr: KFACOptimizer(m, lf, lr=lr, **KFAC_BEFORE), sqrt10_grid(-4, 0)),
    "KFACOptimizer (defaults, T_f=1)": (
        lambda m, lf, lr: KFACOptimizer(m, lf, lr=lr, factor_update_freq=1),
        sqrt10_grid(-4, 0)),
    "EKFAC (eigen_correction, defaults)": (
        lambda m, lf, lr: KFACOptimizer(m, lf, lr=lr, eigen_correction=True),
        sqrt10_grid(-4, 0)),
    "EKFAC (eigen_correction, before)": (
        lambda m, lf, lr: KFACOptimizer(m, lf, lr=lr, eigen_correction=True, **KFAC_BEFORE),
        sqrt10_grid(-4, 0)),
    "DiagGGNAdam (defaults)": (lambda m, lf, lr: DiagGGNAdam(m, lf, lr=lr), sqrt10_grid(-6, -1)),
    "DiagGGNAdam (T=10)": (
        lambda m, lf, lr: DiagGGNAdam(m, lf, lr=lr, curvature_update_freq=10),
        sqrt10_grid(-6, -1)),
    "VarianceAdaptiveSGD": (
        lambda m, lf, lr: VarianceAdaptiveSGD(m, lf, lr=lr), sqrt10_grid(-2, 2)),
}


class _KfacPytorch:
    """kfac-pytorch 0.4.2 as its README uses it (a peer column, only where it is installed:
    ``pip install`` of its repository in a side environment, never vendored here):
    ``loss.backward(); preconditioner.step(); sgd.step()``, factors every step, inverses
    every 10 steps, damping 1e-3, factor decay 0.95, KL clip 1e-2, plain SGD."""

    def __init__(self, model, loss_fn, lr):
        from kfac.preconditioner import KFACPreconditioner

        self.sgd = torch.optim.SGD(model.parameters(), lr=lr)
        self.pre = KFACPreconditioner(model, factor_update_steps=1, inv_update_steps=10,
                                      damping=1e-3, factor_decay=0.95, kl_clip=1e-2,
                                      lr=lambda step: lr)

    def zero_grad(self, set_to_none=True):
        self.sgd.zero_grad(set_to_none=set_to_none)

    def step(self):
        self.pre.step()
        self.sgd.step()


def _has_kfac_pytorch() -> bool:
    try:
        import kfac.preconditioner  # noqa: F401
    except ImportError:
        return False
    return True


if _has_kfac_pytorch():
    DIGITS_CONFIGS["kfac-pytorch 0.4.2 (+ SGD)"] = (_KfacPytorch, sqrt10_grid(-4, 3))


def _train(make: Factory, lr: float, seed: int, X, y, batch: int, *, steps: int,
           target: float | None) -> tuple[int | None, float]:
    """Train from seed ``seed``: until the full-data loss <= ``target`` (evaluated after every
    step, untimed) or for exactly ``steps`` steps (``target=None``: timing, no evaluation).
    Returns (steps to target or None, wall time of the training steps)."""
    model = digits_mlp(seed)
    loss_fn = nn.CrossEntropyLoss()
    opt = make(model, loss_fn, lr)
    g = torch.Generator().manual_seed(1000 + seed)
    idx = [torch.randint(0, X.shape[0], (batch,), generator=g) for _ in range(steps)]
    wall, reached = 0.0, None
    try:
        for step in range(1, steps + 1):
            xb, yb = X[idx[step - 1]], y[idx[step - 1]]
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss_fn(model(xb), yb).backward()
            opt.step()
            wall += time.perf_counter() - t0
            if target is None:
                continue
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


def digits_part(target: float, max_steps: int, seeds: list[int], batch: int,
                configs: list[str] | None, repeats: int) -> dict:
    """Tune every optimizer's lr (fewest median steps to the target), then time the runs
    at that lr: ``repeats`` rounds, each running every optimizer on every seed for its
    steps to the target, interleaved, so that background load hits all alike."""
    X, y = digits_data()
    names = [n for n in DIGITS_CONFIGS if not configs or n in configs or n == "Adam"]
    rows: dict = {}
    for name in names:
        make, lrs = DIGITS_CONFIGS[name]
        per_lr = {}
        for lr in lrs:
            steps = [_train(make, lr, s, X, y, batch, steps=max_steps, target=target)[0]
                     for s in seeds]
            steps = [math.inf if s is None else s for s in steps]
            per_lr[lr] = {"median_steps": statistics.median(steps), "steps": steps}
        best = min(per_lr, key=lambda lr: (per_lr[lr]["median_steps"], -lr))
        rows[name] = {"best_lr": best, **per_lr[best], "grid": per_lr}
    timed = [n for n in names if all(math.isfinite(s) for s in rows[n]["steps"])]
    walls: dict = {n: [] for n in timed}  # per round: total over seeds
    for _ in range(repeats):
        for n in timed:
            make, r = DIGITS_CONFIGS[n][0], rows[n]
            walls[n].append(sum(
                _train(make, r["best_lr"], s, X, y, batch, steps=int(k), target=None)[1]
                for s, k in zip(seeds, r["steps"], strict=True)))
    for n in timed:
        r = rows[n]
        total_steps = sum(r["steps"])
        r["wall_s"] = statistics.median(walls[n]) / len(seeds)  # per run
        r["ms_per_step"] = 1e3 * statistics.median(walls[n]) / total_steps
        if "Adam" in walls:
            a = walls["Adam"]
            r["wall_vs_adam"] = statistics.median(w / wa for w, wa in zip(walls[n], a))
            r["step_time_vs_adam"] = r["wall_vs_adam"] * sum(rows["Adam"]["steps"]) / total_steps
    adam = rows["Adam"]["median_steps"]
    for r in rows.values():
        r["steps_vs_adam"] = r["median_steps"] / adam if math.isfinite(adam) else math.nan
    return {
        "target_train_loss": target,
        "max_steps": max_steps,
        "seeds": seeds,
        "batch": batch,
        "repeats": repeats,
        "model": "MLP 64-128-128-10 ReLU, float32",
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
            f"## Time to training loss <= {d['target_train_loss']} on digits "
            f"({d['model']}, batch {d['batch']}, seeds {d['seeds']}, lr tuned on a sqrt(10) "
            f"grid by median steps, at most {d['max_steps']} steps; wall: median of "
            f"{d['repeats']} interleaved rounds, per run, evaluation not timed)\n"
        )
        rows = []
        for c, r in d["rows"].items():
            steps = r["median_steps"]
            timed = "wall_s" in r
            rows.append([
                c,
                f"{r['best_lr']:g}",
                "not reached" if math.isinf(steps) else f"{steps:g}",
                f"{r['steps_vs_adam']:.2f}",
                f"{r['ms_per_step']:.2f}" if timed else "-",
                f"{r.get('step_time_vs_adam', math.nan):.2f}" if timed else "-",
                f"{1e3 * r['wall_s']:.0f}" if timed else "-",
                f"{r.get('wall_vs_adam', math.nan):.2f}" if timed else "-",
            ])
        lines.append(markdown_table(
            ["optimizer", "best lr", "steps", "x Adam steps", "ms / step", "x Adam step",
             "wall ms", "x Adam wall"], rows))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default="time,digits", help="comma list of: time, digits")
    ap.add_argument("--models", default="digits,mlp,cnn", help="time part: digits, mlp, cnn")
    ap.add_argument("--configs", default=None,
                    help="only these rows (names separated by ';')")
    ap.add_argument("--block", type=int, default=20, help="steps per timed block (multiple of 10)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--target", type=float, default=0.05, help="digits: target training loss")
    ap.add_argument("--max-steps", type=int, default=400)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--time-repeats", type=int, default=5, help="digits: timed rounds")
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
        if args.models == "digits,mlp,cnn":
            args.models = "digits"
    setup_threads()
    warnings.simplefilter("ignore", RuntimeWarning)
    parts = args.parts.split(",")
    configs = args.configs.split(";") if args.configs else None
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
            args.time_repeats,
        )
    print(report(results))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2, default=float)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
