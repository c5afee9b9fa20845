"""What ``ResilientTask`` costs over a plain Celery task: throughput and store round trips.

Why it is built this way:

- One Celery app and one worker configuration serve every variant, so only the task
  class and its policy differ between them.
- The broker and result backend live on one private redis-server, the resilience store
  on a second one, so the store server's ``INFO commandstats`` holds store traffic only.
- One in-process worker (thread pool) serves the whole run. A measurement publishes N
  messages to the variant's own queue while the worker listens elsewhere, then tells it
  to consume that queue, and times from the first task start (``task_prerun``) to the
  last task end (``task_postrun``). Publishing and worker start-up stay outside the
  window, so the number is the worker-side cost per task, which is where the middleware
  runs, and every variant meets the same warm worker.
- Variants run interleaved, their order rotated every round and reversed after each
  full rotation (so each variant follows each other one), so drift (CPU boost, a noisy
  neighbour) and carry-over hit all of them alike; ``ratio_vs_plain`` is the median of
  per-round ratios. ``plain_control`` (opt-in) is a second plain task: an A/A test
  whose ratio shows the noise floor of the machine.
- Store round trips are counted on the wire (every request written on a store
  connection, exact), in the library (``RedisStore`` pipelines) and on the server
  (``INFO commandstats``, a cross-check that also shows the commands Lua scripts run).
- CPU per task (this process plus both redis-servers) is reported beside throughput: it
  moves far less than throughput when other work shares the machine.

Add a variant by adding a task factory to ``VARIANTS``.
"""

from __future__ import annotations

import argparse
import gc
import json
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

import resilient_tasks as rt
from resilient_tasks.store.base import Op
from resilient_tasks.store.redis import RedisStore
from resilient_tasks.testing import RedisServer, in_process_worker

Body = Callable[[int], int]
#: Registers a task ``(n: int) -> int`` named ``bench.<variant>`` that returns ``body(n)``.
TaskFactory = Callable[[Celery, Body], Task]

#: Commands the benchmark itself sends to the store server (``CONFIG RESETSTAT``, ``INFO``,
#: ``DBSIZE``); left out of the command counts. Redis 7 names subcommands ``config|get``.
ADMIN_COMMANDS = frozenset({"config", "info", "dbsize"})

#: The issue's targets: (minimum ratio vs plain, maximum store round trips per task).
TARGETS: dict[str, tuple[float, float]] = {
    "retry_policy": (0.95, 0.0),
    "idempotency": (0.90, 2.0),
}


def task_of(app: Celery, variant: str, body: Body, **options: Any) -> Task:
    """Register ``bench.<variant>``, a task ``(n: int) -> int`` returning ``body(n)``."""

    def run(n: int) -> int:
        return body(n)

    return app.task(name=f"bench.{variant}", **options)(run)


def _plain(app: Celery, body: Body) -> Task:
    return task_of(app, "plain", body)


def _retry_policy(app: Celery, body: Body) -> Task:
    policy = rt.TaskPolicy(idempotent=True, retry=rt.RetryPolicy())
    return task_of(app, "retry_policy", body, base=rt.ResilientTask, policy=policy)


def _idempotency(app: Celery, body: Body) -> Task:
    policy = rt.TaskPolicy(idempotency=rt.IdempotencyPolicy(key=("n",)))
    return task_of(app, "idempotency", body, base=rt.ResilientTask, policy=policy)


def _plain_control(app: Celery, body: Body) -> Task:
    """A second plain task: its ratio to ``plain`` shows the machine's noise (A/A test)."""
    return task_of(app, "plain_control", body)


VARIANTS: dict[str, TaskFactory] = {
    "plain": _plain,
    "retry_policy": _retry_policy,
    "idempotency": _idempotency,
    "plain_control": _plain_control,
}
#: Run when ``--variants`` is not given.
DEFAULT_VARIANTS = ("plain", "retry_policy", "idempotency")


def make_body(sleep_ms: float) -> Body:
    """Trivial work by default; ``--sleep-ms`` stands in for a downstream call's latency."""
    if sleep_ms <= 0:
        return lambda n: n + 1
    seconds = sleep_ms / 1000

    def body(n: int) -> int:
        time.sleep(seconds)
        return n + 1

    return body


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


class CountingConnection(redis.connection.Connection):
    """A store connection that counts request writes: one per command or pipeline.

    Health-check PINGs and connection set-up commands are real round trips too, and are
    counted because they also go through ``send_packed_command``.
    """

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        COUNTERS.add("wire")
        super().send_packed_command(command, check_health)  # type: ignore[no-untyped-call]


@contextmanager
def instrument_store() -> Iterator[None]:
    """Count ``RedisStore`` pipelines and ops; the workers are threads of this process."""
    send, load = RedisStore._send, RedisStore._load

    def counted_send(self: RedisStore, ops: Sequence[Op]) -> list[Any]:
        COUNTERS.add("pipelines")
        COUNTERS.add("ops", len(ops))
        return send(self, ops)

    def counted_load(self: RedisStore, names: set[str]) -> None:
        COUNTERS.add("pipelines")
        COUNTERS.add("script_loads")
        load(self, names)

    RedisStore._send = counted_send  # type: ignore[method-assign]
    RedisStore._load = counted_load  # type: ignore[method-assign]
    try:
        yield
    finally:
        RedisStore._send = send  # type: ignore[method-assign]
        RedisStore._load = load  # type: ignore[method-assign]


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
        rt.install(self.app, redis_url=store.url(0),
                   redis_options={"connection_class": CountingConnection})
        body = make_body(settings.sleep_ms)
        self.tasks = {name: VARIANTS[name](self.app, body) for name in self.variants}
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
        redis_cpu, cpu = self._redis_cpu(), time.process_time()
        with window.listening():
            self._control("add_consumer", queue_of(variant), hostname)
            finished = window.done.wait(self.settings.timeout)
            cpu, redis_cpu = time.process_time() - cpu, self._redis_cpu() - redis_cpu
            self._control("cancel_consumer", queue_of(variant), hostname)
        if not finished:
            raise TimeoutError(f"{variant}: {window.finished}/{count} tasks finished")
        counters = COUNTERS.take()
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
        """Variant order per round: rotated each round, reversed after each full rotation,
        so over ``2 * len(variants)`` rounds each variant is first, and follows each other
        variant, equally often."""
        size = len(self.variants)
        for index in range(self.settings.rounds):
            shift = index % size
            order = self.variants[shift:] + self.variants[:shift]
            yield order[::-1] if (index // size) % 2 else order

    def run(self) -> list[Sample]:
        """A discarded warm-up pass, then ``rounds`` interleaved rounds."""
        samples = []
        with instrument_store(), in_process_worker(
            self.app, pool="threads", concurrency=self.settings.concurrency, queues=[IDLE_QUEUE]
        ) as worker:
            for variant in self.variants:
                self.measure(variant, self.settings.warmup, worker.hostname)
            for order in self.orders():
                for variant in order:
                    samples.append(self.measure(variant, self.settings.tasks, worker.hostname))
        return samples

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
        row: dict[str, Any] = {
            "variant": variant,
            "tasks_per_s": round(statistics.median(rates), 1),
            "tasks_per_s_min": round(min(rates), 1),
            "tasks_per_s_max": round(max(rates), 1),
            "ratio_vs_plain": ratio,
            "redis_roundtrips_per_task": roundtrips,
            "store_pipelines_per_task": per_task([s.counters.get("pipelines", 0) for s in runs]),
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
        target = TARGETS.get(variant)
        if target is not None and ratio is not None:
            row["target_met"] = ratio >= target[0] and roundtrips <= target[1]
        rows.append(row)
    return rows


COLUMNS = (
    ("variant", "variant"),
    ("tasks_per_s", "tasks/s"),
    ("ratio_vs_plain", "vs plain"),
    ("redis_roundtrips_per_task", "round trips/task"),
    ("store_pipelines_per_task", "pipelines/task"),
    ("evalsha_per_task", "EVALSHA/task"),
    ("commands_per_task", "commands/task"),
    ("cpu_ms_per_task", "CPU ms/task"),
    ("redis_cpu_ms_per_task", "redis CPU ms/task"),
    ("cpu_ratio_vs_plain", "CPU vs plain"),
    ("direct_cpu_us_per_call", "direct CPU us/call"),
    ("succeeded", "ok"),
    ("target_met", "target met"),
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
    parser.add_argument("--tasks", type=int, default=500, help="tasks per variant per round")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds")
    parser.add_argument("--warmup", type=int, default=200, help="discarded tasks per variant")
    parser.add_argument("--concurrency", type=int, default=4, help="worker threads")
    parser.add_argument("--prefetch", type=int, default=4, help="worker_prefetch_multiplier")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help=f"comma-separated, from: {', '.join(VARIANTS)}")
    parser.add_argument("--sleep-ms", type=float, default=0.0,
                        help="sleep in every task body, like a downstream call")
    parser.add_argument("--direct", type=int, default=0, metavar="CALLS",
                        help="also time CALLS task.apply() calls per variant per round "
                             "(middleware CPU per call, no broker)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per measurement")
    parser.add_argument("--json", action="store_true", help="one JSON object per variant per line")
    parser.add_argument("--verbose", action="store_true", help="each measurement on stderr")
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s): {', '.join(unknown)}")
    if args.direct < 0:
        parser.error("--direct must be >= 0")
    if min(args.tasks, args.rounds, args.warmup, args.concurrency, args.prefetch) < 1:
        parser.error("--tasks, --rounds, --warmup, --concurrency and --prefetch must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    settings = Settings(tasks=args.tasks, rounds=args.rounds, warmup=args.warmup,
                        concurrency=args.concurrency, prefetch=args.prefetch,
                        timeout=args.timeout, sleep_ms=args.sleep_ms,
                        verbose=args.verbose)
    with RedisServer() as broker, RedisServer() as store:
        bench = Bench(settings, args.variants.split(","), broker, store)
        try:
            rows = summarize(bench.run(), settings)
            for row in rows:
                row["redis_version"] = bench.redis_version
            if args.direct > 0:
                add_direct(rows, bench.direct(args.direct))
        finally:
            bench.close()
    if args.json:
        for row in rows:
            print(json.dumps(row), flush=True)
    else:
        print(table(rows))
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
