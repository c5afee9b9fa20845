"""Reading a policies file: every error at once, in file order, and only ``PolicyFileError``."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import resilient_tasks as rt
from resilient_tasks import switches
from resilient_tasks.config import SWITCH_MODES, PolicyFileError, load, parse
from resilient_tasks.policy import policy_fields

from .samples import BROKEN, GOOD, write


def problems_of(data: str | bytes, path: str = "p.toml") -> list[Any]:
    with pytest.raises(PolicyFileError) as info:
        parse(path, data.encode() if isinstance(data, str) else data)
    assert info.value.errors == [str(p) for p in info.value.problems]
    return list(info.value.problems)


def test_a_good_file_keeps_only_the_keys_written_in_each_table(tmp_path: Path) -> None:
    file = load(write(tmp_path, GOOD))
    assert file.defaults == {"deadline": 600.0, "breaker": {"window": 30.0, "open_for": 5.0}}
    assert file.downstreams == {"payments": {"failure_rate": 0.25, "min_calls": 40}}
    retry = file.tasks["shop.charge"]["retry"]
    assert retry["retry_on"] == (ConnectionError, TimeoutError)
    assert retry["budget"] == {"ratio": 0.5, "min_per_window": 3}
    assert file.switches == {"inventory": "fallback_only"}
    assert file.mtime == os.stat(file.path).st_mtime




def test_ten_broken_files_give_ten_distinct_precise_errors(tmp_path: Path) -> None:
    messages = []
    for name, (text, expected) in BROKEN.items():
        path = write(tmp_path, text, name)
        with pytest.raises(PolicyFileError) as info:
            load(path)
        assert len(info.value.errors) == 1, info.value.errors
        message = info.value.errors[0]
        assert message.startswith(path), message
        assert expected in message, message
        messages.append(message)
    assert len(set(messages)) == 10


def test_every_error_is_reported_at_once(tmp_path: Path) -> None:
    text = '[downstreams."a"]\nmin_calls = 0\n\n[switches]\nb = "up"\n'
    with pytest.raises(PolicyFileError) as info:
        load(write(tmp_path, text))
    assert len(info.value.errors) == 2
    assert "2 errors" in str(info.value)


def test_every_error_of_one_table_is_shown_in_file_order() -> None:
    """Issue 16: ``check`` showed one error per table per run, out of file order."""
    text = """
[switches]
a = "up"

[downstreams."x"]
failure_rate = 3
min_calls = 0
buckets = 1.5
open_for = -1

[defaults.retry]
max_retries = -1
base = 0
"""
    problems = problems_of(text)
    assert [(p.line, p.key) for p in problems] == [
        (3, "a"),
        (6, "failure_rate"),
        (7, "min_calls"),
        (8, "buckets"),
        (9, "open_for"),
        (12, "max_retries"),
        (13, "base"),
    ]
    assert problems[1].table == 'downstreams."x"' and problems[1].rule == "must be in (0, 1], got 3"


def test_a_problem_names_file_line_table_key_and_rule() -> None:
    (problem,) = problems_of('\n[tasks."shop.charge".breaker]\nwindow = 1e308\n', "/etc/p.toml")
    assert problem.path == "/etc/p.toml" and problem.line == 3
    assert problem.table == 'tasks."shop.charge".breaker' and problem.key == "window"
    assert problem.rule == "must be <= 315360000 (ten years), got 1e+308"
    assert problem.as_dict()["message"] == str(problem)


@pytest.mark.parametrize(
    ("value", "rule"),
    [
        ("1e308", "must be <= 315360000 (ten years), got 1e+308"),
        ("inf", "must be finite, got inf"),
        ("nan", "must be finite, got nan"),
        ("99999999999999999999", "must be <= 315360000 (ten years)"),
        ("0.0000001", "must be at least 0.001 (one millisecond)"),
        ("true", "must be a number, got bool"),
        ("1979-05-27", "must be a number, got date"),
        ("[1]", "must be a number, got list"),
    ],
)
def test_numbers_that_do_not_fit_in_milliseconds_are_refused_when_read(value: str, rule: str) -> None:
    """Issue 14: ``window = 1e308`` was accepted and every call then failed with OverflowError."""
    (problem,) = problems_of(f'[downstreams."payments"]\nwindow = {value}\n')
    assert (problem.line, problem.key) == (2, "window") and rule in problem.rule


@pytest.mark.parametrize(
    ("text", "line", "where"),
    [
        ("downstreams = 5\n", 1, "downstreams: must be a table"),
        ("\ntasks = []\n", 2, "tasks: must be a table"),
        ("switches = 1\n", 1, "switches: must be a table"),
        ('defaults = "x"\n', 1, "defaults: must be a table of TaskPolicy fields"),
        ("[tasks]\nx = 5\n", 2, "[tasks] x: must be a table of TaskPolicy fields"),
        ('[downstreams]\n"payments" = 5\n', 2, "[downstreams] payments: must be a table of BreakerPolicy"),
        ('[tasks."x"]\nretry = 5\n', 2, '[tasks."x"] retry: must be a table of RetryPolicy fields'),
        ('[tasks."x".retry]\nbudget = 0.5\n', 2, "budget: must be a table of RetryBudget fields, or false"),
        ('[downstreams."x".window]\na = 1\n', 1, '[downstreams."x"] window: must be a number, got dict'),
        ("[[tasks]]\nname = 1\n", 1, "tasks: must be a table"),
        ('[downstreams.""]\nmin_calls = 3\n', 1, '[downstreams] "": a name must not be empty'),
        ("[switches]\npayments = { mode = 1 }\n", 2, "[switches] payments: must be one of normal"),
        ("[defaults]\nbreaker.open_for = { x = 1 }\n", 2, "[defaults.breaker] open_for: must be a number"),
    ],
)
def test_any_shape_gives_a_located_error(text: str, line: int, where: str) -> None:
    """Issue 14: ``downstreams = 5`` broke a reload with AttributeError."""
    (problem,) = problems_of(text)
    assert problem.line == line and where in str(problem), str(problem)


@pytest.mark.parametrize(
    ("data", "line", "rule"),
    [
        (b"[defaults]\ndeadline = 600 # caf\xe9\n", 2, "not UTF-8: byte 0xe9 at offset 31"),
        ("[defaults]\n".encode("utf-16"), 1, "not UTF-8: byte 0xff at offset 0"),
        (b"[defaults]\ndead\x00line = 1\n", 2, "not valid TOML"),
        (b"a = " + b"[" * 5000 + b"]" * 5000, None, "not valid TOML"),
    ],
)
def test_any_encoding_gives_one_error(data: bytes, line: int | None, rule: str) -> None:
    (problem,) = problems_of(data)
    assert problem.line == line and rule in problem.rule, str(problem)


def test_a_utf8_byte_order_mark_is_fine() -> None:
    assert parse("p.toml", "\ufeff[defaults]\ndeadline = 5\n".encode()).defaults == {"deadline": 5.0}


def test_a_file_that_cannot_be_read_is_one_error(tmp_path: Path) -> None:
    for path, rule in ((tmp_path / "missing.toml", "No such file"), (tmp_path, "Is a directory")):
        with pytest.raises(PolicyFileError) as info:
            load(path)
        (problem,) = info.value.problems
        assert (
            problem.path == str(path)
            and rule in problem.rule
            and str(problem).startswith(f"{path}: cannot read")
        )
    with pytest.raises(PolicyFileError, match="cannot read"):
        load("bad\x00name.toml")


def test_file_values_use_the_names_a_file_can_write(tmp_path: Path) -> None:
    text = """
[defaults.retry]
retry_on = "TRANSIENT_ERRORS"
budget = false

[defaults.breaker]
failure_on = ["builtins.ConnectionError", "socket:timeout"]

[defaults.fallback]
function = "os.path.basename"
key = ["customer_id"]
"""
    file = load(write(tmp_path, text))
    assert file.defaults["retry"] == {"retry_on": rt.TRANSIENT_ERRORS, "budget": None}
    assert file.defaults["breaker"]["failure_on"] == (ConnectionError, TimeoutError)
    assert file.defaults["fallback"] == {"function": os.path.basename, "key": ("customer_id",)}
    (problem,) = problems_of('[defaults.fallback]\nfunction = "os.no_such_thing"\n')
    assert "'os.no_such_thing' is not an importable callable" in problem.rule


def test_switch_modes_are_those_the_store_applies() -> None:
    assert SWITCH_MODES == switches.MODES


# -- any input: only PolicyFileError, and every problem has a line --------------------------

_FIELDS = sorted(
    {name for kind in (rt.TaskPolicy, rt.RetryPolicy, rt.BreakerPolicy) for name in policy_fields(kind)}
)
_KEYS = st.sampled_from(
    ["defaults", "downstreams", "tasks", "switches", "payments", "x", "", *_FIELDS]
) | st.text(max_size=4)
_SCALARS = (
    st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.booleans()
    | st.text(max_size=6)
    | st.sampled_from(["ConnectionError", "TRANSIENT_ERRORS", "normal", "full_jitter", "message"])
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_KEYS, inner, max_size=4),
    max_leaves=12,
)
_TABLE = st.dictionaries(st.sampled_from(_FIELDS) | _KEYS, _VALUES, max_size=5)
_SHAPED = st.fixed_dictionaries(
    {},
    optional={
        "defaults": st.dictionaries(st.sampled_from(_FIELDS), _TABLE | _SCALARS, max_size=4),
        "downstreams": st.dictionaries(_KEYS, _TABLE | _SCALARS, max_size=3),
        "tasks": st.dictionaries(
            _KEYS, st.dictionaries(st.sampled_from(_FIELDS), _TABLE | _SCALARS), max_size=3
        ),
        "switches": st.dictionaries(_KEYS, _SCALARS, max_size=3),
    },
)


def toml(value: Any) -> str:
    """A TOML value (inline tables for tables), as a user could write it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return (
            "nan"
            if math.isnan(value)
            else ("inf" if value > 0 else "-inf")
            if math.isinf(value)
            else repr(value)
        )
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(toml(v) for v in value) + "]"
    return "{" + ", ".join(f"{json.dumps(k, ensure_ascii=False)} = {toml(v)}" for k, v in value.items()) + "}"


def document(tables: dict[str, Any]) -> bytes:
    return "\n".join(f"{json.dumps(k, ensure_ascii=False)} = {toml(v)}" for k, v in tables.items()).encode()


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(tables=_SHAPED | st.dictionaries(_KEYS, _VALUES, max_size=5))
def test_any_toml_shape_loads_or_raises_only_policy_file_error_with_lines(tables: dict[str, Any]) -> None:
    try:
        parse("p.toml", document(tables))
    except PolicyFileError as exc:
        assert exc.problems and all(
            p.line is not None or p.rule.startswith("not valid TOML") for p in exc.problems
        )


@settings(max_examples=300)
@given(
    data=st.binary(max_size=200)
    | st.builds(lambda b, i: GOOD.encode()[:i] + b, st.binary(max_size=8), st.integers(0, 400))
)
def test_any_bytes_load_or_raise_only_policy_file_error(data: bytes) -> None:
    try:
        parse("p.toml", data)
    except PolicyFileError as exc:
        assert exc.problems
