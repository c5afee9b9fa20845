"""What a call did, told to OpenTelemetry, Prometheus, Celery events and Flower.

The pipeline calls ``report`` once an execution and its ``end`` round trip are over; it
reads the execution's typed ``Outcome`` record and reports:

- span attributes and events on the task span that ``opentelemetry-instrumentation-celery``
  opened (names in ``ATTRIBUTES``), when OpenTelemetry is installed;
- counters per outcome, and the breaker state per downstream, through the sinks the
  runtime holds (the OTel meter, the Prometheus exporter of ``resilient_tasks.prometheus``);
- a custom Celery event per notable outcome (``task-deduplicated``, ...) so Flower's
  ``/metrics`` counts them, and its task page and API show their fields once
  ``show_in_flower()`` ran in Flower's process (``flowerconfig.py``).

Events are sent only where Celery sends task events: ``celery worker -E`` (or
``worker_send_task_events = True``). A worker's ``-E`` reaches its prefork children; a
remote ``enable_events`` (Flower does one every few seconds) reaches only pools that run
tasks in the worker's own process (threads, solo, gevent, eventlet).
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Sequence
from typing import Any, Protocol

from celery import signals

from .guards.base import DEFERRALS_HEADER, Execution, Outcome

__all__ = [
    "ATTRIBUTES",
    "EVENTS",
    "FLOWER_FIELDS",
    "OUTCOMES",
    "STATE_CODES",
    "MetricsSink",
    "OTelMetrics",
    "classify",
    "event_field",
    "report",
    "show_in_flower",
    "task_events_enabled",
]

log = logging.getLogger(__name__)

OUTCOMES = (
    "executed",
    "failed",
    "retried",
    "deduplicated",
    "fallback_served",
    "rejected_open",
    "deferred",
    "budget_exhausted",
)
#: Celery event type per outcome (Flower counts events by type on its /metrics).
EVENTS = {
    "retried": "task-retry-scheduled",
    "deduplicated": "task-deduplicated",
    "fallback_served": "task-fallback-served",
    "rejected_open": "task-rejected-open",
    "deferred": "task-deferred",
    "budget_exhausted": "task-budget-exhausted",
}
#: Span attributes (DESIGN.md "Observability"); events carry them as ``event_field(name)``.
ATTRIBUTES = (
    "resilience.retry.attempt",
    "resilience.retry.is_retry",
    "resilience.retry.original_id",
    "resilience.retry.delay_s",
    "resilience.breaker.name",
    "resilience.breaker.state",
    "resilience.idempotency.outcome",
    "resilience.fallback.served",
    "resilience.fallback.source",
    "resilience.fallback.age_s",
    "resilience.deadline.remaining_s",
)


def event_field(attribute: str) -> str:
    """The Celery event field for a span attribute (``resilience.retry.attempt`` ->
    ``resilience_retry_attempt``): a plain name Flower can show as a task field."""
    return attribute.replace(".", "_")


#: Event fields naming the event's own outcome and every outcome of the call; the
#: others are ``event_field(attribute)``.
OUTCOME_FIELD = "resilience_outcome"
OUTCOMES_FIELD = "resilience_outcomes"
#: The event fields ``show_in_flower`` adds to Flower's task view (the task's own uuid,
#: ``resilience_retry_original_id``, is left out).
FLOWER_FIELDS = (
    OUTCOMES_FIELD,
    *(event_field(name) for name in ATTRIBUTES if name != "resilience.retry.original_id"),
)
#: Breaker states as gauge values.
STATE_CODES = {"closed": 0, "half_open": 1, "open": 2, "forced_open": 3, "disabled": 4}

try:  # OpenTelemetry is optional: the `otel` extra.
    from opentelemetry import context as otel_context
    from opentelemetry import metrics as otel_metrics
    from opentelemetry import trace as otel_trace
except ImportError:  # pragma: no cover - exercised where OTel is absent
    otel_trace = None  # type: ignore[assignment]
    otel_metrics = None  # type: ignore[assignment]
    otel_context = None  # type: ignore[assignment]


class MetricsSink(Protocol):
    """Where counters and gauges go (OTel meter, Prometheus)."""

    def outcome(self, outcome: str, task: str, downstream: str) -> None: ...

    def breaker_state(self, downstream: str, state: str) -> None: ...

    def fallback_age(self, task: str, downstream: str, age_s: float) -> None: ...

    def event(self, name: str, downstream: str) -> None:
        """One of ``Runtime.EXPORTED_EVENTS`` happened (store data loss, a completion
        not written, a policies reload refused, the store refusing us...)."""
        ...


def classify(ex: Execution, error: BaseException | None) -> list[str]:
    """The outcomes of one execution, from its ``Outcome`` record."""
    seen = ex.outcome
    found: list[str] = []
    if seen.retry_delay_s is not None:
        found.append("retried")
    if seen.deferred_s is not None:
        found.append("deferred")
    if seen.idempotency == "replayed":
        found.append("deduplicated")
    if seen.degraded:
        found.append("fallback_served")
    if seen.rejected_by is not None:
        found.append("rejected_open")
    if seen.retry == "budget_exhausted":
        found.append("budget_exhausted")
    if seen.body_ran and seen.body_error is None and "fallback_served" not in found:
        found.append("executed")
    if error is not None and not found:
        found.append("failed")
    return found


def attributes(ex: Execution) -> dict[str, Any]:
    """The span attributes of DESIGN.md for this execution; each event carries every
    one of them (None when it does not apply), so no field outlives its attempt."""
    seen = ex.outcome
    attempt = ex.attempt
    served = seen.degraded
    remaining = ex.remaining()
    return {
        "resilience.retry.attempt": attempt,
        "resilience.retry.is_retry": attempt > 0,
        "resilience.retry.original_id": str(ex.request.id or ""),
        "resilience.retry.delay_s": seen.retry_delay_s,
        "resilience.breaker.name": ex.policy.downstream or seen.rejected_by,
        "resilience.breaker.state": _shown_state(seen) if seen.breaker_state is not None else None,
        "resilience.idempotency.outcome": seen.idempotency,
        "resilience.fallback.served": served if ex.policy.fallback is not None else None,
        "resilience.fallback.source": seen.fallback_source if served else None,
        "resilience.fallback.age_s": seen.fallback_age_s if served else None,
        "resilience.deadline.remaining_s": round(remaining, 3) if remaining is not None else None,
    }


def _recording_span() -> Any:
    """The current span when OpenTelemetry records one, else None."""
    if otel_trace is None or not otel_context.get_current():
        return None  # an empty context holds no span: most calls, answered without the lookup
    span = otel_trace.get_current_span()
    return span if span.is_recording() else None


def _span(ex: Execution, span: Any, attrs: dict[str, Any]) -> None:
    span.set_attributes({k: v for k, v in attrs.items() if v is not None})
    for name, state in ex.outcome.transitions:
        span.add_event(
            "resilience.breaker.transition",
            {"resilience.breaker.name": str(name), "resilience.breaker.state": str(state)},
        )


# The worker of each app in this process, and the pid that started it: ``-E`` is a
# worker option, not a setting, so ``app.conf`` alone does not say whether it was given.
_WORKERS: weakref.WeakKeyDictionary[Any, tuple[weakref.ref[Any], int]] = weakref.WeakKeyDictionary()


def _remember_worker(sender: Any = None, **_: Any) -> None:
    app = getattr(sender, "app", None)
    if app is not None:
        _WORKERS[app] = (weakref.ref(sender), os.getpid())


signals.worker_init.connect(_remember_worker, weak=False, dispatch_uid="rt-telemetry-worker-init")


def task_events_enabled(task: Any) -> bool:
    """Does this worker send task events (``-E``, the setting, or a remote enable)?"""
    request = task.request
    if not request.hostname or request.is_eager:
        return False
    app = task.app
    if app.conf.worker_send_task_events:
        return True
    found = _WORKERS.get(app)
    worker = found[0]() if found is not None else None
    if worker is None:
        return False
    dispatcher = getattr(getattr(worker, "consumer", None), "event_dispatcher", None)
    if dispatcher is not None and found is not None and found[1] == os.getpid():
        # The worker's own dispatcher, live: follows enable_events/disable_events too.
        return bool(dispatcher.enabled and (not dispatcher.groups or "task" in dispatcher.groups))
    return bool(getattr(worker, "task_events", False))  # a prefork child: what -E said


#: Sent when a message that was retried or deferred before finally runs: Flower merges
#: every event of a task into one record, so this one overwrites the fields an earlier
#: attempt left (an open breaker, a retry delay) with this attempt's own.
SETTLED_EVENT = "task-settled"


def _settles(ex: Execution, outcomes: list[str]) -> bool:
    """An attempt that ends a task whose earlier attempts sent events."""
    earlier = ex.attempt > 0 or DEFERRALS_HEADER in ex.headers
    return earlier and "executed" in outcomes and EVENTS.keys().isdisjoint(outcomes)


def _events(ex: Execution, outcomes: list[str], attrs: dict[str, Any]) -> None:
    task = ex.task
    kinds = [(outcome, EVENTS[outcome]) for outcome in outcomes if outcome in EVENTS]
    if _settles(ex, outcomes):
        kinds.append(("executed", SETTLED_EVENT))
    if not kinds or not task_events_enabled(task):
        return
    fields: dict[str, Any] = {event_field(k): v for k, v in attrs.items()}
    fields[OUTCOMES_FIELD] = list(outcomes)
    for outcome, kind in kinds:
        try:
            task.send_event(kind, **{OUTCOME_FIELD: outcome}, **fields)
        except Exception as exc:  # an event is worth less than the task that sends it
            log.warning("could not send %s: %s", kind, exc)


def _shown_state(seen: Outcome) -> str:
    """The task's breaker as an operator would name it: a switch that holds it wins."""
    if seen.switch == "forced_open":
        return "forced_open"
    if seen.switch == "breaker_disabled":
        return "disabled"
    return str(seen.breaker_state)


#: The counter name of each outcome, made once.
_COUNTER_NAMES = {outcome: f"outcome.{outcome}" for outcome in OUTCOMES}


def report(ex: Execution, error: BaseException | None, sinks: Sequence[MetricsSink]) -> None:
    """Tell every channel what this execution did. Never raises."""
    try:
        outcomes = classify(ex, error)
        span = _recording_span()
        evented = not EVENTS.keys().isdisjoint(outcomes) or _settles(ex, outcomes)
        # Attributes only for a span that records or an event to send: most calls have
        # neither, and building them is most of this function's cost.
        attrs = attributes(ex) if span is not None or evented else {}
        if span is not None:
            _span(ex, span, attrs)
        runtime = ex.runtime
        seen = ex.outcome
        name = ex.task.name
        downstream = str(ex.policy.downstream or seen.rejected_by or "")
        for outcome in outcomes:
            # Namespaced: the guards count some of these events themselves
            # (``fallback_served``, ``rejected_open``, ...) under the bare name.
            runtime.count(_COUNTER_NAMES.get(outcome) or f"outcome.{outcome}", downstream)
            for sink in sinks:
                sink.outcome(outcome, name, downstream)
        if seen.transitions or (ex.policy.downstream and seen.breaker_state):
            states: dict[str, str] = {}
            if ex.policy.downstream and seen.breaker_state:
                states[ex.policy.downstream] = _shown_state(seen)
            for breaker, state in seen.transitions:
                states[breaker] = str(state)  # the latest transition of each breaker wins
            for breaker, state in states.items():
                for sink in sinks:
                    sink.breaker_state(breaker, state)
        if seen.fallback_age_s is not None and seen.degraded:
            for sink in sinks:
                sink.fallback_age(name, downstream, float(seen.fallback_age_s))
        if evented:
            _events(ex, outcomes, attrs)
    except Exception as exc:  # pragma: no cover - telemetry must never fail a task
        log.warning("telemetry failed: %s", exc)


class OTelMetrics:
    """Counters and gauges through the OpenTelemetry meter (no-op without an SDK).

    Without ``meter_provider`` it uses the global one, and a provider set later (in
    ``worker_process_init``, after ``install``) still receives the measurements.
    """

    def __init__(self, meter_provider: Any = None) -> None:
        assert otel_metrics is not None
        meter = otel_metrics.get_meter("resilient_tasks", meter_provider=meter_provider)
        self._meter = meter
        # Tallied here and read by the SDK when it collects: nothing of OTel's runs per call.
        self._tally: dict[tuple[str, str, str], int] = {}
        self._tally_lock = threading.Lock()
        meter.create_observable_counter(
            "resilience.outcomes",
            callbacks=[self._observe_outcomes],
            unit="{call}",
            description="task calls by resilience outcome",
        )
        self._ages = meter.create_histogram(
            "resilience.fallback.age", unit="s", description="age of fallback values served"
        )
        self._states: dict[str, int] = {}
        meter.create_observable_gauge(
            "resilience.breaker.state",
            callbacks=[self._observe],
            description="0 closed, 1 half-open, 2 open, 3 forced open, 4 disabled",
        )

    def _observe(self, options: Any) -> Any:
        from opentelemetry.metrics import Observation

        return [Observation(code, {"downstream": name}) for name, code in self._states.items()]

    def _observe_outcomes(self, options: Any) -> Any:
        from opentelemetry.metrics import Observation

        with self._tally_lock:
            tally = list(self._tally.items())
        return [
            Observation(count, {"outcome": outcome, "task": task, "downstream": downstream})
            for (outcome, task, downstream), count in tally
        ]

    def outcome(self, outcome: str, task: str, downstream: str) -> None:
        key = (outcome, task, downstream)
        with self._tally_lock:
            self._tally[key] = self._tally.get(key, 0) + 1

    def breaker_state(self, downstream: str, state: str) -> None:
        self._states[downstream] = STATE_CODES.get(state, -1)

    def fallback_age(self, task: str, downstream: str, age_s: float) -> None:
        self._ages.record(age_s, {"task": task, "downstream": downstream})

    def event(self, name: str, downstream: str) -> None:
        """Counted on ``resilience.events`` (attributes ``event``, ``downstream``), made
        with the first event: they are rare, and most processes never see one."""
        with self._tally_lock:
            counter = self.__dict__.get("_events")
            if counter is None:
                counter = self._events = self._meter.create_counter(
                    "resilience.events",
                    unit="{event}",
                    description="store data loss, completions not written, policies reloads refused, "
                    "store refusals (wrong password, ACL) and tampered fallbacks, by event",
                )
        counter.add(1, {"event": name, "downstream": downstream})


def default_sinks() -> list[MetricsSink]:
    """The OTel meter when OpenTelemetry is installed; Prometheus is added by its step."""
    return [OTelMetrics()] if otel_metrics is not None else []


def show_in_flower(task_class: Any = None) -> tuple[str, ...]:
    """Make Flower's task page and API show our event fields; call it in ``flowerconfig.py``.

    Flower merges every field of a custom task event into its task object, but shows a
    task only through ``celery.events.state.Task._fields``: ``/api/task/info``,
    ``/api/tasks``, the task page, the copy handed to ``format_task`` and persistent mode
    all drop other fields. This adds ``FLOWER_FIELDS`` to that class, in the process that
    calls it (Flower's). Returns the fields added.
    """
    if task_class is None:
        from celery.events.state import Task

        task_class = Task
    for name in FLOWER_FIELDS:
        if not hasattr(task_class, name):
            setattr(task_class, name, None)  # as_dict reads every field of every task
    added = tuple(name for name in FLOWER_FIELDS if name not in task_class._fields)
    task_class._fields = (*task_class._fields, *added)
    return added
