"""Deadline guard: never start work whose absolute deadline has passed.

The deadline is carried in the ``rt_deadline`` header through retries, deferrals and
child tasks (the runtime's publish hook), so the whole job shares one clock.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ..errors import DeadlineExceeded
from .base import RUN, Decision, Execution, Guard, Kind, Stage, current_deadline

__all__ = ["DeadlineGuard"]


class DeadlineGuard(Guard):
    stage = Stage.DEADLINE

    def __init__(self, ex: Execution) -> None:
        pass

    def decide(self, ex: Execution, answers: Sequence[Any] | None) -> Decision:
        remaining = ex.remaining()
        if remaining is not None and remaining <= 0:
            ex.outcome.deadline = "exceeded"
            error = DeadlineExceeded(f"deadline passed {-remaining:.2f}s ago; the task was not run")
            return Decision(Kind.FAIL, error=error)
        return RUN

    def around(self, ex: Execution, proceed: Callable[[], Any]) -> Any:
        if ex.deadline is None and current_deadline.get() is None:
            return proceed()  # nothing to carry into child tasks
        token = current_deadline.set(ex.deadline)
        try:
            return proceed()
        finally:
            current_deadline.reset(token)
