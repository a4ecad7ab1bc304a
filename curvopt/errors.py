"""Errors raised by curvopt: every message names the module/loss and the quantity, and says what to do."""


class CurvoptError(RuntimeError):
    """Base class of curvopt's errors."""


class UnsupportedModuleError(CurvoptError):
    """A module (or functional op) cannot give the requested quantity."""


class UnsupportedLossError(CurvoptError):
    """The loss function (or its configuration) is not supported for the requested quantity."""


class CollectError(CurvoptError):
    """Misuse of :func:`curvopt.collect` (nesting, a second backward, batch mixing layers, ...)."""
