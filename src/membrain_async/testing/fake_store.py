"""An in-memory `SchedulerStore` for the scheduler half's policy tests: no server, no thread, no clock.

Like vLLM's tests of its OffloadingManager, the scheduler half is driven directly; what the store holds and
when each lookup is answered are the test's to say:

    store = FakeSchedulerStore()
    sched = MembrainScheduler(config, store, ...)
    store.put(sched.keys_for(hashes[:3]))       # what the store holds
    ...                                         # the scheduler half sends lookups; they stay pending
    store.answer()                              # the store answers every pending lookup, oldest first
    store.answer(outcome="unavailable")         # or the server could not be reached

Answers are completed as `cache.store.BlockStore` completes them (see vllm/scheduler/store.py): the
returned `MembrainFuture` is set first, then one `Completion("lookup", tag, value, outcome, latency_s)`
lands in the caller's `CompletionRing`. An "ok" answer counts what `stored` holds when `answer()` runs:
the leading keys of a key list, the hit (`cache.prefix_query.hit_blocks`) of a `PrefixQuery`, one count per
query of a `lookup_many` job. A failed job ("unavailable", "timeout", "error") fails its future with
the exception the real store's would carry (`MembrainUnavailable`, `TimeoutError`, a refusal), which is
also the completion's value; "cancelled" cancels it. tests/unit/test_fake_store.py holds both stores to this.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from ..cache.outcome import Outcome
from ..cache.prefix_query import PrefixQuery, hit_blocks
from ..client.errors import MembrainRequestError, MembrainUnavailable
from ..runtime.future import MembrainFuture
from ..runtime.ring import Completion, CompletionRing

OUTCOMES = (Outcome.OK, Outcome.UNAVAILABLE, Outcome.TIMEOUT, Outcome.ERROR, Outcome.CANCELLED)


@dataclass
class FakeLookup:
    """One lookup job as the store received it."""

    many: bool  # sent with lookup_many (one count per query), else lookup (one count)
    queries: list  # list[list[str] | PrefixQuery]
    tag: Any
    ring: CompletionRing | None
    future: MembrainFuture
    outcome: str = ""  # once answered


class FakeSchedulerStore:
    def __init__(self, stored: Iterable[str] = ()):
        self.stored: set[str] = set(stored)
        self.sent: list[FakeLookup] = []  # every job received, in order, answered or not
        self._pending: deque[FakeLookup] = deque()
        self._lock = threading.Lock()  # lookups sent on arrival come from another thread

    # ------------------------------------------------------------------ what the store holds

    def put(self, keys: Iterable[str]) -> None:
        self.stored.update(keys)

    def discard(self, keys: Iterable[str]) -> None:
        self.stored.difference_update(keys)

    def count(self, query: "Sequence[str] | PrefixQuery") -> int:
        """What an "ok" answer to `query` is now."""
        if isinstance(query, PrefixQuery):
            return hit_blocks(query, [k in self.stored for k in query.all_keys()])
        n = 0
        for key in query:
            if key not in self.stored:
                break
            n += 1
        return n

    # ------------------------------------------------------------------ SchedulerStore

    def lookup(self, keys: "Sequence[str] | PrefixQuery", *, tag: Any = None,
               ring: CompletionRing | None = None) -> MembrainFuture:
        return self._receive(False, [self._query(keys)], tag, ring)

    def lookup_many(self, key_lists: "Sequence[Sequence[str] | PrefixQuery]", *, tag: Any = None,
                    ring: CompletionRing | None = None) -> MembrainFuture:
        return self._receive(True, [self._query(k) for k in key_lists], tag, ring)

    @staticmethod
    def _query(keys: "Sequence[str] | PrefixQuery") -> "list[str] | PrefixQuery":
        return keys if isinstance(keys, PrefixQuery) else list(keys)

    def _receive(self, many: bool, queries: list, tag: Any, ring: CompletionRing | None) -> MembrainFuture:
        job = FakeLookup(many, queries, tag, ring, MembrainFuture(tag))
        with self._lock:
            self.sent.append(job)
            self._pending.append(job)
        return job.future

    # ------------------------------------------------------------------ the test's side

    @property
    def pending(self) -> int:
        return len(self._pending)

    def answer(self, jobs: int | None = None, *, outcome: str = "ok", latency_s: float = 0.001) -> list[FakeLookup]:
        """Complete the oldest `jobs` pending lookups (all by default) with `outcome`; returns them."""
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome {outcome!r}: one of {OUTCOMES}")
        done = []
        with self._lock:
            while self._pending and (jobs is None or len(done) < jobs):
                done.append(self._pending.popleft())
        for job in done:
            self._complete(job, outcome, latency_s)
        return done

    def _complete(self, job: FakeLookup, outcome: str, latency_s: float) -> None:
        outcome = Outcome(outcome)
        job.outcome = outcome
        value: Any
        if outcome == "ok":
            counts = [self.count(q) for q in job.queries]
            value = counts if job.many else counts[0]
            job.future.set_result(value)
        elif outcome == "cancelled":
            value = None
            job.future.cancel()
        else:
            value = {
                "unavailable": lambda: MembrainUnavailable("fake store: the server could not be reached"),
                "timeout": lambda: TimeoutError(),
                "error": lambda: MembrainRequestError(500, "fake store: refused"),
            }[outcome]()
            job.future.set_exception(value)
        if job.ring is not None:
            job.ring.push(Completion("lookup", job.tag, value, outcome, latency_s))
