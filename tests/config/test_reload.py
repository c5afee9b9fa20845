"""A running worker re-reads the file: breaker settings and switches apply at once, the
rest waits for a restart, and a bad file of any kind keeps the last good one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import resilient_tasks as rt
from resilient_tasks.config import PolicyFile, live, load, reload

from .samples import GOOD, write


def test_a_running_worker_takes_breaker_changes_and_reports_the_rest(tmp_path: Path) -> None:
    old = load(write(tmp_path, GOOD, "old.toml"))
    changed = GOOD.replace("min_calls = 40", "min_calls = 5").replace("max_retries = 2", "max_retries = 4")
    changed = changed.replace("open_for = 12", "open_for = 3").replace('"fallback_only"', '"normal"')
    new = load(write(tmp_path, changed, "new.toml"))
    current, pending = live(old, new)
    assert current.downstreams["payments"]["min_calls"] == 5
    assert current.tasks["shop.charge"]["breaker"]["open_for"] == 3
    assert current.switches == {"inventory": "normal"}
    assert current.tasks["shop.charge"]["retry"]["max_retries"] == 2, "retry changes wait for a restart"
    assert pending == ('[tasks."shop.charge"] (other than its breaker table)',)


def test_reload_applies_a_good_change(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    last = load(path)
    assert reload(last) == reload(last) and not reload(last).changed and reload(last).error is None
    write(
        tmp_path, GOOD.replace("min_calls = 40", "min_calls = 5").replace("deadline = 600", "deadline = 60")
    )
    result = reload(last)
    assert result.changed and result.error is None
    assert result.file.downstreams["payments"]["min_calls"] == 5
    assert result.file.defaults["deadline"] == 600
    assert result.pending == ("[defaults] (other than [defaults.breaker])",)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"downstreams = 5\n", "downstreams: must be a table"),
        (b"tasks = []\n", "tasks: must be a table"),
        (b'[downstreams."payments"]\nmin_calls = { a = 1 }\n', "min_calls: must be an integer"),
        (b"[defaults.breaker]\nwindow = 1e308\n", "must be <= 315360000"),
        (b"[switches]\npayments = 5\n", "[switches] payments: must be one of"),
        (b'[downstreams."payments"]\nmin_calls = 4 # \xff\n', "not UTF-8"),
        ("[defaults]\n".encode("utf-16"), "not UTF-8"),
        (b"[defaults\n", "not valid TOML"),
    ],
)
def test_a_bad_file_of_any_kind_keeps_the_last_good_one(tmp_path: Path, data: bytes, expected: str) -> None:
    """Issue 14: a reload of ``downstreams = 5`` or of a file not in UTF-8 failed a job per
    reload check with AttributeError/UnicodeDecodeError."""
    path = write(tmp_path, GOOD)
    last = load(path)
    write(tmp_path, data)
    result = reload(last)
    assert result.file is last and not result.changed
    assert result.error is not None and expected in result.error
    assert result.mtime == os.stat(path).st_mtime, "the refused version is known, so it is not read again"


def test_a_file_that_vanished_or_became_a_directory_keeps_the_last_good_one(tmp_path: Path) -> None:
    path = Path(write(tmp_path, GOOD))
    last = load(path)
    path.unlink()
    assert reload(last).file is last and "cannot read" in str(reload(last).error)
    path.mkdir()
    assert reload(last).file is last and "Is a directory" in str(reload(last).error)


def test_a_change_that_would_break_a_task_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    last = load(path)
    tasks = {"shop.charge": rt.TaskPolicy(downstream="payments", breaker=rt.BreakerPolicy(open_for=60))}
    write(tmp_path, GOOD.replace("open_for = 5", "open_for = 5\nopen_for_max = 10"))
    result = reload(last, tasks=tasks)
    assert result.file is last and result.error is not None
    assert "BreakerPolicy.open_for_max: must be >= open_for (12), got 10" in result.error
    assert reload(last).changed, "without the tasks the same file is taken"


def test_even_a_failing_extra_rule_does_not_raise(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    last = load(path)
    write(tmp_path, GOOD.replace("min_calls = 40", "min_calls = 5"))

    def broken(name: str, policy: rt.TaskPolicy) -> str | None:
        raise RuntimeError("boom")

    result = reload(last, tasks={"shop.charge": rt.TaskPolicy(idempotent=True)}, extra=broken)
    assert result.file is last and result.error is not None and "RuntimeError: boom" in result.error


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.binary(max_size=120)
    | st.builds(lambda b, i: GOOD.encode()[:i] + b, st.binary(max_size=8), st.integers(0, 400))
)
def test_reload_never_raises(tmp_path: Path, data: bytes) -> None:
    path = write(tmp_path, GOOD)
    last = load(path)
    write(tmp_path, data)
    result = reload(last, tasks={"shop.charge": rt.TaskPolicy(downstream="payments", idempotent=True)})
    assert isinstance(result.file, PolicyFile)
    assert (result.file is last) == (result.error is not None or not result.changed)
