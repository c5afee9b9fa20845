"""Shop tasks, registered on ``workers.app``'s Celery app.

Registering on the worker app (rather than a second Celery app) lets the compose workers
serve them with ``celery -A workers.app worker --include examples.shop.app`` and lets
``celery -A workers.app resilience status`` show their breakers next to the demo's:

- ``shop.charge``: a payment, run once per order id, fenced with the claim's token;
  breaker ``payments`` (its settings come from ``[downstreams."payments"]`` of
  ``workers/policies.toml``);
- ``shop.sync_inventory`` (the subclass form): reads a SKU's stock from the warehouse
  database (breaker ``warehouse-db``) and publishes it to the inventory service (breaker
  ``inventory``); while either fails it answers with the last stock it synced.

Both talk to the flaky service of ``examples.downstream`` at ``RT_DOWNSTREAM_URL``, so one
``POST /config`` breaks payments and inventory together.
"""

from __future__ import annotations

import time
import uuid
import zlib
from typing import Any

import resilient_tasks as rt
from examples import downstream
from workers.app import DOWNSTREAM_URL, app

__all__ = ["PAYMENTS_QUEUE", "SyncInventory", "charge", "sync_inventory", "warehouse_level"]

#: Payments get their own queue (the workers consume ``payments,celery``).
PAYMENTS_QUEUE = "payments"


@app.task(  # type: ignore[untyped-decorator]  # Celery ships no type hints
    base=rt.ResilientTask,
    bind=True,
    name="shop.charge",
    queue=PAYMENTS_QUEUE,
    policy=rt.TaskPolicy(
        downstream="payments",
        retry=rt.RetryPolicy(max_retries=5, backoff="full_jitter", base=0.1, cap=2.0),
        idempotency=rt.IdempotencyPolicy(key=("order_id",), ttl=3600, lease=30),
    ),
)
def charge(self: rt.ResilientTask, order_id: str, customer_id: str, amount: int) -> dict[str, Any]:
    """Charge an order once, however often its message is delivered or retried."""
    claim = self.idempotency
    claim.check()  # an owner whose claim was taken over must not charge
    reply = downstream.charge(DOWNSTREAM_URL, order_id=order_id, amount=amount, token=claim.token)
    return {
        "order_id": order_id,
        "customer_id": customer_id,
        "charged": reply["charged"],
        "token": claim.token,
    }


def warehouse_level(sku: str, now: float | None = None) -> int:
    """Units of ``sku`` on hand: a stand-in for the warehouse database.

    It never fails by itself (open its breaker with ``resilience open warehouse-db`` to
    see the fallback); the level moves every minute so a stale answer is visible.
    """
    minute = int((time.time() if now is None else now) // 60)
    return (zlib.crc32(sku.encode()) + 7 * minute) % 120


class SyncInventory(rt.ResilientTask):
    """Publish a SKU's stock level; serve the last one synced while a dependency fails."""

    name = "shop.sync_inventory"
    policy = rt.TaskPolicy(
        downstream="inventory",
        idempotent=True,  # publishing the same level twice is harmless, so retries are safe
        retry=rt.RetryPolicy(max_retries=2, backoff="full_jitter", base=0.2, cap=2.0),
        # when_open="fallback": an open breaker (inventory, or warehouse-db inside the
        # body) answers from the cache at once instead of deferring the job.
        breaker=rt.BreakerPolicy(
            failure_rate=0.5, min_calls=20, window=30, open_for=10, when_open="fallback"
        ),
        fallback=rt.FallbackPolicy(key=("sku",), ttl=300, decay=0.8, floor=60, max_stale=900),
    )

    def run(self, sku: str) -> dict[str, Any]:
        with self.downstream("warehouse-db"):  # its own breaker, counted apart from inventory's
            level = warehouse_level(sku)
        # The demo service only speaks POST /charge; a unique zero-token write of the level
        # stands in for the inventory API and fails with 503 at the configured rate.
        downstream.charge(DOWNSTREAM_URL, order_id=f"stock:{sku}:{uuid.uuid4().hex}", amount=level, token=0)
        return {"sku": sku, "stock": level, "synced_at": time.time()}


sync_inventory = app.register_task(SyncInventory())
