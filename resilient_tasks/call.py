"""One execution of a task: everything the guards share, kept off the task instance.

Celery shares one task instance per process, so per-call state lives here and is made
visible to the body through context variables (``ResilientTask.idempotency``).
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import ClaimLost, StoreUnavailable
from .store.protocol import Op

if TYPE_CHECKING:
    from .policy import TaskPolicy
    from .runtime import Runtime
    from .store.protocol import Admission
    from .task import ResilientTask

__all__ = ["Call", "ClaimHandle", "current_call", "current_deadline"]

#: Header names carried on messages. Custom headers survive Celery retries.
DEADLINE_HEADER = "rt_deadline"
OWNER_HEADER = "rt_owner"
PREV_DELAY_HEADER = "rt_prev_delay"
DEFERRALS_HEADER = "rt_deferrals"

current_call: contextvars.ContextVar[Call | None] = contextvars.ContextVar("rt_call", default=None)
current_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("rt_deadline", default=None)


@dataclass
class ClaimHandle:
    """The body's view of its idempotency claim: the fencing token and whether it was lost."""

    key: str
    owner: str
    token: int
    lost: bool = False

    def check(self) -> None:
        """Raise ``ClaimLost`` if another worker took the claim (call before side effects)."""
        if self.lost:
            raise ClaimLost(f"idempotency claim (token {self.token}) was taken over")


#: Reads the store's answer to one ``end`` op: ``(call, answer)``. It is handed the call
#: rather than closing over it, so a call holds no reference cycle through its ops.
EndCallback = Callable[["Call", Any], None]


@dataclass(slots=True)
class Call:
    """A single execution: arguments, policy, deadline, and the two store batches."""

    task: ResilientTask
    policy: TaskPolicy
    runtime: Runtime
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    headers: dict[str, Any]
    deadline: float | None
    started: float = field(default_factory=time.time)
    claim: ClaimHandle | None = None
    outcome: dict[str, Any] = field(default_factory=dict)
    end_ops: list[tuple[Op, EndCallback | None]] = field(default_factory=list)
    preparers: tuple[Any, ...] = ()
    entered: set[int] = field(default_factory=set)
    body_ran: bool = False
    body_error: BaseException | None = None
    body_seconds: float | None = None
    attributed: dict[int, str] = field(default_factory=dict)
    finalizers: list[Callable[[Call, BaseException | None], None]] = field(default_factory=list)
    breaker_owner: str = ""
    fallback_key: str | None = None
    #: The hashed idempotency key; a fallback keyed alike reuses it.
    key_digest: str | None = None
    #: The arguments by name, once a guard has bound them (the others reuse them).
    named: dict[str, Any] | None = None
    celery_request: Any = None
    fallback_prefetched: bool = False
    lease_s: float | None = None
    #: Run right before the body (a claim put off until the breaker has admitted the call).
    before_body: Callable[[], None] | None = None
    #: The result's JSON by ``id``, shared by the guards that store it.
    encoded: dict[int, str | None] = field(default_factory=dict)
    breaker_local: bool = False
    admission: Admission | None = None
    has_result: bool = False
    result: Any = None
    _begun: dict[int, list[Any]] | None = None
    _begin_error: StoreUnavailable | None = None

    def begin(self, guard: Any) -> list[Any]:
        """The answers to ``guard``'s ``prepare`` ops, fetched with every other guard's
        in one round trip the first time any guard asks."""
        if self._begin_error is not None:
            raise self._begin_error  # every guard learns that the store failed
        if self._begun is None:
            ops_by_guard = [(g, g.prepare(self)) for g in self.preparers]
            flat = [op for _, ops in ops_by_guard for op in ops]
            try:
                answers = self.runtime.store.batch(flat) if flat else []
            except StoreUnavailable as exc:
                self._begin_error = exc
                raise
            self._begun = {}
            start = 0
            for g, ops in ops_by_guard:
                self._begun[id(g)] = answers[start : start + len(ops)]
                start += len(ops)
        return self._begun.get(id(guard), [])

    def begun_by(self, guard: Any) -> bool:
        """True when ``guard``'s ``begin`` ops ran (it may hold something to give back)."""
        return self._begun is not None and bool(self._begun.get(id(guard)))

    def replace_result(self, value: Any) -> None:
        """Return ``value`` instead of the body's result (a lost claim defers to the winner)."""
        self.has_result = True
        self.result = value

    @property
    def request(self) -> Any:
        """The Celery request of this execution (looked up once: a thread-local stack)."""
        if self.celery_request is None:
            self.celery_request = self.task.request
        return self.celery_request

    @property
    def attempt(self) -> int:
        """0 for the first run, n for the n-th retry."""
        return int(self.request.retries or 0)

    def remaining(self) -> float | None:
        """Seconds until the deadline, or None without one."""
        if self.deadline is None:
            return None
        return self.deadline - self.runtime.clock()

    def at_end(self, op: Op, callback: EndCallback | None = None) -> None:
        """Queue a write for the single ``end`` round trip."""
        self.end_ops.append((op, callback))
