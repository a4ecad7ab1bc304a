"""Hyperparameter recipes: TOML files that name a model, data, loss, optimizer, schedule and
what to track, and the code that checks, builds and runs them (``curvopt run|compare|stats``).

>>> from curvopt import recipes
>>> config = recipes.load("recipes/digits_mlp_kfac.toml", ["optimizer.lr=0.05"])  # doctest: +SKIP
>>> model, loss_fn, optimizer, data = recipes.build(config)  # doctest: +SKIP
"""

from curvopt.recipes.builder import OPTIMIZERS, Built, build
from curvopt.recipes.loader import load, parse
from curvopt.recipes.runner import RunResult, compare, run, train
from curvopt.recipes.schema import SAVEFIELDS, RecipeConfig, RecipeError

__all__ = [
    "load",
    "parse",
    "build",
    "train",
    "run",
    "compare",
    "Built",
    "RunResult",
    "RecipeConfig",
    "RecipeError",
    "OPTIMIZERS",
    "SAVEFIELDS",
]
