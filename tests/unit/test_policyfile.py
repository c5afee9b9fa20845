"""The worker policies file: layers, precise errors, what a running worker may reload."""

from __future__ import annotations

from pathlib import Path

import pytest

import resilient_tasks as rt
from resilient_tasks.policyfile import PolicyFileError, load, merge_live, resolve

GOOD = """
[defaults]
deadline = 600

[defaults.breaker]
window = 30
open_for = 5

[downstreams."payments"]
failure_rate = 0.25
min_calls = 40

[tasks."shop.charge"]
deadline = 30

[tasks."shop.charge".retry]
max_retries = 2
retry_on = ["ConnectionError", "socket.timeout"]
budget = { ratio = 0.5, min_per_window = 3 }

[tasks."shop.charge".breaker]
open_for = 12

[switches]
inventory = "fallback_only"
"""


def write(tmp_path: Path, text: str, name: str = "policies.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_layers_apply_in_precedence_order_and_say_who_set_what(tmp_path: Path) -> None:
    file = load(write(tmp_path, GOOD))
    code = rt.TaskPolicy(
        downstream="payments",
        idempotent=True,
        retry=rt.RetryPolicy(max_retries=7, base=0.5),
        breaker=rt.BreakerPolicy(min_calls=10),
    )
    resolved = resolve("shop.charge", code, file)
    policy = resolved.policy
    assert policy.deadline == 30 and resolved.sources["deadline"] == 'tasks."shop.charge"'
    assert policy.retry is not None
    assert policy.retry.max_retries == 2 and resolved.sources["retry.max_retries"] == 'tasks."shop.charge"'
    assert policy.retry.base == 0.5 and resolved.sources["retry.base"] == "code"
    assert policy.retry.budget == rt.RetryBudget(ratio=0.5, min_per_window=3)
    assert policy.breaker is not None
    assert policy.breaker.window == 30 and resolved.sources["breaker.window"] == "defaults"
    assert policy.breaker.failure_rate == 0.25
    assert resolved.sources["breaker.failure_rate"] == 'downstreams."payments"'
    assert policy.breaker.min_calls == 10 and resolved.sources["breaker.min_calls"] == "code"
    assert policy.breaker.open_for == 12
    other = resolve("shop.refund", rt.TaskPolicy(downstream="payments"), file).policy
    assert other.deadline == 600 and other.breaker is not None and other.breaker.min_calls == 40
    assert file.switches == {"inventory": "fallback_only"}


def test_defaults_never_add_retries_to_a_task_that_has_none(tmp_path: Path) -> None:
    file = load(write(tmp_path, "[defaults.retry]\nmax_retries = 9\n"))
    assert resolve("t", rt.TaskPolicy(), file).policy.retry is None


BROKEN = {
    "unknown_table.toml": ("[defualts]\ndeadline = 1\n", "unknown table"),
    "syntax.toml": ("[defaults\n", "not valid TOML"),
    "unknown_key.toml": (
        '[downstreams."payments"]\nfailure_ratio = 0.5\n',
        'line 2, [downstreams."payments"] failure_ratio: unknown key',
    ),
    "range.toml": (
        '[downstreams."payments"]\n\nfailure_rate = 2\n',
        'line 3, [downstreams."payments"] failure_rate: must be in (0, 1], got 2',
    ),
    "type.toml": (
        '[defaults.retry]\nmax_retries = "five"\n',
        "line 2, [defaults.retry] max_retries: must be an integer, got str",
    ),
    "exception.toml": (
        '[tasks."a"]\n[tasks."a".retry]\nretry_on = ["NoSuchError"]\n',
        "line 3, [tasks.\"a\".retry] retry_on: 'NoSuchError' is not an importable exception type",
    ),
    "switch.toml": ('[switches]\npayments = "off"\n', "line 2, [switches] payments: must be one of normal"),
    "task_key.toml": (
        '[tasks."a"]\nretries = 3\n',
        'line 2, [tasks."a"] retries: unknown key; a task table has',
    ),
    "backoff.toml": (
        '[defaults.retry]\nbackoff = "linear"\n',
        "line 2, [defaults.retry] backoff: must be one of full_jitter",
    ),
    "cross_field.toml": (
        "[defaults.breaker]\nopen_for = 60\nopen_for_max = 10\n",
        "[defaults.breaker] open_for_max: must be >= open_for",
    ),
}


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


def test_a_running_worker_takes_breaker_changes_and_reports_the_rest(tmp_path: Path) -> None:
    old = load(write(tmp_path, GOOD, "old.toml"))
    changed = GOOD.replace("min_calls = 40", "min_calls = 5").replace("max_retries = 2", "max_retries = 4")
    changed = changed.replace("open_for = 12", "open_for = 3").replace('"fallback_only"', '"normal"')
    new = load(write(tmp_path, changed, "new.toml"))
    live, refused = merge_live(old, new)
    assert live.downstreams["payments"].min_calls == 5
    assert live.tasks["shop.charge"]["breaker"]["open_for"] == 3
    assert live.switches == {"inventory": "normal"}
    assert live.tasks["shop.charge"]["retry"]["max_retries"] == 2, "retry changes wait for a restart"
    assert refused == ['[tasks."shop.charge"] (other than its breaker table)']
