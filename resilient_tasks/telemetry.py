"""What a call did, told to OpenTelemetry, Prometheus, Celery events and Flower.

The telemetry guard runs first in the chain. It reads ``call.outcome`` (filled by the
other guards) once the call and its ``end`` round trip are over, and reports:

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
from collections.abc import Callable
from typing import Any, Protocol

from celery import signals

from .call import Call
from .guards import Next

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
    "show_in_flower",
    "task_events_enabled",
    "telemetry_guard",
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
    from opentelemetry import metrics as otel_metrics
    from opentelemetry import trace as otel_trace
except ImportError:  # pragma: no cover - exercised where OTel is absent
    otel_trace = None  # type: ignore[assignment]
    otel_metrics = None  # type: ignore[assignment]


class MetricsSink(Protocol):
    """Where counters and gauges go (OTel meter, Prometheus)."""

    def outcome(self, outcome: str, task: str, downstream: str) -> None: ...

    def breaker_state(self, downstream: str, state: str) -> None: ...

    def fallback_age(self, task: str, downstream: str, age_s: float) -> None: ...


def classify(call: Call, error: BaseException | None) -> list[str]:
    """The outcomes of one call, from what the guards noted."""
    seen = call.outcome
    found: list[str] = []
    if "retry_delay_s" in seen:
        found.append("retried")
    if "deferred_s" in seen:
        found.append("deferred")
    if seen.get("idempotency") == "replayed":
        found.append("deduplicated")
    if seen.get("fallback_source") in ("cache", "function", "default"):
        found.append("fallback_served")
    if "breaker_rejected" in seen:
        found.append("rejected_open")
    if seen.get("retry") == "budget_exhausted":
        found.append("budget_exhausted")
    if call.body_ran and call.body_error is None and "fallback_served" not in found:
        found.append("executed")
    if error is not None and not found:
        found.append("failed")
    return found


def attributes(call: Call) -> dict[str, Any]:
    """The span attributes of DESIGN.md for this call."""
    seen = call.outcome
    request = call.request
    attrs: dict[str, Any] = {
        "resilience.retry.attempt": call.attempt,
        "resilience.retry.is_retry": call.attempt > 0,
        "resilience.retry.original_id": str(request.id or ""),
    }
    if "retry_delay_s" in seen:
        attrs["resilience.retry.delay_s"] = float(seen["retry_delay_s"])
    downstream = call.policy.downstream or seen.get("breaker_rejected")
    if downstream:
        attrs["resilience.breaker.name"] = str(downstream)
    if "breaker_state" in seen:
        attrs["resilience.breaker.state"] = str(seen["breaker_state"])
    if "idempotency" in seen:
        attrs["resilience.idempotency.outcome"] = str(seen["idempotency"])
    if call.policy.fallback is not None:
        served = seen.get("fallback_source") in ("cache", "function", "default")
        attrs["resilience.fallback.served"] = served
        if served:
            attrs["resilience.fallback.source"] = str(seen["fallback_source"])
            if seen.get("fallback_age_s") is not None:
                attrs["resilience.fallback.age_s"] = float(seen["fallback_age_s"])
    remaining = call.remaining()
    if remaining is not None:
        attrs["resilience.deadline.remaining_s"] = round(remaining, 3)
    return attrs


def _recording_span() -> Any:
    """The current span when OpenTelemetry records one, else None."""
    if otel_trace is None:
        return None
    span = otel_trace.get_current_span()
    return span if span.is_recording() else None


def _span(call: Call, span: Any, attrs: dict[str, Any]) -> None:
    span.set_attributes(attrs)
    for name, state in call.outcome.get("breaker_transitions", ()):
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


def _events(call: Call, outcomes: list[str], attrs: dict[str, Any]) -> None:
    task = call.task
    kinds = [(outcome, EVENTS[outcome]) for outcome in outcomes if outcome in EVENTS]
    if not kinds or not task_events_enabled(task):
        return
    fields: dict[str, Any] = {event_field(k): v for k, v in attrs.items()}
    fields[OUTCOMES_FIELD] = list(outcomes)
    for outcome, kind in kinds:
        try:
            task.send_event(kind, **{OUTCOME_FIELD: outcome}, **fields)
        except Exception as exc:  # an event is worth less than the task that sends it
            log.warning("could not send %s: %s", kind, exc)


def _shown_state(call: Call) -> str:
    """The task's breaker as an operator would name it: a switch that holds it wins."""
    switch = call.outcome.get("switch")
    if switch == "forced_open":
        return "forced_open"
    if switch == "breaker_disabled":
        return "disabled"
    return str(call.outcome.get("breaker_state"))


#: The counter name of each outcome, made once.
_COUNTER_NAMES = {outcome: f"outcome.{outcome}" for outcome in OUTCOMES}


def report(call: Call, error: BaseException | None) -> None:
    """Tell every channel what this call did. Never raises."""
    try:
        outcomes = classify(call, error)
        span = _recording_span()
        evented = not EVENTS.keys().isdisjoint(outcomes)
        # Attributes only for a span that records or an event to send: most calls have
        # neither, and building them is most of this function's cost.
        attrs = attributes(call) if span is not None or evented else {}
        if span is not None:
            _span(call, span, attrs)
        runtime = call.runtime
        name = call.task.name
        downstream = str(call.policy.downstream or call.outcome.get("breaker_rejected") or "")
        for outcome in outcomes:
            # Namespaced: the guards count some of these events themselves
            # (``fallback_served``, ``rejected_open``, ...) under the bare name.
            runtime.count(_COUNTER_NAMES.get(outcome) or f"outcome.{outcome}", downstream)
            for sink in runtime.sinks:
                sink.outcome(outcome, name, downstream)
        states: dict[str, str] = {}
        if call.policy.downstream and call.outcome.get("breaker_state"):
            states[call.policy.downstream] = _shown_state(call)
        for breaker, state in call.outcome.get("breaker_transitions", ()):
            states[breaker] = str(state)  # the latest transition of each breaker wins
        for breaker, state in states.items():
            for sink in runtime.sinks:
                sink.breaker_state(breaker, state)
        age = call.outcome.get("fallback_age_s")
        if age is not None:
            for sink in runtime.sinks:
                sink.fallback_age(name, downstream, float(age))
        if evented:
            _events(call, outcomes, attrs)
    except Exception as exc:  # pragma: no cover - telemetry must never fail a task
        log.warning("telemetry failed: %s", exc)


def telemetry_guard(call: Call, next: Next) -> Any:
    """First in the chain: reports once the call and its ``end`` trip are done."""
    call.finalizers.append(report)
    return next(call)


class OTelMetrics:
    """Counters and gauges through the OpenTelemetry meter (no-op without an SDK).

    Without ``meter_provider`` it uses the global one, and a provider set later (in
    ``worker_process_init``, after ``install``) still receives the measurements.
    """

    def __init__(self, meter_provider: Any = None) -> None:
        assert otel_metrics is not None
        meter = otel_metrics.get_meter("resilient_tasks", meter_provider=meter_provider)
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


Finalizer = Callable[[Call, BaseException | None], None]
