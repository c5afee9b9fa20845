"""Amortized breaker accounting (``BreakerPolicy.flush_interval``), on ``MemoryStore`` with
a clock the test moves: round trips per task in the closed state, and the documented
bounds on calls that reach a downstream the breaker should keep them from."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery import Celery

import resilient_tasks as rt
from resilient_tasks.store.memory import MemoryStore


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


class Downstream:
    def __init__(self) -> None:
        self.healthy = True
        self.calls = 0

    def call(self) -> str:
        self.calls += 1
        if not self.healthy:
            raise ConnectionError("503")
        return "ok"


def _process(
    store: MemoryStore, clock: Clock, downstream: Downstream, breaker: rt.BreakerPolicy, n: int = 0
) -> Callable[[], Any]:
    """One worker process: its own app and runtime (its own view of the breaker), the
    fleet's one store."""
    app = Celery(f"p{n}", broker="memory://", set_as_current=False)
    rt.install(app, store=store, clock=clock)

    @app.task(base=rt.ResilientTask, shared=False, name=f"p{n}.call", policy=rt.TaskPolicy(
        downstream="svc", breaker=breaker,
    ))
    def call() -> str:
        return downstream.call()

    return lambda: call.apply()


def test_closed_and_healthy_a_breaker_costs_under_a_tenth_of_a_round_trip_per_task() -> None:
    clock, store, downstream = Clock(), MemoryStore(), Downstream()
    run = _process(store, clock, downstream, rt.BreakerPolicy(flush_interval=0.1))
    before = store.trips
    for _ in range(1000):  # 1,000 tasks/s in this process
        assert run().get() == "ok"
        clock.now += 0.001
    trips = (store.trips - before) / 1000
    assert trips <= 0.1, trips
    # one trip per interval: a stale view's admission carries the successes waiting
    assert store.trips - before <= 1 + 10, store.trips - before
    (view,) = store.breakers()
    counted = sum(int(v) for k, v in view.fields.items() if k.startswith("c") and k[1:].isdigit())
    assert counted >= 900, "the successes reached the store, in batches"


def test_with_flush_interval_zero_every_call_asks_and_writes() -> None:
    clock, store, downstream = Clock(), MemoryStore(), Downstream()
    run = _process(store, clock, downstream, rt.BreakerPolicy(flush_interval=0))
    before = store.trips
    for _ in range(50):
        run().get()
        clock.now += 0.001
    assert store.trips - before == 2 * 50, "admit before and record after each call, as before batching"


def _dead_calls(flush_interval: float, processes: int = 4) -> int:
    """Healthy traffic from ``processes`` processes in turn, then the downstream dies:
    how many calls reach it before every process is refused."""
    clock, store, downstream = Clock(), MemoryStore(), Downstream()
    policy = rt.BreakerPolicy(
        min_calls=10, failure_rate=0.5, window=10, when_open="fail", flush_interval=flush_interval
    )
    fleet = [_process(store, clock, downstream, policy, n) for n in range(processes)]
    for _ in range(50):
        for run in fleet:
            run().get()
            clock.now += 0.001
    downstream.healthy = False
    downstream.calls = 0
    for _ in range(200):
        for run in fleet:
            run()
            clock.now += 0.001
    return downstream.calls


def test_a_dead_downstream_gets_no_more_calls_than_with_a_write_per_call_plus_one_per_process() -> None:
    processes = 4
    batched, per_call = _dead_calls(0.1, processes), _dead_calls(0.0, processes)
    # the bound of guards/tally.py: T + P*C (here C = 1 call in flight per process)
    assert batched <= per_call + processes, (batched, per_call)
    assert batched < 200 * processes, "the breaker did open"


def test_a_breaker_opened_elsewhere_is_learned_within_one_flush_interval() -> None:
    clock, store, downstream = Clock(), MemoryStore(), Downstream()
    policy = rt.BreakerPolicy(when_open="fail", flush_interval=0.1)
    run = _process(store, clock, downstream, policy)
    operator = Celery("ops", broker="memory://", set_as_current=False)
    rt.install(operator, store=store, clock=clock)
    run().get()  # the process learns "closed"
    rt.set_switch(operator, "svc", "forced_open")  # from another process
    downstream.calls = 0
    rate = 1000  # calls per second in this process
    for _ in range(300):
        run()
        clock.now += 1 / rate
    # admitted from its own view until the view is older than flush_interval: λ·F + C
    assert downstream.calls <= rate * 0.1 + 1, downstream.calls
    refused = run()
    assert isinstance(refused.result, rt.CircuitOpen)
