"""What each store operation costs Redis: the server commands its script runs, counted
by the server itself (``INFO commandstats`` on a private redis-server), in the paths a
task takes every time.

One Redis runs commands on one thread, so commands per task is what limits a fleet
(issue 15, "lean scripts"). Counts include the ``EVALSHA`` itself. Before the scripts
were made lean (server clock): claim 5, complete 5, release 5, admit 2, record of a
success 5 (a failure 6), cache_get peek 2, cache_put 5; a task with idempotency 10, with
idempotency, breaker and fallback 24. Since leases are the records' own expiry (no
clock read in claim, no expiry set by an early completion): idempotency 7. Since the
record is one string (a fresh claim is one SET NX PX, a completion GET and SET): 5. A count
that goes up here is a regression to explain, not a number to update.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from resilient_tasks.policy import BreakerPolicy
from resilient_tasks.store.protocol import (
    Admit,
    CacheEntry,
    CacheGet,
    CachePut,
    Claim,
    ClaimAnswer,
    Complete,
    CompleteAnswer,
    Op,
    Record,
    Recorded,
    Release,
    Renew,
)
from resilient_tasks.store.redis import RedisStore
from resilient_tasks.testing import RedisServer

from .conftest import T0

POLICY = BreakerPolicy()
NOT_COUNTED = {"info", "config", "config|resetstat"}  # the counting itself


class Counted:
    """A store on a redis-server of its own, and the commands one batch made it run."""

    def __init__(self, server: RedisServer) -> None:
        self.store = RedisStore(server.url(0), prefix="cost")
        self.admin = server.client(0)
        self.store.warm()
        self.store.ping()

    def run(self, ops: Sequence[Op]) -> tuple[list[Any], Counter[str]]:
        self.admin.config_resetstat()
        answers = self.store.batch(ops)
        calls: Counter[str] = Counter()
        for name, stats in self.admin.info("commandstats").items():
            command = name.removeprefix("cmdstat_")
            if command not in NOT_COUNTED:
                calls[command] = int(stats["calls"])
        return answers, calls

    def cost(self, op: Op) -> Counter[str]:
        return self.run([op])[1]


@pytest.fixture(scope="module")
def counted() -> Iterator[Counted]:
    with RedisServer() as server:  # a private server: no other client's commands counted
        counted = Counted(server)
        counted.run([Claim("warm-up", "w", 1000, 60_000)])  # the connection's epoch check
        yield counted
        counted.store.close()
        counted.admin.close()


def c(**calls: int) -> Counter[str]:
    return Counter({"evalsha": 1, **calls})


# now_ms 0: the server's clock (TIME), as workers run; or a clock the caller gives
SERVER, GIVEN = 0, T0


@pytest.mark.parametrize("now", [SERVER, GIVEN], ids=["server-clock", "given-clock"])
def test_the_idempotency_path(counted: Counted, now: int) -> None:
    key = f"idem-{now}"
    answers, claim = counted.run([Claim(key, "a", 1000, 60_000, "fp", "tid", now_ms=now)])
    assert answers == [ClaimAnswer("claimed", 1)]
    assert claim == c(set=1), "claim of a fresh key: one SET NX PX (the lease is the expiry)"
    answers, complete = counted.run([Complete(key, "a", 1, '"r"', 60_000, now, refresh=False)])
    assert answers == [CompleteAnswer(True)]
    assert complete == c(get=1, set=1), "complete: read the head, write keeping the expiry"
    answers, in_flight = counted.run([Claim(f"{key}-f", "a", 1000, 60_000, now_ms=now),
                                      Claim(f"{key}-f", "b", 1000, 60_000, now_ms=now)])  # fmt: skip
    assert answers[1].verdict == "in_flight"
    assert in_flight == c(evalsha=2, set=2, get=1, pttl=1), "a duplicate's SET NX fails; it reads the lease's PTTL"
    answers, renew = counted.run([Renew(f"{key}-f", "a", 1, 1000, 60_000, now)])
    assert answers == [True] and renew == c(get=1, pexpire=1), "the heartbeat: read, expire"
    answers, late = counted.run([Complete(f"{key}-f", "a", 1, '"r"', 60_000, now, refresh=True)])
    assert answers == [CompleteAnswer(True)] and late == c(get=1, set=1), "past half the lease: SET PX, no more"
    answers, replay = counted.run([Claim(key, "b", 1000, 60_000, "fp", now_ms=now)])
    assert answers == [ClaimAnswer("done", 1, '"r"')] and replay == c(set=1, get=1), "a replay: a refused SET NX, a read"
    counted.run([Claim(f"{key}-r", "a", 1000, 60_000, now_ms=now)])
    answers, release = counted.run([Release(f"{key}-r", "a", 1, 60_000)])
    assert answers == [True] and release == c(get=1, set=1), "release: read, SET PX"
    assert sum((claim + complete).values()) == 5  # was 10 (8 with a given clock), then 9 (8), then 7


@pytest.mark.parametrize("now", [SERVER, GIVEN], ids=["server-clock", "given-clock"])
def test_the_breaker_path(counted: Counted, now: int) -> None:
    time = {"time": 1} if now == SERVER else {}
    name = f"svc-{now}"
    counted.run([Admit(name, POLICY, "a", now)])  # the record is made
    assert counted.cost(Admit(name, POLICY, "a", now)) == c(hmget=1), "a closed breaker admits on one read"
    answers, first = counted.run([Record(name, POLICY, "a", ok=1, first_attempts=1, now_ms=now)])
    assert answers == [Recorded("closed", False, 0)]
    assert first == c(hmget=1, hset=1, pexpire=1, **time), "the first record of an interval renews the TTL"
    answers, success = counted.run([Record(name, POLICY, "a", ok=1, first_attempts=1, now_ms=now)])
    assert answers == [Recorded("closed", False, 0)]
    assert success == c(hmget=1, hset=1, **time), "a success in a clean window: read, clock, write"
    answers, failure = counted.run([Record(name, POLICY, "a", fail=1, first_attempts=1, now_ms=now)])
    assert answers == [Recorded("closed", False, 1)]
    assert failure == c(hmget=1, hset=1, **time), "a failure reads the window with the record"
    answers, after = counted.run([Record(name, POLICY, "a", ok=1, now_ms=now)])
    assert answers == [Recorded("closed", False, 0)]
    assert after == c(hmget=2, hset=1, **time), "a success with a failure in the window reads it"


@pytest.mark.parametrize("now", [SERVER, GIVEN], ids=["server-clock", "given-clock"])
def test_the_fallback_path(counted: Counted, now: int) -> None:
    """Workers send their own clock to the cache ops (``guards.fallback._now_ms``): a
    peek is then a plain HMGET, no script."""
    time = {"time": 1} if now == SERVER else {}
    peeked = c(hmget=1) if now == SERVER else Counter(hmget=1)
    key = f"fb-{now}"
    answers, peek = counted.run([CacheGet(key, now_ms=now)])
    assert answers == [CacheEntry()] and peek == peeked, "a peek at nothing: one read, no clock"
    answers, put = counted.run([CachePut(key, "v", "ok", 60_000, now)])
    assert answers == [True] and put == c(hset=1, pexpire=1, **time), "a value is written without a DEL"
    answers, peek_held = counted.run([CacheGet(key, now_ms=now)])
    assert answers[0].kind is None and answers[0].good_age_ms >= 0
    assert peek_held == peeked + Counter(time), "the age of the value held: the server's clock, or none"


def wall_ms() -> int:
    return int(time.time() * 1000)


def test_a_task_with_idempotency_breaker_and_fallback(counted: Counted) -> None:
    """begin: claim, admit, cache_get (a peek); end: complete, record, cache_put; each
    one round trip, as a worker sends them (the server's clock for the idempotency record
    and the breaker, the worker's for the cache)."""
    p = POLICY
    counted.run([Admit("task-svc", p, "a"), Record("task-svc", p, "a", ok=1)])  # a breaker in use
    _, begin = counted.run(
        [Claim("task", "a", 1000, 60_000, "fp"), Admit("task-svc", p, "a"), CacheGet("task", now_ms=wall_ms())]
    )
    _, end = counted.run([Complete("task", "a", 1, '"r"', 60_000, refresh=False),
                          Record("task-svc", p, "a", ok=1),
                          CachePut("task", "v", "ok", 60_000, wall_ms())])  # fmt: skip
    assert sum(begin.values()) == 2 + 2 + 1  # the claim was 4 with a hash record
    # (a record that starts a bucket's interval renews the TTL: one more)
    assert sum(end.values()) in (3 + 4 + 3, 3 + 5 + 3)  # was 24 in all


def test_the_same_task_when_its_entry_is_fresh_and_successes_are_flushed_apart(counted: Counted) -> None:
    """A process that admits from its own view of a closed breaker and flushes its
    successes now and then sends no admit nor record for most tasks; an entry whose
    good value is still fresh (``good_age_ms``) is not written again. What is left of a
    task: claim and a peek that tells the value's age, then complete."""
    counted.run([CachePut("fresh", "v", "ok", 60_000, wall_ms())])
    answers, begin = counted.run([Claim("fresh", "a", 1000, 60_000, "fp"), CacheGet("fresh", now_ms=wall_ms())])
    assert answers[1].good_age_ms >= 0
    _, end = counted.run([Complete("fresh", "a", 1, '"r"', 60_000, refresh=False)])
    assert sum(begin.values()) + sum(end.values()) == 2 + 1 + 3


def test_a_breakers_ttl_is_renewed_when_an_interval_starts_not_on_every_call(counted: Counted) -> None:
    """The price of a record without PEXPIRE: a breaker lives its TTL (a day at least,
    and four windows) past the first record of its latest bucket interval, its creation
    or its latest transition, instead of past its latest record."""
    p = BreakerPolicy(window=10.0, buckets=5, consecutive_failures=3)  # 2 s intervals
    key = counted.store.breaker_key("ttl-svc")
    ttl = 86_400_000
    counted.run([Record("ttl-svc", p, "a", ok=1, now_ms=T0)])
    assert counted.admin.pttl(key) > ttl - 60_000
    counted.admin.pexpire(key, 50_000)
    counted.run(
        [Record("ttl-svc", p, "a", ok=1, now_ms=T0 + 1), Record("ttl-svc", p, "a", fail=1, now_ms=T0 + 2)]
    )
    assert counted.admin.pttl(key) <= 50_000, "the same interval: not renewed"
    counted.run([Record("ttl-svc", p, "a", ok=1, now_ms=T0 + 2_000)])
    assert counted.admin.pttl(key) > ttl - 60_000, "a new interval: renewed"
    counted.admin.pexpire(key, 50_000)
    counted.run([Record("ttl-svc", p, "a", fail=1, now_ms=T0 + 2_001 + i) for i in range(2)])
    assert counted.admin.pttl(key) <= 50_000
    (answer,) = counted.store.batch([Record("ttl-svc", p, "a", fail=1, now_ms=T0 + 2_100)])
    assert answer == Recorded("open", True, 3)
    assert counted.admin.pttl(key) > ttl - 60_000, "a transition: renewed"
