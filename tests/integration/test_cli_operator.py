"""Issue 16, "The command line": ``celery -A APP resilience ...`` run as the real command
by an on-call operator, against a private redis-server (real ACL users for the refusals).

- every command fails the same clean way (one ``Error:`` line, no traceback, no
  password, exit 1) when the store is down, the password is wrong, a right is missing,
  or no store is configured at all;
- ``status`` shows the effective state a switch imposes, and the actions the real
  previous switch;
- a switch on a name the fleet has never seen is refused unless ``--create``;
- ``forget`` names a call by its arguments (``--arg order_id=o-1``), computed as the
  task computes its record, and refuses an unknown task;
- ``status`` with no breakers is one plain line.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from celery import Celery

from resilient_tasks.cli import status_rows
from resilient_tasks.testing import RedisServer, SubprocessWorker, free_port, wait_until
from tests.integration.cli_run import resilience, status_of

APP = "tests.integration.cli_app"
PASSWORD = "s3cret-Pa55word"


@pytest.fixture
def env(rt_redis_flushed: RedisServer) -> dict[str, str]:
    return {
        "RT_BROKER_URL": rt_redis_flushed.url(0),
        "RESILIENT_TASKS_REDIS_URL": rt_redis_flushed.url(1),
        "RT_RESULT_BACKEND": rt_redis_flushed.url(2),
        "PYTHONPATH": os.getcwd(),
    }


def cli(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return resilience(APP, env, *args, check=check)


def status(env: dict[str, str]) -> dict[str, dict[str, Any]]:
    return status_of(APP, env)


def assert_clean_error(done: subprocess.CompletedProcess[str], *said: str) -> str:
    """Exit 1 and one ``Error:`` line on stderr: no traceback, no password."""
    shown = f"exit {done.returncode}\nstdout: {done.stdout}\nstderr: {done.stderr}"
    assert done.returncode == 1, shown
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), shown
    assert "Traceback" not in done.stderr + done.stdout, shown
    assert PASSWORD not in done.stderr + done.stdout, shown
    for words in said:
        assert words in lines[0], shown
    return lines[0]


#: Every command that reads or writes the store, as an operator types it.
def side_by_side(calls: list[tuple[dict[str, str], tuple[str, ...]]]) -> list[subprocess.CompletedProcess[str]]:
    """Independent commands, two at a time (each is a fresh interpreter importing Celery:
    the suite's slowest part, and this machine has two cores)."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(lambda call: cli(call[0], *call[1], check=False), calls))


STORE_COMMANDS = (
    ("status",),
    ("status", "--json"),
    ("open", "payments"),
    ("close", "payments"),
    ("reset", "payments"),
    ("degrade", "payments", "fallback_only"),
    ("open", "anything-new", "--create"),
    ("forget", "--task", "shop.charge", "--arg", "order_id=o-1", "--yes"),
    ("forget", '["o-1"]', "--task", "shop.charge", "--yes"),
)


@pytest.fixture
def acl_users(rt_redis: RedisServer) -> Iterator[dict[str, str]]:
    """Real ACL users on the test's redis-server: the operator's (right password), one
    without SCAN, one that may run nothing. Removed afterwards (the server is shared)."""
    tag = uuid.uuid4().hex[:8]
    users = {"ops": f"ops-{tag}", "noscan": f"noscan-{tag}", "nothing": f"nothing-{tag}"}
    admin = rt_redis.client()
    admin.execute_command("ACL", "SETUSER", users["ops"], "on", ">right-one", "~*", "&*", "+@all")
    admin.execute_command(
        "ACL", "SETUSER", users["noscan"], "on", f">{PASSWORD}", "~*", "&*", "+@all", "-scan"
    )
    admin.execute_command("ACL", "SETUSER", users["nothing"], "on", f">{PASSWORD}", "~*", "&*", "-@all")
    try:
        yield users
    finally:
        for user in users.values():
            admin.execute_command("ACL", "DELUSER", user)
        admin.close()


def store_url(server: RedisServer, user: str, password: str = PASSWORD) -> str:
    return f"redis://{user}:{password}@127.0.0.1:{server.port}/1"


def test_every_command_fails_cleanly_when_the_store_is_down_or_refuses_us(
    env: dict[str, str], rt_redis: RedisServer, acl_users: dict[str, str]
) -> None:
    down = f"redis://ops:{PASSWORD}@127.0.0.1:{free_port()}/1"
    wrong_password = store_url(rt_redis, acl_users["ops"])  # (its password is "right-one")
    no_rights = store_url(rt_redis, acl_users["nothing"])
    cases = [
        (url, why, command)
        for url, why in (
            (down, "Connection refused"),
            (wrong_password, "AuthenticationError: invalid username-password pair"),
            (no_rights, "NoPermissionError"),
        )
        for command in STORE_COMMANDS
    ]
    runs = side_by_side([({**env, "RESILIENT_TASKS_REDIS_URL": url}, command) for url, _, command in cases])
    for (_, why, _), done in zip(cases, runs, strict=True):
        assert_clean_error(done, "redis store at redis://***@127.0.0.1:", why)


def test_status_without_the_right_to_scan_is_a_clean_error(
    env: dict[str, str], rt_redis: RedisServer, acl_users: dict[str, str]
) -> None:
    no_scan = {**env, "RESILIENT_TASKS_REDIS_URL": store_url(rt_redis, acl_users["noscan"])}
    for command in (("status",), ("status", "--json"), ("open", "paymnts")):
        assert_clean_error(
            cli(no_scan, *command, check=False), "redis://***@127.0.0.1:", "NoPermissionError", "'scan'"
        )
    # what needs no SCAN still works for that user: a downstream the tasks name
    assert "payments: forced_open (switch was normal)" in cli(no_scan, "open", "payments").stdout


def test_every_command_fails_cleanly_without_a_store_or_with_a_broken_url(env: dict[str, str]) -> None:
    unset = {k: v for k, v in env.items() if k != "RESILIENT_TASKS_REDIS_URL"}
    broken = {**env, "RESILIENT_TASKS_REDIS_URL": f"redis://ops:{PASSWORD}@127.0.0.1:notaport/1"}
    runs = side_by_side([(unset, command) for command in STORE_COMMANDS]
                        + [(broken, command) for command in STORE_COMMANDS])  # fmt: skip
    for done in runs[: len(STORE_COMMANDS)]:
        assert_clean_error(done, "install.redis_url", "RESILIENT_TASKS_REDIS_URL")
    for done in runs[len(STORE_COMMANDS) :]:
        assert_clean_error(done, "redis://***@127.0.0.1:notaport/1", "Port")


def test_status_shows_the_state_a_switch_imposes_and_actions_the_switch_they_found(
    env: dict[str, str],
) -> None:
    cli(env, "open", "payments")
    row = status(env)["payments"]
    assert (row["state"], row["switch"], row["breaker_state"]) == ("forced_open", "forced_open", "closed")
    line = next(line for line in cli(env, "status").stdout.splitlines() if "│ payments " in line)
    assert line.split("│")[2].strip() == "forced_open", line  # the state column
    assert "switch was forced_open" in cli(env, "close", "payments").stdout
    assert status(env)["payments"]["state"] == "closed"

    for mode, state in (("forced_closed", "forced_closed"), ("breaker_disabled", "disabled")):
        cli(env, "degrade", "payments", mode)
        row = status(env)["payments"]
        assert (row["state"], row["switch"]) == (state, mode)
    assert "payments: close (switch was breaker_disabled)" in cli(env, "close", "payments").stdout
    cli(env, "degrade", "payments", "reject")
    assert "payments: reset (switch was reject)" in cli(env, "reset", "payments").stdout
    assert json.loads(cli(env, "reset", "payments", "--json").stdout)["previous_switch"] == "normal"
    row = status(env)["payments"]
    assert (row["state"], row["switch"]) == ("closed", "normal")


def test_the_effective_state_is_the_switch_that_holds_the_breaker_or_its_own() -> None:
    def state(**fields: str) -> str:
        return str(status_rows([{"name": "x", **fields}], 0)[0]["state"])

    assert state(state="open", switch="forced_closed") == "forced_closed"
    assert state(state="half_open", switch="forced_open") == "forced_open"
    assert state(state="open", switch="breaker_disabled") == "disabled"
    assert state(state="open", switch="fallback_only") == "open"
    assert state(state="half_open") == "half_open"


def test_a_switch_on_a_name_the_fleet_never_saw_is_refused_unless_create(env: dict[str, str]) -> None:
    for command in (("open", "paymnts"), ("degrade", "paymnts", "reject"), ("close", "paymnts")):
        line = assert_clean_error(cli(env, *command, check=False), "'paymnts'", "--create")
        assert "did you mean 'payments'?" in line and "carrier, mail, payments" in line, line
    assert "paymnts" not in status(env), "a refused name leaves nothing behind"

    assert "paymnts: forced_open" in cli(env, "open", "paymnts", "--create").stdout
    assert status(env)["paymnts"]["state"] == "forced_open"
    # a breaker the store holds is known from now on, like the names the tasks use
    assert "switch was forced_open" in cli(env, "close", "paymnts").stdout
    assert "mail: reject" in cli(env, "degrade", "mail", "reject").stdout


def test_status_with_no_breakers_is_one_plain_line(env: dict[str, str]) -> None:
    done = cli(env, "status")
    assert done.stdout == "resilience: downstreams: none\n"
    assert json.loads(cli(env, "status", "--json").stdout) == []


@pytest.fixture
def worker(env: dict[str, str], tmp_path: Any) -> Iterator[SubprocessWorker]:
    w = SubprocessWorker(APP, pool="solo", name="cli-shop", env=env, log=str(tmp_path / "w.log")).start()
    producer = Celery("ping", broker=env["RT_BROKER_URL"], set_as_current=False)
    try:
        wait_until(lambda: producer.control.ping(timeout=0.5), timeout=60, interval=0.2, what="worker")
        yield w
    finally:
        producer.close()
        w.stop()


def test_forget_names_the_call_by_its_arguments(
    env: dict[str, str], worker: SubprocessWorker, rt_redis_flushed: RedisServer
) -> None:
    producer = Celery(
        "p", broker=env["RT_BROKER_URL"], backend=env["RT_RESULT_BACKEND"], set_as_current=False
    )
    try:

        def send(task: str, **kwargs: Any) -> int:
            return int(producer.send_task(task, kwargs=kwargs).get(timeout=30))

        assert send("shop.charge", order_id="o-1") == 1
        assert send("shop.charge", order_id="o-1", amount=10) == 1, "a duplicate replays the stored result"

        # the key material is not the bare value: KEY "o-1" names no record
        raw = json.loads(cli(env, "forget", "o-1", "--task", "shop.charge", "--yes", "--json").stdout)
        assert raw["removed"] is False
        out = cli(env, "forget", "--task", "shop.charge", "--arg", "order_id=o-1", "--yes", "--json").stdout
        forgotten = json.loads(out)
        assert forgotten["removed"] is True and forgotten["args"] == {"order_id": "o-1"}
        assert send("shop.charge", order_id="o-1") == 2, "the record is gone: the body runs again"

        # a JSON value is the same argument; the raw KEY form still works
        again = cli(env, "forget", "--task", "shop.charge", "--arg", 'order_id="o-1"', "--yes").stdout
        assert again.strip() == 'removed order_id="o-1" of shop.charge'
        assert send("shop.charge", order_id="o-1") == 3
        done = json.loads(cli(env, "forget", '["o-1"]', "--task", "shop.charge", "--yes", "--json").stdout)
        assert done["removed"] is True and done["record"] == forgotten["record"]

        # a template key, with an argument the call left at its default
        assert send("shop.ship", order_id="o-2") == 1
        shipped = cli(env, "forget", "--task", "shop.ship", "--arg", "order_id=o-2", "--yes", "--json").stdout
        assert json.loads(shipped)["removed"] is True
        assert send("shop.ship", order_id="o-2") == 2
    finally:
        producer.close()

    # without --yes and no answer: nothing dropped
    asked = cli(env, "forget", "--task", "shop.ship", "--arg", "order_id=o-2", check=False)
    assert asked.returncode != 0 and 'Drop the idempotency record of order_id="o-2"' in asked.stdout
    shipped = cli(env, "forget", "--task", "shop.ship", "--arg", "order_id=o-2", "--yes", "--json").stdout
    assert json.loads(shipped)["removed"] is True


def test_forget_refuses_what_names_no_record(env: dict[str, str]) -> None:
    line = assert_clean_error(
        cli(env, "forget", "--task", "shop.chrage", "--arg", "order_id=o-1", "--yes", check=False),
        "no resilient task named 'shop.chrage'",
    )
    assert "shop.charge, shop.ship" in line
    assert_clean_error(
        cli(env, "forget", "k", "--task", "shop.chrage", "--yes", check=False), "no resilient task named"
    )
    assert_clean_error(
        cli(env, "forget", "--task", "shop.notify", "--arg", "user=u", "--yes", check=False),
        "shop.notify has no IdempotencyPolicy",
    )
    wrong_name = cli(env, "forget", "--task", "shop.charge", "--arg", "order=o-1", "--yes", check=False)
    assert (
        wrong_name.returncode == 2 and "shop.charge is keyed by (order_id); not by order" in wrong_name.stderr
    )
    missing = cli(env, "forget", "--task", "shop.charge", "--arg", "amount=3", "--yes", check=False)
    assert missing.returncode == 2 and "not by amount" in missing.stderr
    both = cli(env, "forget", "k", "--task", "shop.charge", "--arg", "order_id=o-1", "--yes", check=False)
    assert both.returncode == 2 and "not both" in both.stderr
    neither = cli(env, "forget", "--task", "shop.charge", "--yes", check=False)
    assert neither.returncode == 2 and "--arg NAME=VALUE" in neither.stderr
    bad = cli(env, "forget", "--task", "shop.charge", "--arg", "order_id", "--yes", check=False)
    assert bad.returncode == 2 and "expected NAME=VALUE" in bad.stderr
