"""One policy path: a policy from the worker policies file meets the checks a policy in
code meets, when the worker starts and on every live reload."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from celery import Celery

import resilient_tasks as rt
from resilient_tasks.testing import RedisServer, in_process_worker
from tests.conftest import make_app


def _app(server: RedisServer, policies: Path, **conf: object) -> Celery:
    app = make_app(server, **conf)
    rt.install(app, redis_url=server.url(1), policies=policies)
    return app


def _start_worker(app: Celery) -> None:
    """Build a real worker the way ``celery worker`` does (its bootsteps run)."""
    app.Worker(pool="solo", concurrency=1, loglevel="WARNING", without_heartbeat=True, use_eventloop=False)


def test_a_file_retry_on_work_that_is_not_idempotent_stops_the_worker(
    rt_redis_flushed: RedisServer, tmp_path: Path
) -> None:
    policies = tmp_path / "policies.toml"
    policies.write_text('[tasks."shop.notify".retry]\nmax_retries = 3\n')
    app = _app(rt_redis_flushed, policies)

    @app.task(base=rt.ResilientTask, name="shop.notify", shared=False, policy=rt.TaskPolicy())
    def notify() -> None: ...

    with pytest.raises(SystemExit) as stopped:
        _start_worker(app)
    message = str(stopped.value)
    assert "the worker will not start" in message
    assert f'{policies}:1: line 1, [tasks."shop.notify"] retry: only idempotent work is retried' in message
    assert "idempotent" in message


def test_a_file_open_for_past_the_visibility_timeout_stops_the_worker(
    rt_redis_flushed: RedisServer, tmp_path: Path
) -> None:
    policies = tmp_path / "policies.toml"
    policies.write_text('[defaults]\n\n[downstreams."payments"]\nopen_for = 7200\n')
    app = _app(rt_redis_flushed, policies)

    @app.task(base=rt.ResilientTask, name="shop.charge", shared=False, policy=rt.TaskPolicy(downstream="payments"))
    def charge() -> None: ...

    app.finalize()  # the code policy alone is fine: only the file's value breaks the rule
    with pytest.raises(SystemExit) as stopped:
        _start_worker(app)
    message = str(stopped.value)
    assert "line 4" in message and "open_for" in message and "visibility_timeout" in message


def test_a_code_value_equal_to_the_default_beats_the_files_defaults(
    rt_redis_flushed: RedisServer, tmp_path: Path
) -> None:
    policies = tmp_path / "policies.toml"
    policies.write_text("[defaults.breaker]\nopen_for = 5\nmin_calls = 7\n")
    app = _app(rt_redis_flushed, policies)

    @app.task(
        base=rt.ResilientTask,
        name="shop.charge",
        shared=False,
        policy=rt.TaskPolicy(downstream="payments", breaker=rt.BreakerPolicy(open_for=30)),
    )
    def charge() -> None: ...

    effective = rt.runtime_for(app).policy_for(charge)
    assert effective.breaker is not None
    assert effective.breaker.open_for == 30, "stated in code: the file's default does not win"
    assert effective.breaker.min_calls == 7, "not stated in code: the file's default applies"


@pytest.mark.parametrize(
    "bad",
    [b"downstreams = 5\n", b"\xff\xfe[defaults]\n", b"[defaults.breaker]\nwindow = 1e308\n"],
    ids=["wrong-shape", "not-utf8", "overflow"],
)
def test_a_bad_reload_keeps_the_last_good_policies_and_no_job_fails(
    rt_redis_flushed: RedisServer, tmp_path: Path, bad: bytes
) -> None:
    policies = tmp_path / "policies.toml"
    policies.write_text("[defaults.breaker]\nmin_calls = 11\n")
    app = _app(rt_redis_flushed, policies)
    runtime = rt.runtime_for(app)
    runtime.reload_interval = 0.0
    runs: list[int] = []

    @app.task(base=rt.ResilientTask, name="shop.ping", shared=False, policy=rt.TaskPolicy(downstream="svc"))
    def ping(n: int) -> int:
        runs.append(n)
        return n

    with in_process_worker(app, concurrency=1):
        assert ping.delay(1).get(timeout=20) == 1
        policies.write_bytes(bad)
        stat = policies.stat()
        os.utime(policies, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
        # jobs keep coming; the first look at the file after the interval finds it bad
        n, refused = 1, ("policy_reload_refused", "")
        give_up = time.monotonic() + 15
        while runtime.counters.get(refused, 0) == 0 and time.monotonic() < give_up:
            n += 1
            assert ping.delay(n).get(timeout=20) == n
            time.sleep(0.05)
        last = n + 3
        for later in range(n + 1, last + 1):  # and later jobs do not report it again
            assert ping.delay(later).get(timeout=20) == later
    assert runs == list(range(1, last + 1)), "no job failed because of the reload"
    effective = runtime.policy_for(ping)
    assert effective.breaker is not None and effective.breaker.min_calls == 11, "the last good file stays"
    assert runtime.counters[("policy_reload_refused", "")] == 1, "one error per bad file, not one per job"
