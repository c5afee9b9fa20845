"""``idem_floor``: the store's side of an idempotent task, with none of the library's Python.

Per task it hashes the key as the library does, then runs the library's own ``claim``
(with the epoch keys) and ``complete`` scripts over one blocking socket, one request and
one ``recv`` each. No guard chain, no heartbeat, no fingerprint, no telemetry. Its ratio
to plain is the most any client of these scripts could reach on this machine and pool;
``idempotency`` is read against it, ``two_trips`` (``return 1`` twice) against both.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import socket
import threading

from resilient_tasks.store.redis import scripts

__all__ = ["IdempotencyFloor"]


def _command(*parts: str) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        data = part.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class IdempotencyFloor:
    def __init__(self, host: str, port: int, db: int, prefix: str = "rt") -> None:
        self.address = (host, port)
        self.db = db
        self.prefix = prefix
        self._local = threading.local()
        self.epoch = (f"{prefix}:meta:{{epoch}}", f"{prefix}:meta:{{epoch}}:amnesia")

    def _connect(self) -> socket.socket:
        sock = socket.create_connection(self.address)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sources = scripts()
        setup = [
            _command("SELECT", str(self.db)),
            _command("SCRIPT", "LOAD", sources["claim"][0]),
            _command("SCRIPT", "LOAD", sources["complete"][0]),
            _command("SET", self.epoch[0], "floor", "NX", "PX", "604800000"),
        ]
        sock.sendall(b"".join(setup))
        reply = b""
        while reply.count(b"\r\n") < 6:  # +OK, two $40 SHA bulk strings, +OK or nil
            reply += sock.recv(4096)
        self._local.state = (os.getpid(), sock, itertools.count(1), os.urandom(8).hex())
        return sock

    def run(self, task: str, n: int) -> None:
        state = getattr(self._local, "state", None)
        if state is None or state[0] != os.getpid():
            self._connect()
            state = self._local.state
        _, sock, counter, prefix = state
        key_hash = hashlib.sha256(f"{task}\0[{n}]\0".encode()).hexdigest()
        key = f"{self.prefix}:idem:{{{key_hash}}}"
        owner = f"{prefix}{next(counter):016x}"
        claim_sha, complete_sha = scripts()["claim"][1], scripts()["complete"][1]
        sock.sendall(_command(
            "EVALSHA", claim_sha, "3", key, *self.epoch, owner, "60000", "86400000", "", "", "0", "", ""
        ))
        reply = sock.recv(256)
        if not reply.startswith(b"*2\r\n$7\r\nclaimed\r\n:"):
            raise RuntimeError(f"claim was not taken: {reply!r}")
        token = reply.split(b"\r\n")[3][1:].decode()
        sock.sendall(_command(
            "EVALSHA", complete_sha, "1", key, owner, token, str(n + 1), "86400000", "0"
        ))
        reply = sock.recv(256)
        if reply != b"*1\r\n:1\r\n":
            raise RuntimeError(f"complete was refused: {reply!r}")
