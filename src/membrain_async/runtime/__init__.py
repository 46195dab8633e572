"""The executor: one background event-loop thread per store, jobs with deadlines and cancel scopes,
futures and completion rings. It knows nothing of KV blocks; the cache layer (`membrain_async.cache`)
is built on it.

    store = get_runtime(config)                       # the process's BlockStore (membrain_async.cache)
    fut = store.lookup(keys, tag=req_id, ring=my_ring)   # returns at once
    ... later, on the same thread, never blocking:
    for completion in my_ring.poll(): ...
    fut.result_or(None)
"""

from __future__ import annotations

from .executor import Executor
from .future import Cancelled, MembrainFuture, NotReady
from .ring import Completion, CompletionRing

__all__ = [
    "Cancelled",
    "Completion",
    "CompletionRing",
    "Executor",
    "MembrainFuture",
    "MembrainRuntime",
    "NotReady",
    "RuntimeStats",
    "get_runtime",
    "shutdown_all",
]

# The cache layer's names, as this package exported them before the split (vllm/, embedding hosts).
# Imported on first use: the cache layer imports this package, not the other way round.
_FROM_CACHE = {
    "MembrainRuntime": "BlockStore",
    "RuntimeStats": "StoreStats",
    "get_runtime": "open_store",
    "shutdown_all": "shutdown_all",
}


def __getattr__(name: str):
    if name in _FROM_CACHE:
        from .. import cache

        return getattr(cache, _FROM_CACHE[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
