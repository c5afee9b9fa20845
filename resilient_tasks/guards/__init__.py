"""The guard pipeline: plain callables ``(call, next) -> result`` run in order.

A guard may also have ``prepare(call) -> list[Op]`` to add its reads to the single
``begin`` round trip (answers via ``call.begin(guard)``), and ``abandon(call) -> list[Op]``
to undo what ``begin`` took when an earlier guard ended the call before it ran.
Guards let Celery's ``Retry``, ``Ignore`` and ``Reject`` pass through untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from ..call import Call
from ..store.base import Op

__all__ = ["PASS_THROUGH", "Guard", "Next", "run_chain"]

Next = Callable[[Call], Any]


class Guard(Protocol):
    def __call__(self, call: Call, next: Next) -> Any: ...


class Preparing(Protocol):
    def prepare(self, call: Call) -> list[Op]: ...

    def abandon(self, call: Call) -> list[Op]: ...


def run_chain(guards: Sequence[Guard], call: Call, body: Next) -> Any:
    """Call ``guards[0]`` with a ``next`` that walks the rest and ends in ``body``."""

    def step(index: int) -> Next:
        if index == len(guards):
            return body
        guard = guards[index]
        following = step(index + 1)

        def enter(c: Call) -> Any:
            c.entered.add(id(guard))
            return guard(c, following)

        return enter

    return step(0)(call)


def _pass_through() -> tuple[type[BaseException], ...]:
    from celery.exceptions import Ignore, Reject, Retry

    return (Retry, Ignore, Reject)


PASS_THROUGH: tuple[type[BaseException], ...] = _pass_through()
