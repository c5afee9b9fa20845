"""``MemoryStore`` and the Lua scripts make the same breaker decisions and keep the same
fallback entries (Hypothesis).

Same operations at the same clock times must give the same admissions, states,
transitions and budget answers: the memory store is what a worker falls back to when
Redis is down, and the contract suite only samples the space this test walks.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from resilient_tasks.policy import BreakerPolicy, RetryBudget
from resilient_tasks.store.memory import MemoryStore
from resilient_tasks.store.protocol import Admit, CacheGet, CachePut, Record, SpendRetry, Switch
from resilient_tasks.store.redis import RedisStore
from resilient_tasks.testing import RedisServer

from .conftest import T0

policies = st.builds(
    BreakerPolicy,
    failure_rate=st.sampled_from([0.25, 0.5, 1.0]),
    min_calls=st.integers(1, 6),
    window=st.sampled_from([2.0, 5.0, 10.0]),
    buckets=st.integers(1, 5),
    consecutive_failures=st.none() | st.integers(1, 4),
    slow_call=st.just(1.0),  # the steps below say "slow" themselves
    slow_call_rate=st.none() | st.sampled_from([0.5, 1.0]),
    open_for=st.sampled_from([1.0, 2.0]),
    open_for_max=st.none() | st.just(6.0),
    half_open_probes=st.integers(1, 3),
)
one_call = st.sampled_from([{"ok": 1}, {"fail": 1}, {"slow": 1}, {"slowfail": 1}, {}])
flush = st.fixed_dictionaries(
    {},
    optional={name: st.integers(0, 3) for name in ("ok", "fail", "slow", "slowfail", "first_attempts")},
)
# mostly one call (a probe's or a failure's record), sometimes a process's flush of many
counts = st.one_of(one_call, one_call, one_call, flush)
first = st.fixed_dictionaries({"first_attempts": st.integers(0, 1)})
outcomes = st.tuples(counts, first).map(lambda pair: {**pair[1], **pair[0]})
steps = st.lists(
    st.tuples(
        st.sampled_from(["call"] * 4 + ["admit", "record", "spend", "switch"]),
        st.integers(0, 2),  # which caller
        outcomes,
        st.sampled_from([0, 1, 10, 100, 500, 1000, 1500, 2000]),  # ms since the previous step
        st.sampled_from(["normal"] * 3 + ["forced_open", "breaker_disabled", "close", "reset"]),
    ),
    max_size=60,
)


@pytest.fixture(scope="module")
def redis_store(rt_redis: RedisServer) -> Iterator[RedisStore]:
    store = RedisStore(rt_redis.url(4), prefix="model")
    yield store
    store.close()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(policy=policies, sequence=steps, ratio=st.sampled_from([0.0, 0.5, 1.0]))
def test_memory_and_redis_make_the_same_decisions(
    redis_store: RedisStore,
    policy: BreakerPolicy,
    sequence: list[tuple[str, int, dict[str, int], int, str]],
    ratio: float,
) -> None:
    # a downstream of its own per example: no flush, and the epoch marker stays
    name = f"svc-{id(sequence)}-{T0}"
    redis_store.batch([Switch(name, "reset", now_ms=T0)])
    memory = MemoryStore()
    memory.batch([Switch(name, "reset", now_ms=T0)])
    budget = RetryBudget(ratio=ratio, min_per_window=1)
    probes: dict[str, bool] = {}
    now = T0
    for kind, who, outcome, dt, mode in sequence:
        now += dt
        owner = f"o{who}"
        if kind in ("admit", "call"):
            ops: list[object] = [Admit(name, policy, owner, now)]
        elif kind == "record":
            ops = [Record(name, policy, owner, probe=probes.pop(owner, False), now_ms=now, **outcome)]
        elif kind == "spend":
            ops = [SpendRetry(name, policy, budget, now)]
        else:
            ops = [Switch(name, mode, now_ms=now)]  # type: ignore[arg-type]
        if kind == "call":  # a task: admitted, then its outcome recorded (a probe's too)
            admission = memory.batch(ops)[0]  # type: ignore[arg-type]
            assert redis_store.batch(ops) == [admission]  # type: ignore[arg-type]
            if not admission.allowed:
                continue
            ops = [Record(name, policy, owner, probe=admission.probe, now_ms=now + 1, **outcome)]
        ours = redis_store.batch(ops)  # type: ignore[arg-type]
        theirs = memory.batch(ops)  # type: ignore[arg-type]
        assert ours == theirs, (kind, ops)
        if kind == "admit":
            probes[owner] = ours[0].probe
    (view,) = [v for v in memory.breakers() if v.downstream == name]
    assert view.fields["state"] == next(v for v in redis_store.breakers() if v.downstream == name).fields["state"]


@pytest.mark.parametrize("bad", ["fail", "slow"])
def test_a_success_trips_the_breaker_once_older_successes_leave_the_window(
    redis_store: RedisStore, bad: str
) -> None:
    """The script skips reading the window for a success when no failure (slow call) is
    inside it; here one is, and the success that drops the old successes out of the
    window must trip the breaker in the script exactly as in memory."""
    if bad == "fail":
        policy = BreakerPolicy(failure_rate=0.5, min_calls=2, window=2.0, buckets=2)
    else:
        policy = BreakerPolicy(failure_rate=1.0, min_calls=2, window=2.0, buckets=2, slow_call=1.0, slow_call_rate=0.5)
    name = f"window-{bad}"
    memory = MemoryStore()
    seen = []
    for outcome, now in [("ok", T0), ("ok", T0), ("ok", T0), (bad, T0 + 1000), ("ok", T0 + 2000)]:
        op = Record(name, policy, "o", now_ms=now, first_attempts=1, **{outcome: 1})
        (ours,) = redis_store.batch([op])
        (theirs,) = memory.batch([op])
        assert ours == theirs
        seen.append((ours.state, ours.transitioned))
    assert seen[:4] == [("closed", False)] * 4  # 1 of 4 calls bad: under the rate
    assert seen[4] == ("open", True)  # 1 of the 2 calls left in the window: at the rate


# -- the fallback cache ------------------------------------------------------------------------

# times and bounds in whole seconds (ttl a multiple of 8 s: decayed up to 3 times, still whole),
# so an entry served has a second of life left at least: no TTL runs out on the real clock
cache_steps = st.lists(
    st.one_of(
        st.tuples(
            st.just("put"),
            st.sampled_from(["ok", "ok", "negative", "failure"]),
            st.sampled_from([8_000, 64_000]),  # ttl
        ),
        st.tuples(
            st.just("get"),
            st.booleans(),  # serve
            st.tuples(
                st.integers(0, 3),  # failures
                st.sampled_from([8_000, 64_000]),  # ttl
                st.sampled_from([1_000, 8_000]),  # floor
                st.sampled_from([0, 4_000, 16_000]),  # max_stale
            ),
        ),
        st.tuples(st.just("wait"), st.sampled_from([0, 1_000, 5_000, 20_000]), st.just(0)),
    ),
    max_size=30,
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sequence=cache_steps)
def test_memory_and_redis_keep_the_same_fallback_entries(
    redis_store: RedisStore, sequence: list[tuple[Any, ...]]
) -> None:
    record = f"entry-{uuid.uuid4().hex}"
    memory = MemoryStore()
    now = T0
    for n, (kind, a, b) in enumerate(sequence):
        if kind == "wait":
            now += a
            continue
        if kind == "put":
            op: CachePut | CacheGet = CachePut(record, f"v{n}", a, b, now)
        else:
            failures, ttl, floor, max_stale = b
            op = CacheGet(record, a, failures, ttl, 0.5, floor, max_stale, now)
        assert redis_store.batch([op]) == memory.batch([op]), (op, sequence)
