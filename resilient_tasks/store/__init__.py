"""Shared state: the ``Store`` protocol of named operations, and its two implementations
(``RedisStore`` in Redis through redis-py, ``MemoryStore`` in this process)."""

from .memory import MemoryStore
from .protocol import Op, Store
from .redis import RedisStore

__all__ = ["MemoryStore", "Op", "RedisStore", "Store"]
