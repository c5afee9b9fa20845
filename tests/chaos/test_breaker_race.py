"""Four worker processes x concurrency 4 race on one breaker while A is down.

Reduced in ``make test`` (an 8 s outage); ``RT_CHAOS_SCALE=4`` gives the issue's 30 s.
"""

from __future__ import annotations

import os
import re
import time

import pytest
from celery import Celery

from resilient_tasks.store import RedisStore
from resilient_tasks.testing import RedisServer, SubprocessWorker, wait_until

pytestmark = pytest.mark.chaos

SCALE = float(os.environ.get("RT_CHAOS_SCALE", "1"))
OPEN_FOR = 2.0
MIN_CALLS = 10
CONCURRENCY = 16


def test_one_fleet_wide_breaker_under_a_race(rt_redis_flushed: RedisServer, tmp_path: object) -> None:
    env = {
        "RT_BROKER_URL": rt_redis_flushed.url(0),
        "RESILIENT_TASKS_REDIS_URL": rt_redis_flushed.url(1),
        "RT_RESULT_BACKEND": rt_redis_flushed.url(2),
        "RT_OPEN_FOR": str(OPEN_FOR),
        "RT_MIN_CALLS": str(MIN_CALLS),
        "PYTHONPATH": os.getcwd(),
    }
    store = RedisStore(rt_redis_flushed.url(1))
    db = store.client
    db.set("ledger:A:down", "1")
    producer = Celery(
        "p", broker=env["RT_BROKER_URL"], backend=env["RT_RESULT_BACKEND"], set_as_current=False
    )
    workers = [
        SubprocessWorker(
            "tests.chaos.breaker_app", concurrency=4, name=f"r{i}", env=env, log=f"{tmp_path}/r{i}.log"
        ).start()
        for i in range(4)
    ]
    wait_until(
        lambda: len(producer.control.ping(timeout=0.5)) == len(workers),
        timeout=60,
        interval=0.2,
        what="all workers up",
    )
    results = {"A": [], "B": []}
    outage = 8.0 * SCALE
    try:
        started = time.monotonic()
        n = 0
        while time.monotonic() - started < outage:
            for name in ("A", "B"):
                results[name].append(producer.send_task(f"race.call_{name.lower()}", args=[n]))
            n += 1
            time.sleep(0.02)
        db.set("ledger:A:down", "0")
        healed = time.monotonic()
        brk = store.breaker_key("A")
        wait_until(
            lambda: db.hget(brk, "state") == b"closed", timeout=30, interval=0.05, what="A's breaker to close"
        )
        to_closed = time.monotonic() - healed
        outcomes = {name: [r.get(timeout=120, propagate=False) for r in rs] for name, rs in results.items()}
    finally:
        for worker in workers:
            worker.stop()
        producer.close()
    a = {k.decode(): int(v) for k, v in db.hgetall("ledger:A").items()}
    state = {
        k.decode(): v.decode()
        for k, v in db.hgetall(store.breaker_key("A")).items()
        if not re.fullmatch(rb"[a-z]\d+|p:.*", k)
    }
    b_ok = sum(1 for r in outcomes["B"] if r == "B") / len(outcomes["B"])
    a_ok = sum(1 for r in outcomes["A"] if r == "A")
    print(
        f"\nbreaker race: jobs per downstream={len(results['A'])} A ledger={a} breaker={state} "
        f"A succeeded={a_ok} B success={b_ok:.4f} healthy->closed={to_closed:.2f}s"
    )
    assert int(state["trips"]) == 1, "exactly one CLOSED->OPEN transition for the outage"
    assert a.get("fail_closed", 0) <= MIN_CALLS + CONCURRENCY
    # A call that was admitted just before another worker opened the breaker may still
    # arrive after it; at most one per concurrent slot. None is admitted while OPEN.
    assert a.get("calls_open", 0) <= CONCURRENCY
    assert a.get("calls_half_open", 0) >= 1
    assert b_ok >= 0.99
    assert a_ok == len(outcomes["A"]), "every deferred A job succeeded after A healed"
    assert to_closed <= OPEN_FOR + 2.0
