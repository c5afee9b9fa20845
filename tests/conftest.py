"""Shared fixtures: a fresh Celery app per test on the session's private redis-server.

DB 0 is the broker, DB 1 the resilience store, DB 2 the result backend, so round trips
to the store can be counted apart from the broker's traffic.
"""

from __future__ import annotations

import gc
import os
import socket
import uuid
from collections.abc import Callable, Iterator

import pytest
from celery import Celery

import resilient_tasks as rt
from resilient_tasks.testing import RedisServer

# Our fixtures (rt_redis, rt_redis_flushed) are opt-in, as in any project that uses them.
pytest_plugins = ["resilient_tasks.testing"]


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


AMQP_URL = os.environ.get("RT_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")


def _amqp_reachable() -> bool:
    host, port = "127.0.0.1", 5672
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(params=["redis", "amqp"])
def app(request: pytest.FixtureRequest, rt_redis_flushed: RedisServer) -> Iterator[Celery]:
    """The core suites run twice: with the Redis broker and with RabbitMQ."""
    if request.param == "redis":
        app = make_app(rt_redis_flushed)
    else:
        if not _amqp_reachable():
            pytest.skip("RabbitMQ is not reachable on 127.0.0.1:5672: the amqp broker leg is skipped")
        app = make_app(rt_redis_flushed)
        app.conf.broker_url = AMQP_URL
        app.conf.task_default_queue = f"rt-test-{uuid.uuid4().hex[:12]}"
        # The worker's event loop sleeps until its next timer: a short heartbeat keeps a
        # timer due, so stopping the in-process worker takes a moment, not ten seconds.
        app.conf.broker_heartbeat = 2
    rt.install(app, redis_url=rt_redis_flushed.url(1))
    yield app
    if request.param == "amqp":
        with app.connection_for_write() as conn:
            conn.default_channel.queue_delete(app.conf.task_default_queue)
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
