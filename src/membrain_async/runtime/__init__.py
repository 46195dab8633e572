"""The executor: one background event-loop thread per store, jobs with deadlines and cancel scopes,
futures and completion rings. It knows nothing of KV blocks; the cache layer (`membrain_async.cache`)
is built on it.

    store = open_store(config)                        # the process's BlockStore (membrain_async.cache)
    fut = store.lookup(keys, tag=req_id, ring=my_ring)   # returns at once
    ... later, on the same thread, never blocking:
    for completion in my_ring.poll(): ...
    fut.result_or(None)
"""

from __future__ import annotations

from .executor import Executor
from .future import Cancelled, MembrainFuture, NotReady
from .ring import Completion, CompletionRing

__all__ = ["Cancelled", "Completion", "CompletionRing", "Executor", "MembrainFuture", "NotReady"]
