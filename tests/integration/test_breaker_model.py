"""The breaker scripts and the pure-Python model agree on every sequence (Hypothesis).

Same outcomes at the same clock times must give the same admissions, states and
transitions, since the model is what a worker falls back to when Redis is down.
"""

from __future__ import annotations

from typing import Any

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


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
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
