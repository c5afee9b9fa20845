"""Backoff strategies: bounds that hold for every attempt (Hypothesis properties)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from resilient_tasks.backoff import ceiling, make_backoff

bases = st.floats(min_value=0.001, max_value=100, allow_nan=False)
caps = st.floats(min_value=0.001, max_value=10_000, allow_nan=False)
attempts = st.integers(min_value=0, max_value=5000)


@given(base=bases, cap=caps, n=attempts)
def test_full_jitter_stays_in_zero_to_capped_exponential(base: float, cap: float, n: int) -> None:
    cap = max(cap, base)
    delay = make_backoff("full_jitter", base, cap)(n)
    assert 0.0 <= delay <= min(cap, base * 2.0 ** min(n, 64))


@given(base=bases, cap=caps, n=attempts)
def test_equal_jitter_is_in_upper_half(base: float, cap: float, n: int) -> None:
    cap = max(cap, base)
    top = ceiling(base, cap, n)
    delay = make_backoff("equal_jitter", base, cap)(n)
    assert top / 2 <= delay <= top


@given(base=bases, cap=caps, n=attempts, previous=st.none() | st.floats(0, 50_000))
def test_decorrelated_jitter_never_exceeds_cap(
    base: float, cap: float, n: int, previous: float | None
) -> None:
    cap = max(cap, base)
    delay = make_backoff("decorrelated_jitter", base, cap)(n, previous)
    assert base <= delay <= cap or delay == cap


@given(base=bases, cap=caps, n=attempts)
def test_exponential_and_fixed_are_deterministic(base: float, cap: float, n: int) -> None:
    cap = max(cap, base)
    assert make_backoff("exponential", base, cap)(n) == ceiling(base, cap, n)
    assert make_backoff("fixed", base, cap)(n) == base


def test_jitter_spreads_delays_at_the_cap() -> None:
    """Capped clients must not retry in lockstep: draws at the cap still differ."""
    strategy = make_backoff("full_jitter", 1.0, 10.0)
    draws = {round(strategy(50), 6) for _ in range(200)}
    assert len(draws) > 150
    assert max(draws) <= 10.0


@given(n=attempts)
def test_callable_backoff_is_clamped_into_zero_to_cap(n: int) -> None:
    strategy = make_backoff(lambda attempt: attempt * 3.0 - 5.0, 1.0, 30.0)
    assert 0.0 <= strategy(n) <= 30.0
