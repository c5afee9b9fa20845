"""Turning a policy's key spec and a call's arguments into a safe Redis key part.

Raw user input never becomes a Redis key: the material is hashed with SHA-256 together
with the task name, so NUL, CRLF, glob characters or ``{tags}`` in an argument cannot
leave the prefix, break a hash slot or collide across tasks.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Callable, Mapping
from typing import Any

from .errors import IdempotencyKeyError
from .policy import KeySpec

__all__ = ["MAX_KEY_BYTES", "bind_arguments", "canonical", "digest", "fingerprint", "key_material"]

#: Longest key material accepted before hashing (bytes of UTF-8).
MAX_KEY_BYTES = 1024


def canonical(value: Any) -> str:
    """Stable JSON text of ``value``: sorted keys, no spaces, unknown types by ``repr``."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=repr, ensure_ascii=False)


def digest(*parts: str) -> str:
    """SHA-256 hex of ``parts`` joined by NUL (which no part's hash input can fake)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()


def bind_arguments(
    run: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> dict[str, Any]:
    """Arguments by name, as ``run`` would receive them (defaults applied)."""
    try:
        bound = inspect.signature(run).bind(*args, **kwargs)
    except TypeError as exc:
        raise IdempotencyKeyError(f"arguments do not match the task signature: {exc}") from exc
    bound.apply_defaults()
    named = dict(bound.arguments)
    for name, param in inspect.signature(run).parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD and name in named:
            named.update(named.pop(name))
    return named


def key_material(
    spec: KeySpec,
    run: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    task_id: str | None,
) -> str:
    """The unhashed key for one call; raises ``IdempotencyKeyError`` if it is unusable."""
    if spec == "message":
        material = task_id or ""
    elif isinstance(spec, tuple):
        named = bind_arguments(run, args, kwargs)
        missing = [name for name in spec if name not in named]
        if missing:
            raise IdempotencyKeyError(f"key argument(s) {', '.join(missing)} not passed to the task")
        material = canonical([named[name] for name in spec])
    elif isinstance(spec, str):
        try:
            material = spec.format(*args, **bind_arguments(run, args, kwargs))
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


def fingerprint(run: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> str:
    """Hash of the call's arguments by name, so positional and keyword calls agree."""
    try:
        named = bind_arguments(run, args, kwargs)
    except IdempotencyKeyError:
        named = {"args": list(args), "kwargs": dict(kwargs)}
    return digest(canonical(named))[:32]
