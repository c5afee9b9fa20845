"""Deadline guard: never start work whose absolute deadline has passed.

The deadline is carried in the ``rt_deadline`` header through retries, deferrals and
child tasks (see ``runtime``'s publish hook), so the whole job shares one clock.
"""

from __future__ import annotations

from typing import Any

from ..call import Call, current_deadline
from ..errors import DeadlineExceeded
from . import Next

__all__ = ["deadline_guard"]


def deadline_guard(call: Call, next: Next) -> Any:
    remaining = call.remaining()
    if remaining is not None and remaining <= 0:
        call.outcome["deadline"] = "exceeded"
        raise DeadlineExceeded(f"deadline passed {-remaining:.2f}s ago; the task was not run")
    token = current_deadline.set(call.deadline)
    try:
        return next(call)
    finally:
        current_deadline.reset(token)
