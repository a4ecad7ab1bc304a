"""Turn a validated :class:`~curvopt.recipes.schema.RecipeConfig` into model, loss, optimizer, data.

The optimizer registry :data:`OPTIMIZERS` maps a recipe's ``optimizer.name`` to a
constructor; optional dependencies (torch-optimizer) are imported on use.
"""

from __future__ import annotations

import inspect
import math
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from curvopt import optim
from curvopt.recipes._extras import need
from curvopt.recipes.data import Data, TextData, data_shapes, make_data
from curvopt.recipes.schema import (
    ModelConfig,
    RecipeConfig,
    RecipeError,
    ScheduleConfig,
    convert,
    did_you_mean,
)

__all__ = [
    "OPTIMIZERS",
    "LANGUAGE_MODELS",
    "CharGPT",
    "HFCausalLM",
    "OptimizerSpec",
    "Built",
    "build",
    "build_model",
    "build_loss",
    "build_scheduler",
    "check_optimizer_params",
    "check_buildable",
]


# ------------------------------------------------------------------------------ optimizers
@dataclass(frozen=True)
class OptimizerSpec:
    """How to construct one registered optimizer.

    Attributes:
        resolve: returns the optimizer class (imports lazily; raises :class:`RecipeError`
            when it is not available).
        takes_model: ``cls(model, loss_fn, **kw)`` (curvopt's, which hold a hook engine)
            instead of ``cls(model.parameters(), **kw)``.
        create_graph: the loop must call ``loss.backward(create_graph=True)`` (Hessian-vector
            products, e.g. Adahessian).
    """

    resolve: Callable[[], type]
    takes_model: bool = False
    create_graph: bool = False


def _adahessian() -> type:
    return need("torch_optimizer", "optimizer 'adahessian'").Adahessian


OPTIMIZERS: dict[str, OptimizerSpec] = {
    "sgd": OptimizerSpec(lambda: torch.optim.SGD),
    "adam": OptimizerSpec(lambda: torch.optim.Adam),
    "adamw": OptimizerSpec(lambda: torch.optim.AdamW),
    "adahessian": OptimizerSpec(_adahessian, create_graph=True),
    "kfac": OptimizerSpec(lambda: optim.KFACOptimizer, takes_model=True),
    "diag_ggn_adam": OptimizerSpec(lambda: optim.DiagGGNAdam, takes_model=True),
    "variance_adaptive_sgd": OptimizerSpec(lambda: optim.VarianceAdaptiveSGD, takes_model=True),
}

#: Constructor arguments never taken from a recipe's ``[optimizer]`` table.
_NOT_FROM_RECIPE = {"params", "model", "loss_fn", "track", "self"}


def _hyperparameters(cls: type) -> dict[str, inspect.Parameter] | None:
    """Keyword parameters of ``cls.__init__`` a recipe may set (``None``: any, ``**kwargs``)."""
    params = inspect.signature(cls).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    positional = [p for p in params.values() if p.default is inspect.Parameter.empty]
    skip = _NOT_FROM_RECIPE | {p.name for p in positional}
    return {
        name: p
        for name, p in params.items()
        if name not in skip and p.kind is not inspect.Parameter.VAR_POSITIONAL
    }


def _check_value(key: str, value: Any, param: inspect.Parameter, hints: dict[str, Any]) -> Any:
    """Check a hyperparameter's TOML value against the constructor's annotation (or, where it
    has none, the type of the default); return it converted (lists to tuples, ints to floats)."""
    if key in hints:
        return convert(value, hints[key], f"optimizer.{key}")
    default = param.default
    if default is None or default is inspect.Parameter.empty:
        return tuple(value) if isinstance(value, list) else value
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, (int, float)):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok and isinstance(default, float) else value
    elif isinstance(default, (tuple, list)):
        ok = isinstance(value, (list, tuple))
        value = tuple(value) if ok else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise RecipeError(
            f"optimizer.{key}: expected {type(default).__name__} "
            f"(like the default {default!r}), got {type(value).__name__} {value!r}"
        )
    return value


def _type_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls.__init__)
    except Exception:  # unresolvable annotations: fall back to the defaults' types
        return {}


def check_optimizer_params(name: str, params: dict[str, Any]) -> dict[str, Any] | None:
    """Check an ``[optimizer]`` table's keyword arguments against the constructor's signature.

    Returns:
        The converted keyword arguments, or ``None`` if the optimizer class is not available
        (then the check happens in :func:`build`).

    Raises:
        RecipeError: for an unknown optimizer name or keyword (naming the valid ones) or a
            value of the wrong type.
    """
    if name not in OPTIMIZERS:
        raise RecipeError(
            f"optimizer.name: unknown optimizer {name!r}{did_you_mean(name, list(OPTIMIZERS))}; "
            f"valid choices: {', '.join(OPTIMIZERS)}"
        )
    spec = OPTIMIZERS[name]
    try:
        cls = spec.resolve()
    except RecipeError:
        return None
    allowed = _hyperparameters(cls)
    if allowed is None:
        return dict(params)
    valid = list(allowed)
    hints = _type_hints(cls)
    out = {}
    for key, value in params.items():
        if key not in valid:
            raise RecipeError(
                f"unknown key 'optimizer.{key}' for optimizer {name!r} "
                f"({cls.__module__}.{cls.__qualname__}){did_you_mean(key, valid)}; "
                f"valid keys: name, {', '.join(valid)}"
            )
        out[key] = _check_value(key, value, allowed[key], hints)
    return out


def build_optimizer(
    config: RecipeConfig, model: nn.Module, loss_fn: nn.Module
) -> torch.optim.Optimizer:
    """The optimizer of ``config`` over ``model`` (``track`` passed to curvopt's optimizers)."""
    opt = config.optimizer
    kwargs = check_optimizer_params(opt.name, opt.params)
    spec = OPTIMIZERS[opt.name]
    cls = spec.resolve()  # raises the clear error if the class is missing
    if kwargs is None:  # pragma: no cover - the class appeared between load and build
        kwargs = check_optimizer_params(opt.name, opt.params) or {}
    if opt.lr is not None:
        kwargs["lr"] = opt.lr
    try:
        if spec.takes_model:
            if config.track.quantities:
                kwargs["track"] = list(config.track.quantities)
            built = cls(model, loss_fn, **kwargs)
            # statistics only on the steps the runner records them (the steps t with
            # t % every == 0, as the runner's): not computed and discarded on the others
            built.track_every = config.track.every
            return built
        return cls(model.parameters(), **kwargs)
    except (ValueError, TypeError) as err:  # the constructor's own checks (ranges, choices)
        raise RecipeError(
            f"optimizer: {cls.__qualname__} rejects the recipe's [optimizer] table: {err}"
        ) from err


def check_buildable(config: RecipeConfig) -> None:
    """Construct model, loss and optimizer once on a throwaway model, so that what only the
    constructors check (value ranges, an optimizer's own choices) fails when the recipe is
    loaded, before any training.  Torch's global RNG is left as it was."""
    if check_optimizer_params(config.optimizer.name, config.optimizer.params) is None:
        return  # the optimizer class is not available: build() says so
    in_shape, out_features = data_shapes(config.data, images=config.model.kind == "cnn")
    with torch.random.fork_rng(devices=[]):
        model = build_model(config.model, in_shape, out_features)
        optimizer = build_optimizer(config, model, build_loss(config))
    close = getattr(optimizer, "close", None)  # curvopt's optimizers: remove their hooks
    if callable(close):
        close()


# ---------------------------------------------------------------------------------- models
_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
    "softplus": nn.Softplus,
    "gelu": nn.GELU,
    "identity": nn.Identity,
}


class CausalBlock(nn.Module):
    """A pre-LN transformer block: ``x + Attn(LN(x))``, then ``x + MLP(LN(x))``.

    ``Attn`` is ``nn.MultiheadAttention`` with a causal mask (position t attends to
    positions <= t), ``MLP = Linear(d, h) → act → Linear(h, d)``.  Shapes ``[N, T, d]``.
    """

    def __init__(self, d_model: int, n_heads: int, hidden: int, act: nn.Module, bias: bool):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = nn.MultiheadAttention(d_model, n_heads, bias=bias, batch_first=True)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, hidden, bias=bias), act,
                                 nn.Linear(hidden, d_model, bias=bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        future = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)  # True: masked
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=future, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class CharGPT(nn.Module):
    """A GPT-style causal language model from ``torch.nn`` (see :class:`ModelConfig`).

    ``forward(ids [N, T]) -> logits [N, V, T]``: class dimension second, as
    ``nn.CrossEntropyLoss`` wants it with targets ``[N, T]``.  The position embedding is
    called on ids ``[1, T]`` and broadcast over the batch (as GPT-2's ``wpe``).
    Initialisation as GPT-2: weights ``N(0, 0.02²)``, biases 0.
    """

    def __init__(self, config: ModelConfig, vocab_size: int, block_size: int):
        super().__init__()
        d = config.d_model
        self.tok = nn.Embedding(vocab_size, d)
        self.pos = nn.Embedding(block_size, d)
        self.blocks = nn.Sequential(*[
            CausalBlock(d, config.n_heads, config.mlp_ratio * d,
                        _ACTIVATIONS[_one_activation(config)](), config.bias)
            for _ in range(config.n_layers)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab_size, bias=config.bias)
        norms = {id(p) for m in self.modules() if isinstance(m, nn.LayerNorm)
                 for p in m.parameters()}
        with torch.no_grad():
            for p in self.parameters():
                if id(p) not in norms:  # LayerNorm keeps its (1, 0)
                    p.normal_(0.0, 0.02) if p.dim() > 1 else p.zero_()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)[None]
        x = self.tok(ids) + self.pos(positions)
        return self.head(self.ln(self.blocks(x))).transpose(1, 2)


class HFCausalLM(nn.Module):
    """A Hugging Face causal LM with the output of :class:`CharGPT`: logits ``[N, V, T]``."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=ids).logits.transpose(1, 2)


#: The ``model.kind`` values that are language models (they need text data).
LANGUAGE_MODELS = ("gpt", "hf_gpt2")

#: Activations of ``hf_gpt2`` by the names Hugging Face's ``ACT2FN`` knows them.
_HF_ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "tanh": "tanh", "sigmoid": "sigmoid"}


def _one_activation(config: ModelConfig) -> str:
    if not isinstance(config.activation, str):
        raise RecipeError(f"model.activation: a {config.kind!r} model takes one name, got "
                          f"{list(config.activation)}")
    return config.activation


def _hf_gpt2(config: ModelConfig, vocab_size: int, block_size: int) -> nn.Module:
    transformers = need("transformers", "model.kind = 'hf_gpt2'")
    act = _one_activation(config)
    if act not in _HF_ACTIVATIONS:
        raise RecipeError(f"model.activation: {act!r} is not one of hf_gpt2's; valid choices: "
                          + ", ".join(_HF_ACTIVATIONS))
    if not config.bias:
        raise RecipeError("model.bias: hf_gpt2's layers always have biases; use kind = 'gpt'")
    gpt2 = transformers.GPT2Config(
        vocab_size=vocab_size, n_positions=block_size, n_embd=config.d_model,
        n_layer=config.n_layers, n_head=config.n_heads, n_inner=config.mlp_ratio * config.d_model,
        activation_function=_HF_ACTIVATIONS[act], resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None)
    return HFCausalLM(transformers.GPT2LMHeadModel(gpt2))


def build_model(config: ModelConfig, in_shape: tuple[int, ...], out_features: int) -> nn.Module:
    """The network of the declarative spec (initialised with torch's global RNG): an
    ``nn.Sequential`` for ``mlp`` and ``cnn``; for ``gpt`` / ``hf_gpt2`` a language model over
    ``out_features`` tokens with context ``in_shape[0]``."""
    if config.kind == "gpt":
        return CharGPT(config, out_features, in_shape[0])
    if config.kind == "hf_gpt2":
        return _hf_gpt2(config, out_features, in_shape[0])
    n_hidden = len(config.hidden) + (len(config.channels) if config.kind == "cnn" else 0)
    acts = config.activation
    acts = (acts,) * n_hidden if isinstance(acts, str) else acts
    act_iter = iter(acts)
    layers: list[nn.Module] = []
    if config.kind == "cnn":
        c_in, h, w = in_shape
        pad = config.kernel_size // 2
        for c in config.channels:
            layers += [nn.Conv2d(c_in, c, config.kernel_size, padding=pad, bias=config.bias),
                       _ACTIVATIONS[next(act_iter)]()]
            c_in = c
        if config.pool != "none":
            layers.append(nn.MaxPool2d(2) if config.pool == "max" else nn.AvgPool2d(2))
            h, w = h // 2, w // 2
        width = c_in * h * w
    else:
        width = math.prod(in_shape)
    layers.append(nn.Flatten())
    for hdim in config.hidden:
        layers += [nn.Linear(width, hdim, bias=config.bias), _ACTIVATIONS[next(act_iter)]()]
        width = hdim
    layers.append(nn.Linear(width, out_features, bias=config.bias))
    return nn.Sequential(*layers)


def build_loss(config: RecipeConfig) -> nn.Module:
    """``nn.CrossEntropyLoss`` or ``nn.MSELoss`` with the recipe's reduction."""
    cls = nn.CrossEntropyLoss if config.loss.name == "cross_entropy" else nn.MSELoss
    return cls(reduction=config.loss.reduction)


def schedule_factor(config: ScheduleConfig, total_steps: int) -> Callable[[int], float]:
    """The factor on the base learning rate before optimizer step ``t`` (0-based)."""

    def factor(t: int) -> float:
        if t < config.warmup_steps:
            return (t + 1) / config.warmup_steps
        t -= config.warmup_steps
        span = max(1, total_steps - config.warmup_steps - 1)
        frac = min(1.0, t / span)
        if config.name == "cosine":
            cos = 0.5 * (1 + math.cos(math.pi * frac))
            return config.min_factor + (1 - config.min_factor) * cos
        if config.name == "linear":
            return 1 - (1 - config.min_factor) * frac
        if config.name == "step":
            return config.gamma ** (t // config.step_size)
        if config.name == "exponential":
            return config.gamma**t
        return 1.0

    return factor


def build_scheduler(
    config: RecipeConfig, optimizer: torch.optim.Optimizer, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` over the recipe's schedule."""
    factor = schedule_factor(config.schedule, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ----------------------------------------------------------------------------------- build
@dataclass
class Built:
    """What :func:`build` returns; unpacks as ``model, loss_fn, optimizer, data = build(cfg)``.

    Attributes:
        model: the network, initialised from ``train.seed``.
        loss_fn: the loss module.
        optimizer: the optimizer over ``model``.
        data: the train/test split (:class:`TextData` for text).
        scheduler: the learning-rate schedule (step it after every optimizer step).
        total_steps: number of steps the recipe trains for.
        create_graph: whether ``backward`` needs ``create_graph=True``.
        config: the recipe.
    """

    model: nn.Module
    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    data: Data | TextData
    scheduler: torch.optim.lr_scheduler.LambdaLR
    total_steps: int
    create_graph: bool
    config: RecipeConfig

    def __iter__(self) -> Iterator[Any]:
        return iter((self.model, self.loss_fn, self.optimizer, self.data))


def total_steps(config: RecipeConfig, n_train: int) -> int:
    """Steps of the run: ``train.steps``, or ``train.epochs`` full batches per epoch."""
    if config.train.epochs is not None:
        return config.train.epochs * max(1, n_train // config.train.batch_size)
    return config.train.steps if config.train.steps is not None else 100


def build(config: RecipeConfig) -> Built:
    """Build model, loss, optimizer, data and schedule of a validated recipe.

    Seeds torch's global RNG with ``train.seed`` first, so the same recipe gives the same
    initial weights, batches and optimizer draws.
    """
    torch.manual_seed(config.train.seed)
    data = make_data(config.data, images=config.model.kind == "cnn")
    model = build_model(config.model, data.in_shape, data.out_features)
    loss_fn = build_loss(config)
    optimizer = build_optimizer(config, model, loss_fn)
    steps = total_steps(config, data.n_train)
    scheduler = build_scheduler(config, optimizer, steps)
    return Built(
        model=model,
        loss_fn=loss_fn,
        optimizer=optimizer,
        data=data,
        scheduler=scheduler,
        total_steps=steps,
        create_graph=OPTIMIZERS[config.optimizer.name].create_graph,
        config=config,
    )
