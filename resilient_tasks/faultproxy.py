"""A TCP fault proxy on loopback, for tests: latency, blackholes, resets, cut replies.

Toxiproxy's server cannot be installed everywhere; this reproduces the toxics we need
in one asyncio loop on a background thread. Point a client at ``proxy.port`` instead
of the real server and change the faults while it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

__all__ = ["FaultProxy", "Faults"]


@dataclass
class Faults:
    """The faults in force; change them at any time (reads are racy by design)."""

    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    blackhole_until: float = 0.0
    cut_probability: float = 0.0
    reset_probability: float = 0.0
    counts: dict[str, int] = field(default_factory=lambda: {"cut": 0, "reset": 0, "blackholed": 0})


class FaultProxy:
    """Forwards ``127.0.0.1:port`` to ``upstream``, applying ``faults`` to each chunk."""

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1", *, seed: int = 1) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.faults = Faults()
        self.port = 0
        self._rng = random.Random(seed)
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy", daemon=True)

    def start(self) -> FaultProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(timeout=10)
        return self

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    # -- faults -------------------------------------------------------------------------

    def latency(self, mean_ms: float, jitter_ms: float = 0.0) -> None:
        self.faults.latency_ms, self.faults.jitter_ms = mean_ms, jitter_ms

    def blackhole(self, seconds: float) -> None:
        """Swallow everything for ``seconds``; connections stay open, clients time out."""
        self.faults.blackhole_until = time.monotonic() + seconds

    def cut_replies(self, probability: float) -> None:
        """With ``probability``, forward half of a server reply, then reset the connection."""
        self.faults.cut_probability = probability

    def resets(self, probability: float) -> None:
        """With ``probability`` per chunk, reset the connection before forwarding it."""
        self.faults.reset_probability = probability

    def reset_all(self) -> None:
        """Reset every open connection now."""
        self._loop.call_soon_threadsafe(self._reset_all)

    def clear(self) -> None:
        counts = self.faults.counts
        self.faults = Faults(counts=counts)

    # -- plumbing -----------------------------------------------------------------------

    def _reset_all(self) -> None:
        for writer in list(self._writers):
            _abort(writer)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            _abort(writer)
            return
        self._writers.update((writer, up_writer))
        pair = (writer, up_writer)
        await asyncio.gather(
            self._pipe(reader, up_writer, pair, reply=False),
            self._pipe(up_reader, writer, pair, reply=True),
            return_exceptions=True,
        )
        self._writers.difference_update(pair)

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
        *,
        reply: bool,
    ) -> None:
        try:
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                faults = self.faults
                if time.monotonic() < faults.blackhole_until:
                    faults.counts["blackholed"] += 1
                    continue
                if faults.latency_ms or faults.jitter_ms:
                    delay = faults.latency_ms + self._rng.uniform(-faults.jitter_ms, faults.jitter_ms)
                    await asyncio.sleep(max(0.0, delay) / 1000.0)
                if self._rng.random() < faults.reset_probability:
                    faults.counts["reset"] += 1
                    break
                if reply and len(chunk) > 1 and self._rng.random() < faults.cut_probability:
                    faults.counts["cut"] += 1
                    writer.write(chunk[: len(chunk) // 2])
                    with contextlib.suppress(OSError):
                        await writer.drain()
                    break
                writer.write(chunk)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for w in pair:
                _abort(w)

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            self._reset_all()

        with contextlib.suppress(RuntimeError):
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0), as a crashed peer or a middlebox would."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(Exception):
        writer.transport.abort()
