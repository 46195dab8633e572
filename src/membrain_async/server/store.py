"""The bounded value store: byte capacity, LRU eviction, per-namespace counters.

All calls happen on the server's event-loop thread, so the store needs no locks. Values are immutable
once stored (a put of an existing key replaces the reference, it never writes into the old buffer), and a
reader holds its own reference to the value it is sending: eviction or overwrite drops only the store's
reference, so a value being read is never freed or changed under the reader.

Put of an existing key overwrites it (and makes it most recently used). KV content under a key is
deterministic, so overwriting is harmless, and it lets a client repair a value that failed its checksum.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

Value = bytes | bytearray


@dataclass
class NamespaceStats:
    keys: int = 0
    bytes: int = 0
    hits: int = 0
    misses: int = 0
    puts: int = 0
    evictions: int = 0
    deletes: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class StoreTotals:
    bytes_in: int = 0
    bytes_out: int = 0
    rejected: int = 0  # values larger than the whole capacity


class Store:
    def __init__(self, capacity: int, recycle: Callable[[Value], None] | None = None):
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self._recycle = recycle or (lambda value: None)
        self.used = 0
        self._values: OrderedDict[tuple[str, str], Value] = OrderedDict()
        self.namespaces: dict[str, NamespaceStats] = {}
        self.totals = StoreTotals()

    def _ns(self, ns: str) -> NamespaceStats:
        stats = self.namespaces.get(ns)
        if stats is None:
            stats = self.namespaces[ns] = NamespaceStats()
        return stats

    def __len__(self) -> int:
        return len(self._values)

    def put(self, ns: str, key: str, value: Value) -> bool | None:
        """Store value; True if created, False if it replaced a value, None if it can never fit."""
        size = len(value)
        stats = self._ns(ns)
        if size > self.capacity:
            self.totals.rejected += 1
            return None
        old = self._values.pop((ns, key), None)
        if old is not None:
            self.used -= len(old)
            stats.bytes -= len(old)
            stats.keys -= 1
            self._recycle(old)
        self._evict_until(self.capacity - size)
        self._values[(ns, key)] = value
        self.used += size
        stats.keys += 1
        stats.bytes += size
        stats.puts += 1
        self.totals.bytes_in += size
        return old is None

    def reserve(self, nbytes: int) -> None:
        """Evict ahead of an incoming value so that memory for it never exceeds capacity + what is in flight."""
        self._evict_until(self.capacity - min(nbytes, self.capacity))

    def _evict_until(self, limit: int) -> None:
        while self.used > limit and self._values:
            (ns, _), victim = self._values.popitem(last=False)
            self.used -= len(victim)
            stats = self._ns(ns)
            stats.keys -= 1
            stats.bytes -= len(victim)
            stats.evictions += 1
            self._recycle(victim)

    def get(self, ns: str, key: str) -> Value | None:
        value = self._values.get((ns, key))
        stats = self._ns(ns)
        if value is None:
            stats.misses += 1
            return None
        self._values.move_to_end((ns, key))
        stats.hits += 1
        self.totals.bytes_out += len(value)
        return value

    def peek_size(self, ns: str, key: str) -> int | None:
        """Size without counting a hit or refreshing recency (HEAD, exists)."""
        value = self._values.get((ns, key))
        return None if value is None else len(value)

    def keys(self, ns: str, limit: int) -> tuple[list[str], bool]:
        """Up to `limit` keys of one namespace, most recently used first; and whether there were more."""
        out: list[str] = []
        for (value_ns, key) in reversed(self._values):
            if value_ns != ns:
                continue
            if len(out) == limit:
                return out, True
            out.append(key)
        return out, False

    def contains(self, ns: str, key: str) -> bool:
        return (ns, key) in self._values

    def prefix_count(self, ns: str, keys: list[str]) -> int:
        """How many leading keys are present. Refreshes them: a prefix someone asked for is likely to be loaded."""
        n = 0
        for key in keys:
            if (ns, key) not in self._values:
                break
            self._values.move_to_end((ns, key))
            n += 1
        stats = self._ns(ns)
        stats.hits += n
        if n < len(keys):
            stats.misses += 1
        return n

    def delete(self, ns: str, key: str) -> bool:
        value = self._values.pop((ns, key), None)
        if value is None:
            return False
        stats = self._ns(ns)
        self.used -= len(value)
        stats.keys -= 1
        stats.bytes -= len(value)
        stats.deletes += 1
        self._recycle(value)
        return True

    def stats(self, namespaces: set[str] | None = None) -> dict:
        visible = {ns: s.as_dict() for ns, s in self.namespaces.items() if namespaces is None or ns in namespaces}
        out: dict = {"namespaces": visible}
        if namespaces is None:
            out.update(
                capacity=self.capacity,
                used=self.used,
                keys=len(self._values),
                bytes_in=self.totals.bytes_in,
                bytes_out=self.totals.bytes_out,
                rejected=self.totals.rejected,
            )
        return out
