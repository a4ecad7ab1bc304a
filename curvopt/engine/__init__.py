"""The hook engine: :class:`Collector` and :func:`collect`."""

from .collector import Collector, collect

__all__ = ["Collector", "collect"]
