"""The pipeline on ``MemoryStore``: the guards' phases, round trips, and Celery's own
semantics for direct calls. Celery runs each task through its real tracer (``apply``);
the store is the in-memory twin of the Redis scripts (the contract suite holds them to
the same answers)."""

from __future__ import annotations

from typing import Any

import pytest
from celery import Celery, current_task

import resilient_tasks as rt
from resilient_tasks.store.memory import MemoryStore


def _app() -> tuple[Celery, MemoryStore]:
    app = Celery("pipeline", broker="memory://", set_as_current=False)
    store = MemoryStore()
    rt.install(app, store=store)
    return app, store


def test_a_duplicate_replays_the_stored_result_without_running() -> None:
    app, _ = _app()
    runs: list[str] = []

    @app.task(base=rt.ResilientTask, bind=True, shared=False, policy=rt.TaskPolicy(
        idempotency=rt.IdempotencyPolicy(key=("order",)),
    ))
    def charge(self: rt.ResilientTask, order: str) -> dict[str, Any]:
        runs.append(order)
        return {"order": order, "token": self.idempotency.token}

    first = charge.apply(args=("o-1",)).get()
    again = charge.apply(args=("o-1",)).get()
    assert first == again == {"order": "o-1", "token": 1}
    assert runs == ["o-1"]


def test_round_trips_per_call_two_with_every_guard_zero_with_retry_only() -> None:
    app, store = _app()
    everything = rt.TaskPolicy(
        downstream="svc",
        idempotency=rt.IdempotencyPolicy(key=("n",)),
        fallback=rt.FallbackPolicy(key=("n",)),
        retry=rt.RetryPolicy(),
    )

    @app.task(base=rt.ResilientTask, shared=False, policy=everything)
    def guarded(n: int) -> int:
        return n

    @app.task(base=rt.ResilientTask, shared=False, policy=rt.TaskPolicy(idempotent=True, retry=rt.RetryPolicy()))
    def retried(n: int) -> int:
        return n

    before = store.trips
    assert [guarded.apply(args=(n,)).get() for n in range(5)] == list(range(5))
    assert store.trips - before == 2 * 5, "begin and end: two round trips per call"
    before = store.trips
    assert [retried.apply(args=(n,)).get() for n in range(5)] == list(range(5))
    assert store.trips == before, "retry only: no round trip"


def test_a_direct_call_is_celerys_own_call() -> None:
    app, _ = _app()
    seen: list[Any] = []

    @app.task(base=rt.ResilientTask, bind=True, shared=False, policy=rt.TaskPolicy(
        idempotency=rt.IdempotencyPolicy(),
    ))
    def probe(self: rt.ResilientTask, x: int) -> int:
        seen.append((self.request.args, current_task._get_current_object() is self))
        return x

    assert probe(3) == 3
    assert seen == [([3], True)] or seen == [((3,), True)], "the body sees its arguments and itself"


def test_a_recursive_direct_call_runs_no_guards_with_the_outer_message() -> None:
    app, _ = _app()

    @app.task(base=rt.ResilientTask, bind=True, shared=False, policy=rt.TaskPolicy(
        idempotency=rt.IdempotencyPolicy(),  # keyed by the message
    ))
    def fact(self: rt.ResilientTask, n: int) -> int:
        return 1 if n <= 1 else n * fact(n - 1)

    assert fact.apply(args=(4,)).get() == 24
    assert fact(5) == 120


@pytest.mark.parametrize("empty", [None, ""])
def test_an_empty_key_argument_fails_that_task_alone(empty: object) -> None:
    app, _ = _app()
    runs: list[object] = []

    @app.task(base=rt.ResilientTask, shared=False, policy=rt.TaskPolicy(
        idempotency=rt.IdempotencyPolicy(key=("order",)),
    ))
    def charge(order: object) -> object:
        runs.append(order)
        return order

    failed = charge.apply(args=(empty,))
    assert failed.failed() and isinstance(failed.result, rt.IdempotencyKeyError)
    assert "order" in str(failed.result)
    assert charge.apply(args=("o-2",)).get() == "o-2"
    assert runs == ["o-2"], "the body of the call with the empty key never ran"


def test_a_result_that_is_not_json_releases_the_claim() -> None:
    app, _ = _app()
    runs: list[int] = []

    @app.task(base=rt.ResilientTask, shared=False, policy=rt.TaskPolicy(
        idempotency=rt.IdempotencyPolicy(key=("n",)),
    ))
    def odd(n: int) -> object:
        runs.append(n)
        return {1, 2}  # a set: not JSON

    odd.apply(args=(1,))
    odd.apply(args=(1,))
    assert runs == [1, 1], "released, not stored as done: a resend runs again (and fails alike)"


def test_a_degraded_answer_releases_the_claim() -> None:
    app, _ = _app()
    runs: list[str] = []
    healthy = {"now": False}

    @app.task(base=rt.ResilientTask, shared=False, policy=rt.TaskPolicy(
        idempotency=rt.IdempotencyPolicy(key=("sku",)),
        fallback=rt.FallbackPolicy(key=("sku",), default={"price": None}),
    ))
    def price(sku: str) -> dict[str, object]:
        runs.append(sku)
        if not healthy["now"]:
            raise ConnectionError("down")
        return {"price": 3}

    value, info = rt.unwrap(price.apply(args=("a",)).get())
    assert value == {"price": None} and info is not None and info.source == "default"
    healthy["now"] = True
    assert price.apply(args=("a",)).get() == {"price": 3}, "the degraded answer did not finish the job"
    assert runs == ["a", "a"]


def test_autoretry_for_on_a_resilient_task_is_refused() -> None:
    app, _ = _app()
    with pytest.raises(rt.PolicyError, match="autoretry_for.*RetryPolicy"):

        @app.task(base=rt.ResilientTask, shared=False, autoretry_for=(ConnectionError,),
                  policy=rt.TaskPolicy(idempotent=True))
        def flaky() -> None: ...

        flaky.bind(app)


def test_a_fresh_fallback_value_is_not_written_again() -> None:
    now = [1_700_000_000.0]
    app = Celery("fresh", broker="memory://", set_as_current=False)
    store = MemoryStore(lambda: now[0])
    rt.install(app, store=store, clock=lambda: now[0])
    puts: list[str] = []
    batch = store.batch

    def counting(ops: Any) -> Any:
        puts.extend(op.record for op in ops if op.name == "cache_put")
        return batch(ops)

    store.batch = counting  # type: ignore[method-assign]

    @app.task(base=rt.ResilientTask, shared=False, policy=rt.TaskPolicy(
        fallback=rt.FallbackPolicy(key=("sku",), ttl=100),
    ))
    def price(sku: str) -> int:
        return 3

    for _ in range(5):
        assert price.apply(args=("a",)).get() == 3
        now[0] += 1.0  # a call a second: within a tenth of the ttl (10 s)
    assert len(puts) == 1, "written once while fresh"
    now[0] += 10.0
    price.apply(args=("a",)).get()
    assert len(puts) == 2, "written again once a tenth of the ttl has passed"
