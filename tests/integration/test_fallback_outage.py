"""The outage scenario: warm keys, a long outage on a simulated clock, many reads.

Every served value must be an earlier validated success of that key, with an age inside
the decaying TTL schedule and ``max_stale``; no error is ever cached; keys never warmed
get the error. ``RT_CHAOS_SCALE=5`` gives the issue's 10,000 reads (2,000 by default).
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable

from celery import Celery

import resilient_tasks as rt
from resilient_tasks.fallback import entry_ttl
from resilient_tasks.testing import RedisServer, in_process_worker

SCALE = float(os.environ.get("RT_CHAOS_SCALE", "1"))
TTL, DECAY, FLOOR, MAX_STALE = 120.0, 0.8, 30.0, 100.0


class Clock:
    """A simulated clock shared by the test and the in-process worker."""

    def __init__(self) -> None:
        self.now = time.time()
        self.lock = threading.Lock()

    def __call__(self) -> float:
        with self.lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self.lock:
            self.now += seconds


def test_outage_serves_only_trusted_earlier_successes(
    rt_redis_flushed: RedisServer, app_factory: Callable[..., Celery]
) -> None:
    clock = Clock()
    app = app_factory()
    runtime = rt.install(app, redis_url=rt_redis_flushed.url(1), clock=clock)
    up = threading.Event()
    up.set()
    calls_while_down: list[str] = []

    @app.task(
        base=rt.ResilientTask,
        bind=True,
        shared=False,
        policy=rt.TaskPolicy(
            downstream="inventory",
            breaker=rt.BreakerPolicy(
                min_calls=20,
                failure_rate=0.5,
                window=60,
                open_for=10,
                consecutive_failures=20,
                when_open="fallback",
            ),
            fallback=rt.FallbackPolicy(key=("sku",), ttl=TTL, decay=DECAY, floor=FLOOR, max_stale=MAX_STALE),
        ),
    )
    def stock(self: rt.ResilientTask, sku: str) -> dict[str, object]:
        if not up.is_set():
            calls_while_down.append(sku)
            raise ConnectionError("inventory is down")
        return {"sku": sku, "stock": hash(sku) % 1000, "v": 1}

    warmed = {f"sku-{i}": {"sku": f"sku-{i}", "stock": hash(f"sku-{i}") % 1000, "v": 1} for i in range(500)}
    reads = int(2000 * SCALE)
    step = 120.0 / reads  # the outage lasts 120 simulated seconds
    rng = random.Random(3)
    served, errors_cold, errors_warm, ages = 0, 0, 0, []
    with in_process_worker(app, concurrency=4):
        for result in [stock.delay(sku) for sku in warmed]:
            result.get(timeout=30)
        up.clear()
        batch = 50
        for _ in range(0, reads, batch):
            consec = int(runtime.store.client.hget(runtime.store.breaker_key("inventory"), "consec") or 0)  # type: ignore[attr-defined]
            allowed_now = min(entry_ttl(TTL, DECAY, FLOOR, consec), MAX_STALE)
            skus = [
                f"sku-{rng.randrange(500)}" if rng.random() < 0.9 else f"cold-{rng.randrange(100)}"
                for _ in range(batch)
            ]
            results = [(sku, stock.delay(sku)) for sku in skus]
            for sku, result in results:
                answer = result.get(timeout=30, propagate=False)
                if isinstance(answer, Exception):
                    assert isinstance(answer, (ConnectionError, rt.CircuitOpen)), answer
                    if sku.startswith("cold"):
                        errors_cold += 1
                    else:
                        errors_warm += 1
                    continue
                value, info = rt.unwrap(answer)
                assert info is not None and info.source == "cache", "a fresh answer while down?"
                assert not sku.startswith("cold"), "a never-warmed key got a value"
                assert value == warmed[sku], "only an earlier validated success of that key"
                assert info.age_s is not None and info.age_s <= allowed_now + 1e-3
                served += 1
                ages.append(info.age_s)
            clock.advance(step * batch)
    cached = list(runtime.store.client.scan_iter("rt:fb:*"))  # type: ignore[attr-defined]
    values = {runtime.store.client.hget(k, "value") for k in cached}  # type: ignore[attr-defined]
    print(
        f"\noutage: reads={reads} served={served} max_age={max(ages, default=0):.1f}s "
        f"warm_errors={errors_warm} cold_errors={errors_cold} downstream_calls_while_down={len(calls_while_down)}"
    )
    assert served > 0
    assert errors_cold > 0 and errors_warm > 0, "after the floor, stale data is no longer trusted"
    assert all(b"inventory is down" not in (v or b"") for v in values), "no error was cached"
    assert len(calls_while_down) < reads * 0.05, "the open breaker kept reads off the downstream"
