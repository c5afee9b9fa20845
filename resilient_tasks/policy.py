"""Frozen policy objects: what a task author (or an operator's file) states.

Every field is checked when the object is built, so a bad value fails at import or at
worker start with a ``PolicyError`` naming ``Class.field`` and the rule, never mid-task.
Change a policy with ``dataclasses.replace``; instances are safe to share between tasks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field, fields
from typing import Any, Literal, TypeAlias

from .backoff import STRATEGIES
from .errors import PolicyError

__all__ = [
    "DEFAULT_RETRY_ON",
    "NO_DEFAULT",
    "BreakerPolicy",
    "ExceptionMatcher",
    "FallbackPolicy",
    "IdempotencyPolicy",
    "KeySpec",
    "RetryBudget",
    "RetryPolicy",
    "TaskPolicy",
    "matches",
]

#: Exception types, or a predicate over the raised exception.
ExceptionMatcher: TypeAlias = tuple[type[BaseException], ...] | Callable[[BaseException], bool]
#: Argument names, a ``str.format`` template over the arguments, ``"message"`` (the Celery
#: task id), or a callable receiving the task's ``*args, **kwargs``.
KeySpec: TypeAlias = tuple[str, ...] | str | Callable[..., Hashable]

DEFAULT_RETRY_ON: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError)


class _NoDefault:
    """Marks "no static default" (``None`` is a legitimate default value)."""

    def __repr__(self) -> str:
        return "NO_DEFAULT"


NO_DEFAULT: Any = _NoDefault()


def matches(matcher: ExceptionMatcher, exc: BaseException) -> bool:
    """True when ``exc`` is selected by a tuple of types or a predicate."""
    if isinstance(matcher, tuple):
        return isinstance(exc, matcher)
    return bool(matcher(exc))


def _number(owner: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PolicyError(f"{owner}.{name}", f"must be a number, got {type(value).__name__}")
    if math.isnan(value) or math.isinf(value):
        raise PolicyError(f"{owner}.{name}", f"must be finite, got {value!r}")
    return float(value)


def _positive(owner: str, name: str, value: Any, *, zero: bool = False) -> None:
    number = _number(owner, name, value)
    if number < 0 or (number == 0 and not zero):
        bound = ">= 0" if zero else "> 0"
        raise PolicyError(f"{owner}.{name}", f"must be {bound}, got {value!r}")


def _integer(owner: str, name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PolicyError(f"{owner}.{name}", f"must be an integer, got {type(value).__name__}")
    if value < minimum:
        raise PolicyError(f"{owner}.{name}", f"must be >= {minimum}, got {value!r}")


def _fraction(owner: str, name: str, value: Any, *, open_low: bool = True) -> None:
    number = _number(owner, name, value)
    low_ok = number > 0 if open_low else number >= 0
    if not low_ok or number > 1:
        low = "(0" if open_low else "[0"
        raise PolicyError(f"{owner}.{name}", f"must be in {low}, 1], got {value!r}")


def _choice(owner: str, name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise PolicyError(f"{owner}.{name}", f"must be one of {', '.join(allowed)}; got {value!r}")


def _matcher(owner: str, name: str, value: Any) -> ExceptionMatcher:
    """Accept an exception type, a list/tuple of them, or a predicate."""
    if isinstance(value, type) and issubclass(value, BaseException):
        return (value,)
    if isinstance(value, (list, tuple)):
        for item in value:
            if not (isinstance(item, type) and issubclass(item, BaseException)):
                raise PolicyError(f"{owner}.{name}", f"{item!r} is not an exception type")
        return tuple(value)
    if callable(value):
        return value  # type: ignore[no-any-return]
    raise PolicyError(f"{owner}.{name}", "must be exception types or a predicate(exc) -> bool")


def _key(owner: str, value: Any) -> KeySpec:
    name = f"{owner}.key"
    if isinstance(value, str):
        if not value:
            raise PolicyError(name, "must not be empty")
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


def _set(obj: object, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)


@dataclass(frozen=True)
class RetryBudget:
    """Fleet-wide cap on retries to one downstream (Envoy retry budgets, SRE book).

    Over the breaker's sliding window, retries may not exceed ``ratio`` x first attempts
    plus ``min_per_window``: a sick service sees at most 20 % extra load from retries.
    """

    ratio: float = 0.2
    min_per_window: int = 10

    def __post_init__(self) -> None:
        owner = "RetryBudget"
        _number(owner, "ratio", self.ratio)
        if self.ratio < 0:
            raise PolicyError(f"{owner}.ratio", f"must be >= 0, got {self.ratio!r}")
        _integer(owner, "min_per_window", self.min_per_window, minimum=0)


@dataclass(frozen=True)
class RetryPolicy:
    """Celery-native retries with jittered backoff; only for idempotent work."""

    max_retries: int = 3
    backoff: str | Callable[[int], float] = "full_jitter"
    base: float = 1.0
    cap: float = 60.0
    retry_on: ExceptionMatcher = DEFAULT_RETRY_ON
    budget: RetryBudget | None = RetryBudget()

    def __post_init__(self) -> None:
        owner = "RetryPolicy"
        if self.budget is not None and not isinstance(self.budget, RetryBudget):
            raise PolicyError(f"{owner}.budget", f"must be a RetryBudget or None, got {self.budget!r}")
        _integer(owner, "max_retries", self.max_retries, minimum=0)
        if isinstance(self.backoff, str):
            _choice(owner, "backoff", self.backoff, tuple(STRATEGIES))
        elif not callable(self.backoff):
            raise PolicyError(f"{owner}.backoff", "must be a strategy name or attempt -> seconds")
        _positive(owner, "base", self.base)
        _positive(owner, "cap", self.cap)
        if self.cap < self.base:
            raise PolicyError(f"{owner}.cap", f"must be >= base ({self.base}), got {self.cap}")
        _set(self, "retry_on", _matcher(owner, "retry_on", self.retry_on))


@dataclass(frozen=True)
class IdempotencyPolicy:
    """Run the body once per key; duplicates replay the stored result."""

    key: KeySpec = "message"
    ttl: float = 86400.0
    lease: float | None = None
    on_duplicate: Literal["defer", "drop"] = "defer"
    fingerprint: bool = True
    on_store_error: Literal["fail_closed", "fail_open"] = "fail_closed"

    def __post_init__(self) -> None:
        owner = "IdempotencyPolicy"
        _set(self, "key", _key(owner, self.key))
        _positive(owner, "ttl", self.ttl)
        if self.lease is not None:
            _positive(owner, "lease", self.lease)
            if self.lease > self.ttl:
                raise PolicyError(f"{owner}.lease", f"must be <= ttl ({self.ttl}), got {self.lease}")
        _choice(owner, "on_duplicate", self.on_duplicate, ("defer", "drop"))
        if not isinstance(self.fingerprint, bool):
            raise PolicyError(f"{owner}.fingerprint", "must be true or false")
        _choice(owner, "on_store_error", self.on_store_error, ("fail_closed", "fail_open"))


@dataclass(frozen=True)
class BreakerPolicy:
    """A fleet-wide circuit breaker for one downstream.

    Defaults: trip at 50 % failures over 60 s once 20 calls were seen (fewer calls make
    the rate noise); stay open 30 s; let one probe through in half-open.
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

    def __post_init__(self) -> None:
        owner = "BreakerPolicy"
        _fraction(owner, "failure_rate", self.failure_rate)
        _integer(owner, "min_calls", self.min_calls, minimum=1)
        _positive(owner, "window", self.window)
        _integer(owner, "buckets", self.buckets, minimum=1)
        if self.consecutive_failures is not None:
            _integer(owner, "consecutive_failures", self.consecutive_failures, minimum=1)
        if self.slow_call is not None:
            _positive(owner, "slow_call", self.slow_call)
        if self.slow_call_rate is not None:
            _fraction(owner, "slow_call_rate", self.slow_call_rate)
            if self.slow_call is None:
                raise PolicyError(f"{owner}.slow_call_rate", "needs slow_call (seconds) to be set")
        _positive(owner, "open_for", self.open_for)
        if self.open_for_max is not None:
            _positive(owner, "open_for_max", self.open_for_max)
            if self.open_for_max < self.open_for:
                raise PolicyError(f"{owner}.open_for_max", f"must be >= open_for ({self.open_for})")
        _integer(owner, "half_open_probes", self.half_open_probes, minimum=1)
        _set(self, "failure_on", _matcher(owner, "failure_on", self.failure_on))
        _choice(owner, "when_open", self.when_open, ("defer", "fallback", "fail"))
        _integer(owner, "max_deferrals", self.max_deferrals, minimum=0)


@dataclass(frozen=True)
class FallbackPolicy:
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

    def __post_init__(self) -> None:
        owner = "FallbackPolicy"
        _set(self, "key", _key(owner, self.key))
        if self.key == "message":
            raise PolicyError(
                f"{owner}.key", "'message' never repeats; name the arguments the value depends on"
            )
        _positive(owner, "ttl", self.ttl)
        _fraction(owner, "decay", self.decay)
        _positive(owner, "floor", self.floor)
        if self.floor > self.ttl:
            raise PolicyError(f"{owner}.floor", f"must be <= ttl ({self.ttl}), got {self.floor}")
        if self.max_stale is not None:
            _positive(owner, "max_stale", self.max_stale)
        if self.function is not None and not callable(self.function):
            raise PolicyError(f"{owner}.function", "must be callable")
        if not isinstance(self.cache_failures, bool):
            raise PolicyError(f"{owner}.cache_failures", "must be true or false")
        _positive(owner, "negative_ttl", self.negative_ttl)
        _integer(owner, "max_size", self.max_size, minimum=1)
        if self.validate is not None and not callable(self.validate):
            raise PolicyError(f"{owner}.validate", "must be a callable result -> bool")


@dataclass(frozen=True)
class TaskPolicy:
    """Everything a task states about how it survives its dependencies."""

    downstream: str | None = None
    idempotent: bool = False
    deadline: float | None = None
    retry: RetryPolicy | None = None
    idempotency: IdempotencyPolicy | None = None
    breaker: BreakerPolicy | None = None
    fallback: FallbackPolicy | None = None

    def __post_init__(self) -> None:
        owner = "TaskPolicy"
        if self.downstream is not None and (
            not isinstance(self.downstream, str) or not self.downstream.strip()
        ):
            raise PolicyError(f"{owner}.downstream", "must be a non-empty name")
        if not isinstance(self.idempotent, bool):
            raise PolicyError(f"{owner}.idempotent", "must be true or false")
        if self.deadline is not None:
            _positive(owner, "deadline", self.deadline)
        expected = {
            "retry": RetryPolicy,
            "idempotency": IdempotencyPolicy,
            "breaker": BreakerPolicy,
            "fallback": FallbackPolicy,
        }
        for name, kind in expected.items():
            value = getattr(self, name)
            if value is not None and not isinstance(value, kind):
                raise PolicyError(f"{owner}.{name}", f"must be a {kind.__name__}, got {value!r}")
        if self.retry is not None and self.idempotency is None and not self.idempotent:
            raise PolicyError(
                f"{owner}.retry",
                "only idempotent work is retried: add idempotency=IdempotencyPolicy(...) "
                "or declare idempotent=True",
            )

    @property
    def retries_allowed(self) -> bool:
        """Retrying is safe: the work is declared idempotent or deduplicated."""
        return self.idempotent or self.idempotency is not None


def policy_fields(kind: type) -> tuple[str, ...]:
    """Field names of a policy class, for files and error messages."""
    return tuple(f.name for f in fields(kind))
