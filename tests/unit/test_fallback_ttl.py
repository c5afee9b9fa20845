"""The decaying TTL rule and the degraded envelope."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from resilient_tasks.fallback import NotFound, degraded, entry_ttl, unwrap

ttls = st.floats(min_value=1, max_value=1e6, allow_nan=False)
decays = st.floats(min_value=0.01, max_value=1.0, allow_nan=False)
ns = st.integers(min_value=0, max_value=10_000)


@given(ttl=ttls, decay=decays, floor_share=st.floats(0, 1), n=ns)
def test_ttl_is_ttl_at_zero_never_below_floor_and_never_grows(
    ttl: float, decay: float, floor_share: float, n: int
) -> None:
    floor = ttl * floor_share
    assert entry_ttl(ttl, decay, floor, 0) == ttl
    assert floor <= entry_ttl(ttl, decay, floor, n) <= ttl
    assert entry_ttl(ttl, decay, floor, n + 1) <= entry_ttl(ttl, decay, floor, n)


def test_ttl_schedule_example() -> None:
    assert [round(entry_ttl(120, 0.8, 30, n), 1) for n in range(8)] == [
        120.0,
        96.0,
        76.8,
        61.4,
        49.2,
        39.3,
        31.5,
        30.0,
    ]


def test_envelope_round_trip() -> None:
    value, info = unwrap(degraded({"price": 3}, "cache", 12.5))
    assert value == {"price": 3}
    assert info is not None and info.source == "cache" and info.age_s == 12.5
    assert unwrap({"price": 3}) == ({"price": 3}, None)
    assert NotFound().value is None
