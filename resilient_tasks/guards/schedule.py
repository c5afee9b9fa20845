"""Re-enqueueing a task, Celery-native: a retry spends an attempt, a deferral does not.

Both refuse to schedule work that would start past the deadline. Nothing here sleeps.
"""

from __future__ import annotations

from typing import Any, NoReturn

from celery.exceptions import Retry

from ..errors import DeadlineExceeded
from .base import DEADLINE_HEADER, DEFERRALS_HEADER, OWNER_HEADER, PREV_DELAY_HEADER, Execution

__all__ = ["check_deadline", "defer", "retry"]


def check_deadline(ex: Execution, countdown: float, what: str, cause: BaseException | None) -> None:
    """Raise ``DeadlineExceeded`` when work scheduled ``countdown`` from now would be late."""
    remaining = ex.remaining()
    if remaining is not None and countdown >= remaining:
        ex.outcome.deadline = "exceeded"
        raise DeadlineExceeded(
            f"{what} in {countdown:.2f}s would land past the deadline ({remaining:.2f}s left)"
        ) from cause


def _headers(ex: Execution, **extra: Any) -> dict[str, Any]:
    headers = dict(ex.request.headers or {})
    headers.update(extra)
    if ex.deadline is not None:
        headers[DEADLINE_HEADER] = ex.deadline
    return headers


def retry(ex: Execution, exc: BaseException, countdown: float, max_retries: int) -> NoReturn:
    """Spend one retry: Celery's own ``Task.retry`` with our headers (owner hand-off)."""
    check_deadline(ex, countdown, "retry", exc)
    extra: dict[str, Any] = {PREV_DELAY_HEADER: countdown}
    if ex.claim is not None:
        extra[OWNER_HEADER] = ex.claim.owner
    ex.outcome.retry_delay_s = countdown
    raise ex.task.retry(exc=exc, countdown=countdown, max_retries=max_retries, headers=_headers(ex, **extra))


def defer(ex: Execution, countdown: float, reason: str, cause: BaseException | None = None) -> NoReturn:
    """Re-queue the same message later without spending a retry (counted in a header)."""
    check_deadline(ex, countdown, "deferral", cause)
    deferrals = int(ex.headers.get(DEFERRALS_HEADER) or 0) + 1
    signature = ex.task.signature_from_request(
        ex.request, countdown=countdown, headers=_headers(ex, **{DEFERRALS_HEADER: deferrals})
    )
    signature.apply_async()
    ex.outcome.deferred_s = countdown
    raise Retry(f"deferred {countdown:.2f}s: {reason}", cause, when=countdown)
