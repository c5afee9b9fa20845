"""ResilientTask vs plain Celery under the prefork pool (Celery's default), side by side.

``overhead`` measures inside one process (thread pool), where the GIL changes hands at
every blocking round trip. Here one real ``celery worker --pool prefork`` serves the whole
run, as in production: its pool processes stay warm and keep their store connections.
Each measurement fills a variant's queue, tells the worker to consume it
(``add_consumer``), waits for every result, then tells it to stop (``cancel_consumer``).
The rate is taken from the tasks' own ``date_done`` in the result backend, the first
tenth left out. Variants rotate each round and the order is reversed after each full
rotation, so each variant follows each other one; ratios are medians of per-round
ratios against plain, printed with the spread of those ratios, and the CPU per task of
the worker's main process, its pool processes, the store's redis-server and the broker's
(from ``/proc`` and ``INFO cpu``), and the worker's CPU (main and pool together) against
plain's, as a median of per-round ratios. Besides the shared variants: ``plain_acks_late``
(plain Celery with the delivery settings ``ResilientTask`` sets), ``retry`` (retry only,
no store round trip) and ``retry_early_ack`` (the same with Celery's default early ack).
On a shared machine the CPU figures move by +-20 % between rounds: for differences of a few
per cent, count instructions instead (``benchmarks.prefork_instructions``).

    python -m benchmarks.prefork --tasks 3000 --rounds 8 --concurrency 2
    python -m benchmarks.prefork --tasks 3000 --rounds 16 --variants plain,plain_acks_late,retry
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from celery import Celery

from resilient_tasks.testing import RedisServer, SubprocessWorker

from .overhead import orders
from .policies import PREFORK_VARIANTS

VARIANTS = PREFORK_VARIANTS
IDLE_QUEUE = "bench.idle"


def rate(results: Any, expected: int) -> float:
    """Tasks per second between the first tenth and the last task to finish."""
    done: list[float] = []
    for key in results.scan_iter("celery-task-meta-*", count=1000):
        meta = json.loads(results.get(key))
        if meta["status"] != "SUCCESS":
            raise SystemExit(f"a task did not succeed: {meta}")
        done.append(datetime.fromisoformat(meta["date_done"]).timestamp())
    if len(done) != expected:
        raise SystemExit(f"{len(done)} of {expected} tasks finished")
    done.sort()
    first = len(done) // 10
    return (len(done) - first - 1) / (done[-1] - done[first])


def _cpu_of(pid: int) -> float:
    """CPU seconds (user + system) of one process, from ``/proc`` (Linux)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def worker_cpu(parent: int) -> tuple[float, float]:
    """CPU seconds of the worker's main process and of its pool processes (0, 0 where
    ``/proc`` is missing): shows where a variant's cost lands."""
    try:
        children = 0.0
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
                if ppid == parent:
                    children += _cpu_of(int(entry))
            except (OSError, ValueError, IndexError):
                continue  # gone meanwhile
        return _cpu_of(parent), children
    except OSError:
        return 0.0, 0.0


def redis_cpu(client: Any) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


class Run:
    """One warm prefork worker, and the publish-consume-measure loop."""

    def __init__(self, broker: RedisServer, store: RedisServer, publisher: Celery, timeout: float) -> None:
        self.publisher = publisher
        self.results = broker.client(1)
        self.store = store.client(0)
        self.worker_pid = 0
        #: CPU microseconds per task of the last measurement, by where it was spent.
        self.cpu: dict[str, float] = {}
        self.timeout = timeout
        self.next_n = 0

    def wait_ready(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if self.publisher.control.ping(timeout=1.0, limit=1):
                return
        raise SystemExit("the benchmark worker did not answer a ping")

    def _control(self, command: str, queue: str) -> None:
        replies = self.publisher.control.broadcast(
            command, arguments={"queue": queue}, reply=True, timeout=10, limit=1  # one worker
        )
        if not replies:
            raise SystemExit(f"the worker did not answer {command}({queue})")

    def measure(self, variant: str, count: int) -> float:
        queue = f"bench.{variant}"
        self.results.flushdb()
        with self.publisher.producer_or_acquire() as producer:
            for n in range(self.next_n, self.next_n + count):
                self.publisher.send_task(f"bench.{variant}", (n,), queue=queue, producer=producer)
        self.next_n += count
        before = (*worker_cpu(self.worker_pid), redis_cpu(self.store), redis_cpu(self.results))
        self._control("add_consumer", queue)
        deadline = time.monotonic() + self.timeout
        while self.results.dbsize() < count and time.monotonic() < deadline:
            time.sleep(0.05)
        after = (*worker_cpu(self.worker_pid), redis_cpu(self.store), redis_cpu(self.results))
        self._control("cancel_consumer", queue)
        names = ("worker_main", "pool_processes", "store_redis", "broker_redis")
        self.cpu = {n: (b - a) / count * 1e6 for n, a, b in zip(names, before, after, strict=True)}
        return rate(self.results, count)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=2000, help="tasks per variant per round")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds")
    parser.add_argument("--warmup", type=int, default=300, help="discarded tasks per variant")
    parser.add_argument("--concurrency", type=int, default=2, help="pool processes")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per measurement")
    parser.add_argument("--json", action="store_true", help="one JSON object per variant per line")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, plain always included (default: {','.join(VARIANTS)})")
    args = parser.parse_args(argv)
    chosen = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(chosen) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants: {', '.join(unknown)}")
    variants = tuple(v for v in VARIANTS if v == "plain" or v in chosen)
    rates: dict[str, list[float]] = {v: [] for v in variants}
    cpus: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    with RedisServer() as broker, RedisServer() as store:
        env = {
            "BENCH_BROKER": broker.url(0),
            "BENCH_BACKEND": broker.url(1),
            "BENCH_STORE": store.url(0),
            "PYTHONPATH": os.getcwd(),
        }
        publisher = Celery("bench-client", broker=broker.url(0), set_as_current=False)
        publisher.conf.update(broker_connection_retry_on_startup=True)
        worker = SubprocessWorker(
            "benchmarks.prefork_app",
            concurrency=args.concurrency,
            name="bench-prefork",
            env=env,
            queues=[IDLE_QUEUE],
        ).start()
        try:
            run = Run(broker, store, publisher, args.timeout)
            assert worker.process is not None
            run.worker_pid = worker.process.pid
            run.wait_ready(time.monotonic() + 60)
            for variant in variants:
                run.measure(variant, args.warmup)
            for order in orders(variants, args.rounds):
                for variant in order:
                    rates[variant].append(run.measure(variant, args.tasks))
                    cpus[variant].append(run.cpu)
        finally:
            worker.stop()
            publisher.close()
    rows = []
    for variant in variants:
        ratios = [a / b for a, b in zip(rates[variant], rates["plain"], strict=True)]
        # worker CPU (main process and pool processes together) per task, round by round
        worker_us = [c["worker_main"] + c["pool_processes"] for c in cpus[variant]]
        plain_us = [c["worker_main"] + c["pool_processes"] for c in cpus["plain"]]
        cpu_ratios = [a / b if b else 0.0 for a, b in zip(worker_us, plain_us, strict=True)]
        rows.append({
            "variant": variant,
            "pool": "prefork",
            "concurrency": args.concurrency,
            "tasks": args.tasks,
            "rounds": args.rounds,
            "tasks_per_s": round(statistics.median(rates[variant]), 1),
            "ratio_vs_plain": round(statistics.median(ratios), 3),
            "ratio_min": round(min(ratios), 3),
            "ratio_max": round(max(ratios), 3),
            "ratios": [round(r, 3) for r in ratios],
            "worker_cpu_us": round(statistics.median(worker_us), 1),
            "worker_cpu_vs_plain": round(statistics.median(cpu_ratios), 3),
            "worker_cpu_ratios": [round(r, 3) for r in cpu_ratios],
            **{f"cpu_us_{where}": round(statistics.median(c[where] for c in cpus[variant]), 1)
               for where in cpus[variant][0]},
        })
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    print(f"prefork, concurrency {args.concurrency}, {args.tasks} tasks x {args.rounds} rounds, one warm worker")
    print("CPU us/task: worker main process, pool processes, store redis, broker redis; cpu x: worker CPU")
    print("(main + pool) per task vs plain's, median of per-round ratios; per round: throughput vs plain")
    print(f"{'variant':<16} {'tasks/s':>8} {'vs plain':>9} {'min':>6} {'max':>6} {'main':>6} {'pool':>6} "
          f"{'store':>6} {'broker':>6} {'cpu x':>6}  per round")
    for row in rows:
        print(
            f"{row['variant']:<16} {row['tasks_per_s']:8.1f} {row['ratio_vs_plain']:9.3f} "
            f"{row['ratio_min']:6.2f} {row['ratio_max']:6.2f} {row['cpu_us_worker_main']:6.0f} "
            f"{row['cpu_us_pool_processes']:6.0f} {row['cpu_us_store_redis']:6.0f} "
            f"{row['cpu_us_broker_redis']:6.0f} {row['worker_cpu_vs_plain']:6.3f}  "
            + " ".join(f"{r:.2f}" for r in row["ratios"])
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
