"""HMAC seals on cached values, for a store Redis that other writers can reach.

With a key set (``install(..., hmac_key=...)`` or ``RESILIENT_TASKS_HMAC_KEY``), a cached
fallback is stored as ``v1.<hmac>.<json>``, the MAC covering the Redis key too, so a value
forged or moved from another key is refused (served as absent) instead of trusted.
"""

from __future__ import annotations

import hashlib
import hmac

__all__ = ["seal", "unseal"]

_PREFIX = "v1."


def _mac(secret: bytes, key: str, text: str) -> str:
    return hmac.new(secret, key.encode() + b"\0" + text.encode(), hashlib.sha256).hexdigest()


def seal(secret: bytes | None, key: str, text: str) -> str:
    """``text`` as stored: unchanged without a secret, else prefixed by its MAC."""
    if not secret:
        return text
    return f"{_PREFIX}{_mac(secret, key, text)}.{text}"


def unseal(secret: bytes | None, key: str, stored: str) -> str | None:
    """The JSON text of a stored value, or None when its seal is missing or wrong."""
    if not secret:
        return stored
    if not stored.startswith(_PREFIX):
        return None
    mac, _, text = stored[len(_PREFIX) :].partition(".")
    return text if hmac.compare_digest(mac, _mac(secret, key, text)) else None
