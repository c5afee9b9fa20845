"""An outage at about 1,000 tasks/s across 4 processes (issue 15): does the fleet's
breaker keep the dead downstream's calls within the bound of ``guards/tally.py``, close
again within ``open_for`` plus one probe once it heals, and is ``flush_interval=0``
still a write per call?

How it runs. A private redis-server is the store (never 127.0.0.1:6379). P processes
(``multiprocessing``, spawned) each run one ``ResilientTask`` from C threads paced to
rate/P tasks per second (``benchmarks.outage_app``): the whole pipeline with a real
``RedisStore``. Real workers were the first choice, but a ``celery worker`` tops out
near 700 tasks/s on this 2-core machine and its broker would take the CPU the store and
the tasks need; the breaker never sees the broker. Nor is it ``task.apply()`` by
default, but the task called as Celery's tracer calls it (a pushed request, then
``task()``): the tracer builds an ``ExceptionInfo`` for every failed or refused task,
about 3 ms of CPU each on Python 3.11, so 1,000 failures/s alone would need more than
the two cores (``--via apply`` runs it, to see). The body calls a downstream whose
health is a phase in shared memory that this driver sets: warm-up, healthy, dead (every
call raises ``ConnectionError``), healed. Each process counts every call that reaches
the downstream, in its own memory, never on the store. This driver polls the breaker's
hash (``RedisStore.client`` + ``breaker_key``) every few milliseconds.

What it prints, for ``flush_interval`` 0.1 (the default) and 0 (a write per call), the
same policy otherwise:

- tasks/s achieved, all processes and phases together;
- calls that reached the downstream while it was dead before the breaker's first
  half-open (the bound's subject), against **T + P·C**. T is what the policy needs to
  trip, taken from the run: with S successes in the window when it tripped (counted by
  the downstream, per bucket of the window), the fewest failures f with
  ``S + f >= min_calls`` and ``f / (S + f) >= failure_rate``, or
  ``consecutive_failures`` when that is fewer. With a 10 s window and 2 s of healthy
  traffic, T is about the healthy calls: the window must be half failures;
- the half-open probes that reached it while still dead (at most ``half_open_probes``
  per half-open period: those are the breaker asking, not a leak);
- the transitions, from the breaker's counters (``trips``, ``opens``, ``transitions``);
- heal to ``closed`` (the hash's ``changed_at``), split into the open time left at the
  heal (at most ``open_for``) and the probe that closed it (``PROBE_ALLOWANCE``);
- store round trips per task in the healthy phase (``RedisStore.trips`` summed over the
  processes); with ``flush_interval=0`` also the whole run's exact check: every task
  asked once and every call that reached the downstream wrote once.

    python -m benchmarks.outage                 # about a minute
    python -m benchmarks.outage --quick         # a short run, to see that it works
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import queue
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import resilient_tasks as rt
from resilient_tasks.store.redis import RedisStore
from resilient_tasks.testing import RedisServer

from .outage_app import DEAD, DOWNSTREAM, HEALED, HEALTHY, PHASES, STOP, WARM, Report, Spec, serve

#: Seconds of each phase: a full run, and ``--quick``.
FULL = {WARM: 0.5, HEALTHY: 2.0, DEAD: 5.0, HEALED: 3.0}
QUICK = {WARM: 0.3, HEALTHY: 1.0, DEAD: 3.0, HEALED: 2.0}
#: "One probe": the next task to arrive after ``open_until`` (1 ms apart at 1,000/s)
#: takes the lease and records its success; 0.1 s leaves room for a busy 2-core machine.
PROBE_ALLOWANCE = 0.1
#: How often the driver reads the breaker's hash.
POLL = 0.005
#: The achieved rate counts as the target's when it is at least this share of it.
RATE_SHARE = 0.9
FIELDS = ("state", "opened_at", "open_until", "changed_at", "transitions", "trips", "opens")


@dataclass
class Breaker:
    """What the driver saw of the breaker's hash during one run."""

    states: list[str] = field(default_factory=list)  # each state polled, repeats dropped
    first_open_ms: int | None = None  # opened_at of the first trip
    first_open_until_ms: int | None = None  # when it could first go half-open
    at_heal: dict[str, str] = field(default_factory=dict)
    closed_ms: int | None = None  # changed_at of the first close after the heal
    open_until_at_close_ms: int | None = None  # open_until of the open it closed after
    final: dict[str, str] = field(default_factory=dict)


@dataclass
class Run:
    """One run's measurements."""

    flush: float
    policy: rt.BreakerPolicy
    processes: int
    concurrency: int
    rate: float
    reports: list[Report]
    breaker: Breaker
    phase_at: dict[int, float]  # time.time() at the start of each phase, and at STOP

    def seconds(self, phase: int) -> float:
        return self.phase_at[phase + 1] - self.phase_at[phase]

    def tasks(self, phase: int | None = None) -> int:
        return sum(
            sum(counts.values())
            for r in self.reports
            for p, counts in r.outcomes.items()
            if phase is None or p == phase
        )

    def achieved(self) -> float:
        return self.tasks() / (self.phase_at[STOP] - self.phase_at[WARM])

    def dead_calls(self) -> list[float]:
        return sorted(t for r in self.reports for t in r.dead_calls)

    def before_half_open(self) -> int:
        """Dead calls before the breaker could first go half-open: those the trip allows."""
        limit = self.breaker.first_open_until_ms
        return sum(1 for t in self.dead_calls() if limit is None or t * 1000 < limit)

    def probes(self) -> int:
        return len(self.dead_calls()) - self.before_half_open()

    def probes_allowed(self) -> int:
        """``half_open_probes`` per half-open period during the outage: every reopen after
        the first trip followed one, and one may have been under way at the heal."""
        at = self.breaker.at_heal
        reopens = int(at.get("opens", 0)) - int(at.get("trips", 0))
        return self.policy.half_open_probes * (reopens + 1)

    def successes_in_window(self) -> int:
        """S: the downstream's successes in the breaker's window when it tripped."""
        bucket_ms = bucket_width(self.policy)
        tripped = self.breaker.first_open_ms or int(self.phase_at[HEALED] * 1000)
        idx = tripped // bucket_ms
        totals: Counter[int] = Counter()
        for report in self.reports:
            totals.update(report.ok_by_bucket)
        return sum(n for b, n in totals.items() if idx - self.policy.buckets < b <= idx)

    def to_trip(self) -> int | None:
        return calls_to_trip(self.successes_in_window(), self.policy)

    def bound(self) -> int | None:
        t = self.to_trip()
        return None if t is None else t + self.processes * self.concurrency

    def trips_per_task(self, phase: int) -> float:
        """Store round trips per task between the starts of ``phase`` and the next one."""
        trips = tasks = 0
        for r in self.reports:
            if phase in r.trips_at and phase + 1 in r.trips_at:
                trips += r.trips_at[phase + 1][0] - r.trips_at[phase][0]
                tasks += r.trips_at[phase + 1][1] - r.trips_at[phase][1]
        return trips / tasks if tasks else math.nan

    def heal_to_closed(self) -> float | None:
        b = self.breaker
        return None if b.closed_ms is None else b.closed_ms / 1000 - self.phase_at[HEALED]

    def open_left_at_heal(self) -> float | None:
        b = self.breaker
        if b.open_until_at_close_ms is None:
            return None
        return max(0.0, b.open_until_at_close_ms / 1000 - self.phase_at[HEALED])

    def probe_time(self) -> float | None:
        b = self.breaker
        if b.closed_ms is None or b.open_until_at_close_ms is None:
            return None
        return (b.closed_ms - max(b.open_until_at_close_ms, int(self.phase_at[HEALED] * 1000))) / 1000

    def transitions(self) -> str:
        f = self.breaker.final
        trips, opens, total = int(f.get("trips", 0)), int(f.get("opens", 0)), int(f.get("transitions", 0))
        reopens = opens - trips
        closes = (total - opens - reopens) // 2 if f.get("state") == "closed" else 0
        half_opens = total - opens - closes
        return (f"closed→open {trips}, open→half_open {half_opens}, half_open→open {reopens}, "
                f"half_open→closed {closes}")

    def calls_total(self) -> int:
        return sum(r.calls for r in self.reports)

    def trips_total(self) -> int:
        return sum(r.trips for r in self.reports)

    def finished(self) -> int:
        return sum(r.finished for r in self.reports)


def bucket_width(policy: rt.BreakerPolicy) -> int:
    """The breaker's bucket in ms, as the scripts compute it."""
    return max(1, int(policy.window * 1000) // policy.buckets)


def calls_to_trip(successes: int, policy: rt.BreakerPolicy) -> int | None:
    """T: the fewest failures that trip ``policy`` with ``successes`` in its window (None:
    the rate alone never can, and no consecutive-failure rule is set)."""
    rate, s = policy.failure_rate, successes
    by_rate: int | None = None
    if rate < 1 or s == 0:
        # the same float comparison as record.lua: w_fails / w_calls >= rate
        f = max(1, policy.min_calls - s, math.floor(rate * s / (1 - rate)) - 2 if rate < 1 else 0)
        while not (s + f >= policy.min_calls and f / (s + f) >= rate):
            f += 1
        by_rate = f
    limits = [t for t in (by_rate, policy.consecutive_failures) if t is not None]
    return min(limits) if limits else None


def _read(store: RedisStore) -> dict[str, str]:
    values = store.client.hmget(store.breaker_key(DOWNSTREAM), FIELDS)
    return {k: v.decode() for k, v in zip(FIELDS, values, strict=True) if v is not None}


def _watch(store: RedisStore, breaker: Breaker, until: float, *, healed: bool, until_closed: bool = False) -> None:
    """Poll the hash until ``until`` (or the close, with ``until_closed``): the states it
    goes through, the first trip, and (after the heal) the first close."""
    while True:
        seen = _read(store)
        state = seen.get("state", "")
        if state and (not breaker.states or breaker.states[-1] != state):
            breaker.states.append(state)
        if state == "open" and breaker.first_open_ms is None:
            breaker.first_open_ms = int(seen["opened_at"])
            breaker.first_open_until_ms = int(seen["open_until"])
        if healed and state == "closed" and breaker.closed_ms is None and "open_until" in seen:
            breaker.closed_ms = int(seen["changed_at"])
            breaker.open_until_at_close_ms = int(seen["open_until"])
        if time.time() >= until or (until_closed and breaker.closed_ms is not None):
            return
        time.sleep(POLL)


def run(flush: float, args: argparse.Namespace, durations: dict[int, float]) -> Run:
    """One outage, on a store of its own, with ``flush_interval=flush``."""
    fields: dict[str, Any] = {
        "min_calls": args.min_calls,
        "failure_rate": args.failure_rate,
        "window": args.window,
        "open_for": args.open_for,
        "half_open_probes": 1,
        "consecutive_failures": args.consecutive_failures,
        "when_open": "fail",  # a refused task ends at once: no deferral, no retry
        "flush_interval": flush,
    }
    policy = rt.BreakerPolicy(**fields)
    context = multiprocessing.get_context("spawn")
    phase = context.RawValue("i", 0)
    ready = context.Value("i", 0)
    reports: Any = context.Queue()
    with RedisServer() as server:
        store = RedisStore(server.url(0))
        procs = [
            context.Process(
                target=serve,
                name=f"outage-{i}",
                args=(
                    Spec(
                        index=i,
                        store_url=server.url(0),
                        breaker=fields,
                        rate=args.rate / args.processes,
                        offset=i / args.rate,
                        concurrency=args.concurrency,
                        bucket_ms=bucket_width(policy),
                        via=args.via,
                    ),
                    phase,
                    ready,
                    reports,
                ),
            )
            for i in range(args.processes)
        ]
        for proc in procs:
            proc.start()
        try:
            deadline = time.monotonic() + 120
            while ready.value < args.processes:
                if time.monotonic() > deadline or any(p.exitcode is not None for p in procs):
                    raise SystemExit("the task processes did not start")
                time.sleep(0.05)
            breaker = Breaker()
            phase_at: dict[int, float] = {}
            for current in (WARM, HEALTHY, DEAD, HEALED):
                phase_at[current] = time.time()
                phase.value = current
                if current == HEALED:
                    breaker.at_heal = _read(store)
                until = phase_at[current] + durations[current]
                _watch(store, breaker, until, healed=current == HEALED)
                if current == HEALED and breaker.closed_ms is None:  # wait for the close, within reason
                    _watch(store, breaker, until + args.open_for + 5, healed=True, until_closed=True)
            phase_at[STOP] = time.time()
            phase.value = STOP
            try:
                collected = [reports.get(timeout=60) for _ in procs]
            except queue.Empty:
                raise SystemExit("a task process sent no report (its traceback is above)") from None
            breaker.final = _read(store)
        finally:
            phase.value = STOP
            for proc in procs:
                proc.join(timeout=30)
                if proc.exitcode is None:
                    proc.terminate()
                    proc.join()
            store.close()
    return Run(flush, policy, args.processes, args.concurrency, args.rate,
               sorted(collected, key=lambda r: r.index), breaker, phase_at)


def _s(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f} s"


def table(runs: Sequence[Run], args: argparse.Namespace) -> list[str]:
    p, c = args.processes, args.concurrency
    lines = [
        f"| flush_interval | tasks/s (target {args.rate:g}) | dead calls before half-open | bound T + P·C "
        f"| probes while dead (allowed) | transitions | heal → closed (open_for {args.open_for:g} s + probe) "
        "| round trips/task, healthy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        t = r.to_trip()
        bound = "n/a" if t is None else f"{t} + {p}·{c} = {r.bound()}"
        lines.append(
            f"| {r.flush:g} | {r.achieved():.0f} | {r.before_half_open()} | {bound} "
            f"| {r.probes()} ({r.probes_allowed()}) | {r.transitions()} "
            f"| {_s(r.heal_to_closed())} = {_s(r.open_left_at_heal())} left + {_s(r.probe_time())} "
            f"| {r.trips_per_task(HEALTHY):.3f} |"
        )
    return lines


def details(r: Run) -> list[str]:
    s = r.successes_in_window()
    phases = ", ".join(
        f"{PHASES[ph]} {r.tasks(ph) / r.seconds(ph):.0f}/s over {r.seconds(ph):.1f} s" for ph in PHASES
    )
    outcomes: Counter[str] = Counter()
    for report in r.reports:
        for counts in report.outcomes.values():
            outcomes.update(counts)
    lines = [
        f"flush_interval={r.flush:g}: {r.tasks()} tasks ({phases}); outcomes {dict(outcomes)}",
        f"  T = {r.to_trip()}: S = {s} successes in the window at the trip; fewest f with "
        f"S + f >= min_calls ({r.policy.min_calls}) and f/(S+f) >= failure_rate ({r.policy.failure_rate:g})"
        + (f", or consecutive_failures ({r.policy.consecutive_failures})"
           if r.policy.consecutive_failures else ""),
        f"  dead calls: {len(r.dead_calls())} = {r.before_half_open()} before the first half-open "
        f"+ {r.probes()} probes; breaker states polled: {' → '.join(r.breaker.states)}",
        f"  round trips: {r.trips_total()} for {r.finished()} tasks and {r.calls_total()} downstream calls; "
        f"per task: healthy {r.trips_per_task(HEALTHY):.3f}, dead {r.trips_per_task(DEAD):.3f}",
    ]
    unexpected = [u for report in r.reports for u in report.unexpected]
    if unexpected:
        lines.append(f"  unexpected outcomes: {unexpected[:5]}")
    return lines


def verdicts(runs: Sequence[Run], args: argparse.Namespace) -> list[tuple[bool, str]]:
    found: list[tuple[bool, str]] = []
    for r in runs:
        tag = f"[flush_interval={r.flush:g}]"
        rate = r.achieved()
        found.append((rate >= RATE_SHARE * args.rate,
                      f"{tag} rate: {rate:.0f} tasks/s, target {args.rate:g} (at least {RATE_SHARE:.0%})"))
        bound, before = r.bound(), r.before_half_open()
        found.append((bound is not None and before <= bound,
                      f"{tag} dead downstream: {before} calls before the first half-open <= T + P·C = {bound}"))
        found.append((r.probes() <= r.probes_allowed(),
                      f"{tag} probes while dead: {r.probes()} <= {r.probes_allowed()} "
                      f"(half_open_probes per half-open period)"))
        trips = int(r.breaker.final.get("trips", 0))
        found.append((trips == 1, f"{tag} one closed→open transition for the outage: {trips}"))
        closed, left, probe = r.heal_to_closed(), r.open_left_at_heal(), r.probe_time()
        met = (closed is not None and left is not None and probe is not None
               and left <= args.open_for + 0.005 and probe <= PROBE_ALLOWANCE)
        found.append((met, f"{tag} heal → closed {_s(closed)} <= open_for {args.open_for:g} s + one probe "
                           f"({_s(left)} open left at the heal, the probe {_s(probe)} <= {PROBE_ALLOWANCE:g} s)"))
        if r.flush == 0:
            expected = r.finished() + r.calls_total()
            found.append((r.trips_total() == expected,
                          f"{tag} a write per call: {r.trips_total()} round trips = {r.finished()} admissions "
                          f"+ {r.calls_total()} records (every task asked, every call wrote)"))
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=1000.0, help="tasks per second, all processes together")
    parser.add_argument("--processes", type=int, default=4, help="task processes (P)")
    parser.add_argument("--concurrency", type=int, default=4, help="threads in flight per process (C)")
    parser.add_argument("--quick", action="store_true", help="shorter phases, to see that it works")
    parser.add_argument("--flush", default="0.1,0", help="flush_interval values to run, comma-separated")
    parser.add_argument("--min-calls", type=int, default=20)
    parser.add_argument("--failure-rate", type=float, default=0.5)
    parser.add_argument("--window", type=float, default=10.0, help="seconds")
    parser.add_argument("--open-for", type=float, default=1.0, help="seconds")
    parser.add_argument("--consecutive-failures", type=int, default=None)
    parser.add_argument("--via", choices=("call", "apply"), default="call",
                        help="call: the task under a pushed request, as the tracer calls it; "
                        "apply: task.apply(), Celery's tracer (an ExceptionInfo per failed task) included")
    args = parser.parse_args(argv)
    durations = QUICK if args.quick else FULL
    runs = [run(float(f), args, durations) for f in args.flush.split(",") if f]
    print(f"outage: {args.processes} processes x {args.concurrency} threads, target {args.rate:g} tasks/s, "
          + ", ".join(f"{PHASES[p]} {s:g} s" for p, s in durations.items())
          + f"; min_calls={args.min_calls} failure_rate={args.failure_rate:g} window={args.window:g} s "
          f"open_for={args.open_for:g} s half_open_probes=1"
          + (f" consecutive_failures={args.consecutive_failures}" if args.consecutive_failures else ""))
    print()
    print("\n".join(table(runs, args)))
    print()
    for r in runs:
        print("\n".join(details(r)))
    print()
    found = verdicts(runs, args)
    for met, line in found:
        print(f"{'ok' if met else 'NOT MET'}: {line}")
    return 0 if all(met for met, _ in found) else 1


if __name__ == "__main__":
    sys.exit(main())
