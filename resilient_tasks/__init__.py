"""resilient-tasks: make Celery jobs survive their dependencies.

Subclass ``ResilientTask`` (or pass ``base=ResilientTask``), state a ``TaskPolicy``, and
call ``install(app, redis_url=...)`` once.
"""

from .errors import (
    CachedFailure,
    CircuitOpen,
    ClaimLost,
    DeadlineExceeded,
    DuplicateInFlight,
    IdempotencyConflict,
    IdempotencyKeyError,
    PolicyError,
    ResilienceError,
    RetryBudgetExhausted,
    StoreMisconfigured,
    StoreUnavailable,
)
from .fallback import Degraded, NotFound, unwrap
from .policy import (
    TRANSIENT_ERRORS,
    BreakerPolicy,
    FallbackPolicy,
    IdempotencyPolicy,
    RetryBudget,
    RetryPolicy,
    TaskPolicy,
)
from .runtime import Runtime, install, runtime_for
from .switches import reset_breaker, set_switch
from .task import ResilientTask

__version__ = "0.1.0"

__all__ = [
    "TRANSIENT_ERRORS",
    "BreakerPolicy",
    "CachedFailure",
    "CircuitOpen",
    "ClaimLost",
    "DeadlineExceeded",
    "Degraded",
    "DuplicateInFlight",
    "FallbackPolicy",
    "IdempotencyConflict",
    "IdempotencyKeyError",
    "IdempotencyPolicy",
    "NotFound",
    "PolicyError",
    "ResilienceError",
    "ResilientTask",
    "RetryBudget",
    "RetryBudgetExhausted",
    "RetryPolicy",
    "Runtime",
    "StoreMisconfigured",
    "StoreUnavailable",
    "TaskPolicy",
    "install",
    "reset_breaker",
    "runtime_for",
    "set_switch",
    "unwrap",
]
