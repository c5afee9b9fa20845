"""One execution of a ``ResilientTask``, phase by phase.

1. ``begin``: every guard's reads, in one round trip;
2. ``decide``: in ``Stage`` order, the first decision that is not ``RUN`` answers the
   call: a replayed value, a deferral (no retry spent), a failure, or the fallback.
   ``CONFIRM`` (a claim put off while the downstream was believed to refuse) sends its
   ops right before the body, once every later guard has let the call through;
3. the body, wrapped by the guards' ``around`` (fallback outermost, then retry); a
   ``CircuitOpen`` from ``self.downstream(name)`` in the body is decided like a refusal
   of the task's own breaker;
4. ``end``: every guard's writes, in one round trip, each answer read back;
5. telemetry reads the typed ``Outcome``.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

from .errors import CircuitOpen, StoreUnavailable
from .guards.base import (
    DEADLINE_HEADER,
    Decision,
    EndOp,
    Env,
    Execution,
    Guard,
    Kind,
    current_execution,
)
from .guards.breaker import BreakerGuard, inner_refusal
from .guards.deadline import DeadlineGuard
from .guards.fallback import FallbackGuard
from .guards.idempotency import DURABLE_OPS, IdempotencyGuard
from .guards.retry import RetryGuard
from .guards.schedule import defer
from .memo import PerObject
from .policy import TaskPolicy
from .settings import DEFAULT_LEASE, task_lease
from .store.protocol import Op
from .telemetry import MetricsSink, report


class Host(Env, Protocol):
    """The runtime as the pipeline sees it: the guards' ``Env``, the effective policy
    of a task, and where telemetry goes (``runtime.Runtime`` is one)."""

    sinks: list[MetricsSink]

    def policy_for(self, task: Any) -> TaskPolicy: ...

__all__ = ["END_RETRY_PAUSES", "chain_for", "execute"]

log = logging.getLogger(__name__)

#: Pauses between tries of the ``end`` round trip (``None``: give up).
END_RETRY_PAUSES: tuple[float | None, ...] = (0.05, 0.25, None)


def _chain(policy: TaskPolicy) -> tuple[type[Guard], ...]:
    """The visible, ordered chain for one policy: only the guards it needs."""
    chain: list[type[Guard]] = [DeadlineGuard]
    if policy.idempotency is not None:
        chain.append(IdempotencyGuard)
    if policy.downstream is not None:
        chain.append(BreakerGuard)
    if policy.fallback is not None:
        chain.append(FallbackGuard)
    if policy.retry is not None:
        chain.append(RetryGuard)
    return tuple(chain)


class Phases(NamedTuple):
    """A policy's chain, and which of its guards take part in each phase (positions in
    the chain): a guard that keeps ``Guard``'s default for a phase is not called in it."""

    chain: tuple[type[Guard], ...]
    deciders: tuple[int, ...]
    readers: tuple[int, ...]
    wrappers: tuple[int, ...]
    writers: tuple[int, ...]


def _phases(policy: TaskPolicy) -> Phases:
    chain = _chain(policy)

    def taking(phase: str) -> tuple[int, ...]:
        return tuple(i for i, kind in enumerate(chain) if getattr(kind, phase) is not getattr(Guard, phase))

    return Phases(chain, taking("decide"), taking("begin"), taking("around"), taking("end"))


#: The phases of a policy's chain, worked out once.
phases_for: PerObject[Phases] = PerObject(_phases)


def chain_for(policy: TaskPolicy) -> tuple[type[Guard], ...]:
    """The chain for a policy (built once, with its phases)."""
    return phases_for(policy).chain


def execute(task: Any, runtime: Host, request: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Run ``task``'s body under its policy's guards; what Celery's ``__call__`` returns."""
    policy = runtime.policy_for(task)
    ex = Execution(task, policy, runtime, args, kwargs, request, _deadline(request, policy, runtime.clock()))
    phases = phases_for(policy)
    guards = [kind(ex) for kind in phases.chain]  # type: ignore[call-arg]
    token = current_execution.set(ex)
    try:
        try:
            result = _run(ex, guards, phases)
        except BaseException as exc:
            if phases.writers:
                _end(ex, guards, phases, failed=True)
            report(ex, exc, runtime.sinks)
            raise
        try:
            if phases.writers:
                _end(ex, guards, phases, failed=False)
        except BaseException as exc:
            report(ex, exc, runtime.sinks)
            raise
        report(ex, None, runtime.sinks)
        return ex.result[0] if ex.result is not None else result
    finally:
        current_execution.reset(token)


def _run(ex: Execution, guards: list[Guard], phases: Phases) -> Any:
    answers = _begin(ex, guards, phases.readers) if phases.readers else {}
    confirming: Guard | None = None
    for i in phases.deciders:
        guard = guards[i]
        decision = guard.decide(ex, answers.get(id(guard), ()))
        if decision.kind is Kind.RUN:
            continue
        if decision.kind is Kind.CONFIRM:
            confirming = guard
            continue
        return _enact(ex, guards, decision, answers)
    if confirming is not None:
        ops = list(confirming.confirm(ex))
        try:
            confirmed: Sequence[Any] | None = ex.runtime.store.batch(ops)
        except StoreUnavailable:
            confirmed = None
        decision = confirming.confirmed(ex, confirmed)
        if decision.kind is not Kind.RUN:
            return _enact(ex, guards, decision, answers)
    return _body(ex, guards, phases.wrappers, answers)


def _begin(ex: Execution, guards: list[Guard], readers: tuple[int, ...]) -> dict[int, Sequence[Any] | None]:
    """The ``begin`` ops of the guards that read, in one round trip; per guard its
    answers (None: the store failed)."""
    planned = []
    ops: list[Op] = []
    for i in readers:
        guard = guards[i]
        own = guard.begin(ex)
        planned.append((guard, len(own)))
        ops.extend(own)
    if not ops:
        return {}
    try:
        flat: list[Any] | None = ex.runtime.store.batch(ops)
    except StoreUnavailable as exc:
        log.info("begin round trip failed: %s", exc)
        flat = None
    answers: dict[int, Sequence[Any] | None] = {}
    start = 0
    for guard, count in planned:
        if count:
            answers[id(guard)] = None if flat is None else flat[start : start + count]
            start += count
    return answers


def _enact(
    ex: Execution, guards: list[Guard], decision: Decision, answers: dict[int, Sequence[Any] | None]
) -> Any:
    """Answer the call without its body, as ``decision`` says (``answers``: the begin
    trip's, by guard: a fallback fetched in advance is served from them)."""
    ex.outcome.stopped_by = decision.kind
    if decision.kind is Kind.REPLAY:
        return decision.value
    if decision.kind is Kind.DEFER:
        defer(ex, decision.countdown, decision.reason, decision.error)
    if decision.kind is Kind.FALLBACK:
        fallback = next((g for g in guards if isinstance(g, FallbackGuard)), None)
        assert decision.error is not None
        if fallback is None:
            raise decision.error
        return fallback.serve(ex, decision.error, answers.get(id(fallback)))
    assert decision.error is not None
    raise decision.error


def _body(
    ex: Execution, guards: list[Guard], wrappers: tuple[int, ...], answers: dict[int, Sequence[Any] | None]
) -> Any:
    outcome = ex.outcome

    def body() -> Any:
        outcome.body_ran = True
        started = time.monotonic()
        try:
            value = ex.task.run(*ex.args, **ex.kwargs)
        except BaseException as exc:
            outcome.body_error = exc
            raise
        finally:
            outcome.body_seconds = time.monotonic() - started
        outcome.value = value
        return value

    proceed: Callable[[], Any] = body
    for i in reversed(wrappers):
        proceed = functools.partial(guards[i].around, ex, proceed)
    if ex.policy.downstream is None and ex.policy.breaker is None:
        return proceed()
    try:
        return proceed()
    except CircuitOpen as exc:
        if outcome.body_error is not exc:
            raise
        return _enact(ex, guards, inner_refusal(ex)(exc), answers)


def _end(ex: Execution, guards: list[Guard], phases: Phases, *, failed: bool) -> None:
    """The writes of the guards that write, in one round trip, then each answer read back."""
    pairs: list[EndOp] = []
    for i in phases.writers:
        pairs.extend(guards[i].end(ex, ex.outcome))
    if not pairs:
        return
    ops = [op for op, _ in pairs]
    started = time.monotonic()
    answers: list[Any] | None = None
    # The side effect has happened: losing its completion would let a duplicate run it
    # again after the lease. Worth a few short tries (the writes are owner-checked, so a
    # repeat of one that did land is refused harmlessly). Only quick failures are tried
    # again: after a timeout the worker has waited long enough, and the lease covers it.
    for pause in END_RETRY_PAUSES:
        try:
            answers = ex.runtime.store.batch(ops)
            break
        except StoreUnavailable as exc:
            budget = ex.runtime.store_timeout() / 2
            if pause is None or time.monotonic() - started + pause > budget:
                _hand_over(ex, ops, exc)
                break
            time.sleep(pause)
    ex.outcome.end_ms = (time.monotonic() - started) * 1000
    if answers is None:
        return
    for (_, read), answer in zip(pairs, answers, strict=True):
        if read is None:
            continue
        if not failed:
            read(answer)
            continue
        try:  # the call already failed: reading an answer must not hide that error
            read(answer)
        except Exception as exc:
            log.warning("after a failed call, reading the store's answer failed: %s", exc)


def _hand_over(ex: Execution, ops: list[Op], exc: StoreUnavailable) -> None:
    durable: list[Op] = [op for op in ops if isinstance(op, DURABLE_OPS)]
    log.error(
        "could not record the outcome (%s ops) in the store: %s; %s handed to the background "
        "until the lease ends",
        len(ops),
        exc,
        len(durable),
    )
    ex.outcome.end = "store_unavailable"
    ex.runtime.count("end_lost")
    if durable:
        idempotency = ex.policy.idempotency
        lease = task_lease(ex.task, ex.task.app, idempotency) if idempotency is not None else DEFAULT_LEASE
        ex.runtime.heartbeat.hand_over(durable, lease)


def _deadline(request: Any, policy: TaskPolicy, now: float) -> float | None:
    candidates = []
    carried = (request.headers or {}).get(DEADLINE_HEADER)
    if carried is not None:
        candidates.append(float(carried))
    elif policy.deadline is not None:
        candidates.append(now + policy.deadline)
    expires = getattr(request, "expires", None)
    if expires is not None:
        at = _parse_expires(expires)
        if at is not None:
            candidates.append(at)
    return min(candidates) if candidates else None


def _parse_expires(value: Any) -> float | None:
    """Celery's ``expires`` header (ISO text or datetime) as an epoch timestamp."""
    if value is None:
        return None
    from datetime import datetime

    if isinstance(value, datetime):
        return value.timestamp()
    try:
        return datetime.fromisoformat(str(value)).timestamp()
    except ValueError:
        return None
