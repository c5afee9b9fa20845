"""Redis Cluster: every script touches one hash slot, so the guards work on 3 masters."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator

import pytest
from celery import Celery

import resilient_tasks as rt
from resilient_tasks.store import RedisStore
from resilient_tasks.store.protocol import Admit, Record
from resilient_tasks.testing import ClusterServers, in_process_worker


@pytest.fixture(scope="module")
def cluster() -> Iterator[ClusterServers]:
    with ClusterServers(3) as servers:
        yield servers


def test_keys_spread_over_the_masters_and_scripts_load_on_each(cluster: ClusterServers) -> None:
    store = RedisStore(cluster.url, cluster=True, prefix="c1")
    policy = rt.BreakerPolicy(consecutive_failures=2, open_for=30)
    for name in (f"svc-{i}" for i in range(12)):
        (answer,) = store.batch([Admit(name, policy, "w")])
        assert answer.allowed
        store.batch([Record(name, policy, "w", fail=1, first_attempts=1)])
    used = [node.client().dbsize() for node in cluster.nodes]
    assert sum(used) == 12 and sum(1 for n in used if n) >= 2, used


def test_idempotency_and_breaker_on_a_cluster(app_factory: Callable[..., Celery], cluster: ClusterServers) -> None:
    app = app_factory()
    rt.install(app, redis_url=cluster.url, cluster=True, prefix="c2")
    effects: Counter[str] = Counter()
    lock = threading.Lock()
    down = {"yes": False}

    @app.task(base=rt.ResilientTask, bind=True, shared=False, policy=rt.TaskPolicy(
        downstream="ledger",
        idempotency=rt.IdempotencyPolicy(key=("job",), lease=10),
        breaker=rt.BreakerPolicy(consecutive_failures=3, open_for=30, when_open="fail"),
    ))
    def apply(self: rt.ResilientTask, job: str) -> str:
        if down["yes"]:
            raise ConnectionError("ledger down")
        with lock:
            effects[job] += 1
        return job

    jobs = 100
    with in_process_worker(app, concurrency=4):
        results = [apply.delay(f"j{n}") for n in range(jobs) for _ in range(2)]
        assert {r.get(timeout=30) for r in results} == {f"j{n}" for n in range(jobs)}
        down["yes"] = True
        for n in range(3):
            with pytest.raises(ConnectionError):
                apply.delay(f"bad{n}").get(timeout=30)
        with pytest.raises(rt.CircuitOpen):
            apply.delay("bad-after").get(timeout=30)
    assert effects == {f"j{n}": 1 for n in range(jobs)}, "each job once, across 3 masters"
