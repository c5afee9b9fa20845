"""The worker app of ``benchmarks.prefork``: the variants of ``benchmarks.policies``,
served by ``celery worker`` in its own process (Celery's default prefork pool)."""

from __future__ import annotations

import os

from celery import Celery

import resilient_tasks as rt

from .policies import PREFORK_VARIANTS, register

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

for _variant in PREFORK_VARIANTS:
    register(app, _variant)


if os.environ.get("BENCH_CALLGRIND_LIB"):  # benchmarks.prefork_instructions only
    import ctypes
    import signal

    from celery import signals

    _callgrind = ctypes.CDLL(os.environ["BENCH_CALLGRIND_LIB"])

    def _dump_on_sigusr2(**_: object) -> None:
        """A pool process writes its counts (and starts again from zero) on SIGUSR2: a
        forked process under valgrind has no ``callgrind_control``."""
        signal.signal(signal.SIGUSR2, lambda *_: _callgrind.rt_callgrind_dump())

    signals.worker_process_init.connect(_dump_on_sigusr2, weak=False)
