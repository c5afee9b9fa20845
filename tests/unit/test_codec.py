"""The JSON we store: the same text kombu writes, whichever way it is made."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from resilient_tasks.codec import dumps, encode_capped


@given(st.one_of(st.none(), st.booleans(), st.integers(), st.text(), st.floats(allow_nan=False),
                 st.dictionaries(st.text(), st.integers(), max_size=2)))  # fmt: skip
def test_stored_text_is_kombus(value: Any) -> None:
    """Ints, booleans and None skip the encoder; a replay must read back what the encoder
    would have written."""
    assert encode_capped(value, 1 << 20, "test") == dumps(value)


def test_an_int_over_the_limit_is_known_as_json_but_not_stored() -> None:
    """The memo tells "not JSON" (give the key back) from "too big" (done, replays null)."""
    memo: dict[int, str | None] = {}
    big = 10**40
    assert encode_capped(big, 10, "test", memo) is None
    assert memo[id(big)] == str(big)
    assert encode_capped(object(), 10, "test", memo) is None
    assert None in memo.values()
