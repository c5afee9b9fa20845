"""The demo's Celery app: one resilient task that charges a flaky payments service.

Every address comes from the environment so ``make demo`` can point the workers at its
own embedded Redis and downstream: ``RT_BROKER_URL``, ``RT_RESULT_BACKEND``,
``RESILIENT_TASKS_REDIS_URL`` (the resilience store) and ``RT_DOWNSTREAM_URL``.

Run a worker with ``celery -A workers.app worker --pool threads --concurrency 8``.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

import resilient_tasks as rt
import workers.otel  # noqa: F401  # traces and metrics over OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set
from examples import downstream

__all__ = ["BROKER_URL", "DOWNSTREAM_URL", "POLICIES", "RESULT_BACKEND", "STORE_URL", "app", "charge"]

BROKER_URL = os.environ.get("RT_BROKER_URL", "redis://127.0.0.1:6379/0")
RESULT_BACKEND = os.environ.get("RT_RESULT_BACKEND", "redis://127.0.0.1:6379/2")
STORE_URL = os.environ.get("RESILIENT_TASKS_REDIS_URL", "redis://127.0.0.1:6379/1")
DOWNSTREAM_URL = os.environ.get("RT_DOWNSTREAM_URL", "http://127.0.0.1:8099").rstrip("/")

app = Celery("workers", broker=BROKER_URL, backend=RESULT_BACKEND)
app.conf.update(
    # task-succeeded/failed/retried events let the demo (and Flower) follow progress.
    worker_send_task_events=True,
    worker_prefetch_multiplier=4,
    # Must stay above every countdown and lease (install() checks it): a Redis broker
    # redelivers unacked messages after this long, and a redelivered task runs twice.
    broker_transport_options={"visibility_timeout": 3600},
    result_expires=3600,
    # Final result metadata then carries ``retries``, so retries can be counted from the
    # result backend too, not only from events (which are fire-and-forget).
    result_extended=True,
    broker_connection_retry_on_startup=True,
)
#: Operators' layer over the code's policies (``RESILIENT_TASKS_POLICIES`` overrides it).
POLICIES = os.environ.get(
    "RESILIENT_TASKS_POLICIES", os.path.join(os.path.dirname(__file__), "policies.toml")
)
# Queues per downstream class: payments work never waits behind slow inventory syncs.
app.conf.task_routes = {"workers.app.charge": {"queue": "payments"}}
rt.install(app, redis_url=STORE_URL, policies=POLICIES)


@app.task(  # type: ignore[untyped-decorator]  # Celery ships no type hints
    base=rt.ResilientTask,
    bind=True,
    name="workers.app.charge",
    policy=rt.TaskPolicy(
        downstream="payments",
        retry=rt.RetryPolicy(
            max_retries=5, backoff="full_jitter", base=0.05, cap=1.0,
            retry_on=(ConnectionError, TimeoutError),
        ),
        idempotency=rt.IdempotencyPolicy(key=("order_id",), ttl=3600, lease=30),
    ),
)
def charge(self: rt.ResilientTask, order_id: str, customer_id: str, amount: int) -> dict[str, Any]:
    """Charge ``amount`` for ``order_id`` once, however often the message is delivered.

    The fencing token lets the payments service refuse a zombie execution whose claim was
    taken over. ``task_id`` in the result tells a caller whether this message ran the body
    or got the stored result of another message with the same order id (a replay).
    """
    claim = self.idempotency
    claim.check()  # a claim taken over by another worker must not charge
    reply = downstream.charge(DOWNSTREAM_URL, order_id=order_id, amount=amount, token=claim.token)
    return {
        "order_id": order_id,
        "customer_id": customer_id,
        "charged": reply["charged"],
        "attempt": self.request.retries,
        "token": claim.token,
        "task_id": self.request.id,
    }
