"""Backoff strategies: how long to wait before retry number ``n`` (0 for the first retry).

Each strategy is a small callable ``(n, previous) -> seconds``. Jitter is always drawn
*inside* the cap: capping after jitter (as Resilience4j and Polly do) makes every client
that reached the cap wait exactly the same time, and they retry in lockstep.
The exponential shapes come from tenacity; equal and decorrelated jitter are not there.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, cast

import tenacity

__all__ = [
    "STRATEGIES",
    "Backoff",
    "CallableBackoff",
    "DecorrelatedJitter",
    "EqualJitter",
    "Exponential",
    "Fixed",
    "FullJitter",
    "make_backoff",
]


class Backoff(Protocol):
    """A delay in seconds for retry ``n``; ``previous`` is the delay chosen last time."""

    def __call__(self, n: int, previous: float | None = None) -> float: ...


def _state(n: int) -> tenacity.RetryCallState:
    """tenacity's wait strategies read only ``attempt_number`` (1 for the first retry)."""
    state = tenacity.RetryCallState(cast(tenacity.BaseRetrying, None), None, (), {})
    state.attempt_number = n + 1
    return state


def ceiling(base: float, cap: float, n: int) -> float:
    """``min(cap, base * 2**n)`` without overflowing for large ``n``."""
    if n >= 1024 or base * math.pow(2.0, min(n, 1023)) >= cap:
        return cap
    return base * (2.0**n)


@dataclass(frozen=True)
class FullJitter:
    """``U(0, min(cap, base·2^n))``: the AWS recommendation, the default."""

    base: float
    cap: float

    def __call__(self, n: int, previous: float | None = None) -> float:
        wait = tenacity.wait_random_exponential(multiplier=self.base, max=self.cap)
        return min(float(wait(_state(n))), ceiling(self.base, self.cap, n))


@dataclass(frozen=True)
class EqualJitter:
    """Half the exponential ceiling, plus a uniform draw over the other half."""

    base: float
    cap: float

    def __call__(self, n: int, previous: float | None = None) -> float:
        half = ceiling(self.base, self.cap, n) / 2.0
        return half + random.uniform(0.0, half)


@dataclass(frozen=True)
class DecorrelatedJitter:
    """``U(base, min(cap, 3·previous))``: grows from the last delay, drawn under the cap."""

    base: float
    cap: float

    def __call__(self, n: int, previous: float | None = None) -> float:
        prev = self.base if previous is None or previous < self.base else previous
        high = min(self.cap, 3.0 * prev)
        low = min(self.base, high)
        return random.uniform(low, high)


@dataclass(frozen=True)
class Exponential:
    """``min(cap, base·2^n)`` with no jitter; fine for one client, bad for a fleet."""

    base: float
    cap: float

    def __call__(self, n: int, previous: float | None = None) -> float:
        return float(tenacity.wait_exponential(multiplier=self.base, max=self.cap)(_state(n)))


@dataclass(frozen=True)
class Fixed:
    """Always ``base`` seconds (never above ``cap``)."""

    base: float
    cap: float

    def __call__(self, n: int, previous: float | None = None) -> float:
        return float(min(self.cap, tenacity.wait_fixed(self.base)(_state(n))))


@dataclass(frozen=True)
class CallableBackoff:
    """A user's ``attempt -> seconds``; the value is checked and kept in ``[0, cap]``."""

    fn: Callable[[int], float]
    cap: float

    def __call__(self, n: int, previous: float | None = None) -> float:
        value = float(self.fn(n))
        if math.isnan(value):
            raise ValueError(f"backoff callable returned NaN for attempt {n}")
        return min(self.cap, max(0.0, value))


STRATEGIES: dict[str, Callable[[float, float], Backoff]] = {
    "full_jitter": FullJitter,
    "equal_jitter": EqualJitter,
    "decorrelated_jitter": DecorrelatedJitter,
    "exponential": Exponential,
    "fixed": Fixed,
}


def make_backoff(spec: str | Callable[[int], float], base: float, cap: float) -> Backoff:
    """Turn a policy's ``backoff`` field into a strategy."""
    if isinstance(spec, str):
        return STRATEGIES[spec](base, cap)
    return CallableBackoff(spec, cap)
