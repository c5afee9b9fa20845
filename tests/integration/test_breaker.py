"""Breakers with a real worker: opening, deferral without spent retries, probes, budget."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
from celery import Celery

import resilient_tasks as rt
from resilient_tasks.store import RedisStore
from resilient_tasks.store.protocol import Admit, Record
from resilient_tasks.testing import RedisServer, free_port, in_process_worker


class Downstream:
    """A service the tests break and heal; it counts the calls that reach it."""

    def __init__(self) -> None:
        self.healthy = False
        self.calls = 0
        self.calls_while_open: list[float] = []
        self.lock = threading.Lock()

    def call(self) -> str:
        with self.lock:
            self.calls += 1
        if not self.healthy:
            raise ConnectionError("503 from downstream")
        return "ok"


def breaker_state(client: object, store_prefix: str, name: str) -> dict[bytes, bytes]:
    store = RedisStore("redis://127.0.0.1:1/0", prefix=store_prefix)
    return client.hgetall(store.breaker_key(name))  # type: ignore[attr-defined, no-any-return]


def test_open_breaker_defers_without_spending_retries_then_all_succeed(
    app: Celery, store_client: object
) -> None:
    service = Downstream()
    policy = rt.TaskPolicy(
        downstream="A",
        idempotent=True,
        breaker=rt.BreakerPolicy(min_calls=5, failure_rate=0.5, window=30, open_for=1.0),
    )

    @app.task(base=rt.ResilientTask, bind=True, shared=False, policy=policy)
    def call_a(self: rt.ResilientTask, n: int) -> dict[str, int]:
        service.call()
        return {"n": n, "retries": self.request.retries}

    with in_process_worker(app, concurrency=4):
        failing = [call_a.delay(n) for n in range(5)]
        for result in failing:
            with pytest.raises(ConnectionError):
                result.get(timeout=20)
        state = breaker_state(store_client, "rt", "A")
        assert state[b"state"] == b"open"
        assert int(state[b"opens"]) == 1
        calls_before = service.calls
        deferred = [call_a.delay(n) for n in range(100, 110)]
        time.sleep(0.5)  # still open: nothing reaches the downstream
        assert service.calls == calls_before
        service.healthy = True
        results = [r.get(timeout=30) for r in deferred]
    assert [r["n"] for r in results] == list(range(100, 110))
    assert all(r["retries"] == 0 for r in results), "deferrals are not retries"
    assert service.calls == calls_before + 10
    assert breaker_state(store_client, "rt", "A")[b"state"] == b"closed"


def test_when_open_fail_raises_circuit_open_with_retry_after(app: Celery) -> None:
    service = Downstream()

    @app.task(
        base=rt.ResilientTask,
        bind=True,
        shared=False,
        policy=rt.TaskPolicy(
            downstream="B",
            breaker=rt.BreakerPolicy(consecutive_failures=2, open_for=30, when_open="fail"),
        ),
    )
    def call_b(self: rt.ResilientTask) -> str:
        return service.call()

    with in_process_worker(app, concurrency=1):
        for _ in range(2):
            with pytest.raises(ConnectionError):
                call_b.delay().get(timeout=20)
        with pytest.raises(rt.CircuitOpen) as info:
            call_b.delay().get(timeout=20)
    assert service.calls == 2
    assert 25 < info.value.retry_after <= 30


@pytest.mark.parametrize("probes", [1, 3])
def test_half_open_admits_exactly_the_probe_count_fleet_wide(
    rt_redis_flushed: RedisServer, probes: int
) -> None:
    store = RedisStore(rt_redis_flushed.url(1))
    policy = rt.BreakerPolicy(consecutive_failures=1, open_for=10.0, half_open_probes=probes)
    t0 = 1_700_000_000_000  # an injected clock: the probe leases (10 s) cannot expire mid-trial
    store.batch([Admit("C", policy, "x", t0)])
    store.batch([Record("C", policy, "x", fail=1, first_attempts=1, now_ms=t0)])
    half_open_at = t0 + 10_001  # past open_for: the next admission moves it to half-open

    def trial(i: int) -> str:
        own = RedisStore(rt_redis_flushed.url(1))  # a worker of its own
        try:
            (answer,) = own.batch([Admit("C", policy, f"w{i}", half_open_at + i)])
            return str(answer.verdict)
        finally:
            own.close()

    with ThreadPoolExecutor(max_workers=16) as pool:
        verdicts = Counter(pool.map(trial, range(200)))
    assert verdicts == {"probe": probes, "reject": 200 - probes}


def test_retry_budget_caps_retries_against_a_dead_downstream(app: Celery) -> None:
    service = Downstream()
    attempts: Counter[int] = Counter()
    lock = threading.Lock()

    @app.task(
        base=rt.ResilientTask,
        bind=True,
        shared=False,
        policy=rt.TaskPolicy(
            downstream="D",
            idempotent=True,
            breaker=rt.BreakerPolicy(min_calls=10_000, window=60),  # never trips here
            retry=rt.RetryPolicy(
                max_retries=5, base=0.01, cap=0.02, budget=rt.RetryBudget(ratio=0.2, min_per_window=2)
            ),
        ),
    )
    def call_d(self: rt.ResilientTask) -> str:
        with lock:
            attempts[self.request.retries] += 1
        return service.call()

    jobs = 40
    with in_process_worker(app, concurrency=4):
        results = [call_d.delay() for _ in range(jobs)]
        errors = Counter()
        for result in results:
            with pytest.raises((ConnectionError, rt.RetryBudgetExhausted)) as info:
                result.get(timeout=30)
            errors[type(info.value).__name__] += 1
    first = attempts[0]
    retries = sum(n for attempt, n in attempts.items() if attempt > 0)
    assert first == jobs
    assert retries <= 0.2 * first + 2
    assert errors["RetryBudgetExhausted"] > 0


def test_unreachable_store_falls_back_to_a_local_breaker(app_factory: Callable[..., Celery]) -> None:
    app = app_factory()
    runtime = rt.install(
        app, redis_url=f"redis://127.0.0.1:{free_port()}/1", redis_options={"socket_timeout": 0.2}
    )
    service = Downstream()

    @app.task(
        base=rt.ResilientTask,
        bind=True,
        shared=False,
        policy=rt.TaskPolicy(
            downstream="E",
            breaker=rt.BreakerPolicy(consecutive_failures=3, open_for=30, when_open="fail"),
        ),
    )
    def call_e(self: rt.ResilientTask) -> str:
        return service.call()

    with in_process_worker(app, concurrency=1):
        for _ in range(3):
            with pytest.raises(ConnectionError):
                call_e.delay().get(timeout=20)
        with pytest.raises(rt.CircuitOpen):
            call_e.delay().get(timeout=20)
    assert service.calls == 3, "fail-open until the local breaker opened"
    assert runtime.counters[("breaker_local", "E")] == 4


def test_two_downstreams_in_one_task_have_two_breakers(app: Celery, store_client: object) -> None:
    warehouse = Downstream()
    warehouse.healthy = True
    erp = Downstream()

    @app.task(
        base=rt.ResilientTask,
        bind=True,
        shared=False,
        policy=rt.TaskPolicy(
            downstream="inventory",
            breaker=rt.BreakerPolicy(consecutive_failures=2, open_for=30, when_open="fail"),
        ),
    )
    def sync(self: rt.ResilientTask) -> str:
        with self.downstream("warehouse-db"):
            warehouse.call()
        with self.downstream("erp"):
            return erp.call()

    with in_process_worker(app, concurrency=1):
        for _ in range(2):
            with pytest.raises(ConnectionError):
                sync.delay().get(timeout=20)
        with pytest.raises(rt.CircuitOpen) as info:
            sync.delay().get(timeout=20)
    assert info.value.downstream == "erp"
    assert breaker_state(store_client, "rt", "erp")[b"state"] == b"open"
    assert breaker_state(store_client, "rt", "warehouse-db")[b"state"] == b"closed"
    # erp's failures are counted on erp's breaker, not on the task's own downstream.
    assert breaker_state(store_client, "rt", "inventory")[b"state"] == b"closed"
    assert warehouse.calls == 3 and erp.calls == 2


def test_store_down_with_breaker_and_fallback_runs_on_the_local_breaker(
    app_factory: Callable[..., Celery],
) -> None:
    app = app_factory()
    rt.install(app, redis_url=f"redis://127.0.0.1:{free_port()}/1", redis_options={"socket_timeout": 0.2})
    service = Downstream()
    service.healthy = True

    @app.task(base=rt.ResilientTask, bind=True, shared=False, policy=rt.TaskPolicy(
        downstream="F", fallback=rt.FallbackPolicy(key=("n",), default="stale"),
    ))
    def read(self: rt.ResilientTask, n: int) -> str:
        return service.call()

    with in_process_worker(app, concurrency=1):
        assert read.delay(1).get(timeout=20) == "ok", "fail-open: the body ran on the local breaker"
    assert rt.runtime_for(app).counters[("breaker_local", "F")] == 1
