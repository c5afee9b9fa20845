"""What the hot path works out once must still follow the object it was worked out for."""

from __future__ import annotations

import dataclasses
import os

from resilient_tasks.breaker import admit_op, record_op
from resilient_tasks.policy import BreakerPolicy
from resilient_tasks.process import current_pid
from resilient_tasks.store.redis import RedisStore


def _store() -> RedisStore:
    return RedisStore("redis://127.0.0.1:1/0")  # never connected: only keys are built


def test_breaker_script_arguments_follow_each_policy_object() -> None:
    store = _store()
    first = BreakerPolicy(min_calls=7, open_for=3, half_open_probes=2)
    changed = dataclasses.replace(first, min_calls=99, open_for=12)
    ops = [
        record_op(store, "payments", policy, "owner", "ok", probe=False, first_attempt=True)
        for policy in (first, changed, first)
    ]
    # args: now, owner, outcome, probe, first, rate, min_calls, window, buckets, consecutive,
    # slow rate, open_for ms, open_for_max ms, probes, name, ttl
    assert [op.args[6] for op in ops] == [7, 99, 7]
    assert [op.args[11] for op in ops] == [3000, 12000, 3000]
    assert ops[0].args[14] == "payments"
    other = record_op(store, "warehouse", first, "owner", "fail", probe=True, first_attempt=False)
    assert other.args[2:5] == ("fail", 1, 0)
    assert other.args[14] == "warehouse"
    assert other.keys != ops[0].keys
    admit = admit_op(store, "payments", changed, "owner", 5)
    assert admit.args == (5, "owner", 12000, 2, "payments", 86_400_000)


def test_the_process_id_is_fresh_in_a_forked_child() -> None:
    assert current_pid() == os.getpid()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child reports what it sees
        os.write(write, f"{current_pid()} {os.getpid()}".encode())
        os._exit(0)
    os.waitpid(pid, 0)
    seen, actual = os.read(read, 64).decode().split()
    os.close(read)
    os.close(write)
    assert seen == actual == str(pid)
    assert current_pid() == os.getpid() != pid
