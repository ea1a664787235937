"""Tracing set-up from the standard `OTEL_*` environment variables; off unless asked for.

Tracing is on when `OTEL_TRACES_EXPORTER` names an exporter (`otlp`, `console`) or an OTLP
endpoint is set (`OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`), and
`OTEL_SDK_DISABLED` is not `true`. Otherwise no tracer provider is installed: the tracing
middleware sees the API's proxy provider and costs one isinstance check per request.

The OTel SDK itself reads the rest: the exporter's endpoint, headers, timeout and
compression (`OTEL_EXPORTER_OTLP_*`), the sampler (`OTEL_TRACES_SAMPLER[_ARG]`), the batch
processor (`OTEL_BSP_*`) and the resource (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`).
The protocol is `http/protobuf` (default) or `grpc`, which needs the
`opentelemetry-exporter-otlp-proto-grpc` package.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from opentelemetry import trace

from common.errors import QuiverError

logger = logging.getLogger(__name__)

EXPORTERS = ("otlp", "console", "none")
PROTOCOLS = ("http/protobuf", "grpc")


class TelemetryConfigError(QuiverError):
    """An `OTEL_*` variable asks for something Quiver cannot do."""


def wanted_exporters(env: Mapping[str, str]) -> list[str]:
    """The span exporters the environment asks for; [] when tracing stays off."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    names = [name.strip().lower() for name in env.get("OTEL_TRACES_EXPORTER", "").split(",")
             if name.strip()]
    if not names:
        has_endpoint = env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        return ["otlp"] if has_endpoint else []
    unknown = [name for name in names if name not in EXPORTERS]
    if unknown:
        raise TelemetryConfigError(
            f"OTEL_TRACES_EXPORTER={env['OTEL_TRACES_EXPORTER']!r}: unknown exporter "
            f"{', '.join(unknown)} (use {', '.join(EXPORTERS)})")
    return [name for name in names if name != "none"]


def otlp_protocol(env: Mapping[str, str]) -> str:
    protocol = (env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf").strip().lower()
    if protocol not in PROTOCOLS:
        raise TelemetryConfigError(
            f"OTLP protocol {protocol!r} is not supported (use {' or '.join(PROTOCOLS)})")
    return protocol


def _exporter(name: str, env: Mapping[str, str]) -> Any:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if otlp_protocol(env) == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        except ImportError as exc:
            raise TelemetryConfigError(
                "OTLP over gRPC needs `pip install opentelemetry-exporter-otlp-proto-grpc`; "
                "or set OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf") from exc
        return OTLPSpanExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


def _resource(default_service_name: str, env: Mapping[str, str]) -> Any:
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource

    named = env.get("OTEL_SERVICE_NAME") or "service.name=" in env.get(
        "OTEL_RESOURCE_ATTRIBUTES", "")
    return Resource.create({} if named else {SERVICE_NAME: default_service_name})


def configure_tracing(default_service_name: str,
                      env: Mapping[str, str] | None = None) -> Any | None:
    """Install an SDK tracer provider when the environment asks for traces.

    Returns the provider (call `shutdown()` on it at exit to flush the last spans), or
    None when tracing stays off.
    """
    env = os.environ if env is None else env
    names = wanted_exporters(env)
    if not names:
        return None
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    exporters = [_exporter(name, env) for name in names]
    provider = TracerProvider(resource=_resource(default_service_name, env))
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    logger.info("tracing on: %s exporter(s), service %s", ", ".join(names),
                provider.resource.attributes.get("service.name"))
    return provider


def shutdown_tracing(provider: Any | None) -> None:
    if provider is not None:
        provider.shutdown()
