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

``python -m examples.demo [--jobs N] [--failure-rate F]``
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
    with log.open("ab") as output:
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
                env=env, log=str(log),
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
    ev_deferred: int = 0
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

    ``task-retried`` is sent both for a retry (which spends an attempt) and for a deferral
    (a duplicate re-queued while another message holds the claim, which does not). The
    event only carries ``repr(cause)``: a retry's cause is the downstream error, a
    deferral's is ``None`` or a store error, so the two are told apart by that text.
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
            if str(event.get("exception", "")).startswith(self.RETRY_CAUSES):
                tally.ev_retried += 1
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
        for column in ("published", "done", "succeeded", "failed", "retries (events)",
                       "deferrals (events)", "downstream calls", "503 injected", "charges applied",
                       "elapsed", "msg/s"):
            table.add_column(column, justify="right")
        table.add_row(
            str(t.published), f"{t.done}/{t.published}", str(t.succeeded), str(t.failed),
            str(t.ev_retried), str(t.ev_deferred), str(stats.get("calls", "-")),
            str(stats.get("failures_injected", "-")), str(stats.get("applied", "-")),
            f"{elapsed:.1f}s", f"{t.done / elapsed:.0f}" if elapsed > 0 else "-",
        )
        return table


def summary(tally: Tally, stats: dict[str, Any], timed_out: bool) -> tuple[Group, bool]:
    """The final tables and whether every check held."""
    table = Table(title="summary")
    for column in ("orders", "messages", "succeeded", "retried", "failed", "deduplicated",
                   "fallback-served", "breaker-rejected"):
        table.add_column(column, justify="right")
    # deduplicated: messages answered from the idempotency record instead of running the
    # body. The task puts its own task id in its result, so a result carrying another id
    # is a replay; the arithmetic cross-check is succeeded messages minus charges applied.
    # Fallbacks and breakers are not built yet and the task states no policy for them, so
    # those columns say "n/a" rather than a 0 that would look measured.
    table.add_row(
        str(tally.jobs), str(tally.published), str(tally.succeeded), str(tally.retries),
        str(tally.failed), str(tally.replayed), "n/a", "n/a",
    )
    applied = stats.get("applied")
    checks = [
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
    for text, ok, values in checks:
        check_table.add_row(Text("✓", "green") if ok else Text("✗", "bold red"), text, values)
    info = Text(
        f"downstream: {stats.get('calls')} calls, {stats.get('failures_injected')} injected 503s, "
        f"{applied} charges applied (failure rate {stats.get('failure_rate')})\n"
        f"events: {tally.ev_succeeded} succeeded, {tally.ev_failed} failed, {tally.ev_retried} "
        f"retries, {tally.ev_deferred} deferrals (duplicates waiting for an in-flight claim)\n"
        f"time: {tally.elapsed():.1f}s for {tally.published} messages"
    )
    parts: list[Any] = [table, check_table, info]
    if tally.failures:
        parts.append(Text("failures: " + "; ".join(f"{n} x {why}" for why, n in tally.failures.items())))
    return Group(*parts), all(ok for _, ok, _ in checks)


# -- the run -----------------------------------------------------------------------------


def publish(charge: Any, app: Any, tally: Tally, run: str, jobs: int, seed: int) -> list[Any]:
    """Send every order once and ~10 % twice, shuffled, as a retrying producer would."""
    rng = random.Random(seed)
    messages = []
    for n in range(jobs):
        order = {"order_id": f"{run}-{n:06d}", "customer_id": f"c{rng.randrange(200):03d}",
                 "amount": rng.randrange(100, 50_000)}
        messages.append(order)
        if rng.random() < DUPLICATE_SHARE:
            messages.append(order)
    rng.shuffle(messages)
    results = []
    with app.producer_or_acquire() as producer:
        for kwargs in messages:
            results.append(charge.apply_async(kwargs=kwargs, task_id=str(uuid.uuid4()), producer=producer))
            tally.published += 1
    return results


def collect(results: list[Any], tally: Tally, timeout: float) -> bool:
    """Wait on the result backend for every message; False if the time ran out."""
    from celery.result import ResultSet

    try:
        for task_id, meta in ResultSet(results).iter_native(timeout=timeout, interval=0.2):
            tally.retries += int(meta.get("retries") or 0)
            value = meta.get("result")
            if meta.get("status") == "SUCCESS" and isinstance(value, dict):
                tally.succeeded += 1
                tally.charged_orders.add(str(value.get("order_id")))
                if value.get("task_id") != task_id:
                    tally.replayed += 1
            else:
                tally.failed += 1
                why = f"{meta.get('status')} {type(value).__name__}"
                tally.failures[why] = tally.failures.get(why, 0) + 1
    except TimeoutError:
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
    from workers.app import app, charge

    tally = Tally(jobs=args.jobs)
    events = stack.enter_context(EventCounter(app, tally))
    stack.enter_context(worker_processes(env, run_id))
    with console.status(f"starting {WORKERS} workers"):
        wait_until(lambda: len(tally.workers) >= WORKERS or events.error, timeout=60,
                   interval=0.1, what="the workers to come online")
    console.print(f"redis {base}  downstream {downstream_url}  workers {sorted(tally.workers)}")

    screen = Screen(tally, downstream_url)
    tally.started = time.monotonic()
    with Live(get_renderable=screen.render, console=console, refresh_per_second=4):
        sent = publish(charge, app, tally, run_id, args.jobs, args.seed)
        complete = collect(sent, tally, args.timeout)
        tally.finished = time.monotonic()
        time.sleep(0.3)  # let the last events land before the final frame
    stats = screen.poll(force=True)
    report, ok = summary(tally, stats, timed_out=not complete)
    console.print(report)
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
