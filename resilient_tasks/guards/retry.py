"""Retry guard: jittered, Celery-native retries for the exceptions the policy names.

Costs no Redis round trip; the previous delay rides in a header for decorrelated jitter,
and a ``retry_after`` attribute on the exception (an HTTP Retry-After) is a lower bound.
"""

from __future__ import annotations

import math
from typing import Any

from ..backoff import make_backoff
from ..call import PREV_DELAY_HEADER, Call
from ..policy import matches
from ..schedule import retry
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
        retry(call, exc, retry_delay(call, exc), policy.max_retries)
