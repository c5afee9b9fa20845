"""``celery -A APP resilience check FILE`` run as a real command: the file is checked
against the app's registered tasks, every error shown in file order."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

APP = "tests.integration.check_app"


def check(*args: str, app: str | None = APP) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RESILIENT_TASKS_", "RT_"))}
    return subprocess.run(
        [sys.executable, "-m", "celery", *(["-A", app] if app else []), "resilience", "check", *args],
        env={**env, "PYTHONPATH": os.getcwd()},
        capture_output=True,
        text=True,
        timeout=60,
    )


def policies(tmp_path: Path, text: str) -> str:
    path = tmp_path / "policies.toml"
    path.write_text(text)
    return str(path)


def test_retry_from_the_file_on_a_task_that_is_not_idempotent_fails_check(tmp_path: Path) -> None:
    """Issue 14: this passed ``check``, the worker started, and every call then failed."""
    path = policies(tmp_path, '[tasks."shop.notify".retry]\nmax_retries = 2\n')
    done = check(path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f'{path}:1: line 1, [tasks."shop.notify"] retry: only idempotent work is retried' in done.stderr
    assert 'declare idempotent=True (task "shop.notify")' in done.stderr


def test_open_for_from_the_file_gets_the_visibility_timeout_refusal_code_gets(tmp_path: Path) -> None:
    """Issue 14: ``open_for = 7200`` in the file escaped the refusal the same value in code gets."""
    path = policies(tmp_path, '[tasks."shop.charge".breaker]\n\nopen_for = 7200\n')
    done = check(path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f'{path}:3: line 3, [tasks."shop.charge".breaker] open_for:' in done.stderr
    assert "visibility_timeout: 3600s must be above the longest wait" in done.stderr
    assert check(policies(tmp_path, '[tasks."shop.charge".breaker]\nopen_for = 600\n')).returncode == 0


def test_every_error_is_shown_in_file_order(tmp_path: Path) -> None:
    """Issue 16: ``check`` showed one error per table per run, out of file order."""
    text = """[switches]
mail = "maybe"

[downstreams."payments"]
failure_rate = 3
min_calls = 0
window = 1e308

[defaults.breaker]
open_for = 60
open_for_max = 10
"""
    done = check(policies(tmp_path, text))
    assert done.returncode == 1
    lines = [line.strip() for line in done.stderr.splitlines()[1:]]
    assert [line.split(": ")[0].rsplit(":", 1)[-1] for line in lines] == ["2", "5", "6", "7", "11"], lines
    assert "5 errors" in done.stderr.splitlines()[0]


def test_names_no_task_uses_are_warned_about_and_refused_with_strict(tmp_path: Path) -> None:
    """Issue 16: task and downstream names that no registered task uses are reported."""
    path = policies(tmp_path, '[tasks."shop.chrage"]\ndeadline = 5\n\n[switches]\npaymnts = "forced_open"\n')
    done = check(path)
    assert done.returncode == 0, done.stderr
    assert (
        f'warning: {path}:1: line 1, [tasks."shop.chrage"]: no registered task has this name' in done.stderr
    )
    assert (
        f"warning: {path}:5: line 5, [switches] paymnts: no registered task has this downstream"
        in done.stderr
    )
    assert "ok" in done.stdout and "checked against 2 tasks" in done.stdout
    strict = check("--strict", path)
    assert strict.returncode == 1 and "2 errors" in strict.stderr


def test_json_lists_errors_and_warnings_with_their_places(tmp_path: Path) -> None:
    path = policies(
        tmp_path, '[downstreams."ghost"]\nmin_calls = 3\n[tasks."shop.notify".retry]\nmax_retries = 1\n'
    )
    done = check("--json", path)
    assert done.returncode == 1
    report = json.loads(done.stdout)
    assert report["ok"] is False and len(report["errors"]) == 1 and len(report["warnings"]) == 1
    problem = report["problems"][0]
    assert (problem["line"], problem["table"], problem["key"]) == (3, 'tasks."shop.notify"', "retry")
    assert report["tasks_checked"] == ["shop.charge", "shop.notify"]


def test_without_an_app_the_file_is_checked_alone(tmp_path: Path) -> None:
    path = policies(tmp_path, '[tasks."anything".retry]\nmax_retries = 1\n')
    done = check(path, app=None)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr
    bad = check(policies(tmp_path, "downstreams = 5\n"), app=None)
    assert (
        bad.returncode == 1 and "downstreams: must be a table" in bad.stderr and "Traceback" not in bad.stderr
    )


def test_the_demo_fleet_file_is_clean_against_the_demo_app() -> None:
    done = check("--strict", "workers/policies.toml", app="workers.app")
    assert done.returncode == 0 and "checked against 1 tasks" in done.stdout, done.stdout + done.stderr


def test_strict_lists_errors_and_unused_names_of_every_table_together_in_file_order(tmp_path: Path) -> None:
    """Issue 16: the errors of every table in one run, in file order; with ``--strict``
    the names no registered task uses (a downstream table, a switch) among them."""
    text = """[tasks."shop.notify".retry]
max_retries = 2

[downstreams."paymnts"]
min_calls = 5

[tasks."shop.charge".breaker]
open_for = 7200

[switches]
smtp = "reject"
"""
    path = policies(tmp_path, text)

    def lines_of(done: subprocess.CompletedProcess[str]) -> list[str]:
        found = [line.strip() for line in done.stderr.splitlines() if line.startswith((" ", "\t"))]
        return [line.split(": ")[0].rsplit(":", 1)[-1] for line in found]

    done = check(path)
    assert done.returncode == 1 and "2 errors" in done.stderr, done.stderr
    assert lines_of(done) == ["1", "8"], done.stderr
    warned = [line for line in done.stderr.splitlines() if line.startswith("warning: ")]
    assert [w.split(": ")[1].rsplit(":", 1)[-1] for w in warned] == ["4", "11"], done.stderr
    assert '[downstreams."paymnts"]: no registered task has this downstream' in warned[0]

    strict = check("--strict", path)
    assert strict.returncode == 1 and "4 errors" in strict.stderr, strict.stderr
    assert lines_of(strict) == ["1", "4", "8", "11"], strict.stderr
    report = json.loads(check("--strict", "--json", path).stdout)
    assert [p["line"] for p in report["problems"]] == [1, 4, 8, 11] and not report["warnings"]
