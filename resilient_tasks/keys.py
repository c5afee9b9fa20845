"""Turning a policy's key spec and a call's arguments into a safe Redis key part.

Raw user input never becomes a Redis key: the material is hashed with SHA-256 together
with the task name, so NUL, CRLF, glob characters or ``{tags}`` in an argument cannot
leave the prefix, break a hash slot or collide across tasks.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import itertools
import json
import os
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

from .errors import IdempotencyKeyError
from .policy import KeySpec

__all__ = [
    "MAX_KEY_BYTES",
    "bind_arguments",
    "canonical",
    "digest",
    "fingerprint",
    "key_material",
    "owner_id",
]

#: Longest key material accepted before hashing (bytes of UTF-8).
MAX_KEY_BYTES = 1024


class _Owners:
    """Execution ids: a random 64-bit prefix per process (drawn again in a forked child)
    and a counter. Unique across a fleet like a UUID4, at a fifth of the cost; they need
    not be secret (fencing tokens, not owner ids, reject a stale writer)."""

    def __init__(self) -> None:
        self.reset()
        os.register_at_fork(after_in_child=self.reset)

    def reset(self) -> None:
        self.prefix = os.urandom(8).hex()
        self.counter = itertools.count(1)

    def next(self) -> str:
        return f"{self.prefix}{next(self.counter):016x}"


_OWNERS = _Owners()


def owner_id() -> str:
    """A new id for one execution (or one breaker admission, one epoch writer)."""
    return _OWNERS.next()


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), default=repr, ensure_ascii=False)


def canonical(value: Any) -> str:
    """Stable JSON text of ``value``: sorted keys, no spaces, unknown types by ``repr``."""
    return _CANONICAL.encode(value)


def digest(*parts: str) -> str:
    """SHA-256 hex of ``parts`` joined by NUL (which no part's hash input can fake)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()


@functools.lru_cache(maxsize=1024)
def _signature(func: Callable[..., Any], bound: bool) -> inspect.Signature:
    """``run``'s signature, computed once per function (without ``self`` when bound)."""
    signature = inspect.signature(func)
    if bound:
        signature = signature.replace(parameters=list(signature.parameters.values())[1:])
    return signature


def signature_of(run: Callable[..., Any]) -> inspect.Signature:
    func = getattr(run, "__func__", run)
    try:
        return _signature(func, hasattr(run, "__self__"))
    except TypeError:  # unhashable callable: no cache
        return inspect.signature(run)


@functools.lru_cache(maxsize=1024)
def _plain_names(func: Callable[..., Any], bound: bool) -> tuple[str, ...] | None:
    """The parameter names when each is an ordinary one (no ``*args``, ``**kw``,
    keyword-only or positional-only): such a call binds with a ``zip``."""
    params = _signature(func, bound).parameters.values()
    if all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params):
        return tuple(p.name for p in params)
    return None


def _bind_plainly(
    run: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> dict[str, Any] | None:
    """Every parameter given, none twice, on a plain signature: bound without
    ``inspect`` (a tenth of the cost); anything else is left to ``Signature.bind``."""
    try:
        names = _plain_names(getattr(run, "__func__", run), hasattr(run, "__self__"))
    except TypeError:  # unhashable callable
        return None
    if names is None or len(args) + len(kwargs) != len(names) or len(args) > len(names):
        return None
    named = dict(zip(names, args, strict=False))  # (fewer args than names: kwargs fill)
    for name in kwargs:
        if name in named or name not in names:
            return None
    named.update(kwargs)
    return named


def bind_arguments(
    run: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> dict[str, Any]:
    """Arguments by name, as ``run`` would receive them (defaults applied)."""
    plain = _bind_plainly(run, args, kwargs)
    if plain is not None:
        return plain
    signature = signature_of(run)
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise IdempotencyKeyError(f"arguments do not match the task signature: {exc}") from exc
    bound.apply_defaults()
    named = dict(bound.arguments)
    for name, param in signature.parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD and name in named:
            named.update(named.pop(name))
    return named


def key_material(
    spec: KeySpec,
    run: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    task_id: str | None,
    named: dict[str, Any] | None = None,
) -> str:
    """The unhashed key for one call; raises ``IdempotencyKeyError`` if it is unusable.
    ``named`` is the call's arguments by name when the caller bound them already."""
    if spec == "message":
        material = task_id or ""
    elif isinstance(spec, tuple):
        named = named if named is not None else bind_arguments(run, args, kwargs)
        values = []
        texts: list[str] | None = []  # each value's JSON while all are ints or strings
        for name in spec:
            value = named.get(name, _MISSING)
            if value is _MISSING or value is None or value == "":
                _refuse_key_arguments(spec, named)
            values.append(value)
            if texts is not None:
                kind = type(value)
                if kind is int:
                    texts.append(str(value))
                elif kind is str:
                    texts.append(_CANONICAL.encode(value))
                else:
                    texts = None
        # the same text as canonical(values), without building a JSON encoder per call
        material = "[" + ",".join(texts) + "]" if texts is not None else canonical(values)
    elif isinstance(spec, str):
        try:
            named = named if named is not None else bind_arguments(run, args, kwargs)
            material = spec.format(*args, **named)
        except (KeyError, IndexError, AttributeError, ValueError) as exc:
            raise IdempotencyKeyError(f"key template {spec!r} failed: {exc!r}") from exc
    else:
        try:
            value = spec(*args, **kwargs)
        except Exception as exc:
            raise IdempotencyKeyError(f"key function failed: {exc!r}") from exc
        material = value if isinstance(value, str) else canonical(value)
    if not material:
        raise IdempotencyKeyError("the idempotency key is empty")
    size = len(material.encode("utf-8", "surrogatepass"))
    if size > MAX_KEY_BYTES:
        raise IdempotencyKeyError(f"the idempotency key is {size} bytes; the limit is {MAX_KEY_BYTES}")
    return material


_MISSING: Any = object()


def _refuse_key_arguments(spec: tuple[str, ...], named: Mapping[str, Any]) -> NoReturn:
    """The error for key arguments not passed, or empty: None or "" would make
    unrelated calls share one record."""
    missing = [name for name in spec if name not in named]
    if missing:
        raise IdempotencyKeyError(f"key argument(s) {', '.join(missing)} not passed to the task")
    empty = [name for name in spec if named[name] is None or named[name] == ""]
    raise IdempotencyKeyError(f"key argument(s) {', '.join(empty)} empty (None or \"\")")


def fingerprint(
    run: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    named: dict[str, Any] | None = None,
) -> str:
    """Hash of the call's arguments by name, so positional and keyword calls agree."""
    if named is None:
        try:
            named = bind_arguments(run, args, kwargs)
        except IdempotencyKeyError:
            named = {"args": list(args), "kwargs": dict(kwargs)}
    return digest(canonical(named))[:32]
