"""Testing your own ``ResilientTask`` with Celery's pytest fixtures and ours.

Celery's ``celery_app``, ``celery_worker`` and ``celery_config`` fixtures
(``celery.contrib.pytest``; pytest-celery provides them too) run a worker in a thread of
the test process; ``rt_redis`` (``resilient_tasks.testing``) starts a private
``redis-server`` on a free port for the session. Together they run the task of
``examples/stock.py`` end to end, on a real Redis, with no Docker:

    python -m pytest examples/test_with_celery_fixtures.py

Both plugins are opt-in. In your project, put the ``pytest_plugins`` line and the
``celery_config`` and ``celery_app`` fixtures below in the root ``conftest.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery

import resilient_tasks as rt
from examples.stock import ReserveStock, warehouse
from resilient_tasks.testing import RedisServer

pytest_plugins = ["celery.contrib.pytest", "resilient_tasks.testing"]


@pytest.fixture(scope="session")
def celery_config(rt_redis: RedisServer) -> dict[str, Any]:
    """The broker, and a result backend so ``.get()`` works, on the private server."""
    return {"broker_url": rt_redis.url(0), "result_backend": rt_redis.url(2)}


@pytest.fixture
def celery_app(celery_app: Celery, rt_redis_flushed: RedisServer) -> Celery:
    """Celery's test app, with resilient-tasks installed and our task registered.

    Overriding ``celery_app`` (rather than adding a fixture beside it) makes sure this
    runs before ``celery_worker`` starts, and after ``rt_redis_flushed`` emptied the
    server, so every test starts with no idempotency records."""
    rt.install(celery_app, redis_url=rt_redis_flushed.url(1))
    celery_app.register_task(ReserveStock())
    return celery_app


@pytest.fixture(autouse=True)
def fresh_warehouse() -> Iterator[None]:
    warehouse.reservations.clear()
    warehouse.failures = 0
    yield


def test_a_duplicate_gets_the_stored_result_and_the_body_runs_once(
    celery_app: Celery, celery_worker: Any
) -> None:
    reserve = celery_app.tasks[ReserveStock.name]

    first = reserve.delay("o-1", "SKU-7", 2).get(timeout=10)
    again = reserve.delay("o-1", "SKU-7", 2).get(timeout=10)  # a producer that published twice

    assert first == {"order_id": "o-1", "sku": "SKU-7", "reserved": 2, "token": 1}
    assert again == first
    assert warehouse.reservations == [("o-1", "SKU-7", 2)]


def test_another_order_runs_and_the_same_order_with_other_arguments_is_refused(
    celery_app: Celery, celery_worker: Any
) -> None:
    reserve = celery_app.tasks[ReserveStock.name]

    reserve.delay("o-1", "SKU-7", 2).get(timeout=10)
    reserve.delay("o-2", "SKU-7", 5).get(timeout=10)
    with pytest.raises(rt.IdempotencyConflict):
        reserve.delay("o-1", "SKU-7", 9).get(timeout=10)

    assert warehouse.reservations == [("o-1", "SKU-7", 2), ("o-2", "SKU-7", 5)]


def test_a_connection_error_is_retried_and_the_stock_is_reserved_once(
    celery_app: Celery, celery_worker: Any
) -> None:
    reserve = celery_app.tasks[ReserveStock.name]
    warehouse.failures = 2

    result = reserve.delay("o-3", "SKU-1", 1).get(timeout=10)

    assert result["reserved"] == 1
    assert warehouse.reservations == [("o-3", "SKU-1", 1)]
    assert warehouse.failures == 0  # both failures were met, and retried
