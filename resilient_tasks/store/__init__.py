"""Shared state: the ``Store`` protocol and its Redis implementation."""

from .base import Op, Store
from .redis import RedisStore

__all__ = ["Op", "RedisStore", "Store"]
