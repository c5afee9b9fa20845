"""Idempotency guard: one execution per key, duplicates get the stored result.

``claim`` rides in the ``begin`` round trip and ``complete``/``release`` in ``end``. Each
execution gets a fresh owner id; a retry hands its owner id over in a header so it is not
mistaken for a duplicate of itself. Fencing tokens come from a per-key counter.
"""

from __future__ import annotations

import logging
import random
from typing import Any

from celery.exceptions import Retry

from ..call import DEFERRALS_HEADER, OWNER_HEADER, Call, ClaimHandle
from ..codec import encode_capped, loads
from ..errors import (
    ClaimLost,
    DeadlineExceeded,
    DuplicateInFlight,
    IdempotencyConflict,
    IdempotencyKeyError,
    StoreUnavailable,
)
from ..keys import bind_arguments, digest, fingerprint, key_material, owner_id
from ..memo import PerObject
from ..policy import IdempotencyPolicy
from ..schedule import defer
from ..store.protocol import Claim, ClaimAnswer, Complete, CompleteAnswer, Op, Release
from . import Next

__all__ = ["DEFAULT_LEASE", "DURABLE_OPS", "IdempotencyGuard", "lease_seconds"]

log = logging.getLogger(__name__)


DEFAULT_LEASE = 60.0
#: End-trip writes worth delivering late when the store was down (owner- and
#: token-checked: a late or repeated one cannot undo a newer claim).
DURABLE_OPS: tuple[type, ...] = (Complete, Release)


def task_lease(task: Any, app: Any, policy: IdempotencyPolicy) -> float:
    """The policy's lease, else the task's hard time limit, else 60 s (one rule for the
    claim, the heartbeat, the visibility-timeout check and the amnesia window)."""
    if policy.lease is not None:
        return policy.lease
    limit = getattr(task, "time_limit", None) or app.conf.task_time_limit
    return float(limit) if limit else DEFAULT_LEASE


_leases = PerObject(lambda policy, task: task_lease(task, task.app, policy))


def lease_seconds(call: Call, policy: IdempotencyPolicy) -> float:
    """``task_lease``, worked out once per policy and task (the app's setting is read
    through Celery's layered config, a measurable share of a claim's cost)."""
    if policy.lease is not None:
        return policy.lease
    return _leases(policy, call.task)


def _names_in(policy: IdempotencyPolicy) -> frozenset[str]:
    return frozenset(policy.key) if isinstance(policy.key, tuple) else frozenset()


#: A key naming every argument already tells different arguments apart: the fingerprint
#: (a second canonical JSON and hash per call) could never differ for the same key.
_key_names = PerObject(_names_in)


class _NotClaimed(BaseException):
    """A put-off claim was not taken: carries the store's answer (or what to raise) out
    through the inner guards, which let it pass (it is no ``Exception``, so no fallback
    or retry takes it), to be handled where a claim refused in ``begin`` would be."""

    def __init__(self, answer: Any = None, error: BaseException | None = None) -> None:
        super().__init__("claim not taken")
        self.answer = answer
        self.error = error


class IdempotencyGuard:
    """Claims the key before the body, completes or releases it after.

    While the task's downstream refuses calls, ``begin`` only looks at the record: the call
    is most likely refused, replayed or deferred without its body, and then there is no
    claim to give back (one round trip, not two). If the breaker admits it after all, the
    claim is taken right before the body."""

    def prepare(self, call: Call) -> list[Op]:
        peek = call.runtime.refusal_hint(call.policy.downstream) is not None
        return [self._claim_op(call, peek=peek)]

    def _claim_op(self, call: Call, *, peek: bool) -> Op:
        policy = call.policy.idempotency
        assert policy is not None
        run = call.task.run
        named: dict[str, Any] | None = None
        if policy.fingerprint or not (policy.key == "message" or callable(policy.key)):
            try:
                named = call.named = bind_arguments(run, call.args, call.kwargs)
            except IdempotencyKeyError:
                if policy.key != "message" and not callable(policy.key):
                    raise
        material = key_material(policy.key, run, call.args, call.kwargs, call.request.id, named)
        # The record is sha256(task name, key): raw input never reaches the store. The
        # hash is kept on the call for a fallback keyed alike.
        call.key_digest = key = digest(call.task.name, material)
        fp = ""
        if policy.fingerprint and not (named is not None and named.keys() <= _key_names(policy)):
            fp = fingerprint(run, call.args, call.kwargs, named)
        call.lease_s = lease_seconds(call, policy)
        lease_ms = int(call.lease_s * 1000)
        previous_owner = str(call.headers.get(OWNER_HEADER) or "")
        owner = owner_id()
        call.outcome["idempotency_key"] = key
        call.claim = ClaimHandle(key=key, owner=owner, token=0)
        return Claim(
            record=key,
            owner=owner,
            lease_ms=lease_ms,
            ttl_ms=int(policy.ttl * 1000),
            fingerprint=fp,
            task_id=call.request.id or "",
            handoff=previous_owner,
            peek=peek,
            now_ms=call.runtime.now_ms(),
        )

    def abandon(self, call: Call) -> list[Op]:
        """Never entered after claiming (an earlier guard stopped the call): give it back."""
        claim, policy = call.claim, call.policy.idempotency
        if claim is None or policy is None or claim.token == 0:
            return []
        return [Release(claim.key, claim.owner, claim.token, int(policy.ttl * 1000))]

    def __call__(self, call: Call, next: Next) -> Any:
        policy = call.policy.idempotency
        assert policy is not None
        try:
            (answer,) = call.begin(self)
        except StoreUnavailable as exc:
            if self._unguarded(call, policy, exc):
                return next(call)
        if answer.verdict == "free":
            return self._claim_before_body(call, policy, next)
        if answer.verdict == "claimed":
            self._claimed(call, policy, answer.token)
            return self._run(call, policy, next)
        return self._not_claimed(call, policy, answer)

    def _unguarded(self, call: Call, policy: IdempotencyPolicy, exc: StoreUnavailable) -> bool:
        """The store failed: run without a claim (``fail_open``) or defer the job."""
        call.claim = None
        if policy.on_store_error == "fail_open":
            call.outcome["idempotency"] = "unguarded"
            log.warning("idempotency store unavailable; running unguarded (fail_open): %s", exc)
            return True
        call.outcome["idempotency"] = "store_unavailable"
        defer(call, random.uniform(1.0, 5.0), f"idempotency store unavailable: {exc}", exc)

    def _claim_before_body(self, call: Call, policy: IdempotencyPolicy, next: Next) -> Any:
        def claim_now() -> None:
            try:
                (answer,) = call.runtime.store.batch([self._claim_op(call, peek=False)])
            except StoreUnavailable as exc:
                if policy.on_store_error == "fail_open":
                    self._unguarded(call, policy, exc)
                    return
                raise _NotClaimed(error=exc) from exc
            except (Retry, DeadlineExceeded) as exc:  # a deferral, raised out here
                raise _NotClaimed(error=exc) from exc
            if answer.verdict != "claimed":
                raise _NotClaimed(answer)
            self._claimed(call, policy, answer.token)

        call.before_body = claim_now
        try:
            return self._run(call, policy, next)
        except _NotClaimed as refused:
            # Outside the inner guards now: a deferral or a store failure is handled as in
            # ``begin``, never taken for the body's own failure (no fallback, no retry).
            if isinstance(refused.error, StoreUnavailable):
                self._unguarded(call, policy, refused.error)
            if refused.error is not None:
                raise refused.error from None
            return self._not_claimed(call, policy, refused.answer)

    def _not_claimed(self, call: Call, policy: IdempotencyPolicy, answer: ClaimAnswer) -> Any:
        """Someone else's record: replay it, refuse a conflict, or defer behind it."""
        verdict = answer.verdict
        claim, call.claim = call.claim, None
        if verdict == "amnesia":
            self._amnesia(call, answer.remaining_ms)
        if verdict == "done":
            call.outcome["idempotency"] = "replayed"
            call.outcome["replayed_token"] = answer.token
            return _decode(answer.result)
        if verdict == "conflict":
            call.outcome["idempotency"] = "conflict"
            raise IdempotencyConflict(
                "this idempotency key was used before with different arguments; the body was not run"
            )
        remaining = answer.remaining_ms / 1000.0
        call.outcome["idempotency"] = "in_flight"
        if policy.on_duplicate == "drop":
            raise DuplicateInFlight(f"key held by another execution for {remaining:.1f}s more; dropped")
        # Most holders finish long before their lease runs out: look again soon, then
        # less often, never later than the lease's end (plus jitter so duplicates spread).
        deferrals = int(call.headers.get(DEFERRALS_HEADER) or 0)
        wait = min(remaining, 0.25 * 2.0 ** min(deferrals, 16))
        jitter = random.uniform(0.0, min(1.0, max(0.05, wait * 0.2)))
        defer(call, wait + jitter, f"duplicate of an in-flight execution ({claim.key if claim else ''})")

    def _amnesia(self, call: Call, remaining_ms: int) -> None:
        """The store lost its data (noticed when a connection was made): fail closed."""
        remaining = remaining_ms / 1000.0
        call.outcome["idempotency"] = "store_amnesia"
        call.runtime.count("store_amnesia")
        log.error(
            "the store lost its data (restart without persistence?): claims fail closed for %.0fs more",
            remaining,
        )
        defer(call, remaining + random.uniform(0.0, 1.0), "idempotency store lost its data")

    def _claimed(self, call: Call, policy: IdempotencyPolicy, token: int) -> None:
        claim = call.claim
        assert claim is not None
        claim.token = token
        call.outcome["idempotency"] = "claimed"
        call.outcome["token"] = token
        lease_ms = int((call.lease_s or lease_seconds(call, policy)) * 1000)
        call.runtime.heartbeat.track(claim, lease_ms, int(policy.ttl * 1000))

    def _run(self, call: Call, policy: IdempotencyPolicy, next: Next) -> Any:
        """Run the rest under the claim (taken already, or right before the body), then
        complete it with the result or give it back."""
        ttl_ms = int(policy.ttl * 1000)
        try:
            result = next(call)
        except BaseException:
            claim = call.claim
            if claim is not None and claim.token:
                call.runtime.heartbeat.untrack(claim)
                call.at_end(Release(claim.key, claim.owner, claim.token, ttl_ms))
            raise
        claim = call.claim
        if claim is None or not claim.token:
            # Answered without the body (a refused call served from the fallback, a cached
            # negative answer): there was no claim, and the job is not done.
            call.claim = None
            call.outcome.setdefault("idempotency", "not_claimed")
            return result
        call.runtime.heartbeat.untrack(claim)
        if call.outcome.get("fallback_source") in ("cache", "function", "default"):
            # A degraded answer is not the job done: free the key for a fresh run later.
            call.at_end(Release(claim.key, claim.owner, claim.token, ttl_ms))
            return result
        payload = encode_capped(
            result, call.runtime.max_result_bytes, "result not stored for replays", call.encoded
        )
        if payload is None:
            call.outcome["idempotency_result"] = "not_stored"
            payload = "null"
        call.at_end(
            Complete(claim.key, claim.owner, claim.token, payload, ttl_ms, call.runtime.now_ms()),
            lambda done, answer: _completed(done, claim, answer),
        )
        return result


def _completed(call: Call, claim: ClaimHandle, answer: CompleteAnswer) -> None:
    if answer.stored:
        return
    state = answer.state
    if not state:
        # The record is gone (the store lost its data, or an operator forgot it): nobody
        # else completed this key, and our body ran under a valid claim. Keep our result.
        call.outcome["idempotency"] = "record_gone"
        call.runtime.count("complete_record_gone")
        log.warning("claim token %s: the record vanished before completion; result kept", claim.token)
        return
    call.outcome["idempotency"] = "claim_lost"
    if state == "done":
        call.replace_result(_decode(answer.result))
        log.warning("claim token %s was lost; another execution completed first", claim.token)
        return
    raise ClaimLost(f"claim token {claim.token} was lost before completion (record is {state or 'gone'})")


def _decode(raw: str | None) -> Any:
    return loads(raw or "null")
