"""What the hot path works out once must still follow the object it was worked out for."""

from __future__ import annotations

import dataclasses
import os

from resilient_tasks.policy import BreakerPolicy
from resilient_tasks.process import current_pid
from resilient_tasks.store.numbers import breaker_numbers


def test_breaker_numbers_follow_each_policy_object() -> None:
    first = BreakerPolicy(min_calls=7, open_for=3, half_open_probes=2)
    changed = dataclasses.replace(first, min_calls=99, open_for=12)
    numbers = [breaker_numbers(policy) for policy in (first, changed, first)]
    assert [n.min_calls for n in numbers] == [7, 99, 7]
    assert [n.open_for_ms for n in numbers] == [3000, 12000, 3000]
    assert numbers[1].half_open_probes == 2 and numbers[1].probe_lease_ms == 12000


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
