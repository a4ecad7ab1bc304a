"""Read a recipe file, apply command-line overrides, validate it.

Precedence: ``--set`` overrides > the file > the files it ``extends`` > the schema's
defaults.  Everything that can be checked without training is checked here, so a
bad recipe fails before any step: unknown keys, wrong types, unknown choices,
unknown optimizer hyperparameters, and combinations that cannot work.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from curvopt.recipes._extras import need
from curvopt.recipes.builder import LANGUAGE_MODELS, check_buildable, check_optimizer_params
from curvopt.recipes.data import text_files
from curvopt.recipes.schema import RecipeConfig, RecipeError, from_dict

__all__ = ["load", "parse", "read_toml", "parse_override", "apply_overrides"]


def _tomllib() -> Any:
    """The standard library's TOML reader (Python 3.11+), or its backport ``tomli`` before
    (imported on use, so that a missing backport is reported as a missing extra)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # pragma: no cover - Python 3.10
        return need("tomli", "reading TOML recipes on Python 3.10")
    return tomllib


def read_toml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The raw table of a recipe file, with its ``extends`` chain merged in (the file wins).

    ``extends = "other.toml"`` names a recipe (relative to this file) whose tables this one
    starts from; keys are merged table by table, except that a table naming another variant
    (``[optimizer] name = "adam"`` over a base's ``"sgd"``) replaces the base's table whole,
    since the base's options belong to the base's variant.
    """
    path = Path(path).resolve()
    tomllib = _tomllib()
    if path in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path))
        raise RecipeError(f"extends: cycle of recipes {chain}")
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise RecipeError(f"recipe file not found: {path}") from None
    except tomllib.TOMLDecodeError as err:
        raise RecipeError(f"{path}: not valid TOML: {err}") from None
    base = raw.pop("extends", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise RecipeError(f"extends: expected a file name (string), got {base!r}")
    merged = read_toml(path.parent / base, (*_seen, path))
    for key, value in raw.items():
        old = merged.get(key)
        if (isinstance(value, Mapping) and isinstance(old, Mapping)
                and value.get("name", old.get("name")) == old.get("name")):
            value = _merge(old, value)
        merged[key] = value
    return merged


def _merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optimizer.lr=0.05"`` → ``(["optimizer", "lr"], 0.05)``.

    The value is read as a TOML value (``0.05``, ``true``, ``[32, 32]``, ``"cosine"``); a bare
    word that is not TOML is taken as a string (``--set optimizer.name=adam``).
    """
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise RecipeError(f"--set {text!r}: expected KEY=VALUE, e.g. optimizer.lr=0.05")
    parts = key.split(".")
    if len(parts) > 2 or not all(parts):
        raise RecipeError(f"--set {text!r}: the key is 'name' or 'table.key', e.g. train.steps")
    tomllib = _tomllib()
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()
    return parts, parsed


def apply_overrides(
    raw: dict[str, Any], overrides: Iterable[str] | Mapping[str, Any]
) -> dict[str, Any]:
    """``raw`` with ``--set`` style overrides (strings, or a mapping of dotted key to value)."""
    items = (
        [(k.split("."), v) for k, v in overrides.items()]
        if isinstance(overrides, Mapping)
        else [parse_override(o) for o in overrides]
    )
    out = _merge(raw, {})
    for parts, value in items:
        if len(parts) == 1:
            out[parts[0]] = value
            continue
        table = out.get(parts[0], {})
        if not isinstance(table, Mapping):
            raise RecipeError(f"--set {'.'.join(parts)}: {parts[0]!r} is not a table")
        out[parts[0]] = {**table, parts[1]: value}
    return out


def _check(config: RecipeConfig) -> RecipeConfig:
    """Cross-field checks; returns the config with converted optimizer hyperparameters."""
    m, d, t = config.model, config.data, config.train
    if m.kind == "cnn" and d.name != "digits":
        raise RecipeError(
            f"model.kind: 'cnn' needs image data; data.name {d.name!r} is not (valid: 'digits')"
        )
    if (m.kind in LANGUAGE_MODELS) != (d.name == "torch_source"):
        raise RecipeError(
            f"model.kind {m.kind!r} does not fit data.name {d.name!r}: the language models "
            f"({', '.join(LANGUAGE_MODELS)}) go with text (data.name = 'torch_source') and "
            "only they do"
        )
    want = {"digits": "cross_entropy", "regression": "mse", "torch_source": "cross_entropy"}
    if config.loss.name != want[d.name]:
        raise RecipeError(
            f"loss.name: {config.loss.name!r} does not fit data.name {d.name!r}; "
            f"use {want[d.name]!r}"
        )
    n_hidden = len(m.hidden) + (len(m.channels) if m.kind == "cnn" else 0)
    if m.kind in LANGUAGE_MODELS and not isinstance(m.activation, str):
        raise RecipeError(f"model.activation: a {m.kind!r} model takes one name (its MLP's), "
                          f"got {list(m.activation)}")
    if m.kind in LANGUAGE_MODELS and m.d_model % max(m.n_heads, 1):
        raise RecipeError(f"model.n_heads: must divide model.d_model = {m.d_model}, "
                          f"got {m.n_heads}")
    if m.kind not in LANGUAGE_MODELS and not isinstance(m.activation, str) \
            and len(m.activation) != n_hidden:
        raise RecipeError(
            f"model.activation: a list needs one name per hidden layer ({n_hidden}), "
            f"got {len(m.activation)}"
        )
    if m.kind == "cnn" and (m.kernel_size < 1 or m.kernel_size % 2 == 0):
        raise RecipeError(f"model.kernel_size: must be odd and positive, got {m.kernel_size}")
    for key, value in [("model.hidden", m.hidden), ("model.channels", m.channels)]:
        if any(v < 1 for v in value):
            raise RecipeError(f"{key}: widths must be positive, got {list(value)}")
    if t.steps is not None and t.epochs is not None:
        raise RecipeError("train: give train.steps or train.epochs, not both")
    positive = {
        "train.steps": t.steps,
        "train.epochs": t.epochs,
        "train.batch_size": t.batch_size,
        "train.eval_every": t.eval_every,
        "track.every": config.track.every,
        "schedule.step_size": config.schedule.step_size,
        "data.n_samples": d.n_samples,
        "data.n_features": d.n_features,
        "data.n_outputs": d.n_outputs,
        "data.max_bytes": d.max_bytes,
        "data.block_size": d.block_size,
        "data.eval_windows": d.eval_windows,
        "model.d_model": m.d_model,
        "model.n_layers": m.n_layers,
        "model.n_heads": m.n_heads,
        "model.mlp_ratio": m.mlp_ratio,
    }
    for key, value in positive.items():
        if value is not None and value < 1:
            raise RecipeError(f"{key}: must be a positive integer, got {value}")
    if not 0.0 < d.test_fraction < 1.0:
        raise RecipeError(f"data.test_fraction: must lie in (0, 1), got {d.test_fraction}")
    if d.name == "torch_source":
        text_files(d)  # the folders exist and hold enough text (names and sizes only)
    if t.log_every < 0 or config.schedule.warmup_steps < 0:
        raise RecipeError("train.log_every and schedule.warmup_steps must be >= 0")
    if config.optimizer.lr is not None and config.optimizer.lr <= 0:
        raise RecipeError(f"optimizer.lr: must be positive, got {config.optimizer.lr}")
    params = check_optimizer_params(config.optimizer.name, config.optimizer.params)
    if params is None:  # class not available yet: build() reports it
        return config
    config = dataclasses.replace(
        config, optimizer=dataclasses.replace(config.optimizer, params=params)
    )
    check_buildable(config)
    return config


def parse(
    raw: Mapping[str, Any], overrides: Iterable[str] | Mapping[str, Any] = (), name: str = ""
) -> RecipeConfig:
    """Validate a raw recipe table (as read from TOML) with overrides applied.

    Args:
        raw: the recipe's table.
        overrides: ``["optimizer.lr=0.05", ...]`` or ``{"optimizer.lr": 0.05}``.
        name: the recipe's name when the table gives none.

    Raises:
        RecipeError: naming the key at fault and the valid keys or choices.
    """
    raw = apply_overrides(dict(raw), overrides)
    config = from_dict(RecipeConfig, raw)
    if not config.name:
        config = dataclasses.replace(config, name=name or "recipe")
    return _check(config)


def load(path: str | Path, overrides: Iterable[str] | Mapping[str, Any] = ()) -> RecipeConfig:
    """Load and validate the recipe at ``path``.

    Args:
        path: a TOML recipe.
        overrides: command-line style ``["optimizer.lr=0.05"]`` (they win over the file).

    Returns:
        The validated :class:`~curvopt.recipes.schema.RecipeConfig`.

    Raises:
        RecipeError: before any training, for anything wrong in the file or the overrides.
    """
    try:
        return parse(read_toml(path), overrides, name=Path(path).stem)
    except RecipeError as err:
        if str(path) in str(err):
            raise
        raise RecipeError(f"{path}: {err}") from None
