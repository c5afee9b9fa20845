"""The store's operations as ``EVALSHA`` commands, and their answers as typed values.

One Lua script per operation lives in ``lua/``, with the helpers it needs included
(``_prelude.lua``, ``_record.lua``); ``Codec`` turns each op into the command that runs
its script (keys under the store's prefix, one hash tag each) and each reply back into
the op's answer type. One op needs no script: a peek at a fallback entry with the
caller's clock is a plain ``HMGET`` (a read changes nothing, and one command is cheaper
than a script that runs it), read here as ``cache_get.lua`` would answer it. ``Packer``
hands the commands to hiredis through redis-py's ``command_packer`` hook.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any, NamedTuple

import hiredis
import redis

from ..keys import digest
from .numbers import breaker_numbers
from .protocol import (
    BREAKER_TTL_MS,
    Admission,
    Admit,
    CacheEntry,
    CacheGet,
    CacheKind,
    CachePut,
    Claim,
    ClaimAnswer,
    ClaimVerdict,
    Complete,
    CompleteAnswer,
    Forget,
    Record,
    Recorded,
    Release,
    Renew,
    SpendAnswer,
    SpendRetry,
    Switch,
    SwitchAnswer,
    Verdict,
)

__all__ = [
    "RECORD_FIELDS", "Codec", "Command", "Packer", "Script", "key_of", "load_commands", "pack_all",
    "parse_record", "script_of", "scripts", "text",
]  # fmt: skip

Command = tuple[Any, ...]


# -- scripts ----------------------------------------------------------------------------


class Script(NamedTuple):
    source: str
    sha: str


INCLUDE = "--@include "


@functools.cache
def scripts() -> dict[str, Script]:
    """Every ``lua/*.lua`` (not ``_*.lua``), with its SHA-1.

    A line ``--@include _name.lua`` is replaced by that file. A script includes the
    helpers it uses where it needs them: Lua defines a chunk's local functions each time
    it runs, so the idempotency scripts include theirs after their usual path returns."""
    folder = resources.files(__package__).joinpath("lua")

    def read(name: str) -> str:
        lines = folder.joinpath(name).read_text(encoding="utf-8").splitlines(keepends=True)
        return "".join(
            read(ln.strip()[len(INCLUDE) :]) if ln.lstrip().startswith(INCLUDE) else ln for ln in lines
        )

    found = {}
    for entry in folder.iterdir():
        if entry.name.endswith(".lua") and not entry.name.startswith("_"):
            source = read(entry.name)
            found[entry.name.removesuffix(".lua")] = Script(source, hashlib.sha1(source.encode()).hexdigest())
    return found


def load_commands(names: Sequence[str]) -> list[Command]:
    """``SCRIPT LOAD`` of each named script."""
    return [("SCRIPT", "LOAD", scripts()[name].source) for name in names]


_BY_SHA: dict[str, str] = {}


def script_of(command: Command) -> str:
    """The name of the script an ``EVALSHA`` command runs."""
    if not _BY_SHA:
        _BY_SHA.update({script.sha: name for name, script in scripts().items()})
    return _BY_SHA[command[1]]


def key_of(command: Command) -> str:
    """The one key a command touches (an ``EVALSHA`` of one key, or a plain read)."""
    return str(command[3] if command[0] == "EVALSHA" else command[1])


#: The fields of an idempotency record, in the order its string keeps them
#: (``lua/_record.lua``): newline-joined, the result last.
RECORD_FIELDS = ("state", "token", "owner", "life", "fp", "task_id", "result")


def parse_record(raw: bytes | str | None) -> dict[str, str] | None:
    """The fields of an idempotency record as ``GET`` returns it (operators' reads, tests)."""
    if raw is None:
        return None
    parts = text(raw).split("\n", len(RECORD_FIELDS) - 1)
    if len(parts) != len(RECORD_FIELDS):
        raise ValueError(f"not an idempotency record: {text(raw)[:80]!r}")
    return dict(zip(RECORD_FIELDS, parts, strict=True))


# -- packing ----------------------------------------------------------------------------


_pack_command: Any = hiredis.pack_command  # (its stub types one argument only)


class Packer:
    """hiredis's command packer, handed to redis-py through its ``command_packer`` hook.

    redis-py's own hiredis packer first rebuilds every command's arguments to turn
    ``bytearray``/``memoryview`` into ``bytes``; the store's commands never hold one, and
    that pass cost about a third of a batch's packing. Multi-word command names
    (``"CONFIG GET"``) are split as redis-py does."""

    def pack(self, *args: Any) -> list[bytes]:
        first = args[0]
        if isinstance(first, str):
            if " " in first:
                args = (*first.split(), *args[1:])
        elif b" " in first:
            args = (*first.split(), *args[1:])
        try:
            return [_pack_command(args)]
        except TypeError:  # a bytearray or memoryview after all
            plain = tuple(bytes(a) if isinstance(a, (bytearray, memoryview)) else a for a in args)
            try:
                return [_pack_command(plain)]
            except TypeError as exc:
                raise redis.DataError(str(exc)) from exc


def pack_all(commands: Sequence[Command]) -> list[bytes]:
    """A batch's commands packed by hiredis into one buffer, for redis-py's
    ``send_packed_command`` (one ``sendall``). The store's own commands hold only
    ``str``, ``bytes`` and numbers, and start with a one-word name."""
    try:
        return [b"".join(map(_pack_command, commands))]
    except TypeError as exc:  # a value hiredis cannot write: the batch fails as redis-py's would
        raise redis.DataError(f"a store command could not be packed: {exc}") from exc


# -- ops as commands, answers as types --------------------------------------------------


def text(value: Any) -> str:
    """A reply's bytes as text."""
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else str(value)


def _maybe_text(value: Any) -> str | None:
    return None if value is None else text(value)


_CLAIM_VERDICTS: dict[bytes, ClaimVerdict] = {
    b"claimed": "claimed", b"free": "free", b"done": "done", b"in_flight": "in_flight",
    b"conflict": "conflict",
}  # fmt: skip
_VERDICTS: dict[bytes, Verdict] = {b"allow": "allow", b"probe": "probe", b"reject": "reject"}
_KINDS: dict[bytes, CacheKind] = {b"ok": "ok", b"negative": "negative", b"failure": "failure"}


@functools.lru_cache(maxsize=4096)
def _breaker_tag(name: str) -> str:
    """The name's hash (the name itself is stored inside the hash, never in a key)."""
    return digest("breaker", name)[:40]


class Codec:
    """How each op becomes an ``EVALSHA`` and its answer a typed value."""

    def __init__(self, prefix: str) -> None:
        sha = {name: script.sha for name, script in scripts().items()}
        self.sha = sha
        self.idem = f"{prefix}:idem:"
        self.fb = f"{prefix}:fb:"
        self.brk = f"{prefix}:brk:"
        self.encode: dict[type, Callable[[Any], Command]] = {
            Claim: self.claim,
            Complete: self.complete,
            Release: self.release,
            Renew: self.renew,
            Forget: self.forget,
            Admit: self.admit,
            Record: self.record,
            SpendRetry: self.spend_retry,
            Switch: self.switch,
            CacheGet: self.cache_get,
            CachePut: self.cache_put,
        }
        self.decode: dict[type, Callable[[Any], Any]] = {
            Claim: _claim_answer,
            Complete: _complete_answer,
            Release: bool,
            Renew: bool,
            Forget: bool,
            Admit: _admission,
            Record: _recorded,
            SpendRetry: _spend_answer,
            Switch: _switch_answer,
            CacheGet: _cache_entry,
            CachePut: bool,
        }

    def breaker_key(self, name: str) -> str:
        return f"{self.brk}{{{_breaker_tag(name)}}}"

    def claim(self, op: Claim) -> Command:
        # The record a fresh claim writes is made here, so the script's usual path is
        # one SET NX PX of it (see lua/_record.lua); arguments it does not need are left off.
        ttl = int(op.ttl_ms)
        if "\n" in op.owner or "\n" in op.fingerprint:
            raise ValueError(f"a claim's owner and fingerprint hold no newline: {op.owner!r}")
        task_id = op.task_id if "\n" not in op.task_id else op.task_id.replace("\n", " ")
        fresh = f"in_flight\n1\n{op.owner}\n{ttl}\n{op.fingerprint}\n{task_id}\n"
        key = f"{self.idem}{{{op.record}}}"
        command: Command = ("EVALSHA", self.sha["claim"], 1, key, fresh, int(op.lease_ms) + ttl)
        if op.now_ms:
            return (*command, op.handoff, "1" if op.peek else "", int(op.now_ms))
        if op.peek:
            return (*command, op.handoff, "1")
        if op.handoff:
            return (*command, op.handoff)
        return command

    def complete(self, op: Complete) -> Command:
        head = _head(op.token, op.owner)
        key = f"{self.idem}{{{op.record}}}"
        if op.refresh:
            return ("EVALSHA", self.sha["complete"], 1, key, head, op.result, int(op.ttl_ms))
        return ("EVALSHA", self.sha["complete"], 1, key, head, op.result)

    def release(self, op: Release) -> Command:
        return (
            "EVALSHA", self.sha["release"], 1, f"{self.idem}{{{op.record}}}", _head(op.token, op.owner),
            int(op.ttl_ms),
        )  # fmt: skip

    def renew(self, op: Renew) -> Command:
        return (
            "EVALSHA", self.sha["renew"], 1, f"{self.idem}{{{op.record}}}", _head(op.token, op.owner),
            int(op.lease_ms),
        )  # fmt: skip

    def forget(self, op: Forget) -> Command:
        return ("EVALSHA", self.sha["forget"], 1, f"{self.idem}{{{op.record}}}")

    def admit(self, op: Admit) -> Command:
        n = breaker_numbers(op.policy)
        return (
            "EVALSHA", self.sha["admit"], 1, self.breaker_key(op.downstream), int(op.now_ms), op.owner,
            n.probe_lease_ms, n.half_open_probes, op.downstream, n.ttl_ms,
        )  # fmt: skip

    def record(self, op: Record) -> Command:
        n = breaker_numbers(op.policy)
        return (
            "EVALSHA", self.sha["record"], 1, self.breaker_key(op.downstream), int(op.now_ms), op.owner,
            int(op.ok), int(op.fail), int(op.slow), int(op.slowfail), int(op.first_attempts),
            "1" if op.probe else "0", n.failure_rate, n.min_calls, n.window_ms, n.buckets,
            n.consecutive_failures, n.slow_call_rate, n.open_for_ms, n.open_for_max_ms,
            n.half_open_probes, op.downstream, n.ttl_ms,
        )  # fmt: skip

    def spend_retry(self, op: SpendRetry) -> Command:
        n = breaker_numbers(op.policy)
        return (
            "EVALSHA", self.sha["spend_retry"], 1, self.breaker_key(op.downstream), int(op.now_ms),
            float(op.budget.ratio), int(op.budget.min_per_window), n.window_ms, n.buckets, op.downstream,
            n.ttl_ms,
        )  # fmt: skip

    def switch(self, op: Switch) -> Command:
        return (
            "EVALSHA", self.sha["switch"], 1, self.breaker_key(op.downstream), op.mode, op.downstream,
            int(op.now_ms), BREAKER_TTL_MS, op.source,
        )  # fmt: skip

    def cache_get(self, op: CacheGet) -> Command:
        if _plain_peek(op):
            return ("HMGET", f"{self.fb}{{{op.record}}}", *_PEEKED)
        return (
            "EVALSHA", self.sha["cache_get"], 1, f"{self.fb}{{{op.record}}}", int(op.now_ms),
            "1" if op.serve else "0", int(op.failures), int(op.ttl_ms), float(op.decay), int(op.floor_ms),
            int(op.max_stale_ms),
        )  # fmt: skip

    def cache_put(self, op: CachePut) -> Command:
        return (
            "EVALSHA", self.sha["cache_put"], 1, f"{self.fb}{{{op.record}}}", op.value, int(op.now_ms),
            max(1, int(op.ttl_ms)), op.kind,
        )  # fmt: skip


    def answer(self, op: Any, raw: Any) -> Any:
        """The reply to ``op``'s command as ``op``'s answer type."""
        if type(op) is CacheGet and _plain_peek(op):
            return _peeked(raw, op.now_ms)
        return self.decode[type(op)](raw)


def _plain_peek(op: CacheGet) -> bool:
    """A peek with the caller's clock: a plain ``HMGET``, read here as the script would
    answer it (a serve, or a peek on the server's clock, runs ``cache_get.lua``)."""
    return not op.serve and bool(op.now_ms)


#: The fields a peek reads (as ``cache_get.lua`` does).
_PEEKED = ("kind", "value", "written_at", "fail_until", "fail_value")


def _peeked(raw: Any, now: int) -> CacheEntry:
    """A peek's ``HMGET`` read as ``cache_get.lua`` answers without ``serve``: a negative
    answer; a failure remembered until later than ``now``; the good value's age."""
    kind, _value, written_at, fail_until, fail_value = raw
    if kind == b"negative":
        return CacheEntry("negative", _maybe_text(_value))
    good = kind == b"ok"
    remembered = int(fail_until) if fail_until else 0
    if not good and remembered <= 0:
        return CacheEntry()
    good_age = max(0, now - int(written_at)) if good and written_at else -1
    if remembered > now and fail_value is not None:
        return CacheEntry("failure", _maybe_text(fail_value), good_age_ms=good_age)
    return CacheEntry(good_age_ms=good_age) if good_age >= 0 else CacheEntry()


def _head(token: int, owner: str) -> str:
    """The start of the record ``owner`` holds with ``token``: what complete, renew and
    release compare with the record (``lua/_record.lua``)."""
    return f"in_flight\n{int(token)}\n{owner}\n"


def _claim_answer(raw: Any) -> ClaimAnswer:
    if type(raw) is int:  # the token of a claim taken
        return ClaimAnswer("claimed", raw)
    verdict = _CLAIM_VERDICTS[raw[0]]
    if verdict == "done":
        return ClaimAnswer(verdict, raw[1], _maybe_text(raw[2]))
    if verdict == "in_flight":
        return ClaimAnswer(verdict, raw[1], None, raw[2])
    return ClaimAnswer(verdict, raw[1])


def _complete_answer(raw: Any) -> CompleteAnswer:
    if type(raw) is int:  # 1: stored
        return CompleteAnswer(True)
    return CompleteAnswer(False, text(raw[1]), _maybe_text(raw[2]) if len(raw) > 2 else None)


def _admission(raw: Any) -> Admission:
    return Admission(_VERDICTS[raw[0]], text(raw[1]), raw[2], raw[3], text(raw[4]))


def _recorded(raw: Any) -> Recorded:
    return Recorded(text(raw[0]), bool(raw[1]), raw[2], text(raw[3]) if len(raw) > 3 else "normal")


def _spend_answer(raw: Any) -> SpendAnswer:
    return SpendAnswer(bool(raw[0]), raw[1], raw[2])


def _switch_answer(raw: Any) -> SwitchAnswer:
    return SwitchAnswer(text(raw[0]), bool(raw[1]))


def _cache_entry(raw: Any) -> CacheEntry:
    if not raw:
        return CacheEntry()
    head = raw[0]
    if not head:  # nothing to use, but a good value of this age is held
        return CacheEntry(good_age_ms=raw[1])
    kind = _KINDS[head]
    if kind == "ok":
        return CacheEntry(kind, text(raw[1]), raw[2], raw[3], _maybe_text(raw[4]), raw[5])
    if kind == "failure":
        return CacheEntry(kind, _maybe_text(raw[1]), good_age_ms=raw[2])
    return CacheEntry(kind, _maybe_text(raw[1]))


