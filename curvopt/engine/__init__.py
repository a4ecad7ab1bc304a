"""The hook engine: :class:`Collector` and :func:`collect`."""

from .collector import Collector, collect, release_buffers

__all__ = ["Collector", "collect", "release_buffers"]
