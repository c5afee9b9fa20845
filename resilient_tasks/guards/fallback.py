"""Fallback guard: remember last-known-good on success, serve it when the downstream fails.

``begin`` looks for a cached negative answer or a failure remembered moments ago (and,
while the downstream is believed to refuse calls, fetches the fallback itself, so a
refused call is answered from that one round trip). ``around`` serves the fallback when
the body fails with a downstream error; ``serve`` is what the pipeline calls when a
decision says ``FALLBACK``. The cache write rides in the ``end`` round trip and is
skipped while the good value stored is younger than ``REFRESH`` of its ``ttl`` (one
write per key per tenth of the ttl, however hot the key). Only JSON values under
``max_size`` are cached.

Entries are timed by the worker's own clock (``_now_ms``), not the server's: an entry's
age decides seconds-long freshness, which a few ms of skew between workers cannot move,
and a script that asked Redis for the time would pay a ``TIME`` in every write. (A
reader behind the writer's clock sees an age of 0, never less.)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from ..codec import dumps, encode_capped, loads
from ..errors import CachedFailure, ResilienceError, StoreUnavailable
from ..fallback import NotFound, degraded, entry_ttl
from ..policy import DEFAULT_RETRY_ON, NO_DEFAULT, FallbackPolicy, matches
from ..sealing import seal, unseal
from ..store.protocol import CacheEntry, CacheGet, CacheKind, CachePut, Op
from .base import RUN, Decision, EndOp, Execution, Guard, Kind, Outcome, Stage, pass_through

__all__ = ["FallbackGuard"]

log = logging.getLogger(__name__)

#: A good value younger than this share of the policy's ttl is not written again.
REFRESH = 0.1


class FallbackGuard(Guard):
    """Caches successes under the fallback key and serves them on failure."""

    stage = Stage.CACHE

    def __init__(self, ex: Execution) -> None:
        policy = ex.policy.fallback
        assert policy is not None
        self.policy = policy
        self.record = ""
        self.prefetching = False
        self.prefetched: CacheEntry | None = None
        self.failure_text: str | None = None
        self.served = False
        #: The age of the good value stored, as the begin trip saw it (-1: none).
        self.good_age_ms = -1

    def _record(self, ex: Execution) -> str:
        if not self.record:
            self.record = ex.record_id(self.policy.key)
        return self.record

    def begin(self, ex: Execution) -> Sequence[Op]:
        hint = ex.runtime.refusal_hint(ex.policy.downstream)
        if hint is not None:
            self.prefetching = True
            return [self._serve_op(ex, hint + 1)]
        return [CacheGet(record=self._record(ex), now_ms=_now_ms(ex))]

    def decide(self, ex: Execution, answers: Sequence[Any] | None) -> Decision:
        if answers is None:
            return RUN
        (entry,) = answers
        self.good_age_ms = entry.good_age_ms
        if self.prefetching:
            # a served-fallback answer fetched in advance: kept for a refusal (the
            # downstream is being tried, so a cached negative answer is not looked at)
            self.prefetched = entry
            return RUN
        if entry.kind not in ("negative", "failure") or entry.value is None:
            return RUN
        text = self._opened(ex, entry.value)
        if text is None:
            return RUN
        value = loads(text)
        ex.outcome.fallback_source = f"{entry.kind}_cache"
        ex.runtime.count("negative_hit", ex.policy.downstream or "")
        if entry.kind == "failure":
            return Decision(Kind.FALLBACK, error=CachedFailure(str(value)))
        return Decision(Kind.REPLAY, value=value)

    def around(self, ex: Execution, proceed: Callable[[], Any]) -> Any:
        try:
            result = proceed()
            return result.value if isinstance(result, NotFound) else result
        except pass_through():
            raise
        except Exception as exc:
            if not self._serves(ex, exc):
                raise
            if self.policy.cache_failures and not isinstance(exc, CachedFailure):
                self.failure_text = f"{type(exc).__name__}: {exc}"
            return self.serve(ex, exc)

    def _serves(self, ex: Execution, exc: BaseException) -> bool:
        """Is ``exc`` the downstream failing (rather than a bug or bad input)?"""
        if isinstance(exc, ResilienceError):
            return True
        if ex.policy.retry is not None:
            return matches(ex.policy.retry.retry_on, exc)
        if ex.policy.downstream is not None:
            breaker = ex.runtime.breaker_policy(ex.policy.downstream, ex.task, ex.policy)
            return matches(breaker.failure_on, exc)
        return matches(DEFAULT_RETRY_ON, exc)

    def serve(self, ex: Execution, exc: BaseException, answers: Sequence[Any] | None = None) -> Any:
        """The cached value, else the function's, else the default; else re-raise ``exc``.
        ``answers``: this guard's begin answers, when the pipeline decided before it did."""
        policy = self.policy
        if self.prefetched is None and self.prefetching and answers:
            self.prefetched = answers[0]
        entry = self.prefetched
        if entry is None:
            failures = ex.outcome.consecutive_failures + (1 if ex.outcome.body_error is not None else 0)
            try:
                (entry,) = ex.runtime.store.batch([self._serve_op(ex, failures)])
            except StoreUnavailable as store_exc:
                log.warning("fallback cache unavailable: %s", store_exc)
                entry = CacheEntry()
        name = ex.policy.downstream or ""
        text = self._opened(ex, entry.value) if entry.kind == "ok" and entry.value is not None else None
        if text is not None:
            return self._served(
                ex, name, loads(text), "cache", entry.age_ms / 1000.0, entry.allowed_ms / 1000.0
            )
        if policy.function is not None:
            return self._served(ex, name, policy.function(*ex.args, **ex.kwargs), "function", None)
        if policy.default is not NO_DEFAULT:
            return self._served(ex, name, policy.default, "default", None)
        raise exc

    def _served(
        self,
        ex: Execution,
        name: str,
        value: Any,
        source: str,
        age: float | None,
        allowed: float | None = None,
    ) -> Any:
        self.served = True
        outcome = ex.outcome
        outcome.fallback_source, outcome.fallback_age_s, outcome.fallback_ttl_s = source, age, allowed
        ex.runtime.count("fallback_served", name)
        return degraded(value, source, age)

    def _opened(self, ex: Execution, stored: str) -> str | None:
        """A stored value's JSON text, or None (logged, counted) when its seal is wrong."""
        text = unseal(ex.runtime.hmac_key, self._record(ex), stored)
        if text is None:
            ex.runtime.count("fallback_tampered", ex.policy.downstream or "")
            log.error("cached fallback value %s has a missing or wrong HMAC: not served", self._record(ex))
        return text

    def _serve_op(self, ex: Execution, failures: int) -> CacheGet:
        policy = self.policy
        return CacheGet(
            record=self._record(ex),
            serve=True,
            failures=failures,
            ttl_ms=int(policy.ttl * 1000),
            decay=policy.decay,
            floor_ms=int(policy.floor * 1000),
            max_stale_ms=int((policy.max_stale or 0) * 1000),
            now_ms=_now_ms(ex),
        )

    def end(self, ex: Execution, outcome: Outcome) -> Sequence[EndOp]:
        policy = self.policy
        ops: list[EndOp] = []
        if self.failure_text is not None:
            ops.append((self._put(ex, dumps(self.failure_text), "failure", policy.negative_ttl), None))
        if not outcome.body_ran or outcome.body_error is not None or self.served:
            return ops
        value = outcome.value
        if isinstance(value, NotFound):
            ops += self._write(ex, value.value, "negative", policy.negative_ttl)
            return ops
        if 0 <= self.good_age_ms < policy.ttl * 1000 * REFRESH and not outcome.consecutive_failures:
            ex.outcome.fallback_cached = True  # fresh enough: kept as it is
            return ops
        failures = outcome.consecutive_failures
        ops += self._write(ex, value, "ok", entry_ttl(policy.ttl, policy.decay, policy.floor, failures))
        return ops

    def _write(self, ex: Execution, value: Any, kind: CacheKind, ttl: float) -> list[EndOp]:
        policy = self.policy
        if policy.validate is not None and not _valid(policy, value):
            ex.outcome.fallback_cached = False
            return []
        text = encode_capped(value, policy.max_size, "result not cached for fallback", ex.encoded)
        if text is None:
            ex.outcome.fallback_cached = False
            return []
        return [(self._put(ex, text, kind, ttl), None)]

    def _put(self, ex: Execution, text: str, kind: CacheKind, ttl: float) -> CachePut:
        stored = seal(ex.runtime.hmac_key, self._record(ex), text)
        return CachePut(self._record(ex), stored, kind, int(ttl * 1000), _now_ms(ex))


def _now_ms(ex: Execution) -> int:
    """The worker's clock (an injected one in tests), for every cache op (see above)."""
    return int(ex.runtime.clock() * 1000)


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
