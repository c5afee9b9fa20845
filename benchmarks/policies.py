"""The policies of the benchmark variants, shared by every benchmark so that they measure
the same thing."""

from __future__ import annotations

from typing import Any

from celery import Celery

import resilient_tasks as rt

__all__ = ["DELIVERY", "POLICIES", "PREFORK_VARIANTS", "all_guards_policy", "register"]


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

#: Variants only ``benchmarks.prefork`` runs besides ``POLICIES``: plain Celery with the
#: delivery settings ``ResilientTask`` sets (the price of safety, apart from ours), a
#: retry-only ``ResilientTask`` (no store round trip on success: the cheapest path), and
#: the same with Celery's default early ack (what is ours, apart from the price of safety).
EXTRA: dict[str, rt.TaskPolicy | None] = {
    "plain_acks_late": None,
    "retry": rt.TaskPolicy(idempotent=True, retry=rt.RetryPolicy()),
    "retry_early_ack": rt.TaskPolicy(idempotent=True, retry=rt.RetryPolicy()),
}
#: Task options of a variant besides its policy.
DELIVERY: dict[str, dict[str, Any]] = {
    "plain_acks_late": {"acks_late": True, "reject_on_worker_lost": True},
    "retry_early_ack": {"acks_late": False, "reject_on_worker_lost": False},
}
PREFORK_VARIANTS = (*POLICIES, *EXTRA)


def register(app: Celery, variant: str, **options: Any) -> Any:
    """``bench.<variant>``: ``n -> n + 1``, a ``ResilientTask`` with the variant's policy
    (plain Celery for ``plain``)."""

    def run(n: int) -> int:
        return n + 1

    policy = POLICIES[variant] if variant in POLICIES else EXTRA[variant]
    options = {**DELIVERY.get(variant, {}), **options}
    if policy is not None:
        options.update(base=rt.ResilientTask, policy=policy)
    return app.task(name=f"bench.{variant}", **options)(run)
