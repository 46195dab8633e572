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


def test_server_spans_one_per_request_under_the_clients_trace_context(exporter):
    import anyio
    import httpx

    from membrain_async.client import MembrainClient
    from membrain_async.server import embedded_server

    tracer = trace.get_tracer("test")
    with embedded_server(capacity="16MiB") as srv:
        with tracer.start_as_current_span("client") as parent:
            ctx = parent.get_span_context()
            traceparent = f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-01"
            with httpx.Client(base_url=srv.url, headers={"traceparent": traceparent}) as c:
                assert c.put("/memory/spans/k", content=b"v").status_code == 201
                assert c.get("/memory/spans/absent").status_code == 404  # a miss: not an error
                assert c.put("/memory/bad name/k", content=b"v").status_code == 400

        async def bulk():
            async with MembrainClient(srv.url, namespace="spans", timeout=10) as client:
                assert await client.lookup(["k", "x"]) == 1

        anyio.run(bulk)
    spans = exporter.get_finished_spans()
    by_name: dict = {}
    for s in spans:
        by_name.setdefault(s.name, []).append(s)
    put_ok, put_bad = by_name["membrain.server.put"]
    assert put_ok.parent.span_id == ctx.span_id and put_ok.context.trace_id == ctx.trace_id
    assert put_ok.kind == trace.SpanKind.SERVER and put_ok.attributes["membrain.namespace"] == "spans"
    assert put_ok.status.status_code == trace.StatusCode.UNSET
    assert put_bad.status.status_code == trace.StatusCode.ERROR and put_bad.attributes["membrain.status"] == 400
    (get,) = by_name["membrain.server.get"]
    assert get.status.status_code == trace.StatusCode.UNSET and get.attributes["membrain.tier"] == "ram"
    (lookup,) = by_name["membrain.server.lookup"]
    assert lookup.attributes["membrain.protocol"] == "bulk" and lookup.attributes["membrain.keys"] == 2


_CONFIGURE = """
import json, os
from opentelemetry import trace
from membrain_async import telemetry

out = {"unasked": telemetry.configure_from_env("x")}
os.environ["OTEL_TRACES_EXPORTER"] = os.environ["OTEL_METRICS_EXPORTER"] = "none"
os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = "http://127.0.0.1:9"
out["none"] = telemetry.configure_from_env("x")
del os.environ["OTEL_TRACES_EXPORTER"], os.environ["OTEL_METRICS_EXPORTER"]
os.environ["OTEL_SDK_DISABLED"] = "true"
out["disabled"] = telemetry.configure_from_env("x")
del os.environ["OTEL_SDK_DISABLED"]
os.environ["OTEL_SERVICE_NAME"] = "named-by-env"
out["endpoint"] = telemetry.configure_from_env("x")
provider = trace.get_tracer_provider()
out["service"] = provider.resource.attributes["service.name"]
out["exporter"] = type(provider._active_span_processor._span_processors[0].span_exporter).__module__
out["again"] = telemetry.configure_from_env("x")  # providers are installed: they are left alone
print(json.dumps(out))
"""


def test_configure_from_env_installs_what_the_otel_variables_ask_and_only_that():
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    r = subprocess.run([sys.executable, "-c", _CONFIGURE], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out == {"unasked": [], "none": [], "disabled": [], "endpoint": ["traces:otlp", "metrics:otlp"],
                   "service": "named-by-env", "exporter": "opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
                   "again": []}


def test_membrain_serve_exports_its_spans_over_otlp_where_the_variables_point(monkeypatch):
    """A real `membrain serve` with OTEL_EXPORTER_OTLP_ENDPOINT set, and a real HTTP listener as collector."""
    import httpx

    from membrain_async.server import embedded_server

    from ..monitoring import OtlpCollector

    collector = OtlpCollector()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.url)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")  # what the listener speaks
    monkeypatch.setenv("OTEL_SERVICE_NAME", "membrain-under-test")
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")  # ms: export soon, not after the default 5 s
    try:
        with embedded_server(mode="subprocess", capacity="16MiB") as srv:
            assert httpx.put(f"{srv.url}/memory/otlp/k", content=b"v").status_code == 201
            collector.wait_for_spans("membrain-under-test", {"membrain.server.put"})
    finally:
        collector.stop()
    assert set(collector.spans()) == {"membrain-under-test"}
