"""``RedisStore`` through Redis Sentinel: a master, a replica, three sentinels (quorum 2)
on loopback, and failovers in the middle of a stream of batches.

What a failover does to the records (printed with ``-s``):

- SIGKILL of the master: batches fail (``StoreUnavailable``) until the sentinels agree
  and promote the replica (about two seconds with ``down-after-milliseconds 1000``);
  the replica was in sync, so nothing acknowledged is lost.
- ``SENTINEL FAILOVER``: the replica is promoted while the old master goes on accepting
  writes until the sentinels demote it (some ten seconds later). The store asks the
  sentinels where the master is every second and moves within about a second of their
  answer; what the old master acknowledged in between (about 1.3 s of writes here) is
  lost. A claim lost that way lets a duplicate run, a lost result makes one re-run.

The epoch marker is replicated like any key, so a failover is not taken for amnesia.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import redis

from resilient_tasks.errors import StoreUnavailable
from resilient_tasks.store.protocol import Claim, ClaimAnswer, Complete, CompleteAnswer
from resilient_tasks.store.redis import RedisStore
from resilient_tasks.testing import SentinelServers

from .conftest import T0


@pytest.fixture(scope="module")
def sentinels() -> Iterator[SentinelServers]:
    with SentinelServers(3, down_after_ms=1000, failover_timeout_ms=5000) as servers:
        yield servers


@dataclass
class Stream:
    """Batches sent one after another from a thread: what was acknowledged, and when
    the store was unavailable."""

    store: RedisStore
    acked: list[tuple[str, float]] = field(default_factory=list)
    failures: list[float] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self, tag: str) -> None:
        n = 0
        while not self.stop.is_set():
            record = f"{tag}-{n}"
            n += 1
            try:
                claimed, stored = self.store.batch(
                    [Claim(record, "w", 30_000, 600_000), Complete(record, "w", 1, '"ok"', 600_000)]
                )
            except StoreUnavailable:
                self.failures.append(time.monotonic())
                time.sleep(0.05)
                continue
            assert claimed == ClaimAnswer("claimed", 1) and stored == CompleteAnswer(True), (claimed, stored)
            self.acked.append((record, time.monotonic()))
            time.sleep(0.005)


def _through_a_failover(
    sentinels: SentinelServers, store: RedisStore, *, kill: bool, tag: str
) -> dict[str, float]:
    """Batches before, during and after a failover; then which acknowledged records the
    new master holds."""
    stream = Stream(store)
    thread = threading.Thread(target=stream.run, args=(tag,))
    thread.start()
    try:
        time.sleep(0.5)
        started = time.monotonic()
        _, new = sentinels.failover(kill=kill)
        switched = time.monotonic()
        time.sleep(3.0)
    finally:
        stream.stop.set()
        thread.join()
    master = redis.Redis(host=new[0], port=new[1], db=1)
    kept = {r: (master.get(f"rt:idem:{{{r}}}") or b"").startswith(b"done\n") for r, _ in stream.acked}
    master.close()
    outage = [at for at in stream.failures if at >= started]
    # the first batch after the failover (and after the last failed one) from which every
    # acknowledged record is on the new master
    since = max([started, *outage])
    settled = next(
        at for i, (_, at) in enumerate(stream.acked) if at >= since and all(kept[r] for r, _ in stream.acked[i:])
    )
    lost = [at for r, at in stream.acked if not kept[r]]
    summary = {
        "acked": len(stream.acked),
        "acked_before_failover": sum(1 for _, at in stream.acked if at < started),
        "lost_before_failover": sum(1 for at in lost if at < started),
        "lost": len(lost),
        "lost_window_s": round(max(lost) - min(lost), 2) if lost else 0.0,
        "failed_batches": len(outage),
        "unavailable_s": round(max(outage) - min(outage), 2) if outage else 0.0,
        "sentinels_agreed_s": round(switched - started, 2),
        "on_new_master_after_agreement_s": round(settled - switched, 2),
    }
    print(f"\nfailover ({'SIGKILL of the master' if kill else 'SENTINEL FAILOVER'}): {summary}")
    return summary


def test_a_sentinel_store_serves_batches_and_survives_failovers(sentinels: SentinelServers) -> None:
    store = RedisStore(sentinels.url(1), socket_timeout=1)
    assert store.batch([Claim("first", "a", 1000, 60_000, now_ms=T0)]) == [ClaimAnswer("claimed", 1)]
    assert "sentinel 'mymaster'" in store.where

    killed = _through_a_failover(sentinels, store, kill=True, tag="killed")
    assert killed["on_new_master_after_agreement_s"] <= 3, killed
    assert killed["failed_batches"] > 0, "the master was gone until the sentinels agreed"

    sentinels.revive()  # the killed server comes back as a replica: a failover needs one
    graceful = _through_a_failover(sentinels, store, kill=False, tag="graceful")
    assert graceful["on_new_master_after_agreement_s"] <= 3, graceful
    # Records acknowledged before a SENTINEL FAILOVER are usually on the new master, but
    # Redis does not promise it (replication is asynchronous and the command does not wait
    # for the replica's offset): one run in a few lost them all. Reported, not asserted;
    # docs/RELIABILITY.md ("Sentinel failover") gives the figures and the advice.
    print(f"acknowledged before the failover and lost: {graceful['lost_before_failover']}")
    assert graceful["failed_batches"] == 0, "the old master kept answering: no batch failed"
    assert store.amnesia_detections == 0, "the epoch marker was replicated: a failover is not amnesia"
    store.close()


def test_sentinels_by_argument(sentinels: SentinelServers) -> None:
    store = RedisStore(sentinels=sentinels.addresses, service_name=sentinels.service_name, db=2)
    assert store.batch([Claim("arg", "a", 1000, 60_000, now_ms=T0)]) == [ClaimAnswer("claimed", 1)]
    assert store.now_ms() > 0
    store.ping()
    store.close()
    wrong = RedisStore(sentinels=sentinels.addresses, service_name="no-such-master", socket_timeout=0.5)
    with pytest.raises(StoreUnavailable, match="No master found"):
        wrong.batch([Claim("x", "a", 1000, 60_000)])


def test_a_sentinel_managed_connection_checks_the_epoch_too(sentinels: SentinelServers) -> None:
    """The connect check runs on connections a Sentinel pool makes: a master that lost
    its data (here flushed) is noticed by the next connection, and claims fail closed."""
    store = RedisStore(sentinels.url(3), amnesia_window_ms=60_000)
    assert store.batch([Claim("e", "a", 1000, 60_000, now_ms=T0)]) == [ClaimAnswer("claimed", 1)]
    address = sentinels.master_address()
    assert address is not None
    master = redis.Redis(host=address[0], port=address[1], db=3)
    assert master.exists("rt:meta:{epoch}") and master.pttl("rt:meta:{epoch}") > 0
    master.flushdb()
    master.client_kill_filter(_type="normal", skipme=True)
    (answer,) = store.batch([Claim("e", "b", 1000, 60_000, now_ms=T0)])
    assert answer.verdict == "amnesia" and store.amnesia_detections == 1
    master.delete("rt:meta:{epoch}:amnesia")
    master.close()
    store.close()
