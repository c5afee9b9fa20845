"""Every error resilient-tasks raises, in one tree.

::

    ResilienceError
    ├── PolicyError            a policy or setting is invalid (raised at import or worker start)
    ├── CircuitOpen            the downstream's breaker refuses calls; carries ``retry_after``
    ├── DuplicateInFlight      another worker holds the idempotency claim for this key
    ├── IdempotencyConflict    same idempotency key, different arguments
    ├── IdempotencyKeyError    the key could not be built (empty, too long, missing argument)
    ├── ClaimLost              our claim was taken over while the body ran (fencing)
    ├── RetryBudgetExhausted   the downstream's fleet-wide retry budget is spent
    ├── CachedFailure          this key failed moments ago (FallbackPolicy.cache_failures)
    ├── DeadlineExceeded       the task's absolute deadline has passed or would be passed
    └── StoreUnavailable       Redis could not be reached or refused the command
        └── StoreMisconfigured a wrong password, or an ACL user without a right we need

Errors of the libraries underneath (``redis.RedisError``) are translated to
``StoreUnavailable`` in the store and nowhere else.
"""

from __future__ import annotations

__all__ = [
    "CachedFailure",
    "CircuitOpen",
    "ClaimLost",
    "DeadlineExceeded",
    "DuplicateInFlight",
    "IdempotencyConflict",
    "IdempotencyKeyError",
    "PolicyError",
    "ResilienceError",
    "RetryBudgetExhausted",
    "StoreMisconfigured",
    "StoreUnavailable",
]


class ResilienceError(Exception):
    """Base of every error raised by resilient-tasks."""


class PolicyError(ResilienceError, ValueError):
    """A policy field or an ``install`` setting is invalid; the message names it."""

    def __init__(self, field: str, rule: str) -> None:
        self.field = field
        self.rule = rule
        super().__init__(field, rule)  # args rebuild the error after a JSON round trip

    def __str__(self) -> str:
        return f"{self.field}: {self.rule}"


class CircuitOpen(ResilienceError):
    """The downstream's breaker is open; try again after ``retry_after`` seconds."""

    def __init__(self, downstream: str, retry_after: float) -> None:
        self.downstream = downstream
        self.retry_after = float(retry_after)
        super().__init__(downstream, self.retry_after)  # args survive Celery's JSON results

    def __str__(self) -> str:
        return f"circuit {self.downstream!r} is open; retry after {self.retry_after:.1f}s"


class DuplicateInFlight(ResilienceError):
    """Another worker holds the claim for this idempotency key."""


class IdempotencyConflict(ResilienceError):
    """The idempotency key was seen before with different arguments."""


class IdempotencyKeyError(ResilienceError):
    """The idempotency key could not be built from the task's arguments."""


class ClaimLost(ResilienceError):
    """Our idempotency claim expired and was taken by another worker."""


class RetryBudgetExhausted(ResilienceError):
    """The downstream's fleet-wide retry budget is spent for this window."""


class DeadlineExceeded(ResilienceError):
    """The task's absolute deadline has passed, or a retry would land past it."""


class StoreUnavailable(ResilienceError):
    """The Redis store could not be reached or refused a command."""


class StoreMisconfigured(StoreUnavailable):
    """The store refused us for who we are, not for how it is doing: a wrong password or
    user name (``WRONGPASS``, ``NOAUTH``), or an ACL user without a right our scripts
    need (``NOPERM``: ``EVALSHA``, ``SCRIPT LOAD``, ``TIME``, a command a script calls, or
    our key prefix). Waiting does not mend it: a worker refuses to start on it, and at run
    time it is logged as an ERROR and counted (``store_misconfigured``).

    ``missing`` names what to grant (``+script|load``, ``~rt:*``, a valid password), when
    the store's answer says."""

    def __init__(self, message: str, missing: str | None = None) -> None:
        super().__init__(message)  # (one arg: rebuilt alike after a JSON round trip)
        self.missing = missing

    def __reduce__(self) -> tuple[type[StoreMisconfigured], tuple[str, str | None]]:
        return type(self), (str(self.args[0]), self.missing)


class CachedFailure(ResilienceError):
    """The downstream failed for this key moments ago; it is not called again yet."""
