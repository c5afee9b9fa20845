"""What every guard shares: one execution, the phases a guard may take part in, the
decision it may make, and the typed record of what happened.

A guard is an object made for one execution (its attributes are its own state) with at
most four phases, run by ``resilient_tasks.pipeline``:

- ``begin(ex) -> ops``: reads for the single ``begin`` round trip (every guard's in one);
- ``decide(ex, answers) -> Decision``: run the body, or replay a value, defer, fail, or
  serve a fallback; the pipeline takes the first decision that is not ``RUN``, in the
  order of ``Stage``, so where two guards could answer (the breaker refuses, the cache
  could serve) the answer is chosen in one place;
- ``around(ex, proceed)``: wraps the body (retry, fallback, the breaker of
  ``self.downstream``);
- ``end(ex, outcome) -> [(op, read)]``: writes for the single ``end`` round trip, each
  with an optional reader of its answer.

No guard reads another guard's state or calls another guard. What they learn goes into
the execution's ``Outcome``, a typed record the pipeline hands to each ``end`` and to
telemetry.
"""

from __future__ import annotations

import contextvars
import enum
import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from ..errors import ClaimLost
from ..keys import bind_arguments, digest, key_material
from ..policy import BreakerPolicy, KeySpec, TaskPolicy
from ..store.protocol import Admission, Op, Store
from .tally import Tally

__all__ = [
    "DEADLINE_HEADER",
    "DEFERRALS_HEADER",
    "OWNER_HEADER",
    "PREV_DELAY_HEADER",
    "RUN",
    "ClaimHandle",
    "Decision",
    "EndOp",
    "Env",
    "Execution",
    "Guard",
    "Kind",
    "Leases",
    "Outcome",
    "Stage",
    "current_deadline",
    "current_execution",
    "pass_through",
]

#: Header names carried on messages. Custom headers survive Celery retries.
DEADLINE_HEADER = "rt_deadline"
OWNER_HEADER = "rt_owner"
PREV_DELAY_HEADER = "rt_prev_delay"
DEFERRALS_HEADER = "rt_deferrals"

current_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("rt_deadline", default=None)


class Stage(enum.IntEnum):
    """The order in which decisions are taken (and guards appear in a chain)."""

    DEADLINE = 0
    IDEMPOTENCY = 1  # a finished job replays its result even while its downstream is open
    BREAKER = 2  # switches and the breaker
    CACHE = 3  # a cached negative answer or failure
    BODY = 4  # guards with no decision, only ``around`` (retry)


class Kind(enum.Enum):
    RUN = "run"
    REPLAY = "replay"  # answer ``value`` without the body
    DEFER = "defer"  # re-queue in ``countdown`` s without spending a retry
    FAIL = "fail"  # raise ``error``
    FALLBACK = "fallback"  # serve the fallback for ``error`` (or raise it without one)
    CONFIRM = "confirm"  # run, after ``confirm`` ops are answered (a claim put off)


@dataclass(frozen=True, slots=True)
class Decision:
    kind: Kind
    value: Any = None
    error: BaseException | None = None
    countdown: float = 0.0
    reason: str = ""


RUN = Decision(Kind.RUN)


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


class Outcome:
    """What one execution did: written by the pipeline and by each guard in its own
    fields, read by the guards' ``end`` and by telemetry. Never raises, never calls.

    The defaults are the class's: a new record sets only its two containers (made for
    every call, it costs nothing for the fields no guard writes)."""

    body_ran: bool = False
    body_error: BaseException | None = None
    body_seconds: float | None = None
    #: What the body returned (when it ran and returned).
    value: Any = None
    #: Errors raised inside ``self.downstream(name)``, by id: counted on that breaker.
    attributed: dict[int, str]
    #: The decision that answered without the body, if one did.
    stopped_by: Kind | None = None
    # idempotency
    idempotency: str | None = None
    idempotency_key: str | None = None
    token: int | None = None
    replayed_token: int | None = None
    result_stored: bool | None = None
    # breaker
    breaker: str | None = None
    breaker_state: str | None = None
    switch: str | None = None
    consecutive_failures: int = 0
    rejected_by: str | None = None
    breaker_outcome: str | None = None
    transitions: list[tuple[str, str]]
    # fallback
    fallback_source: str | None = None
    fallback_age_s: float | None = None
    fallback_ttl_s: float | None = None
    fallback_cached: bool | None = None
    # retry, deferral, deadline
    retry: str | None = None
    retry_delay_s: float | None = None
    deferred_s: float | None = None
    deadline: str | None = None
    # the end round trip
    end: str | None = None
    end_ms: float | None = None

    def __init__(self) -> None:
        self.attributed = {}
        self.transitions = []

    def __repr__(self) -> str:
        return f"Outcome({vars(self)!r})"

    @property
    def degraded(self) -> bool:
        """A fallback answered: not the job done."""
        return self.fallback_source in ("cache", "function", "default")


class Leases(Protocol):
    """Lease renewal and late delivery for claims (``heartbeat.Heartbeat`` is one)."""

    def track(self, claim: ClaimHandle, lease_ms: int, ttl_ms: int) -> None: ...

    def untrack(self, claim: ClaimHandle) -> None: ...

    def hand_over(self, ops: list[Op], within_s: float) -> None: ...


class Env(Protocol):
    """What the guards need of their app's runtime (``runtime.Runtime`` is one): named
    here so the guards depend on this shape, not on the runtime's module."""

    clock: Callable[[], float]
    max_result_bytes: int
    hmac_key: bytes | None

    @property
    def store(self) -> Store: ...

    @property
    def local(self) -> Store:
        """This process's stand-in while the store is unreachable."""

    @property
    def heartbeat(self) -> Leases: ...

    def now_ms(self) -> int: ...

    def count(self, event: str, downstream: str = "") -> None: ...

    def breaker_policy(self, name: str, task: Any, task_policy: TaskPolicy) -> BreakerPolicy: ...

    def refusal_hint(self, downstream: str | None) -> int | None: ...

    def note_admission(self, downstream: str, admission: Admission) -> None: ...

    def tally(self, downstream: str) -> Tally: ...

    def store_timeout(self) -> float: ...


#: One write of the ``end`` round trip and the reader of its answer (or None).
EndOp = tuple[Op, Callable[[Any], None] | None]


class Execution:
    """One run of a task: its arguments, policy, request and clock, and the record of
    what happened. Celery shares one task instance per process: per-call state lives
    here, never on the task."""

    __slots__ = (
        "_named",
        "_records",
        "args",
        "claim",
        "deadline",
        "encoded",
        "headers",
        "kwargs",
        "outcome",
        "policy",
        "request",
        "result",
        "runtime",
        "task",
    )

    def __init__(
        self,
        task: Any,
        policy: TaskPolicy,
        runtime: Env,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        request: Any,
        deadline: float | None,
    ) -> None:
        self.task = task
        self.policy = policy
        self.runtime = runtime
        self.args = args
        self.kwargs = kwargs
        self.request = request
        self.headers: Mapping[str, Any] = request.headers or {}  # (read, never written)
        self.deadline = deadline
        self.outcome = Outcome()
        #: The body's claim (``ResilientTask.idempotency``), set by the idempotency guard.
        self.claim: ClaimHandle | None = None
        #: A value that replaces the body's (a completion that lost to another owner).
        self.result: tuple[Any] | None = None
        #: The JSON of a value by ``id``, shared by the guards that store it.
        self.encoded: dict[int, str | None] = {}
        self._named: dict[str, Any] | None = None
        self._records: dict[Any, str] = {}

    @property
    def attempt(self) -> int:
        """0 for the first run, n for the n-th retry."""
        return int(self.request.retries or 0)

    def remaining(self) -> float | None:
        """Seconds until the deadline, or None without one."""
        if self.deadline is None:
            return None
        return self.deadline - self.runtime.clock()

    def named(self) -> dict[str, Any]:
        """The arguments by name (bound once; raises ``IdempotencyKeyError``)."""
        if self._named is None:
            self._named = bind_arguments(self.task.run, self.args, self.kwargs)
        return self._named

    def record_id(self, spec: KeySpec) -> str:
        """sha256(task name, the key ``spec`` picks): raw input never reaches the store.
        Worked out once per spec, so guards keyed alike share one hash."""
        found = self._records.get(spec)
        if found is None:
            named = None
            if not (spec == "message" or callable(spec)):
                named = self.named()
            material = key_material(spec, self.task.run, self.args, self.kwargs, self.request.id, named)
            found = self._records[spec] = digest(self.task.name, material)
        return found


@functools.cache
def pass_through() -> tuple[type[BaseException], ...]:
    """Celery's own control flow (``Retry``, ``Ignore``, ``Reject``): guards let it pass."""
    from celery.exceptions import Ignore, Reject, Retry

    return (Retry, Ignore, Reject)


current_execution: contextvars.ContextVar[Execution | None] = contextvars.ContextVar(
    "rt_execution", default=None
)


class Guard:
    """A guard's phases, each optional (the defaults take no part)."""

    stage: ClassVar[Stage] = Stage.BODY

    def begin(self, ex: Execution) -> Sequence[Op]:
        return ()

    def decide(self, ex: Execution, answers: Sequence[Any] | None) -> Decision:
        """``answers`` to this guard's ``begin`` ops, or None when the store failed."""
        return RUN

    def confirm(self, ex: Execution) -> Sequence[Op]:
        """The ops of a ``CONFIRM`` decision, sent right before the body."""
        return ()

    def confirmed(self, ex: Execution, answers: Sequence[Any] | None) -> Decision:
        return RUN

    def around(self, ex: Execution, proceed: Callable[[], Any]) -> Any:
        return proceed()

    def end(self, ex: Execution, outcome: Outcome) -> Sequence[EndOp]:
        return ()
