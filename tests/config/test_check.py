"""Checking a whole file against the registered tasks: every rule a task would break, at
its file key, in file order; names no task uses are warnings (errors with ``strict``)."""

from __future__ import annotations

import pytest

import resilient_tasks as rt
from resilient_tasks.config import PolicyFile, PolicyFileError, check, parse

TEXT = """
[defaults.breaker]
open_for_max = 100

[downstreams."payments"]
min_calls = 40

[downstreams."ghost"]
min_calls = 3

[tasks."shop.notify".retry]
max_retries = 2

[tasks."shop.charge".breaker]
open_for = 7200

[tasks."shop.gone"]
deadline = 5

[switches]
payments = "normal"
typo = "forced_open"
"""

TASKS = {
    "shop.charge": rt.TaskPolicy(downstream="payments", idempotent=True),
    "shop.notify": rt.TaskPolicy(downstream="mail"),
    "shop.refund": rt.TaskPolicy(downstream="payments", breaker=rt.BreakerPolicy(open_for=300)),
    "shop.audit": rt.TaskPolicy(downstream="audit", breaker=rt.BreakerPolicy(open_for=300)),
}


def file_of(text: str) -> PolicyFile:
    return parse("p.toml", text.encode())


def test_every_rule_a_task_would_break_is_an_error_at_its_file_key_in_file_order() -> None:
    report = check(file_of(TEXT), TASKS)
    assert [str(p) for p in report.errors] == [
        'p.toml:3: line 3, [defaults.breaker] open_for_max: must be >= open_for (300), got 100 (tasks "shop.refund", "shop.audit")',
        'p.toml:11: line 11, [tasks."shop.notify"] retry: only idempotent work is retried: add '
        'idempotency=IdempotencyPolicy(...) or declare idempotent=True (task "shop.notify")',
        'p.toml:15: line 15, [tasks."shop.charge".breaker] open_for: BreakerPolicy.open_for_max: '
        'must be >= open_for (7200), got 100 (task "shop.charge")',
    ]
    assert not report.ok and set(report.policies) == set()
    with pytest.raises(PolicyFileError) as info:
        report.raise_errors()
    assert len(info.value.problems) == 3


def test_names_no_registered_task_uses_are_warnings_or_errors_when_strict() -> None:
    text = TEXT.replace("open_for_max = 100", "open_for_max = 9000")
    tasks = {**TASKS, "shop.notify": rt.TaskPolicy(downstream="mail", idempotent=True)}
    report = check(file_of(text), tasks)
    assert report.ok and set(report.policies) == set(tasks)
    assert [(p.line, p.table, p.key) for p in report.warnings] == [
        (8, 'downstreams."ghost"', None),
        (17, 'tasks."shop.gone"', None),
        (22, "switches", "typo"),
    ]
    strict = check(file_of(text), tasks, strict=True)
    assert [p.line for p in strict.errors] == [8, 17, 22] and not strict.warnings


def _visibility(name: str, policy: rt.TaskPolicy) -> str | None:
    """The shape of the runtime's rule: it names the field behind the longest wait."""
    breaker = policy.breaker
    if breaker is not None and (breaker.open_for_max or breaker.open_for) + 5 >= 3600:
        return f"3600s must be above the longest wait ({name}: BreakerPolicy.open_for (+5 s jitter))"
    return None


def test_an_extra_rule_is_checked_on_the_merged_policy_and_located_by_the_field_it_names() -> None:
    """Issue 14: ``open_for = 7200`` from the file escaped the visibility-timeout refusal."""
    text = '[tasks."shop.charge".breaker]\nopen_for = 7200\n'
    report = check(file_of(text), TASKS, extra=_visibility)
    (error,) = report.errors
    assert (error.line, error.table, error.key) == (2, 'tasks."shop.charge".breaker', "open_for")
    assert "3600s must be above the longest wait" in error.rule
    assert check(file_of(text), TASKS).ok, "without the extra rule the file itself is fine"


def test_an_extra_rule_may_raise_policy_error_and_may_concern_the_code_alone() -> None:
    def refuse(name: str, policy: rt.TaskPolicy) -> str | None:
        if name == "shop.audit":
            raise rt.PolicyError("broker_transport_options.visibility_timeout", "too short")
        return None

    (error,) = check(file_of(""), TASKS, extra=refuse).errors
    assert (
        error.line is None
        and str(error) == 'p.toml: task "shop.audit": broker_transport_options.visibility_timeout: too short'
    )
