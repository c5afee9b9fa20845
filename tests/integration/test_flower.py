"""Flower against a real worker: what an operator sees of retries, dedup hits and fallbacks.

A subprocess worker started with ``-E`` (prefork, so the events come from a pool child)
runs tasks that retry, replay and fall back; two real Flower processes read the events
from the test's own redis-server: one as Flower ships, one whose ``flowerconfig.py`` calls
``resilient_tasks.telemetry.show_in_flower()``. Both are read over their HTTP API and
``/metrics``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from prometheus_client.parser import text_string_to_metric_families

from resilient_tasks.telemetry import FLOWER_FIELDS
from resilient_tasks.testing import RedisServer, SubprocessWorker, free_port, stop_process, wait_until

APP = "tests.telemetry_app"
PRICING_DOWN = "telemetry:pricing:down"  # tests/telemetry_app.py (it reads its env at import)
ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(120)


def http_get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as answer:
        return str(answer.read().decode())


class Flower:
    """``celery -A APP flower`` on a free loopback port, with the API enabled."""

    def __init__(self, env: dict[str, str], log: Path, conf: Path | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            APP,
            "flower",
            f"--port={self.port}",
            "--address=127.0.0.1",
            # Without --conf Flower reads ./flowerconfig.py if there is one: name one that
            # does nothing so the test does not depend on the working directory.
            f"--conf={conf or log.with_suffix('.noconf.py')}",
        ]
        if conf is None:
            log.with_suffix(".noconf.py").write_text("# plain Flower\n")
        self.log = log.open("wb")
        self.process = subprocess.Popen(
            command,
            env={**os.environ, **env, "FLOWER_UNAUTHENTICATED_API": "true"},
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=str(log.parent),
        )

    def get(self, path: str) -> str | None:
        if self.process.poll() is not None:
            raise RuntimeError(f"flower exited with {self.process.returncode}; see {self.log.name}")
        try:
            return http_get(self.url + path)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return None

    def api(self, path: str) -> Any:
        text = self.get(path)
        return json.loads(text) if text is not None else None

    def task(self, task_id: str) -> dict[str, Any] | None:
        try:
            found = self.api(f"/api/task/info/{task_id}")
        except urllib.error.HTTPError:  # 404 until its first event arrives
            return None
        return dict(found) if found else None

    def events(self) -> dict[tuple[str, str], float]:
        """``flower_events_total`` as {(task, event type): count}."""
        text = self.get("/metrics") or ""
        counts: dict[tuple[str, str], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "flower_events_total":
                    key = (sample.labels["task"], sample.labels["type"])
                    counts[key] = counts.get(key, 0.0) + sample.value
        return counts

    def sees_worker(self, prefix: str) -> bool:
        text = self.get("/metrics") or ""
        return bool(re.search(rf'flower_worker_online\{{worker="{prefix}@[^"]*"\}} 1\.0', text))

    def stop(self) -> None:
        stop_process(self.process)
        self.log.close()


@pytest.fixture
def env(rt_redis_flushed: RedisServer) -> dict[str, str]:
    return {
        "RT_BROKER_URL": rt_redis_flushed.url(0),
        "RESILIENT_TASKS_REDIS_URL": rt_redis_flushed.url(1),
        "RT_RESULT_BACKEND": rt_redis_flushed.url(2),
        "PYTHONPATH": str(ROOT),
    }


@pytest.fixture
def flowers(env: dict[str, str], tmp_path: Path) -> Iterator[tuple[Flower, Flower]]:
    conf = tmp_path / "flowerconfig.py"
    conf.write_text("from resilient_tasks.telemetry import show_in_flower\n\nshow_in_flower()\n")
    plain = Flower(env, tmp_path / "flower-plain.log")
    configured = Flower(env, tmp_path / "flower-rt.log", conf=conf)
    try:
        yield plain, configured
    finally:
        plain.stop()
        configured.stop()


def test_flower_shows_retries_dedup_hits_and_fallbacks(
    env: dict[str, str], flowers: tuple[Flower, Flower], rt_redis_flushed: RedisServer, tmp_path: Path
) -> None:
    plain, configured = flowers
    worker = SubprocessWorker(
        APP, concurrency=1, name="tel", env=env, extra=["-E"], log=str(tmp_path / "worker.log")
    )
    producer = Celery(
        "p", broker=env["RT_BROKER_URL"], backend=env["RT_RESULT_BACKEND"], set_as_current=False
    )
    with worker:
        # Events are fanned out as they happen: a Flower that is not listening yet misses
        # them. Each has heard the worker's heartbeat once it is listening.
        for flower in (plain, configured):
            wait_until(lambda f=flower: f.sees_worker("tel"), timeout=45, interval=0.25, what="flower")

        retried = producer.send_task("telemetry.flaky", args=["nightly-report", 2])
        assert retried.get(timeout=30) == "nightly-report done after 2 retries"
        first = producer.send_task("telemetry.charge", args=["order-17", 1299])
        assert first.get(timeout=30) == {"order": "order-17", "charged": 1299}
        replay = producer.send_task("telemetry.charge", args=["order-17", 1299])
        assert replay.get(timeout=30) == {"order": "order-17", "charged": 1299}
        assert producer.send_task("telemetry.price", args=["sku-9"]).get(timeout=30) == {
            "sku": "sku-9",
            "price": 42,
        }
        rt_redis_flushed.client(1).set(PRICING_DOWN, 1)
        served = producer.send_task("telemetry.price", args=["sku-9"])
        envelope = served.get(timeout=30)
        assert envelope["rt_degraded"] is True and envelope["source"] == "cache"

        # /metrics: Flower counts our custom event types per task name.
        expected = {
            ("telemetry.flaky", "task-retry-scheduled"): 2.0,
            ("telemetry.flaky", "task-retried"): 2.0,
            ("telemetry.flaky", "task-settled"): 1.0,
            ("telemetry.charge", "task-deduplicated"): 1.0,
            ("telemetry.price", "task-fallback-served"): 1.0,
            ("telemetry.price", "task-succeeded"): 2.0,
        }
        for flower in (plain, configured):
            counts = wait_until(
                lambda f=flower: (c := f.events()) and all(c.get(k) == v for k, v in expected.items()) and c,
                timeout=30,
                interval=0.25,
                what="flower_events_total",
            )
            for key, value in expected.items():
                assert counts[key] == value, key
            assert ("telemetry.charge", "task-retry-scheduled") not in counts
            assert ("telemetry.flaky", "task-fallback-served") not in counts

        def settled(flower: Flower, task_id: str, **fields: Any) -> dict[str, Any]:
            def ready() -> dict[str, Any] | None:
                info = flower.task(task_id)
                if info and info["state"] == "SUCCESS" and all(info.get(k) == v for k, v in fields.items()):
                    return info
                return None

            return dict(wait_until(ready, timeout=30, interval=0.25, what=f"{task_id} in flower"))

        # Flower as shipped: custom event fields are kept in memory but never shown.
        info = settled(plain, retried.id)
        assert not any(key.startswith("resilience_") for key in info)
        assert info["retries"] == 2 and "ConnectionError" in info["exception"]
        assert info["result"] == "'nightly-report done after 2 retries'"
        replay_plain = settled(plain, replay.id)
        assert replay_plain["result"] == settled(plain, first.id)["result"], "a replay looks like a run"
        assert not any(key.startswith("resilience_") for key in replay_plain)
        served_plain = settled(plain, served.id)
        assert "'rt_degraded': True" in served_plain["result"]
        assert "'source': 'cache'" in served_plain["result"]
        degraded = plain.api("/api/tasks?" + urllib.parse.urlencode({"search": "result:rt_degraded"}))
        assert list(degraded) == [served.id], "the envelope makes fallbacks searchable"

        # With show_in_flower(): the event fields are task fields in the API.
        # The attempt that finally ran sends task-settled: its own fields replace what the
        # retries left (Flower merges every event of a task into one record).
        info = settled(configured, retried.id, resilience_outcomes=["executed"])
        assert info["resilience_retry_attempt"] == 2, "the third attempt, the one that ran"
        assert info["resilience_retry_is_retry"] is True
        assert info["resilience_retry_delay_s"] is None, "no delay left over from a retry"
        assert set(FLOWER_FIELDS) <= set(info)

        replay_info = settled(configured, replay.id, resilience_outcomes=["deduplicated"])
        assert replay_info["resilience_idempotency_outcome"] == "replayed"
        first_info = settled(configured, first.id)
        assert first_info["resilience_outcomes"] is None, "a plain run sends no event"
        listed = configured.api("/api/tasks?taskname=telemetry.charge")
        assert {first.id, replay.id} <= set(listed)
        assert listed[replay.id]["resilience_idempotency_outcome"] == "replayed"

        served_info = settled(configured, served.id, resilience_outcomes=["fallback_served"])
        assert served_info["resilience_fallback_served"] is True
        assert served_info["resilience_fallback_source"] == "cache"
        assert served_info["resilience_fallback_age_s"] == envelope["age_s"]
        assert served_info["resilience_breaker_name"] == "pricing"

        # The task page renders them too (humanized names, raw values).
        page = configured.get(f"/task/{served.id}") or ""
        assert "Resilience fallback source" in page and ">cache<" in re.sub(r"\s+", "", page)
        assert "Resilience outcomes" in page
        assert "Resilience" not in (plain.get(f"/task/{served.id}") or "")
    producer.close()
