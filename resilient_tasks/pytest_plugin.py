"""``-p resilient_tasks.pytest_plugin``: the same fixtures as ``resilient_tasks.testing``.

The plugin is opt-in: ``pytest_plugins = ["resilient_tasks.testing"]`` in the root
``conftest.py``, or ``-p resilient_tasks.testing`` (this name is kept for command lines
that already say it).
"""

from __future__ import annotations

from .testing import rt_redis, rt_redis_flushed

__all__ = ["rt_redis", "rt_redis_flushed"]
