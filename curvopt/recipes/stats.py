"""Per-layer statistics of the ten quantities at one step of a recipe (``curvopt stats``)."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import Any

import torch

from curvopt.recipes.builder import build, build_loss, build_model
from curvopt.recipes.output import format_table
from curvopt.recipes.quantities import collect_fn, describe, extension_for, read
from curvopt.recipes.runner import Echo, train
from curvopt.recipes.schema import SAVEFIELDS, RecipeConfig, RecipeError, TrackConfig

__all__ = ["layer_stats", "STATS_COLUMNS", "format_stats"]

STATS_COLUMNS = ["param", "quantity", "part", "shape", "norm", "trace", "min", "max", "cond"]


def layer_stats(config: RecipeConfig, step: int, quantities: Sequence[str] = SAVEFIELDS,
                progress: bool | None = False,
                echo: Echo | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Train ``step`` steps of the recipe, then compute each quantity on the next batch.

    Each quantity is computed in its own :func:`curvopt.collect` pass on a fresh copy of the
    trained model (no optimizer hooks), so one the model does not support is reported in its
    rows' ``error`` and the others still come.

    Args:
        config: a validated recipe.
        step: number of training steps before the statistics (0: at initialisation).
        quantities: savefields to compute (default: all ten).

    Returns:
        ``(rows, info)``: rows as :func:`curvopt.recipes.quantities.describe` gives them plus
        ``param`` and ``quantity`` (and ``error``); info has ``step``, ``batch_size``, ``loss``.
    """
    unknown = [q for q in quantities if q not in SAVEFIELDS]
    if unknown:
        raise RecipeError(
            f"--quantities: unknown {', '.join(map(repr, unknown))}; valid choices: "
            + ", ".join(SAVEFIELDS)
        )
    if step < 0:
        raise RecipeError(f"--step: must be >= 0, got {step}")
    collect = collect_fn()
    trained = dataclasses.replace(
        config,
        train=dataclasses.replace(config.train, steps=step, epochs=None,
                                  eval_every=max(step, 1)),
        track=TrackConfig(),
    )
    if step > 0:
        built = train(trained, progress=progress, echo=echo).built
    else:
        built = build(trained)
    data = built.data
    batches = data.batches(config.train.batch_size,
                           torch.Generator().manual_seed(config.train.seed))
    _, x, y = next(itertools.islice(batches, step, None))

    model = build_model(config.model, data.in_shape, data.out_features)
    model.load_state_dict(built.model.state_dict())
    loss_fn = build_loss(config)
    rows: list[dict[str, Any]] = []
    loss_value = None
    for q in quantities:
        model.zero_grad(set_to_none=True)
        try:
            with collect(model, loss_fn, extension_for(q)) as col:
                loss = loss_fn(model(x), y)
                loss.backward()
            loss_value = float(loss.detach())
            values = read(model, q, col.results)
        except Exception as err:  # one quantity failing must not hide the others
            rows.append({"param": "*", "quantity": q, "error": f"{type(err).__name__}: {err}"})
            continue
        for name, value in values.items():
            rows.extend({"param": name, "quantity": q, **r} for r in describe(q, value))
        for p in model.parameters():  # do not carry one pass's attributes into the next
            if hasattr(p, q):
                delattr(p, q)
    order = {name: i for i, (name, _) in enumerate(model.named_parameters())}
    rank = {q: i for i, q in enumerate(quantities)}
    rows.sort(key=lambda r: (order.get(r["param"], -1), rank[r["quantity"]]))  # per layer
    return rows, {"step": step, "batch_size": int(x.shape[0]), "loss": loss_value}


def format_stats(config: RecipeConfig, rows: Sequence[dict[str, Any]], info: dict[str, Any]) -> str:
    """The text ``curvopt stats`` prints: a header, the table, then any errors."""
    loss = f", loss {info['loss']:.4g}" if info["loss"] is not None else ""
    header = (f"{config.name}: per-layer statistics at step {info['step']} "
              f"(batch of {info['batch_size']}{loss}, optimizer {config.optimizer.name})")
    ok = [r for r in rows if "error" not in r]
    lines = [header, format_table(ok, STATS_COLUMNS)]
    lines += [f"{r['quantity']}: not computed: {r['error']}" for r in rows if "error" in r]
    lines.append("norm: Frobenius; trace: sum of a diagonal quantity, trace of a Kronecker "
                 "factor (G: output side, A: input side); cond: largest/smallest eigenvalue "
                 "(factors) or entry (non-negative diagonals); grad_batch: per-sample norms.")
    return "\n".join(lines)
