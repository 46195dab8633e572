"""OpenTelemetry spans and metrics for Membrain I/O, at no cost when nothing is configured.

Spans (lookup, fetch, prefetch, save batch) are created on the runtime thread, parented on the context
captured on the thread that submitted the work. When no tracer provider has been installed, the submit
path captures nothing and the runtime opens no span at all: one global lookup per call.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace

_TRACER_NAME = "membrain_async"
_UNKNOWN = object()


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
