"""Prometheus text exposition of the server's counters (no client library needed for a handful of series)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .service import Service

_NS_SERIES = [
    ("keys", "gauge", "Keys stored"),
    ("bytes", "gauge", "Bytes of values stored"),
    ("hits", "counter", "Keys found by get or prefix lookup"),
    ("misses", "counter", "Gets or lookups that missed"),
    ("puts", "counter", "Values stored"),
    ("evictions", "counter", "Values evicted to stay within capacity"),
    ("deletes", "counter", "Values deleted"),
    ("refused", "counter", "Puts of new keys not stored by the admission policy (--eviction)"),
]


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_prometheus(service: "Service") -> str:
    store, c = service.store, service.counters
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP membrain_{name} {help_}")
        lines.append(f"# TYPE membrain_{name} {kind}")
        for labels, value in samples:
            lines.append(f"membrain_{name}{labels} {value}")

    for field, kind, help_ in _NS_SERIES:
        suffix = "_total" if kind == "counter" else ""
        samples = [
            (f'{{namespace="{_escape(ns)}"}}', getattr(st, field)) for ns, st in sorted(store.namespaces.items())
        ]
        metric(f"namespace_{field}{suffix}", kind, help_, samples)
    metric("capacity_bytes", "gauge", "Configured store capacity", [("", store.capacity)])
    metric("used_bytes", "gauge", "Bytes of values stored", [("", store.used)])
    metric("bytes_in_total", "counter", "Value bytes received", [("", store.totals.bytes_in)])
    metric("bytes_out_total", "counter", "Value bytes served", [("", store.totals.bytes_out)])
    metric("connections_open", "gauge", "Open client connections", [("", c.connections_open)])
    metric("connections_total", "counter", "Accepted client connections", [("", c.connections_total)])
    metric("connections_refused_total", "counter", "Connections closed at once (limit reached)", [("", c.connections_refused)])
    metric("tls_handshake_failures_total", "counter", "TLS handshakes that failed or timed out", [("", c.tls_handshake_failures)])
    metric("http_requests_total", "counter", "HTTP requests", [("", c.http_requests)])
    metric("bulk_frames_total", "counter", "Bulk protocol frames", [("", c.bulk_frames)])
    tiers = service.tier_stats()
    for name, kind, help_ in (("bytes", "gauge", "Bytes of values held by each tier"),
                              ("keys", "gauge", "Values held by each tier"),
                              ("hits", "counter", "Gets and lookups answered by each tier"),
                              ("evictions", "counter", "Values evicted from each tier (from RAM: to disk if it has one)")):
        suffix = "_total" if kind == "counter" else ""
        metric(f"tier_{name}{suffix}", kind, help_,
               [(f'{{tier="{t}"}}', v.get(name, 0)) for t, v in tiers.items()])
    if "disk" in tiers:
        d = tiers["disk"]
        metric("disk_capacity_bytes", "gauge", "Configured disk tier capacity", [("", d["capacity"])])
        metric("disk_degraded", "gauge", "1 while the disk tier is off after a write failure (RAM only)",
               [("", int(d["state"] != "ok"))])
        for name, help_ in (("writes", "Records written to the disk tier"),
                            ("write_bytes", "Bytes written to the disk tier"),
                            ("misses_corrupt", "Disk records that failed their read or checksum (served as misses)"),
                            ("spill_dropped", "Values evicted from RAM that never reached disk"),
                            ("segments_reclaimed", "Disk segments reclaimed to stay within capacity")):
            metric(f"disk_{name}_total", "counter", help_, [("", d[name])])
    metric(
        "errors_total",
        "counter",
        "Requests refused, by status",
        [(f'{{status="{code}"}}', n) for code, n in sorted(c.errors.items())],
    )
    return "\n".join(lines) + "\n"
