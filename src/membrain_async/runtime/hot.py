"""Moved to `membrain_async.cache.hot` (the hot tier is part of the cache layer); kept for old imports."""

from ..cache.hot import HotTier

__all__ = ["HotTier"]
