"""The store protocol: what the guards need from shared state, and nothing more.

Guards describe work as ``Op`` values (a script name, its keys, its arguments); the store
runs a batch of them in one round trip. Keeping ops as data lets the task gather every
guard's reads into one ``begin`` trip and every write into one ``end`` trip.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

__all__ = ["Op", "Store", "as_text"]


class Op(NamedTuple):
    """One script call: ``keys`` must share a hash slot (one ``{tag}``). Immutable; a
    tuple, not a frozen dataclass, because a task builds several per call."""

    script: str
    keys: tuple[str, ...]
    args: tuple[str | int | float, ...]


def as_text(value: Any) -> str:
    """A script's answer as text (Redis hands back bytes)."""
    return value.decode() if isinstance(value, bytes) else str(value)


class Store(Protocol):
    """Shared state for a fleet of workers."""

    prefix: str

    def run(self, ops: Sequence[Op]) -> list[Any]:
        """Run ``ops`` in one round trip; results in order. Raises ``StoreUnavailable``."""
        ...

    def key(self, kind: str, tag: str, *suffix: str) -> str:
        """A key under the prefix; ``tag`` is the hash tag shared by one record's keys."""
        ...

    def ping(self) -> None:
        """Raise ``StoreUnavailable`` unless the store answers."""
        ...
