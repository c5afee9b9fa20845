"""The worker app of ``benchmarks.prefork``: the same four tasks as ``overhead``'s core
variants, served by ``celery worker`` in its own process (Celery's default prefork pool)."""

from __future__ import annotations

import os
from urllib.parse import urlsplit

from celery import Celery

import resilient_tasks as rt

from .floor import IdempotencyFloor
from .policies import POLICIES, register
from .rawtrips import RawTrips

app = Celery("prefork-bench", broker=os.environ["BENCH_BROKER"], backend=os.environ["BENCH_BACKEND"])
app.conf.update(
    worker_prefetch_multiplier=4,
    broker_connection_retry_on_startup=True,
    # polling_interval: a queue added by add_consumer is polled from the next BRPOP
    broker_transport_options={"visibility_timeout": 3600, "polling_interval": 0.05},
    result_expires=600,
    worker_hijack_root_logger=False,
)
rt.install(app, redis_url=os.environ["BENCH_STORE"])
if os.environ.get("BENCH_THREAD_CPU"):  # ``--thread-cpu``: see ``benchmarks.threadcpu``
    from . import threadcpu

    threadcpu.install(os.environ["BENCH_THREAD_CPU"])

for _variant in POLICIES:
    register(app, _variant)


_store = urlsplit(os.environ["BENCH_STORE"])
_RAW = RawTrips(_store.hostname or "127.0.0.1", _store.port or 6379)


def _two_trips(n: int) -> int:
    _RAW.trips()
    return n + 1


app.task(name="bench.two_trips")(_two_trips)

_FLOOR = IdempotencyFloor(_store.hostname or "127.0.0.1", _store.port or 6379, int(_store.path.strip("/") or 0))


def _idem_floor(n: int) -> int:
    _FLOOR.run("bench.idem_floor", n)
    return n + 1


app.task(name="bench.idem_floor")(_idem_floor)
