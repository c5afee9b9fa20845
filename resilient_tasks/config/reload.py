"""Re-read the policies file in a running worker without ever failing a job.

A running worker takes breaker settings (``[defaults.breaker]``, ``[downstreams.X]``,
``[tasks."name".breaker]``) and ``[switches]`` from a changed file; retry, idempotency,
fallback and task scalars change how in-flight messages are handled, so they wait for a
restart. Any bad file (shape, encoding, a rule a task breaks) keeps the last good
policies and is reported as one error text.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from ..policy import TaskPolicy
from .check import ExtraCheck, check
from .file import PolicyFile, load
from .problems import PolicyFileError

__all__ = ["Reload", "live", "reload"]

LIVE = "breaker"


@dataclass(frozen=True)
class Reload:
    """What a reload gives: the policies in force now, why a changed file was refused
    (``error``), and the changes that wait for a restart (``pending``)."""

    file: PolicyFile
    changed: bool = False
    error: str | None = None
    pending: tuple[str, ...] = ()
    mtime: float | None = None  # of the file read, taken or refused


def _without_live(table: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in table.items() if k != LIVE}


def _with_live(kept: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    table = _without_live(kept)
    if LIVE in new:
        table[LIVE] = new[LIVE]
    return table


def live(old: PolicyFile, new: PolicyFile) -> tuple[PolicyFile, tuple[str, ...]]:
    """The file a running worker uses after ``new`` was read over ``old``, and the
    changes it leaves for a restart."""
    pending: list[str] = []
    if _without_live(old.defaults) != _without_live(new.defaults):
        pending.append("[defaults] (other than [defaults.breaker])")
    tasks: dict[str, dict[str, Any]] = {}
    for name in sorted(set(old.tasks) | set(new.tasks)):
        before, after = old.tasks.get(name, {}), new.tasks.get(name, {})
        if _without_live(before) != _without_live(after):
            pending.append(f'[tasks."{name}"] (other than its breaker table)')
        table = _with_live(before, after)
        if table:
            tasks[name] = table
    current = replace(new, defaults=_with_live(old.defaults, new.defaults), tasks=tasks)
    return current, tuple(pending)


def reload(
    last: PolicyFile,
    path: str | os.PathLike[str] | None = None,
    *,
    tasks: Mapping[str, TaskPolicy] | None = None,
    extra: ExtraCheck | None = None,
) -> Reload:
    """Read the file again (``path``, else the last one's); never raises.

    With ``tasks``, the file that would be in force is checked against them too, so a
    reload cannot give a task a policy that fails its calls."""
    location = os.fspath(path) if path is not None else last.path
    try:
        new = load(location)
        current, pending = live(last, new)
        if tasks is not None:
            check(current, tasks, extra=extra).raise_errors()
    except PolicyFileError as exc:
        return Reload(last, error=str(exc), mtime=_mtime(location))
    except Exception as exc:  # whatever else went wrong, a job must not pay for it
        error = f"{location}: reload failed: {type(exc).__name__}: {exc}"
        return Reload(last, error=error, mtime=_mtime(location))
    if replace(current, mtime=last.mtime) == last:
        return Reload(last, mtime=new.mtime)
    return Reload(current, changed=True, pending=pending, mtime=new.mtime)


def _mtime(location: str) -> float | None:
    try:
        return os.stat(location).st_mtime
    except (OSError, ValueError):
        return None
