"""``celery -A APP resilience ...``: look at and steer the fleet's breakers and switches.

Registered as a Celery sub-command (the ``celery.commands`` entry point). Every command
prints a rich table in a terminal and JSON with ``--json``. Whatever goes wrong with the
store or a policy (unreachable, a wrong password, a right the ACL user lacks, a bad URL)
ends every command the same way: one ``Error:`` line without a password, exit 1.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from . import config
from .errors import IdempotencyKeyError, PolicyError, StoreUnavailable
from .keys import digest, key_material, signature_of
from .policy import KeySpec, TaskPolicy
from .runtime import REDIS_URL_ENV, Runtime, runtime_for, visibility_rule
from .store.protocol import Forget, Store
from .store.urls import redact, secrets_of
from .switches import MODES, breakers, close_breaker, reset_breaker, set_switch

__all__ = ["effective_state", "resilience", "server_ms", "status_rows"]

#: ``ctx.meta`` key: the passwords the app's store was given, kept out of every message.
_SECRETS = "resilient_tasks.secrets"


def _redacted(ctx: click.Context, text: str) -> str:
    """``text`` without any URL's userinfo or a password the store was given."""
    secrets: tuple[str, ...] = (*ctx.meta.get(_SECRETS, ()), *secrets_of(os.environ.get(REDIS_URL_ENV)))
    return redact(text, secrets)


class _CleanErrors(click.Group):
    """Every command fails the same way: a store that is down or refuses us, a policy or
    a key that does not hold, is one ``Error:`` line (no traceback, no password), exit 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (StoreUnavailable, PolicyError, IdempotencyKeyError) as exc:
            raise click.ClickException(_redacted(ctx, " ".join(str(exc).split()))) from None
        except click.ClickException as exc:
            clean = _redacted(ctx, exc.message)
            if clean == exc.message:
                raise
            raise click.ClickException(clean) from None


def _runtime(ctx: click.Context) -> Runtime:
    app = ctx.obj.app if ctx.obj is not None else None
    if app is None:
        raise click.UsageError("name the app: celery -A your.module resilience ...")
    runtime = runtime_for(app)  # (a PolicyError becomes a clean Error: line)
    ctx.meta[_SECRETS] = secrets_of(runtime.redis_url, getattr(runtime, "_redis_options", None))
    return runtime


def _store(ctx: click.Context) -> tuple[Runtime, Store]:
    """The runtime and its store, made now: a URL redis-py cannot parse is a clean error."""
    runtime = _runtime(ctx)
    try:
        return runtime, runtime.store
    except PolicyError:
        raise
    except ValueError as exc:  # (the store's own messages hold no password)
        raise click.ClickException(
            f"the store URL {redact(runtime.redis_url or '')} is invalid: {exc}"
        ) from None


def _window(fields: dict[str, str], now_ms: int) -> tuple[int, int, int, int, int]:
    """Calls, failures, slow calls, first attempts and retries in the current window."""
    window = int(fields.get("window_ms", "60000"))
    nb = int(fields.get("nb", "10"))
    index = now_ms // max(1, window // nb)
    totals = [0, 0, 0, 0, 0]
    for slot in range(nb):
        if int(fields.get(f"t{slot}", "-1")) > index - nb:
            for i, letter in enumerate("cfsar"):
                totals[i] += int(fields.get(f"{letter}{slot}", "0"))
    return totals[0], totals[1], totals[2], totals[3], totals[4]


#: Switches that decide a breaker's state whatever its window says.
_HELD = {"forced_open": "forced_open", "forced_closed": "forced_closed", "breaker_disabled": "disabled"}


def effective_state(state: str, switch: str) -> str:
    """The state calls meet: a switch that holds the breaker (``forced_open``,
    ``forced_closed``, ``breaker_disabled``) wins over the state its window reached."""
    return _HELD.get(switch, state)


def status_rows(raw: list[dict[str, str]], now_ms: int) -> list[dict[str, Any]]:
    """One plain row per breaker, as ``status`` shows it: ``state`` is the effective
    state, ``breaker_state`` the one its window of outcomes reached."""
    rows = []
    for fields in raw:
        calls, fails, slow, attempts, retries = _window(fields, now_ms)
        budget_left: float | None = None
        if "budget_ratio" in fields:
            allowed = float(fields["budget_ratio"]) * attempts + int(fields.get("budget_min", "0"))
            budget_left = max(0.0, allowed - retries)
        state = fields.get("state", "closed")
        switch = fields.get("switch", "normal")
        open_until = int(fields.get("open_until", "0"))
        rows.append(
            {
                "downstream": fields.get("name", "?"),
                "state": effective_state(state, switch),
                "switch": switch,
                "breaker_state": state,
                "failure_rate": round(fails / calls, 4) if calls else 0.0,
                "calls": calls,
                "failures": fails,
                "slow_calls": slow,
                "consecutive_failures": int(fields.get("consec", "0")),
                "opens": int(fields.get("opens", "0")),
                "trips": int(fields.get("trips", "0")),
                "retry_budget_left": budget_left,
                "open_for_s": round(max(0, open_until - now_ms) / 1000, 1) if state == "open" else 0.0,
                "last_transition": time.strftime(
                    "%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(fields.get("changed_at", "0")) / 1000)
                ),
            }
        )
    return rows


def server_ms(runtime: Runtime) -> int:
    return runtime.store.now_ms()


def _print(rows: list[dict[str, Any]], title: str, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    if not rows:  # (a table of no rows is as narrow as its title, which wraps in pieces)
        click.echo(f"{title}: none")
        return
    table = Table(title=title)
    columns = list(rows[0])
    for column in columns:
        table.add_column(column.replace("_", " "))
    for row in rows:
        table.add_row(*("-" if row[c] is None else str(row[c]) for c in columns))
    # Piped output is not cut to 80 columns: whoever reads it (less, a ticket) can wrap.
    Console(width=None if sys.stdout.isatty() else 240).print(table)


@click.group(name="resilience", cls=_CleanErrors)
def resilience() -> None:
    """Breakers, switches and policies of resilient-tasks."""


@resilience.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Every known downstream: state (as switches leave it), failure rate, calls, budget, switch."""
    runtime, _ = _store(ctx)
    rows = status_rows(breakers(runtime), server_ms(runtime))
    _print(rows, "resilience: downstreams", as_json)


def _task_downstreams(ctx: click.Context, runtime: Runtime) -> set[str]:
    """The downstreams the app's tasks name (in code or through the policies file), and
    the ``[downstreams]`` the policies file declares."""
    names: set[str] = set()
    for task_name, policy in _registered(ctx.obj.app).items():
        names.add(policy.downstream or "")
        with contextlib.suppress(PolicyError):  # (the code's name is known all the same)
            names.add(runtime.resolved(task_name, policy).policy.downstream or "")
    if runtime.policy_file is not None:
        names.update(runtime.policy_file.downstreams)
    names.discard("")
    return names


def _refuse_unknown(ctx: click.Context, runtime: Runtime, store: Store, name: str) -> None:
    """A name no task uses and no breaker in the store has is a typo until ``--create``
    says otherwise: a switch on it would make a breaker nothing reads."""
    known = _task_downstreams(ctx, runtime)
    if name in known:
        return
    known.update(view.downstream for view in store.breakers())
    if name in known:
        return
    close = difflib.get_close_matches(name, sorted(known), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise click.ClickException(
        f"no downstream named {name!r}: no registered task uses it and the store has no breaker by "
        f"that name (known: {', '.join(sorted(known)) or 'none'}); {hint}pass --create to make it"
    )


def _switch(ctx: click.Context, name: str, mode: str, as_json: bool, create: bool) -> None:
    runtime, store = _store(ctx)
    if not create:
        _refuse_unknown(ctx, runtime, store, name)
    if mode == "close":
        previous = close_breaker(runtime, name)
    elif mode == "reset":
        previous = reset_breaker(runtime, name)
    else:
        previous = set_switch(runtime, name, mode)
    result = {"downstream": name, "action": mode, "previous_switch": previous}
    click.echo(json.dumps(result) if as_json else f"{name}: {mode} (switch was {previous})")


_CREATE_HELP = "Act on a name no task uses and no breaker has yet (otherwise refused as a typo)."


def _action(command: str, mode: str, summary: str) -> None:
    """``open``, ``close`` and ``reset``: one downstream, one switch action."""

    @click.argument("name")
    @click.option("--create", is_flag=True, help=_CREATE_HELP)
    @click.option("--json", "as_json", is_flag=True)
    @click.pass_context
    def action(ctx: click.Context, name: str, create: bool, as_json: bool) -> None:
        _switch(ctx, name, mode, as_json, create)

    action.__doc__ = summary
    resilience.command(name=command)(action)


_action("open", "forced_open", "Force NAME's breaker open on every worker.")
_action("close", "close", "Close NAME's breaker now and clear its switch.")
_action("reset", "reset", "Forget NAME's window, state and switch.")


@resilience.command()
@click.argument("name")
@click.argument("mode", type=click.Choice(MODES))
@click.option("--create", is_flag=True, help=_CREATE_HELP)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def degrade(ctx: click.Context, name: str, mode: str, create: bool, as_json: bool) -> None:
    """Set NAME's degrade switch (normal, fallback_only, reject, ...)."""
    _switch(ctx, name, mode, as_json, create)


def _idempotent_task(ctx: click.Context, runtime: Runtime, task_name: str) -> KeySpec:
    """The idempotency key spec ``task_name`` runs with (its effective policy)."""
    registered = _registered(ctx.obj.app)
    keyed = sorted(name for name, policy in registered.items() if policy.idempotency is not None)
    code = registered.get(task_name)
    if code is None:
        raise click.ClickException(
            f"no resilient task named {task_name!r} in this app (tasks with an idempotency key: "
            f"{', '.join(keyed) or 'none'})"
        )
    policy = runtime.resolved(task_name, code).policy.idempotency
    if policy is None:
        raise click.ClickException(f"{task_name} has no IdempotencyPolicy: it keeps no record to forget")
    return policy.key


def _value(text: str) -> Any:
    """An ``--arg`` value: JSON (``42``, ``true``, ``"42"``, ``[1, 2]``), else the text."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _parse_args(pairs: Sequence[str]) -> dict[str, Any]:
    given: dict[str, Any] = {}
    for pair in pairs:
        name, equals, text = pair.partition("=")
        name = name.strip()
        if not equals or not name:
            raise click.BadParameter(f"{pair!r}: expected NAME=VALUE", param_hint="--arg")
        if name in given:
            raise click.BadParameter(f"{name} given twice", param_hint="--arg")
        given[name] = _value(text)
    return given


def _material(task: Any, spec: KeySpec, given: dict[str, Any]) -> str:
    """The key material ``task`` builds from a call with the arguments ``given`` (by
    name, the signature's defaults for the others): the same function, the same text."""
    task_name = task.name
    if spec == "message":
        raise click.UsageError(f"{task_name} is keyed by the message: give the task id as KEY, not --arg")
    if isinstance(spec, tuple):
        extra = [name for name in given if name not in spec]
        if extra:
            raise click.UsageError(f"{task_name} is keyed by ({', '.join(spec)}); not by {', '.join(extra)}")
    named = {
        name: param.default
        for name, param in signature_of(task.run).parameters.items()
        if param.default is not inspect.Parameter.empty
    }
    named.update(given)
    try:
        return key_material(spec, task.run, (), given, None, None if callable(spec) else named)
    except IdempotencyKeyError as exc:
        wanted = f" (--arg NAME=VALUE for each of {', '.join(spec)})" if isinstance(spec, tuple) else ""
        raise click.ClickException(f"{task_name}: {exc}{wanted}") from None


@resilience.command()
@click.argument("key", required=False)
@click.option("--task", "task_name", required=True, help="The task whose record to drop.")
@click.option(
    "--arg",
    "args",
    multiple=True,
    metavar="NAME=VALUE",
    help="An argument of the call, as the task's key reads it (VALUE is JSON, else text); "
    "repeat for each key name. Instead of KEY.",
)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def forget(
    ctx: click.Context, key: str | None, task_name: str, args: tuple[str, ...], yes: bool, as_json: bool
) -> None:
    """Drop a task's idempotency record: its next message with that key runs the body again.

    Name the call by its arguments (--arg order_id=o-1, one per key name), or give KEY,
    the key material itself (the task id for a task keyed by message, '["o-1"]' for
    key=("order_id",))."""
    if key is not None and args:
        raise click.UsageError("give KEY or --arg NAME=VALUE, not both")
    if key is None and not args:
        raise click.UsageError("name the call: --arg NAME=VALUE for each name of the task's key, or KEY")
    spec = _idempotent_task(ctx, _runtime(ctx), task_name)
    given: dict[str, Any] = {}
    if key is None:
        given = _parse_args(args)
        material = _material(ctx.obj.app.tasks[task_name], spec, given)
        shown = ", ".join(f"{name}={json.dumps(value, default=repr)}" for name, value in given.items())
    else:
        material, shown = key, repr(key)
    record = digest(task_name, material)
    if not yes:
        click.confirm(
            f"Drop the idempotency record of {shown} for {task_name}? The body may run again", abort=True
        )
    _, store = _store(ctx)
    (removed,) = store.batch([Forget(record)])
    result: dict[str, Any] = {"task": task_name, "key": material, "record": record, "removed": bool(removed)}
    if given:
        result["args"] = given
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(f"{'removed' if removed else 'no record for'} {shown} of {task_name}")


@resilience.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def policies(ctx: click.Context, as_json: bool) -> None:
    """The effective policy of every resilient task, and the layer that set each field."""
    from .task import ResilientTask

    runtime = _runtime(ctx)
    app = ctx.obj.app
    rows = []
    for name, task in sorted(app.tasks.items()):
        if not isinstance(task, ResilientTask):
            continue
        resolved = runtime.resolved(name, task.policy)
        fields = _flatten(resolved.policy)
        for field_name, value in fields.items():
            source = resolved.sources.get(field_name, "default")
            rows.append({"task": name, "field": field_name, "value": value, "set_by": source})
    _print(rows, f"resilience: effective policies ({runtime.policies_path or 'no policies file'})", as_json)


def _flatten(policy: Any) -> dict[str, Any]:
    import dataclasses

    out: dict[str, Any] = {}
    for f in dataclasses.fields(policy):
        value = getattr(policy, f.name)
        if dataclasses.is_dataclass(value):
            for sub in dataclasses.fields(value):
                out[f"{f.name}.{sub.name}"] = _show(getattr(value, sub.name))
        else:
            out[f.name] = _show(value)
    return out


def _show(value: Any) -> Any:
    if isinstance(value, tuple) and value and all(isinstance(v, type) for v in value):
        return [v.__name__ for v in value]
    if callable(value) and not isinstance(value, type):
        return getattr(value, "__qualname__", repr(value))
    if isinstance(value, (str, int, float, bool, list)) or value is None:
        return value
    return repr(value)


def _registered(app: Any) -> dict[str, TaskPolicy]:
    """The app's ResilientTasks and their code policies (none without ``-A app``)."""
    from .task import ResilientTask

    return {name: task.policy for name, task in sorted(app.tasks.items()) if isinstance(task, ResilientTask)}


@dataclass
class _Checked:
    """What ``check`` prints: errors and warnings in file order, the file if it loaded,
    and the tasks it was checked against."""

    errors: list[config.Problem] = field(default_factory=list)
    warnings: list[config.Problem] = field(default_factory=list)
    loaded: config.PolicyFile | None = None
    tasks: list[str] = field(default_factory=list)


def _check_file(file: str, app: Any, strict: bool) -> _Checked:
    try:
        loaded = config.load(file)
    except config.PolicyFileError as exc:
        return _Checked(errors=list(exc.problems))
    tasks = _registered(app) if app is not None else {}
    if not tasks:
        return _Checked(loaded=loaded)
    report = config.check(loaded, tasks, extra=visibility_rule(app), strict=strict)
    return _Checked(list(report.errors), list(report.warnings), loaded, sorted(tasks))


@resilience.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True)
@click.option("--strict", is_flag=True, help="Names no registered task uses are errors, not warnings.")
@click.pass_context
def check(ctx: click.Context, file: str, as_json: bool, strict: bool) -> None:
    """Validate a worker policies FILE, against the app's tasks with -A; exit 1 listing
    every error in file order."""
    app = ctx.obj.app if ctx.obj is not None else None
    found = _check_file(file, app, strict)
    errors, loaded = found.errors, found.loaded
    if as_json:
        summary: dict[str, Any] = {
            "file": file,
            "ok": not errors,
            "errors": [str(p) for p in errors],
            "warnings": [str(p) for p in found.warnings],
            "problems": [p.as_dict() for p in (*errors, *found.warnings)],
            "tasks_checked": found.tasks,
        }
        if loaded is not None:
            summary["downstreams"] = sorted(loaded.downstreams)
            summary["tasks"] = sorted(loaded.tasks)
            summary["switches"] = dict(loaded.switches)
        click.echo(json.dumps(summary))
    else:
        for warning in found.warnings:
            click.echo(f"warning: {warning}", err=True)
        if errors:
            click.echo(str(config.PolicyFileError(file, errors)), err=True)
        elif loaded is not None:
            against = f", checked against {len(found.tasks)} tasks" if found.tasks else ""
            click.echo(
                f"{file}: ok ({len(loaded.downstreams)} downstreams, "
                f"{len(loaded.tasks)} tasks, {len(loaded.switches)} switches{against})"
            )
    if errors:
        sys.exit(1)
