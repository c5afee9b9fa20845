"""Idempotency guard: one execution per key, duplicates get the stored result.

``begin`` claims the record; ``end`` completes it with the result or releases it. Each
execution gets a fresh owner id; a retry hands its owner id over in a header so it is not
mistaken for a duplicate of itself. Fencing tokens come from a per-key counter.

While the task's downstream is believed to refuse calls, ``begin`` only looks at the
record (``peek``): such a call is most likely refused, replayed or deferred without its
body, and then there is no claim to give back. If it is admitted after all, the claim is
taken right before the body (``CONFIRM``).
"""

from __future__ import annotations

import functools
import logging
import random
import time
from collections.abc import Sequence
from typing import Any

from ..codec import encode_capped, loads
from ..errors import ClaimLost, DuplicateInFlight, IdempotencyConflict, IdempotencyKeyError, StoreUnavailable
from ..keys import fingerprint, owner_id
from ..memo import PerObject
from ..policy import IdempotencyPolicy
from ..settings import task_lease
from ..store.protocol import Claim, ClaimAnswer, Complete, CompleteAnswer, Op, Release
from .base import (
    DEFERRALS_HEADER,
    OWNER_HEADER,
    RUN,
    ClaimHandle,
    Decision,
    EndOp,
    Execution,
    Guard,
    Kind,
    Outcome,
    Stage,
)

__all__ = ["DURABLE_OPS", "IdempotencyGuard"]

log = logging.getLogger(__name__)

#: End-trip writes worth delivering late when the store was down (owner- and
#: token-checked: a late or repeated one cannot undo a newer claim).
DURABLE_OPS: tuple[type, ...] = (Complete, Release)

_leases = PerObject(lambda policy, task: task_lease(task, task.app, policy))


def _names_in(policy: IdempotencyPolicy) -> frozenset[str]:
    return frozenset(policy.key) if isinstance(policy.key, tuple) else frozenset()


#: A key naming every argument already tells different arguments apart: the fingerprint
#: (a second canonical JSON and hash per call) could never differ for the same key.
_key_names = PerObject(_names_in)


class IdempotencyGuard(Guard):
    """Claims the key before the body, completes or releases it after."""

    stage = Stage.IDEMPOTENCY

    def __init__(self, ex: Execution) -> None:
        policy = ex.policy.idempotency
        assert policy is not None
        self.policy = policy
        self.lease_s = policy.lease if policy.lease is not None else _leases(policy, ex.task)
        self.ttl_ms = int(policy.ttl * 1000)
        self.record = ""
        self.owner = owner_id()
        self.token = 0  # the claim's fencing token once taken
        self.claimed_at = 0.0  # (monotonic) when the claim was taken
        self.unguarded = False

    # -- begin and decide ---------------------------------------------------------------

    def _claim(self, ex: Execution, *, peek: bool) -> Claim:
        policy = self.policy
        if not self.record:
            self.record = ex.record_id(policy.key)
            ex.outcome.idempotency_key = self.record
        fp = ""
        if policy.fingerprint:
            try:
                named: dict[str, Any] | None = ex.named()
            except IdempotencyKeyError:
                named = None
            if not (named is not None and named.keys() <= _key_names(policy)):
                fp = fingerprint(ex.task.run, ex.args, ex.kwargs, named)
        return Claim(
            record=self.record,
            owner=self.owner,
            lease_ms=int(self.lease_s * 1000),
            ttl_ms=self.ttl_ms,
            fingerprint=fp,
            task_id=ex.request.id or "",
            handoff=str(ex.headers.get(OWNER_HEADER) or ""),
            peek=peek,
            now_ms=ex.runtime.now_ms(),
        )

    def begin(self, ex: Execution) -> Sequence[Op]:
        downstream = ex.policy.downstream
        peek = downstream is not None and ex.runtime.refusal_hint(downstream) is not None
        return [self._claim(ex, peek=peek)]

    def decide(self, ex: Execution, answers: Sequence[Any] | None) -> Decision:
        if answers is None:
            return self._store_failed(ex, None)
        (answer,) = answers
        if answer.verdict == "free":
            return Decision(Kind.CONFIRM)
        return self._answered(ex, answer)

    def confirm(self, ex: Execution) -> Sequence[Op]:
        return [self._claim(ex, peek=False)]

    def confirmed(self, ex: Execution, answers: Sequence[Any] | None) -> Decision:
        if answers is None:
            return self._store_failed(ex, None)
        (answer,) = answers
        return self._answered(ex, answer)

    def _answered(self, ex: Execution, answer: ClaimAnswer) -> Decision:
        outcome = ex.outcome
        if answer.verdict == "claimed":
            self.token = outcome.token = answer.token
            self.claimed_at = time.monotonic()
            outcome.idempotency = "claimed"
            ex.claim = ClaimHandle(key=self.record, owner=self.owner, token=answer.token)
            ex.runtime.heartbeat.track(ex.claim, int(self.lease_s * 1000), self.ttl_ms)
            return RUN
        if answer.verdict == "done":
            outcome.idempotency = "replayed"
            outcome.replayed_token = answer.token
            return Decision(Kind.REPLAY, value=loads(answer.result or "null"))
        if answer.verdict == "conflict":
            outcome.idempotency = "conflict"
            return Decision(
                Kind.FAIL,
                error=IdempotencyConflict(
                    "this idempotency key was used before with different arguments; the body was not run"
                ),
            )
        if answer.verdict == "amnesia":
            remaining = answer.remaining_ms / 1000.0
            outcome.idempotency = "store_amnesia"
            ex.runtime.count("store_amnesia")
            log.error(
                "the store lost its data (restart without persistence?): claims fail closed for %.0fs more",
                remaining,
            )
            return Decision(
                Kind.DEFER,
                countdown=remaining + random.uniform(0.0, 1.0),
                reason="idempotency store lost its data",
            )
        # in flight elsewhere
        remaining = answer.remaining_ms / 1000.0
        outcome.idempotency = "in_flight"
        if self.policy.on_duplicate == "drop":
            error = DuplicateInFlight(f"key held by another execution for {remaining:.1f}s more; dropped")
            return Decision(Kind.FAIL, error=error)
        # Most holders finish long before their lease runs out: look again soon, then
        # less often, never later than the lease's end (plus jitter so duplicates spread).
        deferrals = int(ex.headers.get(DEFERRALS_HEADER) or 0)
        wait = min(remaining, 0.25 * 2.0 ** min(deferrals, 16))
        jitter = random.uniform(0.0, min(1.0, max(0.05, wait * 0.2)))
        return Decision(
            Kind.DEFER, countdown=wait + jitter, reason=f"duplicate of an in-flight execution ({self.record})"
        )

    def _store_failed(self, ex: Execution, exc: StoreUnavailable | None) -> Decision:
        """The store failed: run without a claim (``fail_open``) or defer the job."""
        if self.policy.on_store_error == "fail_open":
            self.unguarded = True
            ex.outcome.idempotency = "unguarded"
            log.warning("idempotency store unavailable; running unguarded (fail_open)")
            return RUN
        ex.outcome.idempotency = "store_unavailable"
        return Decision(
            Kind.DEFER,
            countdown=random.uniform(1.0, 5.0),
            reason="idempotency store unavailable",
            error=exc or StoreUnavailable("the idempotency store did not answer"),
        )

    # -- end ----------------------------------------------------------------------------

    def end(self, ex: Execution, outcome: Outcome) -> Sequence[EndOp]:
        if not self.token:
            if outcome.idempotency in (None, "claimed"):
                outcome.idempotency = "not_claimed"
            return ()
        claim = ex.claim
        if claim is not None:
            ex.runtime.heartbeat.untrack(claim)
        release: EndOp = (Release(self.record, self.owner, self.token, self.ttl_ms), None)
        if not outcome.body_ran or outcome.body_error is not None:
            return [release]  # never run, or failed: give the key back
        if outcome.degraded:
            return [release]  # a degraded answer is not the job done: free the key
        value = outcome.value
        payload = encode_capped(
            value, ex.runtime.max_result_bytes, "result not stored for replays", ex.encoded
        )
        if payload is None:
            if ex.encoded.get(id(value)) is None:
                # Not JSON: the call fails visibly (Celery cannot send it either); give
                # the key back so a resend runs and fails the same way.
                outcome.result_stored = False
                return [release]
            outcome.result_stored = False
            payload = "null"  # too big to replay: the job is done, a duplicate gets null
        # The record lives lease + ttl from its claim: in the first half of the lease, at
        # least ttl is left and the completion keeps its expiry (SET KEEPTTL).
        refresh = time.monotonic() - self.claimed_at > self.lease_s / 2
        complete = Complete(
            self.record, self.owner, self.token, payload, self.ttl_ms, ex.runtime.now_ms(), refresh
        )
        return [(complete, functools.partial(_completed, ex, self.token))]


def _completed(ex: Execution, token: int, answer: CompleteAnswer) -> None:
    if answer.stored:
        return
    if not answer.state:
        # The record is gone (the store lost its data, or an operator forgot it): nobody
        # else completed this key, and our body ran under a valid claim. Keep our result.
        ex.outcome.idempotency = "record_gone"
        ex.runtime.count("complete_record_gone")
        log.warning("claim token %s: the record vanished before completion; result kept", token)
        return
    ex.outcome.idempotency = "claim_lost"
    if answer.state == "done":
        ex.result = (loads(answer.result or "null"),)
        log.warning("claim token %s was lost; another execution completed first", token)
        return
    raise ClaimLost(f"claim token {token} was lost before completion (record is {answer.state})")
