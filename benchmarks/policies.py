"""The policies of the benchmark variants, shared by every benchmark so that they measure
the same thing."""

from __future__ import annotations

from typing import Any

from celery import Celery

import resilient_tasks as rt

__all__ = ["POLICIES", "all_guards_policy", "register"]


def all_guards_policy(downstream: str) -> rt.TaskPolicy:
    """Idempotency, breaker and fallback together, on a healthy downstream."""
    return rt.TaskPolicy(
        downstream=downstream,
        idempotency=rt.IdempotencyPolicy(key=("n",)),
        breaker=rt.BreakerPolicy(min_calls=1_000_000),
        fallback=rt.FallbackPolicy(key=("n",)),
    )


#: ``None``: a plain Celery task. The breakers' ``min_calls`` is so high they never trip.
POLICIES: dict[str, rt.TaskPolicy | None] = {
    "plain": None,
    "idempotency": rt.TaskPolicy(idempotency=rt.IdempotencyPolicy(key=("n",))),
    "breaker": rt.TaskPolicy(downstream="bench-ds", breaker=rt.BreakerPolicy(min_calls=1_000_000)),
    "all_guards": all_guards_policy("bench-ds2"),
}


def register(app: Celery, variant: str, **options: Any) -> Any:
    """``bench.<variant>``: ``n -> n + 1``, a ``ResilientTask`` with the variant's policy
    (plain Celery for ``plain``)."""

    def run(n: int) -> int:
        return n + 1

    policy = POLICIES[variant]
    if policy is not None:
        options.update(base=rt.ResilientTask, policy=policy)
    return app.task(name=f"bench.{variant}", **options)(run)
