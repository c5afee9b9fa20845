"""``celery -A APP resilience ...`` run as a real command against real workers and Redis."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

import resilient_tasks as rt
from resilient_tasks.testing import RedisServer, SubprocessWorker, wait_until
from tests.integration.cli_run import resilience, status_of

APP = "tests.chaos.breaker_app"


@pytest.fixture
def env(rt_redis_flushed: RedisServer, tmp_path: Path) -> dict[str, str]:
    policies = tmp_path / "policies.toml"
    policies.write_text('[tasks."race.call_a".breaker]\nmin_calls = 1000\nopen_for = 30\n')
    return {
        "RT_BROKER_URL": rt_redis_flushed.url(0),
        "RESILIENT_TASKS_REDIS_URL": rt_redis_flushed.url(1),
        "RT_RESULT_BACKEND": rt_redis_flushed.url(2),
        "RESILIENT_TASKS_POLICIES": str(policies),
        "RESILIENT_TASKS_RELOAD_INTERVAL": "0.5",
        "PYTHONPATH": os.getcwd(),
    }


@pytest.fixture
def worker(env: dict[str, str], tmp_path: Path) -> Iterator[SubprocessWorker]:
    w = SubprocessWorker(APP, concurrency=2, name="cli", env=env, log=str(tmp_path / "w.log")).start()
    producer = Celery("ping", broker=env["RT_BROKER_URL"], set_as_current=False)
    try:
        wait_until(lambda: producer.control.ping(timeout=0.5), timeout=60, interval=0.2, what="worker")
        yield w
    finally:
        producer.close()
        w.stop()


@pytest.fixture
def producer(env: dict[str, str]) -> Iterator[Celery]:
    app = Celery("p", broker=env["RT_BROKER_URL"], backend=env["RT_RESULT_BACKEND"], set_as_current=False)
    yield app
    app.close()


def cli(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return resilience(APP, env, *args, check=check)


def status(env: dict[str, str]) -> dict[str, dict[str, Any]]:
    return status_of(APP, env)


def fail_a(producer: Celery, env: dict[str, str], count: int) -> None:
    results = [producer.send_task("race.call_a", args=[n]) for n in range(count)]
    for result in results:
        result.get(timeout=60, propagate=False)


def test_status_shows_a_breaker_opened_by_real_failures_and_a_live_threshold_edit(
    env: dict[str, str], worker: SubprocessWorker, producer: Celery, rt_redis_flushed: RedisServer
) -> None:
    db = rt_redis_flushed.client(1)
    db.set("ledger:A:down", "1")
    # min_calls = 1000 from the file: 12 failing calls do not trip the breaker.
    for n in range(12):
        producer.send_task("race.call_a", args=[n], kwargs={}, retries=8)  # out of retries: one call each
    wait_until(lambda: int(db.hget("ledger:A", "calls") or 0) >= 12, timeout=30, what="12 calls to A")
    time.sleep(0.5)
    row = status(env)["A"]
    assert row["state"] == "closed" and row["failures"] >= 12 and row["trips"] == 0

    # The operator lowers the threshold in the file; the running worker picks it up.
    Path(env["RESILIENT_TASKS_POLICIES"]).write_text(
        '[tasks."race.call_a".breaker]\nmin_calls = 5\nopen_for = 30\n'
    )
    time.sleep(1.5)
    producer.send_task("race.call_a", args=[99], retries=8).get(timeout=30, propagate=False)
    row = status(env)["A"]
    assert row["state"] == "open" and row["trips"] == 1, row
    assert 0.9 < row["failure_rate"] <= 1.0 and row["open_for_s"] > 20

    table = cli(env, "status").stdout
    line = next(line for line in table.splitlines() if "│ A " in line)
    assert "│ open " in line and "│ normal " in line


def test_degrade_from_the_command_changes_running_workers(
    env: dict[str, str], worker: SubprocessWorker, producer: Celery
) -> None:
    assert producer.send_task("race.read_catalog", args=[1]).get(timeout=30) == "fresh"
    out = cli(env, "degrade", "catalog", "fallback_only", "--json").stdout
    assert json.loads(out) == {
        "downstream": "catalog",
        "action": "fallback_only",
        "previous_switch": "normal",
    }
    value, info = rt.unwrap(producer.send_task("race.read_catalog", args=[2]).get(timeout=30))
    assert value == "stale" and info is not None and info.source == "default"
    assert status(env)["catalog"]["switch"] == "fallback_only"
    cli(env, "degrade", "catalog", "normal")
    assert producer.send_task("race.read_catalog", args=[3]).get(timeout=30) == "fresh"


def test_open_close_reset_and_forget(env: dict[str, str], rt_redis_flushed: RedisServer) -> None:
    cli(env, "open", "catalog")
    row = status(env)["catalog"]
    assert row["switch"] == "forced_open" and row["state"] == "forced_open"
    assert "(switch was forced_open)" in cli(env, "close", "catalog").stdout
    row = status(env)["catalog"]
    assert row["switch"] == "normal" and row["state"] == "closed"
    cli(env, "reset", "catalog")
    assert status(env)["catalog"]["calls"] == 0

    store = rt.runtime_for(Celery("x", set_as_current=False))
    assert store is not None
    from resilient_tasks.keys import digest
    from resilient_tasks.store import RedisStore

    s = RedisStore(env["RESILIENT_TASKS_REDIS_URL"])
    record = s.idempotency_key(digest("chaos.apply_once", '["job-7"]'))
    s.client.set(record, "done\n1\nsomeone\n60000\n\njob-7\n7", px=60_000)
    # this app registers no chaos.apply_once: refused, the record stays (test_cli_operator.py
    # forgets the records of an app's own tasks)
    refused = cli(env, "forget", '["job-7"]', "--task", "chaos.apply_once", "--yes", check=False)
    assert refused.returncode == 1 and "no resilient task named 'chaos.apply_once'" in refused.stderr
    assert s.client.exists(record)


def test_policies_shows_the_layer_of_every_field(env: dict[str, str]) -> None:
    rows = json.loads(cli(env, "policies", "--json").stdout)
    by_field = {(r["task"], r["field"]): r for r in rows}
    assert by_field[("race.call_a", "breaker.min_calls")]["set_by"] == 'tasks."race.call_a"'
    assert by_field[("race.call_a", "breaker.min_calls")]["value"] == 1000
    assert by_field[("race.call_a", "breaker.max_deferrals")]["set_by"] == "code"
    # stated in code, though equal to the default: the author's word counts as set
    assert by_field[("race.call_a", "breaker.when_open")]["set_by"] == "code"
    assert by_field[("race.call_a", "breaker.buckets")]["set_by"] == "default"
    assert by_field[("race.call_b", "breaker.min_calls")]["set_by"] == "code"


def test_check_exits_1_with_every_error(env: dict[str, str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[downstreams."x"]\nfailure_rate = 3\n\n[switches]\nx = "maybe"\n')
    done = cli(env, "check", str(bad), check=False)
    assert done.returncode == 1
    assert "2 errors" in done.stderr
    assert f'{bad}:2: line 2, [downstreams."x"] failure_rate: must be in (0, 1], got 3' in done.stderr
    assert "[switches] x: must be one of" in done.stderr
    ok = cli(env, "check", "workers/policies.toml")
    assert "ok" in ok.stdout


def test_a_worker_with_a_broken_policies_file_does_not_start(env: dict[str, str], tmp_path: Path) -> None:
    bad = tmp_path / "broken.toml"
    bad.write_text('[downstreams."payments"]\nmin_calls = -1\n')
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", APP, "worker", "--pool", "solo"],
        env={**os.environ, **env, "RESILIENT_TASKS_POLICIES": str(bad)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "the worker will not start" in done.stderr
    assert '[downstreams."payments"] min_calls: must be >= 1, got -1' in done.stderr
    assert "Traceback" not in done.stderr


def test_check_on_ten_broken_files_gives_ten_distinct_precise_errors(
    env: dict[str, str], tmp_path: Path
) -> None:
    from tests.config.samples import BROKEN

    messages = []
    for name, (text, expected) in BROKEN.items():
        path = tmp_path / name
        path.write_text(text)
        done = cli(env, "check", str(path), "--json", check=False)
        assert done.returncode == 1, name
        errors = json.loads(done.stdout)["errors"]
        assert len(errors) == 1 and expected in errors[0] and errors[0].startswith(str(path)), errors
        messages.append(errors[0])
    assert len(set(messages)) == 10
