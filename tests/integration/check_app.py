"""An app for ``celery -A tests.integration.check_app resilience check FILE``: two tasks
and a Redis broker whose visibility timeout is one hour. Nothing here connects."""

from __future__ import annotations

from typing import Any

from celery import Celery

import resilient_tasks as rt

app = Celery("checked", broker="redis://127.0.0.1:9/0", set_as_current=False)
app.conf.broker_transport_options = {"visibility_timeout": 3600}
rt.install(app, redis_url="redis://127.0.0.1:9/1")


@app.task(  # type: ignore[untyped-decorator]
    base=rt.ResilientTask,
    bind=True,
    name="shop.charge",
    policy=rt.TaskPolicy(
        downstream="payments",
        idempotency=rt.IdempotencyPolicy(key=("order_id",), lease=60),
        retry=rt.RetryPolicy(max_retries=2, base=0.1, cap=5),
        breaker=rt.BreakerPolicy(open_for=30),
    ),
)
def charge(self: Any, order_id: str) -> str:
    return order_id


@app.task(  # type: ignore[untyped-decorator]
    base=rt.ResilientTask, bind=True, name="shop.notify", policy=rt.TaskPolicy(downstream="mail")
)
def notify(self: Any, user: str) -> str:
    return user
