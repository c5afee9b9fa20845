"""Re-enqueueing a task, Celery-native: a retry spends an attempt, a deferral does not.

Both refuse to schedule work that would start past the deadline. Nothing here sleeps.
"""

from __future__ import annotations

from typing import Any, NoReturn

from celery.exceptions import Retry

from .call import DEFERRALS_HEADER, OWNER_HEADER, PREV_DELAY_HEADER, Call
from .errors import DeadlineExceeded

__all__ = ["check_deadline", "defer", "retry"]


def check_deadline(call: Call, countdown: float, what: str, cause: BaseException | None) -> None:
    """Raise ``DeadlineExceeded`` when work scheduled ``countdown`` from now would be late."""
    remaining = call.remaining()
    if remaining is not None and countdown >= remaining:
        call.outcome["deadline"] = "exceeded"
        raise DeadlineExceeded(
            f"{what} in {countdown:.2f}s would land past the deadline ({remaining:.2f}s left)"
        ) from cause


def _headers(call: Call, **extra: Any) -> dict[str, Any]:
    headers = dict(call.request.headers or {})
    headers.update(extra)
    if call.deadline is not None:
        headers["rt_deadline"] = call.deadline
    return headers


def retry(call: Call, exc: BaseException, countdown: float, max_retries: int) -> NoReturn:
    """Spend one retry: Celery's own ``Task.retry`` with our headers (owner hand-off)."""
    check_deadline(call, countdown, "retry", exc)
    extra: dict[str, Any] = {PREV_DELAY_HEADER: countdown}
    if call.claim is not None:
        extra[OWNER_HEADER] = call.claim.owner
    call.outcome["retry_delay_s"] = countdown
    raise call.task.retry(
        exc=exc, countdown=countdown, max_retries=max_retries, headers=_headers(call, **extra)
    )


def defer(call: Call, countdown: float, reason: str, cause: BaseException | None = None) -> NoReturn:
    """Re-queue the same message later without spending a retry (counted in a header)."""
    check_deadline(call, countdown, "deferral", cause)
    deferrals = int(call.headers.get(DEFERRALS_HEADER) or 0) + 1
    request = call.request
    signature = call.task.signature_from_request(
        request, countdown=countdown, headers=_headers(call, **{DEFERRALS_HEADER: deferrals})
    )
    signature.apply_async()
    call.outcome["deferred_s"] = countdown
    raise Retry(f"deferred {countdown:.2f}s: {reason}", cause, when=countdown)
