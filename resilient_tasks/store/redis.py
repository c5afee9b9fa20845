"""``RedisStore``: the store's operations as Lua scripts, through redis-py's public API.

One script per operation (``lua/``), sent as ``EVALSHA``; a ``batch`` packs every op's
command with hiredis into one buffer, writes it on one connection with
``send_packed_command`` and reads the answers with ``read_response``: one round trip
(measured cheaper than a ``Pipeline``, which builds a command stack and annotates
errors). redis-py owns sockets, parsing (hiredis), TLS, ACL, Sentinel and Cluster.

- NOSCRIPT (a ``SCRIPT FLUSH``): the scripts are loaded and only the ops that answered
  NOSCRIPT are sent again, on the same connection in the same trip as the loads; they
  changed nothing, so that is safe. Nothing else is ever sent twice: a script whose reply
  was lost may have run (redis-py's retries are off).
- A thread keeps the connection its last batch used for ``HOLD_SECONDS`` (single node;
  not Sentinel, whose pool must see connections come back to follow a new master, nor
  Cluster): taking one from redis-py's pool and giving it back locks the pool and records
  its metrics, about 65k instructions per batch, 40 % of a one-op batch's. A held
  connection is still polled before each batch (``can_read``: one the server closed is
  not used). After that time, a fork, a failed batch or the thread's end, it goes back.
- A batch blocks its caller about two socket timeouts at most: its reads (those of a
  new connection's check too) end two timeouts after it began, and no NOSCRIPT recovery
  starts after one timeout has passed.
- New connections (single node, Sentinel) check the store's epoch marker: a store that
  restarted without persistence lost every in-flight claim, so claims answer ``amnesia``
  (fail closed) for a window; no claim pays for the check.
- ``redis.RedisError`` becomes ``StoreUnavailable`` here and nowhere else, and no
  password reaches a message. A refusal for who we are (a wrong password, ``NOPERM``)
  becomes ``StoreMisconfigured``, naming the right that is missing; ``check`` asks for
  every right a worker needs before it starts.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import math
import os
import re
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any, NoReturn
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.exceptions import (
    AskError,
    AuthenticationError,
    AuthorizationError,
    NoPermissionError,
    NoScriptError,
    RedisClusterException,
    RedisError,
    ResponseError,
)
from redis.retry import Retry
from redis.sentinel import Sentinel

from ..errors import StoreMisconfigured, StoreUnavailable
from ..keys import owner_id
from ..process import current_pid
from .evalsha import (
    Codec,
    Command,
    Packer,
    key_of,
    load_commands,
    pack_all,
    parse_record,
    script_of,
    scripts,
    text,
)
from .protocol import BreakerView, Claim, ClaimAnswer, Complete, Forget, Op
from .urls import parse_sentinel_url, password_pieces, redact, secrets_of

__all__ = ["RedisStore"]

log = logging.getLogger(__name__)

#: How many times a batch's NOSCRIPT answers are loaded and sent again.
NOSCRIPT_TRIES = 3
#: A batch's reads end this many socket timeouts after it began: room for a new
#: connection's handshake and check, and the batch's own trip, on a slow network.
CALL_BUDGET = 2.0
#: The epoch marker lives this long past the last connection that saw it.
EPOCH_TTL_MS = 7 * 86_400_000
#: Claims fail closed this long after amnesia unless told the longest lease.
DEFAULT_AMNESIA_WINDOW_MS = 60_000
#: How long a thread keeps its connection between batches before the pool checks it again.
HOLD_SECONDS = 1.0


# -- refusals for who we are -----------------------------------------------------------

_AUTH_TEXT = re.compile(
    r"WRONGPASS|NOAUTH|authentication required|invalid username-password|invalid password|"
    r"user is disabled|without any password configured",
    re.IGNORECASE,
)
_DENIED_TEXT = re.compile(
    rf"{_AUTH_TEXT.pattern}|NOPERM|no permissions? to|can't run this command|can't access", re.IGNORECASE
)
_COMMAND = re.compile(r"permissions? to run the '([^']+)' command", re.IGNORECASE)
_IN_SCRIPT = re.compile(r"script: ([0-9a-f]{40})")


def denial(exc: BaseException | None) -> BaseException | None:
    """The refusal for who we are (a wrong password, an ACL right missing) in ``exc`` or
    in what caused it; None for every other failure (down, slow, out of memory...)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (AuthenticationError, AuthorizationError, NoPermissionError)):
            return exc
        if isinstance(exc, (RedisError, RedisClusterException)) and _DENIED_TEXT.search(str(exc)):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


@functools.cache
def script_commands() -> tuple[str, ...]:
    """The commands our Lua scripts call (Redis checks each against the caller's ACL)."""
    found: set[str] = set()
    for script in scripts().values():
        found.update(name.lower() for name in re.findall(r"redis\.p?call\(\s*'([A-Za-z]+)'", script.source))
    return tuple(sorted(found))


def explain(refusal: BaseException, prefix: str) -> tuple[str, str | None]:
    """What is wrong, and what to grant or give (an ACL rule when the answer says)."""
    said = str(refusal)
    if isinstance(refusal, (AuthenticationError, AuthorizationError)) or _AUTH_TEXT.search(said):
        if "without any password configured" in said:
            return (
                "the URL gives a password but the server has none set",
                "no password, or one set on the server",
            )
        if re.search(r"NOAUTH|authentication required", said, re.IGNORECASE):
            return "the server requires a password and none was given", "a user and password in the store URL"
        return (
            "the user name or password was refused, or the user is disabled",
            "the right password of an enabled user",
        )
    in_script = _IN_SCRIPT.search(said)
    script = ""
    if in_script is not None:
        name = {s.sha: n for n, s in scripts().items()}.get(in_script.group(1))
        script = f" (called by our {name!r} script)" if name else " (called by one of our scripts)"
    command = _COMMAND.search(said)
    if command is not None:
        name = command.group(1).lower()
        return f"the ACL user may not run {name!r}{script}", f"+{name}"
    if re.search(r"\bkeys?\b", said, re.IGNORECASE):
        return f"the ACL user may not touch our keys ({prefix}:*){script}", f"~{prefix}:*"
    if in_script is not None:
        rights = " ".join(f"+{name}" for name in script_commands())
        return f"the ACL user may not run a command{script}", f"every command our scripts call: {rights}"
    return "the ACL user is refused a command it needs", None


@functools.cache
def _no_client_setinfo() -> dict[str, Any]:
    """The connection argument that turns CLIENT SETINFO off, in this redis-py's words
    (``driver_info`` in recent releases, ``lib_name``/``lib_version`` before)."""
    params = inspect.signature(redis.connection.AbstractConnection.__init__).parameters
    if "driver_info" in params:
        return {"driver_info": None}
    return {"lib_name": None, "lib_version": None}


# -- Sentinel: following the master -----------------------------------------------------


class _MasterWatch:
    """Asks the sentinels where the master is, every ``interval`` seconds, off the task
    path. redis-py moves a Sentinel pool only when one of its connections breaks or
    hears READONLY; after a ``SENTINEL FAILOVER`` the old master goes on accepting writes
    (lost when it is demoted, some ten seconds later), so a connection that stays open
    would keep writing there. When the answer changes, redis-py's pool closes its idle
    connections and drops the busy ones as they come back."""

    def __init__(self, pool: Any, interval: float) -> None:
        self._pool = weakref.ref(pool)
        self._interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def ensure(self) -> None:
        """Started with the first batch, and again in a forked child (threads do not
        survive a fork)."""
        thread = self._thread
        if thread is None or not thread.is_alive():
            if self._stop.is_set():
                return
            self._thread = threading.Thread(target=self._run, name="rt-sentinel-watch", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            pool = self._pool()
            if pool is None:
                return
            try:
                pool.get_master_address()
            except RedisError as exc:  # the next batch will say so, if it matters
                log.debug("sentinels not asked where the master is: %s", exc)
            del pool

    def stop(self) -> None:
        self._stop.set()


# -- a thread's connection ---------------------------------------------------------------


class _Held:
    """The connection a thread keeps between batches. When the thread ends its locals go,
    and with them this object, whose finalizer gives the connection back to the pool."""

    __slots__ = ("__weakref__", "conn", "pid", "until")

    def __init__(self, pool: Any, conn: Any, until: float) -> None:
        self.conn = conn
        self.pid = current_pid()
        self.until = until
        weakref.finalize(self, _give_back, pool, conn, self.pid)


def _clean(conn: Any) -> bool:
    """Connected with nothing to read: not closed by the server (a restart, a client kill)
    since the last batch. One ``poll``, none of the pool's bookkeeping."""
    try:
        return not conn.can_read()  # (a connection closed on our side reconnects here)
    except (RedisError, OSError):
        return False


def _give_back(pool: Any, conn: Any, pid: int) -> None:
    """Back to the pool, from the process that took it (a forked child leaves its
    parent's connection alone)."""
    if os.getpid() == pid:
        with contextlib.suppress(Exception):  # a pool already closed: nothing to give back to
            pool.release(conn)


# -- the store --------------------------------------------------------------------------


class RedisStore:
    """Shared state in Redis: one node (``redis://``, ``rediss://``, ``unix://``), a master
    found through Sentinel (``sentinel://`` or ``sentinels=``), or a Cluster."""

    def __init__(
        self,
        url: str | None = None,
        *,
        prefix: str = "rt",
        socket_timeout: float = 5.0,
        cluster: bool = False,
        sentinels: Sequence[tuple[str, int]] | None = None,
        service_name: str | None = None,
        sentinel_kwargs: dict[str, Any] | None = None,
        amnesia_window_ms: int | Callable[[], int] = DEFAULT_AMNESIA_WINDOW_MS,
        amnesia_guard: bool = True,
        master_check_interval: float = 1.0,
        **options: Any,
    ) -> None:
        """``amnesia_window_ms``: how long claims fail closed once the store is found to
        have lost its data (the longest lease: a callable is asked at that moment).
        ``master_check_interval``: how often a Sentinel store asks where the master is
        (0: only when a connection breaks). ``options`` go to redis-py's connections
        (``connection_class``, ``ssl_*`` ...)."""
        if not prefix or any(c in prefix for c in "{}* \r\n\0"):
            raise ValueError(f"prefix {prefix!r} must be non-empty with no braces, '*' or spaces")
        self.prefix = prefix
        self.cluster = cluster
        self.trips = 0
        #: How many times this process found the store had lost its data.
        self.amnesia_detections = 0
        self._codec = Codec(prefix)
        self._epoch_keys = (f"{prefix}:meta:{{epoch}}", f"{prefix}:meta:{{epoch}}:amnesia")
        self._amnesia_window = amnesia_window_ms
        self._amnesia_guard = amnesia_guard and not cluster
        self._epoch: tuple[str, float] = ("", 0.0)  # the marker seen, and until when it is sure
        self._amnesia_until = 0.0
        self._local = threading.local()
        self._sentinel: Sentinel | None = None
        self._watch: _MasterWatch | None = None
        self._client: Any = None
        self._secrets = secrets_of(url, options, sentinel_kwargs)
        self.where = redact(url or "", self._secrets)
        #: Called with each ``StoreMisconfigured`` raised (a worker logs and counts it).
        self.on_misconfigured: Callable[[StoreMisconfigured], None] | None = None

        # No silent re-sends: a script whose reply was lost may have run.
        options.setdefault("retry", Retry(NoBackoff(), 0))
        options.setdefault("socket_timeout", socket_timeout)
        options.setdefault("socket_connect_timeout", options["socket_timeout"])
        # A lean handshake: RESP2 needs no HELLO, and CLIENT SETINFO is two more trips.
        options.setdefault("protocol", 2)
        for name, value in _no_client_setinfo().items():
            options.setdefault(name, value)
        options["decode_responses"] = False
        if not cluster:  # (RedisCluster does not pass the hook on)
            options.setdefault("command_packer", Packer())
        self._user_connect = options.pop("redis_connect_func", None)

        if url is not None and url.startswith("sentinel://"):
            sentinels, parsed = parse_sentinel_url(url)
            service_name = parsed.pop("service_name", service_name)
            options = {**options, **parsed}
        # (until the client says what the URL chose: a cluster connects while it is made)
        self.socket_timeout: float | None = options["socket_timeout"]
        self._secrets = secrets_of(url, options, sentinel_kwargs)
        self._user: str | None = options.get("username")
        if self._user is None and url:
            with contextlib.suppress(ValueError):
                self._user = urlsplit(url).username or None
        try:
            if sentinels is not None:
                opened = self._open_sentinel(sentinels, service_name, sentinel_kwargs, options)
                self.where, self._client = opened
                if master_check_interval > 0:
                    self._watch = _MasterWatch(self._client.connection_pool, master_check_interval)
            elif url is None:
                raise ValueError("RedisStore needs a url, or sentinels= and service_name=")
            elif cluster:
                self.where = f"cluster {redact(url, self._secrets)}"
                options["redis_connect_func"] = self._cluster_connected
                self._client = redis.RedisCluster.from_url(url, **options)
            else:
                self.where = redact(url, self._secrets)
                options["redis_connect_func"] = self._connected
                self._client = redis.Redis.from_url(url, **options)
        except ValueError as exc:
            said = str(exc)
            clean = redact(said, self._secrets)
            if any(len(piece) > 1 and piece in clean for piece in password_pieces(url)):
                # part of a raw password the parser quoted alone ("p/w" read as a port "p")
                clean = (
                    f"the store URL {self.where} could not be parsed: a '/', '@', ':', '?' or '#' "
                    "in its password must be percent-encoded"
                )
            if clean != said:
                raise ValueError(clean) from None
            raise
        except (RedisError, RedisClusterException) as exc:  # a cluster that cannot be reached
            self._fail("could not be opened", exc)
        if cluster:
            kwargs = self._client.get_connection_kwargs()
        else:
            kwargs = self._client.connection_pool.connection_kwargs
        if kwargs.get("decode_responses"):
            raise ValueError("RedisStore reads bytes: decode_responses must stay off")
        timeout = kwargs.get("socket_timeout")
        self.socket_timeout = float(timeout) if timeout is not None else None

    def _open_sentinel(
        self,
        sentinels: Sequence[tuple[str, int]],
        service_name: str | None,
        sentinel_kwargs: dict[str, Any] | None,
        options: dict[str, Any],
    ) -> tuple[str, Any]:
        if not service_name:
            raise ValueError("a Sentinel store needs service_name (the master's name)")
        own: dict[str, Any] = {
            "socket_timeout": options["socket_timeout"],
            "socket_connect_timeout": options["socket_connect_timeout"],
            "retry": Retry(NoBackoff(), 0),
        }
        for name in ("username", "password"):
            value = options.pop(f"sentinel_{name}", None)
            if value is not None:
                own[name] = value
        own.update(sentinel_kwargs or {})
        options["redis_connect_func"] = self._connected
        make_sentinel: Any = Sentinel  # (redis-py leaves it untyped)
        sentinel: Any = make_sentinel(list(sentinels), sentinel_kwargs=own)
        self._sentinel = sentinel
        hosts = ",".join(f"{host}:{port}" for host, port in sentinels)
        return f"sentinel {service_name!r} via {hosts}", sentinel.master_for(service_name, **options)

    # -- errors -------------------------------------------------------------------------

    def _fail(self, what: str, exc: BaseException) -> NoReturn:
        """``StoreUnavailable`` for a redis-py error (``StoreMisconfigured`` for a refusal
        for who we are); the cause is chained only when its text holds no secret."""
        said = str(exc)
        clean = redact(said, self._secrets)
        refusal = denial(exc)
        if refusal is not None:
            error: StoreUnavailable = self._misconfigured(refusal)
        else:
            error = StoreUnavailable(f"redis store at {self.where} {what}: {type(exc).__name__}: {clean}")
        if clean == said:
            raise error from exc
        raise error from None

    def _misconfigured(self, refusal: BaseException) -> StoreMisconfigured:
        """The error for a refusal for who we are: what is wrong, where (no password),
        what is missing; told to ``on_misconfigured`` (never raises)."""
        problem, missing = explain(refusal, self.prefix)
        user = f" (user {self._user!r})" if self._user else ""
        said = redact(str(refusal), self._secrets)
        needed = missing or "a right of the ACL line in docs/RELIABILITY.md"
        error = StoreMisconfigured(
            f"redis store at {self.where}{user} refused resilient-tasks: {problem} "
            f"[{type(refusal).__name__}: {said}]; missing: {needed}",
            missing,
        )
        hook = self.on_misconfigured
        if hook is not None:
            try:
                hook(error)
            except Exception as exc:  # reporting must never hide the error itself
                log.warning("reporting a misconfigured store failed: %s", exc)
        return error

    # -- connections --------------------------------------------------------------------

    def _connected(self, conn: Any) -> None:
        """redis-py's ``redis_connect_func`` (single node, Sentinel): its own handshake
        (AUTH, SELECT), then the epoch check."""
        if self._user_connect is not None:
            self._user_connect(conn)
        else:
            conn.on_connect()
        self._prepare(conn)

    def _cluster_connected(self, conn: Any) -> None:
        """Called by ``RedisCluster.on_connect`` after its handshake."""
        if self._user_connect is not None:
            self._user_connect(conn)
        self._prepare(conn)

    def _prepare(self, conn: Any) -> None:
        """The epoch check, one round trip (its script is loaded in the same trip: a
        restarted server has none). A TLS connection makes that trip even without the
        check: it reads the session tickets a TLS 1.3 server sends after the handshake,
        which redis-py's pool would otherwise take for unread data."""
        if not self._amnesia_guard:
            if isinstance(conn, redis.SSLConnection):
                self._round_trip([(conn, [("PING",)])], getattr(self._local, "deadline", None))
            return
        known, sure_until = self._epoch
        if time.monotonic() >= sure_until:
            known = ""  # the marker may have expired on its own since we saw it
        window = self._amnesia_window
        if not isinstance(window, int):
            window = window()
        check = ("EVALSHA", scripts()["epoch"].sha, 2, *self._epoch_keys, known, owner_id(), int(window),
                 EPOCH_TTL_MS)  # fmt: skip
        deadline = getattr(self._local, "deadline", None)
        (answers,) = self._round_trip([(conn, [*load_commands(["epoch"]), check])], deadline)
        for answer in answers:
            if isinstance(answer, ResponseError):
                raise answer
        self._settle_epoch(answers[-1])

    def _settle_epoch(self, answer: Any) -> None:
        value, detected, remaining, ttl = text(answer[0]), bool(answer[1]), int(answer[2]), int(answer[3])
        now = time.monotonic()
        self._epoch = (value, now + ttl / 1000.0)
        if detected:
            self.amnesia_detections += 1
        if remaining > 0:
            self._amnesia_until = max(self._amnesia_until, now + remaining / 1000.0)
            log.error(
                "redis store at %s lost its data (a restart without persistence?)%s: claims fail "
                "closed for %.1fs more",
                self.where,
                " (noticed by this process)" if detected else "",
                remaining / 1000.0,
            )

    @property
    def amnesia_remaining_ms(self) -> int:
        """How long claims still fail closed (0 when the store is trusted)."""
        left = self._amnesia_until - time.monotonic()
        return math.ceil(left * 1000) if left > 0 else 0

    def _read(self, conn: Any, count: int, deadline: float | None) -> list[Any]:
        """``count`` answers, error answers in place. Each read waits the socket timeout
        at most, and never past ``deadline``."""
        answers: list[Any] = []
        timeout = self.socket_timeout
        for _ in range(count):
            try:
                if deadline is None:
                    answers.append(conn.read_response())
                    continue
                left = deadline - time.monotonic()
                if left <= 0:
                    raise redis.TimeoutError("no time left for this store call")
                if timeout is not None and left >= timeout:
                    answers.append(conn.read_response())
                else:
                    answers.append(conn.read_response(timeout=left))
            except ResponseError as exc:
                # kept as an answer, without its traceback: the traceback holds this
                # frame, whose list holds the error (a cycle only the collector frees)
                answers.append(exc.with_traceback(None))
        return answers

    def _exchange(
        self, pairs: Sequence[tuple[Any, list[Command]]], deadline: float | None
    ) -> list[list[Any]]:
        """A batch's round trip (counted in ``trips``)."""
        self.trips += 1
        return self._round_trip(pairs, deadline)

    def _round_trip(
        self, pairs: Sequence[tuple[Any, list[Command]]], deadline: float | None
    ) -> list[list[Any]]:
        """Every connection's commands written, then every answer read. A connection
        that fails half-way is disconnected: never handed back dirty."""
        try:
            for conn, commands in pairs:
                conn.send_packed_command(pack_all(commands), check_health=False)
            answers = []
            for conn, commands in pairs:
                answers.append(self._read(conn, len(commands), deadline))
            return answers
        except BaseException:
            for conn, _ in pairs:
                conn.disconnect()
            raise

    def _within_budget(self, started: float) -> None:
        """After one socket timeout has passed, no further trip (NOSCRIPT recovery)."""
        timeout = self.socket_timeout
        spent = time.monotonic() - started
        if timeout is not None and spent > timeout:
            raise StoreUnavailable(
                f"redis store at {self.where} is too slow: {spent:.2f}s spent, more than the "
                f"socket timeout ({timeout:g}s), before recovering NOSCRIPT"
            )

    # -- the Store protocol ---------------------------------------------------------------

    def batch(self, ops: Sequence[Op]) -> list[Any]:
        if not ops:
            return []
        started = time.monotonic()
        timeout = self.socket_timeout
        deadline = started + CALL_BUDGET * timeout if timeout else None
        local = self._local
        local.deadline = deadline
        try:
            if self.cluster:
                return self._cluster_batch(ops, started, deadline)
            if self._watch is not None:
                self._watch.ensure()
                pool = self._client.connection_pool
                conn = pool.get_connection()
                try:
                    return self._node_batch(conn, ops, started, deadline)
                finally:
                    pool.release(conn)
            conn = self._held(started).conn  # (no frame keeps the holder: see below)
            try:
                return self._node_batch(conn, ops, started, deadline)
            except BaseException:
                # a failed batch: its connection goes back to the pool now, not when a
                # traceback that holds this frame is let go
                local.held = None
                raise
        except (RedisError, RedisClusterException) as exc:
            self._fail("failed", exc)
        finally:
            local.deadline = None

    def _held(self, now: float) -> _Held:
        """This thread's connection, taken from the pool again once it is ``HOLD_SECONDS``
        old (the pool checks it then) or after a fork."""
        held: _Held | None = getattr(self._local, "held", None)
        if held is not None:
            if now < held.until and held.pid == current_pid() and _clean(held.conn):
                return held
            # the last reference goes: its finalizer gives the connection back now, so
            # the pool hands the same one out again (after its checks), not a new one
            self._local.held = held = None
        pool = self._client.connection_pool
        fresh = _Held(pool, pool.get_connection(), now + HOLD_SECONDS)
        self._local.held = fresh
        return fresh

    def _node_batch(
        self, conn: Any, ops: Sequence[Op], started: float, deadline: float | None, *, gated: bool = False
    ) -> list[Any]:
        """One node's batch. The amnesia window is read after the connection was made
        (a new one has checked the epoch just now): claims fail closed without running
        while it lasts, the other ops go on (``gated``: already sorted out)."""
        if self._amnesia_until and not gated:
            amnesia = self.amnesia_remaining_ms
            if amnesia:
                answers: list[Any] = [ClaimAnswer("amnesia", remaining_ms=amnesia) for _ in ops]
                sent = [i for i, op in enumerate(ops) if type(op) is not Claim]
                if sent:
                    done = self._node_batch(conn, [ops[i] for i in sent], started, deadline, gated=True)
                    for i, answer in zip(sent, done, strict=True):
                        answers[i] = answer
                return answers
        encode = self._codec.encode
        commands = []
        for op in ops:
            commands.append(encode[type(op)](op))
        (raw,) = self._exchange([(conn, commands)], deadline)
        for value in raw:
            if isinstance(value, ResponseError):  # NOSCRIPT included: the rare path

                def again(missing: list[int]) -> None:
                    loads = load_commands(sorted({script_of(commands[i]) for i in missing}))
                    payload = loads + [commands[i] for i in missing]
                    (loaded,) = self._exchange([(conn, payload)], deadline)
                    self._raise_failed_loads(loaded[: len(loads)])
                    for i, value in zip(missing, loaded[len(loads) :], strict=True):
                        raw[i] = value

                self._settle(raw, started, again, retry_on=NoScriptError)
                break
        return self._answers(ops, raw)

    def _cluster_batch(self, ops: Sequence[Op], started: float, deadline: float | None) -> list[Any]:
        """Ops grouped per node (each op touches one hash slot): one connection per node,
        all written before any is read; answers in the ops' order."""
        encode = self._codec.encode
        commands = [encode[type(op)](op) for op in ops]
        raw: list[Any] = [None] * len(ops)

        def send(indices: list[int], load: bool) -> None:
            groups: dict[str, tuple[Any, list[int]]] = {}
            for i in indices:
                node = self._client.get_node_from_key(key_of(commands[i]))
                groups.setdefault(node.name, (node, []))[1].append(i)
            taken: list[tuple[Any, Any]] = []
            try:
                pairs = []
                for node, members in groups.values():
                    pool = self._client.get_redis_connection(node).connection_pool
                    conn = pool.get_connection()
                    taken.append((pool, conn))
                    names = sorted({script_of(commands[i]) for i in members}) if load else []
                    pairs.append((conn, load_commands(names) + [commands[i] for i in members]))
                answers = self._exchange(pairs, deadline)
            finally:
                for pool, conn in taken:
                    pool.release(conn)
            for (_, members), (_, sent), got in zip(groups.values(), pairs, answers, strict=True):
                loads = len(sent) - len(members)
                self._raise_failed_loads(got[:loads])
                for i, value in zip(members, got[loads:], strict=True):
                    raw[i] = value

        send(list(range(len(ops))), load=False)

        def again(missing: list[int]) -> None:
            if any(isinstance(raw[i], AskError) for i in missing):
                self._client.nodes_manager.initialize()  # slots moved: the op never ran
            send(missing, load=True)

        self._settle(raw, started, again, retry_on=(NoScriptError, AskError))
        return self._answers(ops, raw)

    def _settle(
        self,
        raw: list[Any],
        started: float,
        again: Callable[[list[int]], None],
        retry_on: type[Exception] | tuple[type[Exception], ...],
    ) -> None:
        """Send again, a few times, the ops whose answer says they never ran."""
        for _ in range(NOSCRIPT_TRIES):
            missing = [i for i, value in enumerate(raw) if isinstance(value, retry_on)]
            if not missing:
                return
            self._within_budget(started)
            again(missing)

    def _raise_failed_loads(self, answers: list[Any]) -> None:
        """A refused SCRIPT LOAD (NOPERM, OOM) fails the batch."""
        for answer in answers:
            if isinstance(answer, ResponseError):
                raise answer

    def _answers(self, ops: Sequence[Op], raw: list[Any]) -> list[Any]:
        """Each op's reply as its answer type; an error reply fails the batch."""
        answer = self._codec.answer
        answers = []
        for op, value in zip(ops, raw, strict=True):
            if isinstance(value, ResponseError):
                if denial(value) is not None:
                    raise self._misconfigured(value)
                said = redact(str(value), self._secrets)
                raise StoreUnavailable(
                    f"redis store at {self.where}: script {op.name!r} failed: {type(value).__name__}: {said}"
                )
            answers.append(answer(op, value))
        return answers

    def breakers(self) -> list[BreakerView]:
        found = []
        try:
            for key in self._client.scan_iter(match=f"{self.prefix}:brk:*", count=500):
                raw = self._client.hgetall(key)
                if raw:
                    fields = {text(k): text(v) for k, v in raw.items()}
                    found.append(BreakerView(fields.get("name", ""), fields))
        except (RedisError, RedisClusterException) as exc:
            self._fail("could not list breakers", exc)
        return sorted(found, key=lambda view: view.downstream)

    @property
    def client(self) -> Any:
        """The redis-py client (``Redis``, ``RedisCluster``, or Sentinel's master client),
        for operators' reads and tests; the hot path goes through ``batch``."""
        return self._client

    def idempotency_key(self, record: str) -> str:
        """The Redis key of an idempotency record (tests and operators' reads)."""
        return f"{self._codec.idem}{{{record}}}"

    def idempotency_record(self, record: str) -> dict[str, str] | None:
        """The fields of an idempotency record (``RECORD_FIELDS``), None when there is none;
        a hash an earlier release wrote is read as its fields."""
        key = self.idempotency_key(record)
        try:
            try:
                return parse_record(self._client.get(key))
            except ResponseError as exc:
                if "WRONGTYPE" not in str(exc):
                    raise
                return {text(k): text(v) for k, v in self._client.hgetall(key).items()}
        except (RedisError, RedisClusterException) as exc:
            self._fail("could not read an idempotency record", exc)

    def fallback_key(self, record: str) -> str:
        """The Redis key of a fallback entry."""
        return f"{self._codec.fb}{{{record}}}"

    def breaker_key(self, name: str) -> str:
        """The Redis key of ``name``'s breaker hash (the name is hashed, never in a key)."""
        return self._codec.breaker_key(name)

    def now_ms(self) -> int:
        try:
            seconds, micros = self._client.time()
        except (RedisError, RedisClusterException) as exc:
            self._fail("did not tell the time", exc)
        return int(seconds) * 1000 + int(micros) // 1000

    def ping(self) -> None:
        try:
            self._client.ping()
        except (RedisError, RedisClusterException) as exc:
            self._fail("is unreachable", exc)

    def _load_scripts(self) -> None:
        """``SCRIPT LOAD`` of every script, on one connection (each node of a cluster)."""
        try:
            if self.cluster:
                for script in scripts().values():
                    self._client.script_load(script.source)
                return
            pool = self._client.connection_pool
            conn = pool.get_connection()
            try:
                (answers,) = self._exchange([(conn, load_commands(sorted(scripts())))], None)
                self._raise_failed_loads(answers)
            finally:
                pool.release(conn)
        except (RedisError, RedisClusterException) as exc:
            self._fail("could not load the scripts", exc)

    def warm(self) -> None:
        """Connect and load every script off a task's path (a worker starting), so the
        first batch is one round trip. A store that cannot be reached is only logged:
        the first batch will connect. A store that refuses us is an ERROR (through
        ``on_misconfigured`` when set)."""
        try:
            self._load_scripts()
        except StoreMisconfigured as exc:
            if self.on_misconfigured is None:
                log.error("%s", exc)
        except StoreUnavailable as exc:
            log.info("store warm-up skipped (the first task will connect): %s", exc)

    def check(self) -> None:
        """Everything a worker needs from the store, asked before it starts: connect
        (AUTH, SELECT, the epoch check), load every script, read the server's ``TIME``
        and run the idempotency scripts on our prefix (a claim of a record of its own,
        completed and forgotten in the same trip: every command they call). Raises
        ``StoreMisconfigured`` when the store refuses us (password, ACL: the message names
        the right missing), ``StoreUnavailable`` when it cannot be reached."""
        self._load_scripts()
        self.now_ms()
        owner = owner_id()
        record = f"start-check:{owner}"
        self.batch([
            Claim(record, owner, 1000, 1000, task_id="start-check"),
            Complete(record, owner, 1, "null", 1000),
            Forget(record),
        ])  # fmt: skip

    def check_eviction(self) -> str | None:
        """Warn when Redis may evict our records to make room.

        Every key we write has a TTL, so any eviction policy but ``noeviction`` may drop a
        live claim and let a duplicate run; with ``noeviction`` a full Redis refuses the
        claim and the task is re-queued instead. CONFIG may be refused to an ACL user:
        then there is nothing to learn (None)."""
        try:
            answer = self._client.config_get("maxmemory-policy")
        except (RedisError, RedisClusterException):
            return None
        policy = text(answer.get("maxmemory-policy", "")) if isinstance(answer, dict) else ""
        if policy and policy != "noeviction":
            log.warning(
                "redis store %s has maxmemory-policy=%s: it may evict idempotency records under "
                "memory pressure; use noeviction for the store",
                self.where,
                policy,
            )
        return policy or None

    def close(self) -> None:
        if self._watch is not None:
            self._watch.stop()
        try:
            self._client.close()
            if self._sentinel is not None:
                self._sentinel.close()
        except (RedisError, RedisClusterException) as exc:
            log.info("closing the store: %s", redact(str(exc), self._secrets))

    def __repr__(self) -> str:
        return f"RedisStore({self.where}, prefix={self.prefix!r})"
