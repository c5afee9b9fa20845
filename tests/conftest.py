"""Shared fixtures: a fresh Celery app per test on the session's private redis-server.

DB 0 is the broker, DB 1 the resilience store, DB 2 the result backend, so round trips
to the store can be counted apart from the broker's traffic.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from celery import Celery

import resilient_tasks as rt
from resilient_tasks.testing import RedisServer


def make_app(server: RedisServer, name: str = "tests", **conf: object) -> Celery:
    app = Celery(name, broker=server.url(0), backend=server.url(2), set_as_current=False)
    app.conf.update(
        broker_transport_options={"visibility_timeout": 3600},
        result_expires=600,
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
        **conf,
    )
    return app


@pytest.fixture
def app(rt_redis_flushed: RedisServer) -> Iterator[Celery]:
    app = make_app(rt_redis_flushed)
    rt.install(app, redis_url=rt_redis_flushed.url(1))
    yield app
    app.close()


@pytest.fixture
def store_client(rt_redis_flushed: RedisServer) -> Iterator[object]:
    client = rt_redis_flushed.client(1)
    yield client
    client.close()
