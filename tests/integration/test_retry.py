"""Retries with a real worker: counts of runs, what is retried, and deadlines."""

from __future__ import annotations

import threading

import pytest
from celery import Celery

import resilient_tasks as rt
from resilient_tasks.testing import in_process_worker


def test_fails_twice_then_succeeds_runs_exactly_three_times(app: Celery) -> None:
    runs: list[int] = []
    lock = threading.Lock()

    @app.task(
        base=rt.ResilientTask,
        bind=True,
        shared=False,
        policy=rt.TaskPolicy(
            idempotent=True,
            retry=rt.RetryPolicy(max_retries=5, base=0.01, cap=0.05),
        ),
    )
    def flaky(self: rt.ResilientTask, x: int) -> int:
        with lock:
            runs.append(self.request.retries)
        if len(runs) < 3:
            raise ConnectionError("downstream reset")
        return x * 2

    with in_process_worker(app):
        assert flaky.delay(21).get(timeout=20) == 42
    assert runs == [0, 1, 2]


def test_non_retryable_exception_is_not_retried(app: Celery) -> None:
    runs: list[int] = []

    @app.task(
        base=rt.ResilientTask,
        bind=True,
        shared=False,
        policy=rt.TaskPolicy(
            idempotent=True,
            retry=rt.RetryPolicy(max_retries=5, base=0.01, cap=0.05, retry_on=(ConnectionError,)),
        ),
    )
    def broken(self: rt.ResilientTask) -> None:
        runs.append(self.request.retries)
        raise ValueError("bad payload")

    with in_process_worker(app):
        result = broken.delay()
        with pytest.raises(ValueError, match="bad payload"):
            result.get(timeout=20)
    assert runs == [0]
