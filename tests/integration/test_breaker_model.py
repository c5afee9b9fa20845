"""The breaker scripts and the pure-Python model agree on every sequence (Hypothesis).

Same outcomes at the same clock times must give the same admissions, states and
transitions, since the model is what a worker falls back to when Redis is down.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from resilient_tasks.breaker import LocalBreaker, admit_op, parse_admission, record_op, spend_retry_op
from resilient_tasks.policy import BreakerPolicy, RetryBudget
from resilient_tasks.store import RedisStore
from resilient_tasks.testing import RedisServer

T0 = 1_700_000_000_000

policies = st.builds(
    BreakerPolicy,
    failure_rate=st.sampled_from([0.25, 0.5, 1.0]),
    min_calls=st.integers(1, 6),
    window=st.sampled_from([2.0, 5.0, 10.0]),
    buckets=st.integers(1, 5),
    consecutive_failures=st.none() | st.integers(1, 4),
    slow_call=st.just(1.0),  # outcomes below say "slow" themselves
    slow_call_rate=st.none() | st.sampled_from([0.5, 1.0]),
    open_for=st.sampled_from([1.0, 2.0]),
    open_for_max=st.none() | st.just(6.0),
    half_open_probes=st.integers(1, 3),
)
steps = st.lists(
    st.tuples(
        st.sampled_from(["admit", "record", "spend"]),
        st.integers(0, 4),  # which caller
        st.sampled_from(["ok", "fail", "slow", "slowfail", "none"]),
        st.integers(0, 1500),  # ms since the previous step
        st.booleans(),  # first attempt
    ),
    max_size=60,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(policy=policies, sequence=steps)
def test_script_and_model_make_the_same_decisions(
    rt_redis: RedisServer, policy: BreakerPolicy, sequence: list[tuple[str, int, str, int, bool]]
) -> None:
    store = RedisStore(rt_redis.url(4), prefix="model")
    store.client.flushdb()
    model = LocalBreaker(policy)
    budget = RetryBudget(ratio=0.5, min_per_window=1)
    probes: dict[str, bool] = {}
    now = T0
    try:
        for kind, who, outcome, dt, first in sequence:
            now += dt
            owner = f"o{who}"
            if kind == "admit":
                (answer,) = store.run([admit_op(store, "svc", policy, owner, now)])
                ours = parse_admission(answer)
                theirs = model.admit(owner, now)
                assert (ours.verdict, ours.state, ours.retry_after, ours.consecutive_failures) == (
                    theirs.verdict,
                    theirs.state,
                    theirs.retry_after,
                    theirs.consecutive_failures,
                )
                probes[owner] = ours.probe
            elif kind == "record":
                probe = probes.pop(owner, False)
                (answer,) = store.run(
                    [
                        record_op(
                            store, "svc", policy, owner, outcome, probe=probe, first_attempt=first, now_ms=now
                        )
                    ]
                )
                transitioned = model.record(owner, outcome, probe=probe, first_attempt=first, now=now)
                assert _state(answer) == (model.state, transitioned, model.consec)
            else:
                (answer,) = store.run([spend_retry_op(store, "svc", policy, budget, now)])
                assert bool(int(answer[0])) == model.spend_retry(budget, now)
    finally:
        store.close()


def _state(answer: list[Any]) -> tuple[str, bool, int]:
    return answer[0].decode(), bool(int(answer[1])), int(answer[2])


@pytest.mark.parametrize("bad", ["fail", "slow"])
def test_a_success_trips_the_breaker_once_older_successes_leave_the_window(
    rt_redis: RedisServer, bad: str
) -> None:
    """The script skips reading the window for a success when no failure (slow call) is
    inside it; here one is, and the success that drops the old successes out of the window
    must trip the breaker in the script exactly as in the model."""
    if bad == "fail":
        policy = BreakerPolicy(failure_rate=0.5, min_calls=2, window=2.0, buckets=2)
    else:
        policy = BreakerPolicy(failure_rate=1.0, min_calls=2, window=2.0, buckets=2,
                               slow_call=1.0, slow_call_rate=0.5)
    store = RedisStore(rt_redis.url(4), prefix="model-window")
    store.client.flushdb()
    model = LocalBreaker(policy)
    seen = []
    try:
        for outcome, now in [("ok", T0), ("ok", T0), ("ok", T0), (bad, T0 + 1000), ("ok", T0 + 2000)]:
            op = record_op(store, "svc", policy, "o", outcome, probe=False, first_attempt=True, now_ms=now)
            (answer,) = store.run([op])
            transitioned = model.record("o", outcome, probe=False, first_attempt=True, now=now)
            assert _state(answer) == (model.state, transitioned, model.consec)
            seen.append(_state(answer)[:2])
    finally:
        store.close()
    assert seen[:4] == [("closed", False)] * 4  # 1 of 4 calls bad: under the rate
    assert seen[4] == ("open", True)  # 1 of the 2 calls left in the window: at the rate
