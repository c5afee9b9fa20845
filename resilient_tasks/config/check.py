"""Check a whole policies file against the tasks a worker registers.

Every task's policy is merged with the file, exactly as the worker will merge it, and
any rule it breaks becomes a ``Problem`` at the file key to blame. The runtime adds its
own rules through ``extra`` (the broker's visibility timeout). Names the file mentions
that no registered task uses are warnings (errors with ``strict``): usually a typo.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ..errors import PolicyError
from ..policy import TaskPolicy, nested_policies
from .file import PolicyFile
from .merge import Location, Merged, MergeError, merge
from .problems import PolicyFileError, Problem, problem_at, sort

__all__ = ["ExtraCheck", "Report", "check"]

#: ``(task name, merged policy) -> the rule it breaks, or None``; may raise ``PolicyError``.
ExtraCheck = Callable[[str, TaskPolicy], str | None]
_FIELD = re.compile(
    r"\b(TaskPolicy|RetryPolicy|RetryBudget|IdempotencyPolicy|BreakerPolicy|FallbackPolicy)\.(\w+)"
)
_PREFIX = {"TaskPolicy": "", "RetryBudget": "retry.budget."}
_PREFIX.update({kind.__name__: f"{name}." for name, kind in nested_policies(TaskPolicy).items()})


@dataclass(frozen=True)
class Report:
    """The outcome of ``check``: errors and warnings in file order, and the merged policy
    of every task that merged."""

    path: str
    errors: tuple[Problem, ...]
    warnings: tuple[Problem, ...]
    policies: Mapping[str, Merged[TaskPolicy]]

    @property
    def ok(self) -> bool:
        return not self.errors

    def raise_errors(self) -> None:
        """Raise ``PolicyFileError`` listing the errors, if there are any."""
        if self.errors:
            raise PolicyFileError(self.path, self.errors)


class _Found:
    """Problems keyed by place and rule, so a key that breaks five tasks is one line."""

    def __init__(self, file: PolicyFile) -> None:
        self.file = file
        self.tasks: dict[tuple[Location | None, bool, str], list[str]] = {}

    def add(self, where: Location | None, rule: str, task: str, *, table: bool = False) -> None:
        self.tasks.setdefault((where, table, rule), []).append(task)

    def problems(self) -> list[Problem]:
        out = []
        for (where, table, rule), names in self.tasks.items():
            whose = ", ".join(f'"{n}"' for n in names)
            if where is None:
                out.append(Problem(self.file.path, None, None, None, f"task {whose}: {rule}"))
            else:
                text = f"{rule} (task{'s' if len(names) > 1 else ''} {whose})"
                out.append(problem_at(self.file.path, self.file.lines, where, text, table=table))
        return out


def _rule(error: PolicyError, where: Location | None) -> str:
    """The rule, with the field it concerns when that is not the key blamed."""
    if where is not None and error.field.rpartition(".")[2] == where[-1]:
        return error.rule
    return str(error)


def _locate(
    rule: str, name: str, merged: Merged[TaskPolicy], file: PolicyFile
) -> tuple[Location | None, bool]:
    """The file key an extra rule is about: a ``Class.field`` it names, set by the file;
    else the task's own table; else nowhere in the file."""
    for found in _FIELD.finditer(rule):
        where = merged.locations.get(_PREFIX[found.group(1)] + found.group(2))
        if where is not None:
            return where, False
    if name in file.tasks:
        return ("tasks", name), True
    return None, False


def _unused(file: PolicyFile, tasks: Mapping[str, TaskPolicy], used: set[str]) -> list[Problem]:
    path, lines = file.path, file.lines
    problems = [
        problem_at(path, lines, ("tasks", name), "no registered task has this name", table=True)
        for name in file.tasks
        if name not in tasks
    ]
    hint = "no registered task has this downstream (a name used only in self.downstream() is not seen here)"
    problems += [
        problem_at(path, lines, ("downstreams", name), hint, table=True)
        for name in file.downstreams
        if name not in used
    ]
    problems += [
        problem_at(path, lines, ("switches", name), hint) for name in file.switches if name not in used
    ]
    return problems


def check(
    file: PolicyFile,
    tasks: Mapping[str, TaskPolicy],
    *,
    extra: ExtraCheck | None = None,
    strict: bool = False,
) -> Report:
    """Merge every task's policy with ``file``; report each rule broken, at its file key."""
    found = _Found(file)
    policies: dict[str, Merged[TaskPolicy]] = {}
    used = {code.downstream for code in tasks.values() if code.downstream}
    for name, code in tasks.items():
        try:
            merged = merge(name, code, file)
        except MergeError as exc:
            found.add(exc.where, _rule(exc, exc.where), name)
            continue
        policies[name] = merged
        if merged.policy.downstream:
            used.add(merged.policy.downstream)
        if extra is None:
            continue
        try:
            broken = extra(name, merged.policy)
        except PolicyError as exc:
            broken = str(exc)
        if broken:
            where, table = _locate(broken, name, merged, file)
            found.add(where, broken, name, table=table)
    errors, warnings = found.problems(), _unused(file, tasks, used)
    if strict:
        errors, warnings = errors + warnings, []
    return Report(file.path, sort(errors), sort(warnings), policies)
