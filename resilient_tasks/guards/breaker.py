"""Breaker guard: admission in ``begin``, the outcome recorded in ``end``.

A task whose downstream is open does not run and spends no retry: it is deferred to the
half-open time plus jitter (``when_open="defer"``, bounded by ``max_deferrals`` and the
deadline), answered from its fallback, or failed with ``CircuitOpen``. Operators'
switches ride in the same admission. While the store is unreachable this process's
``MemoryStore`` (``runtime.local``) decides alike (fail-open).

``downstream_call`` is the breaker of one block of a body (``self.downstream(name)``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from ..errors import CircuitOpen, StoreUnavailable
from ..keys import owner_id
from ..policy import BreakerPolicy, matches
from ..store.protocol import Admission, Admit, Op, Record, Recorded
from .base import DEFERRALS_HEADER, RUN, Decision, EndOp, Execution, Guard, Kind, Outcome, Stage, pass_through
from .tally import Tally

__all__ = ["BreakerGuard", "downstream_call", "outcome_of", "record_op", "refusal"]

log = logging.getLogger(__name__)


def outcome_of(policy: BreakerPolicy, failed: bool, duration: float | None) -> str:
    """``ok``/``fail``, with ``slow`` when the call took at least ``slow_call`` seconds."""
    slow = policy.slow_call is not None and duration is not None and duration >= policy.slow_call
    if slow:
        return "slowfail" if failed else "slow"
    return "fail" if failed else "ok"


def record_op(
    name: str,
    policy: BreakerPolicy,
    owner: str,
    outcome: str,
    *,
    probe: bool,
    first_attempt: bool,
    now_ms: int,
) -> Record:
    """One outcome (``none``: the call never reached the downstream) as a ``Record``."""
    return Record(
        downstream=name,
        policy=policy,
        owner=owner,
        ok=int(outcome == "ok"),
        fail=int(outcome == "fail"),
        slow=int(outcome == "slow"),
        slowfail=int(outcome == "slowfail"),
        first_attempts=int(first_attempt and outcome != "none"),
        probe=probe,
        now_ms=now_ms,
    )


def refusal(ex: Execution, name: str, policy: BreakerPolicy, retry_after: float) -> Decision:
    """What a task does when ``name`` refuses it: defer, fall back, or fail."""
    ex.outcome.rejected_by = name
    ex.runtime.count("rejected_open", name)
    rejection = CircuitOpen(name, retry_after)
    if policy.when_open == "defer":
        deferrals = int(ex.headers.get(DEFERRALS_HEADER) or 0)
        if deferrals < policy.max_deferrals:
            ex.runtime.count("deferred", name)
            jitter = random.uniform(0.0, min(5.0, 0.2 * retry_after) + 0.05)
            return Decision(
                Kind.DEFER, countdown=retry_after + jitter, reason=str(rejection), error=rejection
            )
    elif policy.when_open == "fallback" and ex.policy.fallback is not None:
        return Decision(Kind.FALLBACK, error=rejection)
    return Decision(Kind.FAIL, error=rejection)


def _local(ex: Execution, op: Any) -> Any:
    """``op`` answered by this process's in-memory stand-in (the store is unreachable)."""
    (answer,) = ex.runtime.local.batch([op])
    return answer


def _local_now(ex: Execution) -> int:
    return int(ex.runtime.clock() * 1000)


def _recorded(ex: Execution, name: str, answer: Recorded) -> None:
    if answer.transitioned:
        ex.outcome.transitions.append((name, answer.state))
        ex.runtime.count("transition", name)
        log.warning("breaker %r is now %s", name, answer.state)


class BreakerGuard(Guard):
    """Guards the task body with the breaker of ``TaskPolicy.downstream``."""

    stage = Stage.BREAKER

    def __init__(self, ex: Execution) -> None:
        self.name = ex.policy.downstream
        self.policy = ex.runtime.breaker_policy(self.name, ex.task, ex.policy) if self.name else None
        self.owner = owner_id()
        self.admission: Admission | None = None
        self.local = False
        #: This process's view of the breaker, when the policy flushes in batches.
        self.tally: Tally | None = None
        self.from_view = False
        #: Successes sent with the admission (given back if that trip fails).
        self.flushing: tuple[int, int] | None = None

    def begin(self, ex: Execution) -> Sequence[Op]:
        if self.name is None or self.policy is None:
            return ()
        if self.policy.flush_interval > 0:
            self.tally = ex.runtime.tally(self.name)
            view = self.tally.admits(self.policy.flush_interval)
            if view is not None:  # closed, learned moments ago: admitted here
                self.from_view = True
                self.admission = Admission("allow", "closed", 0, view.consecutive_failures)
                return ()
        admit = Admit(self.name, self.policy, self.owner, ex.runtime.now_ms())
        if self.tally is not None:
            # the view is stale: this trip asks anyway, so the successes waiting ride in it
            # (one trip per interval, not an admission and a flush)
            ok, firsts = self.tally.take()
            if ok:
                self.flushing = (ok, firsts)
                return [self._flush(self.name, self.policy, ok, firsts, admit.now_ms), admit]
        return [admit]

    def _flush(self, name: str, policy: BreakerPolicy, ok: int, firsts: int, now_ms: int) -> Record:
        """The successes this process counted and has not sent, as one ``Record``."""
        return Record(name, policy, self.owner, ok=ok, first_attempts=firsts, now_ms=now_ms)

    def decide(self, ex: Execution, answers: Sequence[Any] | None) -> Decision:
        name, policy = self.name, self.policy
        if name is None or policy is None:
            return RUN
        if self.from_view and self.admission is not None:
            seen = ex.outcome
            seen.breaker, seen.breaker_state = name, self.admission.state
            seen.consecutive_failures = self.admission.consecutive_failures
            return RUN
        if answers is None:
            if self.flushing is not None and self.tally is not None:
                self.tally.give_back(*self.flushing)
            self.local = True
            ex.runtime.count("breaker_local", name)
            log.warning("breaker %r: store unavailable, using the local breaker", name)
            admission: Admission = _local(ex, Admit(name, policy, self.owner, _local_now(ex)))
        else:
            if self.flushing is not None:
                recorded, admission = answers
                _recorded(ex, name, recorded)
            else:
                (admission,) = answers
            if self.tally is not None:
                self.tally.learn(admission.state, admission.switch, admission.consecutive_failures)
        self.admission = admission
        outcome = ex.outcome
        outcome.breaker, outcome.breaker_state = name, admission.state
        outcome.consecutive_failures = admission.consecutive_failures
        if admission.switch != "normal":
            outcome.switch = admission.switch
        ex.runtime.note_admission(name, admission)
        if admission.allowed:
            return RUN
        retry_after = admission.retry_after_ms / 1000.0
        if admission.switch == "fallback_only":
            ex.runtime.count("switch_fallback_only", name)
            return Decision(Kind.FALLBACK, error=CircuitOpen(name, retry_after))
        if admission.switch == "reject":
            ex.runtime.count("switch_reject", name)
            return Decision(Kind.FAIL, error=CircuitOpen(name, retry_after))
        if admission.switch != "normal":
            return refusal(ex, name, policy, retry_after or policy.open_for)
        return refusal(ex, name, policy, retry_after)

    def end(self, ex: Execution, outcome: Outcome) -> Sequence[EndOp]:
        name, policy, admission = self.name, self.policy, self.admission
        if name is None or policy is None or admission is None or not admission.allowed:
            return ()
        error = outcome.body_error
        if not outcome.body_ran or isinstance(error, (*pass_through(), CircuitOpen)):
            result = "none"
        elif error is not None and outcome.attributed.get(id(error), name) != name:
            result = "none"  # counted on the breaker of the block that raised it
        else:
            failed = error is not None and matches(policy.failure_on, error)
            result = outcome_of(policy, failed, outcome.body_seconds)
        outcome.breaker_outcome = result
        probe = admission.probe
        if result == "none" and not probe:
            return ()  # nothing reached the downstream and no probe lease to free
        first = ex.attempt == 0
        if self.local:
            now = _local_now(ex)
            recorded = _local(
                ex, record_op(name, policy, self.owner, result, probe=probe, first_attempt=first, now_ms=now)
            )
            if recorded.transitioned:
                log.warning("local breaker %r changed state", name)
            return ()
        tally = self.tally
        if tally is not None and result == "ok" and not probe and admission.state == "closed":
            # a success in the closed state: counted here, sent with others
            tally.add(first)
            if not tally.due(policy.flush_interval):
                return ()
            ok, firsts = tally.take()
            flush = self._flush(name, policy, ok, firsts, ex.runtime.now_ms())
            return [(flush, lambda answer: self._learned(ex, answer))]
        op = record_op(
            name, policy, self.owner, result, probe=probe, first_attempt=first, now_ms=ex.runtime.now_ms()
        )
        if tally is not None and not probe:  # a failure or a slow call: at once, with the waiting successes
            ok, firsts = tally.take()
            op = dataclasses.replace(op, ok=op.ok + ok, first_attempts=op.first_attempts + firsts)
            return [(op, lambda answer: self._learned(ex, answer))]
        return [(op, lambda answer: _recorded(ex, name, answer))]

    def _learned(self, ex: Execution, answer: Recorded) -> None:
        """A record's answer renews this process's view of the breaker."""
        assert self.tally is not None and self.name is not None
        self.tally.learn(answer.state, answer.switch, answer.consecutive_failures)
        _recorded(ex, self.name, answer)


@contextlib.contextmanager
def downstream_call(ex: Execution, name: str) -> Iterator[Admission]:
    """Guard one block of a body with the breaker ``name`` (admit, then record)."""
    runtime = ex.runtime
    policy = runtime.breaker_policy(name, ex.task, ex.policy)
    owner = owner_id()
    local = False
    try:
        (admission,) = runtime.store.batch([Admit(name, policy, owner, runtime.now_ms())])
    except StoreUnavailable as exc:
        local = True
        runtime.count("breaker_local", name)
        log.warning("breaker %r: store unavailable, using the local breaker: %s", name, exc)
        admission = _local(ex, Admit(name, policy, owner, _local_now(ex)))
    if not admission.allowed:
        raise CircuitOpen(name, admission.retry_after_ms / 1000.0)
    started = time.monotonic()
    error: BaseException | None = None
    try:
        yield admission
    except BaseException as exc:
        error = exc
        ex.outcome.attributed[id(exc)] = name
        raise
    finally:
        failed = (
            error is not None and not isinstance(error, pass_through()) and matches(policy.failure_on, error)
        )
        result = outcome_of(policy, failed, time.monotonic() - started)
        _record_now(ex, name, policy, owner, result, admission.probe, local)


def _record_now(
    ex: Execution, name: str, policy: BreakerPolicy, owner: str, result: str, probe: bool, local: bool
) -> None:
    first = ex.attempt == 0
    if not local:
        op = record_op(
            name, policy, owner, result, probe=probe, first_attempt=first, now_ms=ex.runtime.now_ms()
        )
        try:
            (answer,) = ex.runtime.store.batch([op])
        except StoreUnavailable:
            pass
        else:
            _recorded(ex, name, answer)
            return
    _local(
        ex, record_op(name, policy, owner, result, probe=probe, first_attempt=first, now_ms=_local_now(ex))
    )


def inner_refusal(ex: Execution) -> Callable[[CircuitOpen], Decision]:
    """How a ``CircuitOpen`` raised by ``self.downstream(name)`` in the body is handled:
    like a refusal of the task's own breaker, with ``name``'s policy."""

    def handle(exc: CircuitOpen) -> Decision:
        policy = ex.runtime.breaker_policy(exc.downstream, ex.task, ex.policy)
        return refusal(ex, exc.downstream, policy, exc.retry_after)

    return handle
