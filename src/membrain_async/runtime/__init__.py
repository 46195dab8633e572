"""The event-loop-thread runtime: one per process, started lazily, safe across fork and spawn.

    rt = get_runtime(config)
    fut = rt.lookup(keys, tag=req_id, ring=my_ring)   # returns at once
    ... later, on the same thread, never blocking:
    for completion in my_ring.poll(): ...
    fut.result_or(None)
"""

from __future__ import annotations

import atexit
import os
import threading

from ..config import ConnectorConfig
from .future import Cancelled, MembrainFuture, NotReady
from .loop import MembrainRuntime, RuntimeStats
from .ring import Completion, CompletionRing

__all__ = [
    "Cancelled",
    "Completion",
    "CompletionRing",
    "MembrainFuture",
    "MembrainRuntime",
    "NotReady",
    "RuntimeStats",
    "get_runtime",
    "shutdown_all",
]

_lock = threading.Lock()
_runtimes: dict[tuple, MembrainRuntime] = {}


def _key(config: ConnectorConfig) -> tuple:
    return (config.endpoint, config.namespace, config.token, config.async_backend)


def get_runtime(config: ConnectorConfig) -> MembrainRuntime:
    """The process's runtime for this endpoint/namespace (created, not yet started, on first use)."""
    key = _key(config)
    rt = _runtimes.get(key)
    if rt is None:
        with _lock:
            rt = _runtimes.get(key)
            if rt is None:
                rt = _runtimes[key] = MembrainRuntime(config)
    return rt


def shutdown_all(drain: float | None = None) -> None:
    with _lock:
        runtimes = list(_runtimes.values())
        _runtimes.clear()
    for rt in runtimes:
        rt.shutdown(drain)


def _forget_after_fork() -> None:
    # The child has the parent's objects but not its threads: start afresh, lazily.
    global _lock
    _lock = threading.Lock()
    _runtimes.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)
atexit.register(shutdown_all)
