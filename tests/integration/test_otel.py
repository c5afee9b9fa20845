"""OpenTelemetry on real worker spans: the attributes and events of DESIGN.md "Observability".

The real ``CeleryInstrumentor`` opens the ``run/<task>`` span of each execution in a real
in-process worker; the telemetry guard adds to it. Spans go to an in-memory exporter of a
tracer provider handed to the instrumentor (the global provider is never set in this
process), and metrics to an ``InMemoryMetricReader`` through an ``OTelMetrics`` sink made
on a meter provider of its own. The defaults (global providers set after ``install``, as
a worker does in ``worker_process_init``) and a process without OpenTelemetry at all run
in subprocesses, so nothing global leaks into other tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from opentelemetry.instrumentation.celery import CeleryInstrumentor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import resilient_tasks as rt
from resilient_tasks.runtime import runtime_for
from resilient_tasks.telemetry import STATE_CODES, OTelMetrics
from resilient_tasks.testing import RedisServer, in_process_worker

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def exporter() -> Iterator[InMemorySpanExporter]:
    """The real Celery instrumentation, on a provider of its own, for this module only."""
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    instrumentor = CeleryInstrumentor()
    if instrumentor.is_instrumented_by_opentelemetry:  # left on by someone else
        instrumentor.uninstrument()
    instrumentor.instrument(tracer_provider=provider)
    try:
        yield spans
    finally:
        instrumentor.uninstrument()
        provider.shutdown()


@pytest.fixture
def spans(exporter: InMemorySpanExporter) -> InMemorySpanExporter:
    exporter.clear()
    return exporter


@pytest.fixture
def reader(app: Celery) -> Iterator[InMemoryMetricReader]:
    """Measurements of this test's app only: a sink on a meter provider of its own."""
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    runtime_for(app).sinks.append(OTelMetrics(meter_provider=provider))
    yield reader
    provider.shutdown()


def run_spans(exporter: InMemorySpanExporter, task: Any) -> list[ReadableSpan]:
    """The worker's ``run/<task>`` spans of ``task``, oldest first."""
    found = [s for s in exporter.get_finished_spans() if s.name == f"run/{task.name}"]
    return sorted(found, key=lambda s: s.start_time or 0)


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def points(reader: InMemoryMetricReader, name: str) -> list[tuple[dict[str, Any], Any]]:
    data = reader.get_metrics_data()
    found = []
    for resource in data.resource_metrics if data else []:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == name:
                    found += [(dict(p.attributes or {}), p) for p in metric.data.data_points]
    return found


def outcome_counts(reader: InMemoryMetricReader) -> dict[str, int]:
    counts: dict[str, int] = {}
    for labels, point in points(reader, "resilience.outcomes"):
        counts[labels["outcome"]] = counts.get(labels["outcome"], 0) + int(point.value)
    return counts


def test_a_retry_chain_is_three_run_spans_of_one_task(
    app: Celery, spans: InMemorySpanExporter, reader: InMemoryMetricReader
) -> None:
    @app.task(
        base=rt.ResilientTask,
        bind=True,
        shared=False,
        name="otel.flaky",
        policy=rt.TaskPolicy(
            idempotent=True, retry=rt.RetryPolicy(max_retries=3, base=0.05, cap=0.1, budget=None)
        ),
    )
    def flaky(self: rt.ResilientTask, job: str) -> str:
        if self.request.retries < 2:
            raise ConnectionError(f"{job}: attempt {self.request.retries}")
        return "done"

    # One pool thread: the instrumentation files spans by task id, and a retry keeps the
    # id, so a retry that starts in a second thread before the first attempt's postrun
    # would be filed over it (threads pool only; prefork children do not share the map).
    with in_process_worker(app, concurrency=1):
        result = flaky.delay("report")
        assert result.get(timeout=30) == "done"

    runs = run_spans(spans, flaky)
    assert len(runs) == 3
    seen = [attrs(s) for s in runs]
    assert [a["resilience.retry.attempt"] for a in seen] == [0, 1, 2]
    assert [a["resilience.retry.is_retry"] for a in seen] == [False, True, True]
    assert {a["resilience.retry.original_id"] for a in seen} == {result.id}
    assert all(a["messaging.message.id"] == result.id for a in seen), "the instrumentation's own span"
    for a in seen[:2]:
        assert 0.0 <= a["resilience.retry.delay_s"] <= 0.1, "scheduled a retry: its countdown"
        assert a["celery.state"] == "RETRY"
    assert "resilience.retry.delay_s" not in seen[2]
    assert seen[2]["celery.state"] == "SUCCESS"
    assert all("resilience.deadline.remaining_s" not in a for a in seen), "no deadline, no attribute"
    assert all("resilience.fallback.served" not in a for a in seen), "no fallback policy"

    assert outcome_counts(reader) == {"retried": 2, "executed": 1}
    labels = {tuple(sorted(lab.items())) for lab, _ in points(reader, "resilience.outcomes")}
    assert (("downstream", ""), ("outcome", "retried"), ("task", "otel.flaky")) in labels


def test_a_replay_says_replayed(
    app: Celery, spans: InMemorySpanExporter, reader: InMemoryMetricReader
) -> None:
    charges: list[str] = []

    @app.task(
        base=rt.ResilientTask,
        bind=True,
        shared=False,
        name="otel.charge",
        policy=rt.TaskPolicy(idempotency=rt.IdempotencyPolicy(key=("order",))),
    )
    def charge(self: rt.ResilientTask, order: str) -> str:
        charges.append(order)
        return f"charged {order}"

    with in_process_worker(app, concurrency=1):
        assert charge.delay("o-1").get(timeout=30) == "charged o-1"
        assert charge.delay("o-1").get(timeout=30) == "charged o-1"

    assert charges == ["o-1"]
    first, second = (attrs(s) for s in run_spans(spans, charge))
    assert first["resilience.idempotency.outcome"] == "claimed"
    assert second["resilience.idempotency.outcome"] == "replayed"
    assert outcome_counts(reader) == {"executed": 1, "deduplicated": 1}


def test_a_fallback_says_served_source_and_age(
    app: Celery, spans: InMemorySpanExporter, reader: InMemoryMetricReader
) -> None:
    down = threading.Event()

    @app.task(
        base=rt.ResilientTask,
        bind=True,
        shared=False,
        name="otel.price",
        policy=rt.TaskPolicy(
            downstream="pricing",
            breaker=rt.BreakerPolicy(min_calls=1000, when_open="fallback"),
            fallback=rt.FallbackPolicy(key=("sku",), ttl=300),
        ),
    )
    def price(self: rt.ResilientTask, sku: str) -> dict[str, object]:
        if down.is_set():
            raise ConnectionError("pricing is down")
        return {"sku": sku, "price": 7}

    with in_process_worker(app, concurrency=1):
        price.delay("a").get(timeout=30)
        down.set()
        _, info = rt.unwrap(price.delay("a").get(timeout=30))

    assert info is not None and info.source == "cache" and info.age_s is not None
    fresh, served = (attrs(s) for s in run_spans(spans, price))
    assert fresh["resilience.fallback.served"] is False
    assert "resilience.fallback.source" not in fresh
    assert served["resilience.fallback.served"] is True
    assert served["resilience.fallback.source"] == "cache"
    assert served["resilience.fallback.age_s"] == info.age_s
    assert served["resilience.breaker.name"] == "pricing"
    assert served["resilience.breaker.state"] == "closed"

    assert outcome_counts(reader) == {"executed": 1, "fallback_served": 1}
    ((labels, ages),) = points(reader, "resilience.fallback.age")
    assert labels == {"task": "otel.price", "downstream": "pricing"}
    assert ages.count == 1 and ages.sum == info.age_s


def test_a_breaker_transition_is_a_span_event(
    app: Celery, spans: InMemorySpanExporter, reader: InMemoryMetricReader
) -> None:
    @app.task(
        base=rt.ResilientTask,
        bind=True,
        shared=False,
        name="otel.ledger",
        policy=rt.TaskPolicy(
            downstream="ledger",
            breaker=rt.BreakerPolicy(min_calls=2, failure_rate=0.5, open_for=300, when_open="fallback"),
            fallback=rt.FallbackPolicy(key=("n",), default="stale"),
        ),
    )
    def ledger(self: rt.ResilientTask, n: int) -> str:
        raise ConnectionError("ledger is down")

    with in_process_worker(app, concurrency=1):
        answers = [rt.unwrap(ledger.delay(n).get(timeout=30)) for n in range(3)]

    assert [(value, info.source if info else None) for value, info in answers] == [("stale", "default")] * 3
    runs = run_spans(spans, ledger)
    assert [attrs(s)["resilience.breaker.state"] for s in runs] == ["closed", "closed", "open"]
    events = [[e for e in s.events if e.name == "resilience.breaker.transition"] for s in runs]
    assert [len(e) for e in events] == [0, 1, 0], "the second failure trips it, once"
    assert dict(events[1][0].attributes or {}) == {
        "resilience.breaker.name": "ledger",
        "resilience.breaker.state": "open",
    }
    assert outcome_counts(reader) == {"fallback_served": 3, "rejected_open": 1}
    gauge = {
        labels["downstream"]: point.value for labels, point in points(reader, "resilience.breaker.state")
    }
    assert gauge == {"ledger": STATE_CODES["open"]}


def test_a_deadline_shows_the_time_left(app: Celery, spans: InMemorySpanExporter) -> None:
    @app.task(
        base=rt.ResilientTask, bind=True, shared=False, name="otel.timed", policy=rt.TaskPolicy(deadline=30)
    )
    def timed(self: rt.ResilientTask) -> str:
        return "ok"

    with in_process_worker(app, concurrency=1):
        assert timed.delay().get(timeout=30) == "ok"

    (run,) = run_spans(spans, timed)
    assert 0 < attrs(run)["resilience.deadline.remaining_s"] <= 30


def _script(body: str, redis: RedisServer) -> dict[str, Any]:
    """Run ``body`` in a fresh interpreter (its last stdout line is JSON) and parse it."""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "RT_BROKER_URL": redis.url(0),
        "RESILIENT_TASKS_REDIS_URL": redis.url(1),
        "RT_RESULT_BACKEND": redis.url(2),
    }
    done = subprocess.run(
        [sys.executable, "-c", body], env=env, capture_output=True, text=True, timeout=50, cwd=str(ROOT)
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


_APP = """
import json, os, sys
from celery import Celery
import resilient_tasks as rt
from resilient_tasks.runtime import runtime_for
from resilient_tasks.testing import in_process_worker

app = Celery("sub", broker=os.environ["RT_BROKER_URL"], backend=os.environ["RT_RESULT_BACKEND"],
             set_as_current=False)
app.conf.update(broker_transport_options={"visibility_timeout": 3600}, worker_prefetch_multiplier=1,
                broker_connection_retry_on_startup=True, worker_send_task_events=True)
rt.install(app, redis_url=os.environ["RESILIENT_TASKS_REDIS_URL"])

@app.task(base=rt.ResilientTask, bind=True, name="sub.flaky",
          policy=rt.TaskPolicy(idempotent=True, deadline=60,
                               retry=rt.RetryPolicy(max_retries=2, base=0.01, cap=0.02, budget=None),
                               fallback=rt.FallbackPolicy(key=("n",), default="fallback")))
def flaky(self, n):
    if self.request.retries < 1:
        raise ConnectionError("first attempt fails")
    if n == "down":
        raise ConnectionError("always down")
    return "ok"
"""


def test_telemetry_runs_without_opentelemetry(rt_redis_flushed: RedisServer) -> None:
    body = (
        "import sys\nsys.modules['opentelemetry'] = None  # `import opentelemetry` now fails\n"
        + _APP
        + """
try:
    import opentelemetry
except ImportError:
    blocked = True
else:
    blocked = False
from resilient_tasks import telemetry
runtime = runtime_for(app)
eager = flaky.apply(args=["x"]).get()  # eager: retries run in line
with in_process_worker(app, concurrency=1):
    worker = [flaky.delay("x").get(timeout=20), flaky.delay("down").get(timeout=20)]
print(json.dumps({
    "blocked": blocked,
    "otel": telemetry.otel_trace is not None or telemetry.otel_metrics is not None,
    "sinks": [type(s).__name__ for s in runtime.sinks],
    "eager": eager,
    "worker": worker,
    "counts": {k[0]: v for k, v in runtime.counters.items() if k[0].startswith("outcome.")},
}))
"""
    )
    seen = _script(body, rt_redis_flushed)
    assert seen["blocked"] is True and seen["otel"] is False
    assert seen["sinks"] == []
    assert seen["eager"] == "ok"
    assert seen["worker"][0] == "ok"
    assert rt.unwrap(seen["worker"][1])[1] is not None, "the fallback envelope"
    assert seen["counts"] == {"outcome.retried": 4, "outcome.executed": 2, "outcome.fallback_served": 1}


def test_global_providers_set_after_install_still_get_everything(rt_redis_flushed: RedisServer) -> None:
    """What a worker does: ``install`` at import, the SDK in ``worker_process_init``."""
    body = (
        _APP
        + """
from opentelemetry import metrics, trace
from opentelemetry.instrumentation.celery import CeleryInstrumentor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

exporter, reader = InMemorySpanExporter(), InMemoryMetricReader()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)
metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
CeleryInstrumentor().instrument()
with in_process_worker(app, concurrency=1):
    flaky.delay("down").get(timeout=20)
runs = sorted((s for s in exporter.get_finished_spans() if s.name == "run/sub.flaky"),
              key=lambda s: s.start_time)
outcomes = {}
for rm in reader.get_metrics_data().resource_metrics:
    for sm in rm.scope_metrics:
        for m in sm.metrics:
            if m.name == "resilience.outcomes":
                for p in m.data.data_points:
                    outcomes[p.attributes["outcome"]] = p.value
print(json.dumps({"spans": [dict(s.attributes) for s in runs], "outcomes": outcomes}))
"""
    )
    seen = _script(body, rt_redis_flushed)
    first, second, last = seen["spans"]  # two retries, then the fallback once they are spent
    assert [s["resilience.retry.attempt"] for s in seen["spans"]] == [0, 1, 2]
    assert "resilience.retry.delay_s" in first and "resilience.retry.delay_s" in second
    assert first["resilience.fallback.served"] is False
    assert last["resilience.fallback.served"] is True
    assert last["resilience.fallback.source"] == "default"
    assert "resilience.fallback.age_s" not in last, "only a cached value has an age"
    assert 0 < last["resilience.deadline.remaining_s"] <= 60
    assert seen["outcomes"] == {"retried": 2, "fallback_served": 1}
