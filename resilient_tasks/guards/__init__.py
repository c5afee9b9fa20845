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
from ..store.protocol import Op

__all__ = ["PASS_THROUGH", "Guard", "Next", "link"]

Next = Callable[[Call], Any]


class Guard(Protocol):
    def __call__(self, call: Call, next: Next) -> Any: ...


class Preparing(Protocol):
    def prepare(self, call: Call) -> list[Op]: ...

    def abandon(self, call: Call) -> list[Op]: ...


def link(guards: Sequence[Guard], body: Next) -> Next:
    """``guards`` around ``body`` as one callable ``(call) -> result``, built once per
    chain: it holds no call, so a call leaves no reference cycle behind it (the cyclic
    garbage collector, not reference counting, would have to free it)."""
    following = body
    for guard in reversed(guards):
        following = _Enter(guard, following)
    return following


class _Enter:
    """One step of a linked chain: notes that the call reached ``guard``, then runs it."""

    __slots__ = ("following", "guard", "mark")

    def __init__(self, guard: Guard, following: Next) -> None:
        self.guard = guard
        self.following = following
        self.mark = id(guard)

    def __call__(self, call: Call) -> Any:
        call.entered.add(self.mark)
        return self.guard(call, self.following)


def _pass_through() -> tuple[type[BaseException], ...]:
    from celery.exceptions import Ignore, Reject, Retry

    return (Retry, Ignore, Reject)


PASS_THROUGH: tuple[type[BaseException], ...] = _pass_through()
