"""The tasks and the worker app of ``benchmarks.fleet``, and its wire counter.

``build_app`` registers every variant on one Celery app; the benchmark's publisher calls
it too, so celery-once and celery-singleton take their locks where they would in an
application (in ``apply_async``). ``celery -A benchmarks.fleet_app worker`` serves the
app built from the ``BENCH_FLEET_*`` environment (set by ``benchmarks.fleet``).

Every body makes the same one trivial downstream call, ``downstream(n)``: pybreaker
wraps it in ``breaker.call``, our breaker guards it through the task's ``downstream``.
"""

from __future__ import annotations

import mmap
import os
from array import array
from collections.abc import Callable, Sequence
from typing import Any

import redis
from celery import Celery, Task
from redis.connection import AbstractConnection

import resilient_tasks as rt

from .overhead import VARIANTS as OVERHEAD_POLICIES
from .overhead import task_of
from .policies import POLICIES

__all__ = ["ADMIN_CLIENT_NAME", "DESCRIPTIONS", "VARIANTS", "Wire", "build_app", "downstream"]

BROKER_ENV, BACKEND_ENV, STORE_ENV = "BENCH_FLEET_BROKER", "BENCH_FLEET_BACKEND", "BENCH_FLEET_STORE"
CLUSTER_ENV, PORTS_ENV, WIRE_ENV = "BENCH_FLEET_CLUSTER", "BENCH_FLEET_PORTS", "BENCH_FLEET_WIRE"
PREFETCH_ENV = "BENCH_FLEET_PREFETCH"

#: The benchmark's own connections to the store (``INFO``): not counted as round trips.
ADMIN_CLIENT_NAME = "fleet-admin"
#: Seconds a peer's lock lives: longer than any run, as their docs advise for real tasks.
LOCK_SECONDS = 3600


def downstream(n: int) -> int:
    """The one trivial downstream call every body makes."""
    return n + 1


#: Our variants: the policies the other benchmarks measure, plus retry only.
OURS: dict[str, rt.TaskPolicy | None] = {
    "plain": None,
    "idempotency": POLICIES["idempotency"],
    "breaker": POLICIES["breaker"],  # min_calls so high it never trips: closed, all successes
    "all_guards": POLICIES["all_guards"],  # idempotency + breaker + fallback
    "retry": OVERHEAD_POLICIES["retry_policy"],  # no store at all on success
}


def _run(n: int) -> int:
    return downstream(n)


def _celery_once(app: Celery, name: str) -> Task:
    from celery_once import QueueOnce  # type: ignore[import-untyped]

    # a lock per argument, taken in apply_async, cleared in after_return
    return app.task(name=name, base=QueueOnce, once={"graceful": True, "keys": ["n"]})(_run)


def _celery_singleton(app: Celery, name: str) -> Task:
    from celery_singleton import Singleton  # type: ignore[import-untyped]

    # a lock per argument, taken in apply_async, released in on_success
    return app.task(name=name, base=Singleton, unique_on=["n"], lock_expiry=LOCK_SECONDS)(_run)


class _PerProcess:
    """A client made on first use in each process (a pool process is a fork)."""

    def __init__(self, make: Callable[[], Any]) -> None:
        self._make = make
        self._value: Any = None
        self._pid = -1

    def get(self) -> Any:
        if self._pid != os.getpid():
            self._value, self._pid = self._make(), os.getpid()
        return self._value


def _pybreaker(app: Celery, name: str, store_url: str) -> Task:
    import pybreaker

    def make() -> Any:
        client = redis.Redis.from_url(store_url)
        storage = pybreaker.CircuitRedisStorage(pybreaker.STATE_CLOSED, client, namespace="fleet-ds")
        return pybreaker.CircuitBreaker(name="fleet-ds", state_storage=storage)

    breaker = _PerProcess(make)

    def run(n: int) -> int:
        return int(breaker.get().call(downstream, n))

    return app.task(name=name)(run)


#: The floor of any design that makes two round trips: two EVALSHA of ``return 1``.
FLOOR_SCRIPT = "return 1"


def _floor(app: Celery, name: str, store_url: str) -> Task:
    def make() -> tuple[Any, str]:
        client = redis.Redis.from_url(store_url)
        return client, client.script_load(FLOOR_SCRIPT)

    scripted = _PerProcess(make)

    def run(n: int) -> int:
        client, sha = scripted.get()
        client.evalsha(sha, 0)
        result = downstream(n)
        client.evalsha(sha, 0)
        return result

    return app.task(name=name)(run)


Register = Callable[[Celery, str, str], Task]


def _ours(variant: str) -> Register:
    def register(app: Celery, name: str, store_url: str) -> Task:
        return task_of(app, variant, downstream, OURS[variant])

    return register


#: Every variant, in the order the table lists them.
VARIANTS: dict[str, Register] = {
    "plain": _ours("plain"),
    "celery_once": lambda app, name, _: _celery_once(app, name),
    "celery_singleton": lambda app, name, _: _celery_singleton(app, name),
    "pybreaker": _pybreaker,
    "floor_2_evalsha": _floor,
    **{variant: _ours(variant) for variant in OURS if variant != "plain"},
}
#: How the table names them.
DESCRIPTIONS = {
    "plain": "plain Celery",
    "celery_once": "celery-once (`QueueOnce`, lock per argument)",
    "celery_singleton": "celery-singleton (`unique_on` the argument)",
    "pybreaker": "pybreaker with `CircuitRedisStorage`",
    "floor_2_evalsha": "two trivial `EVALSHA` round trips (floor of a 2-trip design)",
    "idempotency": "ours, idempotency",
    "breaker": "ours, breaker (closed, all successes)",
    "all_guards": "ours, idempotency + breaker + fallback",
    "retry": "ours, retry only",
}
#: Variants that need a single redis-server as their store (not a cluster).
SINGLE_NODE_ONLY = frozenset({"celery_once", "celery_singleton", "pybreaker", "floor_2_evalsha"})


def build_app(
    broker: str,
    backend: str | None,
    store: str,
    variants: Sequence[str],
    *,
    cluster: bool = False,
    prefetch: int = 4,
) -> tuple[Celery, dict[str, Task]]:
    """One app with ``bench.<variant>`` for each of ``variants``; ``backend=None`` for the
    publisher (a Redis result backend would subscribe to every task's result channel)."""
    app = Celery("fleet-bench", broker=broker, backend=backend, set_as_current=False)
    app.conf.update(
        worker_prefetch_multiplier=prefetch,
        broker_connection_retry_on_startup=True,
        # polling_interval: a queue added by add_consumer is polled from the next BRPOP
        broker_transport_options={"visibility_timeout": 3600, "polling_interval": 0.05},
        result_expires=600,
        worker_hijack_root_logger=False,
        singleton_backend_url=store,
    )
    app.conf.ONCE = {"backend": "celery_once.backends.Redis",
                     "settings": {"url": store, "default_timeout": LOCK_SECONDS}}
    rt.install(app, redis_url=store, cluster=cluster)
    tasks = {v: VARIANTS[v](app, f"bench.{v}", store) for v in variants}
    return app, tasks


class Wire:
    """Round trips to the store, counted on the wire in every process that shares
    ``directory``: each request redis-py writes on a connection to one of ``ports`` (a
    pipeline, or one of our batches, is one write; on a cluster, one per node written to).

    Each process counts in its own memory-mapped file (``<directory>/<pid>``, one slot
    per port), so pool processes need no lock and no channel: the benchmark sums the
    files. Connections named ``ADMIN_CLIENT_NAME`` are left out.
    """

    def __init__(self, directory: str, ports: Sequence[int]) -> None:
        self._view: memoryview | None = None
        self._map: mmap.mmap | None = None
        self.directory = ""
        self.ports: list[int] = []
        self._slots: dict[int, int] = {}
        self.retarget(directory, ports)
        os.register_at_fork(after_in_child=self._forget)

    def retarget(self, directory: str, ports: Sequence[int]) -> None:
        """Count into ``directory``, for the store at ``ports`` (another phase of a run)."""
        self.directory = directory
        self.ports = list(ports)
        self._slots = {port: i for i, port in enumerate(self.ports)}
        self._forget()

    def _forget(self) -> None:
        self._view = self._map = None

    def _counts(self) -> memoryview:
        if self._view is None:
            size = 8 * len(self.ports)
            fd = os.open(os.path.join(self.directory, str(os.getpid())), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                os.ftruncate(fd, size)
                self._map = mmap.mmap(fd, size)
            finally:
                os.close(fd)
            self._view = memoryview(self._map).cast("q")
        return self._view

    def install(self) -> Wire:
        """Count every ``send_packed_command`` of redis-py to the store's ports (once per
        process: ``retarget`` for another store)."""
        original: Callable[..., None] = AbstractConnection.send_packed_command

        def send_packed_command(conn: Any, command: Any, check_health: bool = True) -> None:
            slot = self._slots.get(getattr(conn, "port", -1))
            if slot is not None and conn.client_name != ADMIN_CLIENT_NAME:
                self._counts()[slot] += 1
            original(conn, command, check_health)

        AbstractConnection.send_packed_command = send_packed_command  # type: ignore[method-assign]
        return self

    def read(self) -> tuple[list[int], list[int]]:
        """Round trips so far per port: every process's, and this process's own."""
        total, own = [0] * len(self.ports), [0] * len(self.ports)
        mine = str(os.getpid())
        for name in os.listdir(self.directory):
            with open(os.path.join(self.directory, name), "rb") as file:
                counts = array("q", file.read())
            for i, value in enumerate(counts[: len(self.ports)]):
                total[i] += value
                if name == mine:
                    own[i] += value
        return total, own


def _from_env() -> Celery | None:
    if BROKER_ENV not in os.environ:
        return None  # imported by the benchmark itself
    ports = [int(p) for p in os.environ[PORTS_ENV].split(",")]
    Wire(os.environ[WIRE_ENV], ports).install()
    cluster = os.environ.get(CLUSTER_ENV) == "1"
    variants = [v for v in VARIANTS if not (cluster and v in SINGLE_NODE_ONLY)]
    worker_app, _ = build_app(os.environ[BROKER_ENV], os.environ[BACKEND_ENV], os.environ[STORE_ENV],
                              variants, cluster=cluster, prefetch=int(os.environ.get(PREFETCH_ENV, "4")))
    return worker_app


app = _from_env()
