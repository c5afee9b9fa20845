"""Misconfiguration is loud, secrets are not (issue 16), against a real redis-server and
real ACL users.

- A wrong password, or an ACL user without a right our scripts need, stops the worker at
  start with one ERROR naming what is wrong, the URL without its password and the right
  missing; a store that is only down at start does not stop it.
- At run time the same refusal is an ERROR line and a counted, exported metric.
- No message holds a password: a Cluster URL, a bad scheme, a raw ``@`` or ``/`` in it.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from celery import Celery

import resilient_tasks as rt
from resilient_tasks.errors import PolicyError, StoreMisconfigured, StoreUnavailable
from resilient_tasks.runtime import WorkerChecks, runtime_for
from resilient_tasks.store import RedisStore
from resilient_tasks.store.urls import redact, secrets_of
from resilient_tasks.testing import RedisServer, free_port, in_process_worker, wait_until
from tests.integration.test_tls_acl import ACL_RULES

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "s3cret-pw"
USER = "rt-worker"

pytestmark = pytest.mark.timeout(90)


class Records(logging.Handler):
    """The records of ``resilient_tasks`` loggers (a worker's logging set-up may drop
    pytest's own handler from the root logger)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def at(self, level: int) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno == level]


@pytest.fixture
def records() -> Iterator[Records]:
    handler = Records()
    logger = logging.getLogger("resilient_tasks")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


@pytest.fixture
def acl_user(rt_redis_flushed: RedisServer) -> Iterator[Callable[..., str]]:
    """``make(without=..., replace=...)``: (re)defines the ACL user and returns its URL."""
    admin = rt_redis_flushed.client()

    def make(
        *, without: str | None = None, replace: tuple[str, str] | None = None, password: str = PASSWORD
    ) -> str:
        rules = [rule for rule in ACL_RULES if rule != without]
        if replace is not None:
            rules = [replace[1] if rule == replace[0] else rule for rule in rules]
        admin.execute_command("ACL", "SETUSER", USER, "reset", *rules)
        return f"redis://{USER}:{password}@127.0.0.1:{rt_redis_flushed.port}/1"

    try:
        yield make
    finally:
        admin.execute_command("ACL", "DELUSER", USER)
        admin.close()


def start_worker(app: Celery) -> None:
    """Build a real worker the way ``celery worker`` does (its bootsteps run). No event
    loop: kombu keeps a worker's hub in a global, and a hub built for a worker that never
    runs would hold the ETA timers of the next in-process worker."""
    app.Worker(pool="solo", concurrency=1, loglevel="WARNING", without_heartbeat=True, use_eventloop=False)


def assert_no_password(text: str, *secrets: str) -> None:
    for secret in secrets or (PASSWORD,):
        assert secret not in text, text


# -- at worker start -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("without", "replace", "missing"),
    [
        ("+script|load", None, "+script|load"),
        ("+evalsha", None, "+evalsha"),
        ("+time", None, "+time"),
        (None, ("~rt:*", "~other:*"), "~rt:*"),
        ("+get", None, "+get"),  # called inside our scripts (Redis 7.0 does not say which)
    ],
    ids=["script-load", "evalsha", "time", "key-prefix", "a-command-a-script-calls"],
)
def test_an_acl_user_without_a_right_we_need_stops_the_worker_with_one_error(
    app_factory: Callable[..., Celery],
    acl_user: Callable[..., str],
    records: Records,
    rt_redis_flushed: RedisServer,
    without: str | None,
    replace: tuple[str, str] | None,
    missing: str,
) -> None:
    app = app_factory()
    rt.install(app, redis_url=acl_user(without=without, replace=replace))
    with pytest.raises(SystemExit) as stopped:
        start_worker(app)
    assert stopped.value.code == 1
    message = str(stopped.value)
    assert "the worker will not start" in message
    assert f"redis://***@127.0.0.1:{rt_redis_flushed.port}/1" in message, "which store, without its password"
    assert f"user {USER!r}" in message
    assert missing in message, "the right that is missing"
    assert_no_password(message)
    errors = records.at(logging.ERROR)
    assert errors == [message], "one ERROR line, the same text"


def test_a_wrong_password_stops_the_worker(
    app_factory: Callable[..., Celery], acl_user: Callable[..., str], records: Records
) -> None:
    app = app_factory()
    rt.install(app, redis_url=acl_user(password="not-the-password"))
    with pytest.raises(SystemExit) as stopped:
        start_worker(app)
    message = str(stopped.value)
    assert "the user name or password was refused" in message
    assert isinstance(stopped.value, WorkerChecks.Refused)
    assert_no_password(message, "not-the-password")
    assert records.at(logging.ERROR) == [message]


def test_a_server_that_wants_a_password_none_was_given_stops_the_worker(
    app_factory: Callable[..., Celery], records: Records
) -> None:
    with RedisServer() as store_server:
        store_server.client().config_set("requirepass", PASSWORD)
        app = app_factory()
        rt.install(app, redis_url=store_server.url(1))
        with pytest.raises(SystemExit) as stopped:
            start_worker(app)
    message = str(stopped.value)
    assert "requires a password and none was given" in message
    assert records.at(logging.ERROR) == [message]


def test_a_store_that_is_down_at_start_does_not_stop_the_worker(
    app_factory: Callable[..., Celery], records: Records
) -> None:
    """Down is not misconfigured: the worker starts, and its tasks defer until it answers."""
    app = app_factory()
    rt.install(app, redis_url=f"redis://{USER}:{PASSWORD}@127.0.0.1:{free_port()}/1")
    start_worker(app)  # no SystemExit
    warnings = records.at(logging.WARNING)
    assert any("cannot be reached as the worker starts" in w for w in warnings), warnings
    assert records.at(logging.ERROR) == []
    for line in warnings:
        assert_no_password(line)


def test_a_real_celery_worker_prints_one_clean_error_and_exits_1(
    rt_redis_flushed: RedisServer, acl_user: Callable[..., str]
) -> None:
    url = acl_user(without="+script|load")
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tests.telemetry_app", "worker", "--pool", "solo"],
        env={
            **os.environ,
            "RT_BROKER_URL": rt_redis_flushed.url(0),
            "RT_RESULT_BACKEND": rt_redis_flushed.url(2),
            "RESILIENT_TASKS_REDIS_URL": url,
            "PYTHONPATH": str(ROOT),
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "Traceback" not in output
    assert output.count("the worker will not start") == 1, output
    assert output.count("ERROR") == 1, output
    assert "+script|load" in output and f"redis://***@127.0.0.1:{rt_redis_flushed.port}/1" in output
    assert_no_password(output)


# -- at run time -----------------------------------------------------------------------


def test_a_right_taken_away_at_run_time_is_an_error_and_a_counted_metric(
    app_factory: Callable[..., Celery], acl_user: Callable[..., str], records: Records
) -> None:
    url = acl_user()
    app = app_factory()
    rt.install(app, redis_url=url)
    runtime = runtime_for(app)
    seen: list[tuple[str, str]] = []

    class Sink:
        def outcome(self, outcome: str, task: str, downstream: str) -> None: ...

        def breaker_state(self, downstream: str, state: str) -> None: ...

        def fallback_age(self, task: str, downstream: str, age_s: float) -> None: ...

        def event(self, name: str, downstream: str) -> None:
            seen.append((name, downstream))

    runtime.sinks.append(Sink())
    runs: list[str] = []
    lock = threading.Lock()

    @app.task(base=rt.ResilientTask, bind=True, shared=False, policy=rt.TaskPolicy(
        idempotency=rt.IdempotencyPolicy(key=("job",)),
    ))  # fmt: skip
    def job(self: rt.ResilientTask, job: str) -> str:
        with lock:
            runs.append(job)
        return job

    with in_process_worker(app, concurrency=1):
        assert job.delay("before").get(timeout=20) == "before"
        acl_user(without="+evalsha")  # an operator tightens the ACL under a running worker
        result = job.delay("during")
        wait_until(lambda: runtime.counters[("store_misconfigured", "")] >= 1, timeout=20, what="counted")
        assert ("store_misconfigured", "") in seen, "exported to the sinks"
        errors = [line for line in records.at(logging.ERROR) if "refused resilient-tasks" in line]
        assert errors, records.at(logging.ERROR)
        assert "+evalsha" in errors[0] and f"user {USER!r}" in errors[0]
        assert runs == ["before"]
        acl_user()  # fixed: the deferred job runs
        assert result.get(timeout=30) == "during"
    assert runs == ["before", "during"]
    for record in records.records:
        assert_no_password(record.getMessage())


# -- no password in any message --------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "user:s3cret-pw@127.0.0.1:6379/0",
        "redis:/user:s3cret-pw@127.0.0.1/0",
        "redis_cluster://user:s3cret-pw@127.0.0.1:6379/0",
        "http://user:s3cret@pw@127.0.0.1:6379/0",
        "redis-cluster://user:s3cret/pw@127.0.0.1:6379/0",
    ],
    ids=["no-scheme", "one-slash", "underscore-scheme", "raw-at", "raw-slash"],
)
def test_a_bad_scheme_url_never_shows_its_password(url: str) -> None:
    app = Celery("bad", set_as_current=False)
    with pytest.raises(PolicyError) as refused:
        rt.install(app, redis_url=url)
    text = f"{refused.value} {refused.value!r}"
    assert "install.redis_url" in text
    assert "s3cret" not in text and "pw@" not in text, text


def test_a_cluster_url_with_a_password_never_shows_it(
    rt_redis_flushed: RedisServer, acl_user: Callable[..., str]
) -> None:
    # unreachable, with an '@' in the password
    with pytest.raises(StoreUnavailable) as down:
        RedisStore(f"redis://{USER}:s3cret@pw@127.0.0.1:{free_port()}/0", cluster=True, socket_timeout=1)
    assert "s3cret" not in str(down.value) and "pw@" not in str(down.value), down.value
    assert "127.0.0.1" in str(down.value)
    # a real node, a real ACL user, the wrong password: misconfigured, and said so
    acl_user()
    with pytest.raises(StoreMisconfigured) as refused:
        RedisStore(
            f"redis://{USER}:wrong-s3cret@127.0.0.1:{rt_redis_flushed.port}/0", cluster=True, socket_timeout=1
        )
    said = str(refused.value)
    assert f"cluster redis://***@127.0.0.1:{rt_redis_flushed.port}/0" in said
    assert "password was refused" in said and "wrong-s3cret" not in said
    seen: BaseException | None = refused.value
    while seen is not None:
        assert "wrong-s3cret" not in str(seen) and "wrong-s3cret" not in repr(seen.args)
        seen = seen.__cause__ or seen.__context__


def test_a_raw_slash_in_a_password_is_not_quoted_by_the_parse_error() -> None:
    with pytest.raises(ValueError) as bad:
        RedisStore("redis://user:s3cret/pw@127.0.0.1:6379/0")
    assert "s3cret" not in str(bad.value), bad.value
    assert "percent-encoded" in str(bad.value)


def test_the_cli_never_prints_a_password_of_a_bad_url(rt_redis_flushed: RedisServer) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tests.telemetry_app", "resilience", "status"],
        env={
            **os.environ,
            "RT_BROKER_URL": rt_redis_flushed.url(0),
            "RT_RESULT_BACKEND": rt_redis_flushed.url(2),
            "RESILIENT_TASKS_REDIS_URL": f"user:{PASSWORD}@127.0.0.1:{rt_redis_flushed.port}/1",
            "PYTHONPATH": str(ROOT),
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "install.redis_url" in done.stdout + done.stderr
    assert_no_password(done.stdout + done.stderr)


def test_redact_is_the_one_place() -> None:
    assert redact("sentinel://u:pw@h:1,h:2/0 and rediss://:pw2@x:3/1", ["pw2"]) == (
        "sentinel://***@h:1,h:2/0 and rediss://***@x:3/1"
    )
    assert redact("'redis://u:p@ss@h:1/0'") == "'redis://***@h:1/0'"
    assert redact("u:p@h:1 and redis:/u:p@h") == "***@h:1 and ***@h"
    assert redact("unix:///tmp/r.sock?db=1&password=hunter2") == "unix:///tmp/r.sock?db=1&password=***"
    # ACL rules, script names and addresses without userinfo are left alone
    untouched = "+@all on @user_script:1 at 127.0.0.1:6379 for ops@example.com"
    assert redact(untouched) == untouched
    assert "p%2Fw" in secrets_of("redis://u:p%2Fw@h/0") and "p/w" in secrets_of("redis://u:p%2Fw@h/0")
    assert "p/w" in secrets_of("redis://u:p/w@h/0")
