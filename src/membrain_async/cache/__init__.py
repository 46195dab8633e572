"""The cache layer: `BlockStore` over stacked tiers (hot, prefetch staging, write-behind, remote).

It decides what an unreachable server means for each operation and counts every outcome; the
executor under it (`membrain_async.runtime`) only runs jobs. See `store.py`.
"""

from .registry import open_store, shutdown_all
from .stats import StoreStats
from .store import BlockStore

__all__ = ["BlockStore", "StoreStats", "open_store", "shutdown_all"]
