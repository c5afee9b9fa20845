"""Fixtures for the store suites: every contract test runs on ``MemoryStore`` and on
``RedisStore`` (a private redis-server), some on a 3-master Redis Cluster too.

The cluster is started once per session (it takes seconds); each test there gets its own
key prefix instead of a flush.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from resilient_tasks.store.memory import MemoryStore
from resilient_tasks.store.protocol import Store
from resilient_tasks.store.redis import RedisStore
from resilient_tasks.testing import ClusterServers, RedisServer

#: An injected clock, in ms: every contract test sends its own times.
T0 = 1_700_000_000_000


@dataclass
class Backend:
    """A store under test, and a look at the raw keys it wrote (none for memory)."""

    kind: str
    store: Store
    keys: Callable[[], dict[str, int]]  # key -> PTTL in ms


@pytest.fixture(scope="session")
def cluster() -> Iterator[ClusterServers]:
    with ClusterServers(3) as servers:
        yield servers


def _server_keys(clients: list[Any], prefix: str) -> Callable[[], dict[str, int]]:
    def keys() -> dict[str, int]:
        found = {}
        for client in clients:
            for key in client.scan_iter(match=f"{prefix}:*", count=1000):
                found[key.decode()] = client.pttl(key)
        return found

    return keys


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    kind = request.param
    if kind == "memory":
        yield Backend(kind, MemoryStore(), dict)
        return
    if kind == "redis":
        server: RedisServer = request.getfixturevalue("rt_redis_flushed")
        store = RedisStore(server.url(1), prefix="rt")
        store.warm()  # as a worker does when it starts (an earlier test may have flushed them)
        client = server.client(1)
        try:
            yield Backend(kind, store, _server_keys([client], "rt"))
        finally:
            store.close()
            client.close()
        return
    servers: ClusterServers = request.getfixturevalue("cluster")
    prefix = f"c{uuid.uuid4().hex[:10]}"
    store = RedisStore(servers.url, cluster=True, prefix=prefix)
    store.warm()
    clients = [node.client() for node in servers.nodes]
    try:
        yield Backend(kind, store, _server_keys(clients, prefix))
    finally:
        store.close()
        for client in clients:
            client.close()


@pytest.fixture
def store(backend: Backend) -> Store:
    return backend.store
