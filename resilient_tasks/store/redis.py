"""The Redis store: one Lua script per state change, many scripts per round trip.

Scripts are sent as ``EVALSHA`` inside a non-transactional pipeline. redis-py's
``Script`` objects would send ``SCRIPT EXISTS`` before each pipeline; instead a
``NOSCRIPT`` answer (after a restart or ``SCRIPT FLUSH``) loads the scripts and re-runs
only the ops that did not execute, which is safe because a NOSCRIPT op changed nothing.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import inspect
import logging
import time
from collections.abc import Sequence
from importlib import resources
from typing import Any

import redis
from redis._parsers import _RESP2Parser
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError, ResponseError
from redis.retry import Retry

from ..errors import StoreUnavailable
from ..process import current_pid
from .base import Op
from .wire import Wire

__all__ = ["RedisStore", "load_scripts", "scripts"]

log = logging.getLogger(__name__)

#: How many times a batch's NOSCRIPT answers are loaded and re-sent.
NOSCRIPT_TRIES = 3
#: One store call's reads end this many socket timeouts after it started.
CALL_BUDGET = 1.5


def load_scripts() -> dict[str, str]:
    """Every ``lua/*.lua`` shipped with the package, by name, each behind the shared
    ``_prelude.lua`` (helpers a script may call, such as ``clock_ms``)."""
    folder = resources.files(__package__).joinpath("lua")
    prelude = folder.joinpath("_prelude.lua").read_text(encoding="utf-8")
    return {
        entry.name.removesuffix(".lua"): prelude + entry.read_text(encoding="utf-8")
        for entry in folder.iterdir()
        if entry.name.endswith(".lua") and not entry.name.startswith("_")
    }


def _lean_connection() -> dict[str, Any]:
    """Connect with one command (SELECT), not five: RESP2 needs no HELLO, and no
    CLIENT SETINFO to a server that may not know it. Through a slow network each of those
    is a round trip a worker would wait for."""
    params = inspect.signature(redis.connection.AbstractConnection.__init__).parameters
    lean: dict[str, Any] = {"protocol": 2}
    if "driver_info" in params:
        lean["driver_info"] = None
    elif "lib_name" in params:
        lean.update(lib_name=None, lib_version=None)
    return lean


@functools.cache
def scripts() -> dict[str, tuple[str, str]]:
    """Every script's source and SHA-1, read when the first store needs them."""
    return {name: (src, hashlib.sha1(src.encode()).hexdigest()) for name, src in load_scripts().items()}


def _evalsha_args(op: Op) -> tuple[Any, ...]:
    return (scripts()[op.script][1], len(op.keys), *op.keys, *op.args)


@functools.cache
def _evalsha_head(script: str) -> bytes:
    sha = scripts()[script][1].encode()
    return b"$7\r\nEVALSHA\r\n$%d\r\n%s\r\n" % (len(sha), sha)


def _bulk(value: Any) -> bytes:
    if isinstance(value, str):
        data = str.encode(value)
    elif isinstance(value, bytes):
        data = bytes(value)
    elif isinstance(value, bool):
        raise TypeError("a script argument may not be a bool")
    elif isinstance(value, int):
        data = b"%d" % value
    elif isinstance(value, float):
        data = float.__repr__(value).encode()
    else:
        raise TypeError(f"a script argument must be str, bytes, int or float, not {type(value).__name__}")
    return b"$%d\r\n%s\r\n" % (len(data), data)


def _pack_loads(names: Sequence[str]) -> bytes:
    """RESP for ``SCRIPT LOAD`` of each named script."""
    return b"".join(
        b"*3\r\n" + _bulk("SCRIPT") + _bulk("LOAD") + _bulk(scripts()[name][0]) for name in names
    )


def pack_evalsha(ops: Sequence[Op]) -> bytes:
    """RESP for ``EVALSHA`` per op: our args are only str/int/float, so packing them here
    costs a fraction of redis-py's general packer (the hot path runs it twice per task,
    for some 50 arguments). Not hiredis's packer: it writes a float subclass (a numpy
    float) by its ``repr``, which a script cannot read as a number."""
    parts: list[bytes] = []
    append = parts.append
    for op in ops:
        keys, args = op.keys, op.args
        append(b"*%d\r\n%s$%d\r\n%d\r\n" % (
            3 + len(keys) + len(args), _evalsha_head(op.script), len(str(len(keys))), len(keys)
        ))
        for key in keys:
            data = key.encode()
            append(b"$%d\r\n%s\r\n" % (len(data), data))
        for value in args:
            if type(value) is str:
                data = value.encode()
            elif type(value) is int:
                data = b"%d" % value
            else:
                append(_bulk(value))
                continue
            append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class RedisStore:
    """Shared state in one Redis (or a TLS/ACL Redis, by URL)."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "rt",
        socket_timeout: float = 5.0,
        client: redis.Redis | None = None,
        cluster: bool = False,
        **options: Any,
    ) -> None:
        if not prefix or any(c in prefix for c in "{}* \r\n\0"):
            raise ValueError(f"prefix {prefix!r} must be non-empty with no braces, '*' or spaces")
        self.prefix = prefix
        self.url = url
        self._socket_timeout = socket_timeout

        # No silent re-sends: a script whose reply was lost may have run, and only the
        # guards know whether running it again is safe.
        options.setdefault("retry", Retry(NoBackoff(), 0))
        if not cluster:
            for name, value in _lean_connection().items():
                options.setdefault(name, value)
            if url.startswith("rediss://") or options.get("ssl"):
                # redis-py with the hiredis parser takes a TLS 1.3 session ticket for
                # unread data and refuses the new connection ("Connection not ready").
                options.setdefault("parser_class", _RESP2Parser)
        self.cluster = cluster
        self._idle: collections.deque[Wire] = collections.deque()
        #: Requests written on our connections (each is one round trip).
        self.requests_sent = 0
        self._pid = current_pid()
        if client is not None:
            self.client: Any = client
        elif cluster:
            # Every script touches one hash slot ({tag}), so each op goes to one node.
            self.client = redis.RedisCluster.from_url(
                url, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout, **options
            )
        else:
            self.client = redis.Redis.from_url(
                url,
                socket_timeout=socket_timeout,
                socket_connect_timeout=socket_timeout,
                health_check_interval=30,
                **options,
            )
        self._timeout = self._timeout_setting()

    def _timeout_setting(self) -> float | None:
        if self.cluster:
            return self._socket_timeout
        value = self.client.connection_pool.connection_kwargs.get("socket_timeout")
        return float(value) if value is not None else None

    @property
    def socket_timeout(self) -> float | None:
        """Seconds one command may block (the URL's ``socket_timeout`` wins)."""
        return self._timeout

    def key(self, kind: str, tag: str, *suffix: str) -> str:
        if not suffix:
            return f"{self.prefix}:{kind}:{{{tag}}}"
        tail = "".join(f":{part}" for part in suffix)
        return f"{self.prefix}:{kind}:{{{tag}}}{tail}"

    def ping(self) -> None:
        try:
            self.client.ping()
        except RedisError as exc:
            raise StoreUnavailable(f"redis store at {self._where()} is unreachable: {exc}") from exc

    def check_eviction(self) -> str | None:
        """Warn when Redis may evict our records to make room (once, at store creation).

        Every key we write has a TTL, so any eviction policy but ``noeviction`` may drop a
        live claim and let a duplicate run; with ``noeviction`` a full Redis refuses the
        claim and the task is re-queued instead."""
        try:
            policy = str(self.client.config_get("maxmemory-policy").get("maxmemory-policy", ""))
        except RedisError:  # CONFIG may be refused to an ACL user: nothing to learn
            return None
        if policy and policy != "noeviction":
            log.warning(
                "redis store %s has maxmemory-policy=%s: it may evict idempotency records under "
                "memory pressure; use noeviction for the store",
                self._where(),
                policy,
            )
        return policy

    def run(self, ops: Sequence[Op]) -> list[Any]:
        if not ops:
            return []
        started = time.monotonic()
        timeout = self._timeout
        # Reads give up 1.5 timeouts after the call began: a new connection's SELECT may
        # already have waited most of one, and the rest is margin for a busy interpreter,
        # so one call stays within two socket timeouts however the network misbehaves.
        deadline = started + CALL_BUDGET * timeout if timeout else None
        try:
            results = self._send(ops, deadline)
            for value in results:
                if isinstance(value, ResponseError):  # NOSCRIPT included: the rare path
                    return self._settle(ops, results, started, deadline)
        except RedisError as exc:
            raise StoreUnavailable(f"redis store at {self._where()} failed: {exc}") from exc
        return results

    def _settle(
        self, ops: Sequence[Op], results: list[Any], started: float, deadline: float | None
    ) -> list[Any]:
        """Some answers are errors: load the scripts a NOSCRIPT names and run those ops
        again (a flush can land between our load and the re-send: a few tries); any
        other error fails the call."""
        for _ in range(NOSCRIPT_TRIES):
            missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
            if not missing:
                break
            self._within_budget(started)
            again = self._load_and_send([ops[i] for i in missing], deadline)
            for i, value in zip(missing, again, strict=True):
                results[i] = value
        for op, value in zip(ops, results, strict=True):
            if isinstance(value, ResponseError):
                raise StoreUnavailable(f"script {op.script!r} failed: {value}") from value
        return results

    def _within_budget(self, started: float) -> None:
        """One call blocks a worker at most about two socket timeouts: after one has
        passed, no further trip (a NOSCRIPT recovery) is started."""
        timeout = self.socket_timeout
        spent = time.monotonic() - started
        if timeout is not None and spent > timeout:
            raise StoreUnavailable(
                f"redis store at {self._where()} is too slow: {spent:.2f}s spent, "
                f"more than the socket timeout ({timeout:g}s), before recovering NOSCRIPT"
            )

    def warm(self) -> None:
        """Open a connection and load every script, off a task's path (worker start), so
        the first task's round trip is one round trip."""
        if self.cluster:
            try:
                self._load(set(scripts()))
            except RedisError as exc:
                log.info("store warm-up skipped (the first task will load them): %s", exc)
            return
        names = sorted(scripts())
        wire = Wire(self._new_connection(), self._timeout)
        try:
            answers = wire.round_trip(_pack_loads(names), len(names), None)
        except (RedisError, OSError) as exc:
            wire.close()
            log.info("store warm-up skipped (the first task will connect): %s", exc)
            return
        refused = [answer for answer in answers if isinstance(answer, Exception)]
        if refused:
            log.info("store warm-up could not load every script (the first task will): %s", refused[0])
        if self._pid == current_pid():
            self._idle.append(wire)  # connected: the first call takes it

    def _send(self, ops: Sequence[Op], deadline: float | None = None) -> list[Any]:
        if self.cluster:
            pipe: Any = self.client.pipeline(transaction=False)
            for op in ops:
                pipe.execute_command("EVALSHA", *_evalsha_args(op))
            return list(pipe.execute(raise_on_error=False))
        return self._round_trip(pack_evalsha(ops), len(ops), deadline)

    def _round_trip(self, payload: bytes, count: int, deadline: float | None) -> list[Any]:
        """Write every command, read every answer: one round trip on one connection.

        Error answers (NOSCRIPT, OOM) come back in place, as a pipeline would give them.
        Each read waits the socket timeout at most, and never past ``deadline``."""
        wire = self._checkout()
        self.requests_sent += 1
        try:
            answers = wire.round_trip(payload, count, deadline)
        except BaseException:
            wire.close()  # half-read: dropped, never handed to another call
            raise
        self._idle.append(wire)
        return answers

    def _checkout(self) -> Wire:
        """An idle connection of ours (last in, first out), or a new one.

        Our own short list instead of redis-py's pool: no lock or bookkeeping per call,
        and it holds at most as many connections as calls ever ran at once, whatever the
        pool (threads, greenlets). A connection the server closed while it sat idle is
        noticed here and opened again by the send (one non-blocking look, no trip)."""
        if self._pid != current_pid():  # forked: the parent's sockets are not ours
            self._idle = collections.deque()
            self._pid = current_pid()
        try:
            wire = self._idle.pop()
        except IndexError:
            return Wire(self._new_connection(), self._timeout)
        if not wire.idle_and_sound():  # EOF (or stray bytes): start clean
            wire.close()
        return wire

    def _new_connection(self) -> Any:
        """Built from the pool's settings (TLS, ACL, db), outside its count of connections.

        No health-check PING: it would make opening a connection two round trips, and
        ``Wire`` looks at an idle connection before each use instead."""
        pool = self.client.connection_pool
        # RESP2 whatever the URL says: our reader parses the RESP2 our scripts answer in.
        return pool.connection_class(**{**pool.connection_kwargs, "health_check_interval": 0, "protocol": 2})

    def _load(self, names: set[str]) -> None:
        if self.cluster:  # SCRIPT LOAD goes to every primary
            for name in sorted(names):
                self.client.script_load(scripts()[name][0])
            return
        pipe: Any = self.client.pipeline(transaction=False)
        for name in sorted(names):
            pipe.execute_command("SCRIPT", "LOAD", scripts()[name][0])
        pipe.execute()

    def _load_and_send(self, ops: Sequence[Op], deadline: float | None = None) -> list[Any]:
        """Load the ops' scripts and run the ops again: in one round trip on one server
        (a connection's commands run in order, so each load precedes its EVALSHA)."""
        names = sorted({op.script for op in ops})
        if self.cluster:
            self._load(set(names))
            return self._send(ops)
        payload = _pack_loads(names) + pack_evalsha(ops)
        answers = self._round_trip(payload, len(names) + len(ops), deadline)
        for loaded in answers[: len(names)]:
            if isinstance(loaded, Exception):
                raise loaded
        return answers[len(names) :]

    def _where(self) -> str:
        if self.cluster:
            return f"cluster {self.url}"
        kwargs = self.client.connection_pool.connection_kwargs
        return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"

    def close(self) -> None:
        while self._idle:
            self._idle.pop().close()
        self.client.close()
