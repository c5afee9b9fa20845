"""Operator controls for a downstream, kept in its breaker hash in Redis.

Every admission reads the switch in the same script, so a switch flipped on one machine
holds on every worker at its next task, with no extra round trip:

- ``normal``: the breaker decides;
- ``fallback_only``: do not call the downstream, serve fallbacks (or fail);
- ``reject``: fail tasks for it at once with ``CircuitOpen``;
- ``breaker_disabled``: always call it, count outcomes, never trip;
- ``forced_open`` / ``forced_closed``: hold the breaker in that state.

``close`` (back to CLOSED, switch normal) and ``reset`` (forget everything) are actions.
"""

from __future__ import annotations

from typing import Any

from .breaker import BREAKER_TTL_MS, breaker_key
from .errors import PolicyError
from .runtime import Runtime, runtime_for
from .store.base import Op, as_text

__all__ = ["ACTIONS", "MODES", "breakers", "close_breaker", "reset_breaker", "set_switch"]

MODES = ("normal", "fallback_only", "reject", "breaker_disabled", "forced_open", "forced_closed")
ACTIONS = ("close", "reset")


def _runtime(target: Any) -> Runtime:
    return target if isinstance(target, Runtime) else runtime_for(target)


def _apply(target: Any, downstream: str, mode: str, source: str) -> tuple[str, bool]:
    runtime = _runtime(target)
    store = runtime.store
    args = (mode, downstream, runtime.now_ms(), BREAKER_TTL_MS, source)
    (answer,) = store.run([Op("set_switch", (breaker_key(store, downstream),), args)])
    previous = as_text(answer[0])
    return previous, bool(int(answer[1]))


def set_switch(target: Any, downstream: str, mode: str, *, source: str = "cli") -> str:
    """Set ``downstream``'s switch (``target``: a Celery app or a runtime); returns the
    previous mode. ``source="file"`` applies only a value the file changed."""
    if mode not in MODES:
        raise PolicyError("switch", f"must be one of {', '.join(MODES)}; got {mode!r}")
    return _apply(target, downstream, mode, source)[0]


def close_breaker(target: Any, downstream: str) -> None:
    """Back to CLOSED with the switch at ``normal`` (its window of outcomes is kept)."""
    _apply(target, downstream, "close", "cli")


def reset_breaker(target: Any, downstream: str) -> None:
    """Forget ``downstream``'s window, state and switch: it starts CLOSED and empty."""
    _apply(target, downstream, "reset", "cli")


def breakers(target: Any) -> list[dict[str, Any]]:
    """Every breaker the store knows, as plain fields (read-only; for status tables)."""
    runtime = _runtime(target)
    store = runtime.store
    client = getattr(store, "client", None)
    if client is None:
        return []
    found = []
    for key in client.scan_iter(f"{store.prefix}:brk:*", count=500):
        raw = client.hgetall(key)
        fields = {k.decode(): v.decode() for k, v in raw.items()}
        fields["key"] = key.decode()
        found.append(fields)
    return sorted(found, key=lambda f: f.get("name", ""))
