"""``celery -A APP resilience ...``: look at and steer the fleet's breakers and switches.

Registered as a Celery sub-command (the ``celery.commands`` entry point). Every command
prints a rich table in a terminal and JSON with ``--json``.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from . import config
from .errors import PolicyError, StoreUnavailable
from .keys import digest
from .policy import TaskPolicy
from .runtime import Runtime, check_visibility_timeout, runtime_for
from .store.protocol import Forget
from .switches import MODES, breakers, close_breaker, reset_breaker, set_switch

__all__ = ["resilience", "server_ms", "status_rows"]


def _runtime(ctx: click.Context) -> Runtime:
    app = ctx.obj.app if ctx.obj is not None else None
    if app is None:
        raise click.UsageError("name the app: celery -A your.module resilience ...")
    try:
        return runtime_for(app)
    except PolicyError as exc:
        raise click.ClickException(str(exc)) from exc


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


def status_rows(raw: list[dict[str, str]], now_ms: int) -> list[dict[str, Any]]:
    """One plain row per breaker, as ``status`` shows it."""
    rows = []
    for fields in raw:
        calls, fails, slow, attempts, retries = _window(fields, now_ms)
        budget_left: float | None = None
        if "budget_ratio" in fields:
            allowed = float(fields["budget_ratio"]) * attempts + int(fields.get("budget_min", "0"))
            budget_left = max(0.0, allowed - retries)
        state = fields.get("state", "closed")
        open_until = int(fields.get("open_until", "0"))
        rows.append(
            {
                "downstream": fields.get("name", "?"),
                "state": state,
                "switch": fields.get("switch", "normal"),
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
    table = Table(title=title)
    columns = list(rows[0]) if rows else ["(none)"]
    for column in columns:
        table.add_column(column.replace("_", " "))
    for row in rows:
        table.add_row(*("-" if row[c] is None else str(row[c]) for c in columns))
    # Piped output is not cut to 80 columns: whoever reads it (less, a ticket) can wrap.
    Console(width=None if sys.stdout.isatty() else 240).print(table)


@click.group(name="resilience")
def resilience() -> None:
    """Breakers, switches and policies of resilient-tasks."""


@resilience.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Every known downstream: state, failure rate, calls, budget, switch."""
    runtime = _runtime(ctx)
    try:
        rows = status_rows(breakers(runtime), server_ms(runtime))
    except StoreUnavailable as exc:
        raise click.ClickException(str(exc)) from exc
    _print(rows, "resilience: downstreams", as_json)


def _switch(ctx: click.Context, name: str, mode: str, as_json: bool) -> None:
    runtime = _runtime(ctx)
    try:
        if mode == "close":
            previous = close_breaker(runtime, name)
        elif mode == "reset":
            previous = reset_breaker(runtime, name)
        else:
            previous = set_switch(runtime, name, mode)
    except StoreUnavailable as exc:
        raise click.ClickException(str(exc)) from exc
    result = {"downstream": name, "action": mode, "previous_switch": previous}
    click.echo(json.dumps(result) if as_json else f"{name}: {mode} (switch was {previous})")


def _action(command: str, mode: str, summary: str) -> None:
    """``open``, ``close`` and ``reset``: one downstream, one switch action."""

    @click.argument("name")
    @click.option("--json", "as_json", is_flag=True)
    @click.pass_context
    def action(ctx: click.Context, name: str, as_json: bool) -> None:
        _switch(ctx, name, mode, as_json)

    action.__doc__ = summary
    resilience.command(name=command)(action)


_action("open", "forced_open", "Force NAME's breaker open on every worker.")
_action("close", "close", "Close NAME's breaker now and clear its switch.")
_action("reset", "reset", "Forget NAME's window, state and switch.")


@resilience.command()
@click.argument("name")
@click.argument("mode", type=click.Choice(MODES))
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def degrade(ctx: click.Context, name: str, mode: str, as_json: bool) -> None:
    """Set NAME's degrade switch (normal, fallback_only, reject, ...)."""
    _switch(ctx, name, mode, as_json)


@resilience.command()
@click.argument("key")
@click.option("--task", "task_name", required=True, help="The task whose record to drop.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def forget(ctx: click.Context, key: str, task_name: str, yes: bool, as_json: bool) -> None:
    """Drop the idempotency record of KEY for a task: its next message runs the body again."""
    runtime = _runtime(ctx)
    record = digest(task_name, key)
    if not yes:
        click.confirm(
            f"Drop the idempotency record of {key!r} for {task_name}? The body may run again", abort=True
        )
    try:
        (removed,) = runtime.store.batch([Forget(record)])
    except StoreUnavailable as exc:
        raise click.ClickException(str(exc)) from exc
    result = {"task": task_name, "key": key, "record": record, "removed": bool(removed)}
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(f"{'removed' if removed else 'no record for'} {key!r} of {task_name}")


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


def _visibility_rule(app: Any) -> config.ExtraCheck:
    """The worker-start rule on the broker's visibility timeout, applied to a merged policy
    (on a stand-in of the task that carries it, so the rule is the runtime's own)."""

    def rule(name: str, policy: TaskPolicy) -> str | None:
        task = app.tasks[name]
        stand_in = object.__new__(type(task))
        stand_in.__dict__.update(vars(task))
        stand_in.policy = policy
        check_visibility_timeout(app, [stand_in])  # raises PolicyError naming the field
        return None

    return rule


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
    report = config.check(loaded, tasks, extra=_visibility_rule(app), strict=strict)
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
