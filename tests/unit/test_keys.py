"""Idempotency keys: built from arguments, hashed, and never raw in Redis."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from resilient_tasks.errors import IdempotencyKeyError
from resilient_tasks.keys import MAX_KEY_BYTES, canonical, digest, fingerprint, key_material
from resilient_tasks.store.redis import RedisStore


def charge(order_id: Any, customer_id: Any = None, amount: int = 0) -> None: ...


def test_argument_names_bind_positional_and_keyword_alike() -> None:
    by_position = key_material(("order_id",), charge, (7, "c"), {}, "tid")
    by_keyword = key_material(("order_id",), charge, (), {"order_id": 7}, "tid")
    assert by_position == by_keyword


def test_template_callable_and_message_keys() -> None:
    assert key_material("{customer_id}/{order_id}", charge, (1, "c9"), {}, None) == "c9/1"
    assert key_material(lambda order_id, **_: f"o-{order_id}", charge, (), {"order_id": 5}, None) == "o-5"
    assert key_material("message", charge, (1,), {}, "task-123") == "task-123"


@pytest.mark.parametrize(
    ("spec", "args", "match"),
    [
        (("missing",), (1,), "not passed"),
        ("{nope}", (1,), "template"),
        ("{customer_id}", (1, ""), "empty"),
        (("order_id", "customer_id"), (1, None), r"customer_id empty"),
        (("order_id", "customer_id"), ("", "c"), r"order_id empty"),
        ("{customer_id}", (1, "x" * (MAX_KEY_BYTES + 1)), "limit"),
    ],
)
def test_unusable_keys_are_clear_task_errors(spec: Any, args: tuple[Any, ...], match: str) -> None:
    with pytest.raises(IdempotencyKeyError, match=match):
        key_material(spec, charge, args, {}, None)


def test_fingerprint_ignores_call_style_but_not_values() -> None:
    assert fingerprint(charge, (1, "c", 5), {}) == fingerprint(
        charge, (1,), {"customer_id": "c", "amount": 5}
    )
    assert fingerprint(charge, (1, "c", 5), {}) != fingerprint(charge, (1, "c", 6), {})


hostile = st.one_of(
    st.just(""),
    st.just("\0"),
    st.just("\r\n"),
    st.just("*?[]"),
    st.just("{tag}"),
    st.text(min_size=0, max_size=200),
    st.binary(max_size=64).map(lambda b: b.decode("latin-1")),
)


@given(value=hostile)
def test_hostile_input_never_leaves_the_prefix(value: str) -> None:
    store = RedisStore("redis://127.0.0.1:1/0", prefix="rt")  # never connected: keys only
    try:
        material = key_material(("order_id",), charge, (value,), {}, None)
    except IdempotencyKeyError:
        return
    key = store.idempotency_key(digest("shop.charge", material))
    assert re.fullmatch(r"rt:idem:\{[0-9a-f]{64}\}", key)


_SCALARS = st.one_of(
    st.integers(), st.text(), st.booleans(), st.floats(allow_nan=False), st.lists(st.integers(), max_size=2)
)


@given(st.lists(_SCALARS, min_size=1, max_size=3))
def test_argument_keys_are_the_canonical_json_of_the_values(values: list[Any]) -> None:
    """Ints and strings take a shorter way to their text; a record's key must not change
    with it (a job claimed before an upgrade is the same job after it)."""
    def run(a: Any = None, b: Any = None, c: Any = None) -> None: ...

    names = ("a", "b", "c")[: len(values)]
    if any(v is None or v == "" for v in values):
        return
    assert key_material(names, run, tuple(values), {}, None) == canonical(values)
