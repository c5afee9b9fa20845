"""Read a worker policies file: every error at once, and only ``PolicyFileError``.

TOML with four kinds of table::

    [defaults]                     # TaskPolicy scalars, and [defaults.retry|breaker|...]
    [downstreams."payments"]       # BreakerPolicy fields for one downstream
    [tasks."shop.charge"]          # TaskPolicy scalars, and [tasks."shop.charge".retry] ...
    [switches]                     # payments = "fallback_only"

Each table keeps only the keys written in it (a partial policy); ``merge`` layers them
over the code's policies. Each value is checked here by the same rule as the policy's
constructor, and so is a rule between keys of one table (``open_for_max >= open_for``);
rules that need the other layers are checked when a task's policy is merged.
"""

from __future__ import annotations

import importlib
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import PolicyError
from ..policy import (
    TRANSIENT_ERRORS,
    BreakerPolicy,
    PolicyObject,
    TaskPolicy,
    check_field,
    check_relations,
    nested_policies,
    policy_fields,
)
from .lines import Lines, scan
from .problems import PolicyFileError, Problem, problem_at

__all__ = ["SWITCH_MODES", "PolicyFile", "Table", "load", "parse"]

#: A table as written: field -> value; a nested policy's table is a Mapping, ``None`` is off.
Table = Mapping[str, Any]
#: The modes of a downstream's switch (``resilient_tasks.switches`` applies them).
SWITCH_MODES = ("normal", "fallback_only", "reject", "breaker_disabled", "forced_open", "forced_closed")
SCALARS = ("downstream", "idempotent", "deadline")
SECTIONS = ("defaults", "downstreams", "tasks", "switches")
UNKNOWN_TABLE = 'unknown table; use [defaults], [downstreams.X], [tasks."name"], [switches]'
_EXCEPTION_FIELDS = ("retry_on", "failure_on")
_CALLABLE_FIELDS = ("function", "validate")
_TOML_LINE = re.compile(r"\(at line (\d+), column \d+\)")
_BAD: Any = object()  # a value that failed its check (the problem is already recorded)


@dataclass(frozen=True)
class PolicyFile:
    """A checked policies file: the tables as written, and where each key is."""

    path: str
    mtime: float | None = None
    defaults: Table = field(default_factory=dict)
    downstreams: Mapping[str, Table] = field(default_factory=dict)
    tasks: Mapping[str, Table] = field(default_factory=dict)
    switches: Mapping[str, str] = field(default_factory=dict)
    lines: Lines = field(default_factory=Lines, compare=False, repr=False)


class _Reader:
    """Turns the parsed TOML into tables, collecting a ``Problem`` for each bad key."""

    def __init__(self, path: str, lines: Lines) -> None:
        self.path = path
        self.lines = lines
        self.problems: list[Problem] = []

    def add(self, where: tuple[str, ...], rule: str, *, table: bool = False) -> None:
        self.problems.append(problem_at(self.path, self.lines, where, rule, table=table))

    def names(self, where: tuple[str, ...], value: Any, what: str) -> dict[str, Any]:
        """A table of named tables (``[downstreams]``, ``[tasks]``, ``[switches]``)."""
        if not isinstance(value, dict):
            self.add(where, f"must be a table of {what}")
            return {}
        good = {}
        for name, inner in value.items():
            if not name.strip():
                self.add((*where, name), "a name must not be empty")
            else:
                good[name] = inner
        return good

    def policy_table(self, kind: type[PolicyObject], where: tuple[str, ...], values: Any) -> Table | None:
        """A table of ``kind`` fields: each value checked, then the rules among them."""
        if not isinstance(values, dict):
            self.add(where, f"must be a table of {kind.__name__} fields")
            return None
        allowed = policy_fields(kind)
        nested = nested_policies(kind)
        table: dict[str, Any] = {}
        for key, value in values.items():
            at = (*where, key)
            if key not in allowed:
                self.add(at, f"unknown key; {kind.__name__} has {', '.join(sorted(allowed))}")
            elif key in nested:
                if value is False:
                    table[key] = None  # ``budget = false``: no budget
                elif isinstance(value, dict):
                    inner = self.policy_table(nested[key], at, value)
                    if inner is not None:
                        table[key] = inner
                else:
                    self.add(at, f"must be a table of {nested[key].__name__} fields, or false for none")
            else:
                kept = self.value(kind, at, key, value)
                if kept is not _BAD:
                    table[key] = kept
        for error in check_relations(kind, table):  # among the keys whose values are good
            self.add((*where, error.field.rpartition(".")[2]), error.rule)
        return table

    def value(self, kind: type[PolicyObject], at: tuple[str, ...], key: str, value: Any) -> Any:
        try:
            if key in _EXCEPTION_FIELDS:
                value = _exceptions(value)
            elif key in _CALLABLE_FIELDS:
                value = _imported(value, "an importable callable (module.name)")
            return check_field(kind, key, value)
        except PolicyError as exc:
            self.add(at, exc.rule)
            return _BAD

    def task_table(self, where: tuple[str, ...], values: Any) -> Table:
        """``[defaults]`` or ``[tasks."name"]``: TaskPolicy scalars and sub-policy tables."""
        if not isinstance(values, dict):
            self.add(where, "must be a table of TaskPolicy fields")
            return {}
        nested = nested_policies(TaskPolicy)
        table: dict[str, Any] = {}
        for key, value in values.items():
            if key in nested:
                inner = self.policy_table(nested[key], (*where, key), value)
                if inner is not None:
                    table[key] = inner
            elif key in SCALARS:
                kept = self.value(TaskPolicy, (*where, key), key, value)
                if kept is not _BAD:
                    table[key] = kept
            else:
                self.add((*where, key), f"unknown key; a task table has {', '.join([*SCALARS, *nested])}")
        return table

    def switches(self, values: Any) -> dict[str, str]:
        switches = {}
        for name, mode in self.names(("switches",), values, 'downstream = "mode" lines').items():
            if mode not in SWITCH_MODES:
                self.add(("switches", name), f"must be one of {', '.join(SWITCH_MODES)}; got {mode!r}")
            else:
                switches[name] = mode
        return switches

    def read(self, raw: dict[str, Any], mtime: float | None) -> PolicyFile:
        for section, value in raw.items():
            if section not in SECTIONS:
                self.add((section,), UNKNOWN_TABLE, table=isinstance(value, dict))
        defaults = self.task_table(("defaults",), raw.get("defaults", {}))
        downstreams = {}
        for name, values in self.names(
            ("downstreams",), raw.get("downstreams", {}), 'tables ([downstreams."name"])'
        ).items():
            table = self.policy_table(BreakerPolicy, ("downstreams", name), values)
            if table is not None:
                downstreams[name] = table
        tasks = {
            name: self.task_table(("tasks", name), values)
            for name, values in self.names(
                ("tasks",), raw.get("tasks", {}), 'tables ([tasks."name"])'
            ).items()
        }
        switches = self.switches(raw.get("switches", {}))
        if self.problems:
            raise PolicyFileError(self.path, self.problems)
        return PolicyFile(self.path, mtime, defaults, downstreams, tasks, switches, self.lines)


def _imported(name: Any, what: str) -> Any:
    """``module.attr`` (or ``module:attr``, or a builtin's name) imported."""
    if not isinstance(name, str) or not name:
        raise PolicyError("", f"must be {what}, got {name!r}")
    if name in ("TRANSIENT_ERRORS", "resilient_tasks.TRANSIENT_ERRORS"):
        return TRANSIENT_ERRORS
    module, _, attr = name.replace(":", ".").rpartition(".")
    try:
        return getattr(importlib.import_module(module or "builtins"), attr)
    except Exception as exc:  # ImportError, AttributeError, or the module failing to import
        raise PolicyError("", f"{name!r} is not {what}: {type(exc).__name__}") from None


def _exceptions(value: Any) -> Any:
    """``retry_on``/``failure_on``: exception names, or the name of a predicate or of a
    tuple of types (``"TRANSIENT_ERRORS"``)."""
    if isinstance(value, str):
        found = _imported(value, "an importable exception type")
        if isinstance(found, tuple) or (callable(found) and not isinstance(found, type)):
            return found  # a tuple of types, or a predicate(exc) -> bool
        return (found,)
    if not isinstance(value, list):
        raise PolicyError("", f"must be exception names, got {value!r}")
    types: list[Any] = []
    for name in value:
        found = _imported(name, "an importable exception type")
        if isinstance(found, tuple):
            types += found
        elif isinstance(found, type) and issubclass(found, BaseException):
            types.append(found)
        else:
            raise PolicyError("", f"{name!r} is not an exception type")
    return tuple(types)


def _decode(path: str, data: bytes) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        rule = f"not UTF-8: byte 0x{data[exc.start]:02x} at offset {exc.start} (save the file as UTF-8)"
        raise PolicyFileError(path, [Problem(path, line, None, None, rule)]) from None
    return text.removeprefix("\ufeff")


def parse(path: str, data: bytes, mtime: float | None = None) -> PolicyFile:
    """Check the bytes of a policies file; raise ``PolicyFileError`` listing every error."""
    text = _decode(path, data)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        found = _TOML_LINE.search(str(exc))
        line = int(found.group(1)) if found else None
        raise PolicyFileError(path, [Problem(path, line, None, None, f"not valid TOML: {exc}")]) from None
    except (RecursionError, ValueError) as exc:  # nested beyond what the parser can follow
        raise PolicyFileError(path, [Problem(path, None, None, None, f"not valid TOML: {exc}")]) from None
    return _Reader(path, scan(text)).read(raw, mtime)


def load(path: str | os.PathLike[str]) -> PolicyFile:
    """Read and check a policies file; raise ``PolicyFileError`` listing every error."""
    location = os.fspath(path)
    try:
        with open(location, "rb") as handle:
            mtime = os.fstat(handle.fileno()).st_mtime
            data = handle.read()
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise PolicyFileError(
            location, [Problem(location, None, None, None, f"cannot read: {reason}")]
        ) from None
    return parse(location, data, mtime)
