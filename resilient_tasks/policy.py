"""Frozen policy objects: what a task author (or an operator's file) states.

Every field is checked when the object is built, so a bad value fails at import or at
worker start with a ``PolicyError`` naming ``Class.field`` and the rule, never mid-task.
A policy built by merging the worker policies file goes through the same constructors,
so it is checked by exactly the same rules.

Numbers must be finite and in range, because they reach Redis and Lua as integer
milliseconds: durations are at least one millisecond and at most ``MAX_SECONDS`` (ten
years, 3.2e11 ms, far inside the 2**53 that Lua's doubles hold exactly even added to
today's clock); counts are at most ``MAX_COUNT``; a breaker has at most ``MAX_BUCKETS``
buckets (its scripts read every bucket on a call).

Each policy knows which fields its author passed (``fields_set``), so a value equal to
the default still counts as stated when the layers of the policies file are merged.
Change a policy with ``dataclasses.replace``: the copy is checked again, and it counts
every field as set (``replace`` passes them all to the constructor).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Hashable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar, Literal, TypeAlias, TypeVar

from .errors import PolicyError
from .transient import TRANSIENT_ERRORS, TransientErrors

__all__ = [
    "BACKOFF_STRATEGIES",
    "DEFAULT_RETRY_ON",
    "MAX_BUCKETS",
    "MAX_COUNT",
    "MAX_RATIO",
    "MAX_RESULT_BYTES",
    "MAX_SECONDS",
    "MIN_SECONDS",
    "NO_DEFAULT",
    "TRANSIENT_ERRORS",
    "BreakerPolicy",
    "ExceptionMatcher",
    "FallbackPolicy",
    "IdempotencyPolicy",
    "KeySpec",
    "PolicyObject",
    "RetryBudget",
    "RetryPolicy",
    "TaskPolicy",
    "check_field",
    "check_relations",
    "matches",
    "nested_policies",
    "policy_fields",
    "related_fields",
    "required_fields",
]

#: Exception types, or a predicate over the raised exception.
ExceptionMatcher: TypeAlias = tuple[type[BaseException], ...] | Callable[[BaseException], bool]
#: Argument names, a ``str.format`` template over the arguments, ``"message"`` (the Celery
#: task id), or a callable receiving the task's ``*args, **kwargs``.
KeySpec: TypeAlias = tuple[str, ...] | str | Callable[..., Hashable]
#: Checks one field: ``(Class.field, value) -> the value to keep``; raises ``PolicyError``.
Check: TypeAlias = Callable[[str, Any], Any]

#: Names of the backoff strategies (``resilient_tasks.backoff.STRATEGIES`` implements them).
BACKOFF_STRATEGIES = ("full_jitter", "equal_jitter", "decorrelated_jitter", "exponential", "fixed")
#: The shortest duration: one millisecond (a shorter one would be 0 ms in Redis).
MIN_SECONDS = 0.001
#: The longest duration: ten years of 365 days.
MAX_SECONDS = 10 * 365 * 86400
#: The largest count (retries, calls, probes, deferrals, budget floor).
MAX_COUNT = 1_000_000
#: The most buckets a breaker's sliding window may have.
MAX_BUCKETS = 1_000
#: The largest retry budget ratio (retries per first attempt).
MAX_RATIO = 1_000.0
#: The largest cached result, in bytes: Redis's limit for one string.
MAX_RESULT_BYTES = 512 * 1024 * 1024
#: Kept for older imports: the default ``retry_on`` (see ``resilient_tasks.transient``).
DEFAULT_RETRY_ON: tuple[type[BaseException], ...] = TRANSIENT_ERRORS


class _NoDefault:
    """Marks "no static default" (``None`` is a legitimate default value)."""

    def __repr__(self) -> str:
        return "NO_DEFAULT"


NO_DEFAULT: Any = _NoDefault()


def matches(matcher: ExceptionMatcher, exc: BaseException) -> bool:
    """True when ``exc`` is selected by a predicate (``TRANSIENT_ERRORS`` is one) or a
    tuple of types."""
    if callable(matcher):
        return bool(matcher(exc))
    return isinstance(exc, matcher)


# -- one check per kind of field -----------------------------------------------------------


def _real(name: str, value: Any) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PolicyError(name, f"must be a number, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise PolicyError(name, f"must be finite, got {value!r}")
    return value  # an int of any size compares exactly with the float bounds below


def _optional(check: Check) -> Check:
    return lambda name, value: None if value is None else check(name, value)


def _seconds(name: str, value: Any) -> float:
    number = _real(name, value)
    if number <= 0:
        raise PolicyError(name, f"must be > 0, got {value!r}")
    if number < MIN_SECONDS:
        raise PolicyError(name, f"must be at least {MIN_SECONDS} (one millisecond), got {value!r}")
    if number > MAX_SECONDS:
        raise PolicyError(name, f"must be <= {MAX_SECONDS} (ten years), got {value!r}")
    return float(number)


def _interval(name: str, value: Any) -> float:
    """0 (off), or seconds up to a minute."""
    number = _real(name, value)
    if number != 0:
        _seconds(name, value)
    if number > 60:
        raise PolicyError(name, f"must be <= 60 seconds, got {value!r}")
    return float(number)


def _fraction(*, zero: bool = False) -> Check:
    def check(name: str, value: Any) -> float:
        number = _real(name, value)
        if not (number >= 0 if zero else number > 0) or number > 1:
            raise PolicyError(name, f"must be in {'[0' if zero else '(0'}, 1], got {value!r}")
        return float(number)

    return check


def _ratio(name: str, value: Any) -> float:
    number = _real(name, value)
    if number < 0:
        raise PolicyError(name, f"must be >= 0, got {value!r}")
    if number > MAX_RATIO:
        raise PolicyError(name, f"must be <= {MAX_RATIO:g}, got {value!r}")
    return float(number)


def _count(minimum: int, maximum: int = MAX_COUNT) -> Check:
    def check(name: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise PolicyError(name, f"must be an integer, got {type(value).__name__}")
        if value < minimum:
            raise PolicyError(name, f"must be >= {minimum}, got {value!r}")
        if value > maximum:
            raise PolicyError(name, f"must be <= {maximum}, got {value!r}")
        return value

    return check


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise PolicyError(name, "must be true or false")
    return value


def _choice(*allowed: str) -> Check:
    def check(name: str, value: Any) -> str:
        if not isinstance(value, str) or value not in allowed:
            raise PolicyError(name, f"must be one of {', '.join(allowed)}; got {value!r}")
        return value

    return check


def _name(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise PolicyError(name, "must be a non-empty name")
    return value


def _callable(what: str) -> Check:
    def check(name: str, value: Any) -> Any:
        if not callable(value):
            raise PolicyError(name, f"must be {what}")
        return value

    return check


def _anything(name: str, value: Any) -> Any:
    return value


def _backoff(name: str, value: Any) -> Any:
    if isinstance(value, str):
        return _choice(*BACKOFF_STRATEGIES)(name, value)
    if not callable(value):
        raise PolicyError(name, "must be a strategy name or attempt -> seconds")
    return value


def _matcher(name: str, value: Any) -> ExceptionMatcher:
    """An exception type, a list/tuple of them, or a predicate (``TRANSIENT_ERRORS`` is
    both a tuple and a predicate, and is kept whole)."""
    if isinstance(value, TransientErrors):
        return value
    if isinstance(value, type) and issubclass(value, BaseException):
        return (value,)
    if isinstance(value, (list, tuple)):
        for item in value:
            if not (isinstance(item, type) and issubclass(item, BaseException)):
                raise PolicyError(name, f"{item!r} is not an exception type")
        return tuple(value)
    if callable(value):
        return value  # type: ignore[no-any-return]
    raise PolicyError(name, "must be exception types or a predicate(exc) -> bool")


def _key(*, message: bool) -> Check:
    def check(name: str, value: Any) -> KeySpec:
        if isinstance(value, str):
            if not value:
                raise PolicyError(name, "must not be empty")
            if value == "message" and not message:
                raise PolicyError(name, "'message' never repeats; name the arguments the value depends on")
            return value
        if isinstance(value, (list, tuple)):
            if not value:
                raise PolicyError(name, "needs at least one argument name")
            for item in value:
                if not isinstance(item, str) or not item.isidentifier():
                    raise PolicyError(name, f"{item!r} is not an argument name")
            return tuple(value)
        if callable(value):
            return value  # type: ignore[no-any-return]
        raise PolicyError(name, "must be argument names, a format string, 'message' or a callable")

    return check


def _instance(kind: type) -> Check:
    def check(name: str, value: Any) -> Any:
        if value is not None and not isinstance(value, kind):
            raise PolicyError(name, f"must be a {kind.__name__} or None, got {value!r}")
        return value

    return check


@dataclass(frozen=True)
class Relation:
    """A rule over several fields; ``check`` returns ``(field, rule)`` when broken."""

    fields: tuple[str, ...]
    check: Callable[[Mapping[str, Any]], tuple[str, str] | None]


def _at_least(low: str, high: str) -> Relation:
    """``high`` (when set) must be >= ``low``."""

    def check(v: Mapping[str, Any]) -> tuple[str, str] | None:
        if v[high] is not None and v[low] is not None and v[high] < v[low]:
            return high, f"must be >= {low} ({v[low]:g}), got {v[high]:g}"
        return None

    return Relation((low, high), check)


def _at_most(high: str, low: str) -> Relation:
    """``low`` (when set) must be <= ``high``."""

    def check(v: Mapping[str, Any]) -> tuple[str, str] | None:
        if v[low] is not None and v[low] > v[high]:
            return low, f"must be <= {high} ({v[high]:g}), got {v[low]:g}"
        return None

    return Relation((high, low), check)


# -- the policies ----------------------------------------------------------------------------

_P = TypeVar("_P", bound="type[PolicyObject]")


def _stated(cls: _P) -> _P:
    """Record which fields a constructor call passed, positionally or by keyword."""
    init = cls.__init__
    names = tuple(f.name for f in fields(cls) if f.init)  # type: ignore[arg-type]

    @functools.wraps(init)
    def __init__(self: PolicyObject, *args: Any, **kwargs: Any) -> None:
        object.__setattr__(self, "_fields_set", frozenset(names[: len(args)]).union(kwargs))
        init(self, *args, **kwargs)

    cls.__init__ = __init__  # type: ignore[assignment]
    return cls


class PolicyObject:
    """Base of the policy dataclasses: field checks, cross-field relations, ``fields_set``."""

    _checks: ClassVar[Mapping[str, Check]] = {}
    _relations: ClassVar[tuple[Relation, ...]] = ()
    _nested: ClassVar[Mapping[str, type[PolicyObject]]] = {}

    def __post_init__(self) -> None:
        owner = type(self).__name__
        values: dict[str, Any] = {}
        for f in fields(self):  # type: ignore[arg-type]
            given = getattr(self, f.name)
            kept = self._checks[f.name](f"{owner}.{f.name}", given)
            if kept is not given:
                object.__setattr__(self, f.name, kept)
            values[f.name] = kept
        for relation in self._relations:
            broken = relation.check(values)
            if broken is not None:
                raise PolicyError(f"{owner}.{broken[0]}", broken[1])

    @property
    def fields_set(self) -> frozenset[str]:
        """The fields the author passed to the constructor (like pydantic's
        ``model_fields_set``); not part of equality or hashing. An object made without its
        constructor counts every field as set."""
        found: frozenset[str] | None = self.__dict__.get("_fields_set")
        if found is None:
            return frozenset(policy_fields(type(self)))
        return found


@_stated
@dataclass(frozen=True)
class RetryBudget(PolicyObject):
    """Fleet-wide cap on retries to one downstream (Envoy retry budgets, SRE book).

    Over the breaker's sliding window, retries may not exceed ``ratio`` x first attempts
    plus ``min_per_window``: a sick service sees at most 20 % extra load from retries.
    """

    ratio: float = 0.2
    min_per_window: int = 10

    _checks: ClassVar[Mapping[str, Check]] = {"ratio": _ratio, "min_per_window": _count(0)}


@_stated
@dataclass(frozen=True)
class RetryPolicy(PolicyObject):
    """Celery-native retries with jittered backoff; only for idempotent work.

    ``retry_on`` defaults to ``TRANSIENT_ERRORS``: connect errors, timeouts and 5xx/429
    responses of the HTTP and Redis clients that are installed.
    """

    max_retries: int = 3
    backoff: str | Callable[[int], float] = "full_jitter"
    base: float = 1.0
    cap: float = 60.0
    retry_on: ExceptionMatcher = TRANSIENT_ERRORS
    budget: RetryBudget | None = RetryBudget()

    _checks: ClassVar[Mapping[str, Check]] = {
        "max_retries": _count(0),
        "backoff": _backoff,
        "base": _seconds,
        "cap": _seconds,
        "retry_on": _matcher,
        "budget": _instance(RetryBudget),
    }
    _relations: ClassVar[tuple[Relation, ...]] = (_at_least("base", "cap"),)
    _nested: ClassVar[Mapping[str, type[PolicyObject]]] = {"budget": RetryBudget}


@_stated
@dataclass(frozen=True)
class IdempotencyPolicy(PolicyObject):
    """Run the body once per key; duplicates replay the stored result."""

    key: KeySpec = "message"
    ttl: float = 86400.0
    lease: float | None = None
    on_duplicate: Literal["defer", "drop"] = "defer"
    fingerprint: bool = True
    on_store_error: Literal["fail_closed", "fail_open"] = "fail_closed"

    _checks: ClassVar[Mapping[str, Check]] = {
        "key": _key(message=True),
        "ttl": _seconds,
        "lease": _optional(_seconds),
        "on_duplicate": _choice("defer", "drop"),
        "fingerprint": _flag,
        "on_store_error": _choice("fail_closed", "fail_open"),
    }
    _relations: ClassVar[tuple[Relation, ...]] = (_at_most("ttl", "lease"),)


def _slow_rate_needs_slow_call(v: Mapping[str, Any]) -> tuple[str, str] | None:
    if v["slow_call_rate"] is not None and v["slow_call"] is None:
        return "slow_call_rate", "needs slow_call (seconds) to be set"
    return None


def _a_millisecond_per_bucket(v: Mapping[str, Any]) -> tuple[str, str] | None:
    if v["window"] * 1000 < v["buckets"]:
        rule = f"must be at least one millisecond per bucket ({v['buckets']} ms), got {v['window']:g}"
        return "window", rule
    return None


@_stated
@dataclass(frozen=True)
class BreakerPolicy(PolicyObject):
    """A fleet-wide circuit breaker for one downstream.

    Defaults: trip at 50 % failures over 60 s once 20 calls were seen (fewer calls make
    the rate noise); stay open 30 s; let one probe through in half-open.

    ``flush_interval``: in the closed state a process admits calls from its own view of
    the breaker (renewed by every answer of the store, trusted this long) and sends
    successes in one record at most this often; failures and slow calls are recorded at
    once. 0 writes every call and asks the store before every call.
    """

    failure_rate: float = 0.5
    min_calls: int = 20
    window: float = 60.0
    buckets: int = 10
    consecutive_failures: int | None = None
    slow_call: float | None = None
    slow_call_rate: float | None = None
    open_for: float = 30.0
    open_for_max: float | None = None
    half_open_probes: int = 1
    failure_on: ExceptionMatcher = (Exception,)
    when_open: Literal["defer", "fallback", "fail"] = "defer"
    max_deferrals: int = 20
    flush_interval: float = 0.1

    _checks: ClassVar[Mapping[str, Check]] = {
        "failure_rate": _fraction(),
        "min_calls": _count(1),
        "window": _seconds,
        "buckets": _count(1, MAX_BUCKETS),
        "consecutive_failures": _optional(_count(1)),
        "slow_call": _optional(_seconds),
        "slow_call_rate": _optional(_fraction()),
        "open_for": _seconds,
        "open_for_max": _optional(_seconds),
        "half_open_probes": _count(1),
        "failure_on": _matcher,
        "when_open": _choice("defer", "fallback", "fail"),
        "max_deferrals": _count(0),
        "flush_interval": _interval,
    }
    _relations: ClassVar[tuple[Relation, ...]] = (
        Relation(("slow_call", "slow_call_rate"), _slow_rate_needs_slow_call),
        _at_least("open_for", "open_for_max"),
        Relation(("window", "buckets"), _a_millisecond_per_bucket),
    )


@_stated
@dataclass(frozen=True)
class FallbackPolicy(PolicyObject):
    """Serve the last known good result, marked degraded, while the downstream fails.

    An entry lives ``max(floor, ttl * decay**n)`` seconds, n being the downstream's
    consecutive failures: the longer it fails, the shorter stale data is trusted.
    On failure the task returns, in order: the cached value, ``function(*args, **kwargs)``,
    ``default``; else it raises. ``cache_failures`` remembers a failure for
    ``negative_ttl`` so the next jobs for that key fail fast instead of calling again.
    """

    key: KeySpec
    ttl: float = 120.0
    decay: float = 0.8
    floor: float = 30.0
    max_stale: float | None = None
    default: Any = field(default=NO_DEFAULT, hash=False)  # a dict default must not break hashing
    function: Callable[..., Any] | None = None
    cache_failures: bool = False
    negative_ttl: float = 30.0
    max_size: int = 65536
    validate: Callable[[Any], bool] | None = None

    _checks: ClassVar[Mapping[str, Check]] = {
        "key": _key(message=False),
        "ttl": _seconds,
        "decay": _fraction(),
        "floor": _seconds,
        "max_stale": _optional(_seconds),
        "default": _anything,
        "function": _optional(_callable("callable")),
        "cache_failures": _flag,
        "negative_ttl": _seconds,
        "max_size": _count(1, MAX_RESULT_BYTES),
        "validate": _optional(_callable("a callable result -> bool")),
    }
    _relations: ClassVar[tuple[Relation, ...]] = (_at_most("ttl", "floor"),)


def _retry_needs_idempotent_work(v: Mapping[str, Any]) -> tuple[str, str] | None:
    if v["retry"] is not None and v["idempotency"] is None and not v["idempotent"]:
        return "retry", (
            "only idempotent work is retried: add idempotency=IdempotencyPolicy(...) "
            "or declare idempotent=True"
        )
    return None


@_stated
@dataclass(frozen=True)
class TaskPolicy(PolicyObject):
    """Everything a task states about how it survives its dependencies."""

    downstream: str | None = None
    idempotent: bool = False
    deadline: float | None = None
    retry: RetryPolicy | None = None
    idempotency: IdempotencyPolicy | None = None
    breaker: BreakerPolicy | None = None
    fallback: FallbackPolicy | None = None

    _checks: ClassVar[Mapping[str, Check]] = {
        "downstream": _optional(_name),
        "idempotent": _flag,
        "deadline": _optional(_seconds),
        "retry": _instance(RetryPolicy),
        "idempotency": _instance(IdempotencyPolicy),
        "breaker": _instance(BreakerPolicy),
        "fallback": _instance(FallbackPolicy),
    }
    _relations: ClassVar[tuple[Relation, ...]] = (
        Relation(("retry", "idempotency", "idempotent"), _retry_needs_idempotent_work),
    )
    _nested: ClassVar[Mapping[str, type[PolicyObject]]] = {
        "retry": RetryPolicy,
        "idempotency": IdempotencyPolicy,
        "breaker": BreakerPolicy,
        "fallback": FallbackPolicy,
    }

    @property
    def retries_allowed(self) -> bool:
        """Retrying is safe: the work is declared idempotent or deduplicated."""
        return self.idempotent or self.idempotency is not None


# -- what the policies file needs to check one table at a time -----------------------------


def policy_fields(kind: type) -> tuple[str, ...]:
    """Field names of a policy class, for files and error messages."""
    return tuple(f.name for f in fields(kind))


def required_fields(kind: type[PolicyObject]) -> tuple[str, ...]:
    """Fields without a default (``FallbackPolicy.key``)."""
    return tuple(
        f.name
        for f in fields(kind)  # type: ignore[arg-type]
        if f.default is MISSING and f.default_factory is MISSING
    )


def nested_policies(kind: type[PolicyObject]) -> Mapping[str, type[PolicyObject]]:
    """Fields holding another policy object (``TaskPolicy.retry``, ``RetryPolicy.budget``)."""
    return kind._nested


def check_field(kind: type[PolicyObject], name: str, value: Any) -> Any:
    """Check one field alone, as the constructor would; return the value it would keep."""
    check = kind._checks.get(name)
    if check is None:
        known = ", ".join(kind._checks)
        raise PolicyError(f"{kind.__name__}.{name}", f"unknown field; {kind.__name__} has {known}")
    return check(f"{kind.__name__}.{name}", value)


def check_relations(kind: type[PolicyObject], values: Mapping[str, Any]) -> list[PolicyError]:
    """The broken cross-field rules among ``values`` (a rule is checked only when every
    field it involves is in ``values``)."""
    broken = []
    for relation in kind._relations:
        if all(name in values for name in relation.fields):
            found = relation.check(values)
            if found is not None:
                broken.append(PolicyError(f"{kind.__name__}.{found[0]}", found[1]))
    return broken


def related_fields(kind: type[PolicyObject], name: str) -> tuple[str, ...]:
    """The other fields that a cross-field rule ties to ``name``."""
    related: list[str] = []
    for relation in kind._relations:
        if name in relation.fields:
            related += [f for f in relation.fields if f != name and f not in related]
    return tuple(related)
