"""Shared fixtures: a fresh Celery app per test on the session's private redis-server.

DB 0 is the broker, DB 1 the resilience store, DB 2 the result backend, so round trips
to the store can be counted apart from the broker's traffic.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator

import pytest
from celery import Celery

import resilient_tasks as rt
from resilient_tasks.testing import RedisServer


@pytest.fixture(autouse=True)
def _collect_results_while_redis_is_up() -> Iterator[None]:
    """AsyncResult.__del__ unsubscribes from the result backend; let that happen while
    the test's redis-server still runs, not at interpreter exit (a minute of retries)."""
    yield
    gc.collect()


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
def app_factory(rt_redis_flushed: RedisServer) -> Iterator[Callable[..., Celery]]:
    """Apps a test configures itself (another store URL, a clock...), closed afterwards
    so no result-backend thread outlives the test and its redis-server."""
    made: list[Celery] = []

    def factory(**conf: object) -> Celery:
        made.append(make_app(rt_redis_flushed, **conf))
        return made[-1]

    yield factory
    for app in made:
        app.close()


@pytest.fixture
def store_client(rt_redis_flushed: RedisServer) -> Iterator[object]:
    client = rt_redis_flushed.client(1)
    yield client
    client.close()
