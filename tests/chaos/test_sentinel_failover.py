"""Idempotent jobs through real Celery workers while the store's Redis fails over.

A master, one replica and three ``redis-server --sentinel`` processes (quorum 2,
``down-after-milliseconds 1000``) hold the resilience store, reached with a
``sentinel://`` URL; the broker, the result backend and the ledger are on a separate
plain redis-server. Two subprocess workers (prefork, 2 processes each) run a stream of
jobs, each published twice under different task ids, and the master fails over in the
middle of the stream: ``SENTINEL FAILOVER`` (the old master keeps accepting writes until
the sentinels demote it) or SIGKILL of the master. Afterwards every job is published a
third time.

Asserted: no job is lost (every result arrives, every job ran at least once and its
republish returns its value; a copy from before or during the failover may instead fail
with ``ClaimLost`` when another copy claimed on the new master meanwhile), and the
store follows the new master: a job published after the failover runs exactly once
through its copies and its republish, and the new master holds a finished record for
every job. Not asserted but printed (``-s``): duplicate runs, which replication lag can
cause (a claim the old master acknowledged but never passed on is missing on the new
master, so a copy of that job runs again), and the store's failed round trips.
docs/RELIABILITY.md ("Sentinel failover") has the figures.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import redis
from celery import Celery
from celery.exceptions import TimeoutError as ResultTimeout
from celery.result import AsyncResult

from resilient_tasks import ClaimLost
from resilient_tasks.store.evalsha import parse_record
from resilient_tasks.testing import RedisServer, SentinelServers, SubprocessWorker

pytestmark = pytest.mark.chaos

SCALE = float(os.environ.get("RT_CHAOS_SCALE", "1"))
RATE = 25.0  # jobs published per second (each twice)
BEFORE_S = 2.0  # stream time before the failover starts
AFTER_S = 3.0 * SCALE  # stream time after every sentinel names the new master
#: How long after the sentinels agree the store may still write to the old master: it
#: asks them every second (``master_check_interval``), and a worker may be mid-batch.
SETTLE_S = 2.0


@pytest.fixture
def sentinels() -> Iterator[SentinelServers]:
    with SentinelServers(3, down_after_ms=1000, failover_timeout_ms=5000) as servers:
        yield servers


@pytest.fixture
def env(rt_redis_flushed: RedisServer, sentinels: SentinelServers) -> dict[str, str]:
    return {
        "RT_BROKER_URL": rt_redis_flushed.url(0),
        "RT_BACKEND_URL": rt_redis_flushed.url(2),
        "RT_LEDGER_URL": rt_redis_flushed.url(3),
        "RESILIENT_TASKS_REDIS_URL": sentinels.url(1),
        "PYTHONPATH": os.getcwd(),
    }


@pytest.fixture
def producer(env: dict[str, str]) -> Iterator[Celery]:
    app = Celery("producer", broker=env["RT_BROKER_URL"], backend=env["RT_BACKEND_URL"], set_as_current=False)
    app.conf.update(result_expires=600, broker_connection_retry_on_startup=True)
    yield app
    app.close()


@dataclass
class Stream:
    """Jobs published from a thread, each twice, until ``stop``: when each was published,
    and its two results."""

    producer: Celery
    published: dict[str, float] = field(default_factory=dict)
    results: dict[str, list[AsyncResult]] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)

    def publish(self, job: str) -> AsyncResult:
        return self.producer.send_task("sentinel.bump", args=[job], task_id=uuid.uuid4().hex)

    def run(self) -> None:
        n = 0
        next_at = time.monotonic()
        while not self.stop.is_set():
            job = f"job-{n:05d}"
            n += 1
            self.published[job] = time.monotonic()
            self.results[job] = [self.publish(job), self.publish(job)]
            next_at += 1.0 / RATE
            time.sleep(max(0.0, next_at - time.monotonic()))


def _collect(results: dict[str, list[AsyncResult]], timeout: float) -> dict[str, list[object]]:
    deadline = time.monotonic() + timeout
    values: dict[str, list[object]] = {}
    missing: list[str] = []
    for job, pending in results.items():
        got = []
        for result in pending:
            try:
                got.append(result.get(timeout=max(0.1, deadline - time.monotonic()), propagate=False))
            except ResultTimeout:
                missing.append(result.id)
                got.append(None)
        values[job] = got
    assert not missing, f"{len(missing)} results never arrived (jobs lost), e.g. {missing[:5]}"
    return values


def _failures(ledger: redis.Redis, since: float) -> list[tuple[float, str]]:
    found = []
    for line in ledger.lrange("store_failures", 0, -1):
        at, kind = line.decode().split(" ", 1)
        if float(at) >= since:
            found.append((float(at), kind))
    return found


@pytest.mark.parametrize("kill", [False, True], ids=["sentinel-failover", "sigkill-master"])
def test_no_job_lost_and_dedup_resumes_on_the_new_master(
    kill: bool,
    rt_redis_flushed: RedisServer,
    sentinels: SentinelServers,
    env: dict[str, str],
    producer: Celery,
    tmp_path: object,
) -> None:
    began = time.monotonic()
    ledger = rt_redis_flushed.client(3)
    workers = [
        SubprocessWorker(
            "tests.chaos.sentinel_app", concurrency=2, name=f"w{i}", env=env, log=f"{tmp_path}/w{i}.log"
        ).start()
        for i in range(2)
    ]
    stream = Stream(producer)
    thread = threading.Thread(target=stream.run, name="publisher")
    try:
        # both workers up, and the store reached through the sentinels
        warm = [stream.publish(f"warm-{i}") for i in range(8)]
        for result in warm:
            assert result.get(timeout=60)["token"] == 1
        thread.start()
        time.sleep(BEFORE_S)
        started = time.monotonic()
        old, new = sentinels.failover(kill=kill)
        switched = time.monotonic()
        time.sleep(AFTER_S + SETTLE_S)
        stream.stop.set()
        thread.join()
        published_all = time.monotonic()
        values = _collect(stream.results, timeout=60)
        drained = time.monotonic()

        # every job a third time: a job whose finished record the failover lost runs again
        runs_before_republish = {k.decode(): int(v) for k, v in ledger.hgetall("runs").items()}
        again = {job: [stream.publish(job)] for job in stream.published}
        replayed = _collect(again, timeout=60)
    finally:
        stream.stop.set()
        if thread.is_alive():
            thread.join()
        for worker in workers:
            worker.stop()

    jobs = list(stream.published)
    runs = {k.decode(): int(v) for k, v in ledger.hgetall("runs").items()}
    records = {k.decode(): v.decode() for k, v in ledger.hgetall("records").items()}
    phase = {
        job: "before" if at < started else "during" if at < switched + SETTLE_S else "after"
        for job, at in stream.published.items()
    }
    after = [job for job in jobs if phase[job] == "after"]

    # -- figures ---------------------------------------------------------------------------
    duplicates = {job: runs[job] for job in jobs if runs.get(job, 0) > 1}
    failures = _failures(ledger, started)
    by_job: dict[str, list[tuple[float, int]]] = {}
    for line in ledger.lrange("run_log", 0, -1):
        job, token, at = line.decode().split()
        by_job.setdefault(job, []).append((float(at), int(token)))
    for job_runs in by_job.values():
        job_runs.sort()
    # the first run of a job that ran again: its claim or result was lost with the writes
    # the old master acknowledged after the replica was promoted
    lost_at = [by_job[job][0][0] - switched for job in duplicates]
    summary = {
        "jobs": len(jobs),
        "messages": 3 * len(jobs),
        "published": {p: sum(1 for job in jobs if phase[job] == p) for p in ("before", "during", "after")},
        "runs": sum(runs.get(job, 0) for job in jobs),
        "duplicate_jobs": len(duplicates),
        "duplicate_runs": sum(n - 1 for n in duplicates.values()),
        "by_phase": {
            p: sum(1 for job in duplicates if phase[job] == p) for p in ("before", "during", "after")
        },
        "ran_twice_from_its_copies": sum(1 for job in jobs if runs_before_republish.get(job, 0) > 1),
        "ran_again_on_republish": sum(
            1 for job in jobs if runs.get(job, 0) > runs_before_republish.get(job, 0)
        ),
        "claim_lost_results": sum(1 for job in jobs for v in values[job] if isinstance(v, ClaimLost)),
        "repeated_fencing_tokens": sum(
            1
            for job in duplicates
            for i, (_, token) in enumerate(by_job[job])
            if token in {t for _, t in by_job[job][:i]}
        ),
        "lost_writes_from_to_s": [round(min(lost_at), 2), round(max(lost_at), 2)] if lost_at else None,
        "sentinels_agreed_s": round(switched - started, 2),
        "failed_store_batches": len(failures),
        "failed_store_batches_s": round(failures[-1][0] - failures[0][0], 2) if failures else 0.0,
        "failure_kinds": sorted({kind for _, kind in failures}),
        "drain_s": round(drained - published_all, 2),
        "test_s": round(time.monotonic() - began, 1),
    }
    how = "SIGKILL of the master" if kill else "SENTINEL FAILOVER"
    print(f"\nsentinel {how} {old[1]} -> {new[1]} under workers: {summary}")
    for job in list(duplicates)[:3]:
        print(
            f"  {job}: runs (s after the sentinels agreed, token): "
            f"{[(round(at - switched, 2), token) for at, token in by_job[job]]}"
        )

    # -- no job lost -----------------------------------------------------------------------
    assert jobs and all(runs.get(job, 0) >= 1 for job in jobs), "every job ran at least once"
    for job in jobs:
        (last,) = replayed[job]
        assert isinstance(last, dict) and last["job"] == job, (job, last)
        for value in values[job]:
            # a copy that claimed on the old master and completed on the new one, where
            # another copy had claimed meanwhile, fails with ClaimLost (its body did run)
            ok = isinstance(value, dict) and value["job"] == job
            assert ok or (isinstance(value, ClaimLost) and phase[job] != "after"), (job, value)

    # -- the store follows the new master --------------------------------------------------
    assert len(after) >= RATE, f"too few jobs published after the failover to judge: {len(after)}"
    for job in after:
        assert runs[job] == 1, f"{job}, published {stream.published[job] - switched:.2f}s after the switch"
        tokens = {value["token"] for value in values[job] + replayed[job]}  # type: ignore[index]
        assert len(tokens) == 1, f"{job}: the copies and the republish all replay one result"
    master = redis.Redis(host=new[0], port=new[1], db=1, socket_timeout=5)
    try:
        states = {job: (parse_record(master.get(f"rt:idem:{{{records[job]}}}")) or {}).get("state") for job in jobs}
    finally:
        master.close()
    not_done = [job for job, state in states.items() if state != "done"]
    assert not not_done, f"the new master lacks finished records for {len(not_done)} jobs: {not_done[:5]}"
    if kill:
        assert failures, "the master was gone until the sentinels agreed: some batches failed"
