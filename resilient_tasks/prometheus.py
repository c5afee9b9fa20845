"""A Prometheus endpoint a worker starts: ``celery worker --resilience-metrics-port 9808``.

It listens on 127.0.0.1 unless told otherwise (``--resilience-metrics-address``, the
``resilient_tasks_metrics_address`` setting or ``RESILIENT_TASKS_METRICS_ADDR``): give
``0.0.0.0`` for a Prometheus on another host or container.

Prefork pools run tasks in child processes, so the counters use prometheus-client's
documented multiprocess mode: every process writes its own files under
``PROMETHEUS_MULTIPROC_DIR``, the worker's main process serves their sum through a
``MultiProcessCollector``, and a pool process that exits is marked dead. Without it every
child would count alone and the endpoint would undercount.

- ``PROMETHEUS_MULTIPROC_DIR`` set when the worker starts: that directory is used as it
  is, and nothing in it is ever deleted. As prometheus-client requires, give each worker
  its own and empty it before each start: files already there are summed in (the worker
  warns when it finds some).
- Not set: the worker makes a temporary directory, sets the variable for its pool
  processes and removes the directory when it exits. prometheus-client reads the variable
  once, when it is imported, and the ``celery`` command imports it before any worker option
  is read whenever Flower is installed (its ``celery flower`` entry point does). A worker
  started by the ``celery`` command then restarts itself once, in the same process
  (``exec``, same command line), with the variable set. Anywhere else (a worker embedded
  in a program) that is an error: set the variable before prometheus_client is imported.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import sys
import tempfile
import weakref
from collections.abc import Callable
from typing import Any, NoReturn

from celery import bootsteps, signals
from celery.exceptions import ImproperlyConfigured

from .telemetry import STATE_CODES

__all__ = [
    "BREAKER_STATE_HELP",
    "DEFAULT_ADDRESS",
    "METRICS_ADDR_ENV",
    "METRICS_PORT_ENV",
    "MULTIPROC_DIR_ENV",
    "UNKNOWN_STATE",
    "MetricsStep",
    "PrometheusMetrics",
    "add_worker_option",
]

log = logging.getLogger(__name__)

METRICS_PORT_ENV = "RESILIENT_TASKS_METRICS_PORT"
METRICS_ADDR_ENV = "RESILIENT_TASKS_METRICS_ADDR"
DEFAULT_ADDRESS = "127.0.0.1"
MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: The directory a worker made for itself before restarting with it (see the module text).
OWN_DIR_ENV = "RESILIENT_TASKS_METRICS_OWN_DIR"
#: The gauge's value for a state ``STATE_CODES`` does not know.
UNKNOWN_STATE = -1
BREAKER_STATE_HELP = "Breaker state: " + ", ".join(
    f"{code} {name.replace('_', ' ')}" for name, code in [*STATE_CODES.items(), ("unknown", UNKNOWN_STATE)]
)


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
            "resilience_breaker_state", BREAKER_STATE_HELP, ["downstream"], multiprocess_mode="mostrecent"
        )
        self._ages = Histogram(
            "resilience_fallback_age_seconds",
            "Age of fallback values served",
            ["task", "downstream"],
            buckets=(1, 5, 15, 30, 60, 120, 300, 900),
        )
        self._events = Counter(
            "resilience_events",
            "Events to alert on (store_amnesia: the store lost its data; end_lost: a completion "
            "could not be written; policy_reload_refused; store_misconfigured: a wrong password "
            "or a missing ACL right; fallback_tampered)",
            ["event", "downstream"],
        )
        self._made = True

    def outcome(self, outcome: str, task: str, downstream: str) -> None:
        if not self._made:
            self._make()
        self._outcomes.labels(outcome, task, downstream).inc()

    def breaker_state(self, downstream: str, state: str) -> None:
        if not self._made:
            self._make()
        self._state.labels(downstream).set(STATE_CODES.get(state, UNKNOWN_STATE))

    def fallback_age(self, task: str, downstream: str, age_s: float) -> None:
        if not self._made:
            self._make()
        self._ages.labels(task, downstream).observe(age_s)

    def event(self, name: str, downstream: str) -> None:
        if not self._made:
            self._make()
        self._events.labels(name, downstream).inc()


#: The directory this worker serves, inherited by its forked pool processes.
_serving: dict[str, str] = {}


def _multiprocess_dir() -> tuple[str, bool]:
    """The directory of prometheus-client's multiprocess mode, and whether we made it."""
    own = os.environ.pop(OWN_DIR_ENV, None)
    folder = os.environ.get(MULTIPROC_DIR_ENV)
    if folder:
        if own and os.path.realpath(own) == os.path.realpath(folder):
            return folder, True  # made before this worker restarted itself with it
        os.makedirs(folder, exist_ok=True)
        found = sorted(name for name in os.listdir(folder) if name.endswith(".db"))
        if found:
            log.warning(
                "%s=%s already holds %d .db file(s) (%s): their counts are summed into this worker's. "
                "Empty it before each start, one directory per worker, as prometheus-client's "
                "multiprocess mode requires; resilient-tasks never deletes files it did not make",
                MULTIPROC_DIR_ENV,
                folder,
                len(found),
                ", ".join(found[:3]) + (", ..." if len(found) > 3 else ""),
            )
        return folder, False
    if "prometheus_client" in sys.modules:
        _restart_with_own_dir()
    folder = tempfile.mkdtemp(prefix="rt-prometheus-")
    os.environ[MULTIPROC_DIR_ENV] = folder
    return folder, True


def _celery_command() -> bool:
    """True inside the ``celery`` command, which an ``exec`` of the same command line restarts."""
    argv0 = sys.argv[0] if sys.argv else ""
    return os.path.basename(argv0) == "celery" or argv0.endswith(os.path.join("celery", "__main__.py"))


def _restart_with_own_dir() -> NoReturn:
    """prometheus_client came first: run this worker again, in this process, with the variable set."""
    if not _celery_command() or os.name != "posix":
        raise ImproperlyConfigured(
            f"prometheus_client was imported before {MULTIPROC_DIR_ENV} was set, so it counts in "
            "each process apart and the resilience metrics endpoint would undercount: set "
            f"{MULTIPROC_DIR_ENV} to an empty directory before the program starts (or before it "
            "imports prometheus_client)"
        )
    folder = tempfile.mkdtemp(prefix="rt-prometheus-")
    os.environ[MULTIPROC_DIR_ENV] = folder
    os.environ[OWN_DIR_ENV] = folder
    log.info(
        "prometheus_client was imported before %s was set (the celery command imports it when Flower "
        "is installed): restarting this worker once with %s=%s, so that every pool process is counted",
        MULTIPROC_DIR_ENV,
        MULTIPROC_DIR_ENV,
        folder,
    )
    for handler in logging.getLogger().handlers + log.handlers:
        handler.flush()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def _remove_at_exit(folder: str) -> None:
    """Remove the directory we made when this process (not a forked child) exits."""
    owner = os.getpid()

    def remove() -> None:
        if os.getpid() == owner:
            shutil.rmtree(folder, ignore_errors=True)

    atexit.register(remove)


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
        self.folder: str | None = None
        if self.port is None:
            return
        self.folder, owned = _multiprocess_dir()
        if owned:
            _remove_at_exit(self.folder)
        _serving["folder"] = self.folder
        sinks = _SINKS_OF[worker.app](worker.app) if worker.app in _SINKS_OF else None
        if sinks is not None and not any(isinstance(s, PrometheusMetrics) for s in sinks):
            sinks.append(PrometheusMetrics())

    def start(self, worker: Any) -> None:
        if self.port is None:
            return
        from prometheus_client import CollectorRegistry, multiprocess, start_http_server

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=self.folder)  # type: ignore[no-untyped-call]
        self.server, _ = start_http_server(self.port, addr=self.address, registry=registry)
        log.warning(
            "resilience metrics on http://%s:%s/metrics from the files in %s",
            self.address,
            self.port,
            self.folder,
        )

    def stop(self, worker: Any) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None


def _child_exit(pid: int | None = None, **_: Any) -> None:
    """A pool process is exiting: prometheus-client's bookkeeping for a dead process."""
    folder = _serving.get("folder")
    if pid and folder:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, folder)  # type: ignore[no-untyped-call]


#: Per app, where its metrics sinks live (the runtime's list): handed in by ``install``,
#: so this module needs nothing of the runtime's.
_SINKS_OF: weakref.WeakKeyDictionary[Any, Callable[[Any], list[Any]]] = weakref.WeakKeyDictionary()


def add_worker_option(app: Any, sinks_of: Callable[[Any], list[Any]]) -> None:
    """``--resilience-metrics-port`` and ``--resilience-metrics-address`` on ``celery worker``;
    ``sinks_of(app)`` is the list the Prometheus sink joins when the endpoint starts."""
    from click import Option

    _SINKS_OF[app] = sinks_of
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
            help=f"Address the metrics endpoint listens on (default {DEFAULT_ADDRESS}; 0.0.0.0 for all).",
        )
    )
    app.steps["worker"].add(MetricsStep)
    signals.worker_process_shutdown.connect(_child_exit, weak=False)
