"""What a call did, told to OpenTelemetry, Prometheus, Celery events and Flower.

The telemetry guard runs first in the chain. It reads ``call.outcome`` (filled by the
other guards) once the call and its ``end`` round trip are over, and reports:

- span attributes and events on the task span that ``opentelemetry-instrumentation-celery``
  opened (names in ``ATTRIBUTES``), when OpenTelemetry is installed;
- counters per outcome, and the breaker state per downstream, through the sinks the
  runtime holds (the OTel meter, the Prometheus exporter of ``resilient_tasks.prometheus``);
- a custom Celery event per notable outcome (``task-deduplicated``, ...) so Flower's task
  page, its API and its ``/metrics`` show them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

from .call import Call
from .guards import Next

__all__ = ["EVENTS", "OUTCOMES", "STATE_CODES", "MetricsSink", "classify", "telemetry_guard"]

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


def _span(call: Call, attrs: dict[str, Any]) -> None:
    if otel_trace is None:
        return
    span = otel_trace.get_current_span()
    if not span.is_recording():
        return
    span.set_attributes(attrs)
    transition = call.outcome.get("breaker_transition")
    if transition:
        span.add_event(
            "resilience.breaker.transition",
            {"resilience.breaker.name": str(call.policy.downstream), "resilience.breaker.state": transition},
        )


def _events(call: Call, outcomes: list[str], attrs: dict[str, Any]) -> None:
    task = call.task
    if not task.app.conf.worker_send_task_events or not task.request.hostname:
        return
    fields = {k.replace(".", "_"): v for k, v in attrs.items()}
    for outcome in outcomes:
        kind = EVENTS.get(outcome)
        if kind is None:
            continue
        try:
            task.send_event(kind, resilience_outcome=outcome, **fields)
        except Exception as exc:  # an event is worth less than the task that sends it
            log.warning("could not send %s: %s", kind, exc)


def report(call: Call, error: BaseException | None) -> None:
    """Tell every channel what this call did. Never raises."""
    try:
        outcomes = classify(call, error)
        attrs = attributes(call)
        _span(call, attrs)
        runtime = call.runtime
        name = call.task.name
        downstream = str(call.policy.downstream or call.outcome.get("breaker_rejected") or "")
        for outcome in outcomes:
            runtime.count(outcome, downstream)
            for sink in runtime.sinks:
                sink.outcome(outcome, name, downstream)
        state = call.outcome.get("breaker_transition") or call.outcome.get("breaker_state")
        if downstream and state:
            for sink in runtime.sinks:
                sink.breaker_state(downstream, str(state))
        age = call.outcome.get("fallback_age_s")
        if age is not None:
            for sink in runtime.sinks:
                sink.fallback_age(name, downstream, float(age))
        _events(call, outcomes, attrs)
    except Exception as exc:  # pragma: no cover - telemetry must never fail a task
        log.warning("telemetry failed: %s", exc)


def telemetry_guard(call: Call, next: Next) -> Any:
    """First in the chain: reports once the call and its ``end`` trip are done."""
    call.finalizers.append(report)
    return next(call)


class OTelMetrics:
    """Counters and gauges through the OpenTelemetry meter (no-op without an SDK)."""

    def __init__(self) -> None:
        assert otel_metrics is not None
        meter = otel_metrics.get_meter("resilient_tasks")
        self._outcomes = meter.create_counter(
            "resilience.outcomes", unit="{call}", description="task calls by resilience outcome"
        )
        self._ages = meter.create_histogram(
            "resilience.fallback.age", unit="s", description="age of fallback values served"
        )
        self._states: dict[str, int] = {}
        meter.create_observable_gauge(
            "resilience.breaker.state",
            callbacks=[self._observe],
            description="0 closed, 1 half-open, 2 open, 3 forced open",
        )

    def _observe(self, options: Any) -> Any:
        from opentelemetry.metrics import Observation

        return [Observation(code, {"downstream": name}) for name, code in self._states.items()]

    def outcome(self, outcome: str, task: str, downstream: str) -> None:
        self._outcomes.add(1, {"outcome": outcome, "task": task, "downstream": downstream})

    def breaker_state(self, downstream: str, state: str) -> None:
        self._states[downstream] = STATE_CODES.get(state, -1)

    def fallback_age(self, task: str, downstream: str, age_s: float) -> None:
        self._ages.record(age_s, {"task": task, "downstream": downstream})


def default_sinks() -> list[MetricsSink]:
    """The OTel meter when OpenTelemetry is installed; Prometheus is added by its step."""
    return [OTelMetrics()] if otel_metrics is not None else []


Finalizer = Callable[[Call, BaseException | None], None]
