"""Optional OpenTelemetry tracing: one span per Check, parented on the ``traceparent`` Envoy forwards.

Needs the ``tracing`` extra (``pip install 'ext-authz[tracing]'``). Disabled (the default), nothing
here is imported or called on the request path. Enabled, spans go to the tracer provider the process
already has (e.g. set up by ``opentelemetry-instrument``), or else to an OTLP/HTTP exporter
configured by the standard ``OTEL_EXPORTER_OTLP_*`` environment variables.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

from ext_authz.model import Allow, Decision, reason_of


class TracingUnavailable(Exception):
    """tracing.enabled is set but the OpenTelemetry packages are not installed."""


class SpanRecorder:
    def __init__(self, span: Any) -> None:
        self._span = span

    def record(self, decision: Decision) -> None:
        allowed = isinstance(decision, Allow)
        self._span.set_attribute("ext_authz.decision", "allow" if allowed else "deny")
        self._span.set_attribute(
            "http.response.status_code", 200 if isinstance(decision, Allow) else decision.status
        )
        self._span.set_attribute("ext_authz.reason", reason_of(decision))
        self._span.set_attribute("ext_authz.rule", decision.rule)
        if decision.provider:
            self._span.set_attribute("ext_authz.provider", decision.provider)


class Tracing:
    def __init__(self, service_name: str, tracer_provider: Any = None) -> None:
        try:
            from opentelemetry import trace
            from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
        except ImportError:
            raise TracingUnavailable("install the tracing extra: pip install 'ext-authz[tracing]'") from None
        if tracer_provider is None:
            tracer_provider = trace.get_tracer_provider()
            if type(tracer_provider).__name__ in ("ProxyTracerProvider", "NoOpTracerProvider"):
                tracer_provider = _otlp_provider(service_name)
        self._tracer = tracer_provider.get_tracer("ext_authz")
        self._propagator = TraceContextTextMapPropagator()
        self._kind = trace.SpanKind.SERVER

    @contextlib.contextmanager
    def check_span(self, headers: Mapping[str, str]) -> Iterator[SpanRecorder]:
        parent = self._propagator.extract(carrier=headers)
        with self._tracer.start_as_current_span("ext_authz Check", context=parent, kind=self._kind) as span:
            yield SpanRecorder(span)


def _otlp_provider(service_name: str) -> Any:
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        raise TracingUnavailable("install the tracing extra: pip install 'ext-authz[tracing]'") from None
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider
