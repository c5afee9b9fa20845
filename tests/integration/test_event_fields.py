"""Each Celery event carries the fields of its own attempt only: Flower merges every event
of a task into one record, so a task deferred by an open breaker that later succeeds must
not keep showing ``breaker_state: open`` from the deferral."""

from __future__ import annotations

from typing import Any

from celery import Celery

import resilient_tasks as rt
from resilient_tasks.testing import in_process_worker, wait_until


def test_a_deferred_task_that_succeeds_later_sends_its_own_fields(app: Celery) -> None:
    app.conf.worker_send_task_events = True
    runtime = rt.runtime_for(app)

    @app.task(base=rt.ResilientTask, shared=False, name="fields.charge", policy=rt.TaskPolicy(
        downstream="fields-svc",
        breaker=rt.BreakerPolicy(open_for=1, flush_interval=0),
    ))
    def charge(n: int) -> int:
        return n

    sent: list[tuple[str, dict[str, Any]]] = []
    original = charge.send_event

    def recording(kind: str, **fields: Any) -> Any:
        sent.append((kind, fields))
        return original(kind, **fields)

    charge.send_event = recording  # type: ignore[method-assign]
    with in_process_worker(app, concurrency=1):
        rt.set_switch(app, "fields-svc", "forced_open")
        result = charge.delay(7)
        wait_until(lambda: runtime.counters[("deferred", "fields-svc")] >= 1, timeout=20, what="a deferral")
        rt.set_switch(app, "fields-svc", "normal")
        assert result.get(timeout=30) == 7
    kinds = [kind for kind, _ in sent]
    assert "task-deferred" in kinds and kinds[-1] == "task-settled", kinds
    deferred = next(fields for kind, fields in sent if kind == "task-deferred")
    assert deferred["resilience_breaker_state"] == "forced_open"
    settled = sent[-1][1]
    assert settled["resilience_breaker_state"] == "closed", "this attempt's own state"
    assert settled["resilience_retry_delay_s"] is None
    assert settled["resilience_outcomes"] == ["executed"]
