"""ResilientTask vs plain Celery under the prefork pool (Celery's default), side by side.

``overhead`` measures inside one process (thread pool), where the GIL changes hands at
every blocking round trip. Here each round starts a real ``celery worker --pool prefork``
per variant on a queue filled beforehand, and the rate is taken from the tasks' own
``date_done`` in the result backend (the first tenth, the worker's start, left out).
Variants rotate each round; ratios are medians of per-round ratios against plain.

    python -m benchmarks.prefork --tasks 1500 --rounds 3 --concurrency 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from datetime import datetime

from celery import Celery

from resilient_tasks.testing import RedisServer, SubprocessWorker

#: ``two_trips`` is plain Celery plus two raw store round trips: the ceiling of any design
#: that spends two round trips per task.
VARIANTS = ("plain", "two_trips", "idempotency", "breaker", "all_guards")


def rate(results: object, expected: int) -> float:
    """Tasks per second between the first tenth and the last task to finish."""
    client = results  # a redis.Redis on the result backend's db
    done: list[float] = []
    for key in client.scan_iter("celery-task-meta-*", count=1000):  # type: ignore[attr-defined]
        meta = json.loads(client.get(key))  # type: ignore[attr-defined]
        if meta["status"] != "SUCCESS":
            raise SystemExit(f"a task did not succeed: {meta}")
        done.append(datetime.fromisoformat(meta["date_done"]).timestamp())
    if len(done) != expected:
        raise SystemExit(f"{len(done)} of {expected} tasks finished")
    done.sort()
    first = len(done) // 10
    return (len(done) - first - 1) / (done[-1] - done[first])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=1500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=2)
    args = parser.parse_args()
    rates: dict[str, list[float]] = {v: [] for v in VARIANTS}
    with RedisServer() as broker, RedisServer() as store:
        env = {
            "BENCH_BROKER": broker.url(0),
            "BENCH_BACKEND": broker.url(1),
            "BENCH_STORE": store.url(0),
            "PYTHONPATH": os.getcwd(),
        }
        publisher = Celery("bench-client", broker=broker.url(0), set_as_current=False)
        results = broker.client(1)
        next_n = 0
        for round_ in range(args.rounds):
            shift = round_ % len(VARIANTS)
            for variant in VARIANTS[shift:] + VARIANTS[:shift]:
                results.flushdb()
                with publisher.producer_or_acquire() as producer:
                    for n in range(next_n, next_n + args.tasks):
                        publisher.send_task(f"bench.{variant}", (n,), queue=f"bench.{variant}", producer=producer)
                next_n += args.tasks
                worker = SubprocessWorker(
                    "benchmarks.prefork_app",
                    concurrency=args.concurrency,
                    name=f"bench-{variant}-{round_}",
                    env=env,
                    queues=[f"bench.{variant}"],
                ).start()
                deadline = time.monotonic() + 300
                while results.dbsize() < args.tasks and time.monotonic() < deadline:
                    time.sleep(0.05)
                worker.stop()
                rates[variant].append(rate(results, args.tasks))
        publisher.close()
    print(f"prefork, concurrency {args.concurrency}, {args.tasks} tasks x {args.rounds} rounds")
    print(f"{'variant':<12} {'tasks/s':>8} {'vs plain':>9}  per round")
    for variant in VARIANTS:
        ratios = [a / b for a, b in zip(rates[variant], rates["plain"], strict=True)]
        print(
            f"{variant:<12} {statistics.median(rates[variant]):8.1f} {statistics.median(ratios):9.3f}  "
            + " ".join(f"{r:.2f}" for r in ratios)
        )


if __name__ == "__main__":
    main()
