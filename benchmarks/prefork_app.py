"""The worker app of ``benchmarks.prefork``: the same four tasks as ``overhead``'s core
variants, served by ``celery worker`` in its own process (Celery's default prefork pool)."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlsplit

from celery import Celery

import resilient_tasks as rt

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

POLICIES: dict[str, rt.TaskPolicy | None] = {
    "plain": None,
    "idempotency": rt.TaskPolicy(idempotency=rt.IdempotencyPolicy(key=("n",))),
    "breaker": rt.TaskPolicy(downstream="bench-ds", breaker=rt.BreakerPolicy(min_calls=1_000_000)),
    "all_guards": rt.TaskPolicy(
        downstream="bench-ds2",
        idempotency=rt.IdempotencyPolicy(key=("n",)),
        breaker=rt.BreakerPolicy(min_calls=1_000_000),
        fallback=rt.FallbackPolicy(key=("n",)),
    ),
}


def _register(variant: str, policy: rt.TaskPolicy | None) -> None:
    def run(n: int) -> int:
        return n + 1

    options: dict[str, object] = {"name": f"bench.{variant}"}
    if policy is not None:
        options.update(base=rt.ResilientTask, policy=policy)
    app.task(**options)(run)


for _variant, _policy in POLICIES.items():
    _register(_variant, _policy)


class _RawTrips:
    """``two_trips``: plain Celery plus two store round trips on a raw socket (one per
    pool process), the ceiling of any two-trip design (see ``overhead.RawTrips``)."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.address = (parts.hostname or "127.0.0.1", parts.port or 6379)
        self.sock: socket.socket | None = None
        self.pid = 0
        self.request = b""

    def trips(self) -> None:
        if self.sock is None or self.pid != os.getpid():
            self.sock = socket.create_connection(self.address)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.pid = os.getpid()
            self.sock.sendall(b"*3\r\n$6\r\nSCRIPT\r\n$4\r\nLOAD\r\n$8\r\nreturn 1\r\n")
            sha = self.sock.recv(128).split(b"\r\n")[1]
            self.request = b"*3\r\n$7\r\nEVALSHA\r\n$%d\r\n%s\r\n$1\r\n0\r\n" % (len(sha), sha)
        for _ in range(2):
            self.sock.sendall(self.request)
            reply = self.sock.recv(64)
            if reply != b":1\r\n":
                raise RuntimeError(f"unexpected store reply {reply!r}")


_RAW = _RawTrips(os.environ["BENCH_STORE"])


def _two_trips(n: int) -> int:
    _RAW.trips()
    return n + 1


app.task(name="bench.two_trips")(_two_trips)
