"""Instructions per task in a real prefork worker, counted by valgrind: where a variant's
worker CPU goes, the worker's main process and its pool processes apart.

``benchmarks.prefork`` reads CPU seconds from ``/proc``; on a shared 2-core machine those
move by tens of percent between rounds. Here the same ``celery worker --pool prefork``
(``benchmarks.prefork_app``) runs under ``valgrind --tool=callgrind``: before each
measurement every process's counters are zeroed (``callgrind_control -z``), the variant's
queue is consumed, and the instructions each process executed are read back
(``callgrind_control -e Ir``; a forked pool process has no ``callgrind_control``: it writes
its counts on SIGUSR2 through a two-line helper built here with ``cc``). The count is the
same whatever else the machine does.
Kernel work (the socket calls themselves) is not counted, and what depends on wall time
(idle polling, timers) is counted as it happens under valgrind's slowdown; the control
commands that start and stop a measurement are in every variant alike.

    python -m benchmarks.prefork_instructions --variants plain,plain_acks_late,retry --tasks 400
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

from celery import Celery

from resilient_tasks.testing import RedisServer, SubprocessWorker

from .overhead import orders
from .policies import PREFORK_VARIANTS
from .prefork import IDLE_QUEUE

VARIANTS = PREFORK_VARIANTS


class CallgrindWorker(SubprocessWorker):
    """``celery worker`` under callgrind (its forked pool processes are followed too)."""

    def __init__(self, *args: object, outdir: str, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.outdir = outdir

    def command(self) -> list[str]:
        return ["valgrind", "--tool=callgrind", "--vgdb=yes",
                f"--callgrind-out-file={self.outdir}/callgrind.%p", *super().command()]


def children(parent: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                if int(stat.read().rsplit(")", 1)[1].split()[1]) == parent:
                    found.append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    return sorted(found)


HELPER = """#include <valgrind/callgrind.h>
void rt_callgrind_dump(void) { CALLGRIND_DUMP_STATS; }
"""


def build_helper(directory: str) -> str:
    """The shared library the pool processes call to write their counts."""
    source, library = os.path.join(directory, "helper.c"), os.path.join(directory, "helper.so")
    with open(source, "w") as file:
        file.write(HELPER)
    subprocess.run(["cc", "-shared", "-fPIC", "-O1", "-o", library, source], check=True)
    return library


def dump_pool(pids: Sequence[int], outdir: str) -> int:
    """Have every pool process write its counts since its last dump; their sum."""
    before = {pid: set(glob.glob(f"{outdir}/callgrind.{pid}.*")) for pid in pids}
    for pid in pids:
        os.kill(pid, signal.SIGUSR2)
    total = 0
    for pid in pids:
        deadline = time.monotonic() + 120
        while True:
            new = set(glob.glob(f"{outdir}/callgrind.{pid}.*")) - before[pid]
            text = open(new.pop()).read() if new else ""  # noqa: SIM115
            found = re.search(r"^totals:\s+(\d+)", text, re.M)
            if found:
                total += int(found.group(1))
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"pool process {pid} wrote no counts")
            time.sleep(0.2)
    return total


def _control(*args: str) -> str:
    done = subprocess.run(["callgrind_control", *args], capture_output=True, text=True, check=False, timeout=120)
    return done.stdout


def zero(pids: Sequence[int]) -> None:
    for pid in pids:
        _control("-z", str(pid))


def instructions(pid: int) -> int:
    """Instructions since the last zero, every thread of ``pid`` summed."""
    out = _control("-e", "Ir", str(pid))
    return sum(int(n.replace(",", "")) for n in re.findall(r"^\s*Th \d+\s+([\d,]+)", out, re.M))


class Run:
    def __init__(self, broker: RedisServer, publisher: Celery, worker_pid: int, timeout: float, outdir: str) -> None:
        self.outdir = outdir
        self.publisher = publisher
        self.results = broker.client(1)
        self.worker_pid = worker_pid
        self.timeout = timeout
        self.next_n = 0

    def _broadcast(self, command: str, queue: str) -> None:
        replies = self.publisher.control.broadcast(
            command, arguments={"queue": queue}, reply=True, timeout=60, limit=1
        )
        if not replies:
            raise SystemExit(f"the worker did not answer {command}({queue})")

    def measure(self, variant: str, count: int) -> tuple[float, float]:
        """Instructions per task of the main process and of the pool processes."""
        queue = f"bench.{variant}"
        self.results.flushdb()
        with self.publisher.producer_or_acquire() as producer:
            for n in range(self.next_n, self.next_n + count):
                self.publisher.send_task(f"bench.{variant}", (n,), queue=queue, producer=producer)
        self.next_n += count
        pool = children(self.worker_pid)
        zero([self.worker_pid])
        dump_pool(pool, self.outdir)  # and zero
        self._broadcast("add_consumer", queue)
        deadline = time.monotonic() + self.timeout
        while self.results.dbsize() < count and time.monotonic() < deadline:
            time.sleep(0.2)
        if self.results.dbsize() < count:
            raise SystemExit(f"{variant}: {self.results.dbsize()} of {count} tasks finished")
        main = instructions(self.worker_pid)
        in_pool = dump_pool(pool, self.outdir)
        self._broadcast("cancel_consumer", queue)
        return main / count, in_pool / count


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, plain always included")
    parser.add_argument("--tasks", type=int, default=400, help="tasks per variant per round")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds")
    parser.add_argument("--warmup", type=int, default=100, help="discarded tasks per variant")
    parser.add_argument("--concurrency", type=int, default=2, help="pool processes")
    parser.add_argument("--pool", default="prefork", choices=("prefork", "solo"),
                        help="solo: tasks run in the main process (every instruction is counted there)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per measurement")
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("valgrind is not installed (apt-get install valgrind)")
    chosen = {v for v in args.variants.split(",") if v}
    unknown = sorted(chosen - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants: {', '.join(unknown)}")
    variants = tuple(v for v in VARIANTS if v == "plain" or v in chosen)
    counts: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
    with RedisServer() as broker, RedisServer() as store, tempfile.TemporaryDirectory() as outdir:
        env = {"BENCH_BROKER": broker.url(0), "BENCH_BACKEND": broker.url(1), "BENCH_STORE": store.url(0),
               "PYTHONPATH": os.getcwd(), "BENCH_CALLGRIND_LIB": build_helper(outdir)}
        publisher = Celery("bench-client", broker=broker.url(0), set_as_current=False)
        publisher.conf.update(broker_connection_retry_on_startup=True)
        worker = CallgrindWorker("benchmarks.prefork_app", concurrency=args.concurrency, name="bench-cg", pool=args.pool,
                                 env=env, queues=[IDLE_QUEUE], outdir=outdir).start()
        try:
            assert worker.process is not None
            deadline = time.monotonic() + 900
            while not publisher.control.ping(timeout=2.0, limit=1):
                if time.monotonic() > deadline or not worker.alive:
                    raise SystemExit("the worker under valgrind did not answer a ping")
            run = Run(broker, publisher, worker.process.pid, args.timeout, outdir)
            for variant in variants:
                run.measure(variant, args.warmup)
            for order in orders(variants, args.rounds):
                for variant in order:
                    counts[variant].append(run.measure(variant, args.tasks))
                    print(f"  {variant}: {counts[variant][-1][0] / 1000:.1f}k main, "
                          f"{counts[variant][-1][1] / 1000:.1f}k pool", file=sys.stderr, flush=True)
        finally:
            worker.stop(timeout=120)
            publisher.close()
    print(f"instructions per task (thousands, user space, callgrind), {args.pool} x{args.concurrency}, "
          f"{args.tasks} tasks x {args.rounds} rounds, mean of rounds")
    print(f"{'variant':<16} {'main':>8} {'pool':>8} {'worker':>8} {'vs plain':>9} {'main +':>8} {'pool +':>8}")

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    plain_main = mean([m for m, _ in counts["plain"]])
    plain_pool = mean([p for _, p in counts["plain"]])
    for variant in variants:
        m = mean([m for m, _ in counts[variant]])
        p = mean([p for _, p in counts[variant]])
        print(f"{variant:<16} {m / 1000:8.1f} {p / 1000:8.1f} {(m + p) / 1000:8.1f} "
              f"{(m + p) / (plain_main + plain_pool):9.3f} {(m - plain_main) / 1000:8.1f} "
              f"{(p - plain_pool) / 1000:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
