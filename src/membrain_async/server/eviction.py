"""Which values the RAM tier keeps: an admission policy in front of the store's exact LRU.

Replaying Mooncake's FAST'25 traces (bench/trace_bench.py; tables in docs/benchmarks.md, "What stays in
the store") showed why LRU loses: most KV blocks are seen once and never again (76% of the conversation
trace's distinct blocks), and at small capacities admitting them flushes blocks that would have been
reused. Admitting a block only on its second sight doubles the hit ratio there; at large capacities it
costs one miss per block used exactly twice, which LRU would have kept. In simulation W-TinyLFU, S3-FIFO
and ARC fell short of the better of the two at every capacity where it mattered; LFU with dynamic aging
came within a few percent (better by 1-4% at two points) but needs a count for every key ever seen.

So `adaptive` (the default) lets the workload choose: two miniature caches run beside the real one
over a 1/SAMPLE sample of keys with 1/SAMPLE of the capacity (Waldspurger et al., "Cache Modeling and
Optimization using Miniature Simulations", USENIX ATC'17), one LRU admitting everything, one admitting on
second sight; the store admits the way the one with more (recent) hits does. They hold fingerprints,
never values.

Policies:
  lru           admit every put (the store's exact LRU alone)
  second-sight  admit a new key only if it was put before, within the last 2-4 capacities' worth of puts
  adaptive      second-sight while the miniature simulations say it wins, else lru
"""

from __future__ import annotations

import zlib
from collections import OrderedDict

from ..config import EVICTION_POLICIES as POLICIES
SAMPLE = 8  # one key in SAMPLE feeds the miniature simulations
WINDOW = 2.0  # sampled bytes between decisions, in mini-cache capacities (shorter windows flap on noise)
MARGIN = 1.1  # second-sight must beat lru by this factor in the miniature simulations to be switched on
SEEN_SPAN = 2  # a generation of the seen filter: SEEN_SPAN x capacity bytes of puts (one or two are kept)


def fingerprint(ns: str, key: str) -> int:
    """32 bits per key, the same in every process (unlike hash()): a replay samples the same keys each run."""
    return zlib.crc32(key.encode("utf-8", "surrogatepass"), zlib.crc32(ns.encode("utf-8", "surrogatepass")))


class SeenFilter:
    """Fingerprints of recently seen keys, in two generations: a generation closes once the values it
    recorded add up to `span` bytes, and the one before it is then forgotten. Bounded memory, no timers."""

    __slots__ = ("span", "now", "before", "filled")

    def __init__(self, span: int):
        self.span = max(1, span)
        self.now: set[int] = set()
        self.before: set[int] = set()
        self.filled = 0

    def check_and_add(self, fp: int, size: int) -> bool:
        """Whether `fp` was seen before; records it either way."""
        if fp in self.now or fp in self.before:
            return True
        self.now.add(fp)
        self.filled += size
        if self.filled >= self.span:
            self.before, self.now, self.filled = self.now, set(), 0
        return False

    def __len__(self) -> int:
        return len(self.now) + len(self.before)


class MiniCache:
    """A keys-only LRU of `capacity` bytes, admitting everything or on second sight; counts its hits."""

    __slots__ = ("capacity", "used", "lru", "seen", "hits")

    def __init__(self, capacity: int, second_sight: bool):
        self.capacity = max(1, capacity)
        self.used = 0
        self.lru: OrderedDict[int, int] = OrderedDict()
        self.seen = SeenFilter(SEEN_SPAN * self.capacity) if second_sight else None
        self.hits = 0.0

    def access(self, fp: int, size: int) -> None:
        lru = self.lru
        if fp in lru:
            lru.move_to_end(fp)
            self.hits += 1
            return
        if self.seen is not None and not self.seen.check_and_add(fp, size):
            return
        lru[fp] = size
        self.used += size
        while self.used > self.capacity and lru:
            self.used -= lru.popitem(last=False)[1]


class AdmitAll:
    """`lru`: every put is stored; nothing to observe."""

    name = "lru"
    observes = False  # the store skips fingerprinting hits for this policy

    def admit(self, fp: int, size: int) -> bool:
        return True

    def accessed(self, fp: int, size: int) -> None:
        pass

    def fingerprints(self) -> int:
        return 0

    def stats(self) -> dict:
        return {"policy": self.name}


class SecondSight(AdmitAll):
    name = "second-sight"

    def __init__(self, capacity: int):
        self.seen = SeenFilter(SEEN_SPAN * capacity)

    def admit(self, fp: int, size: int) -> bool:
        return self.seen.check_and_add(fp, size)

    def fingerprints(self) -> int:
        return len(self.seen)


class Adaptive(SecondSight):
    name = "adaptive"
    observes = True

    def __init__(self, capacity: int):
        super().__init__(capacity)
        mini = capacity // SAMPLE
        self.lru_mini = MiniCache(mini, second_sight=False)
        self.second_sight_mini = MiniCache(mini, second_sight=True)
        self.window = max(1, int(mini * WINDOW))  # decide after this many sampled bytes
        self.sampled = 0
        self.second_sight = False
        self.switches = 0

    def accessed(self, fp: int, size: int) -> None:
        if fp % SAMPLE:
            return
        self.lru_mini.access(fp, size)
        self.second_sight_mini.access(fp, size)
        self.sampled += size
        if self.sampled >= self.window:
            self.sampled = 0
            ss, lru = self.second_sight_mini.hits, self.lru_mini.hits
            # Into second-sight only on a clear win (it refuses puts: a coin toss is not worth that), back
            # as soon as it stops winning.
            want = ss > lru * MARGIN if not self.second_sight else ss > lru
            self.switches += want != self.second_sight
            self.second_sight = want
            # Halve the tallies: recent windows weigh most, so a change of workload shows within a few.
            self.lru_mini.hits *= 0.5
            self.second_sight_mini.hits *= 0.5

    def admit(self, fp: int, size: int) -> bool:
        self.accessed(fp, size)
        # The filter records every put even while admitting all: switching to second-sight starts warm.
        seen = self.seen.check_and_add(fp, size)
        return seen or not self.second_sight

    def fingerprints(self) -> int:
        m1, m2 = self.lru_mini, self.second_sight_mini
        return len(self.seen) + len(m1.lru) + len(m2.lru) + len(m2.seen)  # type: ignore[arg-type]

    def stats(self) -> dict:
        return {"policy": self.name, "mode": "second-sight" if self.second_sight else "lru", "switches": self.switches}


def make_policy(name: str, capacity: int) -> AdmitAll:
    if name == "lru":
        return AdmitAll()
    if name == "second-sight":
        return SecondSight(capacity)
    if name == "adaptive":
        return Adaptive(capacity)
    raise ValueError(f"unknown eviction policy {name!r}: choose one of {', '.join(POLICIES)}")
