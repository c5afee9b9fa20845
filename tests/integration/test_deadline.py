"""Deadlines: absolute, carried through retries and into child tasks."""

from __future__ import annotations

import time

import pytest
from celery import Celery

import resilient_tasks as rt
from resilient_tasks.testing import in_process_worker


def test_deadline_stops_retries(app: Celery) -> None:
    runs: list[float] = []

    @app.task(
        base=rt.ResilientTask,
        bind=True,
        shared=False,
        policy=rt.TaskPolicy(
            idempotent=True,
            deadline=1.5,
            retry=rt.RetryPolicy(max_retries=50, backoff="fixed", base=0.4, cap=0.4),
        ),
    )
    def always_down(self: rt.ResilientTask) -> None:
        runs.append(time.time())
        raise ConnectionError("down")

    with in_process_worker(app):
        result = always_down.delay()
        with pytest.raises(rt.DeadlineExceeded, match="past the deadline"):
            result.get(timeout=20)
    # 0.4 s apart within 1.5 s: at most 4 runs, and far fewer than max_retries.
    assert 2 <= len(runs) <= 4
    assert runs[-1] - runs[0] < 1.5


def test_deadline_is_carried_in_headers_through_retries_and_into_children(app: Celery) -> None:
    seen: dict[str, list[float]] = {"parent": [], "child": []}

    @app.task(base=rt.ResilientTask, bind=True, shared=False, policy=rt.TaskPolicy())
    def child(self: rt.ResilientTask) -> float:
        seen["child"].append(float(self.request.headers["rt_deadline"]))
        return 1.0

    @app.task(
        base=rt.ResilientTask,
        bind=True,
        shared=False,
        policy=rt.TaskPolicy(
            idempotent=True,
            deadline=30,
            retry=rt.RetryPolicy(max_retries=3, backoff="fixed", base=0.01, cap=0.01),
        ),
    )
    def parent(self: rt.ResilientTask) -> str:
        seen["parent"].append(float(self.request.headers["rt_deadline"]))
        if self.request.retries < 2:
            raise ConnectionError("flaky")
        return str(child.delay().id)

    before = time.time()
    with in_process_worker(app):
        child_id = parent.delay().get(timeout=20)
        app.AsyncResult(child_id).get(timeout=20)
    assert len(seen["parent"]) == 3
    assert len(set(seen["parent"])) == 1, "every retry carries the same absolute deadline"
    deadline = seen["parent"][0]
    assert before + 29 < deadline < time.time() + 30
    assert seen["child"] == [deadline]


def test_expired_deadline_does_not_run_the_body(app: Celery) -> None:
    runs: list[int] = []

    @app.task(base=rt.ResilientTask, bind=True, shared=False, policy=rt.TaskPolicy())
    def late(self: rt.ResilientTask) -> None:
        runs.append(1)

    with in_process_worker(app):
        result = late.apply_async(headers={"rt_deadline": time.time() - 5})
        with pytest.raises(rt.DeadlineExceeded, match="was not run"):
            result.get(timeout=20)
    assert runs == []


def test_retry_after_hint_is_honoured(app: Celery) -> None:
    class Throttled(ConnectionError):
        retry_after = 0.6

    stamps: list[float] = []

    @app.task(
        base=rt.ResilientTask,
        bind=True,
        shared=False,
        policy=rt.TaskPolicy(
            idempotent=True,
            retry=rt.RetryPolicy(max_retries=2, base=0.01, cap=0.02),
        ),
    )
    def throttled(self: rt.ResilientTask) -> int:
        stamps.append(time.monotonic())
        if len(stamps) == 1:
            raise Throttled("429")
        return len(stamps)

    with in_process_worker(app):
        assert throttled.delay().get(timeout=20) == 2
    assert stamps[1] - stamps[0] >= 0.55


def test_a_child_keeps_its_own_shorter_deadline(app: Celery) -> None:
    seen: list[float] = []

    @app.task(base=rt.ResilientTask, bind=True, shared=False, policy=rt.TaskPolicy(deadline=5))
    def quick_child(self: rt.ResilientTask) -> None:
        seen.append(float(self.request.headers["rt_deadline"]))

    @app.task(base=rt.ResilientTask, bind=True, shared=False, policy=rt.TaskPolicy(deadline=3600))
    def long_parent(self: rt.ResilientTask) -> str:
        return str(quick_child.delay().id)

    before = time.time()
    with in_process_worker(app):
        child_id = long_parent.delay().get(timeout=20)
        app.AsyncResult(child_id).get(timeout=20)
    assert before < seen[0] < time.time() + 5, "the child's 5 s, not the parent's hour"
