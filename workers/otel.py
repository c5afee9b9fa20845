"""OpenTelemetry for the worker fleet: traces and metrics to an OTLP collector.

``setup()`` does nothing unless ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set and the OTel SDK,
the OTLP exporter and the Celery instrumentation are importable, so the same worker runs
with or without a collector. When it does act, it only connects Celery signals: the
providers are built in the process that runs tasks, after any fork. A
``BatchSpanProcessor`` thread or a gRPC channel made before the prefork pool forks does
not survive in the children (the OTel Celery docs configure in ``worker_process_init``
for that reason); pools that do not fork (threads, solo) configure in ``worker_init``.

Service name: ``OTEL_SERVICE_NAME``, else ``resilient-tasks-worker``. Protocol:
``OTEL_EXPORTER_OTLP_PROTOCOL`` (``grpc``, the default, or ``http/protobuf``); the
exporters read the endpoint and their other ``OTEL_EXPORTER_OTLP_*`` settings themselves.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from typing import Any

from celery import signals

__all__ = ["DEFAULT_SERVICE_NAME", "configure", "setup"]

log = logging.getLogger(__name__)

ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_ENDPOINT"
SERVICE_ENV = "OTEL_SERVICE_NAME"
PROTOCOL_ENV = "OTEL_EXPORTER_OTLP_PROTOCOL"
DEFAULT_SERVICE_NAME = "resilient-tasks-worker"
_EXPORTERS = {
    "grpc": "opentelemetry.exporter.otlp.proto.grpc",
    "http/protobuf": "opentelemetry.exporter.otlp.proto.http",
}
_configured_pid: int | None = None
_providers: list[Any] = []


def _exporter_package() -> str | None:
    """The OTLP exporter package for the configured protocol, if it is importable."""
    protocol = os.environ.get(PROTOCOL_ENV, "grpc").strip() or "grpc"
    package = _EXPORTERS.get(protocol)
    if package is None:
        log.warning("OpenTelemetry off: %s=%r is not one of %s", PROTOCOL_ENV, protocol, list(_EXPORTERS))
        return None
    # find_spec, not import: a process that never runs tasks (Flower, the CLI) stays light.
    needed = (f"{package}.trace_exporter", "opentelemetry.sdk.trace", "opentelemetry.instrumentation.celery")
    for name in needed:
        try:
            found = importlib.util.find_spec(name) is not None
        except ImportError:
            found = False
        if not found:
            log.info("OpenTelemetry off: %s is not installed", name)
            return None
    return package


def setup() -> bool:
    """Connect the worker signals that start OpenTelemetry; False when it stays off."""
    if not os.environ.get(ENDPOINT_ENV):
        return False
    if _exporter_package() is None:
        return False
    signals.worker_init.connect(_on_worker_init, weak=False, dispatch_uid="rt-otel-worker-init")
    signals.worker_process_init.connect(_on_process_init, weak=False, dispatch_uid="rt-otel-process-init")
    signals.worker_process_shutdown.connect(_flush, weak=False, dispatch_uid="rt-otel-process-shutdown")
    signals.worker_shutdown.connect(_flush, weak=False, dispatch_uid="rt-otel-worker-shutdown")
    return True


def _forks(worker: Any) -> bool:
    """Does this worker run tasks in forked children (the prefork pool)?"""
    from celery.concurrency import get_implementation
    from celery.concurrency.prefork import TaskPool

    pool = get_implementation(getattr(worker, "pool_cls", None) or worker.app.conf.worker_pool)
    return isinstance(pool, type) and issubclass(pool, TaskPool)


def _on_worker_init(sender: Any = None, **_: Any) -> None:
    if sender is not None and not _forks(sender):
        configure()


def _on_process_init(**_: Any) -> None:
    configure()


def configure() -> bool:
    """Install the tracer and meter providers and instrument Celery, once per process."""
    global _configured_pid
    if _configured_pid == os.getpid():
        return False
    package = _exporter_package()
    if package is None:
        return False
    from opentelemetry import metrics, trace
    from opentelemetry.instrumentation.celery import CeleryInstrumentor
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    span_exporter = importlib.import_module(f"{package}.trace_exporter").OTLPSpanExporter()
    metric_exporter = importlib.import_module(f"{package}.metric_exporter").OTLPMetricExporter()
    resource = Resource.create({SERVICE_NAME: os.environ.get(SERVICE_ENV) or DEFAULT_SERVICE_NAME})
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(BatchSpanProcessor(span_exporter))
    meter_provider = MeterProvider(
        resource=resource, metric_readers=[PeriodicExportingMetricReader(metric_exporter)]
    )
    trace.set_tracer_provider(tracer_provider)
    metrics.set_meter_provider(meter_provider)
    CeleryInstrumentor().instrument()  # type: ignore[no-untyped-call]
    _providers[:] = [tracer_provider, meter_provider]
    _configured_pid = os.getpid()
    log.info("OpenTelemetry: exporting to %s", os.environ.get(ENDPOINT_ENV))
    return True


def _flush(**_: Any) -> None:
    """Export what is still batched before the process exits."""
    if _configured_pid != os.getpid():
        return
    for provider in _providers:
        try:
            provider.shutdown()
        except Exception as exc:  # a collector that is down must not block the exit
            log.warning("OpenTelemetry shutdown: %s", exc)


# Importing this module is the wiring: ``workers/app.py`` imports it once.
setup()
