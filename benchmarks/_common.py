"""Shared pieces of the curvopt benchmarks: models, data, timing, memory, subprocess driver.

This module only needs ``torch``; it never imports ``curvopt`` or ``backpack``,
so the same file serves the project venv (curvopt, torch.func) and the peer
venv (BackPACK 1.7.1, Opacus) that the benchmark scripts re-invoke themselves
under.

Method
------
* Every configuration (implementation x model x quantity) runs in a **fresh
  subprocess** (``<script> --peer IMPL --model M --row R``).  That gives an
  honest peak-memory figure, lets the driver stop a configuration that runs past
  its time or memory budget, and keeps BackPACK out of the curvopt process.
* Timing: ``torch.set_num_threads(2)``; ``warmup`` untimed calls, then
  ``repeats`` *interleaved* pairs (plain step, configured step).  The reported
  ratio is the median over pairs of (configured / plain), so slow drifts of
  background load cancel to first order.  The unit ("plain") is an ordinary
  forward + backward of a model without any hooks, in the same process.
* Peak memory: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` delta over the
  process's high-water mark after setup (imports, model, data, wrapping), taken
  around the *first* call of the configured step.  tracemalloc cannot see
  torch's allocator; psutil is not installed in either venv.
* ``OMP_WAIT_POLICY=PASSIVE`` is forced into every child's environment: with
  OpenMP's default spin-waiting, 2-thread torch becomes 50-100x slower whenever
  another process loads the cores.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

PEER_PYTHON_DEFAULT = "/tmp/bpvenv/bin/python"
NUM_THREADS = 2
RESULT_TAG = "@@RESULT@@ "

MEMORY_METHOD = (
    "peak RSS increase (resource.getrusage ru_maxrss delta) during the first call, "
    "fresh subprocess per configuration"
)


# ----------------------------------------------------------------------------- models
def mlp(activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """MLP 784-256-256-10 of the issue."""
    return nn.Sequential(
        nn.Linear(784, 256),
        activation(),
        nn.Linear(256, 256),
        activation(),
        nn.Linear(256, 10),
    )


def cnn_3c3d() -> nn.Sequential:
    """The "3c3d" CNN of the issue (DeepOBS CIFAR-10 3c3d layout), input [N, 3, 32, 32]."""
    return nn.Sequential(
        nn.Conv2d(3, 64, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1),
        nn.Conv2d(64, 96, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1),
        nn.Conv2d(96, 128, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1),
        nn.Flatten(),
        nn.Linear(2048, 512),
        nn.ReLU(),
        nn.Linear(512, 256),
        nn.ReLU(),
        nn.Linear(256, 10),
    )


@dataclass
class Problem:
    name: str
    description: str
    model: nn.Module
    loss_fn: nn.Module
    X: torch.Tensor
    y: torch.Tensor

    @property
    def N(self) -> int:
        return self.X.shape[0]


MODEL_NAMES = ("mlp", "sigmoid-mlp", "cnn")


def make_problem(name: str, seed: int = 0) -> Problem:
    """Model, CrossEntropyLoss (mean) and a fixed random batch."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if name == "mlp":
        model, desc = mlp(nn.ReLU), "MLP 784-256-256-10 ReLU, N=128"
        X = torch.randn(128, 784, generator=g)
    elif name == "sigmoid-mlp":
        model, desc = mlp(nn.Sigmoid), "MLP 784-256-256-10 Sigmoid, N=128"
        X = torch.randn(128, 784, generator=g)
    elif name == "cnn":
        model, desc = cnn_3c3d(), "3c3d CNN, [64,3,32,32]"
        X = torch.randn(64, 3, 32, 32, generator=g)
    else:
        raise ValueError(f"unknown model {name!r}; choose from {MODEL_NAMES}")
    y = torch.randint(0, 10, (X.shape[0],), generator=g)
    return Problem(name, desc, model, nn.CrossEntropyLoss(), X, y)


def plain_step(problem: Problem, model: nn.Module | None = None) -> Callable[[], None]:
    """The unit: forward + backward of a hook-free model."""
    model = problem.model if model is None else model
    params = [p for p in model.parameters() if p.requires_grad]
    X, y, loss_fn = problem.X, problem.y, problem.loss_fn

    def step():
        for p in params:
            p.grad = None
        loss_fn(model(X), y).backward()

    return step


def clone_model(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


# ----------------------------------------------------------------------------- timing
def setup_threads(n: int = NUM_THREADS) -> None:
    torch.set_num_threads(n)
    if os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
        print(
            "warning: OMP_WAIT_POLICY is not PASSIVE; timings under background load "
            "will be wildly inflated",
            file=sys.stderr,
        )


def time_callable(fn: Callable[[], None], repeats: int = 10, warmup: int = 2) -> float:
    """Median wall time in seconds of ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_interleaved(
    base: Callable[[], None], fn: Callable[[], None], repeats: int = 10, warmup: int = 2
) -> dict:
    """Alternate ``base`` and ``fn``; return medians and the median pairwise ratio."""
    for _ in range(warmup):
        base()
        fn()
    tb, tf = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        base()
        t1 = time.perf_counter()
        fn()
        t2 = time.perf_counter()
        tb.append(t1 - t0)
        tf.append(t2 - t1)
    ratios = sorted(f / b for f, b in zip(tf, tb, strict=True))
    q = _quartiles(ratios)
    return {
        "plain_s": statistics.median(tb),
        "config_s": statistics.median(tf),
        "ratio": statistics.median(ratios),
        "ratio_q1": q[0],
        "ratio_q3": q[1],
        "repeats": repeats,
    }


def _quartiles(xs: list[float]) -> tuple[float, float]:
    if len(xs) < 4:
        return min(xs), max(xs)
    qs = statistics.quantiles(xs, n=4)
    return qs[0], qs[2]


# ----------------------------------------------------------------------------- memory
def maxrss_mib() -> float:
    """Process high-water RSS in MiB (Linux reports KiB, macOS bytes)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 / 1024 if platform.system() == "Darwin" else r / 1024


def peak_delta_mib(fn: Callable[[], None]) -> float:
    before = maxrss_mib()
    fn()
    return maxrss_mib() - before


def measure_config(
    plain: Callable[[], None], fn: Callable[[], None], repeats: int, warmup: int
) -> dict:
    """Run inside a fresh worker process: memory of the first call, then timing."""
    setup_threads()
    base_rss = maxrss_mib()
    peak = peak_delta_mib(fn)
    out = time_interleaved(plain, fn, repeats=repeats, warmup=max(warmup - 1, 0))
    out["peak_mib"] = peak
    out["base_rss_mib"] = base_rss
    out["threads"] = torch.get_num_threads()
    return out


def emit_result(payload: dict) -> None:
    """Worker -> driver: one tagged JSON line on stdout."""
    print(RESULT_TAG + json.dumps(payload), flush=True)


# ----------------------------------------------------------------------------- driver side
@dataclass
class Outcome:
    ok: bool
    data: dict = field(default_factory=dict)
    note: str = ""


def _rss_of(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024 / 1024  # GiB
    except OSError:
        pass
    return 0.0


def run_worker(
    python: str,
    script: str,
    args: list[str],
    time_budget: float,
    mem_budget_gib: float,
) -> Outcome:
    """Run one configuration in a subprocess; kill it past its time or memory budget."""
    env = dict(os.environ)
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    env.setdefault("PYTHONHASHSEED", "0")
    cmd = [python, script, *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    t0 = time.monotonic()
    reason = ""
    peak_seen = 0.0
    while proc.poll() is None:
        time.sleep(0.2)
        rss = _rss_of(proc.pid)
        peak_seen = max(peak_seen, rss)
        if time.monotonic() - t0 > time_budget:
            reason = f"did not finish (>{time_budget:.0f} s)"
        elif rss > mem_budget_gib:
            reason = f"did not finish (RSS >{mem_budget_gib:g} GiB)"
        if reason:
            proc.kill()
            proc.wait()
            break
    stdout, stderr = proc.communicate()
    if reason:
        return Outcome(False, note=reason)
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            data = json.loads(line[len(RESULT_TAG) :])
            if "error" in data:
                return Outcome(False, data, note=data["error"])
            return Outcome(True, data)
    tail = (stderr or stdout).strip().splitlines()
    msg = tail[-1] if tail else f"exit code {proc.returncode}"
    if proc.returncode and proc.returncode < 0:
        msg = f"killed by signal {-proc.returncode}"
    return Outcome(False, note=f"failed: {msg}")


def peer_python(path: str | None) -> str | None:
    path = path or os.environ.get("CURVOPT_PEER_PYTHON", PEER_PYTHON_DEFAULT)
    return path if path and os.path.exists(path) else None


def add_common_args(ap: argparse.ArgumentParser, default_models: str) -> None:
    ap.add_argument("--repeats", type=int, default=10, help="timed (plain, config) pairs")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls before timing")
    ap.add_argument(
        "--models", default=default_models, help="comma list of " + ",".join(MODEL_NAMES)
    )
    ap.add_argument("--rows", default=None, help="comma list of row names (default: all)")
    ap.add_argument("--impls", default=None, help="comma list of columns to run (default: all)")
    ap.add_argument("--quick", action="store_true", help="repeats=3, warmup=1, shorter budgets")
    ap.add_argument("--budget", type=float, default=None, help="seconds per configuration")
    ap.add_argument(
        "--mem-budget-gib", type=float, default=8.0, help="kill a configuration above this RSS"
    )
    ap.add_argument(
        "--peer-python",
        default=None,
        help=f"BackPACK venv interpreter (default {PEER_PYTHON_DEFAULT})",
    )
    ap.add_argument("--json", default=None, help="also write all results to this JSON file")
    ap.add_argument("--seed", type=int, default=0)
    # worker mode (internal; what the driver re-invokes itself with)
    ap.add_argument(
        "--peer", default=None, help="worker mode: run ONE configuration of this implementation"
    )
    ap.add_argument("--model", default=None, help="worker mode: model name")
    ap.add_argument("--row", default=None, help="worker mode: row name")


def fmt_ratio(o: Outcome | None, show_spread: bool = True) -> str:
    if o is None:
        return "—"
    if not o.ok:
        return o.note
    d = o.data
    s = f"{d['ratio']:.2f}"
    if show_spread and d.get("repeats", 0) >= 3:
        s += f" [{d['ratio_q1']:.2f}–{d['ratio_q3']:.2f}]"
    return s


def fmt_mem(o: Outcome | None) -> str:
    if o is None or not o.ok:
        return "—"
    return f"{o.data['peak_mib']:.0f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def environment_line() -> str:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (math.nan,) * 3
    return (
        f"torch {torch.__version__}, {NUM_THREADS} threads, "
        f"OMP_WAIT_POLICY=PASSIVE in workers, {os.cpu_count()} CPUs, "
        f"load average {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f} at start"
    )
