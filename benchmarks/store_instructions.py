"""Store instructions per task: the store's own work for one task, counted by valgrind.

The fleet benchmark's store CPU per task moves with the machine's load (a lightly loaded
server does fewer commands per wake-up, and a noisy neighbour changes every figure), so
its ratios to the peers vary by more than the targets' margins from run to run. This
one counts what does not vary: a ``redis-server`` runs under callgrind, collecting only
inside ``readQueryFromClient`` (read, parse, run every command, scripts included) and
``handleClientsWithPendingWrites`` (write the replies), and is sent what one task of each
variant sends it, by the same client code:

- ``celery_once``: celery-once's Redis backend, ``raise_or_lock`` at publish and
  ``clear_lock`` after the task (``SET NX PX``, ``DEL``);
- ``floor_2_evalsha``: two ``EVALSHA`` of ``return 1`` (the floor of a 2-trip design);
- ``idempotency``: ``RedisStore.batch`` of a claim, then of its completion, with the
  guard's arguments (a new key per task, as in the fleet benchmark);
- ``idempotency_fallback``: the same with a fallback: the claim and a peek at the cache
  entry, then the completion and the cache write (a task with all three guards whose
  breaker's view is fresh: the breaker's batched ``record``, about one per 0.1 s per
  process, is left out).

Per task = (count after N2 tasks - count after N1) / (N2 - N1), so connecting, loading
scripts and the store's checks cancel out. Kernel time (the socket reads and writes)
is not counted: each variant makes 2 requests per task, so it is the same for all.

    python -m benchmarks.store_instructions               # needs valgrind
    python -m benchmarks.store_instructions --tasks 200,1200
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import redis

from resilient_tasks.keys import digest, owner_id
from resilient_tasks.store.protocol import CacheGet, CachePut, Claim, Complete, Op
from resilient_tasks.store.redis import RedisStore
from resilient_tasks.testing import free_port

VARIANTS = ("celery_once", "floor_2_evalsha", "idempotency", "idempotency_fallback")
COLLECT = ("readQueryFromClient", "handleClientsWithPendingWrites")
LEASE_MS, TTL_MS, CACHE_TTL_MS = 300_000, 86_400_000, 120_000


def _celery_once(url: str) -> Callable[[int], None]:
    from celery_once.backends import Redis as OnceBackend  # type: ignore[import-untyped]

    backend = OnceBackend({"url": url, "default_timeout": 3600})

    def task(i: int) -> None:
        key = f"qo_bench.once_n-{i}"
        backend.raise_or_lock(key, 3600)  # the publisher
        backend.clear_lock(key)  # the worker, after the body

    return task


def _floor(url: str) -> Callable[[int], None]:
    client = redis.Redis.from_url(url)
    sha = client.script_load("return 1")

    def task(i: int) -> None:
        client.evalsha(sha, 1, f"rt:floor:{{{i}}}")
        client.evalsha(sha, 1, f"rt:floor:{{{i}}}")

    return task


def _idempotency(url: str, fallback: bool = False) -> Callable[[int], None]:
    store = RedisStore(url)
    store.check()
    run = uuid.uuid4().hex

    def task(i: int) -> None:
        record, owner = digest("bench.idempotency", f"{run}:{i}"), owner_id()
        begin: list[Op] = [Claim(record, owner, LEASE_MS, TTL_MS, task_id=str(uuid.uuid4()))]
        end: list[Op] = []
        if fallback:
            begin.append(CacheGet(record, now_ms=int(time.time() * 1000)))
        claimed = store.batch(begin)[0]
        assert claimed.verdict == "claimed", claimed
        end.append(Complete(record, owner, claimed.token, "42", TTL_MS, refresh=False))
        if fallback:
            end.append(CachePut(record, "42", "ok", CACHE_TTL_MS, int(time.time() * 1000)))
        assert store.batch(end)[0].stored

    return task


DRIVERS: dict[str, Callable[[str], Callable[[int], None]]] = {
    "celery_once": _celery_once,
    "floor_2_evalsha": _floor,
    "idempotency": _idempotency,
    "idempotency_fallback": lambda url: _idempotency(url, fallback=True),
}


def drive(variant: str, port: int, tasks: int) -> None:
    """Send ``tasks`` tasks' worth of ``variant``'s requests (run in its own process, so a
    peer's module-level client is made for this server)."""
    task = DRIVERS[variant](f"redis://127.0.0.1:{port}/0")
    for i in range(tasks):
        task(i)


def count(variant: str, tasks: int, folder: Path) -> tuple[int, int]:
    """Instructions the server spent on requests, and the commands it ran."""
    port = free_port()
    out = folder / f"{variant}-{tasks}.out"
    server = subprocess.Popen(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--collect-atstart=no",
         *(f"--toggle-collect={name}" for name in COLLECT),
         "redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    admin = redis.Redis(port=port)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                admin.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        subprocess.run([sys.executable, "-m", __spec__.name, "--drive", variant, "--port", str(port),
                        "--tasks", str(tasks)], check=True)  # fmt: skip
        stats = admin.info("commandstats")
        commands = sum(int(v["calls"]) for k, v in stats.items() if k not in ("cmdstat_info", "cmdstat_ping"))
        admin.shutdown(nosave=True)
    except redis.ConnectionError:
        pass  # SHUTDOWN closes the connection
    finally:
        admin.close()
        server.wait(timeout=60)
    totals = re.search(r"^totals: (\d+)", out.read_text(), re.MULTILINE)
    if totals is None:
        raise RuntimeError(f"callgrind wrote no totals to {out}")
    return int(totals.group(1)), commands


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from: {','.join(VARIANTS)}")
    parser.add_argument("--tasks", default="200,1200", help="N1,N2: tasks in the two runs per variant (200,1200)")
    parser.add_argument("--drive", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    if args.drive:
        drive(args.drive, args.port, int(args.tasks))
        return 0
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants: {', '.join(sorted(unknown))}")
    n1, n2 = (int(n) for n in args.tasks.split(","))
    rows: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory() as folder:
        for variant in variants:
            first, first_commands = count(variant, n1, Path(folder))
            second, second_commands = count(variant, n2, Path(folder))
            rows[variant] = ((second - first) / (n2 - n1), (second_commands - first_commands) / (n2 - n1))
    base = rows.get("celery_once", (0.0, 0.0))[0]
    print(f"Store instructions per task (callgrind, {', '.join(COLLECT)}), {n2} - {n1} tasks:\n")
    print("| variant | instructions per task | vs celery-once | server commands per task |")
    print("|---|---|---|---|")
    for variant, (per_task, commands) in rows.items():
        ratio = f"{per_task / base:.2f}" if base else "-"
        print(f"| {variant} | {per_task / 1000:.1f}k | {ratio} | {commands:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
