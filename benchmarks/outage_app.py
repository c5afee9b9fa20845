"""One process of ``benchmarks.outage``: a ``ResilientTask`` whose body calls a downstream
the driver kills and heals, applied by C threads paced to this process's share of the
rate.

Each task runs ``ResilientTask.__call__`` and so ``pipeline.execute`` (the breaker
guard's admission, the body, the record) against a real ``RedisStore``, as in a worker's
pool process, in one of two ways (``Spec.via``):

- ``call`` (the default): as Celery's tracer calls a task, under a pushed request
  (``push_request`` with an id, ``called_directly=False``), and without the tracer's
  bookkeeping around it;
- ``apply``: Celery's own ``task.apply()``, tracer included.

Why ``call``: for every failed or refused task Celery's tracer builds billiard's
``ExceptionInfo`` (with ``apply(throw=True)`` too, through ``_signal_internal_error``),
which copies ``co_positions()`` of every frame: about 3 ms of CPU on Python 3.11, some
ten times what the task and its breaker cost. At 1,000 failures/s that alone needs more
than this machine's two cores: with ``apply`` the dead phase fell to 230-725 tasks/s in
our runs. The breaker sees the same calls either way; ``apply`` shows that cost.

The downstream's health is the driver's phase, an ``int`` in shared memory: a read costs
no round trip, and no call is counted on the store whose traffic is being measured.
Every call that reaches the downstream is counted here, in this process, and handed to
the driver at the end (``Report``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from celery import Celery
from kombu.utils.uuid import uuid

import resilient_tasks as rt
from resilient_tasks.runtime import runtime_for
from resilient_tasks.store.redis import RedisStore

__all__ = [
    "DEAD",
    "DOWNSTREAM",
    "HEALED",
    "HEALTHY",
    "PHASES",
    "STOP",
    "WAIT",
    "WARM",
    "Report",
    "Spec",
    "serve",
]

#: The driver's phases, in the order it sets them (the downstream fails only in DEAD).
WAIT, WARM, HEALTHY, DEAD, HEALED, STOP = range(6)
PHASES = {WARM: "warm-up", HEALTHY: "healthy", DEAD: "dead", HEALED: "healed"}
#: The one breaker every process shares.
DOWNSTREAM = "svc"
#: A thread this far behind its slot starts the schedule again from now: a stall (the
#: two cores busy elsewhere) must not come back as a burst the policy never saw.
MAX_LAG = 0.05


@dataclass(frozen=True)
class Spec:
    """What one process runs (picklable: it crosses a ``spawn``)."""

    index: int
    store_url: str
    breaker: dict[str, Any]  # BreakerPolicy's fields
    rate: float  # tasks per second, this process
    offset: float  # seconds its schedule starts after the others' (interleaves them)
    concurrency: int
    bucket_ms: int  # the breaker's bucket width: successes are counted per bucket
    via: str = "call"  # "call": under a pushed request, as the tracer does; "apply": task.apply()


@dataclass
class Report:
    """One process's counts, sent to the driver when it stops."""

    index: int
    #: Tasks applied, by the phase they started in, then by outcome (ok, failed, refused, other).
    outcomes: dict[int, Counter[str]] = field(default_factory=dict)
    #: Calls that reached the downstream: all, and the successes per breaker bucket.
    calls: int = 0
    ok_by_bucket: Counter[int] = field(default_factory=Counter)
    #: ``time.time()`` of every call that reached the downstream while it was dead.
    dead_calls: list[float] = field(default_factory=list)
    #: Store round trips (``RedisStore.trips``) and finished tasks when each phase's first
    #: task started.
    trips_at: dict[int, tuple[int, int]] = field(default_factory=dict)
    #: Round trips over the whole run (the warm-up's script load left out) and tasks finished.
    trips: int = 0
    finished: int = 0
    #: The first few outcomes that were none of ok/failed/refused.
    unexpected: list[str] = field(default_factory=list)


class Downstream:
    """The dead-or-alive service: reads the phase, counts the call, fails while dead."""

    def __init__(self, phase: Any, bucket_ms: int, report: Report) -> None:
        self._phase = phase
        self._bucket_ms = bucket_ms
        self._report = report
        self._lock = threading.Lock()

    def call(self) -> str:
        now = time.time()
        dead = self._phase.value == DEAD
        with self._lock:
            self._report.calls += 1
            if dead:
                self._report.dead_calls.append(now)
            else:
                self._report.ok_by_bucket[int(now * 1000) // self._bucket_ms] += 1
        if dead:
            raise ConnectionError("downstream is down")
        return "ok"


class Pacer:
    """Start times ``1/rate`` apart, shared by the threads of one process (open loop:
    a slow task does not slow the arrivals, up to the C threads in flight)."""

    def __init__(self, rate: float, offset: float) -> None:
        self._interval = 1.0 / rate
        self._offset = offset
        self._next: float | None = None
        self._lock = threading.Lock()

    def slot(self) -> float:
        with self._lock:
            now = time.monotonic()
            if self._next is None:
                self._next = now + self._offset
            elif self._next < now - MAX_LAG:
                self._next = now
            start = self._next
            self._next += self._interval
            return start


class Meter:
    """Outcomes per phase, and the store's round trips when each phase began."""

    def __init__(self, store: RedisStore, report: Report) -> None:
        self._store = store
        self._report = report
        self._lock = threading.Lock()
        self._phase = -1
        self._trips0 = store.trips

    def begin(self, phase: int) -> None:
        with self._lock:
            if phase != self._phase:
                self._phase = phase
                self._report.trips_at[phase] = (self._store.trips - self._trips0, self._report.finished)

    def end(self, phase: int, error: BaseException | None) -> None:
        """One task done: ``error`` is what it raised or failed with (None: a success)."""
        if error is None:
            outcome = "ok"
        elif isinstance(error, rt.CircuitOpen):
            outcome = "refused"
        elif isinstance(error, ConnectionError):
            outcome = "failed"
        else:
            outcome = "other"
        with self._lock:
            self._report.outcomes.setdefault(phase, Counter())[outcome] += 1
            self._report.finished += 1
            if outcome == "other" and len(self._report.unexpected) < 5:
                self._report.unexpected.append(repr(error))

    def close(self) -> None:
        with self._lock:
            self._report.trips = self._store.trips - self._trips0


def _quiet() -> None:
    """Celery logs every failed task with its traceback and we log each transition: at
    1,000 tasks/s that would be the benchmark's main cost. The driver reads the
    transitions from the breaker itself; errors still show."""
    logging.getLogger("celery.app.trace").setLevel(logging.CRITICAL)
    logging.getLogger("resilient_tasks").setLevel(logging.ERROR)


def serve(spec: Spec, phase: Any, ready: Any, reports: Any) -> None:
    """A process's life: build the app, warm the store, tell the driver it is ready, apply
    tasks while the phase says so, send the ``Report``."""
    _quiet()
    report = Report(spec.index)
    app = Celery(f"outage{spec.index}", broker="memory://", set_as_current=False)
    rt.install(app, redis_url=spec.store_url)
    downstream = Downstream(phase, spec.bucket_ms, report)
    policy = rt.TaskPolicy(downstream=DOWNSTREAM, breaker=rt.BreakerPolicy(**spec.breaker))

    def body() -> str:
        return downstream.call()

    task = app.task(base=rt.ResilientTask, shared=False, name="outage.call", policy=policy)(body)
    store = runtime_for(app).store
    assert isinstance(store, RedisStore), store
    store.warm()  # connect and load the scripts: the first task pays one round trip
    meter = Meter(store, report)
    pacer = Pacer(spec.rate, spec.offset)
    with ready.get_lock():
        ready.value += 1
    while phase.value == WAIT:
        time.sleep(0.002)

    def apply() -> BaseException | None:
        """One task through Celery: None, or what it failed with (refused, failed)."""
        if spec.via == "apply":
            result = task.apply()
            return None if result.successful() else result.result
        # what the tracer pushes before it calls the task (celery.app.trace.build_tracer)
        task.push_request(
            {"id": uuid(), "task": task.name, "retries": 0, "is_eager": True,
             "delivery_info": {"is_eager": True}},
            args=(),
            kwargs={},
            called_directly=False,
        )
        try:
            task()
        except Exception as exc:
            return exc
        finally:
            task.pop_request()
        return None

    def loop() -> None:
        while True:
            delay = pacer.slot() - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            now = phase.value
            if now == STOP:
                return
            meter.begin(now)
            meter.end(now, apply())

    threads = [threading.Thread(target=loop, name=f"apply-{i}") for i in range(spec.concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    meter.close()
    reports.put(report)
