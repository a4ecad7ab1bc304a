"""The training loop of a recipe, and running / comparing recipes into output folders.

The loop is the ordinary one (``zero_grad``, ``loss.backward()``, ``step()``);
curvopt's optimizers hold their hook engine themselves.  Each step appends a
metrics record ``{step, epoch, train_loss, train_acc, test_loss, test_acc, lr,
step_time, train_time}`` (test values at evaluation steps, else ``None``; ``stats``
at tracking steps); step 0 is the evaluation before training.  ``step_time`` is
the seconds of that step (forward, backward, optimizer step, tracked statistics)
and ``train_time`` their running sum: wall-clock training time without the
evaluations, the x-axis of the lower row of plots and of "time to target".

:func:`run` and :func:`compare` write into a folder staged before training
(:class:`~curvopt.recipes.output.RunFolder`): ``metrics.jsonl`` grows by one
flushed line per step, so a run stopped by Ctrl-C keeps what it did.

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
from torch.nn.attention import SDPBackend, sdpa_kernel

from curvopt.recipes._extras import need
from curvopt.recipes.builder import OPTIMIZERS, Built, build, build_loss, build_model
from curvopt.recipes.data import check_data
from curvopt.recipes.output import JsonlWriter, RunFolder, format_table, to_toml, write_marker
from curvopt.recipes.plots import check_plotting, plot_runs
from curvopt.recipes.quantities import collect_fn, extension_for, read, summarize
from curvopt.recipes.schema import RecipeConfig, RecipeError, to_dict

__all__ = [
    "RunResult",
    "Target",
    "train",
    "check_extras",
    "run",
    "compare",
    "steps_to_target",
    "reach",
    "summarize_run",
    "summary_table",
    "SUMMARY_COLUMNS",
]

Echo = Callable[[str], None]
OnRecord = Callable[[dict[str, Any]], None]


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
    ``optimizer.state[p][savefield]``; for the others a tracking step starts with a
    forward and backward pass of its batch inside :func:`curvopt.collect`, outside the
    timed step (the statistics are those of the step's parameters and batch, as the
    optimizer's would be; measured: a collect pass every 10 steps would otherwise nearly
    triple Adam's training time on the digits MLP).
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

    def measure(self, step: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """Before ``step`` (on its batch): the statistics of the optimizers that do not track."""
        self._results = None
        if self.collect is None or not self.due(step):
            return
        self.model.zero_grad(set_to_none=True)
        with self.collect(self.model, self.loss_fn, *self.extensions) as col:
            self.loss_fn(self.model(x), y).backward()
        self.model.zero_grad(set_to_none=True)
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
        loss = float(torch.nn.functional.mse_loss(out, data.y_test) if data.task == "regression"
                     else torch.nn.functional.cross_entropy(out, data.y_test))
        acc = (float((out.argmax(1) == data.y_test).float().mean())
               if data.task == "classification" else None)
    model.train()
    return {"test_loss": loss, "test_acc": acc}


def _step(built: Built, x: torch.Tensor, y: torch.Tensor,
          world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step; returns the model's output and the loss."""
    built.optimizer.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        # create_graph=True (Adahessian) warns of the cycle that zero_grad(set_to_none) breaks
        warnings.filterwarnings("ignore", message=r"Using backward\(\) with create_graph=True")
        # a second derivative through attention needs the math kernel: the fused ones
        # (flash, memory-efficient) have no derivative of their backward
        with (sdpa_kernel(SDPBackend.MATH) if built.create_graph else contextlib.nullcontext()):
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


_PROGRESS = ("tqdm.auto", "the progress bar")


def check_extras(config: RecipeConfig) -> None:
    """Raise :class:`~curvopt.recipes._extras.MissingExtraError` before any training (and
    before any folder is made) if running and writing ``config`` needs a missing package."""
    check_data(config.data)
    need(*_PROGRESS)
    check_plotting()


def _progress_bar(total: int, desc: str, progress: bool | None) -> Any:
    tqdm = need(*_PROGRESS).tqdm
    disable = (not sys.stderr.isatty()) if progress is None else not progress
    return tqdm(total=total, desc=desc, disable=disable, dynamic_ncols=True, leave=True)


def _warm_up(config: RecipeConfig, built: Built) -> None:
    """One untimed forward and backward of a throwaway copy of the recipe's model and loss
    (no optimizer; torch's RNG untouched) and one tiny factorization, so that torch's
    one-time start-up (autograd engine, thread pool, first kernels, loading LAPACK) is
    charged to no run: measured, ``compare`` of the
    digits MLP recipes charged about 2 ms to the first step of whichever ran first (Adam's
    first step 1.8 ms second, 4.0 ms first), about half an Adam run to its target."""
    with torch.random.fork_rng(devices=[]):
        model = build_model(config.model, built.data.in_shape, built.data.out_features)
        loss_fn = build_loss(config)
        _, x, y = next(built.data.batches(config.train.batch_size, torch.Generator()))
        loss_fn(model(x), y).backward()
        # LAPACK is loaded on its first call (about 3 ms): a process start-up cost too
        eye = torch.eye(2, dtype=torch.float64)
        torch.cholesky_inverse(torch.linalg.cholesky(eye))
        torch.linalg.eigh(eye)


def train(
    config: RecipeConfig, progress: bool | None = None, echo: Echo | None = print,
    on_record: OnRecord | None = None,
) -> RunResult:
    """Train the recipe and return its metrics (nothing is written).

    Args:
        config: a validated recipe (:func:`curvopt.recipes.load`).
        progress: show a tqdm bar; ``None``: when stderr is a terminal.
        echo: where lines go when no bar is shown (about ten per run, or every
            ``train.log_every`` steps); ``None`` for silence.
        on_record: called with each metrics record as soon as it is complete (step 0
            first), e.g. to stream it to a file.

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
    records: list[dict[str, Any]] = []

    def append(rec: dict[str, Any]) -> None:
        records.append(rec)
        if on_record is not None:
            on_record(rec)

    _warm_up(config, built)
    append({"step": 0, "epoch": 0.0, "train_loss": None, "train_acc": None, **_evaluate(built),
            "lr": optimizer.param_groups[0]["lr"], "step_time": None, "train_time": 0.0})
    bar = _progress_bar(total, config.name, progress)
    last_acc, diverged, train_time = records[0]["test_acc"], False, 0.0
    started = time.perf_counter()
    try:
        for step in range(1, total + 1):
            epoch, x, y = next(batches)
            if world > 1:
                part = shard(x.shape[0], rank, world)
                x, y = x[part], y[part]
            tracker.measure(step, x, y)
            t0 = time.perf_counter()
            out, loss = _step(built, x, y, world)
            step_time = time.perf_counter() - t0
            train_time += step_time
            lr = optimizer.param_groups[0]["lr"]
            built.scheduler.step()
            train_loss, train_acc = _global_metrics(loss, out, y, mean,
                                                    data.task == "classification", world)
            rec: dict[str, Any] = {
                "step": step, "epoch": round(epoch, 4), "train_loss": train_loss,
                "train_acc": train_acc,
                "test_loss": None, "test_acc": None, "lr": lr, "step_time": step_time,
                "train_time": train_time,
            }
            diverged = not math.isfinite(train_loss)
            if step % config.train.eval_every == 0 or step == total or diverged:
                rec.update(_evaluate(built))
                last_acc = rec["test_acc"]
            if tracker.due(step):
                rec["stats"] = tracker.read()
            append(rec)
            bar.update(1)
            postfix = {"loss": f"{train_loss:.4f}", "ms/step": f"{step_time * 1e3:.1f}"}
            if last_acc is not None:
                postfix["acc"] = f"{last_acc:.3f}"
            bar.set_postfix(postfix, refresh=False)
            if bar.disable and echo is not None and (step % log_every == 0 or step == total):
                acc = f"  test_acc {last_acc:.4f}" if last_acc is not None else ""
                echo(f"[{config.name}] step {step:>5}/{total}  loss {train_loss:.4f}{acc}"
                     f"  {step_time * 1e3:.1f} ms/step  {train_time:.2f} s")
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
SUMMARY_COLUMNS = ["rank", "name", "optimizer", "steps", "final_train_loss", "final_test_loss",
                   "final_test_acc", "best_test_acc", "wall_time_s", "train_time_s",
                   "ms_per_step", "steps_to_target", "time_to_target_s"]
#: The columns of the printed table (``rank`` only when comparing).
TABLE_COLUMNS = [c for c in SUMMARY_COLUMNS if c != "wall_time_s"]

#: Minibatch losses averaged for ``final_train_loss`` and for a ``train_loss`` target.
TRAIN_LOSS_WINDOW = 10


@dataclass(frozen=True)
class Target:
    """A level a run should reach, and whose first reach is reported in steps and seconds.

    Attributes:
        metric: ``"test_acc"`` (reached when ``>= value``), ``"test_loss"`` or
            ``"train_loss"`` (reached when ``<= value``; the training loss is the mean of the
            last :data:`TRAIN_LOSS_WINDOW` minibatch losses, as ``final_train_loss``).
        value: the level.
    """

    metric: str
    value: float

    @property
    def label(self) -> str:
        """E.g. ``"test_acc >= 0.95"``."""
        return f"{self.metric} {'>=' if self.metric == 'test_acc' else '<='} {self.value:g}"


def targets_for(config: RecipeConfig, target_acc: float | None = None,
                target_loss: float | None = None,
                target_train_loss: float | None = None) -> list[Target]:
    """The targets given, or else the recipe's (``train.target_test_acc``, ``target_test_loss``)."""
    given = [Target(m, v) for m, v in [("test_acc", target_acc), ("test_loss", target_loss),
                                       ("train_loss", target_train_loss)] if v is not None]
    if given:
        return given
    t = config.train
    return [Target(m, v) for m, v in [("test_acc", t.target_test_acc),
                                      ("test_loss", t.target_test_loss)] if v is not None]


def reach(records: Sequence[dict[str, Any]], target: Target) -> dict[str, Any] | None:
    """``{"step", "time_s"}`` of the first record reaching ``target`` (``time_s``: its
    ``train_time``), ``None`` if none does.  Test values exist at evaluation steps only."""
    window: list[float] = []
    for rec in records:
        value = rec.get(target.metric)
        if value is None:
            continue
        if target.metric == "train_loss":
            window = [*window[-(TRAIN_LOSS_WINDOW - 1):], value]
            value = sum(window) / len(window)
        if value >= target.value if target.metric == "test_acc" else value <= target.value:
            return {"step": rec["step"], "time_s": rec.get("train_time")}
    return None


def steps_to_target(records: Sequence[dict[str, Any]], target_acc: float | None = None,
                    target_loss: float | None = None) -> int | None:
    """First evaluated step whose test accuracy ≥ ``target_acc`` (else: test loss ≤
    ``target_loss``); ``None`` if never reached or no target."""
    target = (Target("test_acc", target_acc) if target_acc is not None else
              Target("test_loss", target_loss) if target_loss is not None else None)
    reached = reach(records, target) if target is not None else None
    return reached["step"] if reached is not None else None


def summarize_run(config: RecipeConfig, records: Sequence[dict[str, Any]], wall: float,
                  diverged: bool = False, targets: Sequence[Target] | None = None
                  ) -> dict[str, Any]:
    """Final numbers of a run.

    ``final_train_loss`` averages the last ten steps' minibatch losses; the test numbers are
    those of the last evaluation; ``train_time_s`` is the training time without evaluations.
    ``targets`` (default: the recipe's, :func:`targets_for`) are each reported in
    ``targets`` (step and seconds of the first reach); the first is the run's ``target``,
    with ``steps_to_target`` and ``time_to_target_s``.
    """
    trained = [r for r in records if r["train_loss"] is not None]
    evals = [r for r in records if r["test_loss"] is not None]
    tail = [r["train_loss"] for r in trained[-TRAIN_LOSS_WINDOW:]]
    accs = [r["test_acc"] for r in evals if r["test_acc"] is not None]
    targets = targets_for(config) if targets is None else list(targets)
    reached = []
    for target in targets:
        hit = reach(records, target) or {"step": None, "time_s": None}
        reached.append({"target": target.label, "metric": target.metric,
                        "value": target.value, **hit})
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
        "train_time_s": records[-1].get("train_time") if records else None,
        "ms_per_step": 1e3 * sum(step_times) / len(step_times) if step_times else None,
        "target": {targets[0].metric: targets[0].value} if targets else None,
        "steps_to_target": reached[0]["step"] if reached else None,
        "time_to_target_s": reached[0]["time_s"] if reached else None,
        "targets": reached,
        "diverged": diverged,
    }


# --------------------------------------------------------------------------- run, compare
def _write_results(folder: Path, config: RecipeConfig, records: Sequence[dict[str, Any]],
                   summary: dict[str, Any], complete: bool) -> None:
    """``summary.json``, ``curves.png`` and the marker, beside the streamed metrics."""
    (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_runs([(summary["name"], records)], folder / "curves.png",
              title=f"{summary['name']} ({config.optimizer.name})"
                    + ("" if complete else f", stopped at step {records[-1]['step']}"),
              **_plotted_target([summary]))
    write_marker(folder, complete)


def _plotted_target(summaries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``plot_runs``' ``target`` and ``reached`` arguments: the runs' first target, when they
    share it."""
    firsts = [s["targets"][0] if s["targets"] else None for s in summaries]
    if None in firsts or len({f["target"] for f in firsts}) != 1:
        return {}
    return {"target": (firsts[0]["metric"], firsts[0]["value"]),
            "reached": [f if f["step"] is not None else None for f in firsts]}


def _train_into(config: RecipeConfig, folder: Path | None, name: str,
                targets: Sequence[Target] | None, progress: bool | None,
                echo: Echo | None) -> RunResult:
    """Train ``config``, streaming its metrics into ``folder`` (``None``: write nothing).

    ``folder`` gets ``recipe.toml`` first, then ``metrics.jsonl`` line by line, then
    ``summary.json`` and ``curves.png``.  If training stops with an exception (Ctrl-C
    included), the summary and curves of the steps done are written and the exception
    propagates.
    """
    if folder is None:
        result = train(config, progress=progress, echo=echo)
        _retarget(result, targets)
        return result
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "recipe.toml").write_text(to_toml(to_dict(config)))
    metrics, done = JsonlWriter(folder / "metrics.jsonl"), []

    def on_record(rec: dict[str, Any]) -> None:
        done.append(rec)
        metrics.write(rec)

    started = time.perf_counter()
    try:
        result = train(config, progress=progress, echo=echo, on_record=on_record)
    except BaseException as err:
        if done:  # best effort: the streamed metrics are what must survive
            with contextlib.suppress(Exception):
                summary = summarize_run(config, done, time.perf_counter() - started,
                                        targets=targets)
                summary.update(name=name, stopped=type(err).__name__)
                _write_results(folder, config, done, summary, complete=False)
        raise
    finally:
        metrics.close()
    _retarget(result, targets)
    result.summary["name"] = name
    _write_results(folder, config, result.records, result.summary, complete=True)
    return result


def _retarget(result: RunResult, targets: Sequence[Target] | None) -> None:
    if targets is None:
        return
    s = result.summary
    s.update(summarize_run(result.config, result.records, s["wall_time_s"], s["diverged"],
                           targets))


def default_out(names: Sequence[str]) -> Path:
    """``runs/<name>`` for one recipe, ``runs/compare-<a>-<b>...`` for several."""
    return Path("runs") / (names[0] if len(names) == 1 else "compare-" + "-".join(names))[:120]


def run(config: RecipeConfig, out: str | Path | None = None, progress: bool | None = None,
        echo: Echo | None = print) -> tuple[RunResult, Path]:
    """Train a recipe into the folder ``out`` (default ``runs/<name>``): ``metrics.jsonl``
    (streamed while training), ``curves.png``, ``summary.json`` and the resolved
    ``recipe.toml``.

    ``out`` is checked and staged before training (see
    :class:`~curvopt.recipes.output.RunFolder`): a file, or a folder holding files curvopt
    did not write, is refused with :class:`RecipeError`; a previous curvopt run there is
    replaced only when the new one is complete.

    Returns:
        The result and the folder the run ended up in.
    """
    out = Path(out) if out is not None else default_out([config.name])
    if dist_rank_world()[0] != 0:  # under torch.distributed: rank 0 writes
        return _train_into(config, None, config.name, None, progress, echo), out
    check_extras(config)
    with RunFolder(out, config.name) as folder:
        result = _train_into(config, folder.tmp, config.name, None, progress, echo)
    return result, folder.path


def _unique_names(configs: Sequence[RecipeConfig]) -> list[str]:
    names, seen = [], {}
    for cfg in configs:
        seen[cfg.name] = seen.get(cfg.name, 0) + 1
        names.append(cfg.name if seen[cfg.name] == 1 else f"{cfg.name}-{seen[cfg.name]}")
    return names


def _rank(results: Sequence[RunResult]) -> list[RunResult]:
    """``results`` ordered by time to their (common) first target, unreached last; sets each
    summary's ``rank`` (``None``: not reached, or the runs have different targets)."""
    summaries = [r.summary for r in results]
    common = len({json.dumps(s["target"]) for s in summaries}) == 1 and summaries[0]["target"]
    reached = [r for r in results if common and r.summary["time_to_target_s"] is not None]
    reached.sort(key=lambda r: r.summary["time_to_target_s"])
    for s in summaries:
        s["rank"] = None
    for i, r in enumerate(reached):
        r.summary["rank"] = i + 1
    return reached + [r for r in results if r not in reached]


def compare(configs: Sequence[RecipeConfig], out: str | Path | None = None,
            progress: bool | None = None, echo: Echo | None = print,
            target_acc: float | None = None, target_loss: float | None = None,
            target_train_loss: float | None = None) -> tuple[list[RunResult], Path]:
    """Run several recipes into the folder ``out``: one folder per run (as :func:`run`
    writes), ``compare.png`` (curves overlaid, against steps and against training time),
    ``summary.csv`` and ``summary.json`` (rows ranked by time to target).

    Args:
        target_acc, target_loss, target_train_loss: the targets of every run (default:
            each recipe's own ``train.target_test_*``); runs are ranked by the time to the
            first.

    Returns:
        The results (in the order of ``configs``) and the folder they ended up in.
    """
    if not configs:
        raise RecipeError("compare: give at least one recipe")
    names = _unique_names(configs)
    out = Path(out) if out is not None else default_out(names)
    for cfg in configs:
        check_extras(cfg)
    results = []
    with RunFolder(out, "compare") as folder:
        for cfg, name in zip(configs, names, strict=True):
            targets = (targets_for(cfg, target_acc, target_loss, target_train_loss)
                       if (target_acc, target_loss, target_train_loss) != (None,) * 3 else None)
            results.append(_train_into(cfg, folder.tmp / name, name, targets, progress, echo))
        ranked = _rank(results)
        plot_runs([(n, r.records) for n, r in zip(names, results, strict=True)],
                  folder.tmp / "compare.png", title="compare: " + ", ".join(names),
                  **_plotted_target([r.summary for r in results]))
        rows = [r.summary for r in ranked]
        _write_csv(folder.tmp / "summary.csv", rows)
        (folder.tmp / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
    return results, folder.path


def _write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def summary_table(results: Sequence[RunResult]) -> str:
    """The summary rows of ``results`` as an aligned text table (ranked when comparing),
    then one line per target with each run's time and steps to it."""
    compared = len(results) > 1
    if compared:
        results = _rank(results)
    columns = TABLE_COLUMNS if compared else TABLE_COLUMNS[1:]
    lines = [format_table([r.summary for r in results], columns)]
    labels = list(dict.fromkeys(t["target"] for r in results for t in r.summary["targets"]))
    for label in labels:
        cells = []
        for r in results:
            hit = next((t for t in r.summary["targets"] if t["target"] == label), None)
            if hit is None:
                continue
            who = f"{r.summary['name']} " if compared else ""
            cells.append(f"{who}not reached" if hit["step"] is None else
                         f"{who}{hit['time_s']:.3g} s ({hit['step']} steps)")
        lines.append(f"time to {label}: " + ", ".join(cells))
    if compared and results[0].summary["rank"] is not None:
        lines.append(f"ranked by training time to {results[0].summary['targets'][0]['target']}"
                     " (evaluations excluded)")
    return "\n".join(lines)
