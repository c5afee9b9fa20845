"""The store misbehaves (restarts, script flushes, a faulty network) while jobs run.

Each job is published twice. The ledger (on the broker's server, which stays up) applies
a job once and counts every call. Reduced in ``make test``; ``RT_CHAOS_SCALE`` grows it.
Figures are printed for docs/RELIABILITY.md.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from pathlib import Path

import pytest
import redis
from celery import Celery

from resilient_tasks.testing import FaultProxy, RedisServer, SubprocessWorker, wait_until

pytestmark = pytest.mark.chaos

SCALE = float(os.environ.get("RT_CHAOS_SCALE", "1"))


def start_workers(
    env: dict[str, str], tmp_path: Path, count: int = 2, *, pool: str = "prefork", concurrency: int = 2
) -> list[SubprocessWorker]:
    return [
        SubprocessWorker(
            "tests.chaos.chaos_app",
            pool=pool,
            concurrency=concurrency,
            name=f"f{i}",
            env=env,
            log=str(tmp_path / f"f{i}.log"),
        ).start()
        for i in range(count)
    ]


def publish(producer: Celery, jobs: int, rate: float, stop: threading.Event | None = None) -> None:
    for n in range(jobs):
        for _ in range(2):
            producer.send_task("chaos.apply_once", args=[f"job-{n}"], task_id=uuid.uuid4().hex)
        time.sleep(1.0 / rate)


def logs_mention(tmp_path: Path, text: str) -> int:
    return sum(p.read_text(errors="replace").count(text) for p in tmp_path.glob("f*.log"))


def wait_all_applied(ledger: redis.Redis, jobs: int, tmp_path: Path) -> None:
    """Wait for every job; on a timeout, say which are missing and what the workers logged."""
    try:
        wait_until(
            lambda: ledger.hlen("applied") >= jobs, timeout=180 * max(1.0, SCALE), interval=0.5, what="all applied"
        )
    except TimeoutError:
        applied = {k.decode() for k in ledger.hkeys("applied")}
        missing = [f"job-{n}" for n in range(jobs) if f"job-{n}" not in applied]
        errors = [
            line
            for p in sorted(tmp_path.glob("f*.log"))
            for line in p.read_text(errors="replace").splitlines()
            if "ERROR" in line or "Error:" in line
        ]
        raise AssertionError(
            f"{len(missing)} jobs never applied: {missing[:10]}; worker errors (last 20):\n"
            + "\n".join(errors[-20:])
        ) from None


#: A store with AOF (every write fsynced) keeps its ``done`` records through a SIGKILL.
PERSISTENCE = {"none": (), "aof": ("--appendonly", "yes", "--appendfsync", "always")}
#: scenario -> (store persistence, SIGKILLs); every scenario flushes scripts every 500 ms.
SCENARIOS = {"kills-none": ("none", 5), "kills-aof": ("aof", 5), "flush-only": ("none", 0)}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_store_killed_and_restarted_five_times_and_scripts_flushed(
    rt_redis_flushed: RedisServer, tmp_path: Path, scenario: str
) -> None:
    jobs = int(200 * SCALE)
    persistence, kills = SCENARIOS[scenario]
    with RedisServer(args=PERSISTENCE[persistence]) as store:
        env = {
            "RT_BROKER_URL": rt_redis_flushed.url(0),
            "RESILIENT_TASKS_REDIS_URL": store.url(0) + "?socket_timeout=1",
            "RT_LEDGER_URL": rt_redis_flushed.url(3),
            "RT_LEASE": "2",
            "PYTHONPATH": os.getcwd(),
        }
        ledger = rt_redis_flushed.client(3)
        producer = Celery("p", broker=env["RT_BROKER_URL"], set_as_current=False)
        workers = start_workers(env, tmp_path)
        stop = threading.Event()

        def flush_scripts() -> None:
            while not stop.wait(0.5):
                with contextlib.suppress(redis.RedisError):  # the store may be down right now
                    redis.Redis(port=store.port, socket_timeout=1).script_flush()

        flusher = threading.Thread(target=flush_scripts, daemon=True)
        publisher = threading.Thread(target=publish, args=(producer, jobs, jobs / 16.0), daemon=True)
        resumed: list[float] = []
        restarts = 0
        try:
            flusher.start()
            publisher.start()
            for _ in range(kills):
                time.sleep(2.5)
                store.kill()
                time.sleep(0.5)
                store.start()
                restarts += 1
                restarted = time.monotonic()
                before = ledger.hlen("applied")
                if before >= jobs:
                    continue  # nothing left to resume: still restart five times
                wait_until(
                    lambda b=before: ledger.hlen("applied") > b,
                    timeout=30,
                    interval=0.1,
                    what="processing to resume",
                )
                resumed.append(time.monotonic() - restarted)
            publisher.join()
            wait_all_applied(ledger, jobs, tmp_path)
        finally:
            stop.set()
            for worker in workers:
                worker.stop()
            producer.close()
        applied = ledger.hgetall("applied")
        calls = sum(int(v) for v in ledger.hgetall("calls").values())
        noscript = logs_mention(tmp_path, "NOSCRIPT") + logs_mention(tmp_path, "NoScriptError")
        print(
            f"\nstore faults ({scenario}): jobs={jobs} published={2 * jobs} restarts={restarts} "
            f"applied={len(applied)} downstream_calls={calls} extra_calls={calls - jobs} "
            f"resume_after_restart_s={[round(r, 1) for r in resumed]} noscript_in_tasks={noscript} "
            f"amnesia_logged={logs_mention(tmp_path, 'the store lost its data')}"
        )
        assert len(applied) == jobs, "no job lost"
        assert set(applied) == {f"job-{n}".encode() for n in range(jobs)}
        assert noscript == 0, "NOSCRIPT never reaches a task"
        assert restarts == kills
        assert all(r <= 15 for r in resumed), resumed
        if kills == 0:
            assert calls == jobs, "flushed scripts alone never run a body twice"


def test_jobs_through_a_faulty_network_to_the_store(rt_redis_flushed: RedisServer, tmp_path: Path) -> None:
    jobs = int(200 * SCALE)
    timeout = 1.0
    with FaultProxy(rt_redis_flushed.port) as proxy:
        env = {
            "RT_BROKER_URL": rt_redis_flushed.url(0),
            "RESILIENT_TASKS_REDIS_URL": f"redis://127.0.0.1:{proxy.port}/1?socket_timeout={timeout}",
            "RT_LEDGER_URL": rt_redis_flushed.url(3),
            "RT_LEASE": "3",
            "RT_VISIBILITY": "20",
            "RT_TIME_STORE": "1",
            "PYTHONPATH": os.getcwd(),
        }
        ledger = rt_redis_flushed.client(3)
        producer = Celery("p", broker=env["RT_BROKER_URL"], set_as_current=False)
        # Waiting on a slow network is I/O: threads keep the run short at full size.
        workers = start_workers(env, tmp_path, pool="threads", concurrency=32 if SCALE > 1 else 16)
        try:
            proxy.latency(200, 100)
            publisher = threading.Thread(target=publish, args=(producer, jobs, jobs / 10.0), daemon=True)
            publisher.start()
            time.sleep(2)
            proxy.blackhole(3.0)
            time.sleep(4)
            proxy.resets(0.05)
            proxy.cut_replies(0.05)
            time.sleep(3)
            proxy.reset_all()
            publisher.join()
            time.sleep(2)
            proxy.clear()
            wait_all_applied(ledger, jobs, tmp_path)
        finally:
            for worker in workers:
                worker.stop()
            producer.close()
        applied = ledger.hgetall("applied")
        calls = sum(int(v) for v in ledger.hgetall("calls").values())
        longest = float(ledger.get("exec_max_s") or 0)
        stuck = float(ledger.get("store_call_max_s") or 0)
        print(
            f"\nfault proxy: jobs={jobs} applied={len(applied)} downstream_calls={calls} "
            f"extra_calls={calls - jobs} faults={proxy.faults.counts} longest_store_call_s={stuck:.2f} "
            f"longest_execution_s={longest:.2f}"
        )
        assert len(applied) == jobs, "no job lost"
        assert int(ledger.hlen("stale") or 0) == 0
        # No worker is stuck on the store longer than two socket timeouts: a read waits
        # one at most, and no NOSCRIPT recovery trip starts after one has passed.
        assert 0 < stuck <= 2 * timeout
        # A whole execution is a few such calls at 200 +- 100 ms a hop: bounded too.
        assert longest <= 3 * 2 * timeout
