"""The worker's Prometheus endpoint: every prefork child summed, loopback only unless told,
prometheus-client's documented multiprocess mode, and nothing deleted that we did not make.

Subprocess workers (``celery -A tests.telemetry_app worker --resilience-metrics-port ...``)
run tasks; ``/metrics`` on the worker's main process is scraped like Prometheus would.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from prometheus_client.parser import text_string_to_metric_families

from resilient_tasks.prometheus import UNKNOWN_STATE
from resilient_tasks.telemetry import STATE_CODES
from resilient_tasks.testing import RedisServer, SubprocessWorker, free_port, wait_until

APP = "tests.telemetry_app"
ROOT = Path(__file__).resolve().parents[2]
N = 40
FLAKY = 5

pytestmark = pytest.mark.timeout(120)

Samples = dict[str, list[tuple[dict[str, str], float]]]


def metrics_text(port: int, host: str = "127.0.0.1") -> str:
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as answer:
        return str(answer.read().decode())


def scrape(port: int) -> Samples:
    """``/metrics`` as {sample name: [(labels, value), ...]}."""
    samples: Samples = {}
    for family in text_string_to_metric_families(metrics_text(port)):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return samples


def help_texts(port: int) -> dict[str, str]:
    return {
        family.name: family.documentation for family in text_string_to_metric_families(metrics_text(port))
    }


def outcomes(samples: Samples, outcome: str, task: str) -> float:
    return sum(
        value
        for labels, value in samples.get("resilience_outcomes_total", [])
        if labels["outcome"] == outcome and labels["task"] == task
    )


def answers(host: str, port: int) -> bool:
    """True when something accepts a TCP connection on host:port."""
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def worker_env(redis: RedisServer, **extra: str) -> dict[str, str]:
    return {
        "RT_BROKER_URL": redis.url(0),
        "RESILIENT_TASKS_REDIS_URL": redis.url(1),
        "RT_RESULT_BACKEND": redis.url(2),
        "PYTHONPATH": str(ROOT),
        **extra,
    }


@contextmanager
def metrics_worker(
    env: dict[str, str], log: Path, *extra: str, concurrency: int = 1, pool: str = "prefork"
) -> Iterator[tuple[int, Celery]]:
    """A worker serving metrics on a free port, ready, and a producer for it."""
    port = free_port()
    worker = SubprocessWorker(
        APP,
        concurrency=concurrency,
        pool=pool,
        name="prom",
        env=env,
        extra=["--resilience-metrics-port", str(port), *extra],
        log=str(log),
    )
    producer = Celery(
        "p", broker=env["RT_BROKER_URL"], backend=env["RT_RESULT_BACKEND"], set_as_current=False
    )
    try:
        with worker:
            wait_until(lambda: producer.control.ping(timeout=0.5), timeout=60, interval=0.2, what="worker")
            wait_until(lambda: answers("127.0.0.1", port), timeout=30, interval=0.2, what="/metrics")
            yield port, producer
    finally:
        producer.close()


def test_prefork_children_are_summed_exactly(rt_redis_flushed: RedisServer, tmp_path: Path) -> None:
    env = worker_env(rt_redis_flushed)
    assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ, "the step must make its own folder"
    log = tmp_path / "worker.log"
    with metrics_worker(env, log, "--loglevel", "INFO", concurrency=2) as (port, producer):
        # Each call sleeps a little so both children get work while the other is busy.
        results = [producer.send_task("telemetry.stock", args=[n, 0.05]) for n in range(N)]
        flaky = [producer.send_task("telemetry.flaky", args=[f"job-{n}", 1]) for n in range(FLAKY)]
        done = [r.get(timeout=60) for r in results]
        assert [f.get(timeout=60) for f in flaky] == [f"job-{n} done after 1 retries" for n in range(FLAKY)]
        samples = scrape(port)
        helps = help_texts(port)
        named = re.findall(r"/metrics from the files in (.+)$", log.read_text(), re.M)
        folder = Path(named[-1]) if named else None
        in_use = folder is not None and folder.is_dir() and any(folder.glob("*.db"))

    assert sorted(n for n, _ in done) == list(range(N))
    children = {pid for _, pid in done}
    assert len(children) == 2, f"both prefork children ran tasks: {children}"

    assert outcomes(samples, "executed", "telemetry.stock") == N
    assert outcomes(samples, "executed", "telemetry.flaky") == FLAKY
    assert outcomes(samples, "retried", "telemetry.flaky") == FLAKY
    assert sum(v for _, v in samples["resilience_outcomes_total"]) == N + 2 * FLAKY
    states = {labels["downstream"]: value for labels, value in samples["resilience_breaker_state"]}
    assert states == {"inventory": STATE_CODES["closed"]}

    # The help an operator reads names every value the gauge can take.
    listed = {
        int(code): name
        for code, name in re.findall(r"(-?\d+) ([a-z][a-z ]*)", helps["resilience_breaker_state"])
    }
    assert listed == {
        **{code: name.replace("_", " ") for name, code in STATE_CODES.items()},
        UNKNOWN_STATE: "unknown",
    }

    # With Flower installed the `celery` command imports prometheus_client before any worker
    # option is read: the worker restarts itself once with the variable set, patching nothing.
    assert folder is not None and in_use, f"the worker names the folder it made and counts there: {named}"
    if importlib.util.find_spec("flower") is not None:
        assert "restarting this worker once with PROMETHEUS_MULTIPROC_DIR=" in log.read_text()
    assert not folder.exists(), "the folder the worker made is removed when it exits"


@pytest.mark.skipif(sys.platform != "linux", reason="127.0.0.2 reaches the loopback interface on Linux")
@pytest.mark.parametrize(("address", "reachable"), [(None, False), ("0.0.0.0", True)])
def test_endpoint_listens_on_loopback_unless_told(
    rt_redis_flushed: RedisServer, tmp_path: Path, address: str | None, reachable: bool
) -> None:
    """127.0.0.2 is not 127.0.0.1: an endpoint bound to every interface answers there too."""
    extra = ["--resilience-metrics-address", address] if address else []
    env = worker_env(rt_redis_flushed)
    with metrics_worker(env, tmp_path / "worker.log", *extra, pool="solo") as (port, _):
        assert metrics_text(port) == ""  # nothing counted yet, but served
        assert answers("127.0.0.2", port) is reachable


def test_a_users_multiprocess_dir_is_used_as_it_is_and_nothing_in_it_deleted(
    rt_redis_flushed: RedisServer, tmp_path: Path
) -> None:
    folder = tmp_path / "prometheus"
    folder.mkdir()
    # The user's own program counted in the same directory before the worker started.
    code = "from prometheus_client import Counter; Counter('user_jobs', 'Jobs of the user').inc(7)"
    subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(folder)}, check=True
    )
    (folder / "notes.txt").write_text("not ours\n")
    theirs = {path.name: path.read_bytes() for path in folder.iterdir()}
    assert any(name.endswith(".db") for name in theirs), theirs

    log = tmp_path / "worker.log"
    env = worker_env(rt_redis_flushed, PROMETHEUS_MULTIPROC_DIR=str(folder))
    with metrics_worker(env, log) as (port, producer):
        assert producer.send_task("telemetry.stock", args=[1]).get(timeout=60)[0] == 1
        samples = scrape(port)
        assert {path.name: path.read_bytes() for path in folder.iterdir() if path.name in theirs} == theirs

    # Served from the directory as it is (prometheus-client sums every file in it) ...
    assert outcomes(samples, "executed", "telemetry.stock") == 1
    assert samples["user_jobs_total"] == [({}, 7.0)]
    # ... with a warning, and after the worker has gone the user's files and folder remain.
    assert f"PROMETHEUS_MULTIPROC_DIR={folder} already holds 1 .db file(s)" in log.read_text()
    assert {path.name: path.read_bytes() for path in folder.iterdir() if path.name in theirs} == theirs


def test_no_prometheus_client_internals_are_patched_when_it_came_first(tmp_path: Path) -> None:
    """Outside the ``celery`` command, prometheus_client imported without the variable is an error.

    prometheus-client picks single- or multi-process values when it is imported; switching
    afterwards means patching its internals, which the step must not do.
    """
    code = """
import json, os
import prometheus_client
from prometheus_client import values
before = values.ValueClass
from celery import Celery
from resilient_tasks.prometheus import MetricsStep

class Worker:
    app = Celery("embedded", set_as_current=False)

try:
    MetricsStep(Worker(), resilience_metrics_port=1)
    error = None
except Exception as exc:
    error = [type(exc).__name__, str(exc)]
print(json.dumps({
    "error": error,
    "same": values.ValueClass is before,
    "env": os.environ.get("PROMETHEUS_MULTIPROC_DIR"),
}))
"""
    env = {k: v for k, v in os.environ.items() if k.upper() != "PROMETHEUS_MULTIPROC_DIR"}
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, "PYTHONPATH": str(ROOT)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    assert result["same"], "prometheus_client's value class was swapped"
    assert result["env"] is None
    assert result["error"] is not None and result["error"][0] == "ImproperlyConfigured", result
    assert "set PROMETHEUS_MULTIPROC_DIR to an empty directory" in result["error"][1]
