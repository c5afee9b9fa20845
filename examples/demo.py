"""``make demo``: an outage of a payments provider, told by real workers in about a minute.

What runs, all on loopback and all stopped on exit (normal end, error or Ctrl-C):

- a private ``redis-server`` (``resilient_tasks.testing.RedisServer``) unless ``REDIS_URL``
  names one; broker, resilience store and result backend use three consecutive DBs;
- the payments provider (``examples.downstream``) as a process of its own;
- two ``celery -A workers.app worker`` processes (threads pool), each in its own process
  group, running ``workers.app.charge`` and ``examples.rates.fx_rate`` under the short
  windows of ``examples/demo_policies.toml``.

Orders arrive at a steady rate (about 10 % of them published twice, as a producer that
retries its publish would), each with a charge, and every other one asks for an exchange
rate. Both tasks call the provider through one fleet-wide breaker, ``payments``. The story:

1. healthy: a few calls fail and are retried;
2. outage: the provider dies. The breaker trips for every worker at once; charges are
   deferred to the half-open time without spending retries; rates are served from the
   cache, marked with their age, and trusted for ``max(floor, ttl * decay**n)`` seconds,
   n being the failures in a row, so the TTL shrinks while the outage lasts (past it,
   the shop's reference table answers). Every ``open_for`` one half-open probe fails;
3. recovery: the provider is back; the next probe succeeds, the breaker closes and the
   deferred charges run;
4. maintenance: an operator runs ``celery -A workers.app resilience open payments``
   (the real command, in a subprocess): no worker calls the provider until
   ``resilience close payments``;
5. normal traffic; then every message is waited for and checked: each order was charged
   exactly once (the provider counts charges per order), deferrals spent no retry, the
   breaker tripped and closed, the switch held. The exit status is 1 if a check fails.

``python -m examples.demo [--rate N] [--healthy S] [--outage S] [--recovery S]
[--maintenance S] [--normal S]``, or ``make demo DEMO_ARGS="--outage 30"``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import tomllib
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
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
APP = "workers.app"
BREAKER = "payments"
CHARGE = "workers.app.charge"
FX = "examples.rates.fx_rate"
POLICIES = ROOT / "examples" / "demo_policies.toml"
WORKERS = 2
# Threads, not prefork: the tasks wait on HTTP and Redis, and two worker processes
# already keep both cores of the target machine busy.
POOL, CONCURRENCY = "threads", 8
DUPLICATE_SHARE = 0.10
STOP_TIMEOUT = 15.0
POLL = 0.2  # seconds between looks at the breaker and the provider
STATE_STYLE = {"closed": "bold green", "open": "bold red", "half_open": "bold yellow"}


# -- the story ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Phase:
    key: str
    title: str
    seconds: float
    story: str


def story(args: argparse.Namespace) -> list[Phase]:
    return [
        Phase("healthy", "healthy", args.healthy,
              f"the provider answers; {args.failure_rate:.0%} of its calls fail and are retried"),
        Phase("outage", "OUTAGE", args.outage,
              "the provider is dead: the breaker opens on every worker, charges wait without "
              "spending retries, rates come from the cache while their TTL shrinks"),
        Phase("recovery", "recovery", args.recovery,
              "the provider is back: the next half-open probe closes the breaker, deferred "
              "charges run"),
        Phase("maintenance", "operator switch", args.maintenance,
              f"`celery -A {APP} resilience open {BREAKER}`: no worker calls the provider until "
              "the operator closes it"),
        Phase("normal", "normal", args.normal,
              f"`resilience close {BREAKER}`, then normal traffic; every message is waited for"),
    ]


class Timeline:
    """What happened, when (seconds since the first order), for the screen and the end."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.lines: list[tuple[float, Text]] = []
        self._lock = threading.Lock()
        self._probes: dict[str, Any] | None = None  # the line of failed probes being counted

    def now(self) -> float:
        return time.monotonic() - self.started

    def add(self, text: str, style: str = "") -> int:
        """A new line; returns its index (for ``amend``)."""
        with self._lock:
            self._probes = None
            self.lines.append((self.now(), Text(text, style)))
            return len(self.lines) - 1

    def amend(self, index: int, text: str, style: str) -> None:
        """Add to a line already shown (a command's answer, after the command)."""
        with self._lock:
            at, line = self.lines[index]
            self.lines[index] = (at, Text.assemble(line, (text, style)))

    def probe_failed(self, count: int, consec: int, ttl: float, open_for: float) -> None:
        """Failed half-open probes in a row make one line, updated as they come."""
        with self._lock:
            if self._probes is None:
                self._probes = {"at": self.now(), "n": 0, "first": (consec, ttl)}
                self.lines.append((self._probes["at"], Text("")))
            probes = self._probes
            probes["n"] += count
            first_consec, first_ttl = probes["first"]
            text = (f"half-open probe failed -> open again for {open_for:g}s; cached rates are "
                    f"trusted {ttl:.1f}s now ({consec} failures in a row)")
            if probes["n"] > 1:
                text = (f"{probes['n']} half-open probes failed (one per {open_for:g}s, the last at "
                        f"{self.now():.1f}s); cached rates are trusted {first_ttl:.1f}s -> {ttl:.1f}s "
                        f"({first_consec} -> {consec} failures in a row)")
            self.lines[-1] = (probes["at"], Text(text, "yellow"))

    def render(self) -> Text:
        with self._lock:
            lines = list(self.lines)
        out = Text()
        for at, text in lines:
            out.append(f"{at:6.1f}s  ", "dim")
            out.append_text(text)
            out.append("\n")
        out.rstrip()
        return out


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
def worker_processes(env: dict[str, str], run: str, logs: Path) -> Iterator[list[SubprocessWorker]]:
    """Two ``celery worker`` process groups, stopped together (warm, then SIGKILL)."""
    workers = []
    try:
        for n in range(1, WORKERS + 1):
            log = logs / f"demo-worker{n}.log"
            log.unlink(missing_ok=True)
            worker = SubprocessWorker(
                APP, pool=POOL, concurrency=CONCURRENCY, name=f"demo{n}-{run}", env=env,
                log=str(log), queues=["payments", "celery"], extra=["--include", "examples.rates"],
            )
            workers.append(worker.start())
        yield workers
    finally:
        for worker in workers:
            worker.signal(signal.SIGTERM)  # all at once: both shut down in parallel
        for worker in workers:
            worker.stop(timeout=STOP_TIMEOUT)


def resilience_command(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """``celery -A workers.app resilience ARGS``: the operator's real command line."""
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", APP, "resilience", *args],
        cwd=ROOT, env=os.environ.copy(), capture_output=True, text=True, timeout=timeout, check=False,
    )


def shown(command: subprocess.CompletedProcess[str]) -> str:
    """A command's answer on one line: its output, or its error and exit status."""
    text = (command.stdout.strip() or command.stderr.strip()).splitlines()
    answer = text[-1] if text else ""
    return answer if command.returncode == 0 else f"exit {command.returncode}: {answer}"


# -- counting ----------------------------------------------------------------------------


@dataclass
class Tally:
    """What the demo knows: from the result backend (authoritative), events and polls (live)."""

    phases: list[Phase]
    kinds: dict[str, str] = field(default_factory=dict)  # task id -> CHARGE or FX
    orders: set[str] = field(default_factory=set)
    published: int = 0
    charge_messages: int = 0
    phase: int = -1  # index of the phase running now; len(phases) while draining
    per_phase: list[Counter[str]] = field(default_factory=list)
    oldest_cached: list[float] = field(default_factory=list)  # per phase, seconds
    # final states, from the result backend
    succeeded: int = 0
    failed: int = 0
    replayed: int = 0  # charges answered with another message's stored result
    retries: int = 0  # retries spent by charges, from the results' ``retries``
    fx: Counter[str] = field(default_factory=Counter)  # fresh / cache / function
    fx_outage_cache: int = 0
    reference_noted: bool = False
    last_cached: tuple[float, float] | None = None  # (when, age_s) of the latest cached rate
    failures: Counter[str] = field(default_factory=Counter)
    # from events
    ev_retried: int = 0
    ev_breaker: int = 0  # deferred because the breaker was open (or held open)
    ev_duplicate: int = 0  # a duplicate waiting while another message holds the claim
    workers: set[str] = field(default_factory=set)
    pending: set[str] = field(default_factory=set)  # task ids without a final state yet
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.per_phase = [Counter() for _ in self.phases]
        self.oldest_cached = [0.0 for _ in self.phases]

    @property
    def done(self) -> int:
        return self.succeeded + self.failed

    def bump(self, what: str, n: int = 1) -> None:
        with self._lock:
            if 0 <= self.phase < len(self.phases):
                self.per_phase[self.phase][what] += n

    def reference(self) -> float | None:
        """A rate from the reference table. The first one in the outage means the cached
        rates outlived their TTL: then the age of the oldest one served, else None."""
        with self._lock:
            if not 0 <= self.phase < len(self.phases):
                return None
            self.per_phase[self.phase]["fx_function"] += 1
            oldest = self.oldest_cached[self.phase]
            if self.reference_noted or self.phases[self.phase].key != "outage" or not oldest:
                return None
            self.reference_noted = True
            return oldest

    def cached(self, age: float) -> None:
        with self._lock:
            self.last_cached = (time.monotonic(), age)
            if 0 <= self.phase < len(self.phases):
                self.per_phase[self.phase]["fx_cache"] += 1
                self.oldest_cached[self.phase] = max(self.oldest_cached[self.phase], age)
                if self.phases[self.phase].key == "outage":
                    self.fx_outage_cache += 1


class EventCounter:
    """Follows task events from the broker in a thread, to show each phase as it happens.

    ``task-retried`` is sent for a retry (which spends an attempt) and for a deferral
    (which does not: a task whose breaker is open, or a duplicate waiting for the message
    holding the claim). The event only carries the text ``Retry(Retry(...), <cause>,
    <countdown>)``, so they are told apart by the cause: the provider's error for a retry,
    ``CircuitOpen`` for the breaker, anything else for a duplicate. The checks count
    retries from the result backend, which does not depend on this.
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
            if tally.kinds.get(str(event.get("uuid"))) == CHARGE:
                tally.bump("charges_done")
        elif kind == "task-retried":
            cause = str(event.get("exception", ""))
            if any(name in cause for name in self.RETRY_CAUSES):
                tally.ev_retried += 1
                tally.bump("retries")
            elif "CircuitOpen(" in cause:
                tally.ev_breaker += 1
                tally.bump("deferred")
            else:
                tally.ev_duplicate += 1

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


@dataclass
class Breaker:
    """The fields of the ``payments`` breaker the screen and the checks use."""

    state: str = "closed"
    switch: str = "normal"
    consec: int = 0
    trips: int = 0
    opens: int = 0
    open_until_ms: int = 0

    @classmethod
    def read(cls, app: Any) -> Breaker | None:
        """From ``resilient_tasks.switches.breakers``, the fleet-wide state in the store."""
        from resilient_tasks.switches import breakers

        for fields in breakers(app):
            if fields.get("name") == BREAKER:
                return cls(
                    state=fields.get("state") or "closed", switch=fields.get("switch") or "normal",
                    consec=_number(fields, "consec"), trips=_number(fields, "trips"),
                    opens=_number(fields, "opens"), open_until_ms=_number(fields, "open_until"),
                )
        return None

    @property
    def failed_probes(self) -> int:
        """Re-openings from half-open: every opening that was not a trip from closed."""
        return max(0, self.opens - self.trips)


def _number(fields: dict[str, str], name: str) -> int:
    try:
        return int(float(fields.get(name) or 0))
    except ValueError:
        return 0


def open_for() -> float:
    """The breaker's ``open_for`` as the demo's policies file sets it."""
    policies = tomllib.loads(POLICIES.read_text())
    breaker = {**policies.get("defaults", {}).get("breaker", {}), **policies["downstreams"][BREAKER]}
    return float(breaker.get("open_for", 30.0))


class Watcher:
    """Polls the breaker and the provider in a thread; turns changes into timeline lines."""

    def __init__(self, app: Any, url: str, tally: Tally, timeline: Timeline, open_for: float) -> None:
        self.app, self.url, self.tally, self.timeline = app, url, tally, timeline
        self.open_for = open_for
        self.breaker = Breaker()
        self.stats: dict[str, Any] = {}
        self.error: BaseException | None = None
        self.tripped_at: float | None = None  # timeline seconds of the first trip
        self.closed_by_probe: list[float] = []  # timeline seconds of each close by a probe
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-watch", daemon=True)

    def poll(self) -> None:
        with contextlib.suppress(OSError, downstream.DownstreamError):
            self.stats = downstream.stats(self.url, timeout=2.0)
        now = Breaker.read(self.app)
        if now is not None:
            self._changes(self.breaker, now)
            self.breaker = now

    def _changes(self, before: Breaker, now: Breaker) -> None:
        from examples.rates import fallback_ttl

        ttl = fallback_ttl(now.consec)
        if now.trips > before.trips:
            if self.tripped_at is None:
                self.tripped_at = self.timeline.now()
            self.timeline.add(
                f"breaker {BREAKER} tripped: closed -> open after {now.consec} failures in a row. "
                f"Every worker now defers charges and serves cached rates (trusted {ttl:.1f}s)",
                "bold red",
            )
        if now.failed_probes > before.failed_probes:
            count = now.failed_probes - before.failed_probes
            self.timeline.probe_failed(count, now.consec, ttl, self.open_for)
        if now.switch != before.switch:
            self.timeline.add(f"switch of {BREAKER}: {before.switch} -> {now.switch} (read by every worker)",
                              "bold magenta")
        elif before.state != "closed" and now.state == "closed" and now.switch == "normal":
            self.closed_by_probe.append(self.timeline.now())
            self.timeline.add(f"half-open probe succeeded -> {BREAKER} closed; deferred charges run",
                              "bold green")

    def _run(self) -> None:
        while not self._stopping.wait(POLL):
            try:
                self.poll()
            except Exception as exc:  # a store hiccup: shown, and the next poll tries again
                self.error = exc

    def __enter__(self) -> Watcher:
        self.poll()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)


# -- the director: phases, the provider and the operator ----------------------------------


class Director(threading.Thread):
    """Runs the story: kills and heals the provider, runs the operator's commands."""

    def __init__(self, tally: Tally, timeline: Timeline, url: str) -> None:
        super().__init__(name="demo-director", daemon=True)
        self.tally, self.timeline, self.url = tally, timeline, url
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.phase_calls: list[int | None] = [None] * len(tally.phases)  # provider calls at each start
        self.commands: list[tuple[str, subprocess.CompletedProcess[str]]] = []
        self.held: tuple[float, int] | None = None  # (seconds, provider calls) while switched open
        self.ended = threading.Event()

    def provider_calls(self) -> int:
        stats = downstream.stats(self.url, timeout=5.0)
        return int(stats["calls"]) + int(stats["rate_calls"])

    def command(self, *args: str) -> subprocess.CompletedProcess[str]:
        line = f"$ celery -A {APP} resilience {' '.join(args)}"
        index = self.timeline.add(line, "bold cyan")
        done = resilience_command(*args)
        self.commands.append((line, done))
        self.timeline.amend(index, f"  ->  {shown(done)}", "cyan" if done.returncode == 0 else "bold red")
        return done

    def run(self) -> None:
        try:
            self._story()
        except Exception as exc:  # reported by the checks
            self.error = exc
            self.timeline.add(f"the story stopped: {exc!r}", "bold red")
        finally:
            self.tally.phase = len(self.tally.phases)
            self.ended.set()

    def _story(self) -> None:
        offset = 0.0
        hold_from: tuple[float, int] | None = None
        for index, phase in enumerate(self.tally.phases):
            if self.stop.wait(max(0.0, self.timeline.started + offset - time.monotonic())):
                return
            offset += phase.seconds
            self.phase_calls[index] = self.provider_calls()
            self.tally.phase = index
            self.timeline.add(f"-- {phase.title}: {phase.story}", "bold")
            if phase.key == "outage":
                downstream.set_down(self.url, True)
                self.timeline.add("the provider goes down: every call is answered 503", "red")
            elif phase.key == "recovery":
                downstream.set_down(self.url, False)
                self.timeline.add("the provider is back up", "green")
            elif phase.key == "maintenance":
                if self.command("open", BREAKER).returncode == 0:
                    time.sleep(0.5)  # calls admitted before the switch may still be in flight
                    hold_from = (time.monotonic(), self.provider_calls())
            elif phase.key == "normal":
                if hold_from is not None:
                    self.held = (time.monotonic() - hold_from[0], self.provider_calls() - hold_from[1])
                self.command("close", BREAKER)
        self.stop.wait(max(0.0, self.timeline.started + offset - time.monotonic()))


# -- the screen ----------------------------------------------------------------------------


class Screen:
    """The live view: the phase, the breaker and the fallback TTL, a row per phase, the timeline."""

    def __init__(self, tally: Tally, timeline: Timeline, watcher: Watcher, director: Director) -> None:
        self.tally, self.timeline, self.watcher, self.director = tally, timeline, watcher, director

    def header(self) -> Text:
        t, phases = self.tally, self.tally.phases
        elapsed = self.timeline.now()
        out = Text(f"resilient-tasks demo · {WORKERS} workers x {CONCURRENCY} threads · {elapsed:5.1f}s\n",
                   "bold")
        for index, phase in enumerate(phases):
            style = "reverse bold" if index == t.phase else "dim" if index > t.phase else ""
            out.append(f" {phase.title} ", style)
            out.append(" > " if index + 1 < len(phases) else "  ", "dim")
        if t.phase >= len(phases):
            out.append(f"\nwaiting for the last messages: {t.done}/{t.published} finished", "italic")
        elif t.phase >= 0:
            left = sum(p.seconds for p in phases[: t.phase + 1]) - elapsed
            out.append(f"\n{phases[t.phase].story} ({max(0.0, left):.0f}s left)", "italic")
        return out

    def breaker(self) -> Table:
        from examples.rates import FX_FALLBACK, fallback_ttl

        b, stats, t = self.watcher.breaker, self.watcher.stats, self.tally
        rule = f"max({FX_FALLBACK.floor:g}, {FX_FALLBACK.ttl:g} x {FX_FALLBACK.decay:g}^n)"
        table = Table(title=f"breaker {BREAKER}, fleet-wide in Redis; cached rates are trusted {rule} "
                      "seconds, n = failures in a row", title_justify="left")
        for column in ("provider", "breaker", "switch", "n", "trips", "failed probes",
                       "cached rate TTL", "cached rate served", "retries", "deferred"):
            table.add_column(column, justify="right")
        down = stats.get("down")
        provider = Text("-") if down is None else Text("DOWN", "bold red") if down else Text("up", "green")
        state = Text(b.state, STATE_STYLE.get(b.state, ""))
        if b.state == "open":
            left = b.open_until_ms / 1000 - time.time()
            state.append(f" (probe in {left:.1f}s)" if left > 0 else " (probe due)", "dim")
        switch = Text(b.switch, "bold magenta" if b.switch != "normal" else "")
        ttl = fallback_ttl(b.consec)
        ttl_text = Text(f"{ttl:.1f}s", "bold yellow" if ttl < FX_FALLBACK.ttl else "")
        served = Text("-")
        if t.last_cached is not None and time.monotonic() - t.last_cached[0] < 2.0:
            served = Text(f"age {t.last_cached[1]:.1f}s", "yellow")
        table.add_row(provider, state, switch, str(b.consec), str(b.trips), str(b.failed_probes), ttl_text,
                      served, str(t.ev_retried), str(t.ev_breaker))
        return table

    def phases(self) -> Table:
        t = self.tally
        table = Table(title="per phase (charges, then rates: live, from the cache with the oldest age "
                      "served, from the reference table)", title_justify="left")
        for column in ("phase", "s", "orders", "charges ok", "retries", "deferred", "live", "cached",
                       "reference", "provider calls"):
            table.add_column(column, justify="right")
        calls_now = int(self.watcher.stats.get("calls", 0)) + int(self.watcher.stats.get("rate_calls", 0))
        starts = self.director.phase_calls
        for index, phase in enumerate(t.phases):
            row = t.per_phase[index]
            if index > t.phase:
                table.add_row(Text(phase.title, "dim"), f"{phase.seconds:g}", *("" for _ in range(8)))
                continue
            start = starts[index]
            following = starts[index + 1] if index + 1 < len(starts) else None
            end = calls_now if following is None else following
            cached = str(row["fx_cache"])
            if row["fx_cache"]:
                cached += f" ({t.oldest_cached[index]:.1f}s)"
            table.add_row(
                Text(phase.title, "bold" if index == t.phase else ""), f"{phase.seconds:g}",
                str(row["orders"]), str(row["charges_done"]), str(row["retries"]), str(row["deferred"]),
                str(row["fx_fresh"]), cached, str(row["fx_function"]),
                "-" if start is None else str(max(0, end - start)),
            )
        return table

    def render(self) -> Group:
        return Group(self.header(), self.breaker(), self.phases(), Text("timeline", "bold"),
                     self.timeline.render())


# -- publishing and results ------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    at: float  # seconds after the first order
    task_id: str
    task: str
    kwargs: dict[str, Any]


def messages(run: str, seconds: float, rate: float, seed: int | None) -> list[Message]:
    """``rate`` orders a second for ``seconds``, ~10 % published twice (the second copy a
    moment later, as a producer retrying its publish would), and a rate lookup for every
    other order."""
    from examples.rates import CURRENCIES

    rng = random.Random(seed)
    out = []
    for n in range(int(seconds * rate)):
        at = n / rate
        order = {"order_id": f"{run}-{n:06d}", "customer_id": f"c{rng.randrange(200):03d}",
                 "amount": rng.randrange(100, 50_000)}
        out.append(Message(at, str(uuid.uuid4()), CHARGE, order))
        if rng.random() < DUPLICATE_SHARE:
            out.append(Message(min(seconds, at + rng.uniform(0.1, 2.0)), str(uuid.uuid4()), CHARGE, order))
        if n % 2 == 0:
            out.append(Message(at + 0.5 / rate, str(uuid.uuid4()), FX, {"currency": rng.choice(CURRENCIES)}))
    return sorted(out, key=lambda m: m.at)


class Publisher(threading.Thread):
    """Sends each message at its time while the main thread already collects results.

    It publishes through an app with no result backend: the demo's own app would
    subscribe to a Redis channel per message and unsubscribe when each ``AsyncResult`` is
    garbage-collected, which blocks for 20 s of reconnects if Redis is already gone (as
    after a Ctrl-C). Results are read from the backend by task id instead (``collect``).
    """

    def __init__(self, broker: str, batch: list[Message], tally: Tally, timeline: Timeline) -> None:
        super().__init__(name="demo-publisher", daemon=True)
        self.broker, self.batch, self.tally, self.timeline = broker, batch, tally, timeline
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        from celery import Celery

        sender = Celery("demo-publisher", broker=self.broker, set_as_current=False)
        sender.conf.update(task_serializer="json", accept_content=["json"])
        try:
            with sender.producer_or_acquire() as producer:
                for message in self.batch:
                    if self.stop.wait(max(0.0, self.timeline.started + message.at - time.monotonic())):
                        return
                    queue = "payments" if message.task == CHARGE else "celery"
                    sender.send_task(message.task, kwargs=message.kwargs, task_id=message.task_id,
                                     queue=queue, producer=producer)
                    self.tally.published += 1
                    if message.task == CHARGE:
                        self.tally.charge_messages += 1
                        order = message.kwargs["order_id"]
                        if order not in self.tally.orders:
                            self.tally.orders.add(order)
                            self.tally.bump("orders")
        except Exception as exc:  # reported by collect(), which stops waiting
            self.error = exc
        finally:
            sender.close()


def collect(
    app: Any, publisher: Publisher, tally: Tally, timeline: Timeline, timeout: Callable[[], bool]
) -> bool:
    """Read every message's final state from the result backend; False on timeout.

    ``get_many`` polls with one MGET over the ids still pending, so results are read as
    they land while publishing goes on (an id not yet published simply stays pending).
    """
    from celery.exceptions import TimeoutError as CeleryTimeout

    import resilient_tasks as rt

    def between_polls() -> None:
        if publisher.error is not None:
            raise RuntimeError(f"publishing failed: {publisher.error!r}") from publisher.error
        if timeout():
            raise CeleryTimeout("no final state for every message in time")

    ids = [message.task_id for message in publisher.batch]
    tally.pending = set(ids)
    try:
        for task_id, meta in app.backend.get_many(ids, interval=0.2, on_interval=between_polls):
            tally.pending.discard(task_id)
            kind, value = tally.kinds.get(task_id), meta.get("result")
            if meta.get("status") != "SUCCESS":
                tally.failed += 1
                why = type(value).__name__ if isinstance(value, BaseException) else str(meta.get("status"))
                tally.failures[f"{kind}: {why}"] += 1
                continue
            tally.succeeded += 1
            if kind == CHARGE:
                tally.retries += int(meta.get("retries") or 0)
                if isinstance(value, dict) and value.get("task_id") != task_id:
                    tally.replayed += 1
                continue
            _, degraded = rt.unwrap(value)
            source = "fresh" if degraded is None else degraded.source
            tally.fx[source] += 1
            if degraded is not None and source == "cache":
                tally.cached(float(degraded.age_s or 0.0))
                continue
            if source != "function":
                tally.bump("fx_fresh")
            elif (oldest := tally.reference()) is not None:
                timeline.add(f"cached rates outlived their shrinking TTL (the oldest served was "
                             f"{oldest:.1f}s old): the reference table answers from now on", "yellow")
    except (CeleryTimeout, TimeoutError):
        return False
    return True


# -- the end -----------------------------------------------------------------------------


def checks(
    tally: Tally, watcher: Watcher, director: Director, charges: dict[str, int] | None, complete: bool,
    events_ok: bool,
) -> list[tuple[str, bool | None, str]]:
    """(what, held, the numbers) for every closing check; None when it could not be checked."""
    stats = watcher.stats
    found: list[tuple[str, bool | None, str]] = [(
        "every message finished, none failed",
        complete and tally.done == tally.published and tally.failed == 0,
        f"{tally.succeeded} succeeded + {tally.failed} failed of {tally.published}",
    )]
    if charges is None:
        found.append(("each order was charged exactly once (the provider's count per order)", None,
                      "the provider did not answer"))
    else:
        counts = Counter(charges.get(order, 0) for order in tally.orders)
        strays = len(set(charges) - tally.orders)
        once = counts[1] == len(tally.orders) and strays == 0
        detail = ", ".join(f"{n} x {times}" for times, n in sorted(counts.items()))
        found.append(("each order was charged exactly once (the provider's count per order)", once,
                      f"{len(tally.orders)} orders charged: {detail or 'none'}"
                      + (f"; {strays} unknown orders" if strays else "")))
    duplicates = tally.charge_messages - len(tally.orders)
    found.append(("every duplicate message was answered from the idempotency record",
                  tally.replayed == duplicates, f"{tally.replayed} replayed == {duplicates} duplicates"))
    trips = watcher.breaker.trips
    starts = {p.key: sum(q.seconds for q in tally.phases[:i]) for i, p in enumerate(tally.phases)}
    closed = next((at for at in watcher.closed_by_probe
                   if starts["recovery"] <= at < starts["maintenance"] + 0.5), None)
    found.append((
        "the outage tripped the breaker; a half-open probe closed it after the provider came back",
        trips >= 1 and closed is not None,
        f"tripped {trips}x" + (f" at {watcher.tripped_at:.1f}s" if watcher.tripped_at is not None else "")
        + f", {watcher.breaker.failed_probes} failed probes, "
        + (f"closed by a probe at {closed:.1f}s" if closed is not None else "never closed by a probe"),
    ))
    refused = int(stats.get("failures_injected", 0)) + int(stats.get("refused_down", 0))
    found.append((
        "deferred charges spent no retry: retries == charge calls the provider refused",
        (tally.retries == refused and tally.ev_breaker > 0) if events_ok else tally.retries == refused,
        f"{tally.ev_breaker if events_ok else '?'} deferrals; {tally.retries} retries, "
        f"{refused} refused charge calls",
    ))
    outage = next(i for i, p in enumerate(tally.phases) if p.key == "outage")
    found.append((
        "rates were served from the cache during the outage, with their age",
        tally.fx_outage_cache > 0,
        f"{tally.fx_outage_cache} cached (oldest {tally.oldest_cached[outage]:.1f}s), "
        f"{tally.per_phase[outage]['fx_function']} from the reference table",
    ))
    commands_ok = len(director.commands) == 2 and all(c.returncode == 0 for _, c in director.commands)
    held = director.held
    found.append((
        f"`resilience open {BREAKER}` held every worker off the provider until `close`",
        commands_ok and held is not None and held[1] == 0,
        "; ".join(f"{line.split(' resilience ')[1]}: {shown(c)}" for line, c in director.commands)
        + (f"; {held[1]} provider calls in {held[0]:.1f}s held" if held is not None else ""),
    ))
    found.append((
        "no duplicate or stale write reached the provider",
        stats.get("duplicates_rejected") == 0 and stats.get("stale_token_rejected") == 0,
        f"{stats.get('duplicates_rejected')} duplicate, {stats.get('stale_token_rejected')} stale",
    ))
    if not complete:  # work still in flight: only the first check means anything
        found = found[:1] + [(text, None, "not checked: the run timed out") for text, _, _ in found[1:]]
    return found


def status_table() -> Table | Text:
    """``celery -A workers.app resilience status --json``, run as an operator would."""
    done = resilience_command("status", "--json")
    try:
        rows = json.loads(done.stdout)
    except ValueError:
        return Text(f"resilience status: {shown(done)}", "red")
    table = Table(title=f"$ celery -A {APP} resilience status", title_justify="left")
    wanted = ("downstream", "state", "switch", "calls", "failures", "failure_rate", "consecutive_failures",
              "trips", "opens")
    columns = [c for c in wanted if any(c in row for row in rows)] or sorted({k for row in rows for k in row})
    for column in columns:
        table.add_column(column.replace("_", " "))
    for row in rows:
        table.add_row(*("-" if row.get(c) is None else str(row.get(c)) for c in columns))
    return table


def summary(
    tally: Tally, watcher: Watcher, director: Director, complete: bool, events: EventCounter
) -> tuple[Group, bool]:
    """The closing checks and whether every one held."""
    try:
        charges: dict[str, int] | None = downstream.charges(watcher.url)
    except (OSError, downstream.DownstreamError):
        charges = None
    watcher.poll()
    found = checks(tally, watcher, director, charges, complete, events.error is None)
    table = Table(title="checks", show_header=False, title_justify="left")
    table.add_column("ok")
    table.add_column("check")
    table.add_column("values")
    for text, ok, values in found:
        mark = Text("-") if ok is None else Text("✓", "green") if ok else Text("✗", "bold red")
        table.add_row(mark, text, values)
    stats, fx = watcher.stats, tally.fx
    info = Text(
        f"charges: {tally.charge_messages} messages for {len(tally.orders)} orders, {tally.retries} retries, "
        f"{tally.replayed} replayed; rates: {fx['fresh']} live, {fx['cache']} cached, {fx['function']} "
        f"from the reference table\nprovider: {stats.get('calls')} charge calls ({stats.get('applied')} "
        f"applied, {stats.get('failures_injected')} injected 503s, {stats.get('refused_down')} refused while "
        f"down), {stats.get('rate_calls')} rate calls ({stats.get('rate_failures')} failed)"
    )
    parts: list[Any] = [table, info]
    if tally.failures:
        parts.append(Text("failed: " + "; ".join(f"{n} x {why}" for why, n in tally.failures.items()), "red"))
    errors = (("events", events.error), ("breaker watch", watcher.error), ("story", director.error))
    for what, error in errors:
        if error is not None:
            parts.append(Text(f"{what}: {error!r}", "yellow"))
    ok = all(held is not False for _, held, _ in found) and complete
    passed = sum(1 for _, held, _ in found if held)
    parts.append(Text(f"checks: {passed}/{len(found)} passed", "bold green" if ok else "bold red"))
    return Group(*parts), ok


# -- the run -----------------------------------------------------------------------------


def run(args: argparse.Namespace, stack: contextlib.ExitStack, console: Console) -> int:
    run_id = uuid.uuid4().hex[:8]  # order ids are unique per run: a reused REDIS_URL is safe
    base = os.environ.get("REDIS_URL")
    if not base:
        with console.status("starting redis-server"):
            server = stack.enter_context(RedisServer())
        base = server.url(0)
    broker, store, results = redis_urls(base)
    downstream_url = stack.enter_context(
        downstream_process(args.failure_rate, args.logs / "demo-downstream.log")
    )
    env = {
        "RT_BROKER_URL": broker, "RT_RESULT_BACKEND": results,
        "RESILIENT_TASKS_REDIS_URL": store, "RT_DOWNSTREAM_URL": downstream_url,
        "RESILIENT_TASKS_POLICIES": str(POLICIES),
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
    }
    os.environ.update(env)  # before the import: workers.app reads them at import time
    from workers.app import app

    phases = story(args)
    seconds = sum(p.seconds for p in phases)
    tally = Tally(phases=phases)
    events = stack.enter_context(EventCounter(app, tally))
    stack.enter_context(worker_processes(env, run_id, args.logs))
    with console.status(f"starting {WORKERS} workers"):
        wait_until(lambda: len(tally.workers) >= WORKERS or events.error, timeout=60,
                   interval=0.1, what="the workers to come online")
    console.print(f"redis {base}  provider {downstream_url}  workers {sorted(tally.workers)}\n"
                  f"policies {POLICIES.relative_to(ROOT)}; logs {args.logs}/demo-*.log")

    batch = messages(run_id, seconds, args.rate, args.seed)
    tally.kinds = {m.task_id: m.task for m in batch}
    timeline = Timeline()
    watcher = stack.enter_context(Watcher(app, downstream_url, tally, timeline, open_for()))
    director = Director(tally, timeline, downstream_url)
    publisher = Publisher(broker, batch, tally, timeline)
    screen = Screen(tally, timeline, watcher, director)
    timeline.started = time.monotonic()
    deadline = timeline.started + seconds + args.timeout
    try:
        with Live(get_renderable=screen.render, console=console, refresh_per_second=4):
            director.start()
            publisher.start()
            complete = collect(app, publisher, tally, timeline, lambda: time.monotonic() > deadline)
            director.ended.wait(timeout=max(0.0, deadline - time.monotonic()))
            time.sleep(0.5)  # let the last events and polls land before the final frame
            watcher.poll()
    finally:
        publisher.stop.set()
        director.stop.set()
        for thread in (publisher, director):
            if thread.is_alive():
                thread.join(timeout=5)
    report, ok = summary(tally, watcher, director, complete, events)
    console.print()
    console.print(report)
    console.print(status_table())
    if not complete:
        late = [m for m in batch if m.task_id in tally.pending]
        for message in late[:5]:
            state = app.backend.get_task_meta(message.task_id).get("status")
            console.print(f"[red]no final state[/] ({state}): {message.task} {message.kwargs} "
                          f"id {message.task_id}, published at {message.at:.1f}s")
        console.print(f"[bold red]timed out {args.timeout:g}s after the last phase[/]; "
                      f"logs: {args.logs}/demo-*.log")
    return 0 if ok else 1


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.demo", description=__doc__.splitlines()[0])
    phase = parser.add_argument_group("phases (seconds)")
    phase.add_argument("--healthy", type=float, default=12.0, help="before the outage (default 12)")
    phase.add_argument("--outage", type=float, default=24.0, help="the provider is down (default 24)")
    phase.add_argument("--recovery", type=float, default=10.0,
                       help="the provider is back, before the operator's switch (default 10; more "
                            "than the breaker's open_for, 3 s, so a probe closes it)")
    phase.add_argument("--maintenance", type=float, default=8.0,
                       help="the operator holds the breaker open (default 8)")
    phase.add_argument("--normal", type=float, default=6.0, help="after `resilience close` (default 6)")
    parser.add_argument("--rate", type=float, default=10.0, help="orders per second (default 10)")
    parser.add_argument("--failure-rate", type=float, default=0.05,
                        help="share of calls that fail with 503 while the provider is up (default 0.05)")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds to wait for the last results after the last phase (default 60)")
    parser.add_argument("--seed", type=int, default=None, help="seed for amounts, currencies and duplicates")
    parser.add_argument("--logs", type=Path, default=ROOT,
                        help="directory for demo-downstream.log and demo-worker*.log (default: the "
                             "repository root)")
    args = parser.parse_args(argv)
    if min(args.healthy, args.outage, args.recovery, args.maintenance, args.normal) <= 0 or args.rate <= 0:
        parser.error("every phase and --rate must be positive")
    if not 0 <= args.failure_rate < 1:
        parser.error("--failure-rate must be in [0, 1)")
    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:  # piped: rich would assume 80
        console = Console(width=140)
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
        with console.status("stopping workers, provider and redis"):
            stack.close()
        console.print(f"all processes stopped; {time.monotonic() - started:.1f}s in total")


if __name__ == "__main__":
    sys.exit(main())
