"""Policies validate every field when built, and name the field in the error."""

from __future__ import annotations

import dataclasses

import pytest

import resilient_tasks as rt

BAD = [
    (lambda: rt.RetryPolicy(max_retries=-1), "RetryPolicy.max_retries", ">= 0"),
    (lambda: rt.RetryPolicy(max_retries=1.5), "RetryPolicy.max_retries", "integer"),
    (lambda: rt.RetryPolicy(base=0), "RetryPolicy.base", "> 0"),
    (lambda: rt.RetryPolicy(base=float("nan")), "RetryPolicy.base", "finite"),
    (lambda: rt.RetryPolicy(base=10, cap=1), "RetryPolicy.cap", ">= base"),
    (lambda: rt.RetryPolicy(backoff="linear"), "RetryPolicy.backoff", "one of"),
    (lambda: rt.RetryPolicy(retry_on=("oops",)), "RetryPolicy.retry_on", "not an exception type"),
    (lambda: rt.RetryPolicy(retry_on=42), "RetryPolicy.retry_on", "exception types or a predicate"),
    (lambda: rt.IdempotencyPolicy(key=()), "IdempotencyPolicy.key", "at least one"),
    (lambda: rt.IdempotencyPolicy(key=("order id",)), "IdempotencyPolicy.key", "argument name"),
    (lambda: rt.IdempotencyPolicy(ttl=0), "IdempotencyPolicy.ttl", "> 0"),
    (lambda: rt.IdempotencyPolicy(ttl=10, lease=20), "IdempotencyPolicy.lease", "<= ttl"),
    (lambda: rt.IdempotencyPolicy(on_duplicate="retry"), "IdempotencyPolicy.on_duplicate", "defer, drop"),
    (lambda: rt.BreakerPolicy(failure_rate=0), "BreakerPolicy.failure_rate", "(0, 1]"),
    (lambda: rt.BreakerPolicy(min_calls=0), "BreakerPolicy.min_calls", ">= 1"),
    (lambda: rt.BreakerPolicy(half_open_probes=0), "BreakerPolicy.half_open_probes", ">= 1"),
    (lambda: rt.BreakerPolicy(open_for=30, open_for_max=10), "BreakerPolicy.open_for_max", ">= open_for"),
    (lambda: rt.BreakerPolicy(slow_call_rate=0.5), "BreakerPolicy.slow_call_rate", "slow_call"),
    (lambda: rt.BreakerPolicy(when_open="queue"), "BreakerPolicy.when_open", "defer, fallback, fail"),
    (lambda: rt.FallbackPolicy(key=("k",), decay=1.5), "FallbackPolicy.decay", "(0, 1]"),
    (lambda: rt.FallbackPolicy(key=("k",), ttl=10, floor=20), "FallbackPolicy.floor", "<= ttl"),
    (lambda: rt.FallbackPolicy(key=("k",), function=3), "FallbackPolicy.function", "callable"),
    (lambda: rt.FallbackPolicy(key="message"), "FallbackPolicy.key", "never repeats"),
    (lambda: rt.RetryPolicy(budget=0.2), "RetryPolicy.budget", "RetryBudget"),
    (lambda: rt.RetryBudget(ratio=-1), "RetryBudget.ratio", ">= 0"),
    (lambda: rt.TaskPolicy(deadline=-1), "TaskPolicy.deadline", "> 0"),
    (lambda: rt.TaskPolicy(downstream=""), "TaskPolicy.downstream", "non-empty"),
    (lambda: rt.TaskPolicy(retry=rt.RetryPolicy()), "TaskPolicy.retry", "only idempotent work"),
    (lambda: rt.TaskPolicy(breaker="fast"), "TaskPolicy.breaker", "BreakerPolicy"),
]


@pytest.mark.parametrize(("build", "field", "rule"), BAD, ids=[f for _, f, _ in BAD])
def test_bad_value_names_field_and_rule(build: object, field: str, rule: str) -> None:
    with pytest.raises(rt.PolicyError) as info:
        build()  # type: ignore[operator]
    assert info.value.field == field
    assert rule in str(info.value)


def test_policies_are_frozen_and_replace_revalidates() -> None:
    policy = rt.RetryPolicy()
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.max_retries = 9  # type: ignore[misc]
    assert dataclasses.replace(policy, max_retries=9).max_retries == 9
    with pytest.raises(rt.PolicyError, match="RetryPolicy.base"):
        dataclasses.replace(policy, base=-2)


def test_retry_on_accepts_single_type_list_or_predicate() -> None:
    assert rt.RetryPolicy(retry_on=KeyError).retry_on == (KeyError,)
    assert rt.RetryPolicy(retry_on=[KeyError, OSError]).retry_on == (KeyError, OSError)
    predicate = rt.RetryPolicy(retry_on=lambda exc: "503" in str(exc)).retry_on
    assert callable(predicate)


def test_retry_is_allowed_for_declared_or_deduplicated_work() -> None:
    assert rt.TaskPolicy(idempotent=True, retry=rt.RetryPolicy()).retries_allowed
    assert rt.TaskPolicy(idempotency=rt.IdempotencyPolicy(), retry=rt.RetryPolicy()).retries_allowed
