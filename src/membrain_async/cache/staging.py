"""Prefetch staging: pages fetched ahead of their load (while vLLM still waits for the lookup), held until
a fetch takes them or their request ends. A load that copies a page into its own buffer leaves it staged,
for the other requests that share it; such pages are the first freed when a prefetch needs room.

Policy: stage a request's pages as a prefix (nothing after its first miss is ever loaded), within a byte
bound; a fetch of a key already on the wire waits for that prefetch instead of asking twice; at most
`concurrency` prefetches use the network at once, so they cannot crowd out the loads they run ahead of.
Touched only on the runtime thread.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import anyio

GetMany = Callable[[list[str]], Awaitable[list]]


@dataclass(slots=True)
class Staged:
    staged: int = 0  # pages now held
    skipped: bool = False  # refused, at least in part: nothing new to fetch, or the byte bound was reached


class PrefetchStaging:
    def __init__(self, capacity: int, concurrency: int = 2):
        self.capacity = capacity
        self.concurrency = concurrency
        self.used = 0
        self._staged: OrderedDict[str, tuple[Any, memoryview]] = OrderedDict()  # key -> (tag, value)
        self._in_flight: dict[str, anyio.Event] = {}
        self._loaded: set[str] = set()  # staged pages a load has copied out: the first to go for room
        self._slots: anyio.Semaphore | None = None  # made on the loop (anyio primitives belong to one)

    def __len__(self) -> int:
        return len(self._staged)

    def __contains__(self, key: str) -> bool:
        return key in self._staged

    async def prefetch(self, keys: list[str], tag: Any, get_many: GetMany) -> Staged:
        """Fetch keys not staged or in flight and stage their leading hits; get_many's errors propagate."""
        keys = [k for k in keys if k not in self._staged and k not in self._in_flight]
        self._make_room()
        if not keys or self.used >= self.capacity:
            return Staged(skipped=True)
        if self._slots is None:
            self._slots = anyio.Semaphore(self.concurrency)
        events = {k: anyio.Event() for k in keys}
        self._in_flight.update(events)
        result = Staged()
        try:
            async with self._slots:
                values = await get_many(keys)
            for key, value in zip(keys, values):
                if value is None:
                    break  # a prefix: nothing after the first miss will be loaded
                if self.used + len(value) > self.capacity:
                    self._make_room(len(value))
                if self.used + len(value) > self.capacity:
                    result.skipped = True
                    break
                self._staged[key] = (tag, value)
                self.used += len(value)
                result.staged += 1
        finally:
            for key, event in events.items():
                self._in_flight.pop(key, None)
                event.set()
        return result

    async def fill(self, keys: list[str], out: list, missing: list[int], take: bool = True) -> list[int]:
        """Staged pages for the missing indices (waiting for their prefetch if it is on the wire); returns
        the indices still missing. With `take`, a page is taken once: the fetch now owns it. Without it (a
        load that copies the page into its own buffer at once), the page stays staged for every other
        request that needs it, until the request that prefetched it ends (`drop`): requests sharing a
        prefix then fetch it once."""
        for i in missing:
            pending = self._in_flight.get(keys[i])
            if pending is not None:
                await pending.wait()
        still = []
        for i in missing:
            staged = self._staged.pop(keys[i], None) if take else self._staged.get(keys[i])
            if staged is None:
                still.append(i)
            else:
                if take:
                    self.used -= len(staged[1])
                    self._loaded.discard(keys[i])
                else:
                    self._loaded.add(keys[i])
                out[i] = staged[1]
        return still

    def _make_room(self, need: int = 1) -> None:
        """Free pages that were loaded already (oldest first) until `need` more bytes fit."""
        for key in [k for k in self._staged if k in self._loaded]:
            if self.used + need <= self.capacity:
                return
            _, value = self._staged.pop(key)
            self._loaded.discard(key)
            self.used -= len(value)

    def drop(self, tag: Any) -> int:
        """The request ended: free what it still has staged. Returns how many pages were dropped."""
        gone = [k for k, (t, _) in self._staged.items() if t == tag]
        for key in gone:
            _, value = self._staged.pop(key)
            self._loaded.discard(key)
            self.used -= len(value)
        return len(gone)
