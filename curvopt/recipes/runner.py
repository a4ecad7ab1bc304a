"""The training loop of a recipe, and running / comparing recipes into output folders.

The loop is the ordinary one (``zero_grad``, ``loss.backward()``, ``step()``);
curvopt's optimizers hold their hook engine themselves.  Each step appends a
metrics record ``{step, epoch, train_loss, train_acc, test_loss, test_acc, lr,
step_time}`` (test values at evaluation steps, else ``None``; ``stats`` at
tracking steps); step 0 is the evaluation before training.

Under ``torch.distributed`` (``curvopt run --nproc N``, or ``torchrun``) every rank
draws the same global batches and trains on its own contiguous shard of each
(sizes differ by at most one), so the global batch is the single-process one.
curvopt's optimizers average the gradients themselves; for the others the loop
averages them (weighted by shard size).  The recorded training loss and accuracy
are those of the global batch; rank 0 writes the output folder.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from curvopt.recipes.builder import OPTIMIZERS, Built, build
from curvopt.recipes.output import atomic_dir, format_table, to_toml, write_jsonl
from curvopt.recipes.plots import plot_runs
from curvopt.recipes.quantities import collect_fn, extension_for, read, summarize
from curvopt.recipes.schema import RecipeConfig, RecipeError, to_dict

__all__ = [
    "RunResult",
    "train",
    "run",
    "compare",
    "steps_to_target",
    "summarize_run",
    "summary_table",
    "SUMMARY_COLUMNS",
]

Echo = Callable[[str], None]


@dataclass
class RunResult:
    """A finished run.

    Attributes:
        config: the recipe it ran.
        records: the metrics, one dict per step (see the module docstring).
        summary: final numbers (see :func:`summarize_run`).
        warnings: things worth telling (e.g. a tracked quantity the optimizer did not expose).
        built: model, loss, optimizer and data as they are after training.
    """

    config: RecipeConfig
    records: list[dict[str, Any]]
    summary: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    built: Built | None = None


# ------------------------------------------------------------------------------ tracking
class _Tracker:
    """Records ``[track] quantities`` every ``track.every`` steps.

    curvopt's optimizers were given ``track=`` and keep the quantities in
    ``optimizer.state[p][savefield]``; for the others the backward pass of a tracking step
    runs inside :func:`curvopt.collect`.
    """

    def __init__(self, built: Built):
        cfg = built.config
        self.names = cfg.track.quantities
        self.every = cfg.track.every
        self.model, self.loss_fn, self.optimizer = built.model, built.loss_fn, built.optimizer
        self.by_optimizer = OPTIMIZERS[cfg.optimizer.name].takes_model
        self.collect = None
        self.missing: set[str] = set()
        if self.names and not self.by_optimizer:
            self.collect = collect_fn()
            self.extensions = [extension_for(n) for n in self.names]
        self._results: dict[str, Any] | None = None

    def due(self, step: int) -> bool:
        return bool(self.names) and step % self.every == 0

    @contextlib.contextmanager
    def backward(self, step: int):
        """Context around forward and backward of ``step``."""
        self._results = None
        if self.collect is None or not self.due(step):
            yield
            return
        with self.collect(self.model, self.loss_fn, *self.extensions) as col:
            yield
        self._results = col.results

    def read(self) -> dict[str, float | None]:
        """The summaries of the tracked quantities (after the step)."""
        results = self._results
        if self.by_optimizer:
            state = self.optimizer.state
            results = {n: state[p] for n, p in self.model.named_parameters() if p in state}
        out = {}
        for name in self.names:
            value = summarize(name, read(self.model, name, results))
            if value is None:
                self.missing.add(name)
            out[name] = value
        return out


# --------------------------------------------------------------------------- distributed
def dist_rank_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialized process group, ``(0, 1)`` without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(n: int, rank: int, world: int) -> slice:
    """Rank ``rank``'s contiguous part of ``n`` samples (the first ``n % world`` get one more)."""
    sizes = [n // world + (1 if r < n % world else 0) for r in range(world)]
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _global_metrics(loss: torch.Tensor, out: torch.Tensor, y: torch.Tensor, mean: bool,
                    classification: bool, world: int) -> tuple[float, float | None]:
    """Training loss and accuracy of the global batch from the rank-local ones."""
    local = float(loss.detach())
    if world == 1:
        return local, (float((out.detach().argmax(1) == y).float().mean())
                       if classification else None)
    n = y.shape[0]
    correct = float((out.detach().argmax(1) == y).sum()) if classification else 0.0
    import torch.distributed as dist

    t = torch.tensor([local * n if mean else local, correct, float(n)], dtype=torch.float64)
    dist.all_reduce(t)
    total, correct, n_global = (float(v) for v in t)
    return (total / n_global if mean else total), (correct / n_global if classification
                                                    else None)


# ---------------------------------------------------------------------------------- loop
def _evaluate(built: Built) -> dict[str, float | None]:
    model, data = built.model, built.data
    model.eval()
    with torch.no_grad():
        out = model(data.x_test)
        loss = float(torch.nn.functional.cross_entropy(out, data.y_test)
                     if data.task == "classification"
                     else torch.nn.functional.mse_loss(out, data.y_test))
        acc = (float((out.argmax(1) == data.y_test).float().mean())
               if data.task == "classification" else None)
    model.train()
    return {"test_loss": loss, "test_acc": acc}


def _step(built: Built, tracker: _Tracker, step: int, x: torch.Tensor,
          y: torch.Tensor, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step; returns the model's output and the loss."""
    built.optimizer.zero_grad(set_to_none=True)
    with tracker.backward(step), warnings.catch_warnings():
        # create_graph=True (Adahessian) warns of the cycle that zero_grad(set_to_none) breaks
        warnings.filterwarnings("ignore", message=r"Using backward\(\) with create_graph=True")
        out = built.model(x)
        loss = built.loss_fn(out, y)
        loss.backward(create_graph=built.create_graph)
    if world > 1 and not OPTIMIZERS[built.config.optimizer.name].takes_model:
        from curvopt.optim._distributed import average_gradients

        grads = [p.grad for p in built.model.parameters() if p.grad is not None]
        average_gradients(grads, x.shape[0], built.loss_fn.reduction != "sum", False)
    built.optimizer.step()
    return out, loss


def check_distributable(config: RecipeConfig) -> None:
    """Raise :class:`RecipeError` if the recipe cannot run on several processes."""
    if OPTIMIZERS[config.optimizer.name].create_graph:
        raise RecipeError(
            f"optimizer: {config.optimizer.name!r} needs backward(create_graph=True), which "
            "curvopt does not run under torch.distributed; use one process"
        )


def _progress_bar(total: int, desc: str, progress: bool | None) -> Any:
    from tqdm.auto import tqdm

    disable = (not sys.stderr.isatty()) if progress is None else not progress
    return tqdm(total=total, desc=desc, disable=disable, dynamic_ncols=True, leave=True)


def train(
    config: RecipeConfig, progress: bool | None = None, echo: Echo | None = print
) -> RunResult:
    """Train the recipe and return its metrics (nothing is written).

    Args:
        config: a validated recipe (:func:`curvopt.recipes.load`).
        progress: show a tqdm bar; ``None``: when stderr is a terminal.
        echo: where lines go when no bar is shown (about ten per run, or every
            ``train.log_every`` steps); ``None`` for silence.

    The test loss is the mean loss over the test set whatever ``loss.reduction`` is.
    A non-finite training loss ends the run early (``summary["diverged"]``).
    """
    rank, world = dist_rank_world()
    if world > 1:
        check_distributable(config)
    if rank != 0:
        echo, progress = None, False
    built = build(config)
    tracker = _Tracker(built)
    optimizer, data = built.optimizer, built.data
    mean = getattr(built.loss_fn, "reduction", "mean") != "sum"
    total = built.total_steps
    batches = data.batches(config.train.batch_size,
                           torch.Generator().manual_seed(config.train.seed))
    log_every = config.train.log_every or max(1, total // 10)
    records: list[dict[str, Any]] = [{
        "step": 0, "epoch": 0.0, "train_loss": None, "train_acc": None, **_evaluate(built),
        "lr": optimizer.param_groups[0]["lr"], "step_time": None,
    }]
    bar = _progress_bar(total, config.name, progress)
    last_acc, diverged = records[0]["test_acc"], False
    started = time.perf_counter()
    try:
        for step in range(1, total + 1):
            epoch, x, y = next(batches)
            if world > 1:
                part = shard(x.shape[0], rank, world)
                x, y = x[part], y[part]
            t0 = time.perf_counter()
            out, loss = _step(built, tracker, step, x, y, world)
            step_time = time.perf_counter() - t0
            lr = optimizer.param_groups[0]["lr"]
            built.scheduler.step()
            train_loss, train_acc = _global_metrics(loss, out, y, mean,
                                                    data.task == "classification", world)
            rec: dict[str, Any] = {
                "step": step, "epoch": round(epoch, 4), "train_loss": train_loss,
                "train_acc": train_acc,
                "test_loss": None, "test_acc": None, "lr": lr, "step_time": step_time,
            }
            diverged = not math.isfinite(train_loss)
            if step % config.train.eval_every == 0 or step == total or diverged:
                rec.update(_evaluate(built))
                last_acc = rec["test_acc"]
            if tracker.due(step):
                rec["stats"] = tracker.read()
            records.append(rec)
            bar.update(1)
            postfix = {"loss": f"{train_loss:.4f}", "ms/step": f"{step_time * 1e3:.1f}"}
            if last_acc is not None:
                postfix["acc"] = f"{last_acc:.3f}"
            bar.set_postfix(postfix, refresh=False)
            if bar.disable and echo is not None and (step % log_every == 0 or step == total):
                acc = f"  test_acc {last_acc:.4f}" if last_acc is not None else ""
                echo(f"[{config.name}] step {step:>5}/{total}  loss {train_loss:.4f}{acc}"
                     f"  {step_time * 1e3:.1f} ms/step")
            if diverged:
                if echo is not None:
                    echo(f"[{config.name}] training loss is {train_loss} at step {step}: stopped")
                break
    finally:
        bar.close()
        if built.create_graph:  # break the parameter <-> grad reference cycle
            optimizer.zero_grad(set_to_none=True)
    wall = time.perf_counter() - started
    notes = [
        f"optimizer {config.optimizer.name!r} did not expose tracked quantity {n!r}"
        for n in sorted(tracker.missing)
    ]
    summary = summarize_run(config, records, wall, diverged)
    return RunResult(config, records, summary, notes, built)


# ------------------------------------------------------------------------------- summary
SUMMARY_COLUMNS = ["name", "optimizer", "steps", "final_train_loss", "final_test_loss",
                   "final_test_acc", "best_test_acc", "wall_time_s", "ms_per_step",
                   "steps_to_target"]


def steps_to_target(records: Sequence[dict[str, Any]], target_acc: float | None = None,
                    target_loss: float | None = None) -> int | None:
    """First evaluated step whose test accuracy ≥ ``target_acc`` (else: test loss ≤
    ``target_loss``); ``None`` if never reached or no target."""
    for rec in records:
        if target_acc is not None and rec.get("test_acc") is not None:
            if rec["test_acc"] >= target_acc:
                return rec["step"]
        elif target_acc is None and target_loss is not None and rec.get("test_loss") is not None:
            if rec["test_loss"] <= target_loss:
                return rec["step"]
    return None


def summarize_run(config: RecipeConfig, records: Sequence[dict[str, Any]], wall: float,
                  diverged: bool = False, target_acc: float | None = None,
                  target_loss: float | None = None) -> dict[str, Any]:
    """Final numbers of a run.

    ``final_train_loss`` averages the last ten steps' minibatch losses; the test numbers are
    those of the last evaluation; the target is ``target_*`` or else the recipe's
    ``train.target_test_*``.
    """
    trained = [r for r in records if r["train_loss"] is not None]
    evals = [r for r in records if r["test_loss"] is not None]
    tail = [r["train_loss"] for r in trained[-10:]]
    accs = [r["test_acc"] for r in evals if r["test_acc"] is not None]
    if target_acc is None and target_loss is None:
        target_acc, target_loss = config.train.target_test_acc, config.train.target_test_loss
    step_times = [r["step_time"] for r in trained]
    return {
        "name": config.name,
        "optimizer": config.optimizer.name,
        "steps": len(trained),
        "final_train_loss": sum(tail) / len(tail) if tail else None,
        "final_test_loss": evals[-1]["test_loss"] if evals else None,
        "final_test_acc": evals[-1]["test_acc"] if evals else None,
        "best_test_acc": max(accs) if accs else None,
        "wall_time_s": wall,
        "ms_per_step": 1e3 * sum(step_times) / len(step_times) if step_times else None,
        "target": ({"test_acc": target_acc} if target_acc is not None
                   else {"test_loss": target_loss} if target_loss is not None else None),
        "steps_to_target": steps_to_target(records, target_acc, target_loss),
        "diverged": diverged,
    }


def _retarget(result: RunResult, target_acc: float | None, target_loss: float | None) -> None:
    if target_acc is None and target_loss is None:
        return
    s = result.summary
    s.update(summarize_run(result.config, result.records, s["wall_time_s"], s["diverged"],
                           target_acc, target_loss))


# --------------------------------------------------------------------------- run, compare
def _write_run(result: RunResult, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / "metrics.jsonl", result.records)
    (folder / "recipe.toml").write_text(to_toml(to_dict(result.config)))
    (folder / "summary.json").write_text(json.dumps(result.summary, indent=2) + "\n")
    plot_runs([(result.config.name, result.records)], folder / "curves.png",
              title=f"{result.config.name} ({result.config.optimizer.name})")


def default_out(names: Sequence[str]) -> Path:
    """``runs/<name>`` for one recipe, ``runs/compare-<a>-<b>...`` for several."""
    return Path("runs") / (names[0] if len(names) == 1 else "compare-" + "-".join(names))[:120]


def run(config: RecipeConfig, out: str | Path | None = None, progress: bool | None = None,
        echo: Echo | None = print) -> tuple[RunResult, Path]:
    """Train a recipe and write ``metrics.jsonl``, ``curves.png``, ``summary.json`` and the
    resolved ``recipe.toml`` into ``out`` (default ``runs/<name>``), atomically.

    Returns:
        The result and the output folder.
    """
    out = Path(out) if out is not None else default_out([config.name])
    result = train(config, progress=progress, echo=echo)
    if dist_rank_world()[0] == 0:  # under torch.distributed: rank 0 writes
        with atomic_dir(out) as tmp:
            _write_run(result, tmp)
    return result, out


def _unique_names(configs: Sequence[RecipeConfig]) -> list[str]:
    names, seen = [], {}
    for cfg in configs:
        seen[cfg.name] = seen.get(cfg.name, 0) + 1
        names.append(cfg.name if seen[cfg.name] == 1 else f"{cfg.name}-{seen[cfg.name]}")
    return names


def compare(configs: Sequence[RecipeConfig], out: str | Path | None = None,
            progress: bool | None = None, echo: Echo | None = print,
            target_acc: float | None = None,
            target_loss: float | None = None) -> tuple[list[RunResult], Path]:
    """Run several recipes; write each run's folder plus ``compare.png`` (curves overlaid),
    ``summary.csv`` and ``summary.json`` into ``out``, atomically.

    Args:
        target_acc, target_loss: the target of "steps to target" for every run (default:
            each recipe's own ``train.target_test_*``).
    """
    if not configs:
        raise RecipeError("compare: give at least one recipe")
    names = _unique_names(configs)
    out = Path(out) if out is not None else default_out(names)
    results = []
    for cfg, name in zip(configs, names, strict=True):
        result = train(cfg, progress=progress, echo=echo)
        _retarget(result, target_acc, target_loss)
        result.summary["name"] = name
        results.append(result)
    with atomic_dir(out) as tmp:
        for name, result in zip(names, results, strict=True):
            _write_run(result, tmp / name)
        curves = [(n, r.records) for n, r in zip(names, results, strict=True)]
        plot_runs(curves, tmp / "compare.png", title="compare: " + ", ".join(names))
        rows = [r.summary for r in results]
        _write_csv(tmp / "summary.csv", rows)
        (tmp / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
    return results, out


def _write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def summary_table(results: Sequence[RunResult]) -> str:
    """The summary rows of ``results`` as an aligned text table."""
    rows = []
    for result in results:
        row, target = dict(result.summary), result.summary["target"]
        if target is not None:
            (key, value), = target.items()
            reached = row["steps_to_target"]
            op = ">=" if key == "test_acc" else "<="
            row["steps_to_target"] = (
                f"{reached if reached is not None else 'not reached'} ({key} {op} {value:g})"
            )
        rows.append(row)
    return format_table(rows, SUMMARY_COLUMNS)
