"""Retry guard: jittered, Celery-native retries for the exceptions the policy names.

A retry costs no round trip unless the task names a downstream, whose fleet-wide retry
budget is then spent in one script. The previous delay rides in a header for
decorrelated jitter, and a ``retry_after`` attribute on the exception (an HTTP
Retry-After) is a lower bound.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from ..backoff import make_backoff
from ..errors import RetryBudgetExhausted, StoreUnavailable
from ..policy import RetryPolicy, matches
from ..store.protocol import SpendRetry
from .base import PREV_DELAY_HEADER, Execution, Guard, Stage, pass_through
from .schedule import check_deadline, retry

__all__ = ["RetryGuard", "retry_delay"]


def retry_delay(ex: Execution, policy: RetryPolicy, exc: BaseException) -> float:
    """The countdown for the next retry of ``ex`` after ``exc``."""
    previous = ex.headers.get(PREV_DELAY_HEADER)
    strategy = make_backoff(policy.backoff, policy.base, policy.cap)
    delay = strategy(ex.attempt, float(previous) if previous is not None else None)
    hint = getattr(exc, "retry_after", None)
    if isinstance(hint, (int, float)) and not isinstance(hint, bool) and math.isfinite(hint):
        delay = max(delay, float(hint))
    return max(0.0, delay)


class RetryGuard(Guard):
    stage = Stage.BODY

    def __init__(self, ex: Execution) -> None:
        policy = ex.policy.retry
        assert policy is not None
        self.policy = policy

    def around(self, ex: Execution, proceed: Callable[[], Any]) -> Any:
        try:
            return proceed()
        except pass_through():
            raise
        except Exception as exc:
            policy = self.policy
            if not matches(policy.retry_on, exc):
                raise
            if ex.attempt >= policy.max_retries:
                ex.outcome.retry = "exhausted"
                raise
            delay = retry_delay(ex, policy, exc)
            check_deadline(ex, delay, "retry", exc)  # before taking a fleet-wide budget slot
            self._spend_budget(ex, exc)
            retry(ex, exc, delay, policy.max_retries)

    def _spend_budget(self, ex: Execution, exc: Exception) -> None:
        """Take one retry from the downstream's fleet-wide budget, or stop retrying."""
        budget, name = self.policy.budget, ex.policy.downstream
        if budget is None or name is None:
            return
        breaker = ex.runtime.breaker_policy(name, ex.task, ex.policy)
        try:
            (answer,) = ex.runtime.store.batch([SpendRetry(name, breaker, budget, ex.runtime.now_ms())])
        except StoreUnavailable:
            local_now = int(ex.runtime.clock() * 1000)
            (answer,) = ex.runtime.local.batch([SpendRetry(name, breaker, budget, local_now)])
        if not answer.granted:
            ex.outcome.retry = "budget_exhausted"
            ex.runtime.count("budget_exhausted", name)
            raise RetryBudgetExhausted(
                f"retry budget for {name!r} is spent ({budget.ratio:g} x first attempts "
                f"+ {budget.min_per_window} per window)"
            ) from exc
