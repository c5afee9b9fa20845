"""This process's id, without a system call per look.

glibc stopped caching ``getpid()``, so each ``os.getpid()`` is a system call; the hot path
asks on every task (has the worker forked since these sockets and threads were made?).
The id is read once and again in each forked child.
"""

from __future__ import annotations

import os

__all__ = ["current_pid"]

_pid = os.getpid()


def _forked() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


def current_pid() -> int:
    """``os.getpid()``, kept up to date across ``os.fork`` (Celery's prefork uses it)."""
    return _pid
