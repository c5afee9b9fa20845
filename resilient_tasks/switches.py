"""Operator controls for a downstream, kept in its breaker hash in Redis.

Every admission reads the switch in the same script, so a switch flipped on one machine
holds on every worker within ``flush_interval`` (a worker admitting calls from its own
view of the breaker learns it at its next round trip to it; with 0, at its next task):

- ``normal``: the breaker decides;
- ``fallback_only``: do not call the downstream, serve fallbacks (or fail);
- ``reject``: fail tasks for it at once with ``CircuitOpen``;
- ``breaker_disabled``: always call it, count outcomes, never trip;
- ``forced_open`` / ``forced_closed``: hold the breaker in that state.

``close`` (back to CLOSED, switch normal) and ``reset`` (forget everything) are actions.
"""

from __future__ import annotations

from typing import Any

from .errors import PolicyError
from .runtime import Runtime, runtime_for
from .store.protocol import Switch

__all__ = ["ACTIONS", "MODES", "breakers", "close_breaker", "reset_breaker", "set_switch"]

MODES = ("normal", "fallback_only", "reject", "breaker_disabled", "forced_open", "forced_closed")
ACTIONS = ("close", "reset")


def _runtime(target: Any) -> Runtime:
    return target if isinstance(target, Runtime) else runtime_for(target)


def _apply(target: Any, downstream: str, mode: str, source: str) -> tuple[str, bool]:
    runtime = _runtime(target)
    op = Switch(downstream, mode, source, runtime.now_ms())  # type: ignore[arg-type]
    (answer,) = runtime.store.batch([op])
    # this process's view of the breaker is stale now; other processes learn the switch
    # at their next round trip to the breaker (within BreakerPolicy.flush_interval)
    runtime.tally(downstream).forget()
    return answer.previous, answer.applied


def set_switch(target: Any, downstream: str, mode: str, *, source: str = "cli") -> str:
    """Set ``downstream``'s switch (``target``: a Celery app or a runtime); returns the
    previous mode. ``source="file"`` applies only a value the file changed."""
    if mode not in MODES:
        raise PolicyError("switch", f"must be one of {', '.join(MODES)}; got {mode!r}")
    return _apply(target, downstream, mode, source)[0]


def close_breaker(target: Any, downstream: str) -> str:
    """Back to CLOSED with the switch at ``normal`` (its window of outcomes is kept);
    returns the switch it had."""
    return _apply(target, downstream, "close", "cli")[0]


def reset_breaker(target: Any, downstream: str) -> str:
    """Forget ``downstream``'s window, state and switch: it starts CLOSED and empty;
    returns the switch it had."""
    return _apply(target, downstream, "reset", "cli")[0]


def breakers(target: Any) -> list[dict[str, Any]]:
    """Every breaker the store knows, as plain fields (read-only; for status tables)."""
    found = []
    for view in _runtime(target).store.breakers():
        fields: dict[str, Any] = dict(view.fields)
        fields.setdefault("name", view.downstream)
        found.append(fields)
    return found
