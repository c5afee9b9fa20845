"""A Prometheus endpoint a worker starts: ``celery worker --resilience-metrics-port 9808``.

Prefork pools run tasks in child processes, so counters use prometheus-client's
multiprocess mode: each child writes its own files under ``PROMETHEUS_MULTIPROC_DIR``
(a fresh temporary folder unless you set one) and the worker's main process serves the
sum. Without it every child would count alone and the endpoint would undercount.

It listens on every interface unless told otherwise (``--resilience-metrics-address``,
the ``resilient_tasks_metrics_address`` setting or ``RESILIENT_TASKS_METRICS_ADDR``).
Give each worker its own ``PROMETHEUS_MULTIPROC_DIR``: a starting worker empties it.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from typing import Any

from celery import bootsteps, signals

from .telemetry import STATE_CODES

__all__ = ["METRICS_ADDR_ENV", "METRICS_PORT_ENV", "MetricsStep", "PrometheusMetrics", "add_worker_option"]

log = logging.getLogger(__name__)

METRICS_PORT_ENV = "RESILIENT_TASKS_METRICS_PORT"
METRICS_ADDR_ENV = "RESILIENT_TASKS_METRICS_ADDR"
DEFAULT_ADDRESS = "0.0.0.0"
_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


class PrometheusMetrics:
    """The same counters and gauges as the OTel sink, as Prometheus series."""

    def __init__(self) -> None:
        self._made = False

    def _make(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self._outcomes = Counter(
            "resilience_outcomes", "Task calls by resilience outcome", ["outcome", "task", "downstream"]
        )
        self._state = Gauge(
            "resilience_breaker_state",
            "0 closed, 1 half-open, 2 open, 3 forced open",
            ["downstream"],
            multiprocess_mode="mostrecent",
        )
        self._ages = Histogram(
            "resilience_fallback_age_seconds",
            "Age of fallback values served",
            ["task", "downstream"],
            buckets=(1, 5, 15, 30, 60, 120, 300, 900),
        )
        self._made = True

    def outcome(self, outcome: str, task: str, downstream: str) -> None:
        if not self._made:
            self._make()
        self._outcomes.labels(outcome, task, downstream).inc()

    def breaker_state(self, downstream: str, state: str) -> None:
        if not self._made:
            self._make()
        self._state.labels(downstream).set(STATE_CODES.get(state, -1))

    def fallback_age(self, task: str, downstream: str, age_s: float) -> None:
        if not self._made:
            self._make()
        self._ages.labels(task, downstream).observe(age_s)


def _multiprocess_dir() -> str:
    """The folder the children write their counts to, set in the environment they inherit."""
    folder = os.environ.get(_DIR_ENV)
    if not folder:
        folder = tempfile.mkdtemp(prefix="rt-prometheus-")
        os.environ[_DIR_ENV] = folder
    else:
        os.makedirs(folder, exist_ok=True)
        for name in os.listdir(folder):  # counts of a previous run must not be summed in
            if name.endswith(".db"):
                os.unlink(os.path.join(folder, name))
    _use_multiprocess_values()
    return folder


def _use_multiprocess_values() -> None:
    """Make metrics made from now on write to the folder, even if prometheus_client came first.

    prometheus_client picks its value class when it is imported, from the environment.
    The ``celery`` command imports it before any worker option is read whenever Flower is
    installed (its ``celery flower`` entry point imports it), so every count would stay in
    the child that made it and ``/metrics`` would show none of them. Our metrics are made
    lazily, in the children, after this ran.
    """
    values: Any = sys.modules.get("prometheus_client.values")
    if values is None or getattr(values.ValueClass, "_multiprocess", False):
        return
    values.ValueClass = values.get_value_class()
    log.info("prometheus_client was imported before %s was set: switched it to multiprocess", _DIR_ENV)


class MetricsStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Worker bootstep: serve /metrics on the port given by option, setting or env."""

    def __init__(
        self,
        worker: Any,
        resilience_metrics_port: int | None = None,
        resilience_metrics_address: str | None = None,
        **options: Any,
    ) -> None:
        conf = worker.app.conf
        port = (
            resilience_metrics_port
            or conf.get("resilient_tasks_metrics_port")
            or os.environ.get(METRICS_PORT_ENV)
        )
        self.port = int(port) if port else None
        self.address = str(
            resilience_metrics_address
            or conf.get("resilient_tasks_metrics_address")
            or os.environ.get(METRICS_ADDR_ENV)
            or DEFAULT_ADDRESS
        )
        self.server: Any = None
        self.owned_dir: str | None = None
        if self.port is None:
            return
        had_dir = bool(os.environ.get(_DIR_ENV))
        folder = _multiprocess_dir()
        self.owned_dir = None if had_dir else folder
        from .runtime import runtime_for

        runtime = runtime_for(worker.app)
        if not any(isinstance(s, PrometheusMetrics) for s in runtime.sinks):
            runtime.sinks.append(PrometheusMetrics())

    def start(self, worker: Any) -> None:
        if self.port is None:
            return
        from prometheus_client import CollectorRegistry, start_http_server
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        self.server, _ = start_http_server(self.port, addr=self.address, registry=registry)
        log.warning("resilience metrics on http://%s:%s/metrics", self.address, self.port)

    def stop(self, worker: Any) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None
        if self.owned_dir:
            shutil.rmtree(self.owned_dir, ignore_errors=True)


def _child_exit(pid: int | None = None, **_: Any) -> None:
    if pid and os.environ.get(_DIR_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def add_worker_option(app: Any) -> None:
    """``--resilience-metrics-port`` on ``celery worker``, and the step that honours it."""
    from click import Option

    app.user_options["worker"].add(
        Option(
            ["--resilience-metrics-port"],
            type=int,
            default=None,
            help="Serve resilient-tasks Prometheus metrics on this port (multiprocess-safe).",
        )
    )
    app.user_options["worker"].add(
        Option(
            ["--resilience-metrics-address"],
            type=str,
            default=None,
            help=f"Address the metrics endpoint listens on (default {DEFAULT_ADDRESS}).",
        )
    )
    app.steps["worker"].add(MetricsStep)
    signals.worker_process_shutdown.connect(_child_exit, weak=False)
