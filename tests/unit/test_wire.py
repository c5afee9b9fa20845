"""The store's own RESP2 reader and its packer, byte for byte against redis-py's."""

from __future__ import annotations

import enum

import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st
from redis.exceptions import BusyLoadingError, InvalidResponse, NoScriptError, ResponseError

from resilient_tasks.keys import bind_arguments, owner_id, signature_of
from resilient_tasks.store import redis as store_redis
from resilient_tasks.store.base import Op
from resilient_tasks.store.wire import _Incomplete, parse_reply


def _all(buf: bytes) -> list[object]:
    out, pos = [], 0
    while pos < len(buf):
        value, pos = parse_reply(buf, pos)
        out.append(value)
    return out


def test_every_reply_type_parses_as_a_pipeline_would_give_it() -> None:
    buf = (
        b"*3\r\n$7\r\nclaimed\r\n:42\r\n*2\r\n$-1\r\n:-7\r\n"  # nested array, nil, negative int
        b"+OK\r\n"
        b"$4\r\na\r\nb\r\n"  # a bulk string holding CRLF
        b"*-1\r\n"
        b"*0\r\n"
    )
    assert _all(buf) == [[b"claimed", 42, [None, -7]], b"OK", b"a\r\nb", None, []]


def test_error_replies_get_redis_py_classes() -> None:
    (noscript, loading, other) = _all(
        b"-NOSCRIPT No matching script\r\n-LOADING Redis is loading\r\n-ERR boom\r\n"
    )
    assert isinstance(noscript, NoScriptError)
    assert isinstance(loading, BusyLoadingError) and not isinstance(loading, ResponseError)
    assert type(other) is ResponseError and "boom" in str(other)


@pytest.mark.parametrize("cut", [1, 3, 5, 9, 14, 20])
def test_a_reply_cut_anywhere_asks_for_more(cut: int) -> None:
    whole = b"*2\r\n$7\r\nclaimed\r\n:42\r\n"
    with pytest.raises(_Incomplete):
        parse_reply(whole[:cut], 0)


def test_garbage_is_a_redis_error_not_a_crash() -> None:
    with pytest.raises(InvalidResponse):
        parse_reply(b"?what\r\n", 0)
    with pytest.raises(InvalidResponse):
        parse_reply(b"$x\r\n", 0)


class _Level(enum.IntEnum):
    HIGH = 3


@given(
    st.lists(
        st.tuples(
            st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=3),
            st.lists(
                st.one_of(
                    st.text(max_size=30),
                    st.integers(min_value=-(2**62), max_value=2**62),
                    st.binary(max_size=30),
                ),
                max_size=8,
            ),
        ),
        min_size=1,
        max_size=3,
    )
)
def test_our_packer_writes_what_redis_py_writes(batch: list[tuple[list[str], list[object]]]) -> None:
    ops = [Op("claim", tuple(keys), tuple(args)) for keys, args in batch]  # type: ignore[arg-type]
    conn = redis.connection.Connection()
    sha = store_redis.scripts()["claim"][1]
    expected = b"".join(
        b"".join(conn.pack_command("EVALSHA", sha, len(op.keys), *op.keys, *op.args)) for op in ops
    )
    assert store_redis.pack_evalsha(ops) == expected


class _Rate(float):
    def __repr__(self) -> str:  # as numpy's float64 does: np.float64(0.5)
        return f"Rate({float(self)})"


def test_the_packer_refuses_bools_and_sends_number_subclasses_by_value() -> None:
    with pytest.raises(TypeError, match="bool"):
        store_redis.pack_evalsha([Op("claim", ("k",), (True,))])
    assert b"$1\r\n3\r\n" in store_redis.pack_evalsha([Op("claim", ("k",), (_Level.HIGH,))])
    assert b"$3\r\n0.5\r\n" in store_redis.pack_evalsha([Op("claim", ("k",), (_Rate(0.5),))])


def _run(a: int, b: str, c: float = 1.5) -> None: ...


def _star(a: int, *rest: int, k: str = "x", **extra: int) -> None: ...


@pytest.mark.parametrize(
    "func, args, kwargs",
    [
        (_run, (1, "b", 2.0), {}),
        (_run, (1,), {"b": "b", "c": 3.0}),
        (_run, (), {"c": 3.0, "a": 1, "b": "z"}),
        (_run, (1, "b"), {}),  # a default applied: the slow path
        (_star, (1, 2, 3), {"k": "y", "z": 9}),
    ],
)
def test_quick_binding_agrees_with_inspect(func: object, args: tuple[object, ...], kwargs: dict[str, object]) -> None:
    slow = signature_of(func).bind(*args, **kwargs)  # type: ignore[arg-type]
    slow.apply_defaults()
    expected = dict(slow.arguments)
    expected.update(expected.pop("extra", {}))  # type: ignore[arg-type]
    assert bind_arguments(func, args, kwargs) == expected  # type: ignore[arg-type]


def test_binding_errors_stay_clear_on_the_quick_path() -> None:
    from resilient_tasks.errors import IdempotencyKeyError

    with pytest.raises(IdempotencyKeyError, match="arguments do not match"):
        bind_arguments(_run, (1, "b"), {"a": 2})  # a given twice
    with pytest.raises(IdempotencyKeyError, match="arguments do not match"):
        bind_arguments(_run, (1, "b", 2.0), {"nope": 1})


def test_owner_ids_are_unique_and_fresh_in_a_forked_child() -> None:
    import os

    ids = {owner_id() for _ in range(10_000)}
    assert len(ids) == 10_000
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its ids must not repeat the parent's sequence
        os.write(write, owner_id().encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(read, 64).decode()
    os.close(read)
    os.close(write)
    assert child[:16] != owner_id()[:16]
