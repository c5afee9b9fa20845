"""One store connection that we write and read ourselves.

redis-py opens it (TCP, unix socket or TLS; AUTH, SELECT), then hands us the socket. Our
round trips are always "some EVALSHAs, then their answers", so a plain ``sendall`` and a
small RESP2 reader do the job. redis-py's general path costs about a round trip's worth of
CPU per call again on a busy thread pool: a liveness check that toggles the socket's
timeout three times, a poll before every send and read, and a per-line parser.

A plain socket is kept in blocking mode: a send is one system call (bounded by
``SO_SNDTIMEO``), a read is a ``poll`` for the time left, then one ``recv``. ``poll``
counts its time down across signals, so a worker that receives signals still gives up on
time. TLS and gevent/eventlet sockets, and Windows, keep Python's timeout mode.
"""

from __future__ import annotations

import _socket
import math
import select
import socket
import ssl
import struct
import sys
import time
from typing import Any

import redis
from redis.exceptions import ResponseError

hiredis: Any
try:  # C parser and packer, when installed (``pip install resilient-tasks[fast]``)
    import hiredis as _hiredis

    hiredis = _hiredis
except ImportError:  # pragma: no cover - depends on the environment
    hiredis = None

try:  # the error classes redis-py gives each error code (NOSCRIPT, LOADING, ...)
    from redis._parsers import BaseParser

    _parse_error: Any = BaseParser.parse_error
except ImportError:  # pragma: no cover - a redis-py that moved it

    def _parse_error(message: str) -> ResponseError:
        if message.startswith("NOSCRIPT"):
            return redis.exceptions.NoScriptError(message)
        return ResponseError(message)


__all__ = ["Wire", "parse_reply"]

_CRLF = b"\r\n"


class _Incomplete(Exception):
    """More bytes are needed before this answer can be parsed."""


def parse_reply(buf: bytes, pos: int) -> tuple[Any, int]:
    """One RESP2 value from ``buf`` at ``pos``: bulk strings as bytes, integers as int,
    nil as None, arrays as lists, errors as exception instances (as a pipeline gives them)."""
    end = buf.find(_CRLF, pos)
    if end < 0:
        raise _Incomplete
    kind = buf[pos]
    line = buf[pos + 1 : end]
    pos = end + 2
    try:
        if kind == 36:  # $ bulk string
            size = int(line)
            if size < 0:
                return None, pos
            stop = pos + size
            if stop + 2 > len(buf):
                raise _Incomplete
            return buf[pos:stop], stop + 2
        if kind == 58:  # : integer
            return int(line), pos
        if kind == 42:  # * array
            size = int(line)
            if size < 0:
                return None, pos
            items = []
            for _ in range(size):
                item, pos = parse_reply(buf, pos)
                items.append(item)
            return items, pos
    except ValueError as exc:
        raise redis.exceptions.InvalidResponse(f"malformed reply line {line[:40]!r}") from exc
    if kind == 43:  # + status
        return line, pos
    if kind == 45:  # - error
        return _parse_error(line.decode("utf-8", "replace")), pos
    raise redis.exceptions.InvalidResponse(f"unknown reply type {bytes([kind])!r}")


def _kernel_timeouts_fit(sock: Any) -> bool:
    """The standard library's own socket (plain TCP or unix), not TLS, and not a gevent
    or eventlet green socket: those keep the fd non-blocking and wait in their hub, where
    a blocking socket would wait forever. Not on Windows (no ``poll``, another timeval)."""
    return (
        sys.platform != "win32"
        and hasattr(select, "poll")
        and isinstance(sock, _socket.socket)
        and not isinstance(sock, ssl.SSLSocket)
    )


def _timeval(seconds: float) -> bytes:
    seconds = max(seconds, 0.001)  # a zero timeval would mean "wait forever"
    whole = int(seconds)
    return struct.pack("ll", whole, int((seconds - whole) * 1_000_000))


class Wire:
    """A connected socket, or nothing yet; opened by the first send."""

    __slots__ = ("conn", "kernel_timeouts", "poller", "reader", "sock", "timeout")

    def __init__(self, conn: Any, timeout: float | None) -> None:
        self.conn = conn
        self.timeout = timeout
        self.sock: Any = None
        self.kernel_timeouts = False
        self.poller: Any = None
        #: One parser per connection: a trip reads whole answers, so it starts empty, and
        #: a trip that failed half-way closes the connection with it.
        self.reader: Any = None

    def open(self) -> None:
        self.conn.connect()  # redis-py: TLS handshake, AUTH, SELECT
        sock = self.conn._sock
        self.kernel_timeouts = False
        if _kernel_timeouts_fit(sock) and self.timeout is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(self.timeout))
                # (a backstop only: reads wait in ``poll``, which keeps the deadline)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(self.timeout))
                sock.settimeout(None)
                self.poller = select.poll()
                self.poller.register(sock.fileno(), select.POLLIN)
                self.kernel_timeouts = True
            except (OSError, AttributeError, struct.error):
                sock.settimeout(self.timeout)
        self.sock = sock
        self.reader = hiredis.Reader(replyError=ResponseError) if hiredis is not None else None

    def idle_and_sound(self) -> bool:
        """True unless the server closed it (or sent something unasked) while it was
        idle: one non-blocking look, no round trip."""
        sock = self.sock
        if self.kernel_timeouts:
            # EOF, a reset or stray bytes all wake ``poll``; nothing at all is the one
            # sound answer (a ``poll`` rather than a peek: no exception on the good path).
            try:
                return not self.poller.poll(0)
            except (OSError, ValueError):
                return False
        try:
            if isinstance(sock, ssl.SSLSocket):
                if sock.pending():
                    return False
                return not _readable_now(sock)
            sock.settimeout(0)  # a green socket: peek without waiting in the hub
            try:
                sock.recv(1, socket.MSG_PEEK)
            finally:
                sock.settimeout(self.timeout)
            return False
        except (BlockingIOError, TimeoutError):
            return True
        except (OSError, ValueError):
            return False

    def close(self) -> None:
        self.sock = None
        self.poller = None
        self.reader = None
        self.conn.disconnect()

    def round_trip(self, payload: bytes, count: int, deadline: float | None) -> list[Any]:
        """Send ``payload``, read ``count`` answers. Error answers come back in place,
        except those that mean the connection is unusable (LOADING, auth), raised."""
        if self.sock is None:
            self.open()
        try:
            self.sock.sendall(payload)
        except BlockingIOError as exc:
            raise redis.TimeoutError("timed out writing to the store") from exc
        except TimeoutError as exc:
            raise redis.TimeoutError("timed out writing to the store") from exc
        except OSError as exc:
            raise redis.ConnectionError(f"error writing to the store: {exc}") from exc
        if self.reader is not None:
            return self._read_hiredis(count, deadline)
        answers: list[Any] = []
        buf = b""
        pos = 0
        while len(answers) < count:
            try:
                if pos == len(buf):
                    raise _Incomplete
                value, pos = parse_reply(buf, pos)
            except _Incomplete:
                buf = buf[pos:] + self._recv(deadline)
                pos = 0
                continue
            if isinstance(value, Exception) and not isinstance(value, ResponseError):
                raise value
            answers.append(value)
        if pos != len(buf):
            raise redis.exceptions.InvalidResponse("the store sent more than was asked for")
        return answers

    def _read_hiredis(self, count: int, deadline: float | None) -> list[Any]:
        reader = self.reader
        reader.feed(self._recv(deadline))  # a trip starts with an empty reader: no answer yet
        answers: list[Any] = []
        while len(answers) < count:
            try:
                value = reader.gets()
            except hiredis.HiredisError as exc:
                raise redis.exceptions.InvalidResponse(f"malformed reply from the store: {exc}") from exc
            if value is False:
                reader.feed(self._recv(deadline))
                continue
            if isinstance(value, ResponseError):
                value = _parse_error(str(value))
                if not isinstance(value, ResponseError):
                    raise value
            answers.append(value)
        if reader.gets() is not False:
            raise redis.exceptions.InvalidResponse("the store sent more than was asked for")
        return answers

    def _recv(self, deadline: float | None) -> bytes:
        """Bytes of the reply: waits the socket timeout at most, never past ``deadline``."""
        wait = self.timeout
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise redis.TimeoutError("no time left for this store call")
            wait = left if wait is None else min(wait, left)
        sock = self.sock
        try:
            if self.kernel_timeouts:
                ms = None if wait is None else max(1, math.ceil(wait * 1000))
                if not self.poller.poll(ms):
                    raise redis.TimeoutError("timed out reading from the store")
            elif wait != self.timeout:
                sock.settimeout(wait)
            data = sock.recv(65536)
        except (BlockingIOError, TimeoutError) as exc:
            raise redis.TimeoutError("timed out reading from the store") from exc
        except OSError as exc:
            raise redis.ConnectionError(f"error reading from the store: {exc}") from exc
        finally:
            if not self.kernel_timeouts and wait != self.timeout and self.sock is not None:
                sock.settimeout(self.timeout)
        if not data:
            raise redis.ConnectionError("the store closed the connection")
        return data  # type: ignore[no-any-return]


def _readable_now(sock: Any) -> bool:
    """Is there something to read (an EOF too)? ``poll`` where there is one: ``select``
    cannot take a descriptor above 1023, which a busy gevent worker reaches."""
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        return bool(poller.poll(0))
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable)
