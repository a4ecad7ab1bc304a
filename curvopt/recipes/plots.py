"""Training and test curves as a PNG (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from curvopt.recipes._extras import need

__all__ = ["plot_runs", "check_plotting"]

#: The x-axes of the plots' rows: metrics-record key, name, axis label.
_ROWS = [("step", "step", "step"),
         ("train_time", "training time", "training time (s, evaluations excluded)")]


def check_plotting() -> None:
    """Raise :class:`~curvopt.recipes._extras.MissingExtraError` now, before any training,
    if matplotlib is missing."""
    need("matplotlib", "plotting the curves (curves.png)")


def _ema(values: list[float], alpha: float = 0.1) -> list[float]:
    out, avg = [], None
    for v in values:
        avg = v if avg is None else (1 - alpha) * avg + alpha * v
        out.append(avg)
    return out


def _series(records: Sequence[dict[str, Any]], x: str, key: str) -> tuple[list[float], list[float]]:
    pairs = [(r[x], r[key]) for r in records if r.get(key) is not None and r.get(x) is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def plot_runs(runs: Sequence[tuple[str, Sequence[dict[str, Any]]]], path: str | Path,
              title: str = "", target: tuple[str, float] | None = None,
              reached: Sequence[dict[str, Any] | None] | None = None) -> Path:
    """Plot one or several runs' metrics into one PNG and return its path.

    Columns: training loss (per step, light; exponential moving average, solid) with the test
    loss (markers), and test accuracy when the runs have one.  Rows: against the step, and
    against training time (the records' ``train_time``, when they have it), so that a run
    with fewer but dearer steps shows where it really arrives.  Runs share colours across
    panels; a target (``("test_acc", 0.95)``, ``("test_loss", x)`` or ``("train_loss", x)``)
    is drawn as a dotted line in its panel, and a star marks where each run first reached it.

    Args:
        runs: ``(label, metrics records)`` pairs, records as written to ``metrics.jsonl``.
        path: where to write the PNG.
        title: the figure's title.
        target: a level to mark.
        reached: per run, ``{"step", "time_s"}`` of its first reach of ``target`` (or ``None``).
    """
    matplotlib = need("matplotlib", "plotting the curves (curves.png)")
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    has_acc = any(r.get("test_acc") is not None for _, recs in runs for r in recs)
    rows = [row for row in _ROWS
            if any(r.get(row[0]) is not None for _, recs in runs for r in recs)]
    ncols = 2 if has_acc else 1
    fig, axes = plt.subplots(len(rows), ncols, figsize=(5.5 * ncols + 0.5, 3.6 * len(rows)),
                             squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    smooth: list[float] = []  # the solid lines; single minibatch losses may lie far below
    for (x, name, xlabel), (loss_ax, *acc_ax) in zip(rows, axes, strict=True):
        for i, (label, records) in enumerate(runs):
            color = colors[i % len(colors)]
            xs, train = _series(records, x, "train_loss")
            if xs:
                loss_ax.plot(xs, train, color=color, alpha=0.2, linewidth=0.8)
                ema = _ema(train)
                loss_ax.plot(xs, ema, color=color, label=f"{label} train")
                smooth += ema
            xs, test = _series(records, x, "test_loss")
            smooth += test
            loss_ax.plot(xs, test, color=color, linestyle="--", marker="o", markersize=3,
                         label=f"{label} test")
            if acc_ax:
                xs, acc = _series(records, x, "test_acc")
                acc_ax[0].plot(xs, acc, color=color, marker="o", markersize=3, label=label)
        loss_ax.set(xlabel=xlabel, ylabel="loss", title=f"loss against {name}")
        if acc_ax:
            acc_ax[0].set(xlabel=xlabel, ylabel="test accuracy",
                          title=f"test accuracy against {name}")
        if target is not None:
            metric, value = target
            ax = acc_ax[0] if metric == "test_acc" and acc_ax else loss_ax
            ax.axhline(value, color="0.4", linestyle=":", linewidth=1,
                       label=f"target {metric} {value:g}")
            for i, hit in enumerate(reached or ()):
                at = None if hit is None else hit["step" if x == "step" else "time_s"]
                if at is not None:
                    ax.plot([at], [value], marker="*", markersize=11, linestyle="none",
                            color=colors[i % len(colors)], markeredgecolor="k", zorder=5)
        for ax in (loss_ax, *acc_ax):
            if x == "step":  # one legend per column; the lower row shares its colours
                ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
    finite = [v for v in smooth if math.isfinite(v)]
    if finite and min(finite) > 0:
        for loss_ax in axes[:, 0]:
            loss_ax.set_yscale("log")
            loss_ax.set_ylim(bottom=min(finite) / 2)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
