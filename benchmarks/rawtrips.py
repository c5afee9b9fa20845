"""``two_trips``: two store round trips with nothing of the library in between.

One blocking socket per thread and per process (a forked pool process opens its own), a
pre-packed ``EVALSHA`` of ``return 1``, one ``recv`` each: the ceiling of any design that
spends two round trips per task. Both benchmarks use it.
"""

from __future__ import annotations

import os
import socket
import threading

__all__ = ["RawTrips"]

_LOAD = b"*3\r\n$6\r\nSCRIPT\r\n$4\r\nLOAD\r\n$8\r\nreturn 1\r\n"


class RawTrips:
    def __init__(self, host: str, port: int) -> None:
        self.address = (host, port)
        self._local = threading.local()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()

    def _connect(self) -> tuple[socket.socket, bytes]:
        sock = socket.create_connection(self.address)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(_LOAD)
        sha = sock.recv(128).split(b"\r\n")[1]
        request = b"*3\r\n$7\r\nEVALSHA\r\n$%d\r\n%s\r\n$1\r\n0\r\n" % (len(sha), sha)
        with self._lock:
            self._sockets.append(sock)
        self._local.opened = (os.getpid(), sock, request)
        return sock, request

    def trips(self) -> None:
        opened = getattr(self._local, "opened", None)
        if opened is None or opened[0] != os.getpid():
            sock, request = self._connect()
        else:
            _, sock, request = opened
        for _ in range(2):
            sock.sendall(request)
            reply = sock.recv(64)
            if reply != b":1\r\n":
                raise RuntimeError(f"unexpected store reply {reply!r}")

    def close(self) -> None:
        with self._lock:
            for sock in self._sockets:
                sock.close()
            self._sockets.clear()
