"""What is wrong in a worker policies file, and where: file, line, table, key, rule."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import PolicyError
from .lines import Lines

__all__ = ["PolicyFileError", "Problem", "label", "problem_at", "sort"]

_BARE = re.compile(r"[A-Za-z0-9_-]+\Z")
#: Tables whose second part is a name chosen by the user (always quoted in messages).
NAMED = ("downstreams", "tasks")


def _quoted(part: str) -> str:
    return part if _BARE.match(part) else json.dumps(part, ensure_ascii=False)


def label(path: tuple[str, ...]) -> str:
    """A table path as it is written in the file: ``tasks."shop.charge".retry``."""
    parts = []
    for index, part in enumerate(path):
        named = index == 1 and path[0] in NAMED
        parts.append(json.dumps(part, ensure_ascii=False) if named else _quoted(part))
    return ".".join(parts)


@dataclass(frozen=True)
class Problem:
    """One error (or warning) in a policies file; ``str()`` is the line a user reads."""

    path: str
    line: int | None
    table: str | None
    key: str | None
    rule: str

    def __str__(self) -> str:
        if self.table is None and self.key is None:
            where = f"{self.path}:{self.line}: line {self.line}, " if self.line else f"{self.path}: "
            return f"{where}{self.rule}"
        key = None if self.key is None else _quoted(self.key)
        what = f"[{self.table}]" if self.table is not None else ""
        what = f"{what} {key}" if what and key is not None else what or str(key)
        at = f"line {self.line}, " if self.line else ""
        return f"{self.path}:{self.line or '?'}: {at}{what}: {self.rule}"

    def as_dict(self) -> dict[str, object]:
        """For ``--json``."""
        return {
            "file": self.path,
            "line": self.line,
            "table": self.table,
            "key": self.key,
            "rule": self.rule,
            "message": str(self),
        }


def problem_at(path: str, lines: Lines, where: tuple[str, ...], rule: str, *, table: bool = False) -> Problem:
    """A problem at key path ``where`` (``table=True``: ``where`` names a whole table)."""
    if table:
        return Problem(path, lines.of(where), label(where), None, rule)
    return Problem(path, lines.of(where), label(where[:-1]) or None, where[-1], rule)


def sort(problems: Iterable[Problem]) -> tuple[Problem, ...]:
    """File order: by line, those without a line (the whole file) first; stable."""
    return tuple(sorted(problems, key=lambda p: p.line or 0))


class PolicyFileError(PolicyError):
    """A policies file is invalid; ``problems`` lists every error in file order and
    ``errors`` the same as the lines a user reads."""

    def __init__(self, path: str, problems: Iterable[Problem]) -> None:
        self.path = path
        self.problems = sort(problems)
        self.errors = [str(p) for p in self.problems]
        super().__init__(path, "\n".join(self.errors))

    def __reduce__(self) -> tuple[type[PolicyFileError], tuple[str, tuple[Problem, ...]]]:
        return (type(self), (self.path, self.problems))

    def __str__(self) -> str:
        count = len(self.errors)
        head = f"{self.path}: {count} error{'s' if count != 1 else ''} in the worker policies file"
        return "\n".join([head, *(f"  {e}" for e in self.errors)])
