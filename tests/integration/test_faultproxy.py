"""The fault proxy itself, against a real redis-server: each toxic does what it says."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from resilient_tasks.testing import FaultProxy, RedisServer


@pytest.fixture
def proxy(rt_redis_flushed: RedisServer) -> Iterator[FaultProxy]:
    with FaultProxy(rt_redis_flushed.port) as p:
        yield p


def client(proxy: FaultProxy) -> redis.Redis:
    return redis.Redis(
        port=proxy.port, socket_timeout=0.5, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0)
    )


def test_passes_traffic_and_adds_latency(proxy: FaultProxy) -> None:
    c = client(proxy)
    assert c.ping()
    proxy.latency(150, 0)
    started = time.monotonic()
    c.set("k", "v")
    assert time.monotonic() - started >= 0.15 * 2 - 0.01  # request and reply each delayed
    proxy.clear()
    assert c.get("k") == b"v"


def test_blackhole_times_out_then_recovers(proxy: FaultProxy) -> None:
    c = client(proxy)
    c.ping()
    proxy.blackhole(1.0)
    with pytest.raises(redis.TimeoutError):
        c.ping()
    time.sleep(1.0)
    c2 = client(proxy)  # the old connection holds a half-read reply: a new one is clean
    assert c2.ping()
    assert proxy.faults.counts["blackholed"] >= 1


def test_cut_replies_and_resets_fail_the_call(proxy: FaultProxy) -> None:
    c = client(proxy)
    c.set("big", "x" * 10_000)
    proxy.cut_replies(1.0)
    with pytest.raises((redis.ConnectionError, redis.TimeoutError)):
        c.get("big")
    proxy.clear()
    proxy.resets(1.0)
    with pytest.raises(redis.ConnectionError):
        client(proxy).get("big")
    proxy.clear()
    assert client(proxy).get("big") == b"x" * 10_000
    assert proxy.faults.counts["cut"] >= 1 and proxy.faults.counts["reset"] >= 1
