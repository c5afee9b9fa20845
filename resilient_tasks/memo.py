"""Values worked out once per policy object, on the hot path.

Policies are frozen dataclasses, so they could key an ``lru_cache``, but hashing a nested
policy on every call costs more than the work saved. These caches key on object identity
and keep the object itself, so a recycled ``id`` never returns another object's value.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

__all__ = ["PerObject"]

T = TypeVar("T")


class PerObject(Generic[T]):
    """``make(obj, *extra)`` once per (``obj``, ``extra``); emptied past ``limit`` entries."""

    def __init__(self, make: Callable[..., T], limit: int = 4096) -> None:
        self._make = make
        self._limit = limit
        self._found: dict[tuple[int, tuple[Hashable, ...]], tuple[Any, T]] = {}

    def __call__(self, obj: Any, *extra: Hashable) -> T:
        key = (id(obj), extra)
        found = self._found.get(key)
        if found is None or found[0] is not obj:
            if len(self._found) > self._limit:
                self._found.clear()
            found = self._found[key] = (obj, self._make(obj, *extra))
        return found[1]
