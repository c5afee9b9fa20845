"""An app for ``celery -A tests.integration.cli_app resilience ...``: a shop whose tasks
are keyed by their arguments. The broker, result backend and store come from
``RT_BROKER_URL``, ``RT_RESULT_BACKEND`` and ``RESILIENT_TASKS_REDIS_URL``; importing it
connects to nothing (the command-line tests give it stores that are down or refuse us)."""

from __future__ import annotations

import os
from typing import Any

import redis
from celery import Celery

import resilient_tasks as rt

app = Celery(
    "cli_shop",
    broker=os.environ.get("RT_BROKER_URL", "memory://"),
    backend=os.environ.get("RT_RESULT_BACKEND"),
    set_as_current=False,
)
app.conf.update(broker_connection_retry_on_startup=True, worker_hijack_root_logger=False)
rt.install(app)  # the store: RESILIENT_TASKS_REDIS_URL


def _ran(what: str) -> int:
    """Count a body's run in the store's database, where the test can read it."""
    client = redis.Redis.from_url(os.environ["RESILIENT_TASKS_REDIS_URL"])
    try:
        return int(client.incr(f"cli_app:ran:{what}"))
    finally:
        client.close()


@app.task(  # type: ignore[untyped-decorator]
    base=rt.ResilientTask,
    bind=True,
    name="shop.charge",
    policy=rt.TaskPolicy(downstream="payments", idempotency=rt.IdempotencyPolicy(key=("order_id",))),
)
def charge(self: Any, order_id: str, amount: int = 10) -> int:
    return _ran(f"charge:{order_id}")


@app.task(  # type: ignore[untyped-decorator]
    base=rt.ResilientTask,
    bind=True,
    name="shop.ship",
    policy=rt.TaskPolicy(downstream="carrier", idempotency=rt.IdempotencyPolicy(key="{order_id}/{carrier}")),
)
def ship(self: Any, order_id: str, carrier: str = "ups") -> int:
    return _ran(f"ship:{order_id}/{carrier}")


@app.task(  # type: ignore[untyped-decorator]
    base=rt.ResilientTask, bind=True, name="shop.notify", policy=rt.TaskPolicy(downstream="mail")
)
def notify(self: Any, user: str) -> str:
    return user
