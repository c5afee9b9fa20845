"""Retry guard: jittered, Celery-native retries for the exceptions the policy names.

A retry costs no Redis round trip unless the task names a downstream, whose fleet-wide
retry budget is then spent in one script. The previous delay rides in a header for decorrelated jitter,
and a ``retry_after`` attribute on the exception (an HTTP Retry-After) is a lower bound.
"""

from __future__ import annotations

import math
from typing import Any

from ..backoff import make_backoff
from ..call import PREV_DELAY_HEADER, Call
from ..errors import RetryBudgetExhausted, StoreUnavailable
from ..policy import matches
from ..schedule import check_deadline, retry
from ..store.protocol import SpendRetry
from . import PASS_THROUGH, Next

__all__ = ["retry_delay", "retry_guard"]


def retry_delay(call: Call, exc: BaseException) -> float:
    """The countdown for the next retry of ``call`` after ``exc``."""
    policy = call.policy.retry
    assert policy is not None
    previous = call.headers.get(PREV_DELAY_HEADER)
    strategy = make_backoff(policy.backoff, policy.base, policy.cap)
    delay = strategy(call.attempt, float(previous) if previous is not None else None)
    hint = getattr(exc, "retry_after", None)
    if isinstance(hint, (int, float)) and not isinstance(hint, bool) and math.isfinite(hint):
        delay = max(delay, float(hint))
    return max(0.0, delay)


def retry_guard(call: Call, next: Next) -> Any:
    try:
        return next(call)
    except PASS_THROUGH:
        raise
    except Exception as exc:
        policy = call.policy.retry
        if policy is None or not matches(policy.retry_on, exc):
            raise
        if call.attempt >= policy.max_retries:
            call.outcome["retry"] = "exhausted"
            raise
        delay = retry_delay(call, exc)
        check_deadline(call, delay, "retry", exc)  # before taking a fleet-wide budget slot
        _spend_budget(call, exc)
        retry(call, exc, delay, policy.max_retries)


def _spend_budget(call: Call, exc: Exception) -> None:
    """Take one retry from the downstream's fleet-wide budget, or stop retrying."""
    policy = call.policy.retry
    name = call.policy.downstream
    if policy is None or policy.budget is None or name is None:
        return
    breaker = call.runtime.breaker_policy(name, call.policy)
    try:
        (answer,) = call.runtime.store.batch(
            [SpendRetry(name, breaker, policy.budget, call.runtime.now_ms())]
        )
    except StoreUnavailable:
        local_now = int(call.runtime.clock() * 1000)
        (answer,) = call.runtime.local.batch([SpendRetry(name, breaker, policy.budget, local_now)])
    granted = answer.granted
    if not granted:
        call.outcome["retry"] = "budget_exhausted"
        call.runtime.count("budget_exhausted", name)
        raise RetryBudgetExhausted(
            f"retry budget for {name!r} is spent ({policy.budget.ratio:g} x first attempts "
            f"+ {policy.budget.min_per_window} per window)"
        ) from exc
