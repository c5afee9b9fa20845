"""Fallback values: the decaying TTL rule, the degraded envelope, negative answers.

A served fallback is never mistaken for a fresh answer: the task returns the envelope
``{"rt_degraded": true, "source": "cache"|"function"|"default", "age_s": float|None,
"value": ...}`` (JSON, so every Celery client can read it); ``unwrap`` splits it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["DEGRADED_MARK", "Degraded", "NotFound", "degraded", "entry_ttl", "unwrap"]

DEGRADED_MARK = "rt_degraded"


def entry_ttl(ttl: float, decay: float, floor: float, n: int) -> float:
    """``max(floor, ttl * decay**n)``: how long a value written or served now is trusted."""
    if n <= 0:
        return ttl
    try:
        decayed = ttl * math.pow(decay, n)
    except OverflowError:  # pragma: no cover - decay <= 1 cannot overflow
        decayed = 0.0
    return max(floor, decayed)


@dataclass(frozen=True)
class NotFound:
    """Return ``NotFound(value)`` from a body to say "this key does not exist".

    The task's result is ``value``; the answer is cached for ``negative_ttl`` so the next
    jobs for the same key skip the downstream (no cache penetration).
    """

    value: Any = None


@dataclass(frozen=True)
class Degraded:
    """A fallback answer, as read back from a task result with ``unwrap``."""

    value: Any
    source: str
    age_s: float | None


def degraded(value: Any, source: str, age_s: float | None) -> dict[str, Any]:
    """The JSON envelope a task returns when it served a fallback."""
    return {DEGRADED_MARK: True, "source": source, "age_s": age_s, "value": value}


def unwrap(result: Any) -> tuple[Any, Degraded | None]:
    """``(value, None)`` for a fresh result, ``(value, Degraded(...))`` for a fallback."""
    if isinstance(result, dict) and result.get(DEGRADED_MARK) is True:
        info = Degraded(result.get("value"), str(result.get("source")), result.get("age_s"))
        return info.value, info
    return result, None
