"""The server's Prometheus exposition: prometheus_client families in a registry of the server's own.

Counters and histograms are plain numbers updated on the event loop (no lock, no label lookup per
request); a custom collector turns them, and the store's and disk's figures, into metric families at
scrape time. The scrape runs on the same event loop, so every figure of one scrape is of one moment.
docs/monitoring.md lists every series.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import Counter
from typing import TYPE_CHECKING, Any, Iterator

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from .. import __version__, telemetry
from ..telemetry import LATENCY_BUCKETS_S

if TYPE_CHECKING:
    from .service import Service

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# The operations whose latency is kept; the others (stats, info, ping...) are only counted. Those of
# DISK_OPS may need the disk tier's values or index (tier="disk"); a put or delete never waits for the disk.
TIMED_OPS = ("get", "put", "lookup", "exists", "delete", "head")
DISK_OPS = ("get", "lookup", "exists", "head")
DISK_IO = ("read", "write")


class LatencyHistogram:
    """Bucket counts for one label set. `observe` is a bisect and two additions: cheap enough per request."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS_S) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        # bisect_left: a value equal to a bound falls in that bound's bucket (Prometheus' `le`).
        self.counts[bisect_left(LATENCY_BUCKETS_S, seconds)] += 1
        self.sum += seconds

    def cumulative(self) -> list[tuple[str, int]]:
        out, total = [], 0
        for bound, n in zip([*map(str, LATENCY_BUCKETS_S), "+Inf"], self.counts):
            total += n
            out.append((bound, total))
        return out


class RequestObservation:
    """One request, from its decoded head to its reply sent: timed, counted, and a span when tracing is on.

    The front end opens it (`ServerMetrics.request`) and names the op; the service marks `tier = "disk"`
    when the answer needed values or index entries only the disk tier held."""

    __slots__ = ("metrics", "protocol", "op", "tier", "t0", "span", "namespace", "keys")

    def __init__(self, metrics: "ServerMetrics", protocol: str, op: str, parent: Any = None):
        self.metrics = metrics
        self.protocol = protocol
        self.op = op
        self.tier = "ram"
        self.namespace: str | None = None
        self.keys: int | None = None
        self.span = telemetry.server_span(f"membrain.server.{op}", parent, protocol)
        self.t0 = time.perf_counter()

    def __enter__(self) -> "RequestObservation":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        m = self.metrics
        m.requests[(self.protocol, self.op)] += 1
        status = getattr(exc, "status", None) if exc is not None else None
        if exc is None:
            hist = m.latency.get((self.op, self.tier))
            if hist is not None:
                hist.observe(time.perf_counter() - self.t0)
        elif status is not None:
            m.errors[(self.protocol, self.op, status)] += 1
        if self.span is not None:
            telemetry.end_server_span(self.span, namespace=self.namespace, keys=self.keys, tier=self.tier,
                                      status=status, error=exc)


class ServerMetrics:
    """What the server counts for Prometheus beyond the store's own counters, and the registry that shows it."""

    def __init__(self, service: "Service", disk: bool):
        self.requests: Counter = Counter()  # (protocol, op)
        self.errors: Counter = Counter()  # (protocol, op, status): refusals; a miss is not one
        self.keys: Counter = Counter()  # (op, "hit" | "miss"): keys asked for by get, lookup, exists, head
        self.latency = {(op, "ram"): LatencyHistogram() for op in TIMED_OPS}
        if disk:
            self.latency.update({(op, "disk"): LatencyHistogram() for op in DISK_OPS})
        self.disk_io = {kind: LatencyHistogram() for kind in DISK_IO} if disk else {}
        self.registry = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.registry.register(_ServerCollector(service, self))

    def request(self, protocol: str, op: str, parent: Any = None) -> RequestObservation:
        return RequestObservation(self, protocol, op, parent)

    def count_refusal(self, protocol: str, op: str, status: int) -> None:
        """A request refused before it had an op (unknown route, malformed HTTP or frame)."""
        self.requests[(protocol, op)] += 1
        self.errors[(protocol, op, status)] += 1

    def count_keys(self, op: str, hits: int, misses: int) -> None:
        self.keys[(op, "hit")] += hits
        self.keys[(op, "miss")] += misses

    def request_totals(self) -> dict:
        """The /v1/stats view: requests by protocol, refusals by status."""
        errors: Counter = Counter()
        for (_, _, status), n in self.errors.items():
            errors[str(status)] += n
        return {"http_requests": sum(n for (p, _), n in self.requests.items() if p == "http"),
                "bulk_frames": sum(n for (p, _), n in self.requests.items() if p == "bulk"),
                "errors": dict(errors)}

    def observe_disk_io(self, kind: str, seconds: float) -> None:
        self.disk_io[kind].observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _ServerCollector(Collector):
    def __init__(self, service: "Service", metrics: ServerMetrics):
        self.service = service
        self.metrics = metrics

    def collect(self) -> Iterator[Any]:
        svc, m = self.service, self.metrics
        store, c = svc.store, svc.counters
        yield InfoMetricFamily("membrain_build", "The server's version", value={"version": __version__})

        yield from _namespace_families(store)
        yield from _tier_families(svc)
        yield from _arena_families(store)
        if svc.disk is not None:
            yield from _disk_families(svc.disk.stats_dict(), store.spill_pending, m)

        def counter(name: str, doc: str, labels: list[str], samples) -> CounterMetricFamily:
            fam = CounterMetricFamily(name, doc, labels=labels)
            for values, n in samples:
                fam.add_metric(list(values), n)
            return fam

        yield counter("membrain_requests", "Requests and bulk frames received, by protocol and op",
                      ["protocol", "op"], sorted(m.requests.items()))
        yield counter("membrain_request_errors", "Requests refused (4xx, 5xx), by protocol, op and status; "
                      "a miss is not an error", ["protocol", "op", "status"],
                      sorted(((p, op, str(s)), n) for (p, op, s), n in m.errors.items()))
        yield counter("membrain_requested_keys", "Keys asked for by get, lookup, exists and head: found (hit) "
                      "or not (miss); a lookup's misses are the keys after its prefix", ["op", "result"],
                      sorted(m.keys.items()))
        hist = HistogramMetricFamily("membrain_request_duration_seconds",
                                     "Time from a request's head to its reply sent, for requests answered "
                                     "without error; tier: disk when the answer needed the disk tier",
                                     labels=["op", "tier"])
        for (op, tier), h in m.latency.items():
            hist.add_metric([op, tier], h.cumulative(), h.sum)
        yield hist
        yield counter("membrain_values_not_stored", "Put values not stored: larger than the capacity "
                      "(too_large), or no slot free without waiting (no_room)", ["reason"],
                      [(("too_large",), store.totals.rejected), (("no_room",), store.totals.no_room)])
        yield GaugeMetricFamily("membrain_connections", "Open client connections", value=c.connections_open)
        yield counter("membrain_connections_accepted", "Client connections accepted", [],
                      [((), c.connections_total)])
        yield counter("membrain_connections_refused", "Connections closed at once: --max-connections reached",
                      [], [((), c.connections_refused)])
        yield counter("membrain_tls_handshake_failures", "TLS handshakes that failed or timed out", [],
                      [((), c.tls_handshake_failures)])
        yield counter("membrain_value_bytes_received", "Value bytes received by puts", [],
                      [((), store.totals.bytes_in)])
        yield counter("membrain_value_bytes_sent", "Value bytes served by gets", [], [((), store.totals.bytes_out)])
        policy = store.policy.stats()
        mode = GaugeMetricFamily("membrain_admission_mode", "1 for the admission mode in force (--eviction; "
                                 "adaptive switches between lru and second-sight)", labels=["policy", "mode"])
        mode.add_metric([policy["policy"], policy.get("mode", policy["policy"])], 1)
        yield mode


def _namespace_families(store) -> Iterator[Any]:
    series = (
        ("keys", "gauge", "Values stored in RAM, by namespace"),
        ("bytes", "gauge", "Bytes of values stored in RAM, by namespace"),
        ("hits", "counter", "Keys found by gets and lookups (RAM or disk), by namespace"),
        ("misses", "counter", "Gets of absent keys, and lookups that stopped before their last key, by namespace"),
        ("puts", "counter", "Values stored by puts, by namespace"),
        ("evictions", "counter", "Values evicted from RAM, by namespace"),
        ("deletes", "counter", "Values deleted, by namespace"),
        ("refused", "counter", "Puts of new keys the admission policy did not store (--eviction), by namespace"),
    )
    for field, kind, doc in series:
        cls = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
        fam = cls(f"membrain_namespace_{field}", doc, labels=["namespace"])
        for ns, st in sorted(store.namespaces.items()):
            fam.add_metric([ns], getattr(st, field))
        yield fam
    quota = GaugeMetricFamily("membrain_namespace_quota_bytes", "A namespace's share of RAM (auth file quota)",
                              labels=["namespace"])
    for ns, nbytes in sorted(store.quotas.items()):
        quota.add_metric([ns], nbytes)
    yield quota


def _tier_families(svc) -> Iterator[Any]:
    tiers = svc.tier_stats()
    for name, cls, doc in (
        ("capacity_bytes", GaugeMetricFamily, "Configured capacity of each tier (--capacity, --disk-capacity)"),
        ("bytes", GaugeMetricFamily, "Bytes of values held by each tier"),
        ("keys", GaugeMetricFamily, "Values held by each tier"),
        ("hits", CounterMetricFamily, "Values served by each tier (gets and lookups)"),
        ("evictions", CounterMetricFamily, "Values evicted from each tier (from RAM: to disk if it has one)"),
    ):
        fam = cls(f"membrain_tier_{name}", doc, labels=["tier"])
        field = "capacity" if name == "capacity_bytes" else name
        for tier, stats in tiers.items():
            fam.add_metric([tier], stats.get(field, 0))
        yield fam


def _arena_families(store) -> Iterator[Any]:
    a = store.arena.stats()
    yield GaugeMetricFamily("membrain_arena_mapped_bytes", "Memory mapped for value slabs (at most the RAM capacity)",
                            value=a["mapped"])
    yield GaugeMetricFamily("membrain_arena_free_slot_bytes", "Mapped bytes in free slots: reusable by values of "
                            "their slab's size class only (the arena's fragmentation)", value=a["free_slot_bytes"])
    yield GaugeMetricFamily("membrain_arena_slabs", "Slabs mapped", value=a["slabs"])
    yield GaugeMetricFamily("membrain_arena_size_classes", "Size classes with at least one slab",
                            value=len(a["classes"]))
    created = CounterMetricFamily("membrain_arena_slabs_created", "Slabs mapped since start")
    created.add_metric([], a["slabs_created"])
    yield created
    moved = CounterMetricFamily("membrain_arena_slabs_moved", "Empty slabs re-carved for another size class")
    moved.add_metric([], a["slabs_moved"])
    yield moved


def _disk_families(d: dict, spill_pending: int, m: ServerMetrics) -> Iterator[Any]:
    yield GaugeMetricFamily("membrain_disk_degraded", "1 while the disk tier is off after a write failure (RAM only)",
                            value=int(d["state"] != "ok"))
    yield GaugeMetricFamily("membrain_disk_segments", "Segment files of the disk tier", value=d["segments"])
    yield GaugeMetricFamily("membrain_disk_write_queue", "Values waiting for their disk write", value=d["queued"])
    yield GaugeMetricFamily("membrain_disk_spill_pending_bytes", "RAM slots of evicted values kept until their "
                            "disk write ends", value=spill_pending)
    for name, field, doc in (
        ("writes", "writes", "Records written to the disk tier"),
        ("write_bytes", "write_bytes", "Bytes written to the disk tier"),
        ("read_bytes", "read_bytes", "Bytes read back from the disk tier"),
        ("corrupt_reads", "misses_corrupt", "Disk records that failed their read or checksum (served as misses)"),
        ("spill_dropped", "spill_dropped", "Values evicted from RAM that never reached the disk"),
        ("segments_reclaimed", "segments_reclaimed", "Disk segments reclaimed to stay within --disk-capacity"),
        ("prefetched", "prefetched", "Values read back into RAM after a lookup found them on disk only"),
    ):
        fam = CounterMetricFamily(f"membrain_disk_{name}", doc)
        fam.add_metric([], d[field])
        yield fam
    io = HistogramMetricFamily("membrain_disk_io_seconds", "Disk tier read and write jobs, waiting for a worker "
                               "thread included", labels=["op"])
    for kind, h in m.disk_io.items():
        io.add_metric([kind], h.cumulative(), h.sum)
    yield io
