"""JSON for what we store (results, cached values): kombu's, so a replay or a cached value
equals what Celery itself would return (datetimes, UUIDs, decimals)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, cast

from kombu.utils import json as kombu_json

__all__ = ["dumps", "encode_capped", "loads"]

log = logging.getLogger(__name__)

#: kombu's ``dumps`` builds a new encoder per call (it passes ``cls``); one instance of the
#: same class with the same defaults writes the same text, for a third of the cost.
dumps = cast(Callable[[Any], str], kombu_json.JSONEncoder().encode)
loads = cast(Callable[[str], Any], kombu_json.loads)

#: JSON text of the values that need no encoder (the same text ``dumps`` writes).
_PLAIN: dict[Any, str] = {None: "null", True: "true", False: "false"}


def encode_capped(value: Any, limit: int, what: str, memo: dict[int, str | None] | None = None) -> str | None:
    """``value`` as JSON text, or None (logged) when it is not JSON or over ``limit`` bytes.

    ``memo`` (one per call) lets the idempotency record and the fallback cache share one
    encoding of the same result."""
    text: str | None
    if memo is not None and id(value) in memo:
        text = memo[id(value)]
    else:
        kind = type(value)
        try:
            if kind is int:
                text = str(value)
            elif kind is bool or value is None:
                text = _PLAIN[value]
            else:
                text = str(dumps(value))
        except (TypeError, ValueError) as exc:
            log.warning("%s: the value is not JSON-serialisable (%s)", what, exc)
            text = None
        if memo is not None:
            memo[id(value)] = text
    if text is None:
        return None
    size = len(text.encode())
    if size > limit:
        log.warning("%s: the value is %d bytes, over the limit of %d", what, size, limit)
        return None
    return text
