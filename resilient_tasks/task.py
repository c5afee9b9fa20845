"""``ResilientTask``: a Celery ``Task`` with one attribute (``policy``) and one override.

``__call__`` builds a ``Call`` for this execution, runs the guard chain around ``run``,
and flushes the guards' writes in one round trip. Nothing about a call is stored on the
task instance, which Celery shares between every call in a process.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
from collections.abc import Callable
from typing import Any, ClassVar

from celery import Task

from .call import DEADLINE_HEADER, Call, ClaimHandle, current_call
from .errors import PolicyError, StoreUnavailable
from .guards import link
from .guards.breaker import BreakerGuard, downstream_call
from .guards.deadline import deadline_guard
from .guards.fallback import _GUARD as FALLBACK_GUARD
from .guards.idempotency import DEFAULT_LEASE, DURABLE_OPS, IdempotencyGuard
from .guards.retry import retry_guard
from .memo import PerObject
from .policy import TaskPolicy
from .runtime import check_visibility_timeout, parse_expires, runtime_for
from .store.protocol import Admission
from .telemetry import telemetry_guard

__all__ = ["ResilientTask", "build_chain"]

log = logging.getLogger(__name__)

_IDEMPOTENCY = IdempotencyGuard()
#: Pauses between tries of the ``end`` round trip (``None``: give up).
END_RETRY_PAUSES: tuple[float | None, ...] = (0.05, 0.25, None)
_BREAKER = BreakerGuard()
_FALLBACK = FALLBACK_GUARD


Chain = tuple[Callable[..., Any], ...]


def _chains(policy: TaskPolicy) -> tuple[Chain, Callable[[Call], Any]]:
    """The guards of ``policy``'s chain that add ops to ``begin``, and the chain linked
    around the body (built once per policy object)."""
    chain = build_chain(policy)
    return tuple(g for g in chain if hasattr(g, "prepare")), link(chain, _body)


_chain_entry = PerObject(_chains)


def build_chain(policy: TaskPolicy) -> tuple[Callable[..., Any], ...]:
    """The visible, ordered chain for one policy: only the guards it needs."""
    chain: list[Callable[..., Any]] = [telemetry_guard, deadline_guard]
    if policy.idempotency is not None:
        chain.append(_IDEMPOTENCY)
    if policy.downstream is not None or policy.breaker is not None:
        chain.append(_BREAKER)
    if policy.fallback is not None:
        chain.append(_FALLBACK)
    if policy.retry is not None:
        chain.append(retry_guard)
    return tuple(chain)


def _check_key_arguments(cls: type, policy: TaskPolicy) -> None:
    """Argument names in an idempotency or fallback key must exist on ``run``."""
    run = cls.__dict__.get("run")
    if run is None:
        return
    func = run.__func__ if isinstance(run, staticmethod) else run
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    for label, sub in (("idempotency", policy.idempotency), ("fallback", policy.fallback)):
        key = getattr(sub, "key", None)
        if isinstance(key, tuple):
            unknown = [name for name in key if name not in params]
            if unknown:
                owner = label.capitalize() + "Policy"
                raise PolicyError(
                    f"{owner}.key",
                    f"{', '.join(unknown)} is not an argument of {cls.__name__}.run",
                )


class ResilientTask(Task):  # type: ignore[misc]
    """Subclass it, or pass ``base=ResilientTask``, and state a ``policy``."""

    policy: ClassVar[TaskPolicy] = TaskPolicy()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        policy = cls.__dict__.get("policy", cls.policy)
        if not isinstance(policy, TaskPolicy):
            raise PolicyError(f"{cls.__name__}.policy", f"must be a TaskPolicy, got {policy!r}")
        _check_key_arguments(cls, policy)

    @classmethod
    def bind(cls, app: Any) -> Any:
        """Registration: also refuse waits the Redis broker would redeliver early."""
        bound = super().bind(app)
        check_visibility_timeout(app, [cls])
        return bound

    def downstream(self, name: str) -> contextlib.AbstractContextManager[Admission]:
        """Guard one call inside the body with the fleet-wide breaker ``name``.

        Raises ``CircuitOpen`` when it is open; the task then defers, falls back or fails
        as the breaker policy says, without spending a retry.
        """
        call = current_call.get()
        if call is None:
            raise RuntimeError("self.downstream() guards calls inside a running task body")
        return downstream_call(call, name)

    @property
    def idempotency(self) -> ClaimHandle:
        """This execution's claim: ``token`` for fencing, ``lost``/``check()`` for takeovers."""
        call = current_call.get()
        if call is None or call.claim is None:
            raise RuntimeError("no idempotency claim: the task has no IdempotencyPolicy, or is not running")
        return call.claim

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        if request.called_directly:
            return self.run(*args, **kwargs)
        runtime = runtime_for(self.app)
        policy = runtime.policy_for(self)
        headers = dict(request.headers or {})
        call = Call(
            task=self,
            policy=policy,
            runtime=runtime,
            args=tuple(args),
            kwargs=dict(kwargs),
            headers=headers,
            deadline=_deadline(headers, request, policy, runtime.clock()),
            celery_request=request,
        )
        call.preparers, chain = _chain_entry(policy)
        token = current_call.set(call)
        try:
            result = chain(call)
        except BaseException as exc:
            _finish(call, failed=True)
            _report(call, exc)
            raise
        finally:
            current_call.reset(token)
        try:
            _finish(call, failed=False)
        except BaseException as exc:
            _report(call, exc)
            raise
        _report(call, None)
        return call.result if call.has_result else result


def _body(call: Call) -> Any:
    """The task's own ``run``, timed, its exception noted for the breaker."""
    hook, call.before_body = call.before_body, None
    if hook is not None:
        hook()  # may end the call before the body (a claim that was refused)
    call.body_ran = True
    started = time.monotonic()
    try:
        return call.task.run(*call.args, **call.kwargs)
    except BaseException as exc:
        call.body_error = exc
        raise
    finally:
        call.body_seconds = time.monotonic() - started


def _report(call: Call, error: BaseException | None) -> None:
    for finalizer in call.finalizers:
        finalizer(call, error)


def _deadline(headers: dict[str, Any], request: Any, policy: TaskPolicy, now: float) -> float | None:
    candidates = []
    carried = headers.get(DEADLINE_HEADER)
    if carried is not None:
        candidates.append(float(carried))
    elif policy.deadline is not None:
        candidates.append(now + policy.deadline)
    expires = parse_expires(getattr(request, "expires", None))
    if expires is not None:
        candidates.append(expires)
    return min(candidates) if candidates else None


def _finish(call: Call, *, failed: bool) -> None:
    """Send every queued write in one round trip, then let the guards read the answers."""
    for guard in call.preparers:
        if id(guard) not in call.entered and call.begun_by(guard):
            call.end_ops.extend((op, None) for op in guard.abandon(call))
    if not call.end_ops:
        return
    ops = [op for op, _ in call.end_ops]
    started = time.monotonic()
    answers: list[Any] | None = None
    # The side effect has happened: losing its completion would let a duplicate run it
    # again after the lease. Worth a few short tries (the writes are owner-checked, so a
    # repeat of one that did land is refused harmlessly).
    # Only quick failures (a reset, a refused connection) are tried again: after a
    # timeout the worker has waited long enough, and the lease covers what is lost.
    budget = call.runtime.store_timeout() / 2
    for pause in END_RETRY_PAUSES:
        try:
            answers = call.runtime.store.batch(ops)
            break
        except StoreUnavailable as exc:
            if pause is None or time.monotonic() - started + pause > budget:
                durable = [op for op in ops if isinstance(op, DURABLE_OPS)]
                log.error(
                    "could not record the outcome (%s ops) in the store: %s; %s handed to the "
                    "background until the lease ends",
                    len(ops),
                    exc,
                    len(durable),
                )
                call.outcome["end"] = "store_unavailable"
                call.runtime.count("end_lost")
                if durable:
                    call.runtime.heartbeat.hand_over(durable, call.lease_s or DEFAULT_LEASE)
                break
            time.sleep(pause)
    call.outcome["end_ms"] = (time.monotonic() - started) * 1000
    if answers is None:
        return
    for (_, callback), answer in zip(call.end_ops, answers, strict=True):
        if callback is None:
            continue
        if not failed:
            callback(call, answer)
            continue
        try:  # the call already failed: a callback must not hide that error
            callback(call, answer)
        except Exception as exc:
            log.warning("after a failed call, reading the store's answer failed: %s", exc)
