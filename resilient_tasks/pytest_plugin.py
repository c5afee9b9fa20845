"""pytest fixtures over ``resilient_tasks.testing`` (loaded as a pytest11 plugin).

``rt_redis`` is one private redis-server per session; ``rt_redis_flushed`` empties that
server (and only that server) before a test.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .testing import RedisServer


@pytest.fixture(scope="session")
def rt_redis() -> Iterator[RedisServer]:
    """A redis-server of our own on a free loopback port, for the whole session."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def rt_redis_flushed(rt_redis: RedisServer) -> RedisServer:
    """The session's private server, emptied (it is ours: nobody else's data is lost)."""
    client = rt_redis.client()
    client.flushall()
    client.close()
    return rt_redis
