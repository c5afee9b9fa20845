"""The worker's Prometheus endpoint sums every prefork child: no per-child undercount.

A subprocess worker with the prefork pool, two children and ``--resilience-metrics-port``
runs N tasks; ``/metrics`` on the worker's main process must count exactly N executions.
"""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path

import pytest
from celery import Celery
from prometheus_client.parser import text_string_to_metric_families

from resilient_tasks.telemetry import STATE_CODES
from resilient_tasks.testing import RedisServer, SubprocessWorker, free_port, wait_until

APP = "tests.telemetry_app"
ROOT = Path(__file__).resolve().parents[2]
N = 40
FLAKY = 5

pytestmark = pytest.mark.timeout(120)


def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    """``/metrics`` as {sample name: [(labels, value), ...]}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return samples


def outcomes(samples: dict[str, list[tuple[dict[str, str], float]]], outcome: str, task: str) -> float:
    return sum(
        value
        for labels, value in samples.get("resilience_outcomes_total", [])
        if labels["outcome"] == outcome and labels["task"] == task
    )


def test_prefork_children_are_summed_exactly(rt_redis_flushed: RedisServer, tmp_path: Path) -> None:
    port = free_port()
    env = {
        "RT_BROKER_URL": rt_redis_flushed.url(0),
        "RESILIENT_TASKS_REDIS_URL": rt_redis_flushed.url(1),
        "RT_RESULT_BACKEND": rt_redis_flushed.url(2),
        "PYTHONPATH": str(ROOT),
    }
    assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ, "the step must make its own folder"
    log = tmp_path / "worker.log"
    worker = SubprocessWorker(
        APP,
        concurrency=2,
        pool="prefork",
        name="prom",
        env=env,
        extra=["--resilience-metrics-port", str(port), "--resilience-metrics-address", "127.0.0.1"],
        log=str(log),
    )
    producer = Celery(
        "p", broker=env["RT_BROKER_URL"], backend=env["RT_RESULT_BACKEND"], set_as_current=False
    )
    with worker:
        wait_until(lambda: producer.control.ping(timeout=0.5), timeout=60, interval=0.2, what="worker")
        # Each call sleeps a little so both children get work while the other is busy.
        results = [producer.send_task("telemetry.stock", args=[n, 0.05]) for n in range(N)]
        flaky = [producer.send_task("telemetry.flaky", args=[f"job-{n}", 1]) for n in range(FLAKY)]
        answers = [r.get(timeout=60) for r in results]
        assert [f.get(timeout=60) for f in flaky] == [f"job-{n} done after 1 retries" for n in range(FLAKY)]
        samples = scrape(port)
    producer.close()

    assert sorted(n for n, _ in answers) == list(range(N))
    children = {pid for _, pid in answers}
    assert len(children) == 2, f"both prefork children ran tasks: {children}"

    assert outcomes(samples, "executed", "telemetry.stock") == N
    assert outcomes(samples, "executed", "telemetry.flaky") == FLAKY
    assert outcomes(samples, "retried", "telemetry.flaky") == FLAKY
    assert sum(v for _, v in samples["resilience_outcomes_total"]) == N + 2 * FLAKY
    states = {labels["downstream"]: value for labels, value in samples["resilience_breaker_state"]}
    assert states == {"inventory": STATE_CODES["closed"]}
