"""Settings a worker needs right, read from the app: the serializers (never pickle), the
Redis broker's visibility timeout against every wait a task can schedule, and how long
a claim's lease is. One rule each, used at install, registration and worker start."""

from __future__ import annotations

from typing import Any

from .errors import PolicyError
from .policy import BreakerPolicy, IdempotencyPolicy

__all__ = [
    "DEFAULT_LEASE",
    "check_serializers",
    "check_visibility_timeout",
    "task_lease",
]

DEFAULT_LEASE = 60.0
DEFAULT_VISIBILITY_TIMEOUT = 3600.0
DEFAULT_BREAKER = BreakerPolicy()
_PICKLE = {"pickle", "application/x-python-serialize"}
REDIS_BROKERS = ("redis", "rediss", "sentinel", "redis+socket")


def task_lease(task: Any, app: Any, policy: IdempotencyPolicy) -> float:
    """The policy's lease, else the task's hard time limit, else 60 s (one rule for the
    claim, the heartbeat, the visibility-timeout check and the amnesia window)."""
    if policy.lease is not None:
        return policy.lease
    limit = getattr(task, "time_limit", None) or app.conf.task_time_limit
    return float(limit) if limit else DEFAULT_LEASE


def check_serializers(app: Any) -> None:
    """Refuse pickle in any accepted content or serializer setting."""
    conf = app.conf
    for setting in ("accept_content", "result_accept_content"):
        values = {str(v) for v in (conf.get(setting) or ())}
        if values & _PICKLE:
            raise PolicyError(
                setting,
                "pickle is refused: a message that can run code on unpickling lets anyone "
                "who can write to the broker run code on every worker; use ['json']",
            )
    for setting in ("task_serializer", "result_serializer", "event_serializer"):
        if str(conf.get(setting)) in _PICKLE:
            raise PolicyError(setting, "pickle is refused; use 'json'")


def _largest_wait(app: Any, tasks: list[Any]) -> tuple[float, str]:
    """The longest countdown or lease any of ``tasks`` may schedule."""
    largest, what = 0.0, ""
    for task in tasks:
        policy = getattr(task, "policy", None)
        if policy is None or not getattr(task, "resilient", False):
            continue
        name = task.name
        waits = []
        if policy.retry is not None:
            waits.append((policy.retry.cap, f"{name}: RetryPolicy.cap"))
        if policy.idempotency is not None:
            lease = task_lease(task, app, policy.idempotency)
            waits.append((lease, f"{name}: IdempotencyPolicy.lease"))
        if policy.breaker is not None or policy.downstream is not None:
            breaker = policy.breaker or DEFAULT_BREAKER
            # a deferral lands at the half-open time plus up to 5 s of jitter
            longest_open = (breaker.open_for_max or breaker.open_for) + 5.0
            waits.append((longest_open, f"{name}: BreakerPolicy.open_for (+5 s jitter)"))
        for value, label in waits:
            if value > largest:
                largest, what = value, label
    return largest, what


def check_visibility_timeout(app: Any, tasks: list[Any] | None = None) -> None:
    """Refuse countdowns, leases or deferrals that the Redis broker would redeliver early.

    The Redis transport re-delivers an unacked message after ``visibility_timeout``; an
    ETA or countdown beyond it runs twice (Celery issues #2599, #3270, #4400).
    """
    url = str(app.conf.broker_url or "")
    if url.split("://", 1)[0] not in REDIS_BROKERS:
        return
    options = app.conf.broker_transport_options or {}
    timeout = float(options.get("visibility_timeout", DEFAULT_VISIBILITY_TIMEOUT))
    if tasks is None:
        tasks = list(app.tasks.values())
    largest, what = _largest_wait(app, tasks)
    if largest and timeout <= largest:
        raise PolicyError(
            "broker_transport_options.visibility_timeout",
            f"{timeout:g}s must be above the longest wait a task can schedule ({largest:g}s, "
            f"{what}); otherwise the Redis broker redelivers the message and it runs twice",
        )
