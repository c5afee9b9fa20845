"""Worker app for the observability tests and the Flower screenshot.

``celery -A tests.telemetry_app worker -E`` with ``RT_BROKER_URL``, ``RT_RESULT_BACKEND``
and ``RESILIENT_TASKS_REDIS_URL`` set. The "pricing" service is down while the key
``telemetry:pricing:down`` exists in the store's database, so a test can warm the fallback
cache, break the service and watch a fallback being served.
"""

from __future__ import annotations

import os
import time

import redis
from celery import Celery

import resilient_tasks as rt

STORE_URL = os.environ["RESILIENT_TASKS_REDIS_URL"]
PRICING_DOWN = "telemetry:pricing:down"

app = Celery("telemetry", broker=os.environ["RT_BROKER_URL"], backend=os.environ["RT_RESULT_BACKEND"])
app.conf.update(
    broker_transport_options={"visibility_timeout": 3600},
    worker_prefetch_multiplier=1,
    result_expires=600,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)
rt.install(app, redis_url=STORE_URL)

_flags = redis.Redis.from_url(STORE_URL)


@app.task(
    base=rt.ResilientTask,
    bind=True,
    name="telemetry.flaky",
    policy=rt.TaskPolicy(
        idempotent=True,
        retry=rt.RetryPolicy(max_retries=3, base=0.05, cap=0.2, budget=None),
    ),
)
def flaky(self: rt.ResilientTask, job: str, failures: int) -> str:
    """Fails ``failures`` times with a retryable error, then succeeds."""
    if self.request.retries < failures:
        raise ConnectionError(f"{job}: attempt {self.request.retries} failed")
    return f"{job} done after {self.request.retries} retries"


@app.task(
    base=rt.ResilientTask,
    bind=True,
    name="telemetry.charge",
    policy=rt.TaskPolicy(idempotency=rt.IdempotencyPolicy(key=("order",), ttl=600)),
)
def charge(self: rt.ResilientTask, order: str, cents: int) -> dict[str, object]:
    """A payment: the same order twice is charged once, the second call replays."""
    return {"order": order, "charged": cents}


@app.task(
    base=rt.ResilientTask,
    bind=True,
    name="telemetry.price",
    policy=rt.TaskPolicy(
        downstream="pricing",
        breaker=rt.BreakerPolicy(min_calls=1000, when_open="fallback"),
        fallback=rt.FallbackPolicy(key=("sku",), ttl=600, floor=60),
    ),
)
def price(self: rt.ResilientTask, sku: str) -> dict[str, object]:
    """Reads the pricing service; served from the last known good value while it is down."""
    if _flags.exists(PRICING_DOWN):
        raise ConnectionError("pricing is down")
    return {"sku": sku, "price": 42}


@app.task(
    base=rt.ResilientTask,
    bind=True,
    name="telemetry.stock",
    policy=rt.TaskPolicy(downstream="inventory"),
)
def stock(self: rt.ResilientTask, n: int, work_s: float = 0.0) -> list[int]:
    """Always succeeds, behind the "inventory" breaker: ``[n, pid of the process that ran it]``."""
    time.sleep(work_s)
    return [n, os.getpid()]
