"""The worker policies file: operators' layer over the task authors' policies.

TOML with four kinds of table::

    [defaults]                     # TaskPolicy scalars, and [defaults.retry|breaker|...]
    [downstreams."payments"]       # BreakerPolicy fields for one downstream
    [tasks."shop.charge"]          # TaskPolicy scalars, and [tasks."shop.charge".retry] ...
    [switches]                     # payments = "fallback_only"

Precedence, lowest first: ``[defaults]``, ``[downstreams.X]``, the task's code,
``[tasks."name"]``, runtime switches in Redis. A field counts as "set in code" when it
differs from the dataclass default. Every error names the file, the line, the table, the
key and the rule; ``load`` reports all of them at once.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import PolicyError
from .policy import (
    BreakerPolicy,
    FallbackPolicy,
    IdempotencyPolicy,
    RetryBudget,
    RetryPolicy,
    TaskPolicy,
)

__all__ = ["PolicyFile", "PolicyFileError", "Resolved", "load", "resolve"]

SUB_POLICIES: dict[str, type] = {
    "retry": RetryPolicy,
    "idempotency": IdempotencyPolicy,
    "breaker": BreakerPolicy,
    "fallback": FallbackPolicy,
}
SCALARS = ("downstream", "idempotent", "deadline")
LIVE_SECTIONS = ("downstreams", "switches")
_EXCEPTION_FIELDS = {"retry_on", "failure_on"}
_CALLABLE_FIELDS = {"function"}
UNKNOWN_TABLE = 'unknown table; use [defaults], [downstreams.X], [tasks."name"], [switches]'


class PolicyFileError(PolicyError):
    """A policies file is invalid; ``errors`` lists every problem, one line each."""

    def __init__(self, path: str, errors: list[str]) -> None:
        self.path = path
        self.errors = errors
        super().__init__(path, "\n".join(errors))

    def __str__(self) -> str:
        count = len(self.errors)
        head = f"{self.path}: {count} error{'s' if count != 1 else ''} in the worker policies file"
        return "\n".join([head, *(f"  {e}" for e in self.errors)])


@dataclass(frozen=True)
class PolicyFile:
    """A validated policies file: raw tables plus the policy objects they make."""

    path: str
    mtime: float
    defaults: dict[str, Any] = field(default_factory=dict)
    downstreams: dict[str, BreakerPolicy] = field(default_factory=dict)
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    switches: dict[str, str] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


class _Errors:
    def __init__(self, path: str, text: str) -> None:
        self.path = path
        self.lines = text.splitlines()
        self.items: list[str] = []

    def line_of(self, table: str, key: str | None) -> int | None:
        """Best effort: the line of ``key`` under ``[table]`` (tomllib keeps no positions)."""
        parts = [p.strip('"') for p in re.findall(r'"[^"]*"|[^.]+', table)]
        header = re.compile(r"^\s*\[\s*" + r"\s*\.\s*".join(rf'"?{re.escape(p)}"?' for p in parts) + r"\s*\]")
        start = next((i for i, line in enumerate(self.lines) if header.match(line)), None)
        if start is None:
            return None
        if key is None:
            return start + 1
        for i in range(start + 1, len(self.lines)):
            line = self.lines[i]
            if re.match(r"^\s*\[", line):
                break
            if re.match(rf'^\s*"?{re.escape(key)}"?\s*=', line):
                return i + 1
        return start + 1

    def add(self, table: str, key: str | None, rule: str) -> None:
        line = self.line_of(table, key)
        where = f"line {line}, " if line else ""
        what = f"[{table}] {key}" if key else f"[{table}]"
        self.items.append(f"{self.path}:{line or '?'}: {where}{what}: {rule}")


def _import(dotted: str) -> Any:
    module, _, attr = dotted.replace(":", ".").rpartition(".")
    if not module:
        import builtins

        return getattr(builtins, attr)
    return getattr(importlib.import_module(module), attr)


def _convert(kind: type, table: str, values: dict[str, Any], errors: _Errors) -> dict[str, Any]:
    """TOML values to constructor arguments, checking names and the types TOML can't."""
    allowed = {f.name for f in dataclasses.fields(kind)}
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key not in allowed:
            errors.add(table, key, f"unknown key; {kind.__name__} has {', '.join(sorted(allowed))}")
            continue
        if key in _EXCEPTION_FIELDS:
            names = value if isinstance(value, list) else [value]
            types = []
            for name in names:
                try:
                    found = _import(str(name))
                except (ImportError, AttributeError, ValueError):
                    errors.add(table, key, f"{name!r} is not an importable exception type")
                    continue
                if not (isinstance(found, type) and issubclass(found, BaseException)):
                    errors.add(table, key, f"{name!r} is not an exception type")
                    continue
                types.append(found)
            out[key] = tuple(types)
        elif key in _CALLABLE_FIELDS:
            try:
                out[key] = _import(str(value))
            except (ImportError, AttributeError, ValueError):
                errors.add(table, key, f"{value!r} is not an importable callable (module.name)")
        elif key == "key" and isinstance(value, list):
            out[key] = tuple(value)
        elif key == "budget" and isinstance(value, dict):
            out[key] = _build(RetryBudget, f"{table}.budget", value, errors)
        else:
            out[key] = value
    return out


def _build(kind: type, table: str, values: dict[str, Any], errors: _Errors) -> Any:
    args = _convert(kind, table, values, errors)
    try:
        return kind(**args)
    except PolicyError as exc:
        errors.add(table, exc.field.split(".")[-1], exc.rule)
    except TypeError as exc:
        errors.add(table, None, str(exc))
    return None


def _task_layer(table: str, values: Any, errors: _Errors) -> dict[str, Any]:
    """``[defaults]`` or ``[tasks."name"]``: scalars plus sub-policy tables, validated."""
    if not isinstance(values, dict):
        errors.add(table, None, "must be a table")
        return {}
    layer: dict[str, Any] = {}
    for key, value in values.items():
        if key in SUB_POLICIES:
            if not isinstance(value, dict):
                errors.add(table, key, f"must be a table of {SUB_POLICIES[key].__name__} fields")
                continue
            kind = SUB_POLICIES[key]
            converted = _convert(kind, f"{table}.{key}", value, errors)
            try:  # validate the table's own values now, not when a task uses them
                if kind is FallbackPolicy and "key" not in converted:
                    FallbackPolicy(key=("_",), **converted)
                else:
                    kind(**converted)
            except PolicyError as exc:
                errors.add(f"{table}.{key}", exc.field.split(".")[-1], exc.rule)
                continue
            except TypeError as exc:
                errors.add(f"{table}.{key}", None, str(exc))
                continue
            layer[key] = converted
        elif key in SCALARS:
            try:
                TaskPolicy(**{key: value})
            except PolicyError as exc:
                errors.add(table, key, exc.rule)
                continue
            layer[key] = value
        else:
            allowed = ", ".join([*SCALARS, *SUB_POLICIES])
            errors.add(table, key, f"unknown key; a task table has {allowed}")
    return layer


def load(path: str | os.PathLike[str]) -> PolicyFile:
    """Read and validate a policies file; raise ``PolicyFileError`` listing every error."""
    location = str(path)
    try:
        text = Path(location).read_text(encoding="utf-8")
        mtime = os.stat(location).st_mtime
    except OSError as exc:
        raise PolicyFileError(location, [f"{location}: cannot read: {exc.strerror or exc}"]) from exc
    errors = _Errors(location, text)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyFileError(location, [f"{location}: not valid TOML: {exc}"]) from exc
    from .switches import MODES

    for section in raw:
        if section not in ("defaults", "downstreams", "tasks", "switches"):
            errors.add(section, None, UNKNOWN_TABLE)
    defaults = _task_layer("defaults", raw.get("defaults", {}), errors)
    downstreams: dict[str, BreakerPolicy] = {}
    for name, values in (raw.get("downstreams") or {}).items():
        table = f'downstreams."{name}"'
        if not isinstance(values, dict):
            errors.add("downstreams", name, "must be a table of BreakerPolicy fields")
            continue
        policy = _build(BreakerPolicy, table, values, errors)
        if policy is not None:
            downstreams[name] = policy
    tasks = {
        name: _task_layer(f'tasks."{name}"', values, errors)
        for name, values in (raw.get("tasks") or {}).items()
    }
    switches: dict[str, str] = {}
    for name, mode in (raw.get("switches") or {}).items():
        if mode not in MODES:
            errors.add("switches", name, f"must be one of {', '.join(MODES)}; got {mode!r}")
        else:
            switches[name] = mode
    if errors.items:
        raise PolicyFileError(location, errors.items)
    return PolicyFile(location, mtime, defaults, downstreams, tasks, switches, raw)


@dataclass(frozen=True)
class Resolved:
    """A task's effective policy and, per field, the layer that set it."""

    policy: TaskPolicy
    sources: dict[str, str]


def _merge(kind: type, layers: list[tuple[str, Any]], prefix: str, sources: dict[str, str]) -> Any:
    """Field-wise merge of sub-policy layers, lowest first. ``None`` layers are skipped;
    a code-layer object contributes only fields that differ from the class defaults."""
    defaults = {f.name: f.default for f in dataclasses.fields(kind) if f.default is not dataclasses.MISSING}
    merged: dict[str, Any] = {}
    for layer_name, layer in layers:
        if layer is None:
            continue
        if isinstance(layer, dict):
            items = list(layer.items())
        else:
            items = [
                (f.name, getattr(layer, f.name))
                for f in dataclasses.fields(kind)
                if f.name not in defaults or getattr(layer, f.name) != defaults[f.name]
            ]
        for key, value in items:
            merged[key] = value
            sources[f"{prefix}.{key}"] = layer_name
    return kind(**merged)


def resolve(name: str, code: TaskPolicy, file: PolicyFile | None) -> Resolved:
    """The effective policy of task ``name`` after every layer below the switches."""
    sources: dict[str, str] = {}
    if file is None:
        return Resolved(code, {f.name: "code" for f in dataclasses.fields(TaskPolicy)})
    task_layer = file.tasks.get(name, {})
    scalars: dict[str, Any] = {}
    for key in SCALARS:
        value, origin = getattr(code, key), "code"
        default = next(f.default for f in dataclasses.fields(TaskPolicy) if f.name == key)
        if value == default and key in file.defaults:
            value, origin = file.defaults[key], "defaults"
        if key in task_layer:
            value, origin = task_layer[key], f'tasks."{name}"'
        scalars[key] = value
        sources[key] = origin
    subs: dict[str, Any] = {}
    for key, kind in SUB_POLICIES.items():
        own = getattr(code, key)
        override = task_layer.get(key)
        if own is None and override is None and not (key == "breaker" and scalars["downstream"]):
            subs[key] = None
            continue
        layers: list[tuple[str, Any]] = [("defaults", file.defaults.get(key))]
        downstream = scalars["downstream"]
        if key == "breaker" and downstream in file.downstreams:
            layers.append((f'downstreams."{downstream}"', _as_dict(file.downstreams[downstream])))
        layers += [("code", own), (f'tasks."{name}"', override)]
        subs[key] = _merge(kind, layers, key, sources)
    return Resolved(TaskPolicy(**scalars, **subs), sources)


def _as_dict(policy: Any) -> dict[str, Any]:
    """The fields a file table set (those differing from the defaults)."""
    kind = type(policy)
    defaults = {f.name: f.default for f in dataclasses.fields(kind) if f.default is not dataclasses.MISSING}
    return {
        f.name: getattr(policy, f.name)
        for f in dataclasses.fields(kind)
        if f.name not in defaults or getattr(policy, f.name) != defaults[f.name]
    }


def merge_live(old: PolicyFile, new: PolicyFile) -> tuple[PolicyFile, list[str]]:
    """What a running worker may take from a changed file: breaker settings and switches.

    Returns the file to use now and the changes left for a restart (retry, idempotency,
    fallback and task scalars change how in-flight messages are handled)."""
    refused: list[str] = []

    def split(layer: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in layer.items() if k != "breaker"}

    if split(old.defaults) != split(new.defaults):
        refused.append("[defaults] (other than [defaults.breaker])")
    tasks: dict[str, dict[str, Any]] = {}
    for name in sorted(set(old.tasks) | set(new.tasks)):
        before, after = old.tasks.get(name, {}), new.tasks.get(name, {})
        if split(before) != split(after):
            refused.append(f'[tasks."{name}"] (other than its breaker table)')
        merged = split(before)
        if "breaker" in after:
            merged["breaker"] = after["breaker"]
        if merged:
            tasks[name] = merged
    defaults = split(old.defaults)
    if "breaker" in new.defaults:
        defaults["breaker"] = new.defaults["breaker"]
    live = PolicyFile(new.path, new.mtime, defaults, new.downstreams, tasks, new.switches, new.raw)
    return live, refused
