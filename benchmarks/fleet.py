"""The fleet benchmark: what each task costs the one Redis a whole fleet shares.

Several ``celery worker --pool prefork`` processes serve every variant against one
private redis-server used as the resilience store; the broker and result backend live on
a second one, so the store's ``INFO`` holds store traffic only. Ours (idempotency,
breaker, idempotency + breaker + fallback, retry only) run side by side with plain
Celery and the peers: celery-once (``QueueOnce``, a lock per argument), celery-singleton
(``unique_on`` the argument), pybreaker with ``CircuitRedisStorage``, and two trivial
``EVALSHA`` round trips (the floor of any 2-trip design). Every body makes the same one
trivial downstream call.

A measurement publishes a variant's tasks to its own queue (celery-once and
celery-singleton take their locks there, as in an application), tells every worker to
consume it (``add_consumer``), waits for every result, lets the store go quiet, and tells
them to stop. Variants rotate each round and the order is reversed after each full
rotation; every figure is the median over the rounds.

- store CPU per task: the store server's ``used_cpu_user + used_cpu_sys`` (``INFO cpu``)
  from before publishing to after the last store command, less the server's idle CPU
  over that time (measured once, with the workers connected) and the time its
  ``commandstats`` shows for the benchmark's own ``INFO``/``DBSIZE``, divided by the tasks.
- server commands per task: the ``INFO commandstats`` calls over the same span, less the
  benchmark's own ``INFO``/``DBSIZE``/``CONFIG``; commands our Lua scripts run count too.
- round trips per task: every request redis-py writes on a connection to the store, in
  every worker process and in the publisher (``benchmarks.fleet_app.Wire`` wraps
  ``send_packed_command``): a pipeline, or one of our batches, is one; on a cluster,
  one per node a batch writes to. "at publish" is the publisher's share of them.
- throughput vs plain: tasks per second from the results' ``date_done`` (first tenth
  left out), as a median of per-round ratios to plain.
- store saturates at: 1 / the store's main-thread CPU per task
  (``used_cpu_*_main_thread``): the task rate at which its one command thread is busy.
- worker CPU per task: the worker processes and their pool processes, from ``/proc``.

``--cluster`` then runs plain and idempotency against a 3-master Redis Cluster and prints
each shard's share of the keys, commands and round trips, and the rate at which the
busiest shard saturates (vs one master's, from the first table).

    python -m benchmarks.fleet                      # 6 rounds of 1000 tasks per variant
    python -m benchmarks.fleet --quick --cluster    # a short run, to see that it works
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import redis
from celery import Task

from resilient_tasks.testing import ClusterServers, RedisServer, SubprocessWorker

from .fleet_app import (
    ADMIN_CLIENT_NAME,
    BACKEND_ENV,
    BROKER_ENV,
    CLUSTER_ENV,
    DESCRIPTIONS,
    PORTS_ENV,
    PREFETCH_ENV,
    STORE_ENV,
    VARIANTS,
    WIRE_ENV,
    Wire,
    build_app,
)
from .overhead import ADMIN_COMMANDS, orders
from .prefork import rate, worker_cpu

IDLE_QUEUE = "fleet.idle"
CLUSTER_VARIANTS = ("plain", "idempotency")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class NodeStats:
    """One store server's counters at one moment."""

    cpu: float  # used_cpu_user + used_cpu_sys, seconds
    main: float  # the same, main thread only
    commands: int  # every command's calls but the benchmark's own
    admin: float  # seconds the server spent in the benchmark's own commands (INFO, DBSIZE)
    keys: int


def node_stats(client: redis.Redis) -> NodeStats:
    cpu = client.info("cpu")
    stats = client.info("commandstats")
    commands, admin = 0, 0
    for name, value in stats.items():
        if name.removeprefix("cmdstat_").split("|")[0] in ADMIN_COMMANDS:
            admin += int(value["usec"])
        else:
            commands += int(value["calls"])
    return NodeStats(
        cpu=float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
        main=float(cpu.get("used_cpu_user_main_thread", cpu["used_cpu_user"]))
        + float(cpu.get("used_cpu_sys_main_thread", cpu["used_cpu_sys"])),
        commands=commands,
        admin=admin / 1e6,
        keys=int(client.dbsize()),
    )


def busy(before: NodeStats, after: NodeStats, idle: tuple[float, float], seconds: float) -> tuple[float, float]:
    """CPU seconds (all threads, main thread) the store spent on the work between two
    snapshots: less its idle CPU over ``seconds`` and the benchmark's own commands."""
    admin = after.admin - before.admin
    return (max(0.0, after.cpu - before.cpu - idle[0] * seconds - admin),
            max(0.0, after.main - before.main - idle[1] * seconds - admin))


@dataclass
class Sample:
    """One variant's measurement in one round; per-node lists follow the store's nodes."""

    variant: str
    tasks: int
    tasks_per_s: float
    cpu: list[float]  # store CPU seconds per node, idle subtracted
    main: list[float]  # main-thread CPU seconds per node, idle subtracted
    commands: list[int]
    keys: list[int]
    trips: list[int]
    publish_trips: int
    worker_cpu: float

    def per_task(self, values: Sequence[float], scale: float = 1.0) -> float:
        return sum(values) * scale / self.tasks


@dataclass
class Phase:
    """A store (one server or a cluster), the workers serving it, and the measuring loop."""

    broker: RedisServer
    store_url: str
    ports: list[int]
    variants: list[str]
    args: argparse.Namespace
    wire: Wire
    cluster: bool = False
    samples: list[Sample] = field(default_factory=list)
    idle: list[tuple[float, float]] = field(default_factory=list)  # CPU s per s: total, main
    redis_version: str = ""
    next_n: int = 0  # task arguments stay unique: no lock or claim is ever reused
    admins: list[redis.Redis] = field(default_factory=list)  # one per store node, not counted
    results: Any = None  # the result backend's database, on the broker's server
    publisher: Any = None
    tasks: dict[str, Task] = field(default_factory=dict)
    workers: list[SubprocessWorker] = field(default_factory=list)

    def run(self) -> None:
        work = tempfile.mkdtemp(prefix="rt-fleet-")
        wire_dir = os.path.join(work, "wire")
        os.mkdir(wire_dir)
        self.wire.retarget(wire_dir, self.ports)
        self.admins = [redis.Redis(host="127.0.0.1", port=p, client_name=ADMIN_CLIENT_NAME)
                       for p in self.ports]
        self.results = self.broker.client(1)
        self.redis_version = str(self.admins[0].info("server")["redis_version"])
        self.publisher, self.tasks = build_app(self.broker.url(0), None, self.store_url, self.variants,
                                               cluster=self.cluster)
        env = {
            BROKER_ENV: self.broker.url(0),
            BACKEND_ENV: self.broker.url(1),
            STORE_ENV: self.store_url,
            CLUSTER_ENV: "1" if self.cluster else "",
            PORTS_ENV: ",".join(map(str, self.ports)),
            WIRE_ENV: wire_dir,
            PREFETCH_ENV: str(self.args.prefetch),
            "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
        }
        self.workers = [
            SubprocessWorker("benchmarks.fleet_app", concurrency=self.args.concurrency, name=f"fleet{i}",
                             env=env, queues=[IDLE_QUEUE], log=os.path.join(work, f"worker{i}.log"))
            for i in range(self.args.workers)
        ]
        ok = False
        try:
            for worker in self.workers:
                worker.start()
            self._wait_ready(time.monotonic() + 90)
            for variant in self.variants:
                self.measure(variant, self.args.warmup)
            self.idle = self._idle(self.args.idle)
            for order in orders(self.variants, self.args.rounds):
                for variant in order:
                    self.samples.append(self.measure(variant, self.args.tasks))
            ok = True
        finally:
            for worker in self.workers:
                worker.stop()
            self.publisher.close()
            for client in (*self.admins, self.results):
                client.close()
            self.wire.retarget(work, [])  # its directory goes now: count nothing more
            if ok:
                shutil.rmtree(work, ignore_errors=True)
            else:
                print(f"worker logs kept in {work}", file=sys.stderr)

    def _wait_ready(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if len(self.publisher.control.ping(timeout=1.0, limit=len(self.workers)) or ()) >= len(self.workers):
                return
            if not all(w.alive for w in self.workers):
                break
        raise SystemExit("the benchmark workers did not all answer a ping")

    def _control(self, command: str, queue: str) -> None:
        replies = self.publisher.control.broadcast(
            command, arguments={"queue": queue}, reply=True, timeout=10, limit=len(self.workers)
        )
        if len(replies or ()) < len(self.workers):
            raise SystemExit(f"not every worker answered {command}({queue}): {replies}")

    def _stats(self) -> list[NodeStats]:
        return [node_stats(client) for client in self.admins]

    def _idle(self, seconds: float) -> list[tuple[float, float]]:
        """Each store node's CPU per second with the workers connected and nothing to do."""
        before, start = self._stats(), time.monotonic()
        time.sleep(seconds)
        after, spent = self._stats(), time.monotonic() - start
        rates = []
        for b, a in zip(before, after, strict=True):
            total, main = busy(b, a, (0.0, 0.0), 0.0)
            rates.append((total / spent, main / spent))
        return rates

    def _settled(self, deadline: float) -> list[NodeStats]:
        """The store's counters once its commands stop moving: the peers' unlocks run
        after the result is stored."""
        last = self._stats()
        while time.monotonic() < deadline:
            time.sleep(0.05)
            now = self._stats()
            if [s.commands for s in now] == [s.commands for s in last]:
                return now
            last = now
        return last

    def _worker_cpu(self) -> float:
        return sum(sum(worker_cpu(w.process.pid)) for w in self.workers if w.process is not None)

    def measure(self, variant: str, count: int) -> Sample:
        task: Task = self.tasks[variant]
        queue = f"fleet.{variant}"
        self.results.flushdb()
        trips0, own0 = self.wire.read()
        cpu0, stats0, start = self._worker_cpu(), self._stats(), time.monotonic()
        first = self.next_n
        self.next_n += count
        with self.publisher.producer_or_acquire() as producer:
            for n in range(first, first + count):
                task.apply_async((n,), queue=queue, producer=producer)
        self._control("add_consumer", queue)
        deadline = time.monotonic() + self.args.timeout
        while self.results.dbsize() < count:
            if time.monotonic() > deadline:
                raise SystemExit(f"{variant}: {self.results.dbsize()} of {count} tasks finished in time")
            time.sleep(0.02)
        stats1 = self._settled(time.monotonic() + 3.0)
        spent = time.monotonic() - start
        cpu1 = self._worker_cpu()
        trips1, own1 = self.wire.read()
        self._control("cancel_consumer", queue)
        idle = self.idle or [(0.0, 0.0)] * len(self.ports)
        used = [busy(b, a, i, spent) for b, a, i in zip(stats0, stats1, idle, strict=True)]
        return Sample(
            variant=variant,
            tasks=count,
            tasks_per_s=rate(self.results, count),
            cpu=[u[0] for u in used],
            main=[u[1] for u in used],
            commands=[a.commands - b.commands for b, a in zip(stats0, stats1, strict=True)],
            keys=[a.keys - b.keys for b, a in zip(stats0, stats1, strict=True)],
            trips=[a - b for b, a in zip(trips0, trips1, strict=True)],
            publish_trips=sum(own1) - sum(own0),
            worker_cpu=cpu1 - cpu0,
        )


def summarize(phase: Phase) -> list[dict[str, Any]]:
    """One row per variant: medians over the rounds, ratios paired by round."""
    by_variant = {v: [s for s in phase.samples if s.variant == v] for v in phase.variants}
    plain = by_variant.get("plain")
    rows = []
    for variant, runs in by_variant.items():
        def median(values: Any) -> float:
            return float(statistics.median(values))

        main_us = median(s.per_task(s.main, 1e6) for s in runs)
        commands = median(s.per_task(s.commands) for s in runs)
        row: dict[str, Any] = {
            "variant": variant,
            "tasks_per_s": round(median(s.tasks_per_s for s in runs), 1),
            "ratio_vs_plain": None if plain is None else round(median(
                s.tasks_per_s / p.tasks_per_s for s, p in zip(runs, plain, strict=True)), 3),
            "store_cpu_us_per_task": round(median(s.per_task(s.cpu, 1e6) for s in runs), 1),
            "store_main_thread_us_per_task": round(main_us, 1),
            "commands_per_task": round(commands, 2),
            "round_trips_per_task": round(median(s.per_task(s.trips) for s in runs), 3),
            "round_trips_at_publish_per_task": round(median(s.publish_trips / s.tasks for s in runs), 3),
            "keys_per_task": round(median(s.per_task(s.keys) for s in runs), 2),
            # no store commands: no store work to saturate it (what is left is noise)
            "store_saturates_at_tasks_per_s": round(1e6 / main_us) if main_us > 0 and commands else None,
            "worker_cpu_us_per_task": round(median(s.worker_cpu / s.tasks * 1e6 for s in runs), 1),
            "store_idle_cpu_us_per_s": round(sum(i[0] for i in phase.idle) * 1e6),
            "tasks": phase.args.tasks,
            "rounds": len(runs),
            "workers": phase.args.workers,
            "concurrency": phase.args.concurrency,
            "store": "cluster" if phase.cluster else "redis-server",
            "redis_version": phase.redis_version,
        }
        if phase.cluster:
            totals = {what: [sum(getattr(s, what)[i] for s in runs) for i in range(len(phase.ports))]
                      for what in ("keys", "commands", "trips", "main")}
            tasks = sum(s.tasks for s in runs)
            row["shards"] = [
                {
                    "port": port,
                    **{f"{what}_share": round(totals[what][i] / max(sum(totals[what]), 1e-12), 3)
                       for what in ("keys", "commands", "trips")},
                    "main_thread_us_per_task": round(totals["main"][i] / tasks * 1e6, 1),
                }
                for i, port in enumerate(phase.ports)
            ]
            busiest = max(shard["main_thread_us_per_task"] for shard in row["shards"])
            row["store_saturates_at_tasks_per_s"] = round(1e6 / busiest) if busiest > 0 else None
        rows.append(row)
    return rows


def _us(value: float) -> str:
    return f"{value:.0f} µs" if value >= 10 else f"{value:.1f} µs"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}/s"


def _trips(row: dict[str, Any]) -> str:
    trips, publish = row["round_trips_per_task"], row["round_trips_at_publish_per_task"]
    return f"{trips:.2f}" + (f" ({publish:.2f} at publish)" if publish else "")


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| variant | store CPU per task | server commands per task | round trips per task "
        "| throughput vs plain | store saturates at | worker CPU per task |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ratio = "-" if row["ratio_vs_plain"] is None else f"{row['ratio_vs_plain']:.2f}"
        lines.append(
            f"| {DESCRIPTIONS[row['variant']]} | {_us(row['store_cpu_us_per_task'])} "
            f"| {row['commands_per_task']:.1f} | {_trips(row)} | {ratio} "
            f"| {_rate(row['store_saturates_at_tasks_per_s'])} | {_us(row['worker_cpu_us_per_task'])} |"
        )
    return "\n".join(lines)


def cluster_markdown(row: dict[str, Any], one_master: dict[str, Any] | None) -> str:
    lines = [
        "| shard | keys | server commands | round trips | store main-thread CPU per task |",
        "|---|---|---|---|---|",
    ]
    for i, shard in enumerate(row["shards"], 1):
        lines.append(f"| master {i} (:{shard['port']}) | {shard['keys_share']:.0%} "
                     f"| {shard['commands_share']:.0%} | {shard['trips_share']:.0%} "
                     f"| {_us(shard['main_thread_us_per_task'])} |")
    saturates = row["store_saturates_at_tasks_per_s"]
    lines.append("")
    lines.append(
        f"Idempotency on 3 masters: {_trips(row)} round trips and {row['commands_per_task']:.1f} server "
        f"commands per task, throughput {row['ratio_vs_plain']:.2f}x plain; the busiest shard saturates "
        f"at {_rate(saturates)}"
        + (f", {saturates / one_master['store_saturates_at_tasks_per_s']:.2f}x one master's "
           f"({_rate(one_master['store_saturates_at_tasks_per_s'])})."
           if one_master and saturates and one_master["store_saturates_at_tasks_per_s"] else ".")
    )
    return "\n".join(lines)


def targets(rows: Sequence[dict[str, Any]], cluster: dict[str, Any] | None) -> list[str]:
    """Issue 15's criteria, for the variants this run measured."""
    by = {row["variant"]: row for row in rows}
    checks: list[tuple[str, float | None, str, float]] = []

    def check(label: str, value: float | None, op: str, limit: float) -> None:
        checks.append((label, value, op, limit))

    def ratio(variant: str, other: str, key: str) -> float | None:
        """(Throughput through ``ratio_vs_plain``: paired with plain round by round, so a
        round's pace does not weigh on it as it does on a median of rates.)"""
        if variant in by and other in by and by[other][key]:
            return float(by[variant][key]) / float(by[other][key])
        return None

    if "retry" in by and "plain" in by:
        check("retry only: worker CPU per task / plain's", ratio("retry", "plain", "worker_cpu_us_per_task"),
              "<=", 1.05)
    if "breaker" in by:
        check("breaker: round trips per task", by["breaker"]["round_trips_per_task"], "<=", 0.1)
        check("breaker: store CPU per task / pybreaker's", ratio("breaker", "pybreaker", "store_cpu_us_per_task"),
              "<=", 0.25)
        check("breaker: throughput / pybreaker's", ratio("breaker", "pybreaker", "ratio_vs_plain"), ">=", 1.0)
    if "idempotency" in by:
        row = by["idempotency"]
        check("idempotency: round trips per task", row["round_trips_per_task"], "==", 2.0)
        check("idempotency: store CPU per task / celery-once's",
              ratio("idempotency", "celery_once", "store_cpu_us_per_task"), "<=", 1.5)
        check("idempotency: server commands per task", row["commands_per_task"], "<=", 8)
        check("idempotency: throughput / celery-once's",
              ratio("idempotency", "celery_once", "ratio_vs_plain"), ">=", 1.0)
    if "all_guards" in by:
        row = by["all_guards"]
        check("idempotency + breaker + fallback: round trips per task", row["round_trips_per_task"], "==", 2.0)
        check("idempotency + breaker + fallback: store CPU per task / celery-once's",
              ratio("all_guards", "celery_once", "store_cpu_us_per_task"), "<=", 2.0)
        check("idempotency + breaker + fallback: server commands per task", row["commands_per_task"], "<=", 12)
    if cluster is not None:
        for i, shard in enumerate(cluster["shards"], 1):
            check(f"cluster: master {i}'s share of the keys / one third", shard["keys_share"] * 3, "within", 0.25)
        one = by.get("idempotency", {}).get("store_saturates_at_tasks_per_s")
        mine = cluster["store_saturates_at_tasks_per_s"]
        check("cluster: saturation rate / one master's", mine / one if one and mine else None, ">=", 2.5)
    lines = []
    for label, value, op, limit in checks:
        if value is None:
            lines.append(f"- {label}: not measured (a variant it compares with was not run)")
            continue
        ok = {"<=": value <= limit, ">=": value >= limit, "==": abs(value - limit) < 0.005,
              "within": abs(value - 1) <= limit}[op]
        wanted = f"1 ± {limit}" if op == "within" else f"{op} {limit:g}"
        lines.append(f"- {label}: {value:.3g} (wanted {wanted}) {'ok' if ok else 'NOT MET'}")
    return lines


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fleet", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2, help="celery worker processes (default 2)")
    parser.add_argument("--concurrency", type=int, default=2, help="prefork pool processes per worker (2)")
    parser.add_argument("--prefetch", type=int, default=4, help="worker_prefetch_multiplier (4)")
    parser.add_argument("--tasks", type=int, default=None, help="tasks per variant per round (1000)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds, median taken (6)")
    parser.add_argument("--warmup", type=int, default=None, help="discarded tasks per variant first (200)")
    parser.add_argument("--idle", type=float, default=None, help="seconds the store's idle CPU is measured (2)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: %(default)s")
    parser.add_argument("--cluster", action="store_true",
                        help="then plain and idempotency on a 3-master Redis Cluster: each shard's share")
    parser.add_argument("--quick", action="store_true",
                        help="a short run to see it work (150 tasks x 2 rounds): not figures for the docs")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per measurement (300)")
    parser.add_argument("--json", action="store_true", help="one JSON object per variant per line")
    args = parser.parse_args(argv)
    quick = {"tasks": 150, "rounds": 2, "warmup": 40, "idle": 1.0}
    full = {"tasks": 1000, "rounds": 6, "warmup": 200, "idle": 2.0}
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s): {', '.join(unknown)}")
    if "plain" not in args.variants:
        args.variants.insert(0, "plain")  # every ratio is to plain
    if min(args.workers, args.concurrency, args.prefetch, args.tasks, args.rounds, args.warmup) < 1:
        parser.error("--workers, --concurrency, --prefetch, --tasks, --rounds and --warmup must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    command = shlex.join(["python", "-m", "benchmarks.fleet", *(sys.argv[1:] if argv is None else argv)])
    wire = Wire(tempfile.gettempdir(), []).install()  # the publisher's share; retargeted per phase
    rows: list[dict[str, Any]] = []
    cluster_rows: list[dict[str, Any]] = []
    with RedisServer() as broker:
        with RedisServer() as store:
            phase = Phase(broker, store.url(0), [store.port], args.variants, args, wire)
            phase.run()
            rows = summarize(phase)
        if args.cluster:
            with ClusterServers(3) as cluster:
                phase = Phase(broker, cluster.url, [n.port for n in cluster.nodes],
                              list(CLUSTER_VARIANTS), args, wire, cluster=True)
                phase.run()
                cluster_rows = summarize(phase)
    cluster_row = next((r for r in cluster_rows if r["variant"] == "idempotency"), None)
    if args.json:
        for row in (*rows, *cluster_rows):
            print(json.dumps(row))
        return 0
    plain = next(r for r in rows if r["variant"] == "plain")
    setup = (f"{args.workers} celery workers x prefork concurrency {args.concurrency} "
             f"(plain Celery: {plain['tasks_per_s']:,.0f} tasks/s), "
             f"{args.tasks} tasks x {args.rounds} interleaved rounds per variant (medians), "
             f"redis {rows[0]['redis_version']}, {os.cpu_count()} CPUs")
    if args.quick or args.rounds < 6:
        setup += " - a short run: fewer than 6 rounds, not figures for the docs"
    print(f"Fleet benchmark: {setup}.\n")
    print(markdown(rows))
    print(f"\nstore CPU: INFO cpu user+sys, its idle CPU ({rows[0]['store_idle_cpu_us_per_s']} µs/s) and the "
          "benchmark's INFO subtracted; server commands: INFO commandstats; "
          "round trips: requests written on store connections (worker and publisher processes); "
          "store saturates at: 1 / main-thread CPU per task.")
    if cluster_row is not None:
        print("\nRedis Cluster, 3 masters (idempotency):\n")
        print(cluster_markdown(cluster_row, next((r for r in rows if r["variant"] == "idempotency"), None)))
    checks = targets(rows, cluster_row)
    if checks:
        print("\nIssue 15 targets:")
        print("\n".join(checks))
    print(f"\nReproduce: {command}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
