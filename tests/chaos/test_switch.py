"""A degrade switch flipped once reaches every worker process within a second."""

from __future__ import annotations

import os
import time

import pytest
from celery import Celery

import resilient_tasks as rt
from resilient_tasks.store import RedisStore
from resilient_tasks.testing import RedisServer, SubprocessWorker, wait_until

pytestmark = pytest.mark.chaos


def server_ms(client: object) -> int:
    seconds, micros = client.time()  # type: ignore[attr-defined]
    return int(seconds) * 1000 + int(micros) // 1000


def test_fallback_only_stops_every_worker_within_a_second(
    rt_redis_flushed: RedisServer, tmp_path: object
) -> None:
    env = {
        "RT_BROKER_URL": rt_redis_flushed.url(0),
        "RESILIENT_TASKS_REDIS_URL": rt_redis_flushed.url(1),
        "RT_RESULT_BACKEND": rt_redis_flushed.url(2),
        "PYTHONPATH": os.getcwd(),
    }
    db = RedisStore(rt_redis_flushed.url(1)).client
    producer = Celery(
        "p", broker=env["RT_BROKER_URL"], backend=env["RT_RESULT_BACKEND"], set_as_current=False
    )
    operator = Celery("ops", broker=env["RT_BROKER_URL"], set_as_current=False)
    rt.install(operator, redis_url=env["RESILIENT_TASKS_REDIS_URL"])
    workers = [
        SubprocessWorker(
            "tests.chaos.breaker_app", concurrency=2, name=f"s{i}", env=env, log=f"{tmp_path}/s{i}.log"
        ).start()
        for i in range(2)
    ]
    try:
        wait_until(
            lambda: len(producer.control.ping(timeout=0.5)) == 2, timeout=60, interval=0.2, what="workers up"
        )

        def stream(seconds: float, start: int) -> list[object]:
            sent, n, until = [], start, time.monotonic() + seconds
            while time.monotonic() < until:
                sent.append(producer.send_task("race.read_catalog", args=[n]))
                n += 1
                time.sleep(0.01)
            return sent

        before = stream(1.5, 0)
        flipped_ms = server_ms(db)
        rt.set_switch(operator, "catalog", "fallback_only")
        during = stream(2.5, 10_000)
        last_call_ms = int(db.get("ledger:catalog:last_call_ms"))
        rt.set_switch(operator, "catalog", "normal")
        after = stream(1.0, 20_000)
        answers = {
            name: [r.get(timeout=30) for r in results]  # type: ignore[attr-defined]
            for name, results in (("before", before), ("during", during), ("after", after))
        }
    finally:
        for worker in workers:
            worker.stop()
        producer.close()
    lag_ms = max(0, last_call_ms - flipped_ms)
    stale_share = sum(1 for a in answers["during"] if rt.unwrap(a)[1] is not None) / len(answers["during"])
    print(
        f"\nswitch: last downstream call {lag_ms} ms after the flip; {stale_share:.0%} of jobs during "
        f"the switch served the fallback"
    )
    assert lag_ms <= 1000
    assert all(a == "fresh" for a in answers["before"])
    assert stale_share >= 0.9, "tasks published after the flip never reach the downstream"
    assert all(a == "fresh" for a in answers["after"]), "normal resumes calls"
