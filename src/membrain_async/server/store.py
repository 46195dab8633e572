"""The RAM tier: values in arena slots, byte capacity, LRU eviction behind an admission policy, per-namespace
counters and quotas.

All calls happen on the server's event-loop thread, so the store needs no locks. A stored value is never
written again: a put of an existing key takes a new slot and releases the old one, and a slot returns to
the arena only once no reader pins it (see arena.py), so a value being sent is never changed under the
reader.

Put of an existing key overwrites it (and makes it most recently used). KV content under a key is
deterministic, so overwriting is harmless, and it lets a client repair a value that failed its checksum.

Which puts are stored at all is the admission policy's call (eviction.py: `lru` admits all); among stored
values eviction is exact LRU. A namespace with a quota (a share of capacity, from the auth file) that is
past it evicts its own least recently used values first, so its flood cannot push other tenants out.

Eviction asks `spill` first (the disk tier): a value not yet on disk may be kept in its slot until it has
been written; such slots count as `spill_pending` until `finish_spill` releases them.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from .arena import Arena, Slot, size_class
from .eviction import AdmitAll, fingerprint, make_policy


# What memory comes on top of --capacity (the arena holds values only). Measured with tracemalloc, 64-character
# keys, full store after churn (tests/unit/test_memory_bound.py keeps these upper bounds honest): the index entry,
# its slot and views, the key strings; with an admission filter also its fingerprints (up to 2 generations
# of 2 x capacity). PROCESS_BYTES: RSS of an empty server (interpreter, event loop, libraries).
BOOKKEEPING_PER_VALUE = 950
BOOKKEEPING_PER_VALUE_FILTER = 300
PROCESS_BYTES = 35 << 20


def bookkeeping_per_value(policy: str) -> int:
    return BOOKKEEPING_PER_VALUE + (0 if policy == "lru" else BOOKKEEPING_PER_VALUE_FILTER)


def memory_line(capacity: int, policy: str) -> str:
    """The start-up line's account of memory beyond --capacity, with the total at capacity for two value sizes."""
    per = bookkeeping_per_value(policy)
    examples = []
    for size, name in ((4 << 10, "4 KiB"), (2 << 20, "2 MiB")):
        values = capacity // size
        extra = PROCESS_BYTES + values * per
        examples.append(f"{name} values: {values} of them, +{extra / 2**20:.0f} MiB ({extra / capacity:.1%})")
    return (f"memory beyond --capacity: about {PROCESS_BYTES >> 20} MiB for the process + {per} bytes per stored value "
            f"(--eviction {policy}); full with " + "; with ".join(examples))


class Entry:
    """One stored value. `live` turns False once it leaves the index (evicted, replaced, deleted)."""

    __slots__ = ("ns", "key", "slot", "size", "view", "live", "on_disk", "queued", "spilled")

    def __init__(self, ns: str, key: str, slot: Slot, size: int, on_disk: bool):
        self.ns = ns
        self.key = key
        self.slot = slot
        self.size = size
        self.view = slot.view[:size]
        self.live = True
        self.on_disk = on_disk  # a record of this very value is on disk: eviction needs no write
        self.queued = False  # waiting for (or in) a disk write
        self.spilled = False  # evicted, its slot kept until the disk write ends


@dataclass
class NamespaceStats:
    keys: int = 0
    bytes: int = 0
    hits: int = 0
    misses: int = 0
    puts: int = 0
    evictions: int = 0
    deletes: int = 0
    refused: int = 0  # puts of new keys the admission policy did not store

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class StoreTotals:
    bytes_in: int = 0
    bytes_out: int = 0
    rejected: int = 0  # values larger than the whole capacity
    no_room: int = 0  # values not stored: every slot was pinned by a reader or awaiting its disk write
    hits: int = 0
    evictions: int = 0
    refused: int = 0  # by the admission policy


class Store:
    def __init__(self, capacity: int, spill: Callable[[Entry], bool] | None = None, policy: str = "lru"):
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self.arena = Arena(capacity)
        self.spill = spill
        self.spill_pending = 0
        self.used = 0
        self._values: OrderedDict[tuple[str, str], Entry] = OrderedDict()
        self.namespaces: dict[str, NamespaceStats] = {}
        self.totals = StoreTotals()
        self.policy: AdmitAll = make_policy(policy, capacity)
        self.quotas: dict[str, int] = {}  # namespace -> bytes it may hold before evicting its own values
        self._own: dict[str, OrderedDict[str, Entry]] = {}  # LRU order of each namespace with a quota

    def set_quota(self, ns: str, nbytes: int) -> None:
        if nbytes <= 0:
            raise ValueError("a quota must be a positive number of bytes")
        self.quotas[ns] = nbytes
        own = self._own.setdefault(ns, OrderedDict())
        own.clear()
        for (value_ns, key), entry in self._values.items():
            if value_ns == ns:
                own[key] = entry

    def clear_quota(self, ns: str) -> None:
        self.quotas.pop(ns, None)
        self._own.pop(ns, None)

    def _ns(self, ns: str) -> NamespaceStats:
        stats = self.namespaces.get(ns)
        if stats is None:
            stats = self.namespaces[ns] = NamespaceStats()
        return stats

    def __len__(self) -> int:
        return len(self._values)

    # --- slots ------------------------------------------------------------------------------------

    def fits(self, size: int) -> bool:
        return size <= self.capacity and self.arena.fits(size)

    def admit(self, ns: str, key: str, size: int) -> bool:
        """Whether a put of (ns, key) should be stored; a refusal is counted. A key already stored is always
        admitted (its value is replaced)."""
        if (ns, key) in self._values:
            return True
        if self.policy.admit(fingerprint(ns, key), size):
            return True
        self._ns(ns).refused += 1
        self.totals.refused += 1
        return False

    def alloc(self, size: int, ns: str | None = None, pending: int = 0) -> Slot | None:
        """A slot for an incoming value (of namespace `ns`), evicting least recently used values for it:
        first the namespace's own if that puts it past its quota (`pending`: bytes of the same request
        allocated but not committed yet), then across all namespaces.

        None if the value can never fit, or if no slot frees up without waiting (readers' pins, values
        waiting for their disk write: `spill_pending` says how much of that is coming back).
        """
        if not self.fits(size):
            return None
        if ns is not None and ns in self.quotas:
            own, stats, quota = self._own[ns], self._ns(ns), self.quotas[ns]
            while own and stats.bytes + pending + size > quota:
                self._evict(next(iter(own.values())))
        need = size_class(size)
        while True:
            slot = self.arena.alloc(size)
            if slot is not None:
                return slot
            if self.arena.reclaim_for(size):
                continue
            if not self._values or self.spill_pending >= need:
                return None
            victim = next(iter(self._values.values()))
            if size_class(victim.size) == need:
                self._evict(victim)
                continue
            # The oldest value is of another size: free its whole slab for this size (memcached's slab
            # move), so one odd-sized value costs at most a slab's worth of values, not the whole LRU.
            for slot in list(victim.slot.slab.slots):
                if slot.owner is not None:
                    self._evict(slot.owner)

    def release(self, slot: Slot) -> None:
        self.arena.release(slot)

    def pin(self, entry: Entry) -> None:
        self.arena.pin(entry.slot)

    def unpin(self, entry: Entry) -> None:
        self.arena.unpin(entry.slot)

    # --- index ------------------------------------------------------------------------------------

    def commit(
        self, ns: str, key: str, slot: Slot, size: int, on_disk: bool = False, promoted: bool = False
    ) -> tuple[Entry, Entry | None]:
        """Index a filled slot under (ns, key); returns the new entry and the one it replaced.
        `promoted`: read back from disk, not a put (not counted as one)."""
        stats = self._ns(ns)
        old = self._values.pop((ns, key), None)
        if old is not None:
            self._drop(old)
            stats.keys -= 1
            stats.bytes -= old.size
            self.arena.release(old.slot)
        entry = Entry(ns, key, slot, size, on_disk)
        slot.owner = entry
        self._values[(ns, key)] = entry
        own = self._own.get(ns)
        if own is not None:
            own.pop(key, None)
            own[key] = entry
        self.used += size
        stats.keys += 1
        stats.bytes += size
        if not promoted:
            stats.puts += 1
            self.totals.bytes_in += size
        return entry, old

    def put(self, ns: str, key: str, value) -> bool | None:
        """Copy a value in (the HTTP paths); True if created, False if it replaced a value, None if not stored."""
        size = len(value)
        if not self.fits(size):
            self.totals.rejected += 1
            return None
        if not self.admit(ns, key, size):
            return None
        slot = self.alloc(size, ns)
        if slot is None:
            self.totals.no_room += 1
            return None
        slot.view[:size] = value
        _, old = self.commit(ns, key, slot, size)
        return old is None

    def _drop(self, entry: Entry) -> None:
        own = self._own.get(entry.ns)
        if own is not None and own.get(entry.key) is entry:
            del own[entry.key]
        entry.live = False
        entry.slot.owner = None
        self.used -= entry.size

    def _evict(self, victim: Entry) -> None:
        ns = victim.ns
        del self._values[(ns, victim.key)]
        self._drop(victim)
        stats = self._ns(ns)
        stats.keys -= 1
        stats.bytes -= victim.size
        stats.evictions += 1
        self.totals.evictions += 1
        if self.spill is not None and self.spill(victim):
            victim.spilled = True
            self.spill_pending += size_class(victim.size)
        else:
            self.arena.release(victim.slot)

    def finish_spill(self, entry: Entry) -> None:
        """The disk write of an evicted value ended (or was given up): its slot is free again."""
        if entry.spilled:
            entry.spilled = False
            self.spill_pending -= size_class(entry.size)
            self.arena.release(entry.slot)

    def entry(self, ns: str, key: str) -> Entry | None:
        """The stored entry, counting a hit and refreshing recency (no miss counted: another tier may hold it)."""
        entry = self._values.get((ns, key))
        if entry is not None:
            self._refresh(entry)
            self._ns(ns).hits += 1
            self.totals.hits += 1
            self.totals.bytes_out += entry.size
        return entry

    def count_hit(self, entry: Entry) -> None:
        """A hit served from outside the RAM index (the disk, or a slot waiting for its disk write), counted per
        namespace but not as a RAM hit."""
        self._ns(entry.ns).hits += 1
        self.totals.bytes_out += entry.size

    def get(self, ns: str, key: str) -> memoryview | None:
        entry = self.entry(ns, key)
        if entry is None:
            self._ns(ns).misses += 1
            return None
        return entry.view

    def peek(self, ns: str, key: str) -> Entry | None:
        return self._values.get((ns, key))

    def peek_size(self, ns: str, key: str) -> int | None:
        """Size without counting a hit or refreshing recency (HEAD, exists)."""
        entry = self._values.get((ns, key))
        return None if entry is None else entry.size

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

    def _refresh(self, entry: Entry) -> None:
        """A hit: most recently used again, and seen by the admission policy."""
        self._values.move_to_end((entry.ns, entry.key))
        own = self._own.get(entry.ns)
        if own is not None:
            own.move_to_end(entry.key)
        if self.policy.observes:
            self.policy.accessed(fingerprint(entry.ns, entry.key), entry.size)

    def touch(self, ns: str, key: str) -> bool:
        entry = self._values.get((ns, key))
        if entry is None:
            return False
        self._refresh(entry)
        return True

    def prefix_count(self, ns: str, keys: list[str], also: Callable[[str, str], bool] | None = None) -> int:
        """How many leading keys are present (here, or where `also` says). Refreshes them: a prefix someone
        asked for is likely to be loaded."""
        n = 0
        for key in keys:
            if not self.touch(ns, key) and not (also is not None and also(ns, key)):
                break
            n += 1
        stats = self._ns(ns)
        stats.hits += n
        if n < len(keys):
            stats.misses += 1
        return n

    def delete(self, ns: str, key: str) -> bool:
        entry = self._values.pop((ns, key), None)
        if entry is None:
            return False
        self._drop(entry)
        stats = self._ns(ns)
        stats.keys -= 1
        stats.bytes -= entry.size
        stats.deletes += 1
        self.arena.release(entry.slot)
        return True

    def entries_lru(self):
        """Entries, least recently used first (the shutdown flush writes in this order)."""
        return list(self._values.values())

    def stats(self, namespaces: set[str] | None = None) -> dict:
        visible = {ns: s.as_dict() for ns, s in self.namespaces.items() if namespaces is None or ns in namespaces}
        for ns, stats in visible.items():
            if ns in self.quotas:
                stats["quota"] = self.quotas[ns]
        out: dict = {"namespaces": visible}
        if namespaces is None:
            out.update(
                capacity=self.capacity,
                used=self.used,
                keys=len(self._values),
                bytes_in=self.totals.bytes_in,
                bytes_out=self.totals.bytes_out,
                rejected=self.totals.rejected,
                no_room=self.totals.no_room,
                refused=self.totals.refused,
                eviction=self.policy.stats(),
                bookkeeping_estimate=PROCESS_BYTES + len(self._values) * bookkeeping_per_value(self.policy.name),
                arena=self.arena.stats(),
            )
        return out
