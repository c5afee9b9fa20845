"""Policies validate every field when built, and name the field in the error."""

from __future__ import annotations

import ast
import copy
import dataclasses
import inspect
import math
import pickle
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import resilient_tasks
import resilient_tasks as rt
from resilient_tasks.backoff import STRATEGIES
from resilient_tasks.policy import (
    BACKOFF_STRATEGIES,
    MAX_BUCKETS,
    MAX_COUNT,
    MAX_SECONDS,
    check_field,
    check_relations,
    matches,
    policy_fields,
    related_fields,
)

BAD = [
    (lambda: rt.RetryPolicy(max_retries=-1), "RetryPolicy.max_retries", ">= 0"),
    (lambda: rt.RetryPolicy(max_retries=1.5), "RetryPolicy.max_retries", "integer"),
    (lambda: rt.RetryPolicy(base=0), "RetryPolicy.base", "> 0"),
    (lambda: rt.RetryPolicy(base=float("nan")), "RetryPolicy.base", "finite"),
    (lambda: rt.RetryPolicy(base=10, cap=1), "RetryPolicy.cap", ">= base"),
    (lambda: rt.RetryPolicy(backoff="linear"), "RetryPolicy.backoff", "one of"),
    (lambda: rt.RetryPolicy(retry_on=("oops",)), "RetryPolicy.retry_on", "not an exception type"),
    (lambda: rt.RetryPolicy(retry_on=42), "RetryPolicy.retry_on", "exception types or a predicate"),
    (lambda: rt.IdempotencyPolicy(key=()), "IdempotencyPolicy.key", "at least one"),
    (lambda: rt.IdempotencyPolicy(key=("order id",)), "IdempotencyPolicy.key", "argument name"),
    (lambda: rt.IdempotencyPolicy(ttl=0), "IdempotencyPolicy.ttl", "> 0"),
    (lambda: rt.IdempotencyPolicy(ttl=10, lease=20), "IdempotencyPolicy.lease", "<= ttl"),
    (lambda: rt.IdempotencyPolicy(on_duplicate="retry"), "IdempotencyPolicy.on_duplicate", "defer, drop"),
    (lambda: rt.BreakerPolicy(failure_rate=0), "BreakerPolicy.failure_rate", "(0, 1]"),
    (lambda: rt.BreakerPolicy(min_calls=0), "BreakerPolicy.min_calls", ">= 1"),
    (lambda: rt.BreakerPolicy(half_open_probes=0), "BreakerPolicy.half_open_probes", ">= 1"),
    (lambda: rt.BreakerPolicy(open_for=30, open_for_max=10), "BreakerPolicy.open_for_max", ">= open_for"),
    (lambda: rt.BreakerPolicy(slow_call_rate=0.5), "BreakerPolicy.slow_call_rate", "slow_call"),
    (lambda: rt.BreakerPolicy(when_open="queue"), "BreakerPolicy.when_open", "defer, fallback, fail"),
    (lambda: rt.FallbackPolicy(key=("k",), decay=1.5), "FallbackPolicy.decay", "(0, 1]"),
    (lambda: rt.FallbackPolicy(key=("k",), ttl=10, floor=20), "FallbackPolicy.floor", "<= ttl"),
    (lambda: rt.FallbackPolicy(key=("k",), function=3), "FallbackPolicy.function", "callable"),
    (lambda: rt.FallbackPolicy(key="message"), "FallbackPolicy.key", "never repeats"),
    (lambda: rt.RetryPolicy(budget=0.2), "RetryPolicy.budget", "RetryBudget"),
    (lambda: rt.RetryBudget(ratio=-1), "RetryBudget.ratio", ">= 0"),
    (lambda: rt.TaskPolicy(deadline=-1), "TaskPolicy.deadline", "> 0"),
    (lambda: rt.TaskPolicy(downstream=""), "TaskPolicy.downstream", "non-empty"),
    (lambda: rt.TaskPolicy(retry=rt.RetryPolicy()), "TaskPolicy.retry", "only idempotent work"),
    (lambda: rt.TaskPolicy(breaker="fast"), "TaskPolicy.breaker", "BreakerPolicy"),
]


@pytest.mark.parametrize(("build", "field", "rule"), BAD, ids=[f for _, f, _ in BAD])
def test_bad_value_names_field_and_rule(build: object, field: str, rule: str) -> None:
    with pytest.raises(rt.PolicyError) as info:
        build()  # type: ignore[operator]
    assert info.value.field == field
    assert rule in str(info.value)


def test_policies_are_frozen_and_replace_revalidates() -> None:
    policy = rt.RetryPolicy()
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.max_retries = 9  # type: ignore[misc]
    assert dataclasses.replace(policy, max_retries=9).max_retries == 9
    with pytest.raises(rt.PolicyError, match="RetryPolicy.base"):
        dataclasses.replace(policy, base=-2)


def test_retry_on_accepts_single_type_list_or_predicate() -> None:
    assert rt.RetryPolicy(retry_on=KeyError).retry_on == (KeyError,)
    assert rt.RetryPolicy(retry_on=[KeyError, OSError]).retry_on == (KeyError, OSError)
    predicate = rt.RetryPolicy(retry_on=lambda exc: "503" in str(exc)).retry_on
    assert callable(predicate)


def test_retry_is_allowed_for_declared_or_deduplicated_work() -> None:
    assert rt.TaskPolicy(idempotent=True, retry=rt.RetryPolicy()).retries_allowed
    assert rt.TaskPolicy(idempotency=rt.IdempotencyPolicy(), retry=rt.RetryPolicy()).retries_allowed


# -- fields_set: what the author stated, not what equals the default -------------------------


def test_fields_set_records_positional_and_keyword_arguments_even_when_equal_to_the_default() -> None:
    assert rt.BreakerPolicy(open_for=30).fields_set == {"open_for"}
    assert rt.BreakerPolicy(0.5, 20, window=60).fields_set == {"failure_rate", "min_calls", "window"}
    assert rt.BreakerPolicy().fields_set == frozenset()
    assert rt.FallbackPolicy(("k",)).fields_set == {"key"}
    task = rt.TaskPolicy(idempotent=False, retry=None)
    assert task.fields_set == {"idempotent", "retry"}


def test_fields_set_changes_neither_equality_nor_hash_nor_repr() -> None:
    stated, unstated = rt.BreakerPolicy(open_for=30), rt.BreakerPolicy()
    assert stated == unstated and hash(stated) == hash(unstated) and repr(stated) == repr(unstated)
    assert len({stated, unstated}) == 1


def test_fields_set_is_read_only_and_survives_pickle_and_copy() -> None:
    policy = rt.RetryPolicy(max_retries=3)
    with pytest.raises(AttributeError):
        policy.fields_set = frozenset()  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(policy)).fields_set == {"max_retries"}
    assert copy.copy(policy).fields_set == {"max_retries"}
    assert copy.deepcopy(policy).fields_set == {"max_retries"}


def test_replace_counts_every_field_as_set_because_it_passes_them_all() -> None:
    policy = dataclasses.replace(rt.BreakerPolicy(open_for=30), window=5)
    assert policy.window == 5 and policy.open_for == 30
    assert policy.fields_set == set(policy_fields(rt.BreakerPolicy))


def test_constructors_keep_their_signatures() -> None:
    signature = inspect.signature(rt.BreakerPolicy)
    assert list(signature.parameters)[:3] == ["failure_rate", "min_calls", "window"]
    assert signature.parameters["open_for"].default == 30.0
    assert next(iter(inspect.signature(rt.FallbackPolicy).parameters)) == "key"


# -- numbers reach Redis and Lua as integer milliseconds --------------------------------------

SECONDS = [
    (rt.RetryPolicy, "base", {"cap": MAX_SECONDS}),
    (rt.RetryPolicy, "cap", {"base": 0.001}),
    (rt.IdempotencyPolicy, "ttl", {}),
    (rt.IdempotencyPolicy, "lease", {"ttl": MAX_SECONDS}),
    (rt.BreakerPolicy, "window", {"buckets": 1}),
    (rt.BreakerPolicy, "slow_call", {}),
    (rt.BreakerPolicy, "open_for", {}),
    (rt.BreakerPolicy, "open_for_max", {"open_for": 0.001}),
    (rt.FallbackPolicy, "ttl", {"key": ("k",), "floor": 0.001}),
    (rt.FallbackPolicy, "floor", {"key": ("k",), "ttl": MAX_SECONDS}),
    (rt.FallbackPolicy, "max_stale", {"key": ("k",)}),
    (rt.FallbackPolicy, "negative_ttl", {"key": ("k",)}),
    (rt.TaskPolicy, "deadline", {}),
]


@pytest.mark.parametrize(("kind", "name", "others"), SECONDS, ids=[f"{k.__name__}.{n}" for k, n, _ in SECONDS])
@pytest.mark.parametrize(
    ("value", "rule"),
    [
        (math.inf, "finite"),
        (math.nan, "finite"),
        (1e308, "<= 315360000 (ten years)"),
        (10**400, "<= 315360000 (ten years)"),
        (1e-9, "at least 0.001"),
        (True, "must be a number, got bool"),
        ("5", "must be a number, got str"),
    ],
    ids=["inf", "nan", "1e308", "10**400", "1e-9", "bool", "str"],
)
def test_every_duration_is_finite_and_fits_in_integer_milliseconds(
    kind: type, name: str, others: dict[str, object], value: object, rule: str
) -> None:
    with pytest.raises(rt.PolicyError) as info:
        kind(**others, **{name: value})
    assert info.value.field == f"{kind.__name__}.{name}"
    assert rule in info.value.rule
    kind(**others, **{name: MAX_SECONDS})  # the limit itself is fine
    assert int(MAX_SECONDS * 1000) + 2_000_000_000_000 < 2**53  # still exact in Lua, added to now_ms


COUNTS = [
    (rt.RetryPolicy, "max_retries", MAX_COUNT),
    (rt.RetryBudget, "min_per_window", MAX_COUNT),
    (rt.BreakerPolicy, "min_calls", MAX_COUNT),
    (rt.BreakerPolicy, "buckets", MAX_BUCKETS),
    (rt.BreakerPolicy, "consecutive_failures", MAX_COUNT),
    (rt.BreakerPolicy, "half_open_probes", MAX_COUNT),
    (rt.BreakerPolicy, "max_deferrals", MAX_COUNT),
]


@pytest.mark.parametrize(("kind", "name", "limit"), COUNTS, ids=[f"{k.__name__}.{n}" for k, n, _ in COUNTS])
def test_every_count_has_a_maximum(kind: type, name: str, limit: int) -> None:
    kind(**{name: limit})
    for value in (limit + 1, 10**400):
        with pytest.raises(rt.PolicyError) as info:
            kind(**{name: value})
        assert info.value.field == f"{kind.__name__}.{name}" and f"<= {limit}" in info.value.rule


def test_other_numbers_are_bounded_too() -> None:
    with pytest.raises(rt.PolicyError, match=r"RetryBudget.ratio: must be <= 1000"):
        rt.RetryBudget(ratio=1e308)
    with pytest.raises(rt.PolicyError, match="FallbackPolicy.max_size: must be <= 536870912"):
        rt.FallbackPolicy(key=("k",), max_size=2**40)
    with pytest.raises(rt.PolicyError, match=r"BreakerPolicy.failure_rate: must be finite"):
        rt.BreakerPolicy(failure_rate=math.nan)
    with pytest.raises(rt.PolicyError, match=r"BreakerPolicy.window: must be at least one millisecond per bucket"):
        rt.BreakerPolicy(window=0.005, buckets=10)


@given(value=st.floats(allow_nan=True, allow_infinity=True) | st.integers(min_value=-(10**30), max_value=10**30))
def test_any_number_is_refused_or_converts_to_exact_positive_milliseconds(value: float) -> None:
    try:
        policy = rt.BreakerPolicy(open_for=value, open_for_max=None)
    except rt.PolicyError as exc:
        assert exc.field == "BreakerPolicy.open_for"
        return
    assert 1 <= int(policy.open_for * 1000) <= MAX_SECONDS * 1000


# -- the policy layer stands alone ------------------------------------------------------------


def test_strategy_names_match_the_backoff_module() -> None:
    assert tuple(STRATEGIES) == BACKOFF_STRATEGIES


@pytest.mark.parametrize("module", ["policy.py", "transient.py"])
def test_policy_modules_import_nothing_of_ours_but_errors(module: str) -> None:
    tree = ast.parse((Path(resilient_tasks.__file__).parent / module).read_text())
    ours = {
        node.module
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.level > 0 and node.module is not None
    }
    assert ours <= {"errors", "transient"}, ours


def test_transient_errors_are_the_default_retry_on_and_exported() -> None:
    assert rt.RetryPolicy().retry_on is rt.TRANSIENT_ERRORS
    assert "TRANSIENT_ERRORS" in rt.__all__
    assert matches(rt.RetryPolicy().retry_on, ConnectionResetError())
    assert not matches(rt.RetryPolicy().retry_on, ValueError())
    assert rt.RetryPolicy(retry_on=rt.TRANSIENT_ERRORS).retry_on is rt.TRANSIENT_ERRORS
    assert rt.RetryPolicy(retry_on=tuple(rt.TRANSIENT_ERRORS)) != rt.RetryPolicy(), "a plain tuple has no statuses"


def test_fields_can_be_checked_one_at_a_time_as_the_constructor_does() -> None:
    assert check_field(rt.BreakerPolicy, "open_for", 5) == 5.0
    with pytest.raises(rt.PolicyError, match="BreakerPolicy.open_for: must be finite"):
        check_field(rt.BreakerPolicy, "open_for", math.inf)
    with pytest.raises(rt.PolicyError, match="unknown field"):
        check_field(rt.BreakerPolicy, "open_four", 5)
    assert check_relations(rt.BreakerPolicy, {"open_for_max": 10}) == [], "open_for not given: not checked"
    (broken,) = check_relations(rt.BreakerPolicy, {"open_for": 60, "open_for_max": 10})
    assert broken.field == "BreakerPolicy.open_for_max"
    assert related_fields(rt.BreakerPolicy, "open_for_max") == ("open_for",)
    assert related_fields(rt.TaskPolicy, "retry") == ("idempotency", "idempotent")
