"""Instructions per task call, counted by valgrind: the one measure this machine repeats.

Throughput ratios move by several points between runs here, more than most changes to
the hot path. ``callgrind`` counts the instructions a process executes, the same count
for the same code and inputs whatever else the machine is doing. Each variant runs in a
child process that calls its task through Celery's own tracer (as a pool process does,
result backend off) against a private redis-server: once with ``--small`` calls, once
with ``--small + --calls``; the difference over ``--calls`` is one call, start-up left
out. Kernel work (the socket calls themselves) is not counted: read it as the CPU of the
task's Python and C in user space, not as time.

    python -m benchmarks.instructions            # needs valgrind
    python -m benchmarks.instructions --variants plain,idempotency --calls 2000
    python -m benchmarks.instructions --variants redis_trip,client_trip,store_trip

The ``*_trip`` variants are round trips alone, no task (``TRIPS``).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

VARIANTS = ("plain", "idempotency", "breaker", "all_guards")
#: Round trips alone, no task: redis-py's part of a trip and the store's. ``redis_trip``:
#: one EVALSHA written and read on a connection kept between trips, through redis-py's
#: public connection API (hiredis packing and parsing), the least any trip costs;
#: ``client_trip``: the same through ``Redis.evalsha`` (a pool check-out per call);
#: ``store_trip``: ``RedisStore.batch`` of one ``claim`` (ours: codec, answer types).
TRIPS = ("redis_trip", "client_trip", "store_trip")
WARMUP = 300


def trips(variant: str, calls: int, port: int) -> None:
    """``calls`` round trips of ``variant`` (one of ``TRIPS``) after the warm-up."""
    import hiredis
    import redis

    from resilient_tasks.store.protocol import Claim
    from resilient_tasks.store.redis import RedisStore

    first = int.from_bytes(os.urandom(4), "big") * 100_000
    keys = range(first, first + WARMUP + calls)
    if variant == "store_trip":
        store = RedisStore(f"redis://127.0.0.1:{port}/1")
        for n in keys:
            store.batch([Claim(f"{n:x}", "owner", 60_000, 60_000)])
        return
    client = redis.Redis(port=port, db=1)
    sha = client.script_load("return redis.call('SET', KEYS[1], ARGV[1], 'PX', 60000)")
    if variant == "client_trip":
        for n in keys:
            client.evalsha(sha, 1, f"bench:{n:x}", "1")
        return
    conn = client.connection_pool.get_connection()
    for n in keys:
        conn.send_packed_command([hiredis.pack_command(("EVALSHA", sha, 1, f"bench:{n:x}", "1"))])
        conn.read_response()


def child(variant: str, calls: int, port: int, proxy: bool = False) -> None:
    """Run ``calls`` calls of ``variant`` after the warm-up (under valgrind). ``proxy``:
    trace the proxy ``app.task`` returns, as this benchmark did before 2026-12-03 (its
    figures are about 38k higher for every variant)."""
    if variant in TRIPS:
        trips(variant, calls, port)
        return
    from celery import Celery
    from celery.app.trace import build_tracer

    import resilient_tasks as rt

    from .policies import register

    app = Celery("instructions", broker="memory://", set_as_current=False)
    app.conf.task_ignore_result = True
    rt.install(app, redis_url=f"redis://127.0.0.1:{port}/1")
    task = register(app, variant, shared=False)
    app.finalize()
    if not proxy:
        task = app.tasks[task.name]  # the task itself, as a worker holds it (not the proxy)
    trace = build_tracer(task.name, task, app=app, eager=False, propagate=True)
    first = int.from_bytes(os.urandom(4), "big") * 100_000  # fresh keys every run
    for n in range(first, first + WARMUP + calls):
        task_id = f"{n:032x}"
        request = {"id": task_id, "headers": {}, "hostname": "bench", "retries": 0,
                   "delivery_info": {"routing_key": "celery", "exchange": ""}}
        trace(task_id, (n,), {}, request)


def _count(variant: str, calls: int, port: int, workdir: str, proxy: bool) -> int:
    out = os.path.join(workdir, f"{variant}.{calls}.out")
    command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable,
               "-m", "benchmarks.instructions", "--child", variant, str(calls), str(port)]
    if proxy:
        command.append("--proxy")
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    found = re.search(r"Collected : (\d+)", done.stderr)
    if done.returncode != 0 or found is None:
        raise SystemExit(f"valgrind failed for {variant}: {done.stderr[-2000:]}")
    return int(found.group(1))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--calls", type=int, default=1000, help="calls told apart (per variant)")
    parser.add_argument("--small", type=int, default=200, help="calls of the shorter run")
    parser.add_argument("--proxy", action="store_true",
                        help="trace the task's proxy, as before 2026-12-03 (to compare with older figures)")
    parser.add_argument("--child", nargs=3, metavar=("VARIANT", "CALLS", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child[0], int(args.child[1]), int(args.child[2]), args.proxy)
        return 0
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (apt-get install valgrind)")
    from resilient_tasks.testing import RedisServer

    variants = [v for v in args.variants.split(",") if v]
    per_call: dict[str, float] = {}
    with RedisServer() as server, tempfile.TemporaryDirectory() as workdir:
        runs = [(v, n) for v in variants for n in (args.small, args.small + args.calls)]
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            counts = dict(zip(runs, pool.map(lambda r: _count(r[0], r[1], server.port, workdir, args.proxy), runs),
                              strict=True))
        for v in variants:
            per_call[v] = (counts[(v, args.small + args.calls)] - counts[(v, args.small)]) / args.calls
    plain = per_call.get("plain")
    print("instructions per call (user space, callgrind), thousands")
    print(f"{'variant':12s} {'per call':>9s} {'over plain':>11s}")
    for v in variants:
        over_plain = f"{(per_call[v] - plain) / 1000:11.1f}" if plain is not None else f"{'-':>11s}"
        print(f"{v:12s} {per_call[v] / 1000:9.1f} {over_plain}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
