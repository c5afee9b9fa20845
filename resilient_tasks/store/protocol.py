"""The store protocol: named operations with typed arguments and answers.

A guard describes the shared state it needs as operation values (``Claim``, ``Admit``,
``CachePut`` ...); a store runs a list of them with ``batch`` in one round trip and
answers each in order with the answer type its class names. ``RedisStore`` runs one Lua
script per operation; ``MemoryStore`` has the same semantics in Python. One contract
suite (``tests/store/test_contract.py``) holds both to them.

Records are named by what they are, never by a Redis key: ``record`` is an already
hashed idempotency or fallback id, ``downstream`` a breaker's name. The store decides
where they live (a prefix, hash tags, or a dict).

Times: ``now_ms = 0`` asks the store for its own clock (Redis ``TIME``: one clock for a
fleet with skewed hosts); tests and simulations send an explicit clock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, NamedTuple, Protocol, TypeAlias, TypeVar, dataclass_transform

from ..policy import BreakerPolicy, RetryBudget

__all__ = [
    "BREAKER_TTL_MS",
    "Admission",
    "Admit",
    "Answer",
    "BreakerView",
    "CacheEntry",
    "CacheGet",
    "CachePut",
    "Claim",
    "ClaimAnswer",
    "Complete",
    "CompleteAnswer",
    "Forget",
    "Op",
    "Record",
    "Recorded",
    "Release",
    "Renew",
    "SpendAnswer",
    "SpendRetry",
    "Store",
    "Switch",
    "SwitchAnswer",
]

#: Breaker records live a day past their last write (operators read them in ``status``).
BREAKER_TTL_MS = 86_400_000

ClaimVerdict: TypeAlias = Literal["claimed", "free", "done", "in_flight", "conflict", "amnesia"]
Verdict: TypeAlias = Literal["allow", "probe", "reject"]
CacheKind: TypeAlias = Literal["ok", "negative", "failure"]
SwitchMode: TypeAlias = Literal[
    "normal",
    "fallback_only",
    "reject",
    "breaker_disabled",
    "forced_open",
    "forced_closed",
    "close",
    "reset",
]


_Op = TypeVar("_Op")


@dataclass_transform(frozen_default=True)
def _operation(cls: type[_Op]) -> type[_Op]:
    """An operation's class: a value, never changed once built. mypy checks it as a
    frozen dataclass; at run time it is a plain slotted one (hashable all the same),
    because a frozen dataclass sets each field through ``object.__setattr__`` and costs
    three times as much to build, and every task builds two."""
    return dataclass(slots=True, unsafe_hash=True)(cls)


# -- idempotency ----------------------------------------------------------------------


@_operation
class Claim:
    """Take the idempotency record for one execution, or say why not.

    The record is free when absent, released, or in flight with an expired lease, or
    when ``handoff`` names its owner (a retry continuing its own execution). ``peek``
    only looks (answers ``free`` instead of taking it). A fingerprint that differs from
    the stored one is a ``conflict``."""

    name: ClassVar[str] = "claim"
    record: str
    owner: str
    lease_ms: int
    ttl_ms: int
    fingerprint: str = ""
    task_id: str = ""
    handoff: str = ""
    peek: bool = False
    now_ms: int = 0


class ClaimAnswer(NamedTuple):
    """``claimed`` (``token`` is the new fencing token), ``free`` (a peek), ``done``
    (``result`` is the stored JSON), ``in_flight`` (``remaining_ms`` of another owner's
    lease), ``conflict``, or ``amnesia`` (the store lost its data: claims fail closed
    for ``remaining_ms``)."""

    verdict: ClaimVerdict
    token: int = 0
    result: str | None = None
    remaining_ms: int = 0


@_operation
class Complete:
    """Store the result, only if ``owner`` and ``token`` still hold the claim.

    A claim's record lives its lease plus ``ttl_ms``; ``refresh`` sets it to live
    ``ttl_ms`` from now (needed only when the execution ran past half its lease:
    otherwise at least ``ttl_ms`` is left, and the write keeps the expiry). (``now_ms``
    is accepted but unused: nothing a completion stores depends on the clock.)"""

    name: ClassVar[str] = "complete"
    record: str
    owner: str
    token: int
    result: str
    ttl_ms: int
    now_ms: int = 0
    refresh: bool = True


class CompleteAnswer(NamedTuple):
    """``stored``; when not, what the record holds now (``state`` '' when it is gone)."""

    stored: bool
    state: str = ""
    result: str | None = None


@_operation
class Release:
    """Give the claim back after a failure; the token counter stays (tokens never go back).
    Answers True when released, False when the claim was no longer ours."""

    name: ClassVar[str] = "release"
    record: str
    owner: str
    token: int
    ttl_ms: int


@_operation
class Renew:
    """Extend a running execution's lease (the heartbeat). True when renewed."""

    name: ClassVar[str] = "renew"
    record: str
    owner: str
    token: int
    lease_ms: int
    ttl_ms: int
    now_ms: int = 0


@_operation
class Forget:
    """Drop an idempotency record (an operator's action). True when one was removed."""

    name: ClassVar[str] = "forget"
    record: str


# -- breakers and retry budgets ---------------------------------------------------------


@_operation
class Admit:
    """May one call go to ``downstream``? Moves OPEN to HALF_OPEN by time and hands out
    at most ``policy.half_open_probes`` probe leases fleet-wide."""

    name: ClassVar[str] = "admit"
    downstream: str
    policy: BreakerPolicy
    owner: str
    now_ms: int = 0


class Admission(NamedTuple):
    """The breaker's answer before a call."""

    verdict: Verdict
    state: str
    retry_after_ms: int
    consecutive_failures: int
    switch: str = "normal"

    @property
    def allowed(self) -> bool:
        return self.verdict != "reject"

    @property
    def probe(self) -> bool:
        return self.verdict == "probe"


@_operation
class Record:
    """Count outcomes in ``downstream``'s sliding window and make any transition.

    One call is one count of 1; a process flushing successes it summed sends ``ok=n``.
    ``probe`` frees ``owner``'s half-open probe lease (with all counts 0: a probe that
    never called the downstream). ``first_attempts`` feeds the retry budget."""

    name: ClassVar[str] = "record"
    downstream: str
    policy: BreakerPolicy
    owner: str = ""
    ok: int = 0
    fail: int = 0
    slow: int = 0
    slowfail: int = 0
    first_attempts: int = 0
    probe: bool = False
    now_ms: int = 0


class Recorded(NamedTuple):
    """The breaker's state after the record, whether this record moved it, and the
    operator's switch (a process that admits calls from its own view learns it here)."""

    state: str
    transitioned: bool
    consecutive_failures: int
    switch: str = "normal"


@_operation
class SpendRetry:
    """Take one retry from ``downstream``'s fleet-wide budget: retries in the window may
    not exceed ``budget.ratio`` x first attempts + ``budget.min_per_window``."""

    name: ClassVar[str] = "spend_retry"
    downstream: str
    policy: BreakerPolicy
    budget: RetryBudget
    now_ms: int = 0


class SpendAnswer(NamedTuple):
    granted: bool
    retries: int
    attempts: int


@_operation
class Switch:
    """An operator's degrade switch for ``downstream`` (or the ``close``/``reset`` action).

    ``source="file"`` applies only a value the policies file changed since it was last
    applied, so workers re-reading one file never undo an operator's later command."""

    name: ClassVar[str] = "switch"
    downstream: str
    mode: SwitchMode
    source: Literal["cli", "file"] = "cli"
    now_ms: int = 0


class SwitchAnswer(NamedTuple):
    previous: str
    applied: bool


# -- fallback cache ---------------------------------------------------------------------


@_operation
class CacheGet:
    """Look at a fallback entry.

    Always answers a cached negative answer or a failure remembered moments ago. With
    ``serve``, also the last known good value while its age is under
    ``max(floor, ttl * decay**failures)`` and ``max_stale``; serving shortens the entry's
    remaining life to that bound, so a long outage drains stale data. A served value is
    answered as ``ok`` with any remembered failure in ``CacheEntry.failure``; a value
    too old to serve is dropped. Every answer (a peek's too) tells the age of the good
    value the entry holds in ``CacheEntry.good_age_ms``."""

    name: ClassVar[str] = "cache_get"
    record: str
    serve: bool = False
    failures: int = 0
    ttl_ms: int = 0
    decay: float = 1.0
    floor_ms: int = 0
    max_stale_ms: int = 0
    now_ms: int = 0


class CacheEntry(NamedTuple):
    """``kind`` None: nothing to use. ``value`` is the stored text as written (for a
    ``failure``, the failure's text). A served ``ok`` value also carries ``failure``, the
    text of a failure remembered beside it, if any: one answer tells both "serve this if
    the call is refused" and "this key failed moments ago".

    ``good_age_ms``, on every answer (a peek's too): the age of the last good (``ok``)
    value the entry holds, -1 when it holds none (never written, replaced by a negative
    answer, expired, or dropped by this read as too old to serve). A caller can skip
    rewriting an entry that is still fresh."""

    kind: CacheKind | None = None
    value: str | None = None
    age_ms: int = 0
    allowed_ms: int = 0
    failure: str | None = None
    good_age_ms: int = -1


@_operation
class CachePut:
    """Remember a validated success (``ok``), a negative answer, or a recent failure.
    A failure is kept beside the last good value, never instead of it. True."""

    name: ClassVar[str] = "cache_put"
    record: str
    value: str
    kind: CacheKind
    ttl_ms: int
    now_ms: int = 0


Op: TypeAlias = (
    Claim | Complete | Release | Renew | Forget | Admit | Record | SpendRetry | Switch | CacheGet | CachePut
)
Answer: TypeAlias = (
    ClaimAnswer | CompleteAnswer | bool | Admission | Recorded | SpendAnswer | SwitchAnswer | CacheEntry
)


class BreakerView(NamedTuple):
    """A breaker as an operator reads it (``status``): its stored fields, as text."""

    downstream: str
    fields: dict[str, str]


class Store(Protocol):
    """Shared state for a fleet of workers."""

    #: Round trips made so far (each ``batch`` with ops is one).
    trips: int

    def batch(self, ops: Sequence[Op]) -> list[Any]:
        """Run ``ops`` in one round trip; one answer per op, in order (its op's answer
        type). Raises ``StoreUnavailable`` when the store cannot be reached or refuses."""
        ...

    def breakers(self) -> list[BreakerView]:
        """Every breaker the store holds (operators' reads; not for the hot path)."""
        ...

    def now_ms(self) -> int:
        """The store's clock, in ms (the clock ``now_ms = 0`` stands for)."""
        ...

    def ping(self) -> None:
        """Raise ``StoreUnavailable`` unless the store answers."""
        ...

    def warm(self) -> None:
        """Get ready off the task path (a worker starting): connect, load what the
        operations need, so the first batch is one round trip. Never raises."""
        ...

    def close(self) -> None: ...
