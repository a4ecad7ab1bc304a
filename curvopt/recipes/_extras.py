"""The recipes' optional dependencies (the ``[recipes]`` extra), imported where they are used.

``import curvopt`` and its optimizers need torch and numpy only.  scikit-learn (the digits
data), matplotlib (plots), tqdm (progress bars) and torch-optimizer (the Adahessian
baseline) are imported through :func:`need` when a recipe uses them, so a missing one
raises :class:`MissingExtraError`, which names the extra that brings it, instead of a bare
``ModuleNotFoundError`` from deep inside a run.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from curvopt.errors import CurvoptError

__all__ = ["DISTRIBUTION", "MissingExtraError", "need"]

#: The name curvopt is installed under (the import name is ``curvopt``).
DISTRIBUTION = "curvopt-torch"

# import name -> the name pip knows it by
_PIP_NAMES = {"sklearn": "scikit-learn", "torch_optimizer": "torch-optimizer"}


class MissingExtraError(CurvoptError, ImportError):
    """An optional dependency is not installed; the message says how to install it."""


def need(module: str, purpose: str) -> ModuleType:
    """Import ``module`` (part of the ``[recipes]`` extra) for ``purpose``.

    Raises:
        MissingExtraError: the module is not installed; the message names the package and
            the extra to install.  A module that is installed but fails to import for another
            reason raises its own error.
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        missing = err.name or ""
        if not missing or not (module == missing or module.startswith(missing + ".")):
            raise  # installed, but broken: its own message says more than ours would
        top = module.split(".")[0]
        raise MissingExtraError(
            f"{purpose} needs {_PIP_NAMES.get(top, top)}, which is not installed; install "
            f"curvopt's recipes extra: pip install '{DISTRIBUTION}[recipes]' "
            "(from a checkout: pip install -e '.[recipes]')"
        ) from err
