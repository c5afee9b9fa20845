"""The demo's second task: an exchange rate from the payments provider, with a fallback.

``make demo`` runs it beside ``workers.app.charge`` (its workers start with ``--include
examples.rates``). Both name the downstream ``payments``, so they share one fleet-wide
breaker, and they answer its opening differently:

- a charge cannot be made up: while the breaker is open it is deferred to the half-open
  time, spending no retry (``when_open = "defer"``, from the policies file);
- a rate can be: while the provider fails it is answered with the last rate fetched for
  that currency, marked degraded with its age (``when_open="fallback"``). That rate is
  trusted for ``max(floor, ttl * decay**n)`` seconds, n being the provider's consecutive
  failures, so the longer the outage lasts the fresher a cached rate must be. Once it is
  too old, the shop's own reference table answers instead (``source: "function"``).
"""

from __future__ import annotations

import time
from typing import Any

import resilient_tasks as rt
from examples import downstream
from workers.app import DOWNSTREAM_URL, app

__all__ = ["CURRENCIES", "FX_FALLBACK", "fallback_ttl", "fx_rate", "reference_rate"]

CURRENCIES = tuple(downstream.FX_BASE)


def reference_rate(currency: str) -> dict[str, Any]:
    """The shop's own table of yesterday's rates: always there, never current."""
    return {"currency": currency, "rate": downstream.FX_BASE[currency], "as_of": "reference table"}


#: A live rate is trusted for a minute, 7 % less per consecutive failure of the provider,
#: never less than 5 s; then the reference table answers.
FX_FALLBACK = rt.FallbackPolicy(key=("currency",), ttl=60.0, decay=0.93, floor=5.0, function=reference_rate)


def fallback_ttl(consecutive_failures: int, policy: rt.FallbackPolicy = FX_FALLBACK) -> float:
    """How old a cached rate may be when served now: the policy's documented rule."""
    allowed = max(policy.floor, policy.ttl * policy.decay ** max(0, consecutive_failures))
    return min(allowed, policy.max_stale) if policy.max_stale else allowed


@app.task(  # type: ignore[untyped-decorator]  # Celery ships no type hints
    base=rt.ResilientTask,
    bind=True,
    name="examples.rates.fx_rate",
    policy=rt.TaskPolicy(
        downstream="payments",
        # Only when_open is stated: the rest of the payments breaker comes from the
        # policies file, shared with the charges.
        breaker=rt.BreakerPolicy(when_open="fallback"),
        fallback=FX_FALLBACK,
    ),
)
def fx_rate(self: rt.ResilientTask, currency: str) -> dict[str, Any]:
    """Today's rate of ``currency`` to USD, fetched from the payments provider."""
    reply = downstream.rate(DOWNSTREAM_URL, currency)
    return {"currency": currency, "rate": reply["rate"], "as_of": reply["as_of"], "fetched_at": time.time()}
