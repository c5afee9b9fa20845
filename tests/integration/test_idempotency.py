"""Idempotency with a real worker: replays, conflicts, in-flight duplicates, retries."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable

import pytest
from celery import Celery

import resilient_tasks as rt
from resilient_tasks.store.evalsha import parse_record
from resilient_tasks.testing import RedisServer, in_process_worker, wait_until


def test_duplicate_publish_replays_the_stored_result(app: Celery) -> None:
    effects: Counter[int] = Counter()

    @app.task(
        base=rt.ResilientTask,
        bind=True,
        shared=False,
        policy=rt.TaskPolicy(
            idempotency=rt.IdempotencyPolicy(key=("order_id",), ttl=600),
        ),
    )
    def charge(self: rt.ResilientTask, order_id: int, amount: int) -> dict[str, int]:
        effects[order_id] += 1
        return {"order_id": order_id, "charged": amount, "token": self.idempotency.token}

    with in_process_worker(app, concurrency=1):
        first = charge.delay(1, 50).get(timeout=20)
        second = charge.delay(1, 50).get(timeout=20)
    assert effects == {1: 1}
    assert first == second == {"order_id": 1, "charged": 50, "token": 1}


def test_same_key_different_arguments_is_a_conflict(app: Celery) -> None:
    effects: list[int] = []

    @app.task(
        base=rt.ResilientTask,
        bind=True,
        shared=False,
        policy=rt.TaskPolicy(
            idempotency=rt.IdempotencyPolicy(key=("order_id",)),
        ),
    )
    def charge(self: rt.ResilientTask, order_id: int, amount: int) -> int:
        effects.append(amount)
        return amount

    with in_process_worker(app, concurrency=1):
        assert charge.delay(7, 10).get(timeout=20) == 10
        with pytest.raises(rt.IdempotencyConflict, match="different arguments"):
            charge.delay(7, 99).get(timeout=20)
    assert effects == [10]


def test_a_key_naming_every_argument_stores_no_fingerprint(app: Celery, rt_redis_flushed: RedisServer) -> None:
    """Such a key already differs whenever the arguments do: the fingerprint is skipped,
    and a key that leaves an argument out still gets one (see the conflict test above)."""
    policy = rt.TaskPolicy(idempotency=rt.IdempotencyPolicy(key=("order_id", "amount")))

    @app.task(base=rt.ResilientTask, shared=False, name="fp.whole", policy=policy)
    def whole(order_id: int, amount: int) -> int:
        return amount

    @app.task(base=rt.ResilientTask, shared=False, name="fp.part",
              policy=rt.TaskPolicy(idempotency=rt.IdempotencyPolicy(key=("order_id",))))
    def part(order_id: int, amount: int) -> int:
        return amount

    with in_process_worker(app, concurrency=1):
        assert whole.delay(1, 10).get(timeout=20) == 10
        assert whole.delay(order_id=1, amount=10).get(timeout=20) == 10  # a replay
        assert whole.delay(1, 11).get(timeout=20) == 11  # another key, not a conflict
        assert part.delay(2, 10).get(timeout=20) == 10
    store = rt_redis_flushed.client(1)
    fingerprints = sorted(parse_record(store.get(key))["fp"] for key in store.scan_iter("rt:idem:*"))  # type: ignore[index]
    assert len(fingerprints) == 3
    assert fingerprints[:2] == ["", ""], "the two keys of `whole` carry no fingerprint"
    assert len(fingerprints[2]) == 32, "`part`'s key leaves `amount` out: it is fingerprinted"


def test_in_flight_duplicate_is_deferred_then_replayed(app: Celery) -> None:
    started = threading.Event()
    effects: list[float] = []

    @app.task(
        base=rt.ResilientTask,
        bind=True,
        shared=False,
        policy=rt.TaskPolicy(
            idempotency=rt.IdempotencyPolicy(key=("order_id",), lease=1.0),
        ),
    )
    def slow(self: rt.ResilientTask, order_id: int) -> str:
        effects.append(time.monotonic())
        started.set()
        time.sleep(2.0)  # longer than the lease: the heartbeat must keep it alive
        self.idempotency.check()
        return f"done-{order_id}"

    with in_process_worker(app, concurrency=2):
        first = slow.delay(3)
        assert started.wait(10)
        duplicate = slow.delay(3)
        assert duplicate.get(timeout=30) == "done-3"
        assert first.get(timeout=30) == "done-3"
    assert len(effects) == 1


def test_drop_mode_reports_the_duplicate_without_running(app: Celery) -> None:
    started = threading.Event()
    release = threading.Event()
    effects: list[int] = []

    @app.task(
        base=rt.ResilientTask,
        bind=True,
        shared=False,
        policy=rt.TaskPolicy(
            idempotency=rt.IdempotencyPolicy(key=("order_id",), lease=5, on_duplicate="drop"),
        ),
    )
    def job(self: rt.ResilientTask, order_id: int) -> int:
        effects.append(order_id)
        started.set()
        release.wait(10)
        return order_id

    with in_process_worker(app, concurrency=2):
        first = job.delay(4)
        assert started.wait(10)
        with pytest.raises(rt.DuplicateInFlight, match="dropped"):
            job.delay(4).get(timeout=20)
        release.set()
        assert first.get(timeout=20) == 4
    assert effects == [4]


def test_a_retry_of_the_owner_is_not_a_duplicate_of_itself(app: Celery) -> None:
    tokens: list[int] = []

    @app.task(
        base=rt.ResilientTask,
        bind=True,
        shared=False,
        policy=rt.TaskPolicy(
            idempotency=rt.IdempotencyPolicy(key=("order_id",), lease=30),
            retry=rt.RetryPolicy(max_retries=3, base=0.01, cap=0.02),
        ),
    )
    def flaky(self: rt.ResilientTask, order_id: int) -> list[int]:
        tokens.append(self.idempotency.token)
        if len(tokens) < 3:
            raise ConnectionError("reset")
        return tokens

    with in_process_worker(app, concurrency=1):
        assert flaky.delay(9).get(timeout=20) == [1, 2, 3]
        # ...and once done, a new publish replays instead of running.
        assert flaky.delay(9).get(timeout=20) == [1, 2, 3]
    assert tokens == [1, 2, 3], "fencing tokens strictly increase per key"


def test_failure_releases_the_claim_for_a_later_run(app: Celery) -> None:
    runs: list[int] = []

    @app.task(
        base=rt.ResilientTask,
        bind=True,
        shared=False,
        policy=rt.TaskPolicy(
            idempotency=rt.IdempotencyPolicy(key=("order_id",), lease=30),
        ),
    )
    def once_broken(self: rt.ResilientTask, order_id: int) -> int:
        runs.append(self.idempotency.token)
        if len(runs) == 1:
            raise ValueError("bad data, fixed upstream later")
        return order_id

    with in_process_worker(app, concurrency=1):
        with pytest.raises(ValueError):
            once_broken.delay(5).get(timeout=20)
        assert once_broken.delay(5).get(timeout=20) == 5
    assert runs == [1, 2]


def test_message_key_dedups_redelivery_of_the_same_task_id(app: Celery) -> None:
    effects: list[str] = []

    @app.task(
        base=rt.ResilientTask,
        bind=True,
        shared=False,
        policy=rt.TaskPolicy(
            idempotency=rt.IdempotencyPolicy(key="message"),
        ),
    )
    def once(self: rt.ResilientTask) -> str:
        effects.append(self.request.id)
        return "ok"

    with in_process_worker(app, concurrency=1):
        assert once.apply_async(task_id="fixed-id").get(timeout=20) == "ok"
        assert once.apply_async(task_id="fixed-id").get(timeout=20) == "ok"
        assert once.apply_async(task_id="other-id").get(timeout=20) == "ok"
    assert effects == ["fixed-id", "other-id"]


def test_bad_key_fails_that_task_alone(app: Celery) -> None:
    @app.task(
        base=rt.ResilientTask,
        bind=True,
        shared=False,
        policy=rt.TaskPolicy(
            idempotency=rt.IdempotencyPolicy(key="{customer}"),
        ),
    )
    def keyed(self: rt.ResilientTask, customer: str) -> str:
        return customer

    with in_process_worker(app, concurrency=1):
        with pytest.raises(rt.IdempotencyKeyError, match="limit"):
            keyed.delay("x" * 5000).get(timeout=20)
        assert keyed.delay("fine").get(timeout=20) == "fine"


def test_store_down_fails_closed_and_never_runs_unguarded(app_factory: Callable[..., Celery]) -> None:
    from resilient_tasks.testing import free_port

    app = app_factory()
    rt.install(app, redis_url=f"redis://127.0.0.1:{free_port()}/1", redis_options={})
    runs: list[int] = []

    @app.task(
        base=rt.ResilientTask,
        bind=True,
        shared=False,
        policy=rt.TaskPolicy(
            deadline=2.0,
            idempotency=rt.IdempotencyPolicy(key=("n",)),
        ),
    )
    def guarded(self: rt.ResilientTask, n: int) -> int:
        runs.append(n)
        return n

    with in_process_worker(app, concurrency=1), pytest.raises(rt.DeadlineExceeded):
        guarded.delay(1).get(timeout=30)
    assert runs == []


def test_a_store_that_lost_its_data_fails_closed_for_the_longest_lease(
    app: Celery, store_client: object
) -> None:
    runs: list[str] = []

    @app.task(base=rt.ResilientTask, bind=True, shared=False, policy=rt.TaskPolicy(
        idempotency=rt.IdempotencyPolicy(key=("job",), lease=1.5),
    ))
    def job(self: rt.ResilientTask, job: str) -> str:
        runs.append(job)
        return job

    runtime = rt.runtime_for(app)
    with in_process_worker(app, concurrency=1):
        assert job.delay("k1").get(timeout=20) == "k1"
        # a restart without persistence: the data is gone and every connection drops
        store_client.flushdb()  # type: ignore[attr-defined]
        for client in store_client.client_list():  # type: ignore[attr-defined]
            if client["db"] == "1" and client["cmd"] != "client|list":  # the store's, not the broker's
                store_client.client_kill_filter(_id=client["id"])  # type: ignore[attr-defined]
        result = job.delay("k2")
        amnesia = f"{runtime.prefix}:meta:{{epoch}}:amnesia"
        wait_until(lambda: store_client.exists(amnesia), timeout=10, what="amnesia declared")  # type: ignore[attr-defined]
        assert 0 < store_client.pttl(amnesia) <= 1500  # type: ignore[attr-defined]
        assert runs == ["k1"], "nothing runs while the store cannot vouch for in-flight claims"
        assert result.get(timeout=20) == "k2"
    assert runs == ["k1", "k2"]
    assert runtime.counters[("store_amnesia", "")] >= 1


def test_the_subclass_form_dedups_the_same_way(app: Celery) -> None:
    effects: list[str] = []

    class SyncInventory(rt.ResilientTask):
        name = "tests.sync_inventory"
        policy = rt.TaskPolicy(idempotency=rt.IdempotencyPolicy(key=("sku",)))

        def run(self, sku: str) -> dict[str, object]:
            effects.append(sku)
            return {"sku": sku, "token": self.idempotency.token}

    task = app.register_task(SyncInventory())
    with in_process_worker(app, concurrency=1):
        first = task.delay("A-1").get(timeout=20)
        again = task.delay("A-1").get(timeout=20)
    assert first == again == {"sku": "A-1", "token": 1}
    assert effects == ["A-1"]


def test_a_fleets_first_claims_racing_do_not_look_like_data_loss(app: Celery) -> None:
    @app.task(base=rt.ResilientTask, bind=True, shared=False, policy=rt.TaskPolicy(
        idempotency=rt.IdempotencyPolicy(key=("n",), lease=30),
    ))
    def first(self: rt.ResilientTask, n: int) -> int:
        return n

    runtime = rt.runtime_for(app)
    with in_process_worker(app, concurrency=8):
        results = [first.delay(n) for n in range(64)]
        assert [r.get(timeout=20) for r in results] == list(range(64))
    assert runtime.counters[("store_amnesia", "")] == 0


def test_a_completion_the_store_missed_is_delivered_when_it_is_back(
    app_factory: Callable[..., Celery], rt_redis_flushed: object
) -> None:
    """The store goes silent as the body finishes: the ``end`` trip fails, the worker
    keeps the completion and delivers it once the store answers, within the lease, so the
    next duplicate replays the result instead of running the body again."""
    from resilient_tasks.testing import FaultProxy

    runs: list[int] = []
    with FaultProxy(rt_redis_flushed.port) as proxy:  # type: ignore[attr-defined]
        app = app_factory()
        rt.install(app, redis_url=f"redis://127.0.0.1:{proxy.port}/1?socket_timeout=0.5")

        @app.task(base=rt.ResilientTask, bind=True, shared=False, policy=rt.TaskPolicy(
            idempotency=rt.IdempotencyPolicy(key=("n",), lease=10),
        ))
        def pay(self: rt.ResilientTask, n: int) -> dict[str, int]:
            runs.append(n)
            if len(runs) == 1:
                proxy.blackhole(1.5)  # the side effect happened; now the store is gone
            return {"paid": n, "token": self.idempotency.token}

        runtime = rt.runtime_for(app)
        with in_process_worker(app, concurrency=1):
            first = pay.delay(7).get(timeout=30)
            assert runtime.counters[("end_lost", "")] == 1, "the end trip did fail"
            wait_until(lambda: runtime.heartbeat.pending() == 0, timeout=10, what="late delivery")
            again = pay.delay(7).get(timeout=30)
    assert first == again == {"paid": 7, "token": 1}
    assert runs == [7], "the duplicate replayed the late completion"


def test_a_result_over_the_size_cap_is_not_stored_and_replays_none(
    app_factory: Callable[..., Celery], rt_redis_flushed: object, store_client: object
) -> None:
    """Results have a size cap: a big one still marks the job done (no second run), but
    the record keeps ``null`` instead of the value, and the key keeps its TTL (the ttl,
plus what was left of the lease when it completed)."""
    app = app_factory()
    rt.install(app, redis_url=rt_redis_flushed.url(1), max_result_bytes=100)  # type: ignore[attr-defined]
    runs: list[int] = []

    @app.task(base=rt.ResilientTask, bind=True, shared=False, policy=rt.TaskPolicy(
        idempotency=rt.IdempotencyPolicy(key=("n",), ttl=600),
    ))
    def report(self: rt.ResilientTask, n: int) -> str:
        runs.append(n)
        return "x" * 1000

    with in_process_worker(app, concurrency=1):
        assert report.delay(1).get(timeout=20) == "x" * 1000
        assert report.delay(1).get(timeout=20) is None
    assert runs == [1]
    (key,) = list(store_client.scan_iter("rt:idem:*"))  # type: ignore[attr-defined]
    assert parse_record(store_client.get(key))["result"] == "null"  # type: ignore[attr-defined,index]
    # kept at least the ttl after completion, at most one lease (60 s here) longer
    assert 590_000 < store_client.pttl(key) <= 600_000 + 60_000  # type: ignore[attr-defined]
