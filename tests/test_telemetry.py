"""OpenTelemetry spans for one lookup + load + save sequence, parented on the submitting thread's span."""

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from membrain_async import telemetry
from membrain_async.config import ConnectorConfig
from membrain_async.cache import BlockStore


@pytest.fixture
def exporter(monkeypatch):
    exp = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exp))
    # The API allows setting the global provider once per process; tests swap it directly.
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", provider)
    yield exp
    provider.shutdown()


def test_no_provider_means_no_spans_and_no_context_capture():
    assert not telemetry.tracing_enabled() or isinstance(trace.get_tracer_provider(), TracerProvider)
    if not telemetry.tracing_enabled():
        assert telemetry.capture_context() is None


def test_spans_for_lookup_load_save(server, exporter):
    rt = BlockStore(ConnectorConfig.from_sources(env={}, overrides={"endpoint": server.url, "namespace": "otel"}))
    tracer = trace.get_tracer("test")
    try:
        with tracer.start_as_current_span("request") as parent:
            assert rt.save("b0", [b"x" * 1000])
            assert rt.flush(10)
            assert rt.lookup(["b0", "b1"]).wait(10)
            assert rt.fetch(["b0"]).wait(10)
    finally:
        rt.close()
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert {"membrain.lookup", "membrain.fetch", "membrain.save_batch"} <= spans.keys()
    parent_id = parent.get_span_context().span_id
    for name in ("membrain.lookup", "membrain.fetch", "membrain.save_batch"):
        assert spans[name].parent is not None and spans[name].parent.span_id == parent_id
        assert spans[name].attributes["membrain.namespace"] == "otel"
    lookup = spans["membrain.lookup"].attributes
    assert lookup["membrain.hit_keys"] == 1 and lookup["membrain.hit"] is True and lookup["membrain.outcome"] == "ok"
    assert spans["membrain.fetch"].attributes["membrain.bytes"] == 1000
    save = spans["membrain.save_batch"].attributes
    assert save["membrain.keys"] == 1 and save["membrain.stored"] == 1 and save["membrain.bytes"] == 1000


def test_runtime_metrics_queue_depth_drops_latency(server):
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    cfg = ConnectorConfig.from_sources(env={}, overrides={"endpoint": server.url, "write_behind_bytes": 2000})
    rt = BlockStore(cfg, meter_provider=provider)
    try:
        assert rt.lookup(["k"]).wait(10)
        accepted = [rt.save(f"s{i}", [bytes(1000)]) for i in range(10)]
        assert rt.flush(10)
    finally:
        rt.close()
    points = {}
    for rm in reader.get_metrics_data().resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                points[m.name] = list(m.data.data_points)
    assert sum(p.value for p in points["membrain.saves.dropped"]) == accepted.count(False) > 0
    latency_ops = {p.attributes["op"] for p in points["membrain.op.duration"]}
    assert {"lookup", "save_batch"} <= latency_ops
    assert "membrain.write_behind_bytes" in points and "membrain.staging_bytes" in points
    provider.shutdown()
