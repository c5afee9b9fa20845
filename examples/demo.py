"""``make demo``: a few thousand payments through real workers against a flaky service.

What runs, all on loopback and all stopped on exit (normal end, error or Ctrl-C):

- a private ``redis-server`` (``resilient_tasks.testing.RedisServer``) unless ``REDIS_URL``
  names one; broker, resilience store and result backend use three consecutive DBs;
- the flaky payments service (``examples.downstream``) as a process of its own;
- two ``celery -A workers.app worker`` processes, each in its own process group.

Then ``--jobs`` orders are charged; about 10 % of them are published twice under different
task ids, as a producer that retries its own publish would. The summary checks that every
message finished, that each order that succeeded was charged exactly once downstream, and
that the duplicates were answered by the idempotency record instead of charging again.

``python -m examples.demo [--jobs N] [--failure-rate F]``, or ``make demo DEMO_ARGS="--jobs 500"``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from examples import downstream
from resilient_tasks.testing import RedisServer, SubprocessWorker, free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent
WORKERS = 2
# Threads, not prefork: the task waits on HTTP and Redis, and two worker processes
# already keep both cores of the target machine busy.
POOL, CONCURRENCY = "threads", 8
DUPLICATE_SHARE = 0.10
STOP_TIMEOUT = 15.0
EXPLAIN = {
    "RetryBudgetExhausted": " (the fleet-wide retry budget of 'payments' was spent: "
    "workers/policies.toml allows retries up to 50 % of first attempts + 20 per window; a "
    "failure rate f needs about f/(1-f))",
    "DownstreamUnavailable": " (503 on every attempt: max_retries spent)",
}


# -- the processes ---------------------------------------------------------------------


def redis_urls(base: str) -> tuple[str, str, str]:
    """Broker, store and result backend: the URL's DB and the two after it."""
    parts = urlsplit(base)
    db = int(parts.path.strip("/") or 0)
    if db + 2 > 15:
        raise SystemExit(f"REDIS_URL {base!r}: the demo needs DBs {db}..{db + 2}, at most 15")
    broker, store, results = (urlunsplit(parts._replace(path=f"/{db + i}")) for i in range(3))
    return broker, store, results


def stop_group(process: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM the process group, SIGKILL it if it lingers: nothing is left behind."""
    for signum in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signum)
        try:
            process.wait(timeout=timeout)
            if signum == signal.SIGTERM:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)  # any straggler in the group
            return
        except subprocess.TimeoutExpired:
            continue


@contextlib.contextmanager
def downstream_process(failure_rate: float, log: Path) -> Iterator[str]:
    """The payments service as its own process, so it does not share the demo's GIL."""
    port = free_port()
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "examples.downstream", "--port", str(port),
             "--failure-rate", str(failure_rate)],
            cwd=ROOT, stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _answers(url, process), timeout=15, what=f"the downstream at {url}")
        yield url
    finally:
        stop_group(process)


def _answers(url: str, process: subprocess.Popen[bytes]) -> bool:
    if process.poll() is not None:
        raise RuntimeError(f"the downstream exited with {process.returncode}")
    try:
        downstream.stats(url, timeout=1.0)
    except (OSError, downstream.DownstreamError):
        return False
    return True


@contextlib.contextmanager
def worker_processes(env: dict[str, str], run: str) -> Iterator[list[SubprocessWorker]]:
    """Two ``celery worker`` process groups, stopped together (warm, then SIGKILL)."""
    workers = []
    try:
        for n in range(1, WORKERS + 1):
            log = ROOT / f"demo-worker{n}.log"
            log.unlink(missing_ok=True)
            worker = SubprocessWorker(
                "workers.app", pool=POOL, concurrency=CONCURRENCY, name=f"demo{n}-{run}",
                env=env, log=str(log), queues=["payments", "celery"],
            )
            workers.append(worker.start())
        yield workers
    finally:
        for worker in workers:
            worker.signal(signal.SIGTERM)  # all at once: both shut down in parallel
        for worker in workers:
            worker.stop(timeout=STOP_TIMEOUT)


# -- counting ----------------------------------------------------------------------------


@dataclass
class Tally:
    """What the demo knows, from the result backend (authoritative) and from events (live)."""

    jobs: int
    published: int = 0
    succeeded: int = 0
    failed: int = 0
    replayed: int = 0  # succeeded with the stored result of another message (body not run)
    retries: int = 0  # retries spent, summed over the final results' ``retries``
    ev_succeeded: int = 0
    ev_failed: int = 0
    ev_retried: int = 0
    ev_deferred: int = 0  # a duplicate re-queued while another message holds the claim
    ev_breaker: int = 0  # deferred because the downstream's breaker was open
    breaker_failed: int = 0  # failed with CircuitOpen (a breaker with when_open="fail")
    charged_orders: set[str] = field(default_factory=set)
    failures: dict[str, int] = field(default_factory=dict)
    workers: set[str] = field(default_factory=set)
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None

    @property
    def done(self) -> int:
        return self.succeeded + self.failed

    def elapsed(self) -> float:
        return (self.finished or time.monotonic()) - self.started


class EventCounter:
    """Follows task events from the broker in a thread, for progress while results arrive.

    ``task-retried`` is sent for a retry (which spends an attempt) and for a deferral
    (which does not: a duplicate waiting for the message holding the claim, or a task
    whose breaker is open). The event only carries the text ``Retry(Retry(...), <cause>,
    <countdown>)``, so they are told apart by the cause: the downstream's error for a
    retry, ``CircuitOpen`` for the breaker, ``None`` or a store error for a duplicate.
    The summary's retry count comes from the result backend, which does not depend on this.
    """

    RETRY_CAUSES = ("DownstreamUnavailable(", "TimeoutError(", "ConnectionError(")

    def __init__(self, app: Any, tally: Tally) -> None:
        self.app = app
        self.tally = tally
        self.error: BaseException | None = None
        self._receiver: Any = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-events", daemon=True)

    def _on_event(self, event: dict[str, Any]) -> None:
        kind, tally = str(event.get("type", "")), self.tally
        if kind in ("worker-online", "worker-heartbeat"):
            tally.workers.add(str(event.get("hostname")))
        elif kind == "task-succeeded":
            tally.ev_succeeded += 1
        elif kind == "task-failed":
            tally.ev_failed += 1
        elif kind == "task-retried":
            cause = str(event.get("exception", ""))
            if any(name in cause for name in self.RETRY_CAUSES):
                tally.ev_retried += 1
            elif "CircuitOpen(" in cause:
                tally.ev_breaker += 1
            else:
                tally.ev_deferred += 1

    def _run(self) -> None:
        try:
            with self.app.connection_for_read() as connection:
                self._receiver = self.app.events.Receiver(connection, handlers={"*": self._on_event})
                self._receiver.should_stop = self._stopping.is_set()
                self._receiver.capture(limit=None, timeout=None, wakeup=False)
        except Exception as exc:  # shown in the summary; the results still count
            self.error = exc

    def __enter__(self) -> EventCounter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping.set()
        if self._receiver is not None:
            self._receiver.should_stop = True
        self._thread.join(timeout=5)


# -- display -----------------------------------------------------------------------------


class Screen:
    """The live table; it polls the downstream's /stats at most twice a second."""

    def __init__(self, tally: Tally, downstream_url: str) -> None:
        self.tally = tally
        self.url = downstream_url
        self.stats: dict[str, Any] = {}
        self._polled = 0.0

    def poll(self, force: bool = False) -> dict[str, Any]:
        if force or time.monotonic() - self._polled > 0.5:
            self._polled = time.monotonic()
            with contextlib.suppress(OSError, downstream.DownstreamError):
                self.stats = downstream.stats(self.url, timeout=2.0)
        return self.stats

    def render(self) -> Table:
        t, stats = self.tally, self.poll()
        elapsed = t.elapsed()
        title = f"resilient-tasks demo: {t.jobs} orders, {WORKERS} workers x {CONCURRENCY} threads"
        table = Table(title=title)
        # retries/deferred: from events; calls/503s/applied: the downstream's own counters.
        for column in ("published", "done", "ok", "failed", "retries", "deferred", "calls",
                       "503s", "applied", "elapsed", "msg/s"):
            table.add_column(column, justify="right")
        table.add_row(
            str(t.published), f"{t.done}/{t.published}", str(t.succeeded), str(t.failed),
            str(t.ev_retried), str(t.ev_deferred), str(stats.get("calls", "-")),
            str(stats.get("failures_injected", "-")), str(stats.get("applied", "-")),
            f"{elapsed:.1f}s", f"{t.done / elapsed:.0f}" if elapsed > 0 else "-",
        )
        if t.ev_deferred:
            table.caption = (f"{t.ev_deferred} duplicate(s) found their order in flight: they look "
                             "again shortly and then replay the holder's stored result")
        return table


def summary(
    tally: Tally, stats: dict[str, Any], timed_out: bool, events_ok: bool
) -> tuple[Group, bool]:
    """The final tables and whether every check held."""
    table = Table(title="summary")
    for column in ("orders", "messages", "succeeded", "retried", "failed", "deduplicated",
                   "fallback-served", "breaker-rejected"):
        table.add_column(column, justify="right")
    # deduplicated: messages answered from the idempotency record instead of running the
    # body. The task puts its own task id in its result, so a result carrying another id
    # is a replay; the arithmetic cross-check is succeeded messages minus charges applied.
    # breaker-rejected: executions the breaker refused, counted from task-retried events
    # (deferred until half-open) and failed results (CircuitOpen); unknown without events.
    # fallback-served: the task states no FallbackPolicy, so nothing can be served from a
    # fallback; the column says "n/a" rather than a 0 that would look measured.
    table.add_row(
        str(tally.jobs), str(tally.published), str(tally.succeeded), str(tally.retries),
        str(tally.failed), str(tally.replayed), "n/a",
        str(tally.ev_breaker + tally.breaker_failed) if events_ok else "n/a",
    )
    applied = stats.get("applied")
    checks: list[tuple[str, bool | None, str]] = [
        ("every message finished (succeeded + failed == messages)",
         tally.done == tally.published and not timed_out, f"{tally.done} == {tally.published}"),
        ("each order that succeeded was charged exactly once downstream",
         applied == len(tally.charged_orders), f"{applied} applied, {len(tally.charged_orders)} orders"),
        ("deduplicated == succeeded - charges applied",
         applied is not None and tally.replayed == tally.succeeded - applied,
         f"{tally.replayed} == {tally.succeeded} - {applied}"),
        ("no duplicate or stale write reached the downstream",
         stats.get("duplicates_rejected") == 0 and stats.get("stale_token_rejected") == 0,
         f"{stats.get('duplicates_rejected')} duplicate, {stats.get('stale_token_rejected')} stale"),
    ]
    check_table = Table(title="checks", show_header=False)
    check_table.add_column("ok")
    check_table.add_column("check")
    check_table.add_column("values")
    if timed_out:  # work still in flight: only the first check means anything
        checks = checks[:1] + [(text, None, "not checked: the run timed out") for text, _, _ in checks[1:]]
    for text, ok, values in checks:
        mark = Text("-") if ok is None else Text("✓", "green") if ok else Text("✗", "bold red")
        check_table.add_row(mark, text, values)
    info = Text(
        f"downstream: {stats.get('calls')} calls, {stats.get('failures_injected')} injected 503s, "
        f"{applied} charges applied (failure rate {stats.get('failure_rate')})\n"
        f"events: {tally.ev_succeeded} succeeded, {tally.ev_failed} failed, {tally.ev_retried} "
        f"retries, {tally.ev_deferred} duplicates deferred while another message held the claim, "
        f"{tally.ev_breaker} deferred by an open breaker\n"
        f"time: {tally.elapsed():.1f}s for {tally.published} messages"
    )
    parts: list[Any] = [table, check_table, info]
    if tally.failures:
        reasons = "; ".join(f"{n} x {why}{EXPLAIN.get(why, '')}" for why, n in tally.failures.items())
        parts.append(Text(f"failed: {reasons}"))
    return Group(*parts), all(ok is not False for _, ok, _ in checks)


def breaker_table(app: Any) -> Table:
    """The breakers exactly as ``celery -A workers.app resilience status`` shows them."""
    from resilient_tasks import runtime_for
    from resilient_tasks.cli import server_ms, status_rows
    from resilient_tasks.switches import breakers

    runtime = runtime_for(app)
    rows = status_rows(breakers(runtime), server_ms(runtime))
    table = Table(title="breakers (the numbers `celery -A workers.app resilience status` shows)")
    columns = ("downstream", "state", "switch", "calls", "failures", "failure_rate", "trips",
               "opens", "retry_budget_left")
    for column in columns:
        table.add_column(column.replace("_", " "))
    for row in rows:
        table.add_row(*("-" if row[c] is None else str(row[c]) for c in columns))
    return table


# -- the run -----------------------------------------------------------------------------


def messages(run: str, jobs: int, seed: int | None) -> list[tuple[str, dict[str, Any]]]:
    """(task id, kwargs) for every order, ~10 % of them twice, shuffled like real traffic."""
    rng = random.Random(seed)
    orders = []
    for n in range(jobs):
        order = {"order_id": f"{run}-{n:06d}", "customer_id": f"c{rng.randrange(200):03d}",
                 "amount": rng.randrange(100, 50_000)}
        orders.append(order)
        if rng.random() < DUPLICATE_SHARE:
            orders.append(order)  # the same order again, as a producer retrying its publish
    rng.shuffle(orders)
    return [(str(uuid.uuid4()), order) for order in orders]


class Publisher(threading.Thread):
    """Sends the messages while the main thread already collects results.

    It publishes through an app with no result backend: the demo's own app would
    subscribe to a Redis channel per message and unsubscribe when each ``AsyncResult`` is
    garbage-collected, which blocks for 20 s of reconnects if Redis is already gone (as
    after a Ctrl-C). Results are read from the backend by task id instead (``collect``).
    """

    def __init__(self, broker: str, batch: list[tuple[str, dict[str, Any]]], tally: Tally) -> None:
        super().__init__(name="demo-publisher", daemon=True)
        self.broker, self.batch, self.tally = broker, batch, tally
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        from celery import Celery

        sender = Celery("demo-publisher", broker=self.broker, set_as_current=False)
        sender.conf.update(task_serializer="json", accept_content=["json"])
        try:
            with sender.producer_or_acquire() as producer:
                for task_id, kwargs in self.batch:
                    if self.stop.is_set():
                        return
                    sender.send_task("workers.app.charge", kwargs=kwargs, task_id=task_id,
                                     producer=producer)
                    self.tally.published += 1
        except Exception as exc:  # reported by collect(), which stops waiting
            self.error = exc
        finally:
            sender.close()


def collect(app: Any, publisher: Publisher, tally: Tally, timeout: float) -> bool:
    """Read every message's final state from the result backend; False on timeout.

    ``get_many`` polls with one MGET over the ids still pending, so results can be read
    while publishing goes on (an id not yet published simply stays pending).
    """
    from celery.exceptions import TimeoutError as CeleryTimeout

    deadline = time.monotonic() + timeout  # get_many's own timeout counts only its sleeps

    def between_polls() -> None:
        if publisher.error is not None:
            raise RuntimeError(f"publishing failed: {publisher.error!r}") from publisher.error
        if time.monotonic() > deadline:
            raise CeleryTimeout(f"no final state for every message after {timeout:g}s")

    ids = [task_id for task_id, _ in publisher.batch]
    try:
        for task_id, meta in app.backend.get_many(ids, interval=0.2, on_interval=between_polls):
            tally.retries += int(meta.get("retries") or 0)
            value = meta.get("result")
            if meta.get("status") == "SUCCESS" and isinstance(value, dict):
                tally.succeeded += 1
                tally.charged_orders.add(str(value.get("order_id")))
                if value.get("task_id") != task_id:
                    tally.replayed += 1
            else:
                tally.failed += 1
                why = type(value).__name__ if isinstance(value, BaseException) else str(meta.get("status"))
                if why == "CircuitOpen":
                    tally.breaker_failed += 1
                tally.failures[why] = tally.failures.get(why, 0) + 1
    except (CeleryTimeout, TimeoutError):
        return False
    return True


def run(args: argparse.Namespace, stack: contextlib.ExitStack, console: Console) -> int:
    run_id = uuid.uuid4().hex[:8]  # order ids are unique per run: a reused REDIS_URL is safe
    base = os.environ.get("REDIS_URL")
    if not base:
        with console.status("starting redis-server"):
            server = stack.enter_context(RedisServer())
        base = server.url(0)
    broker, store, results = redis_urls(base)
    downstream_url = stack.enter_context(
        downstream_process(args.failure_rate, ROOT / "demo-downstream.log")
    )
    env = {
        "RT_BROKER_URL": broker, "RT_RESULT_BACKEND": results,
        "RESILIENT_TASKS_REDIS_URL": store, "RT_DOWNSTREAM_URL": downstream_url,
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
    }
    os.environ.update(env)  # before the import: workers.app reads them at import time
    from workers.app import app

    tally = Tally(jobs=args.jobs)
    events = stack.enter_context(EventCounter(app, tally))
    stack.enter_context(worker_processes(env, run_id))
    with console.status(f"starting {WORKERS} workers"):
        wait_until(lambda: len(tally.workers) >= WORKERS or events.error, timeout=60,
                   interval=0.1, what="the workers to come online")
    console.print(f"redis {base}  downstream {downstream_url}  workers {sorted(tally.workers)}")

    screen = Screen(tally, downstream_url)
    publisher = Publisher(broker, messages(run_id, args.jobs, args.seed), tally)
    tally.started = time.monotonic()
    try:
        with Live(get_renderable=screen.render, console=console, refresh_per_second=4):
            publisher.start()
            complete = collect(app, publisher, tally, args.timeout)
            tally.finished = time.monotonic()
            time.sleep(0.3)  # let the last events land before the final frame
            screen.poll(force=True)
    finally:
        publisher.stop.set()
        if publisher.is_alive():
            publisher.join(timeout=5)
    report, ok = summary(tally, screen.stats, timed_out=not complete, events_ok=events.error is None)
    console.print(report)
    console.print(breaker_table(app))
    if not complete:
        console.print(f"[bold red]timed out after {args.timeout:g}s[/]; logs: {ROOT}/demo-*.log")
    if events.error is not None:
        console.print(f"[yellow]event receiver stopped: {events.error!r}[/]")
    return 0 if ok and complete else 1


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000, help="orders to charge (default 2000)")
    parser.add_argument("--failure-rate", type=float, default=downstream.DEFAULT_FAILURE_RATE,
                        help="share of downstream calls that fail with 503 (default 0.2)")
    parser.add_argument("--timeout", type=float, default=100.0,
                        help="seconds to wait for all results (default 100)")
    parser.add_argument("--seed", type=int, default=None, help="seed for amounts and duplicates")
    args = parser.parse_args(argv)
    if args.jobs < 1 or not 0 <= args.failure_rate <= 1:
        parser.error("--jobs must be >= 1 and --failure-rate in [0, 1]")
    console = Console()
    if not console.is_terminal:  # piped or logged: rich would assume 80 columns
        console = Console(width=120)
    # SIGTERM and SIGHUP unwind like Ctrl-C, so the finally below stops every process.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)
    stack = contextlib.ExitStack()
    started = time.monotonic()
    try:
        return run(args, stack, console)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted; stopping everything[/]")
        return 130
    finally:
        # A second Ctrl-C must not cut the teardown short and leave processes behind.
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)
        with console.status("stopping workers, downstream and redis"):
            stack.close()
        console.print(f"all processes stopped; {time.monotonic() - started:.1f}s in total")


if __name__ == "__main__":
    sys.exit(main())
