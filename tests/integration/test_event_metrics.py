"""Events an operator alerts on leave the process: store data loss (``store_amnesia``),
completions not written (``end_lost``), refused policies reloads and a store that refuses
us (``store_misconfigured``) are OTel (``resilience.events``) and Prometheus
(``resilience_events_total``) counters, not only ``runtime.counters``."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

import resilient_tasks as rt
from resilient_tasks.runtime import Runtime, runtime_for
from resilient_tasks.telemetry import OTelMetrics
from resilient_tasks.testing import RedisServer, in_process_worker, wait_until
from tests.integration.test_prometheus import Samples, metrics_worker, scrape, worker_env
from tests.integration.test_tls_acl import ACL_RULES

pytestmark = pytest.mark.timeout(120)


def events(samples: Samples, event: str) -> float:
    return sum(
        value for labels, value in samples.get("resilience_events_total", []) if labels["event"] == event
    )


def bump(path: Path) -> None:
    """A new mtime for sure (some filesystems keep whole seconds)."""
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))


def test_a_refused_reload_shows_on_a_real_workers_prometheus_endpoint(
    rt_redis_flushed: RedisServer, tmp_path: Path
) -> None:
    policies = tmp_path / "policies.toml"
    policies.write_text("[defaults.breaker]\nmin_calls = 11\n")
    env = worker_env(
        rt_redis_flushed, RESILIENT_TASKS_POLICIES=str(policies), RESILIENT_TASKS_RELOAD_INTERVAL="0"
    )
    with metrics_worker(env, tmp_path / "worker.log") as (port, producer):
        assert producer.send_task("telemetry.stock", args=[1]).get(timeout=60)[0] == 1
        assert events(scrape(port), "policy_reload_refused") == 0
        policies.write_text("downstreams = 5\n")  # the wrong shape: refused, the last good file stays
        bump(policies)
        assert [producer.send_task("telemetry.stock", args=[n]).get(timeout=60)[0] for n in (2, 3)] == [2, 3]
        samples = scrape(port)
    assert events(samples, "policy_reload_refused") == 1, samples.get("resilience_events_total")


def test_a_store_refusal_at_run_time_shows_on_the_endpoint_and_as_one_error_line(
    rt_redis_flushed: RedisServer, tmp_path: Path
) -> None:
    admin = rt_redis_flushed.client()
    admin.execute_command("ACL", "SETUSER", "rt-worker", "reset", *ACL_RULES)
    url = f"redis://rt-worker:s3cret-pw@127.0.0.1:{rt_redis_flushed.port}/1"
    log = tmp_path / "worker.log"
    env = worker_env(rt_redis_flushed, RESILIENT_TASKS_REDIS_URL=url)
    try:
        with metrics_worker(env, log) as (port, producer):
            assert producer.send_task("telemetry.charge", args=["o-1", 100]).get(timeout=60)["charged"] == 100
            admin.execute_command("ACL", "SETUSER", "rt-worker", "-evalsha")  # tightened under the worker
            deferred = producer.send_task("telemetry.charge", args=["o-2", 200])
            wait_until(
                lambda: events(scrape(port), "store_misconfigured") >= 1,
                timeout=30,
                interval=0.3,
                what="counted",
            )
            admin.execute_command("ACL", "SETUSER", "rt-worker", "+evalsha")
            assert deferred.get(timeout=60)["charged"] == 200, "deferred while refused, run once fixed"
    finally:
        admin.execute_command("ACL", "DELUSER", "rt-worker")
        admin.close()
    text = log.read_text()
    refused = re.findall(r"ERROR.*refused resilient-tasks.*", text)
    assert len(refused) == 1, text  # the same refusal is logged once per interval, counted every time
    assert "+evalsha" in refused[0] and f"redis://***@127.0.0.1:{rt_redis_flushed.port}/1" in refused[0]
    assert "s3cret-pw" not in text


# -- OpenTelemetry ----------------------------------------------------------------------


@pytest.fixture
def reader_for() -> Iterator[Callable[[Celery], InMemoryMetricReader]]:
    providers: list[MeterProvider] = []

    def attach(app: Celery) -> InMemoryMetricReader:
        reader = InMemoryMetricReader()
        provider = MeterProvider(metric_readers=[reader])
        providers.append(provider)
        runtime_for(app).sinks.append(OTelMetrics(meter_provider=provider))
        return reader

    yield attach
    for provider in providers:
        provider.shutdown()


def otel_events(reader: InMemoryMetricReader) -> dict[tuple[str, str], int]:
    data = reader.get_metrics_data()
    found: dict[tuple[str, str], int] = {}
    for resource in data.resource_metrics if data else []:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == "resilience.events":
                    for point in metric.data.data_points:
                        labels: dict[str, Any] = dict(point.attributes or {})
                        found[(labels["event"], labels["downstream"])] = int(point.value)
    return found


def test_store_data_loss_is_an_otel_counter(
    app_factory: Callable[..., Celery],
    rt_redis_flushed: RedisServer,
    store_client: Any,
    reader_for: Callable[[Celery], InMemoryMetricReader],
) -> None:
    app = app_factory()
    rt.install(app, redis_url=rt_redis_flushed.url(1))
    reader = reader_for(app)

    @app.task(base=rt.ResilientTask, bind=True, shared=False, policy=rt.TaskPolicy(
        idempotency=rt.IdempotencyPolicy(key=("job",), lease=1.5),
    ))  # fmt: skip
    def job(self: rt.ResilientTask, job: str) -> str:
        return job

    runtime = runtime_for(app)
    with in_process_worker(app, concurrency=1):
        assert job.delay("k1").get(timeout=20) == "k1"
        assert otel_events(reader) == {}
        store_client.flushdb()  # a restart without persistence: data gone, connections dropped
        for client in store_client.client_list():
            if client["db"] == "1" and client["cmd"] != "client|list":
                store_client.client_kill_filter(_id=client["id"])
        assert job.delay("k2").get(timeout=30) == "k2"
    amnesia = runtime.counters[("store_amnesia", "")]
    assert amnesia >= 1
    assert otel_events(reader) == {("store_amnesia", ""): amnesia}


def test_only_the_alerting_events_are_exported_and_a_failing_sink_is_harmless(
    app_factory: Callable[..., Celery],
) -> None:
    app = app_factory()
    runtime: Runtime = rt.install(app, redis_url="redis://127.0.0.1:1/1")
    told: list[tuple[str, str]] = []

    class Recording:
        def outcome(self, outcome: str, task: str, downstream: str) -> None: ...

        def breaker_state(self, downstream: str, state: str) -> None: ...

        def fallback_age(self, task: str, downstream: str, age_s: float) -> None: ...

        def event(self, name: str, downstream: str) -> None:
            told.append((name, downstream))

    class Broken(Recording):
        def event(self, name: str, downstream: str) -> None:
            raise RuntimeError("exporter down")

    runtime.sinks[:] = [Broken(), Recording()]
    for name in ("end_lost", "outcome.executed", "store_amnesia", "breaker_local", "fallback_tampered"):
        runtime.count(name, "pricing" if name == "fallback_tampered" else "")
    assert told == [("end_lost", ""), ("store_amnesia", ""), ("fallback_tampered", "pricing")]
    assert runtime.counters[("outcome.executed", "")] == 1
    assert {
        "store_amnesia",
        "end_lost",
        "policy_reload_refused",
        "store_misconfigured",
    } <= Runtime.EXPORTED_EVENTS
