"""Fallback guard: write last-known-good on success, serve it when the downstream fails.

The cache write rides in the ``end`` round trip; a negative-entry peek rides in
``begin``. Serving costs one round trip, and only on the failure path. Only JSON values
under ``max_size`` are cached; anything else is logged and the task still succeeds.
"""

from __future__ import annotations

import logging
from typing import Any

from ..call import Call
from ..codec import dumps, encode_capped, loads
from ..errors import CachedFailure, ResilienceError, StoreUnavailable
from ..fallback import NotFound, degraded, entry_ttl
from ..keys import digest, key_material
from ..policy import DEFAULT_RETRY_ON, NO_DEFAULT, FallbackPolicy, matches
from ..sealing import seal, unseal
from ..store.protocol import CacheEntry, CacheGet, CacheKind, CachePut, Op
from . import PASS_THROUGH, Next

__all__ = ["FallbackGuard", "serve_fallback"]

log = logging.getLogger(__name__)


def _key(call: Call) -> str:
    """The fallback record: sha256(task name, key), shared with the idempotency record
    when both are keyed alike (hashed once). It is also the seal's context."""
    policy = call.policy.fallback
    assert policy is not None
    if call.fallback_key is None:
        idempotency = call.policy.idempotency
        if call.key_digest is not None and idempotency is not None and idempotency.key == policy.key:
            hashed = call.key_digest  # the same key spec: the same material, hashed once
        else:
            material = key_material(
                policy.key, call.task.run, call.args, call.kwargs, call.request.id, call.named
            )
            hashed = digest(call.task.name, material)
        call.fallback_key = hashed
    return call.fallback_key


def _failures(call: Call) -> int:
    admission = call.admission
    n = admission.consecutive_failures if admission is not None else 0
    return n + (1 if call.body_error is not None else 0)


def _serves(call: Call, exc: BaseException) -> bool:
    """Is ``exc`` the downstream failing (rather than a bug or bad input)?"""
    if isinstance(exc, ResilienceError):
        return True
    if call.policy.retry is not None:
        return matches(call.policy.retry.retry_on, exc)
    if call.policy.downstream is not None:
        breaker = call.runtime.breaker_policy(call.policy.downstream, call.policy)
        return matches(breaker.failure_on, exc)
    return isinstance(exc, DEFAULT_RETRY_ON)


def serve_fallback(call: Call, exc: BaseException) -> Any:
    """The cached value, else the function's, else the default; else re-raise ``exc``."""
    policy = call.policy.fallback
    if policy is None:
        raise exc
    runtime = call.runtime
    name = call.policy.downstream or ""
    entry: CacheEntry
    try:
        if call.fallback_prefetched and _GUARD in call.preparers:
            (entry,) = call.begin(_GUARD)  # fetched in the begin trip already
        else:
            (entry,) = runtime.store.batch([_serve_op(call, policy)])
    except StoreUnavailable as store_exc:
        log.warning("fallback cache unavailable: %s", store_exc)
        entry = CacheEntry()
    text = _opened(call, entry.value) if entry.kind == "ok" and entry.value is not None else None
    if text is not None:
        value = loads(text)
        return _served(call, name, value, "cache", entry.age_ms / 1000.0, entry.allowed_ms / 1000.0)
    if policy.function is not None:
        return _served(call, name, policy.function(*call.args, **call.kwargs), "function", None)
    if policy.default is not NO_DEFAULT:
        return _served(call, name, policy.default, "default", None)
    raise exc


def _opened(call: Call, stored: str) -> str | None:
    """A stored value's JSON text, or None (logged, counted) when its seal is wrong."""
    text = unseal(call.runtime.hmac_key, _key(call), stored)
    if text is None:
        call.runtime.count("fallback_tampered", call.policy.downstream or "")
        log.error("cached value under %s has a missing or wrong HMAC: not served", _key(call))
    return text


def _served(
    call: Call, name: str, value: Any, source: str, age: float | None, allowed: float | None = None
) -> Any:
    call.outcome["fallback_source"] = source
    call.outcome["fallback_age_s"] = age
    if allowed is not None:
        call.outcome["fallback_ttl_s"] = allowed
    call.runtime.count("fallback_served", name)
    return degraded(value, source, age)


def _serve_op(call: Call, policy: FallbackPolicy, failures: int | None = None) -> Op:
    ttl_ms, floor_ms = int(policy.ttl * 1000), int(policy.floor * 1000)
    max_stale_ms = int((policy.max_stale or 0) * 1000)
    n = _failures(call) if failures is None else failures
    return CacheGet(
        record=_key(call),
        serve=True,
        failures=n,
        ttl_ms=ttl_ms,
        decay=policy.decay,
        floor_ms=floor_ms,
        max_stale_ms=max_stale_ms,
        now_ms=call.runtime.now_ms(),
    )


class FallbackGuard:
    """Caches successes under the fallback key and serves them on failure."""

    def prepare(self, call: Call) -> list[Op]:
        """A peek for negative entries; while the downstream refuses calls, the fallback
        itself instead, so a refused call is served from this one round trip."""
        hint = call.runtime.refusal_hint(call.policy.downstream)
        if hint is not None and call.policy.fallback is not None:
            call.fallback_prefetched = True
            return [_serve_op(call, call.policy.fallback, failures=hint + 1)]
        return [CacheGet(record=_key(call), now_ms=call.runtime.now_ms())]

    def abandon(self, call: Call) -> list[Op]:
        return []

    def __call__(self, call: Call, next: Next) -> Any:
        policy = call.policy.fallback
        assert policy is not None
        peek: CacheEntry
        try:
            (peek,) = call.begin(self)
        except StoreUnavailable:
            peek = CacheEntry()
        if call.fallback_prefetched:
            # a served-fallback answer, not a peek: the downstream is being tried
            peek = CacheEntry()
        kind = peek.kind
        text = None
        if kind in ("negative", "failure") and peek.value is not None:
            text = _opened(call, peek.value)
        if text is not None:
            value = loads(text)
            call.outcome["fallback_source"] = f"{kind}_cache"
            call.runtime.count("negative_hit", call.policy.downstream or "")
            if kind == "failure":
                return serve_fallback(call, CachedFailure(str(value)))
            return value
        try:
            result = next(call)
        except PASS_THROUGH:
            raise
        except Exception as exc:
            if not _serves(call, exc):
                raise
            if policy.cache_failures and not isinstance(exc, CachedFailure):
                call.at_end(
                    self._put(call, policy, f"{type(exc).__name__}: {exc}", "failure", policy.negative_ttl)
                )
            return serve_fallback(call, exc)
        if isinstance(result, NotFound):
            self._write(call, policy, result.value, "negative", policy.negative_ttl)
            return result.value
        ttl = entry_ttl(policy.ttl, policy.decay, policy.floor, _failures(call))
        self._write(call, policy, result, "ok", ttl)
        return result

    def _write(self, call: Call, policy: FallbackPolicy, value: Any, kind: CacheKind, ttl: float) -> None:
        if policy.validate is not None and not _valid(policy, value):
            call.outcome["fallback_cached"] = False
            return
        text = encode_capped(value, policy.max_size, "result not cached for fallback", call.encoded)
        if text is None:
            call.outcome["fallback_cached"] = False
            return
        call.at_end(self._put(call, policy, text, kind, ttl))

    def _put(self, call: Call, policy: FallbackPolicy, value: Any, kind: CacheKind, ttl: float) -> Op:
        text = value if kind != "failure" else dumps(value)
        stored = seal(call.runtime.hmac_key, _key(call), text)
        return CachePut(_key(call), stored, kind, int(ttl * 1000), call.runtime.now_ms())


def _valid(policy: FallbackPolicy, value: Any) -> bool:
    """The policy's own check of a result before it may be served to others later."""
    assert policy.validate is not None
    try:
        ok = bool(policy.validate(value))
    except Exception as exc:
        log.warning("result not cached for fallback: its validator raised %r", exc)
        return False
    if not ok:
        log.warning("result not cached for fallback: it failed validation")
    return ok


#: The one guard instance chains use (``serve_fallback`` reads its prefetched answer).
_GUARD = FallbackGuard()
