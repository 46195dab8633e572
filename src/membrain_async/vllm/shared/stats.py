"""Connector stats for vLLM's logging and Prometheus pipeline.

Both halves report msgpack-friendly dicts: counters as numbers, timers as lists of observations in
seconds. vLLM aggregates the workers' and the scheduler's (numbers added, lists joined), ships them to the
front end, which rebuilds a `MembrainConnectorStats` for the periodic "KV Transfer metrics" log line and
feeds `MembrainPromMetrics`: counters become `vllm:membrain_*_total`, timers histograms (`_bucket`, `_sum`,
`_count`) in vLLM's registry, with vLLM's per-engine labels. docs/monitoring.md lists them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats

from ...telemetry import LATENCY_BUCKETS_S

# counter name in the stats dict -> (Prometheus name, help)
COUNTERS = {
    "lookups": ("vllm:membrain_lookups", "Prefix lookups answered by Membrain"),
    "lookup_timeouts": ("vllm:membrain_lookup_timeouts", "Lookups that missed the lookup deadline (treated as misses)"),
    "lookup_unavailable": (
        "vllm:membrain_lookup_unavailable", "Lookups the server could not answer (unreachable or breaker open); served as misses"
    ),
    "lookup_jobs": ("vllm:membrain_lookup_jobs", "Lookup jobs sent (requests that arrive together share one)"),
    "lookup_errors": ("vllm:membrain_lookup_errors", "Lookups refused or failed otherwise; served as misses"),
    "hot_lookups": (
        "vllm:membrain_hot_lookups",
        "Requests not looked up: this instance had recently loaded or saved every block asked about (its hot tier)",
    ),
    "query_tokens": ("vllm:membrain_query_tokens", "Prompt tokens asked about (beyond the local prefix cache)"),
    "hit_tokens": ("vllm:membrain_hit_tokens", "Prompt tokens loaded from Membrain instead of computed"),
    "hit_blocks": ("vllm:membrain_hit_blocks", "Blocks loaded from Membrain"),
    "miss_blocks": ("vllm:membrain_miss_blocks", "Looked-up blocks Membrain did not have"),
    "loaded_blocks": ("vllm:membrain_loaded_blocks", "Blocks copied into the KV cache"),
    "loaded_bytes": ("vllm:membrain_loaded_bytes", "Payload bytes loaded"),
    "load_error_blocks": ("vllm:membrain_load_error_blocks", "Blocks that failed to load (missing, late, corrupt) and were recomputed"),
    "load_errors_corrupt": ("vllm:membrain_load_errors_corrupt", "Blocks refused on load: bad header, length, checksum or key"),
    "load_errors_timeout": ("vllm:membrain_load_errors_timeout", "Blocks not loaded within VLLM_MEMBRAIN_LOAD_DEADLINE"),
    "load_errors_unavailable": (
        "vllm:membrain_load_errors_unavailable", "Blocks whose server could not be reached (down, breaker open)"
    ),
    "load_errors_error": ("vllm:membrain_load_errors_error", "Blocks whose fetch failed otherwise (connection lost mid-reply, refused)"),
    "load_errors_missing": ("vllm:membrain_load_errors_missing", "Blocks gone from the server between lookup and load"),
    "loads_cancelled": ("vllm:membrain_loads_cancelled", "Loads stopped because their request finished or was aborted first"),
    "save_blocks_planned": ("vllm:membrain_save_blocks_planned", "Newly full blocks planned for saving"),
    "saved_blocks": ("vllm:membrain_saved_blocks", "Blocks handed to the write-behind queue"),
    "saved_bytes": ("vllm:membrain_saved_bytes", "Payload bytes handed to the write-behind queue"),
    "dropped_saves": ("vllm:membrain_dropped_saves", "Saves dropped because the write-behind queue was full"),
    "saves_skipped_after_load_error": (
        "vllm:membrain_saves_skipped_after_load_error",
        "Blocks not saved because a load of the same request failed in that step (their KV is recomputed)",
    ),
    "saves_discarded_unfilled": (
        "vllm:membrain_saves_discarded_unfilled",
        "Planned saves never uploaded: their request's blocks included one that failed to load, on some rank",
    ),
    "save_copies_discarded": (
        "vllm:membrain_save_copies_discarded",
        "Staged page copies (per rank) thrown away by their step's verdict",
    ),
    "saves_unconfirmed": (
        "vllm:membrain_saves_unconfirmed", "Staged saves dropped because their step's verdict never came (or at shutdown)"
    ),
    "reloads_recomputed": (
        "vllm:membrain_reloads_recomputed",
        "Requests whose Membrain hit failed to load: recomputed from the first failed block, never loaded again",
    ),
    "evicted_unfilled_blocks": (
        "vllm:membrain_evicted_unfilled_blocks",
        "Blocks dropped from vLLM's prefix cache after a failed load (the failed blocks and all computed after them)",
    ),
    "lookup_waits": (
        "vllm:membrain_lookup_waits",
        "Scheduling passes in which a request sat out because its lookup had not been answered yet",
    ),
    "loads_deferred": (
        "vllm:membrain_loads_deferred", "Hits held back a step because the step's loads reached VLLM_MEMBRAIN_STEP_LOAD_BYTES"
    ),
    "uploaded_blocks": ("vllm:membrain_uploaded_blocks", "Saved blocks the server acknowledged (or already held)"),
    "upload_failed_blocks": ("vllm:membrain_upload_failed_blocks", "Saved blocks whose upload failed (server down, refused)"),
    "handoff_polls": (
        "vllm:membrain_handoff_polls",
        "Lookups sent again because the store held fewer blocks than a prefill instance announced (kv_transfer_params)",
    ),
    "handoff_timeouts": (
        "vllm:membrain_handoff_timeouts",
        "Decode requests that stopped waiting for a prefill's blocks at VLLM_MEMBRAIN_HANDOFF_DEADLINE (the rest computed)",
    ),
    "host_buffers_allocated": (
        "vllm:membrain_host_buffers_allocated",
        "Host buffers a worker allocated for loads or saves because no pooled one fitted (each pays page faults on first use)",
    ),
    "uploads_dropped": ("vllm:membrain_uploads_dropped", "Queued saves never sent: still queued when the drain deadline of a shutdown passed"),
}
# timer name in the stats dict (a list of seconds) -> (Prometheus histogram name, help)
TIMERS = {
    "lookup_seconds": (
        "vllm:membrain_lookup_seconds", "Time from a request's arrival to the step that used its lookup's answer"
    ),
    "lookup_rtt_seconds": (
        "vllm:membrain_lookup_rtt_seconds", "Time each lookup job took on the Membrain thread (one job per arrival batch)"
    ),
    "load_seconds": (
        "vllm:membrain_load_seconds",
        "Time from a request's load submission to its pages being in place (fetch, check, copy), per worker rank",
    ),
    "load_wait_seconds": (
        "vllm:membrain_load_wait_seconds", "Time a sync-mode step waited for its loads before the forward pass, per rank"
    ),
    "save_copy_seconds": ("vllm:membrain_save_copy_seconds", "Time a step spent copying pages out for saving, per rank"),
}


@dataclass
class MembrainConnectorStats(KVConnectorStats):
    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> "MembrainConnectorStats":
        merged = dict(self.data)
        for k, v in (other.data or {}).items():
            if k in TIMERS:
                merged[k] = [*merged.get(k, ()), *v]  # new lists: the operands stay as they were
            else:
                merged[k] = merged.get(k, 0) + v
        return MembrainConnectorStats(data=merged)

    def reduce(self) -> dict[str, int | float]:
        d = self.data
        out: dict[str, int | float] = {k: d[k] for k in COUNTERS if d.get(k)}
        for key, label in (("lookup_seconds", "avg_lookup_ms"), ("lookup_rtt_seconds", "avg_lookup_rtt_ms"),
                           ("load_seconds", "avg_load_ms")):
            if d.get(key):
                out[label] = round(1e3 * sum(d[key]) / len(d[key]), 3)
        queried = d.get("query_tokens", 0)
        if queried:
            out["hit_rate"] = round(d.get("hit_tokens", 0) / queried, 4)
        return out

    def is_empty(self) -> bool:
        return not any(self.data.values())


class MembrainPromMetrics(KVConnectorPromMetrics):
    """Created through vLLM's metric classes (`metric_types`), so vLLM's multiprocess mode works; every
    engine's series exist from the start (zero), so dashboards and alerts see them before the first load."""

    def __init__(self, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._counters: dict[tuple[int, str], Any] = {}
        self._histograms: dict[tuple[int, str], Any] = {}
        for key, (name, doc) in COUNTERS.items():
            counter = self._counter_cls(name=name, documentation=doc, labelnames=labelnames)
            for engine_idx, values in per_engine_labelvalues.items():
                self._counters[(engine_idx, key)] = counter.labels(*values)
        for key, (name, doc) in TIMERS.items():
            histogram = self._histogram_cls(name=name, documentation=doc, labelnames=labelnames,
                                            buckets=LATENCY_BUCKETS_S)
            for engine_idx, values in per_engine_labelvalues.items():
                self._histograms[(engine_idx, key)] = histogram.labels(*values)

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for key, value in transfer_stats_data.items():
            if not value:
                continue
            histogram = self._histograms.get((engine_idx, key))
            if histogram is not None:
                for seconds in value:
                    histogram.observe(seconds)
                continue
            counter = self._counters.get((engine_idx, key))
            if counter is not None:
                counter.inc(value)
