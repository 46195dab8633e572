"""Memory registered with Mooncake's transfer engine, so gets and puts move bytes straight between the
store and this process (batch_get_into / batch_upsert_from) instead of through Mooncake's own local
buffer and a copy out of it (batch_get_buffer, upsert_batch).

Who owns a slab. A call takes a slab in its worker thread and the transfer writes or reads it there.
StoreClient's timeout may abandon that thread (mooncake_store.py); the thread then still owns the slab
until Mooncake's call returns. So a slab is held through a `Lease` that both sides close: the thread's
`finish()` and the caller's `close()`. Whichever comes second gives the slab back, so a late transfer
never lands in a slab another call already took, and no slab is lost when a caller gives up.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any

SLAB_BYTES = 16 << 20  # one get chunk of 1 MiB blocks; a value larger than this gets a slab of its own


class Slab:
    __slots__ = ("buf", "addr", "view", "dedicated")

    def __init__(self, size: int, dedicated: bool):
        self.buf = bytearray(size)
        self.addr = ctypes.addressof((ctypes.c_char * size).from_buffer(self.buf))
        self.view = memoryview(self.buf)
        self.dedicated = dedicated  # sized for one large value: unregistered when given back

    @property
    def size(self) -> int:
        return len(self.buf)


class RegisteredSlabs:
    """Slabs registered once with `store` and reused; at most `keep` of the standard size stay pooled."""

    def __init__(self, store: Any, keep: int):
        self.store = store
        self.keep = keep
        self._free: list[Slab] = []
        self._lock = threading.Lock()
        self.registered = 0

    def take(self, need: int) -> Slab:
        """In a worker thread: a pooled slab, or a new one registered now."""
        if need <= SLAB_BYTES:
            with self._lock:
                if self._free:
                    return self._free.pop()
        slab = Slab(max(need, SLAB_BYTES), dedicated=need > SLAB_BYTES)
        rc = self.store.register_buffer(slab.addr, slab.size)
        if rc != 0:
            raise OSError(f"Mooncake register_buffer failed ({rc}) for {slab.size} bytes")
        self.registered += 1
        return slab

    def give_back(self, slab: Slab) -> None:
        with self._lock:
            if not slab.dedicated and len(self._free) < self.keep:
                self._free.append(slab)
                return
        self._unregister(slab)

    def _unregister(self, slab: Slab) -> None:
        try:
            self.store.unregister_buffer(slab.addr)
        except Exception:  # the store is closing: its registrations go with it
            pass
        self.registered -= 1

    def close(self) -> None:
        """Once no call runs (the transport's close waits for its threads)."""
        with self._lock:
            free, self._free = self._free, []
        for slab in free:
            self._unregister(slab)


class Lease:
    """A slab held by one call: the caller `close()`s it and, once its job was queued (`arm`, as
    BlockingPool's on_queued), the worker thread `finish()`es it; the last of them gives the slab back
    (see the module's docstring). A job that was never queued never takes a slab."""

    def __init__(self, slabs: RegisteredSlabs):
        self._slabs = slabs
        self._lock = threading.Lock()
        self._open = 1  # the caller's side; arm() adds the thread's
        self.slab: Slab | None = None

    def arm(self) -> None:
        with self._lock:
            self._open += 1

    def take(self, need: int) -> Slab:
        self.slab = self._slabs.take(need)
        return self.slab

    def _drop(self) -> None:
        with self._lock:
            self._open -= 1
            last = self._open == 0
        if last and self.slab is not None:
            self._slabs.give_back(self.slab)

    def finish(self) -> None:
        """The worker thread is done with the slab."""
        self._drop()

    def close(self) -> None:
        """The caller is done, or gave up."""
        self._drop()
