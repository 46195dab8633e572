"""OpenTelemetry spans and metrics for Membrain I/O, at no cost when nothing is configured.

Spans (lookup, fetch, prefetch, save batch) are created on the runtime thread, parented on the context
captured on the thread that submitted the work. When no tracer provider has been installed, the submit
path captures nothing and the runtime opens no span at all: one global lookup per call. The server opens
one span per request (`server_span`), under the same rule.

Only the OpenTelemetry API is a dependency. `configure_from_env` installs the SDK's providers from the
standard OTEL_* variables when the SDK is there (`pip install membrain-async[otel]`) and they ask for it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Callable, Iterator

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace

_TRACER_NAME = "membrain_async"
_UNKNOWN = object()
log = logging.getLogger("membrain.telemetry")

# Prometheus buckets for every Membrain latency (server requests, disk I/O, the connector's timers):
# loopback round trips take tens of microseconds, loads of many MiB and stalled servers take seconds.
LATENCY_BUCKETS_S = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                     1.0, 2.5, 5.0, 10.0)


def tracing_enabled() -> bool:
    # trace.get_tracer_provider() consults os.environ on every call (~10-40 us): too slow for a hot
    # submit path. The global it returns is set once by set_tracer_provider(); read that directly.
    provider = getattr(trace, "_TRACER_PROVIDER", _UNKNOWN)
    if provider is None:
        return False
    if provider is _UNKNOWN:  # a future API without the global: take the slow, public road
        provider = trace.get_tracer_provider()
    return not isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider))


def capture_context() -> Any:
    """The submitting thread's context, or None when tracing is off."""
    return otel_context.get_current() if tracing_enabled() else None


@contextlib.contextmanager
def span(name: str, parent: Any, attributes: dict[str, Any]) -> Iterator[Any]:
    """A span parented on `parent` (from capture_context); a no-op when tracing is off."""
    if parent is None and not tracing_enabled():
        yield None
        return
    tracer = trace.get_tracer(_TRACER_NAME)
    with tracer.start_as_current_span(name, context=parent, attributes=attributes) as s:
        yield s


def set_attributes(s: Any, **attributes: Any) -> None:
    if s is not None:
        s.set_attributes({k: v for k, v in attributes.items() if v is not None})


class RuntimeMetrics:
    """OTel instruments fed by the runtime. Without a MeterProvider these are the API's no-op instruments."""

    def __init__(self, observe: Callable[[], dict[str, float]], meter_provider: Any = None):
        meter = (meter_provider or metrics.get_meter_provider()).get_meter(_TRACER_NAME)
        self.latency = meter.create_histogram("membrain.op.duration", unit="s", description="Membrain I/O latency by op")
        self.bytes = meter.create_counter("membrain.bytes", unit="By", description="Payload bytes moved, by direction")
        self.dropped = meter.create_counter("membrain.saves.dropped", description="Saves dropped (queue full or shutdown)")
        self.outcomes = meter.create_counter("membrain.ops", description="Operations by op and outcome")

        def gauge(name: str) -> Callable:
            def callback(options):
                yield metrics.Observation(observe().get(name, 0))

            return callback

        for name, desc in (
            ("write_behind_bytes", "Bytes queued for upload"),
            ("write_behind_items", "Saves queued for upload"),
            ("staging_bytes", "Bytes of prefetched pages held in staging"),
            ("inflight_jobs", "Jobs running on the runtime thread"),
        ):
            meter.create_observable_gauge(f"membrain.{name}", callbacks=[gauge(name)], description=desc)


def server_span(name: str, parent: Any, protocol: str) -> Any:
    """A server-side span for one request (None when tracing is off); `parent` from `extract_context`."""
    if not tracing_enabled():
        return None
    return trace.get_tracer(_TRACER_NAME).start_span(
        name, context=parent, kind=trace.SpanKind.SERVER, attributes={"membrain.protocol": protocol})


def end_server_span(s: Any, *, namespace: str | None, keys: int | None, tier: str, status: int | None,
                    error: BaseException | None) -> None:
    set_attributes(s, **{"membrain.namespace": namespace, "membrain.keys": keys, "membrain.tier": tier,
                         "membrain.status": status})
    if error is not None:
        s.set_status(trace.Status(trace.StatusCode.ERROR, str(error)))
    s.end()


def extract_context(headers: list[tuple[bytes, bytes]]) -> Any:
    """The W3C trace context an HTTP client sent (traceparent, tracestate), or None when tracing is off."""
    if not tracing_enabled():
        return None
    from opentelemetry import propagate

    carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in headers if k in (b"traceparent", b"tracestate")}
    return propagate.extract(carrier) if carrier else None


def _exporters(signal: str) -> list[str]:
    """The exporters OTEL_<SIGNAL>_EXPORTER names; unset, "otlp" where an OTLP endpoint is set (the spec's
    default exporter, taken only when the environment points somewhere), else none."""
    names = os.environ.get(f"OTEL_{signal.upper()}_EXPORTER")
    if names is None:
        endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get(
            f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT")
        return ["otlp"] if endpoint else []
    return [n.strip() for n in names.split(",") if n.strip() and n.strip() != "none"]


def _protocol(signal: str) -> str:
    # grpc unless told: the default of OpenTelemetry's Python distribution and of vLLM's --otlp-traces-endpoint
    # (which passes its endpoint to vLLM's child processes in OTEL_EXPORTER_OTLP_TRACES_ENDPOINT).
    return (os.environ.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_PROTOCOL")
            or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc")


def _span_exporter(name: str) -> Any:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if name != "otlp":
        raise ValueError(f"OTEL_TRACES_EXPORTER: unknown exporter {name!r} (otlp, console, none)")
    if _protocol("traces") == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    return OTLPSpanExporter()  # endpoint, headers, timeout: from the OTEL_EXPORTER_OTLP_* variables


def _metric_exporter(name: str) -> Any:
    if name == "console":
        from opentelemetry.sdk.metrics.export import ConsoleMetricExporter

        return ConsoleMetricExporter()
    if name != "otlp":
        raise ValueError(f"OTEL_METRICS_EXPORTER: unknown exporter {name!r} (otlp, console, none)")
    if _protocol("metrics") == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    return OTLPMetricExporter()


def _meter_provider_installed() -> bool:
    from opentelemetry.metrics import _internal  # the API keeps the installed provider there, as for traces

    return getattr(_internal, "_METER_PROVIDER", None) is not None


def configure_from_env(default_service_name: str) -> list[str]:
    """Install the SDK's tracer and meter providers as the OTEL_* variables ask; returns what was installed.

    Nothing happens when OTEL_SDK_DISABLED is true, when no variable asks for an exporter, when a provider
    is installed already (the host application's, or vLLM's --otlp-traces-endpoint), or when the SDK is
    not installed (then one warning says which extra to install). OTEL_SERVICE_NAME and
    OTEL_RESOURCE_ATTRIBUTES name the resource; the exporters read their own OTEL_EXPORTER_OTLP_* variables."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    traces, metrics_ = _exporters("traces"), _exporters("metrics")
    if tracing_enabled():
        traces = []
    if _meter_provider_installed():
        metrics_ = []
    if not traces and not metrics_:
        return []
    try:
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    except ImportError:
        log.warning("OTEL_* variables ask for telemetry, but opentelemetry-sdk is not installed: "
                    "pip install 'membrain-async[otel]'")
        return []
    attrs = {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: default_service_name}
    resource = Resource.create(attrs)  # merges OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME
    installed = []
    try:
        if traces:
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            provider = TracerProvider(resource=resource)
            for name in traces:
                provider.add_span_processor(BatchSpanProcessor(_span_exporter(name)))
            trace.set_tracer_provider(provider)
            installed += [f"traces:{n}" for n in traces]
        if metrics_:
            from opentelemetry.sdk.metrics import MeterProvider
            from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

            readers = [PeriodicExportingMetricReader(_metric_exporter(n)) for n in metrics_]
            metrics.set_meter_provider(MeterProvider(resource=resource, metric_readers=readers))
            installed += [f"metrics:{n}" for n in metrics_]
    except (ImportError, ValueError) as exc:
        log.warning("OpenTelemetry not configured from OTEL_* variables: %s", exc)
        return installed
    if installed:
        log.info("OpenTelemetry from OTEL_* variables: %s, service %s", ", ".join(installed),
                 resource.attributes.get(SERVICE_NAME))
    return installed
