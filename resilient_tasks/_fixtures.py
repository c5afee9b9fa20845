"""The pytest fixtures that ``resilient_tasks.testing`` offers as a plugin.

Kept apart so ``resilient_tasks.testing`` imports without pytest (the demo uses it).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # imported when a fixture runs: ``testing`` imports this module
    from .testing import RedisServer

__all__ = ["rt_redis", "rt_redis_flushed"]


@pytest.fixture(scope="session")
def rt_redis() -> Iterator[RedisServer]:
    """A redis-server of our own on a free loopback port, for the whole session."""
    from .testing import RedisServer

    with RedisServer() as server:
        yield server


@pytest.fixture
def rt_redis_flushed(rt_redis: RedisServer) -> RedisServer:
    """The session's private server, emptied (it is ours: nobody else's data is lost)."""
    client = rt_redis.client()
    try:
        client.flushall()
    finally:
        client.close()
    return rt_redis
