"""Breaker guard: admission in ``begin``, the outcome recorded in ``end``.

A task whose downstream is open does not run and spends no retry: it is deferred to the
half-open time plus jitter (``when_open="defer"``, bounded by ``max_deferrals`` and the
deadline), served from fallback, or failed with ``CircuitOpen``. While the store is
unreachable this process's ``MemoryStore`` (``runtime.local``) decides alike (fail-open).
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Iterator
from typing import Any

from ..call import DEFERRALS_HEADER, Call
from ..errors import CircuitOpen, StoreUnavailable
from ..keys import owner_id
from ..policy import BreakerPolicy, matches
from ..schedule import defer
from ..store.protocol import Admission, Admit, Op, Record, Recorded
from . import PASS_THROUGH, Next
from .fallback import serve_fallback

__all__ = ["BreakerGuard", "downstream_call", "on_open", "outcome_of", "record_op", "task_breaker"]

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


def task_breaker(call: Call) -> tuple[str, BreakerPolicy] | None:
    """The breaker guarding the whole body: its name and effective policy."""
    name = call.policy.downstream
    if name is None:
        return None
    return name, call.runtime.breaker_policy(name, call.policy)


def on_open(call: Call, name: str, policy: BreakerPolicy, retry_after: float) -> Any:
    """What a task does when ``name`` refuses it: defer, fall back, or fail."""
    call.outcome["breaker_rejected"] = name
    call.runtime.count("rejected_open", name)
    rejection = CircuitOpen(name, retry_after)
    if policy.when_open == "defer":
        deferrals = int(call.headers.get(DEFERRALS_HEADER) or 0)
        if deferrals < policy.max_deferrals:
            call.runtime.count("deferred", name)
            jitter = random.uniform(0.0, min(5.0, 0.2 * retry_after) + 0.05)
            defer(call, retry_after + jitter, str(rejection), rejection)
    elif policy.when_open == "fallback" and call.policy.fallback is not None:
        return serve_fallback(call, rejection)
    raise rejection


def on_switch(call: Call, name: str, policy: BreakerPolicy, admission: Admission) -> Any:
    """An operator's degrade switch: serve fallbacks only, reject, or hold the breaker open."""
    call.outcome["switch"] = admission.switch
    if admission.switch == "fallback_only":
        call.runtime.count("switch_fallback_only", name)
        return serve_fallback(call, CircuitOpen(name, admission.retry_after_ms / 1000.0))
    if admission.switch == "reject":
        call.runtime.count("switch_reject", name)
        raise CircuitOpen(name, admission.retry_after_ms / 1000.0)
    return on_open(call, name, policy, admission.retry_after_ms / 1000.0 or policy.open_for)


class BreakerGuard:
    """Guards the task body with the breaker of ``TaskPolicy.downstream``."""

    def prepare(self, call: Call) -> list[Op]:
        found = task_breaker(call)
        if found is None:
            return []
        name, policy = found
        call.breaker_owner = owner_id()
        return [Admit(name, policy, call.breaker_owner, call.runtime.now_ms())]

    def abandon(self, call: Call) -> list[Op]:
        """A replayed or deferred call frees the probe lease it was handed."""
        found = task_breaker(call)
        answers = call.begin(self) if found is not None else []
        admission: Admission | None = answers[0] if answers else None
        if admission is None or not admission.probe or found is None:
            return []
        name, policy = found
        return [
            record_op(
                name,
                policy,
                call.breaker_owner,
                "none",
                probe=True,
                first_attempt=False,
                now_ms=call.runtime.now_ms(),
            )
        ]

    def __call__(self, call: Call, next: Next) -> Any:
        found = task_breaker(call)
        if found is None:
            return self._inner_open(call, next)
        name, policy = found
        try:
            (admission,) = call.begin(self)
        except StoreUnavailable as exc:
            call.breaker_local = True
            call.runtime.count("breaker_local", name)
            log.warning("breaker %r: store unavailable, using the local breaker: %s", name, exc)
            admission = _local(call, Admit(name, policy, call.breaker_owner, _local_now(call)))
        call.admission = admission
        call.outcome["breaker_state"] = admission.state
        if admission.switch != "normal":
            call.outcome["switch"] = admission.switch
        call.outcome["consecutive_failures"] = admission.consecutive_failures
        call.runtime.note_admission(name, admission)
        if not admission.allowed:
            if admission.switch != "normal":
                return on_switch(call, name, policy, admission)
            return on_open(call, name, policy, admission.retry_after_ms / 1000.0)
        try:
            result = self._inner_open(call, next)
        except BaseException:
            self._record(call, name, policy)
            raise
        self._record(call, name, policy)
        return result

    def _inner_open(self, call: Call, next: Next) -> Any:
        """A ``CircuitOpen`` from ``self.downstream(...)`` in the body is handled alike."""
        try:
            return next(call)
        except CircuitOpen as exc:
            if call.body_error is not exc:
                raise
            policy = call.runtime.breaker_policy(exc.downstream, call.policy)
            return on_open(call, exc.downstream, policy, exc.retry_after)

    def _record(self, call: Call, name: str, policy: BreakerPolicy) -> None:
        error = call.body_error
        if not call.body_ran or isinstance(error, (*PASS_THROUGH, CircuitOpen)):
            outcome = "none"
        elif error is not None and call.attributed.get(id(error), name) != name:
            outcome = "none"  # counted on the breaker of the block that raised it
        else:
            failed = error is not None and matches(policy.failure_on, error)
            outcome = outcome_of(policy, failed, call.body_seconds)
        call.outcome["breaker_outcome"] = outcome
        probe = call.admission is not None and call.admission.probe
        first = call.attempt == 0
        if outcome == "none" and not probe:
            return  # nothing reached the downstream and no probe lease to free
        if call.breaker_local:
            recorded = _local(
                call,
                record_op(
                    name, policy, call.breaker_owner, outcome, probe=probe, first_attempt=first,
                    now_ms=_local_now(call),
                ),
            )  # fmt: skip
            if recorded.transitioned:
                log.warning("local breaker %r changed state", name)
            return
        call.at_end(
            record_op(
                name,
                policy,
                call.breaker_owner,
                outcome,
                probe=probe,
                first_attempt=first,
                now_ms=call.runtime.now_ms(),
            ),
            lambda done, answer: _recorded(done, name, answer),
        )


@contextlib.contextmanager
def downstream_call(call: Call, name: str) -> Iterator[Admission]:
    """Guard one block of a body with the breaker ``name`` (admit, then record)."""
    runtime = call.runtime
    policy = runtime.breaker_policy(name, call.policy)
    owner = owner_id()
    local = False
    try:
        (admission,) = runtime.store.batch([Admit(name, policy, owner, runtime.now_ms())])
    except StoreUnavailable as exc:
        local = True
        runtime.count("breaker_local", name)
        log.warning("breaker %r: store unavailable, using the local breaker: %s", name, exc)
        admission = _local(call, Admit(name, policy, owner, _local_now(call)))
    if not admission.allowed:
        raise CircuitOpen(name, admission.retry_after_ms / 1000.0)
    started = time.monotonic()
    error: BaseException | None = None
    try:
        yield admission
    except BaseException as exc:
        error = exc
        call.attributed[id(exc)] = name
        raise
    finally:
        failed = (
            error is not None and not isinstance(error, PASS_THROUGH) and matches(policy.failure_on, error)
        )
        outcome = outcome_of(policy, failed, time.monotonic() - started)
        _record_now(call, name, policy, owner, outcome, admission.probe, local)


def _record_now(
    call: Call, name: str, policy: BreakerPolicy, owner: str, outcome: str, probe: bool, local: bool
) -> None:
    runtime = call.runtime
    first = call.attempt == 0
    if not local:
        op = record_op(
            name, policy, owner, outcome, probe=probe, first_attempt=first, now_ms=runtime.now_ms()
        )
        try:
            (answer,) = runtime.store.batch([op])
        except StoreUnavailable:
            local = True
        else:
            _recorded(call, name, answer)
            return
    _local(
        call,
        record_op(name, policy, owner, outcome, probe=probe, first_attempt=first, now_ms=_local_now(call)),
    )


def _local_now(call: Call) -> int:
    return int(call.runtime.clock() * 1000)


def _local(call: Call, op: Any) -> Any:
    """``op`` answered by this process's in-memory stand-in (the store is unreachable)."""
    (answer,) = call.runtime.local.batch([op])
    return answer


def _recorded(call: Call, name: str, answer: Recorded) -> None:
    state = answer.state
    if answer.transitioned:
        call.outcome.setdefault("breaker_transitions", []).append((name, state))
        if name == call.policy.downstream:
            call.outcome["breaker_transition"] = state
        call.runtime.count("transition", name)
        log.warning("breaker %r is now %s", name, state)
