"""Training and test curves as a PNG (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["plot_runs"]


def _ema(values: list[float], alpha: float = 0.1) -> list[float]:
    out, avg = [], None
    for v in values:
        avg = v if avg is None else (1 - alpha) * avg + alpha * v
        out.append(avg)
    return out


def _series(records: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def plot_runs(runs: Sequence[tuple[str, Sequence[dict[str, Any]]]], path: str | Path,
              title: str = "") -> Path:
    """Plot one or several runs' metrics into one PNG and return its path.

    Panels: training loss (per step, light; exponential moving average, solid) with the test
    loss (markers), and test accuracy when the runs have one.  Runs share colours across
    panels.

    Args:
        runs: ``(label, metrics records)`` pairs, records as written to ``metrics.jsonl``.
        path: where to write the PNG.
        title: the figure's title.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    has_acc = any(r.get("test_acc") is not None for _, recs in runs for r in recs)
    fig, axes = plt.subplots(1, 2 if has_acc else 1, figsize=(11 if has_acc else 6, 4),
                             squeeze=False)
    loss_ax = axes[0][0]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    smooth: list[float] = []  # the solid lines; single minibatch losses may lie far below
    for i, (label, records) in enumerate(runs):
        color = colors[i % len(colors)]
        steps, train = _series(records, "train_loss")
        if steps:
            loss_ax.plot(steps, train, color=color, alpha=0.2, linewidth=0.8)
            ema = _ema(train)
            loss_ax.plot(steps, ema, color=color, label=f"{label} train")
            smooth += ema
        steps, test = _series(records, "test_loss")
        smooth += test
        loss_ax.plot(steps, test, color=color, linestyle="--", marker="o", markersize=3,
                     label=f"{label} test")
        if has_acc:
            steps, acc = _series(records, "test_acc")
            axes[0][1].plot(steps, acc, color=color, marker="o", markersize=3, label=label)
    loss_ax.set(xlabel="step", ylabel="loss", title="loss")
    finite = [v for v in smooth if math.isfinite(v)]
    if finite and min(finite) > 0:
        loss_ax.set_yscale("log")
        loss_ax.set_ylim(bottom=min(finite) / 2)
    loss_ax.legend(fontsize=8)
    loss_ax.grid(alpha=0.3)
    if has_acc:
        axes[0][1].set(xlabel="step", ylabel="accuracy", title="test accuracy")
        axes[0][1].legend(fontsize=8)
        axes[0][1].grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
