"""One shared BlockStore per process and endpoint, with explicit holders.

vLLM's scheduler half and worker half may live in one process (an in-process engine core, TP=1), and
both use the same store. Each `open_store()` takes a hold and each `close()` gives one back; the last
close drains and stops the store, and the next `open_store()` makes a fresh one. So neither half can
stop the store under the other, and a store is never handed out after it stopped.
"""

from __future__ import annotations

import atexit
import os
import threading

from ..config import ConnectorConfig
from .store import BlockStore

_lock = threading.Lock()
_stores: dict[tuple, BlockStore] = {}


def _key(config: ConnectorConfig) -> tuple:
    return (tuple(config.endpoint), config.namespace, config.token, config.async_backend)


def open_store(config: ConnectorConfig) -> BlockStore:
    """This process's store for the config's endpoint and namespace, with one more hold on it
    (created, not yet started, on first use). Give the hold back with `store.close()`."""
    key = _key(config)
    with _lock:
        store = _stores.get(key)
        if store is not None and store.acquire():
            return store
        store = _stores[key] = BlockStore(config)
        store._on_stop = _forget
        return store


def _forget(store: BlockStore) -> None:
    with _lock:
        for key, held in list(_stores.items()):
            if held is store:
                del _stores[key]


def shutdown_all(drain: float | None = None) -> None:
    """Stop every shared store, whoever still holds it (process exit)."""
    with _lock:
        stores = list(_stores.values())
        _stores.clear()
    for store in stores:
        store.stop_now(drain)


def _forget_after_fork() -> None:
    # The child has the parent's objects but not its threads: start afresh, lazily.
    global _lock
    _lock = threading.Lock()
    _stores.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)
atexit.register(shutdown_all)
