"""resilient-tasks: make Celery jobs survive their dependencies.

Subclass ``ResilientTask`` (or pass ``base=ResilientTask``), state a ``TaskPolicy``, and
call ``install(app, redis_url=...)`` once.
"""

from .errors import (
    CircuitOpen,
    ClaimLost,
    DeadlineExceeded,
    DuplicateInFlight,
    IdempotencyConflict,
    IdempotencyKeyError,
    PolicyError,
    ResilienceError,
    RetryBudgetExhausted,
    StoreUnavailable,
)
from .policy import (
    BreakerPolicy,
    FallbackPolicy,
    IdempotencyPolicy,
    RetryBudget,
    RetryPolicy,
    TaskPolicy,
)
from .runtime import Runtime, install, runtime_for
from .task import ResilientTask

__version__ = "0.1.0"

__all__ = [
    "BreakerPolicy",
    "CircuitOpen",
    "ClaimLost",
    "DeadlineExceeded",
    "DuplicateInFlight",
    "FallbackPolicy",
    "IdempotencyConflict",
    "IdempotencyKeyError",
    "IdempotencyPolicy",
    "PolicyError",
    "ResilienceError",
    "ResilientTask",
    "RetryBudget",
    "RetryBudgetExhausted",
    "RetryPolicy",
    "Runtime",
    "StoreUnavailable",
    "TaskPolicy",
    "install",
    "runtime_for",
]
