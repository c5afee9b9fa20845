"""What ``ResilientTask`` costs over a plain Celery task: throughput, store round trips,
server commands and CPU per task, every variant side by side in one thread-pool worker.

- One Celery app and one worker configuration serve every variant, so only the task
  class and its policy differ between them.
- The broker and result backend live on one private redis-server, the resilience store
  on a second one, so the store server's ``INFO commandstats`` holds store traffic only.
- One in-process worker (thread pool) serves the whole run. A measurement publishes N
  messages to the variant's own queue while the worker listens elsewhere, then tells it
  to consume that queue (``add_consumer``), and times from the first ``task_prerun`` to
  the last ``task_postrun``: the worker-side cost per task, where the middleware runs.
- Variants run interleaved, their order rotated every round and reversed after each
  full rotation, so drift hits all of them alike; ``ratio_vs_plain`` is the median of
  per-round ratios. ``plain_control`` (opt-in) is a second plain task: an A/A test whose
  ratio shows the noise floor of the machine.
- Store round trips are counted on the wire (every request redis-py writes on a store
  connection: exact), by the store (``RedisStore.trips``, and the ops of each ``batch``)
  and on the server (``INFO commandstats``, which also counts the commands the Lua
  scripts run).
- CPU per task (this process plus both redis-servers) is reported beside throughput: it
  moves far less than throughput when other work shares the machine.
- ``store_floor`` is plain Celery whose body runs the library's own ``Claim`` and
  ``Complete`` through the store, one ``batch`` each, and nothing else: ``idempotency``
  minus ``store_floor`` is what the guard chain costs.
- ``all_guards_otel`` runs inside a recording OpenTelemetry span opened and closed by
  ``task_prerun``/``task_postrun`` handlers, as ``opentelemetry-instrumentation-celery``
  does; ``ratio_vs_all_guards`` is the span's cost. A global SDK ``MeterProvider`` is set
  for the whole run, so every ResilientTask variant feeds live OTel counters.
- ``--rejection N`` forces a ``when_open="fail"`` breaker open and runs N tasks: round
  trips per rejected task, and whether the body ran (it must not).

Add a variant by adding its policy to ``VARIANTS``.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import logging
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery, Task, signals
from opentelemetry import context as otel_context
from opentelemetry import metrics as otel_metrics
from opentelemetry import trace as otel_trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, NumberDataPoint
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

import resilient_tasks as rt
from resilient_tasks.store.protocol import Claim, Complete, Op
from resilient_tasks.store.redis import RedisStore
from resilient_tasks.testing import RedisServer, in_process_worker

from .policies import POLICIES, all_guards_policy

Body = Callable[[int], int]

#: Commands the benchmark itself sends to the store server (``CONFIG RESETSTAT``, ``INFO``,
#: ``DBSIZE``); left out of the command counts. Redis 7 names subcommands ``config|get``.
ADMIN_COMMANDS = frozenset({"config", "info", "dbsize"})

#: Not a ``ResilientTask``: plain Celery whose body makes the store calls itself.
STORE_FLOOR = "store_floor"
#: Each variant's policy (``None``: a plain Celery task).
VARIANTS: dict[str, rt.TaskPolicy | None] = {
    "plain": None,
    "retry_policy": rt.TaskPolicy(idempotent=True, retry=rt.RetryPolicy()),
    STORE_FLOOR: None,
    **{name: policy for name, policy in POLICIES.items() if name != "plain"},
    "all_guards_otel": all_guards_policy("bench-ds3"),
    "plain_control": None,
}
#: Run when ``--variants`` is not given.
DEFAULT_VARIANTS = tuple(name for name in VARIANTS if name != "plain_control")
#: The variant whose tasks run inside a recording OpenTelemetry span.
OTEL_VARIANT = "all_guards_otel"
#: Variants also compared, round by round, with a variant other than plain.
REFERENCES = {OTEL_VARIANT: "all_guards"}
#: Store round trips per successful task, as designed (checked against ``RedisStore.trips``).
ROUND_TRIPS = {"plain": 0.0, "retry_policy": 0.0, STORE_FLOOR: 2.0, "idempotency": 2.0,
               "breaker": 2.0, "all_guards": 2.0, OTEL_VARIANT: 2.0, "plain_control": 0.0}
#: A rejection by an open breaker: one round trip at most, and the body never runs.
REJECTION_MAX_ROUNDTRIPS = 1.0

#: The task of the ``--rejection`` measurement: its breaker is forced open.
REJECTED = "breaker_rejected"
REJECTED_DOWNSTREAM = "bench-ds-rejected"
LEASE_MS, TTL_MS = 60_000, 600_000


def task_of(app: Celery, variant: str, body: Body, policy: rt.TaskPolicy | None) -> Task:
    """Register ``bench.<variant>``, a task ``(n: int) -> int`` returning ``body(n)``: a
    ``ResilientTask`` with ``policy``, or plain Celery when it is ``None``."""

    def run(n: int) -> int:
        return body(n)

    options: dict[str, Any] = {} if policy is None else {"base": rt.ResilientTask, "policy": policy}
    return app.task(name=f"bench.{variant}", **options)(run)


def store_floor(store: RedisStore, body: Body) -> Body:
    """``body`` after the library's own claim and complete, one ``batch`` each, for a key
    hashed as a task's would be: the store's side of an idempotent task, no guards."""
    owner = f"bench-{os.getpid()}"

    def with_store(n: int) -> int:
        record = hashlib.sha256(f'["bench.{STORE_FLOOR}",{n}]'.encode()).hexdigest()
        (claimed,) = store.batch([Claim(record, owner, LEASE_MS, TTL_MS)])
        result = body(n)
        store.batch([Complete(record, owner, claimed.token, json.dumps(result), TTL_MS)])
        return result

    return with_store


def rejected_task(app: Celery, body: Body) -> Task:
    def counted(n: int) -> int:
        COUNTERS.add("body_runs")
        return body(n)

    policy = rt.TaskPolicy(downstream=REJECTED_DOWNSTREAM,
                           breaker=rt.BreakerPolicy(min_calls=1_000_000, when_open="fail"))
    return task_of(app, REJECTED, counted, policy)


def make_body(sleep_ms: float) -> Body:
    """Trivial work by default; ``--sleep-ms`` stands in for a downstream call's latency."""
    if sleep_ms <= 0:
        return lambda n: n + 1
    seconds = sleep_ms / 1000

    def body(n: int) -> int:
        time.sleep(seconds)
        return n + 1

    return body


def orders(variants: Sequence[str], rounds: int) -> Iterator[list[str]]:
    """Variant order per round: rotated each round, reversed after each full rotation,
    so over ``2 * len(variants)`` rounds each variant is first, and follows each other
    variant, equally often."""
    size = len(variants)
    for index in range(rounds):
        shift = index % size
        order = list(variants[shift:]) + list(variants[:shift])
        yield order[::-1] if (index // size) % 2 else order


class Counters:
    """Tallies shared by worker threads, the heartbeat thread and the main thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, int] = {}

    def add(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self._values[name] = self._values.get(name, 0) + amount

    def take(self) -> dict[str, int]:
        """Return the tallies since the last ``take`` and start again from zero."""
        with self._lock:
            values, self._values = self._values, {}
        return values


COUNTERS = Counters()
#: Spans the exporter saw; apart from ``COUNTERS``, which every measurement resets.
SPAN_COUNTS = Counters()


class DiscardingExporter(SpanExporter):
    """Drops spans, counting them and those that carry the library's attributes."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        tagged = sum(1 for span in spans if "resilience.breaker.name" in (span.attributes or {}))
        SPAN_COUNTS.add("exported", len(spans))
        SPAN_COUNTS.add("tagged", tagged)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


class OTelSpans:
    """A recording span around each execution of one task, the way
    ``opentelemetry-instrumentation-celery`` opens it: started and made current in
    ``task_prerun``, detached and ended in ``task_postrun`` (same worker thread).

    Spans go to an SDK ``TracerProvider`` with a ``BatchSpanProcessor`` whose exporter
    discards them. Handlers are filtered to one task name, so other variants pay only
    the name check.
    """

    def __init__(self, task_name: str) -> None:
        self.task_name = task_name
        self.provider = TracerProvider()
        self.provider.add_span_processor(BatchSpanProcessor(DiscardingExporter()))
        self.tracer = self.provider.get_tracer("benchmarks.overhead")
        self._open: dict[str, tuple[Any, object]] = {}
        signals.task_prerun.connect(self.on_prerun, weak=False)
        signals.task_postrun.connect(self.on_postrun, weak=False)

    def on_prerun(self, sender: Any = None, task_id: str | None = None, **_: Any) -> None:
        if getattr(sender, "name", None) != self.task_name or task_id is None:
            return
        span = self.tracer.start_span(f"run/{self.task_name}", kind=otel_trace.SpanKind.CONSUMER)
        token = otel_context.attach(otel_trace.set_span_in_context(span))
        self._open[task_id] = (span, token)

    def on_postrun(self, sender: Any = None, task_id: str | None = None, state: str | None = None,
                   **_: Any) -> None:
        if getattr(sender, "name", None) != self.task_name or task_id is None:
            return
        found = self._open.pop(task_id, None)
        if found is None:
            return
        span, token = found
        span.set_attributes({"celery.task_name": self.task_name, "celery.state": str(state),
                             "messaging.message.id": task_id})
        otel_context.detach(token)  # type: ignore[arg-type]
        span.end()

    def close(self) -> None:
        signals.task_prerun.disconnect(self.on_prerun)
        signals.task_postrun.disconnect(self.on_postrun)
        self.provider.shutdown()


#: The global SDK meter provider's reader, set once per process by ``live_metrics``.
METRIC_READER: InMemoryMetricReader | None = None


def live_metrics() -> InMemoryMetricReader:
    """A global SDK ``MeterProvider``, so the library's OTel metric sink records for every
    ResilientTask variant (its meter is the global proxy, so order vs ``install`` is free)."""
    global METRIC_READER
    if METRIC_READER is None:
        METRIC_READER = InMemoryMetricReader()
        otel_metrics.set_meter_provider(MeterProvider(metric_readers=[METRIC_READER]))
    return METRIC_READER


def counted_outcomes(reader: InMemoryMetricReader) -> dict[str, int]:
    """``resilience.outcomes`` as recorded by the SDK: calls per task and outcome."""
    found: dict[str, int] = {}
    data = reader.get_metrics_data()
    for resource in data.resource_metrics if data else ():
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name != "resilience.outcomes":
                    continue
                for point in metric.data.data_points:
                    if not isinstance(point, NumberDataPoint):
                        continue
                    attrs = point.attributes or {}
                    key = f"{attrs.get('task')}:{attrs.get('outcome')}"
                    found[key] = found.get(key, 0) + int(point.value)
    return found


class CountingConnection(redis.connection.Connection):
    """A store connection that counts the requests redis-py writes on it: each batch's
    one write, and connection set-up (SELECT, the epoch check) too."""

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        COUNTERS.add("wire")
        super().send_packed_command(command, check_health)  # type: ignore[no-untyped-call]


class CountingStore(RedisStore):
    """The library's store, counting the operations of each batch (the workers are
    threads of this process)."""

    def batch(self, ops: Sequence[Op]) -> list[Any]:
        COUNTERS.add("ops", len(ops))
        return super().batch(ops)


class Window:
    """First start and last end of one task name's executions, seen from the worker."""

    def __init__(self, name: str, expected: int) -> None:
        self.name = name
        self.expected = expected
        self.first: float | None = None
        self.last = 0.0
        self.finished = 0
        self.succeeded = 0
        self.done = threading.Event()
        self._lock = threading.Lock()

    def on_prerun(self, sender: Any = None, **_: Any) -> None:
        if getattr(sender, "name", None) == self.name:
            now = time.perf_counter()
            with self._lock:
                if self.first is None:
                    self.first = now

    def on_success(self, sender: Any = None, **_: Any) -> None:
        if getattr(sender, "name", None) == self.name:
            with self._lock:
                self.succeeded += 1

    def on_postrun(self, sender: Any = None, **_: Any) -> None:
        if getattr(sender, "name", None) == self.name:
            now = time.perf_counter()
            with self._lock:
                self.last = max(self.last, now)
                self.finished += 1
                if self.finished >= self.expected:
                    self.done.set()

    @contextmanager
    def listening(self) -> Iterator[Window]:
        hooks = (
            (signals.task_prerun, self.on_prerun),
            (signals.task_success, self.on_success),
            (signals.task_postrun, self.on_postrun),
        )
        for signal, hook in hooks:
            signal.connect(hook, weak=False)
        try:
            yield self
        finally:
            for signal, hook in hooks:
                signal.disconnect(hook)


@dataclass
class Sample:
    """One variant's measurement in one round."""

    variant: str
    tasks: int
    seconds: float
    succeeded: int
    counters: dict[str, int]
    commandstats: dict[str, int]
    store_keys: int
    cpu_s: float
    redis_cpu_s: float

    @property
    def tasks_per_s(self) -> float:
        return self.tasks / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class Settings:
    tasks: int
    rounds: int
    warmup: int
    concurrency: int
    prefetch: int
    timeout: float
    sleep_ms: float = 0.0
    verbose: bool = False
    rejection: int = 0


IDLE_QUEUE = "bench.idle"


def queue_of(variant: str) -> str:
    return f"bench.{variant}"


class Bench:
    """The apps, the one worker every variant shares, and the measuring loop.

    The worker runs for the whole benchmark, listening to an idle queue. A measurement
    publishes a batch to the variant's own queue, then tells the worker to consume it
    (``add_consumer``), so the batch is waiting in full when consumption starts and no
    worker start-up or shutdown falls between measurements.
    """

    def __init__(self, settings: Settings, variants: Sequence[str],
                 broker: RedisServer, store: RedisServer) -> None:
        self.settings = settings
        self.variants = list(variants)
        self.app = Celery("bench", broker=broker.url(0), backend=broker.url(1),
                          set_as_current=False)
        self.app.conf.update(
            # polling_interval is kombu's BRPOP timeout: a queue added by add_consumer is
            # polled from the next BRPOP, so keep the idle wait short (default 1 s).
            broker_transport_options={"visibility_timeout": 3600, "polling_interval": 0.05},
            worker_prefetch_multiplier=settings.prefetch,
            broker_connection_retry_on_startup=True,
            result_expires=600,
        )
        self.store = CountingStore(store.url(0), connection_class=CountingConnection)
        rt.install(self.app, redis_url=store.url(0), store=self.store)
        body = make_body(settings.sleep_ms)
        self.tasks = {
            name: task_of(self.app, name, store_floor(self.store, body) if name == STORE_FLOOR else body,
                          VARIANTS[name])
            for name in self.variants
        }
        if settings.rejection > 0:
            self.tasks[REJECTED] = rejected_task(self.app, body)
        self.spans = OTelSpans(self.tasks[OTEL_VARIANT].name) if OTEL_VARIANT in self.tasks else None
        self.app.finalize()
        # A separate client app without a result backend publishes: the worker app's
        # Redis backend would SUBSCRIBE to every task's result channel on publish.
        self.client = Celery("bench-client", broker=broker.url(0), set_as_current=False)
        self.client.conf.update(task_serializer="json", broker_connection_retry_on_startup=True)
        self.store_admin = store.client()
        self.results_admin = broker.client(1)
        self._next_n = 0
        self.redis_version = str(self.store_admin.info("server")["redis_version"])

    def close(self) -> None:
        if self.spans is not None:
            self.spans.close()
        self.store.close()
        self.store_admin.close()
        self.results_admin.close()
        self.client.close()
        self.app.close()

    def _publish(self, variant: str, count: int) -> None:
        name, queue = self.tasks[variant].name, queue_of(variant)
        with self.client.producer_or_acquire() as producer:
            for n in range(self._next_n, self._next_n + count):
                self.client.send_task(name, (n,), queue=queue, producer=producer)
        self._next_n += count

    def _control(self, command: str, queue: str, hostname: str) -> None:
        replies = self.app.control.broadcast(
            command, arguments={"queue": queue}, destination=[hostname], reply=True, timeout=10
        )
        if not replies:
            raise RuntimeError(f"worker {hostname} did not answer {command}({queue})")

    def _redis_cpu(self) -> float:
        """CPU seconds both redis-servers have used: the Lua scripts' cost lands there."""
        total = 0.0
        for client in (self.store_admin, self.results_admin):
            info = client.info("cpu")
            total += float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
        return total

    def measure(self, variant: str, count: int, hostname: str) -> Sample:
        """Publish ``count`` tasks, then let the idle worker drain them."""
        task = self.tasks[variant]
        # The store is never flushed: the library keeps an epoch marker there and reads a
        # vanished one as a restart that lost data. Keys are unique per task instead.
        keys_before = int(self.store_admin.dbsize())
        self.results_admin.flushdb()
        self._publish(variant, count)
        gc.collect()  # the previous variant's garbage is not this one's cost
        self.store_admin.config_resetstat()
        COUNTERS.take()
        window = Window(task.name, count)
        trips = self.store.trips
        redis_cpu, cpu = self._redis_cpu(), time.process_time()
        with window.listening():
            self._control("add_consumer", queue_of(variant), hostname)
            finished = window.done.wait(self.settings.timeout)
            cpu, redis_cpu = time.process_time() - cpu, self._redis_cpu() - redis_cpu
            self._control("cancel_consumer", queue_of(variant), hostname)
        if not finished:
            raise TimeoutError(f"{variant}: {window.finished}/{count} tasks finished")
        counters = COUNTERS.take()
        counters["trips"] = self.store.trips - trips
        stats = self.store_admin.info("commandstats")
        calls = {
            name.removeprefix("cmdstat_"): int(value["calls"])
            for name, value in stats.items()
            if name.removeprefix("cmdstat_").split("|")[0] not in ADMIN_COMMANDS
        }
        assert window.first is not None
        sample = Sample(
            variant=variant,
            tasks=count,
            seconds=window.last - window.first,
            succeeded=window.succeeded,
            counters=counters,
            commandstats=calls,
            store_keys=int(self.store_admin.dbsize()) - keys_before,
            cpu_s=cpu,
            redis_cpu_s=redis_cpu,
        )
        if self.settings.verbose:
            cpu_ms = 1000 * (sample.cpu_s + sample.redis_cpu_s) / count
            print(f"{variant:<14} {sample.tasks_per_s:8.1f} tasks/s {cpu_ms:6.3f} CPU ms/task "
                  f"{counters}", file=sys.stderr, flush=True)
        return sample

    def orders(self) -> Iterator[list[str]]:
        return orders(self.variants, self.settings.rounds)

    def run(self) -> tuple[list[Sample], dict[str, Any] | None]:
        """A discarded warm-up pass, then ``rounds`` interleaved rounds, then (with
        ``--rejection``) the open-breaker measurement."""
        samples = []
        rejection = None
        with in_process_worker(
            self.app, pool="threads", concurrency=self.settings.concurrency, queues=[IDLE_QUEUE]
        ) as worker:
            for variant in self.variants:
                self.measure(variant, self.settings.warmup, worker.hostname)
            for order in self.orders():
                for variant in order:
                    samples.append(self.measure(variant, self.settings.tasks, worker.hostname))
            if self.settings.rejection > 0:
                rejection = self.rejection(self.settings.rejection, worker.hostname)
        if self.spans is not None:
            self.spans.provider.force_flush()
        return samples, rejection

    def rejection(self, count: int, hostname: str) -> dict[str, Any]:
        """Force a ``when_open="fail"`` breaker open, run ``count`` tasks: what does a
        rejection cost, and does the body stay unrun? A short warm-up goes first."""
        rt.set_switch(self.app, REJECTED_DOWNSTREAM, "forced_open")
        errors: dict[str, int] = {}
        name = self.tasks[REJECTED].name

        def on_failure(sender: Any = None, exception: BaseException | None = None, **_: Any) -> None:
            if getattr(sender, "name", None) == name:
                kind = type(exception).__name__
                errors[kind] = errors.get(kind, 0) + 1  # the worker threads are serialised

        trace_log = logging.getLogger("celery.app.trace")
        level = trace_log.level
        trace_log.setLevel(logging.CRITICAL)  # one traceback per expected failure otherwise
        signals.task_failure.connect(on_failure, weak=False)
        try:
            warm = self.measure(REJECTED, min(count, 20), hostname)
            errors.clear()
            sample = self.measure(REJECTED, count, hostname)
        finally:
            signals.task_failure.disconnect(on_failure)
            trace_log.setLevel(level)
        counters = sample.counters
        roundtrips = round(counters.get("wire", 0) / count, 3)
        trips = round(counters.get("trips", 0) / count, 3)
        body_runs = counters.get("body_runs", 0) + warm.counters.get("body_runs", 0)
        return {
            "rejection_tasks": count,
            "rejection_tasks_per_s": round(sample.tasks_per_s, 1),
            "rejection_roundtrips_per_task": roundtrips,
            "rejection_store_trips_per_task": trips,
            "rejection_evalsha_per_task": round(sample.commandstats.get("evalsha", 0) / count, 3),
            "rejection_succeeded": sample.succeeded,
            "rejection_errors": errors,
            "rejection_body_runs": body_runs,
            "rejection_as_designed": trips <= REJECTION_MAX_ROUNDTRIPS and body_runs == 0,
        }

    def direct(self, calls: int) -> dict[str, float]:
        """Median CPU microseconds per ``task.apply`` call in this thread, per variant.

        Celery's tracer runs the task with no broker, result backend or thread switches,
        so the difference to ``plain`` is the middleware's own cost, free of the noise
        that other processes on the machine add to throughput.
        """
        costs: dict[str, list[float]] = {v: [] for v in self.variants}
        for order in self.orders():
            for variant in order:
                task, first = self.tasks[variant], self._next_n
                self._next_n += calls
                start = time.thread_time()
                for n in range(first, first + calls):
                    task.apply((n,))
                costs[variant].append((time.thread_time() - start) / calls * 1e6)
        return {v: statistics.median(c) for v, c in costs.items()}


def add_direct(rows: list[dict[str, Any]], costs: dict[str, float]) -> None:
    """Put ``--direct`` results on the rows: CPU per call and the extra over plain."""
    for row in rows:
        cost = costs[row["variant"]]
        row["direct_cpu_us_per_call"] = round(cost, 1)
        if "plain" in costs:
            row["direct_extra_us_vs_plain"] = round(cost - costs["plain"], 1)


def summarize(samples: Sequence[Sample], settings: Settings) -> list[dict[str, Any]]:
    """One row per variant: median throughput, ratios to plain paired by round, per-task
    counts, and CPU per task (steadier than throughput when other work shares the CPU)."""
    order = list(dict.fromkeys(s.variant for s in samples))
    by_variant = {v: [s for s in samples if s.variant == v] for v in order}
    plain = by_variant.get("plain")
    rows = []
    for variant, runs in by_variant.items():
        total = sum(s.tasks for s in runs)
        rates = [s.tasks_per_s for s in runs]

        def per_task(values: Sequence[float], total: int = total) -> float:
            return round(sum(values) / total, 3)

        ratio = cpu_ratio = None
        if plain is not None:
            pairs = list(zip(runs, plain, strict=True))
            ratio = round(statistics.median(s.tasks_per_s / p.tasks_per_s for s, p in pairs), 3)
            cpu_ratio = round(statistics.median(
                (p.cpu_s + p.redis_cpu_s) / p.tasks / ((s.cpu_s + s.redis_cpu_s) / s.tasks)
                for s, p in pairs), 3)
        roundtrips = per_task([s.counters.get("wire", 0) for s in runs])
        reference = REFERENCES.get(variant)
        ref_ratio = ref_cpu_ratio = None
        if reference in by_variant:
            ref_pairs = list(zip(runs, by_variant[reference], strict=True))
            ref_ratio = round(statistics.median(s.tasks_per_s / r.tasks_per_s
                                                for s, r in ref_pairs), 3)
            ref_cpu_ratio = round(statistics.median(
                (r.cpu_s + r.redis_cpu_s) / r.tasks / ((s.cpu_s + s.redis_cpu_s) / s.tasks)
                for s, r in ref_pairs), 3)
        row: dict[str, Any] = {
            "variant": variant,
            "tasks_per_s": round(statistics.median(rates), 1),
            "tasks_per_s_min": round(min(rates), 1),
            "tasks_per_s_max": round(max(rates), 1),
            "ratio_vs_plain": ratio,
            "redis_roundtrips_per_task": roundtrips,
            "store_trips_per_task": per_task([s.counters.get("trips", 0) for s in runs]),
            "store_ops_per_task": per_task([s.counters.get("ops", 0) for s in runs]),
            "evalsha_per_task": per_task([s.commandstats.get("evalsha", 0) for s in runs]),
            "commands_per_task": per_task([sum(s.commandstats.values()) for s in runs]),
            "store_keys_per_task": per_task([s.store_keys for s in runs]),
            "cpu_ms_per_task": per_task([1000 * s.cpu_s for s in runs]),
            "redis_cpu_ms_per_task": per_task([1000 * s.redis_cpu_s for s in runs]),
            "cpu_ratio_vs_plain": cpu_ratio,
            "succeeded": sum(s.succeeded for s in runs),
            "tasks": total,
            "rounds": len(runs),
            "concurrency": settings.concurrency,
            "prefetch": settings.prefetch,
            "sleep_ms": settings.sleep_ms,
        }
        if reference is not None and ref_ratio is not None:
            row[f"ratio_vs_{reference}"] = ref_ratio
            row[f"cpu_ratio_vs_{reference}"] = ref_cpu_ratio
        if variant in ROUND_TRIPS:
            # the store's own count: a connection opened in the window adds set-up writes
            row["roundtrips_as_designed"] = round(row["store_trips_per_task"], 2) == ROUND_TRIPS[variant]
        rows.append(row)
    return rows


COLUMNS = (
    ("variant", "variant"),
    ("tasks_per_s", "tasks/s"),
    ("ratio_vs_plain", "vs plain"),
    ("ratio_vs_all_guards", "vs all_guards"),
    ("redis_roundtrips_per_task", "round trips/task"),
    ("store_trips_per_task", "store trips/task"),
    ("evalsha_per_task", "EVALSHA/task"),
    ("commands_per_task", "commands/task"),
    ("cpu_ms_per_task", "CPU ms/task"),
    ("redis_cpu_ms_per_task", "redis CPU ms/task"),
    ("cpu_ratio_vs_plain", "CPU vs plain"),
    ("direct_cpu_us_per_call", "direct CPU us/call"),
    ("succeeded", "ok"),
    ("roundtrips_as_designed", "trips as designed"),
)


def table(rows: Sequence[dict[str, Any]]) -> str:
    """A plain-text table for people; ``--json`` is for machines."""
    cells = [[title for _, title in COLUMNS]]
    for row in rows:
        cells.append(["-" if row.get(key) is None else str(row[key]) for key, _ in COLUMNS])
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                       enumerate(zip(line, widths, strict=True))) for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter,
                     argparse.ArgumentDefaultsHelpFormatter):
    """Keep the module docstring's layout and show every option's default."""


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.overhead", description=__doc__,
                                     formatter_class=_HelpFormatter)
    parser.add_argument("--tasks", type=int, default=300, help="tasks per variant per round")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds")
    parser.add_argument("--warmup", type=int, default=150, help="discarded tasks per variant")
    parser.add_argument("--concurrency", type=int, default=4, help="worker threads")
    parser.add_argument("--prefetch", type=int, default=4, help="worker_prefetch_multiplier")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help=f"comma-separated, from: {', '.join(VARIANTS)}")
    parser.add_argument("--sleep-ms", type=float, default=0.0,
                        help="sleep in every task body, like a downstream call")
    parser.add_argument("--direct", type=int, default=0, metavar="CALLS",
                        help="also time CALLS task.apply() calls per variant per round "
                             "(middleware CPU per call, no broker)")
    parser.add_argument("--rejection", type=int, default=50, metavar="N",
                        help="also run N tasks against a forced-open when_open='fail' breaker "
                             "(0: skip)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per measurement")
    parser.add_argument("--json", action="store_true", help="one JSON object per variant per line")
    parser.add_argument("--verbose", action="store_true", help="each measurement on stderr")
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s): {', '.join(unknown)}")
    if args.direct < 0 or args.rejection < 0:
        parser.error("--direct and --rejection must be >= 0")
    if min(args.tasks, args.rounds, args.warmup, args.concurrency, args.prefetch) < 1:
        parser.error("--tasks, --rounds, --warmup, --concurrency and --prefetch must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    settings = Settings(tasks=args.tasks, rounds=args.rounds, warmup=args.warmup,
                        concurrency=args.concurrency, prefetch=args.prefetch,
                        timeout=args.timeout, sleep_ms=args.sleep_ms,
                        verbose=args.verbose, rejection=args.rejection)
    reader = live_metrics()
    with RedisServer() as broker, RedisServer() as store:
        bench = Bench(settings, args.variants.split(","), broker, store)
        try:
            samples, rejection = bench.run()
            spans = SPAN_COUNTS.take()
            rows = summarize(samples, settings)
            outcomes = counted_outcomes(reader)
            for row in rows:
                row["redis_version"] = bench.redis_version
                executed = outcomes.get(f"{bench.tasks[row['variant']].name}:executed")
                if executed is not None:
                    row["otel_executed_counted"] = executed  # warm-up included
                if row["variant"] == OTEL_VARIANT:
                    row["otel_spans_exported"] = spans.get("exported", 0)  # warm-up included
                    row["otel_spans_tagged"] = spans.get("tagged", 0)
                if row["variant"] == "breaker" and rejection is not None:
                    row.update(rejection)
            if args.direct > 0:
                add_direct(rows, bench.direct(args.direct))
        finally:
            bench.close()
    if args.json:
        for row in rows:
            print(json.dumps(row), flush=True)
    else:
        print(table(rows))
        if rejection is not None:
            print("\nopen breaker (when_open='fail', forced_open): " + ", ".join(
                f"{key.removeprefix('rejection_')}={value}" for key, value in rejection.items()))
    # Per-task numbers only mean something when every task ran its body and succeeded
    # (a deferred or failed task also ends, and would make a variant look cheap).
    failed = [f"{r['variant']} ({r['succeeded']}/{r['tasks']})" for r in rows
              if r["succeeded"] != r["tasks"]]
    if failed:
        print(f"not every task succeeded: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
