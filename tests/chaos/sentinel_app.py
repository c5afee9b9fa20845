"""A worker app for the Sentinel failover test: ``celery -A tests.chaos.sentinel_app worker``.

The broker, the result backend and the ledger live on one plain redis-server; the
resilience store is reached through Sentinel (``RESILIENT_TASKS_REDIS_URL`` is a
``sentinel://`` URL). Each run of the body adds one to its job's count in the ledger
(``runs``), so a duplicate run is visible whatever the store remembers.
"""

from __future__ import annotations

import os
import time

import redis
from celery import Celery

import resilient_tasks as rt
from resilient_tasks.errors import StoreUnavailable
from resilient_tasks.store.redis import RedisStore

BROKER = os.environ["RT_BROKER_URL"]
BACKEND = os.environ["RT_BACKEND_URL"]
STORE = os.environ["RESILIENT_TASKS_REDIS_URL"]
LEDGER = os.environ["RT_LEDGER_URL"]
LEASE = float(os.environ.get("RT_LEASE", "5"))
WORK_S = float(os.environ.get("RT_WORK_S", "0.02"))

app = Celery("sentinel_chaos", broker=BROKER, backend=BACKEND)
app.conf.update(
    broker_transport_options={"visibility_timeout": 600},
    result_expires=600,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)
rt.install(app, redis_url=STORE, redis_options={"socket_timeout": 1.0})

_ledger = redis.Redis.from_url(LEDGER)


@app.task(
    base=rt.ResilientTask,
    bind=True,
    name="sentinel.bump",
    policy=rt.TaskPolicy(idempotency=rt.IdempotencyPolicy(key=("job",), lease=LEASE, ttl=3600)),
)
def bump(self: rt.ResilientTask, job: str) -> dict[str, object]:
    claim = self.idempotency
    time.sleep(WORK_S)
    pipe = _ledger.pipeline(transaction=True)
    pipe.hincrby("runs", job, 1)
    pipe.hset("records", job, claim.key)
    pipe.rpush("run_log", f"{job} {claim.token} {time.monotonic():.3f}")
    pipe.execute()
    return {"job": job, "token": claim.token}


def _count_store_failures() -> None:
    """Test instrumentation: when a store round trip failed (CLOCK_MONOTONIC is one clock
    for every process of the machine, so the test can compare)."""
    original = RedisStore.batch

    def counted(self: RedisStore, ops: object) -> object:
        try:
            return original(self, ops)  # type: ignore[arg-type]
        except StoreUnavailable as exc:
            _ledger.rpush("store_failures", f"{time.monotonic():.3f} {type(exc.__cause__).__name__}")
            raise

    RedisStore.batch = counted  # type: ignore[method-assign, assignment]


_count_store_failures()
