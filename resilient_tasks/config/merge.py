"""One policy path: a task's code policy with the policies file's layers over it.

Precedence, lowest first: ``[defaults]``, ``[downstreams.X]`` (its breaker), the task's
code, ``[tasks."name"]``. A layer contributes only what it states: the fields its author
passed to the constructor (``fields_set``), or the keys written in a file table, so a
code value equal to the default still beats ``[defaults]``. The result is built by the
policies' own constructors, so it passes exactly the checks of a policy built in code;
a failure is a ``MergeError`` that names the file key to blame when a file layer set it.
Runtime switches are not merged here: the store applies them at admission.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from ..errors import PolicyError
from ..policy import (
    BreakerPolicy,
    PolicyObject,
    TaskPolicy,
    nested_policies,
    policy_fields,
    related_fields,
    required_fields,
)
from .file import SCALARS, PolicyFile, Table
from .problems import label

__all__ = ["CODE", "MergeError", "Merged", "merge", "merge_downstream", "stated"]

#: The label of the task's own code layer in ``Merged.sources``.
CODE = "code"
_P = TypeVar("_P", bound=PolicyObject)
Location = tuple[str, ...]


@dataclass(frozen=True)
class _Origin:
    """A layer: its label, its table in the file (``None`` for code), its precedence."""

    label: str
    table: Location | None
    rank: int

    def into(self, name: str) -> _Origin:
        return _Origin(self.label, None if self.table is None else (*self.table, name), self.rank)


@dataclass(frozen=True)
class Merged(Generic[_P]):
    """A merged policy; per field path (``"breaker.open_for"``) the layer that set it
    (``sources``, absent: the class default) and, for the file's, its key (``locations``)."""

    policy: _P
    sources: Mapping[str, str]
    locations: Mapping[str, Location]


class MergeError(PolicyError):
    """A merged policy breaks a rule; ``where`` is the file key to blame (``None``: no
    file layer set any field the rule involves)."""

    def __init__(self, field: str, rule: str, where: Location | None) -> None:
        super().__init__(field, rule)
        self.where = where

    def __reduce__(self) -> tuple[type[MergeError], tuple[str, str, Location | None]]:
        return (type(self), (self.field, self.rule, self.where))


def stated(policy: PolicyObject) -> dict[str, Any]:
    """The fields the author set, a nested policy as its own stated fields."""
    nested = nested_policies(type(policy))
    out: dict[str, Any] = {}
    for name in policy_fields(type(policy)):
        if name in policy.fields_set:
            value = getattr(policy, name)
            out[name] = stated(value) if name in nested and value is not None else value
    return out


_Layer = tuple[_Origin, Table]


class _Trace:
    """Which layer set each field path, as the layers are applied."""

    def __init__(self) -> None:
        self.origins: dict[str, _Origin] = {}

    def set(self, path: str, origin: _Origin) -> None:
        self.origins[path] = origin

    def blame(self, kind: type[PolicyObject], prefix: str, error: PolicyError) -> MergeError:
        """The file key behind a broken rule: of the fields it involves, the one set by
        the most specific file layer (``[tasks."name"]`` over ``[defaults]``)."""
        name = error.field.rpartition(".")[2]
        origins = [self.origins.get(prefix + field) for field in (name, *related_fields(kind, name))]
        in_file = [o for o in origins if o is not None and o.table is not None]
        if not in_file:
            return MergeError(error.field, error.rule, None)
        return MergeError(error.field, error.rule, max(in_file, key=lambda o: o.rank).table)

    def merged(self, policy: _P, strip: str = "") -> Merged[_P]:
        sources, locations = {}, {}
        for path, origin in self.origins.items():
            if path.startswith(strip):
                sources[path[len(strip) :]] = origin.label
                if origin.table is not None:
                    locations[path[len(strip) :]] = origin.table
        return Merged(policy, sources, locations)


def _build(kind: type[_P], layers: Sequence[_Layer], prefix: str, trace: _Trace) -> _P:
    """``kind`` from partial layers (lowest first), nested policies merged field-wise."""
    nested = nested_policies(kind)
    kwargs: dict[str, Any] = {}
    pending: dict[str, list[_Layer]] = {}
    for origin, values in layers:
        for name, value in values.items():
            trace.set(prefix + name, origin.into(name))
            if name in nested and isinstance(value, Mapping):
                pending.setdefault(name, []).append((origin.into(name), value))
            else:  # a value (or None: "none of it") replaces whatever was below
                pending.pop(name, None)
                kwargs[name] = value
    for name, inner in pending.items():
        kwargs[name] = _build(nested[name], inner, f"{prefix}{name}.", trace)
    return _construct(kind, kwargs, prefix, trace)


def _construct(kind: type[_P], kwargs: dict[str, Any], prefix: str, trace: _Trace) -> _P:
    try:
        for name in required_fields(kind):
            if name not in kwargs:
                raise PolicyError(f"{kind.__name__}.{name}", "is required, and no layer sets it")
        return kind(**kwargs)
    except MergeError:
        raise
    except PolicyError as exc:
        raise trace.blame(kind, prefix, exc) from None


def _layers(*layers: tuple[_Origin, Any]) -> list[_Layer]:
    return [(origin, values) for origin, values in layers if isinstance(values, Mapping)]


_DEFAULTS = _Origin("defaults", ("defaults",), 0)
_CODE = _Origin(CODE, None, 2)


def _downstream(name: str) -> _Origin:
    return _Origin(label(("downstreams", name)), ("downstreams", name), 1)


def _ops(name: str) -> _Origin:
    return _Origin(label(("tasks", name)), ("tasks", name), 3)


def merge(name: str, code: TaskPolicy, file: PolicyFile | None) -> Merged[TaskPolicy]:
    """The effective policy of task ``name`` below the runtime switches; raises
    ``MergeError`` when the layers together break a rule."""
    file = file or PolicyFile("")
    own, ops_table = stated(code), file.tasks.get(name, {})
    ops = _ops(name)
    layers = _layers((_DEFAULTS, file.defaults), (_CODE, own), (ops, ops_table))
    trace = _Trace()
    kwargs: dict[str, Any] = {}
    for origin, values in layers:
        for key in SCALARS:
            if key in values:
                kwargs[key] = values[key]
                trace.set(key, origin.into(key))
    downstream = kwargs.get("downstream")
    for key, kind in nested_policies(TaskPolicy).items():
        if isinstance(own.get(key), Mapping):
            trace.set(key, _CODE)
        elif key in ops_table:
            trace.set(key, ops.into(key))
        elif key == "breaker" and downstream is not None:
            trace.set(key, trace.origins["downstream"])
        else:  # [defaults] never adds a retry, a fallback... to a task that has none
            if key in own:
                kwargs[key] = own[key]
            continue
        sub: list[tuple[_Origin, Any]] = [(_DEFAULTS.into(key), file.defaults.get(key))]
        if key == "breaker" and downstream:
            sub.append((_downstream(downstream), file.downstreams.get(downstream)))
        sub += [(_CODE, own.get(key)), (ops.into(key), ops_table.get(key))]
        kwargs[key] = _build(kind, _layers(*sub), f"{key}.", trace)
    policy = _construct(TaskPolicy, kwargs, "", trace)
    from_file = any(origin.table is not None for origin in trace.origins.values())
    return trace.merged(policy if from_file else code)  # the code's own object when nothing changed


def merge_downstream(
    name: str, task: str, code: TaskPolicy, file: PolicyFile | None
) -> Merged[BreakerPolicy]:
    """The breaker policy for ``self.downstream(name)`` in task ``task``'s body:
    ``[downstreams.name]`` layered over the task's own breaker policy (its code and its
    ``[tasks."task".breaker]``, over ``[defaults.breaker]``)."""
    file = file or PolicyFile("")
    whole = merge(task, code, file)
    if whole.policy.downstream == name and whole.policy.breaker is not None:
        return Merged(
            whole.policy.breaker,
            {k.removeprefix("breaker."): v for k, v in whole.sources.items() if k.startswith("breaker.")},
            {k.removeprefix("breaker."): v for k, v in whole.locations.items() if k.startswith("breaker.")},
        )
    own = stated(code).get("breaker")
    layers = _layers(
        (_DEFAULTS.into("breaker"), file.defaults.get("breaker")),
        (_CODE, own),
        (_ops(task).into("breaker"), file.tasks.get(task, {}).get("breaker")),
        (_downstream(name), file.downstreams.get(name)),
    )
    trace = _Trace()
    return trace.merged(_build(BreakerPolicy, layers, "", trace))
