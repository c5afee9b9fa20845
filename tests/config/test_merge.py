"""One policy path: code, ``[defaults]``, ``[downstreams.X]`` and ``[tasks."name"]`` merged
by what each layer states, then checked by the policies' own constructors."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import resilient_tasks as rt
from resilient_tasks.config import MergeError, PolicyFile, load, merge, merge_downstream, parse

from .samples import GOOD, write


def file_of(text: str) -> PolicyFile:
    return parse("p.toml", text.encode())


def test_layers_apply_in_precedence_order_and_say_who_set_what(tmp_path: Path) -> None:
    file = load(write(tmp_path, GOOD))
    code = rt.TaskPolicy(
        downstream="payments",
        idempotent=True,
        retry=rt.RetryPolicy(max_retries=7, base=0.5),
        breaker=rt.BreakerPolicy(min_calls=10),
    )
    merged = merge("shop.charge", code, file)
    policy, sources = merged.policy, merged.sources
    assert policy.deadline == 30 and sources["deadline"] == 'tasks."shop.charge"'
    assert policy.retry is not None
    assert policy.retry.max_retries == 2 and sources["retry.max_retries"] == 'tasks."shop.charge"'
    assert policy.retry.base == 0.5 and sources["retry.base"] == "code"
    assert policy.retry.budget == rt.RetryBudget(ratio=0.5, min_per_window=3)
    assert policy.breaker is not None
    assert policy.breaker.window == 30 and sources["breaker.window"] == "defaults"
    assert policy.breaker.failure_rate == 0.25
    assert sources["breaker.failure_rate"] == 'downstreams."payments"'
    assert policy.breaker.min_calls == 10 and sources["breaker.min_calls"] == "code"
    assert policy.breaker.open_for == 12
    assert "breaker.when_open" not in sources, "a field no layer set keeps the class default"
    assert merged.locations["breaker.open_for"] == ("tasks", "shop.charge", "breaker", "open_for")
    other = merge("shop.refund", rt.TaskPolicy(downstream="payments"), file).policy
    assert other.deadline == 600 and other.breaker is not None and other.breaker.min_calls == 40


def test_defaults_never_add_retries_to_a_task_that_has_none(tmp_path: Path) -> None:
    file = load(write(tmp_path, "[defaults.retry]\nmax_retries = 9\n"))
    assert merge("t", rt.TaskPolicy(), file).policy.retry is None


def test_a_code_value_equal_to_the_default_still_beats_the_file_defaults() -> None:
    """Issue 14: ``BreakerPolicy(open_for=30)`` lost to ``[defaults.breaker] open_for = 5``."""
    file = file_of("[defaults.breaker]\nopen_for = 5\nwindow = 30\n")
    code = rt.TaskPolicy(downstream="payments", breaker=rt.BreakerPolicy(open_for=30))
    merged = merge("t", code, file)
    assert merged.policy.breaker is not None
    assert merged.policy.breaker.open_for == 30 and merged.sources["breaker.open_for"] == "code"
    assert merged.policy.breaker.window == 30 and merged.sources["breaker.window"] == "defaults"
    unstated = merge("t", rt.TaskPolicy(downstream="payments", breaker=rt.BreakerPolicy()), file)
    assert unstated.policy.breaker is not None and unstated.policy.breaker.open_for == 5


def test_a_file_table_counts_only_the_keys_written_in_it() -> None:
    file = file_of('[tasks."t".breaker]\nopen_for = 12\n[downstreams."p"]\nmin_calls = 40\n')
    code = rt.TaskPolicy(downstream="p", breaker=rt.BreakerPolicy(min_calls=10, failure_rate=0.9))
    breaker = merge("t", code, file).policy.breaker
    assert breaker == rt.BreakerPolicy(min_calls=10, failure_rate=0.9, open_for=12)


def test_the_merged_policy_is_built_by_the_constructors() -> None:
    file = file_of('[tasks."t".breaker]\nopen_for = 12\n')
    merged = merge("t", rt.TaskPolicy(downstream="p", breaker=rt.BreakerPolicy(min_calls=10)), file).policy
    assert type(merged.breaker) is rt.BreakerPolicy
    assert merged.fields_set == {"downstream", "breaker"}
    assert merged.breaker is not None and merged.breaker.fields_set == {"min_calls", "open_for"}


def test_without_a_file_the_code_policy_is_returned_as_it_is() -> None:
    code = rt.TaskPolicy(downstream="p", breaker=rt.BreakerPolicy(min_calls=10))
    assert merge("t", code, None).policy is code
    assert merge("t", code, file_of("")).policy is code


def test_retry_from_the_file_on_work_that_is_not_idempotent_is_refused_at_its_table() -> None:
    """Issue 14: ``[tasks."x".retry]`` on a task that is not idempotent passed ``check``
    and the worker started; every call then failed with PolicyError."""
    file = file_of('[tasks."x"]\ndeadline = 5\n\n[tasks."x".retry]\nmax_retries = 2\n')
    with pytest.raises(MergeError) as info:
        merge("x", rt.TaskPolicy(downstream="p"), file)
    assert info.value.field == "TaskPolicy.retry" and "only idempotent work is retried" in info.value.rule
    assert info.value.where == ("tasks", "x", "retry")
    assert merge("x", rt.TaskPolicy(idempotent=True), file).policy.retry == rt.RetryPolicy(max_retries=2)


def test_a_rule_broken_across_layers_blames_the_most_specific_file_key() -> None:
    file = file_of('[defaults.breaker]\nopen_for_max = 100\n\n[tasks."t".breaker]\nopen_for = 300\n')
    with pytest.raises(MergeError) as info:
        merge("t", rt.TaskPolicy(downstream="p"), file)
    assert info.value.field == "BreakerPolicy.open_for_max" and info.value.where == (
        "tasks",
        "t",
        "breaker",
        "open_for",
    )
    with pytest.raises(MergeError) as info:
        merge("u", rt.TaskPolicy(downstream="p", breaker=rt.BreakerPolicy(open_for=300)), file)
    assert info.value.where == ("defaults", "breaker", "open_for_max")
    code_only = rt.TaskPolicy(downstream="p", breaker=rt.BreakerPolicy(open_for=300, open_for_max=400))
    assert merge("u", code_only, file).policy.breaker == code_only.breaker, "the code's own pair is kept"


def test_a_rule_broken_with_the_code_names_the_file_key() -> None:
    file = file_of('[tasks."t".retry]\ncap = 0.5\n')
    code = rt.TaskPolicy(idempotent=True, retry=rt.RetryPolicy(base=2, cap=10))
    with pytest.raises(MergeError) as info:
        merge("t", code, file)
    assert info.value.where == ("tasks", "t", "retry", "cap") and "must be >= base (2)" in info.value.rule


def test_a_fallback_added_by_the_file_needs_its_key() -> None:
    with pytest.raises(MergeError, match="FallbackPolicy.key: is required") as info:
        merge("t", rt.TaskPolicy(), file_of('[tasks."t".fallback]\nttl = 60\n'))
    assert info.value.where is None or info.value.where[:2] == ("tasks", "t")
    added = merge("t", rt.TaskPolicy(), file_of('[tasks."t".fallback]\nkey = ["sku"]\n')).policy
    assert added.fallback == rt.FallbackPolicy(key=("sku",))


def test_a_retry_budget_merges_field_by_field_and_false_turns_it_off() -> None:
    file = file_of("[defaults.retry]\nbudget = { ratio = 0.5 }\n")
    with_budget = rt.TaskPolicy(
        idempotent=True, retry=rt.RetryPolicy(budget=rt.RetryBudget(min_per_window=3))
    )
    retry = merge("t", with_budget, file).policy.retry
    assert retry is not None and retry.budget == rt.RetryBudget(ratio=0.5, min_per_window=3)
    no_budget = rt.TaskPolicy(idempotent=True, retry=rt.RetryPolicy(budget=None))
    retry = merge("t", no_budget, file).policy.retry
    assert retry is not None and retry.budget is None, "the code's budget=None beats [defaults]"
    off = file_of('[tasks."t".retry]\nbudget = false\n')
    retry = merge("t", rt.TaskPolicy(idempotent=True, retry=rt.RetryPolicy()), off).policy.retry
    assert retry is not None and retry.budget is None
    on = file_of('[tasks."t".retry]\nbudget = { ratio = 0.1 }\n')
    retry = merge("t", no_budget, on).policy.retry
    assert retry is not None and retry.budget == rt.RetryBudget(ratio=0.1)


def test_the_task_table_may_add_what_the_code_left_out_or_set_to_none() -> None:
    file = file_of('[tasks."t".retry]\nmax_retries = 1\n[tasks."t".breaker]\nmin_calls = 5\n')
    policy = merge("t", rt.TaskPolicy(idempotent=True, retry=None), file).policy
    assert policy.retry == rt.RetryPolicy(max_retries=1)
    assert policy.breaker == rt.BreakerPolicy(min_calls=5)


def test_a_downstream_named_by_the_file_brings_its_table() -> None:
    file = file_of('[tasks."t"]\ndownstream = "inventory"\n[downstreams."inventory"]\nmin_calls = 7\n')
    merged = merge("t", rt.TaskPolicy(downstream="payments"), file)
    assert merged.policy.downstream == "inventory" and merged.policy.breaker == rt.BreakerPolicy(min_calls=7)
    assert merged.sources["breaker"] == 'tasks."t"'


def test_self_downstream_uses_the_downstream_table_over_the_tasks_own_breaker() -> None:
    file = file_of(
        "[defaults.breaker]\nwindow = 30\n"
        '[downstreams."warehouse-db"]\nfailure_rate = 0.3\n'
        '[downstreams."payments"]\nmin_calls = 40\n'
        '[tasks."t".breaker]\nopen_for = 12\n'
    )
    code = rt.TaskPolicy(downstream="payments", breaker=rt.BreakerPolicy(failure_rate=0.9, min_calls=10))
    side = merge_downstream("warehouse-db", "t", code, file)
    assert side.policy == rt.BreakerPolicy(failure_rate=0.3, min_calls=10, window=30, open_for=12)
    assert (
        side.sources["failure_rate"] == 'downstreams."warehouse-db"' and side.sources["min_calls"] == "code"
    )
    unknown = merge_downstream("cache", "t", code, file).policy
    assert unknown == rt.BreakerPolicy(failure_rate=0.9, min_calls=10, window=30, open_for=12)
    own = merge_downstream("payments", "t", code, file)
    assert own.policy == merge("t", code, file).policy.breaker and own.sources["open_for"] == 'tasks."t"'
    assert merge_downstream("cache", "t", rt.TaskPolicy(), None).policy == rt.BreakerPolicy()


# -- a property: each field comes from the highest layer that states it ---------------------

_OPEN_FOR = st.sampled_from([5, 30, 200])
_MIN_CALLS = st.sampled_from([1, 20, 40])


def _table(**values: Any) -> str:
    return "".join(f"{k} = {v}\n" for k, v in values.items() if v is not None)


@given(
    code=st.fixed_dictionaries({}, optional={"open_for": _OPEN_FOR, "min_calls": _MIN_CALLS}),
    defaults=st.fixed_dictionaries(
        {}, optional={"open_for_max": st.sampled_from([10, 100]), "min_calls": _MIN_CALLS}
    ),
    downstream=st.fixed_dictionaries({}, optional={"open_for": _OPEN_FOR, "min_calls": _MIN_CALLS}),
    ops=st.fixed_dictionaries({}, optional={"open_for": _OPEN_FOR}),
)
def test_each_field_comes_from_the_highest_layer_that_states_it(
    code: dict[str, Any], defaults: dict[str, Any], downstream: dict[str, Any], ops: dict[str, Any]
) -> None:
    text = (
        f"[defaults.breaker]\n{_table(**defaults)}"
        f'[downstreams."p"]\n{_table(**downstream)}'
        f'[tasks."t".breaker]\n{_table(**ops)}'
    )
    file = file_of(text)
    expected: dict[str, Any] = {}
    for layer in (defaults, downstream, code, ops):
        expected.update(layer)
    task = rt.TaskPolicy(downstream="p", breaker=rt.BreakerPolicy(**code))
    try:
        built = rt.BreakerPolicy(**expected)
    except rt.PolicyError:
        with pytest.raises(MergeError) as info:
            merge("t", task, file)
        assert info.value.where is not None and info.value.where[-1] in ("open_for", "open_for_max")
        return
    merged = merge("t", task, file).policy.breaker
    assert merged == built and merged is not None and merged.fields_set == set(expected)
    assert dataclasses.asdict(merged) == dataclasses.asdict(built)
