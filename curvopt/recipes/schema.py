"""The recipe schema: one frozen dataclass per TOML table.

A recipe is a TOML file whose tables map one to one onto the dataclasses
below (``[model]`` → :class:`ModelConfig`, ``[optimizer]`` →
:class:`OptimizerConfig`, ...).  Every field has a default, a type and a
docstring; :func:`curvopt.recipes.load` checks a file against them and
rejects an unknown key, a wrong type or an unknown choice with one
:class:`RecipeError` that names the key and the valid keys or choices.

Precedence: command-line ``--set table.key=value`` > the file (and the files
it ``extends``) > the defaults written here.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from curvopt.errors import CurvoptError
from curvopt.quantities import PUBLIC

__all__ = [
    "RecipeError",
    "ModelConfig",
    "DataConfig",
    "LossConfig",
    "OptimizerConfig",
    "ScheduleConfig",
    "TrainConfig",
    "TrackConfig",
    "RecipeConfig",
    "SAVEFIELDS",
    "convert",
    "from_dict",
    "to_dict",
    "did_you_mean",
]


class RecipeError(CurvoptError, ValueError):
    """A recipe is invalid: the message names the key and the valid keys or choices."""


Activation = Literal["relu", "tanh", "sigmoid", "elu", "leaky_relu", "softplus", "gelu", "identity"]

#: The quantities of :mod:`curvopt.extensions`, by the attribute they are stored under
#: (read off the quantity registry: a new quantity is valid in recipes at once).
Savefield = Literal[tuple(q.savefield for q in PUBLIC)]
SAVEFIELDS: tuple[str, ...] = typing.get_args(Savefield)


@dataclass(frozen=True)
class ModelConfig:
    """``[model]``: a small declarative network.

    ``mlp``: ``Flatten → [Linear(h) → act] for h in hidden → Linear(out)``.
    ``cnn``: ``[Conv2d(c, kernel_size, same padding) → act] for c in channels →
    pool(2) → Flatten → [Linear(h) → act] for h in hidden → Linear(out)``.
    ``gpt``: a GPT-style causal language model from ``torch.nn``: token embedding plus
    learned position embedding, ``n_layers`` pre-LN blocks
    ``x + MultiheadAttention(LN(x))`` (causal mask), ``x + MLP(LN(x))`` with
    ``MLP = Linear(d_model, mlp_ratio·d_model) → act → Linear``, a final LayerNorm and a
    Linear head; it returns logits ``[N, V, T]`` for ids ``[N, T]`` (the layout of
    ``CrossEntropyLoss`` with targets ``[N, T]``).  ``hf_gpt2``: the same sizes as a
    Hugging Face ``GPT2LMHeadModel`` built from a config (needs ``transformers``; nothing
    downloaded).  Input and output sizes come from the data.
    """

    kind: Literal["mlp", "cnn", "gpt", "hf_gpt2"] = "mlp"
    """Network family: ``"mlp"`` (fully connected), ``"cnn"`` (needs image data), ``"gpt"``
    or ``"hf_gpt2"`` (language models, need text data)."""

    hidden: tuple[int, ...] = (64,)
    """Widths of the hidden fully connected layers (an empty list: a linear model / conv head)."""

    channels: tuple[int, ...] = (8,)
    """Output channels of the convolutions (``cnn`` only)."""

    kernel_size: int = 3
    """Side of the square convolution kernels, odd (``cnn`` only)."""

    pool: Literal["max", "avg", "none"] = "max"
    """2×2 pooling after the convolutions (``cnn`` only)."""

    activation: Activation | tuple[Activation, ...] = "relu"
    """Activation after every hidden layer: one name, or a list with one name per hidden
    layer (convolutions first, then the fully connected ones); ``gpt``, ``hf_gpt2``: one
    name, the blocks' MLP activation."""

    bias: bool = True
    """Whether the layers have a bias."""

    d_model: int = 64
    """Width of the embeddings and of the residual stream (``gpt``, ``hf_gpt2``)."""

    n_layers: int = 2
    """Number of transformer blocks (``gpt``, ``hf_gpt2``)."""

    n_heads: int = 4
    """Attention heads per block; must divide ``d_model`` (``gpt``, ``hf_gpt2``)."""

    mlp_ratio: int = 4
    """Hidden width of each block's MLP as a multiple of ``d_model`` (``gpt``, ``hf_gpt2``)."""


@dataclass(frozen=True)
class DataConfig:
    """``[data]``: what to train on; all of it is local, nothing is downloaded."""

    name: Literal["digits", "regression", "torch_source"] = "digits"
    """``"digits"``: scikit-learn's bundled 8×8 digits (1797 samples, 10 classes, pixels scaled
    to [0, 1]; a ``cnn`` model gets them as 1×8×8 images). ``"regression"``: a synthetic
    regression problem drawn from ``split_seed`` (a random teacher network plus noise).
    ``"torch_source"``: character-level text, the Python source files of the installed
    ``torch`` package under ``source_dirs``, split by file into train and validation; inputs
    are windows of ``block_size`` byte ids (ASCII 0-127, any other byte 128), targets the
    same windows shifted by one."""

    test_fraction: float = 0.25
    """Share of the samples held out as the test set (``torch_source``: share of the bytes,
    in whole files)."""

    split_seed: int = 0
    """Seed of the train/test split and of the synthetic data; kept apart from ``train.seed`` so
    runs with different training seeds share one test set."""

    source_dirs: tuple[str, ...] = ("optim",)
    """Folders inside the installed ``torch`` package whose ``.py`` files (recursively, in
    sorted order) are the text (``torch_source`` only)."""

    max_bytes: int = 600_000
    """Read files in sorted order while their total stays within this many bytes
    (``torch_source`` only)."""

    block_size: int = 64
    """Characters per window, the model's context ``T`` (``torch_source`` only)."""

    eval_windows: int = 64
    """Validation windows, evenly spaced over the validation files (``torch_source`` only)."""

    n_samples: int = 1024
    """Number of samples (``regression`` only)."""

    n_features: int = 16
    """Input dimension (``regression`` only)."""

    n_outputs: int = 1
    """Output dimension (``regression`` only)."""

    noise: float = 0.1
    """Standard deviation of the Gaussian noise added to the targets (``regression`` only)."""


@dataclass(frozen=True)
class LossConfig:
    """``[loss]``: the training objective."""

    name: Literal["cross_entropy", "mse"] = "cross_entropy"
    """``"cross_entropy"`` (classification data and text) or ``"mse"`` (regression data)."""

    reduction: Literal["mean", "sum"] = "mean"
    """How the per-sample losses are reduced."""


@dataclass(frozen=True)
class OptimizerConfig:
    """``[optimizer]``: which optimizer, and its hyperparameters.

    Every key of the table other than ``name`` and ``lr`` is passed to the optimizer's
    constructor as a keyword argument; they are checked against its signature, so a typo
    names the valid keys.
    """

    __extra__ = "params"  # where the table's other keys go (see from_dict)

    name: str = "sgd"
    """One of :data:`curvopt.recipes.builder.OPTIMIZERS`: ``sgd``, ``adam``, ``adamw``,
    ``adahessian`` (torch-optimizer), ``kfac``, ``diag_ggn_adam``, ``variance_adaptive_sgd``."""

    lr: float | None = None
    """Learning rate; leave unset for the optimizer's own default."""

    params: dict[str, Any] = field(default_factory=dict)
    """The other keyword arguments of the constructor (filled from the table's other keys)."""


@dataclass(frozen=True)
class ScheduleConfig:
    """``[schedule]``: the learning-rate schedule, a factor on ``optimizer.lr`` per step."""

    name: Literal["constant", "cosine", "linear", "step", "exponential"] = "constant"
    """``constant``; ``cosine`` and ``linear`` decay to ``min_factor`` at the last step;
    ``step`` multiplies by ``gamma`` every ``step_size`` steps; ``exponential`` by ``gamma``
    every step."""

    warmup_steps: int = 0
    """Steps of linear warm-up from 0 before the schedule starts."""

    min_factor: float = 0.0
    """Final factor of ``cosine`` and ``linear``."""

    step_size: int = 100
    """Period of ``step``."""

    gamma: float = 0.1
    """Factor of ``step`` and ``exponential``."""


@dataclass(frozen=True)
class TrainConfig:
    """``[train]``: the loop."""

    steps: int | None = None
    """Number of optimizer steps (give ``steps`` or ``epochs``, not both; neither: 100 steps)."""

    epochs: int | None = None
    """Number of passes over the training set (the last batch of an epoch is dropped when short)."""

    batch_size: int = 64
    """Samples per step."""

    seed: int = 0
    """Seed of the initialisation, the batch order and every random draw of the optimizer."""

    eval_every: int = 10
    """Evaluate on the test set every this many steps (and always after the last)."""

    log_every: int = 0
    """Print a line every this many steps when no progress bar is shown; 0: about ten lines."""

    target_test_acc: float | None = None
    """Test accuracy whose first reach is reported as "steps to target"."""

    target_test_loss: float | None = None
    """Test loss whose first reach is reported as "steps to target" (if no accuracy target)."""


@dataclass(frozen=True)
class TrackConfig:
    """``[track]``: statistics recorded during training, summarised in the metrics file."""

    quantities: tuple[Savefield, ...] = ()
    """Savefields of :mod:`curvopt.extensions` to record (e.g. ``["batch_l2", "variance"]``)."""

    every: int = 10
    """Record them every this many steps."""


@dataclass(frozen=True)
class RecipeConfig:
    """A whole recipe. Top-level keys: ``name``, ``description``, ``extends`` and the tables."""

    name: str = ""
    """Short name of the run (default: the file's stem); names the output folder."""

    description: str = ""
    """One line on what the recipe shows."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """``[model]``."""

    data: DataConfig = field(default_factory=DataConfig)
    """``[data]``."""

    loss: LossConfig = field(default_factory=LossConfig)
    """``[loss]``."""

    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """``[optimizer]``."""

    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """``[schedule]``."""

    train: TrainConfig = field(default_factory=TrainConfig)
    """``[train]``."""

    track: TrackConfig = field(default_factory=TrackConfig)
    """``[track]``."""


# ------------------------------------------------------------------------------ conversion
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {_type_name(args[0])}"
        return f"list of {len(args)} values"
    if origin is dict:
        return "table"
    if tp is type(None):
        return "nothing (leave the key out)"
    if dataclasses.is_dataclass(tp):
        return "table"
    return getattr(tp, "__name__", str(tp))


def _describe(value: Any) -> str:
    kind = {bool: "boolean", int: "integer", float: "float", str: "string", list: "list",
            dict: "table"}.get(type(value), type(value).__name__)
    return f"{kind} {value!r}"


def _matches_kind(value: Any, tp: Any) -> bool:
    """Whether ``value`` has the right container/scalar kind for ``tp`` (before checking more)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return any(type(value) is type(a) for a in typing.get_args(tp))
    if origin is tuple:
        return isinstance(value, (list, tuple))
    if origin is dict or dataclasses.is_dataclass(tp):
        return isinstance(value, dict)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is type(None):
        return value is None
    if tp is Any:
        return True
    return type(value) is tp


def convert(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` (as read from TOML) against the annotation ``tp``; return it converted.

    Raises:
        RecipeError: naming ``key``, the expected type and, for choices, the valid ones.
    """
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if _matches_kind(value, arg):
                return convert(value, arg, key)
        raise RecipeError(f"{key}: expected {_type_name(tp)}, got {_describe(value)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices or not _matches_kind(value, tp):
            hint = did_you_mean(value, [str(c) for c in choices])
            raise RecipeError(
                f"{key}: {value!r} is not a valid choice{hint}; valid choices: "
                + ", ".join(str(c) for c in choices)
            )
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{key}: expected {_type_name(tp)}, got {_describe(value)}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:  # tuple[T, ...]
            args = (args[0],) * len(value)
        elif len(args) != len(value):
            raise RecipeError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        pairs = enumerate(zip(value, args, strict=True))
        return tuple(convert(v, a, f"{key}[{i}]") for i, (v, a) in pairs)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise RecipeError(f"{key}: expected a table [{key}], got {_describe(value)}")
        return from_dict(tp, value, prefix=f"{key}.")
    if not _matches_kind(value, tp):
        raise RecipeError(f"{key}: expected {_type_name(tp)}, got {_describe(value)}")
    if tp is float:
        return float(value)
    if origin is dict:
        return dict(value)
    return value


def did_you_mean(word: Any, options: list[str]) -> str:
    """``" (did you mean 'x'?)"`` for the closest of ``options``, or ``""``."""
    close = difflib.get_close_matches(str(word), options, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build the dataclass ``cls`` from a TOML table, checking every key and value.

    A class with an ``__extra__`` attribute collects the table's unknown keys into that
    field (checked later, e.g. against an optimizer's signature) instead of rejecting them.

    Raises:
        RecipeError: for an unknown key (naming the valid keys) or a bad value.
    """
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    extra_field = getattr(cls, "__extra__", None)
    kwargs: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, value in data.items():
        if key not in names or key == extra_field:
            if extra_field is not None and key != extra_field:
                extra[key] = value
                continue
            table = f"[{prefix[:-1]}]" if prefix else "the recipe's top level"
            valid = [n for n in names if n != extra_field]
            raise RecipeError(
                f"unknown key {prefix + key!r} in {table}{did_you_mean(key, valid)}; "
                f"valid keys: {', '.join(valid)}"
            )
        kwargs[key] = convert(value, hints[key], prefix + key)
    if extra_field is not None:
        kwargs[extra_field] = extra
    return cls(**kwargs)


def to_dict(config: Any) -> Any:
    """The plain-data (JSON/TOML-able) form of a config, tuples as lists; the inverse of
    :func:`from_dict` (``[optimizer]``'s extra keys are flattened back into the table)."""
    if dataclasses.is_dataclass(config):
        out: dict[str, Any] = {}
        extra_field = getattr(type(config), "__extra__", None)
        for f in dataclasses.fields(config):
            value = to_dict(getattr(config, f.name))
            if f.name == extra_field:
                out.update(value)
            elif value is not None:
                out[f.name] = value
        return out
    if isinstance(config, (list, tuple)):
        return [to_dict(v) for v in config]
    if isinstance(config, dict):
        return {k: to_dict(v) for k, v in config.items()}
    return config
