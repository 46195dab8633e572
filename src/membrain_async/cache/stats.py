"""What the block store counts. Every outcome is counted in one place (`BlockStore`), so a dead server,
a miss, a failed call and a corrupt page each have their own counter."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass
class StoreStats:
    # lookups (a lookup_many of n key lists counts n)
    lookups: int = 0
    lookups_unavailable: int = 0  # the server was unreachable: the future failed with MembrainUnavailable
    lookup_errors: int = 0  # the server refused or the call failed otherwise: the caller sees the error
    lookup_timeouts: int = 0  # past the lookup deadline
    # fetches and loads, per key
    fetched_bytes: int = 0
    hot_hits: int = 0
    prefetch_used: int = 0
    fetch_shared: int = 0  # keys a load copied from another load receiving them at that moment (asked once)
    fetch_misses: int = 0  # keys the server does not hold: the caller gets None
    fetch_unavailable: int = 0  # keys not fetched, the server unreachable: the job fails with MembrainUnavailable
    fetch_errors: int = 0  # keys not fetched, the call failed otherwise (refusal, protocol): the job fails
    fetch_timeouts: int = 0  # fetch or load jobs past their deadline
    # prefetch
    prefetches: int = 0
    prefetch_skipped: int = 0  # nothing new to fetch, or staging full
    prefetch_unavailable: int = 0
    # saves
    saves_queued: int = 0
    saves_dropped: int = 0  # write-behind full, or shut down
    saves_skipped_present: int = 0
    saves_uploaded: int = 0
    saves_failed: int = 0  # includes saves_unavailable
    saves_unavailable: int = 0
    saved_bytes: int = 0
    upload_batches: int = 0
    # corrupt pages: forget() is called by a reader whose page failed its check
    forgotten: int = 0
    latency_s: dict = field(default_factory=dict)  # op -> recent latencies (bounded)

    def record_latency(self, op: str, seconds: float) -> None:
        window = self.latency_s.setdefault(op, deque(maxlen=1024))
        window.append(seconds)

    def counters(self) -> dict[str, int]:
        return {k: v for k, v in self.__dict__.items() if k != "latency_s"}

    def percentiles(self) -> dict[str, float]:
        out = {}
        for op, window in list(self.latency_s.items()):
            values = sorted(window)
            if values:
                out[f"{op}_p50_ms"] = values[len(values) // 2] * 1e3
                out[f"{op}_p99_ms"] = values[min(len(values) - 1, int(len(values) * 0.99))] * 1e3
        return out
