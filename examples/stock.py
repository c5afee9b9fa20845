"""A task module as a user would write it, tested by ``examples/test_with_celery_fixtures.py``.

``ReserveStock`` reserves stock for an order once per order id, however often its message
is published, redelivered or retried. Register it on your app with
``app.register_task(ReserveStock())``; the example test registers it on Celery's
``celery_app`` fixture instead.
"""

from __future__ import annotations

from typing import Any

import resilient_tasks as rt

__all__ = ["ReserveStock", "Warehouse", "warehouse"]


class Warehouse:
    """Stand-in for the stock service the task calls: it keeps every reservation it made,
    and raises ``ConnectionError`` for the next ``failures`` calls (a flaky network)."""

    def __init__(self) -> None:
        self.reservations: list[tuple[str, str, int]] = []
        self.failures = 0

    def reserve(self, order_id: str, sku: str, quantity: int, *, fencing_token: int) -> dict[str, Any]:
        if self.failures > 0:
            self.failures -= 1
            raise ConnectionError("warehouse unreachable")
        self.reservations.append((order_id, sku, quantity))
        return {"order_id": order_id, "sku": sku, "reserved": quantity, "token": fencing_token}


warehouse = Warehouse()


class ReserveStock(rt.ResilientTask):
    """Reserve ``quantity`` of ``sku`` for an order, once per ``order_id``."""

    name = "examples.reserve_stock"
    policy = rt.TaskPolicy(
        idempotency=rt.IdempotencyPolicy(key=("order_id",), ttl=3600),
        # retries re-enqueue with a jittered countdown (never a sleep in the worker)
        retry=rt.RetryPolicy(max_retries=3, base=0.05, cap=0.2),
    )

    def run(self, order_id: str, sku: str, quantity: int) -> dict[str, Any]:
        # the claim's fencing token lets the stock service refuse a stale owner's write
        return warehouse.reserve(order_id, sku, quantity, fencing_token=self.idempotency.token)
