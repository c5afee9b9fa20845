"""``ResilientTask``: a Celery ``Task`` with one attribute (``policy``) and one override.

``__call__`` hands a message's execution to ``pipeline.execute`` (the guards, phase by
phase). A direct call (``task(x)``, in a test or nested in another body) is Celery's own
``Task.__call__``: no guards, the body sees its arguments and itself as
``current_task``. Nothing about an execution is stored on the task instance, which
Celery shares between every call in a process.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
from typing import Any, ClassVar

from celery import Task

from .errors import PolicyError
from .guards.base import ClaimHandle, current_execution
from .guards.breaker import downstream_call
from .pipeline import execute
from .policy import TaskPolicy
from .runtime import runtime_for
from .settings import check_visibility_timeout
from .store.protocol import Admission

__all__ = ["ResilientTask"]

#: The messages (task name, id) whose execution runs in this context: a task that calls
#: itself directly from its body sees the outer message's request (Celery's direct call
#: copies it) and must not run the guards again with it.
_executing: contextvars.ContextVar[frozenset[tuple[str, str]]] = contextvars.ContextVar(
    "rt_executing", default=frozenset()
)


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
    #: Marks our tasks for the settings checks (which import nothing of this module).
    resilient: ClassVar[bool] = True
    #: A killed worker's message comes back (idempotency makes the second run safe).
    acks_late = True
    reject_on_worker_lost = True
    #: JSON only: a message that can run code when it is decoded is never accepted.
    serializer = "json"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        policy = cls.__dict__.get("policy", cls.policy)
        if not isinstance(policy, TaskPolicy):
            raise PolicyError(f"{cls.__name__}.policy", f"must be a TaskPolicy, got {policy!r}")
        _check_key_arguments(cls, policy)
        if policy.retry is not None or "autoretry_for" in cls.__dict__:
            _refuse_autoretry(cls)

    @classmethod
    def bind(cls, app: Any) -> Any:
        """Registration: also refuse waits the Redis broker would redeliver early."""
        bound = super().bind(app)
        _refuse_autoretry(cls)
        check_visibility_timeout(app, [cls])
        return bound

    def downstream(self, name: str) -> contextlib.AbstractContextManager[Admission]:
        """Guard one call inside the body with the fleet-wide breaker ``name``.

        Raises ``CircuitOpen`` when it is open; the task then defers, falls back or fails
        as the breaker policy says, without spending a retry.
        """
        ex = current_execution.get()
        if ex is None:
            raise RuntimeError("self.downstream() guards calls inside a running task body")
        return downstream_call(ex, name)

    @property
    def idempotency(self) -> ClaimHandle:
        """This execution's claim: ``token`` for fencing, ``lost``/``check()`` for takeovers."""
        ex = current_execution.get()
        if ex is None or ex.claim is None:
            raise RuntimeError("no idempotency claim: the task has no IdempotencyPolicy, or is not running")
        return ex.claim

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        running = _executing.get()
        message = (self.name, str(request.id))
        if request.called_directly or message in running:
            return super().__call__(*args, **kwargs)  # Celery's own: a direct call
        token = _executing.set(running | {message})
        try:
            return execute(self, runtime_for(self.app), request, tuple(args), dict(kwargs))
        finally:
            _executing.reset(token)


def _refuse_autoretry(cls: type) -> None:
    """One retry system: Celery's ``autoretry_for`` would retry behind the guards' back
    (no idempotency check, no budget, no deadline)."""
    if getattr(cls, "autoretry_for", ()):
        raise PolicyError(
            f"{cls.__name__}.autoretry_for",
            "a ResilientTask retries through its policy: use TaskPolicy(retry=RetryPolicy(retry_on=...))",
        )
