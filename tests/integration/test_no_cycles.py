"""A call is freed by reference counting: it leaves no reference cycle for the cyclic
garbage collector. In a busy worker such cycles pile up between collections, and each
collection of them is paid for by the tasks that happen to trigger it."""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator

import pytest
from celery import Celery

import resilient_tasks as rt
from resilient_tasks.guards.base import ClaimHandle, Execution, Outcome
from resilient_tasks.testing import RedisServer


@pytest.fixture
def collector_paused() -> Iterator[None]:
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)  # what a collection finds is kept in gc.garbage
    try:
        yield
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


def _ours(found: list[object]) -> list[object]:
    return [
        o for o in found
        if isinstance(o, (Execution, Outcome, ClaimHandle))
        or getattr(o, "__module__", "").startswith("resilient_tasks")
        or getattr(getattr(o, "__code__", None), "co_filename", "").find("resilient_tasks") >= 0
    ]


def test_successful_calls_leave_no_cycles(
    app_factory: Callable[..., Celery], rt_redis_flushed: RedisServer, collector_paused: None
) -> None:
    app = app_factory()
    rt.install(app, redis_url=rt_redis_flushed.url(1))
    policy = rt.TaskPolicy(
        downstream="cycles-ds",
        idempotency=rt.IdempotencyPolicy(key=("n",)),
        breaker=rt.BreakerPolicy(min_calls=1_000_000),
        fallback=rt.FallbackPolicy(key=("n",)),
        retry=rt.RetryPolicy(),
    )

    @app.task(base=rt.ResilientTask, policy=policy, name="cycles.all_guards", shared=False)
    def all_guards(n: int) -> int:
        return n + 1

    assert all_guards.apply(args=(0,)).get() == 1  # warm: connections, scripts, caches
    gc.collect()
    gc.garbage.clear()
    results = [all_guards.apply(args=(n,)).get() for n in range(1, 21)]
    replay = all_guards.apply(args=(5,)).get()  # a duplicate, answered from the record
    gc.collect()
    assert results == list(range(2, 22)) and replay == 6
    assert _ours(gc.garbage) == []
