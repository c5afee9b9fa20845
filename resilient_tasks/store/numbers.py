"""The numbers a store works out from a breaker policy, in one place for every store.

``MemoryStore`` and the Lua scripts must turn seconds into the same milliseconds (and
pick the same probe lease and record TTL) or the two stores drift apart; both read them
from here. Worked out once per policy object: the hot path sends them on every call.
"""

from __future__ import annotations

from typing import NamedTuple

from ..memo import PerObject
from ..policy import BreakerPolicy
from .protocol import BREAKER_TTL_MS

__all__ = ["BreakerNumbers", "breaker_numbers", "probe_lease_ms"]


def probe_lease_ms(policy: BreakerPolicy) -> int:
    """How long a half-open probe may take before its lease frees the slot."""
    return int(max(1.0, min(policy.open_for, 60.0)) * 1000)


class BreakerNumbers(NamedTuple):
    """A breaker policy in the integers and fractions the scripts take."""

    failure_rate: float
    min_calls: int
    window_ms: int
    buckets: int
    consecutive_failures: int  # 0 = off
    slow_call_rate: float  # 0 = off
    open_for_ms: int
    open_for_max_ms: int  # 0 = no growth
    half_open_probes: int
    probe_lease_ms: int
    ttl_ms: int


def _work_out(policy: BreakerPolicy) -> BreakerNumbers:
    return BreakerNumbers(
        failure_rate=float(policy.failure_rate),
        min_calls=int(policy.min_calls),
        window_ms=int(policy.window * 1000),
        buckets=int(policy.buckets),
        consecutive_failures=int(policy.consecutive_failures or 0),
        slow_call_rate=float(policy.slow_call_rate or 0.0),
        open_for_ms=int(policy.open_for * 1000),
        open_for_max_ms=int((policy.open_for_max or 0) * 1000),
        half_open_probes=int(policy.half_open_probes),
        probe_lease_ms=probe_lease_ms(policy),
        # a breaker outlives its window several times over, and a day at least
        ttl_ms=max(BREAKER_TTL_MS, int(policy.window * 4000)),
    )


breaker_numbers: PerObject[BreakerNumbers] = PerObject(_work_out)
