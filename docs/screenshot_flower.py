"""Take docs/flower-fallback.png: Flower's page of a task that served a fallback.

Everything runs on 127.0.0.1 and is thrown away afterwards:

1. a private ``redis-server`` on a free port (``resilient_tasks.testing.RedisServer``;
   DB 0 broker, DB 1 resilience store, DB 2 results);
2. ``celery -A tests.telemetry_app worker -E`` (task events on, so our custom events
   ``task-fallback-served``, ... are sent);
3. ``celery -A tests.telemetry_app flower`` with a ``flowerconfig.py`` that calls
   ``resilient_tasks.telemetry.show_in_flower()``, so the task page lists our event fields;
4. ``telemetry.price("sku-9")`` once while the pricing service is up (the value is cached),
   then once while it is down: the second call returns the degraded envelope;
5. headless Chromium saves the task page of that second call.

Run it from the repository root (needs ``chromium`` on PATH: ``apt-get install chromium``)::

    python docs/screenshot_flower.py            # writes docs/flower-fallback.png
    python docs/screenshot_flower.py out.png    # or elsewhere
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from celery import Celery  # noqa: E402

from resilient_tasks.testing import RedisServer, SubprocessWorker, free_port, wait_until  # noqa: E402

APP = "tests.telemetry_app"
PRICING_DOWN = "telemetry:pricing:down"  # the switch tests/telemetry_app.py reads
WINDOW = "1400,1700"  # tall enough for the resilience rows under the standard fields


def get(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return str(answer.read().decode())
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    raise SystemExit("no chromium on PATH: apt-get install -y chromium")


def screenshot(url: str, out: Path, profile: str) -> None:
    """Headless Chromium, no network beyond loopback, a throwaway profile."""
    command = [
        chromium(),
        "--headless",
        "--no-sandbox",  # we may run as root in a container
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        f"--screenshot={out}",
        f"--window-size={WINDOW}",
        url,
    ]
    subprocess.run(command, check=True, timeout=90, capture_output=True)


def main(out: Path) -> None:
    work = Path(tempfile.mkdtemp(prefix="rt-flower-shot-"))
    with RedisServer() as redis:
        env = {
            "RT_BROKER_URL": redis.url(0),
            "RESILIENT_TASKS_REDIS_URL": redis.url(1),
            "RT_RESULT_BACKEND": redis.url(2),
            "PYTHONPATH": str(ROOT),
        }
        conf = work / "flowerconfig.py"
        conf.write_text("from resilient_tasks.telemetry import show_in_flower\n\nshow_in_flower()\n")
        port = free_port()
        flower_log = (work / "flower.log").open("wb")
        flower = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                APP,
                "flower",
                f"--port={port}",
                "--address=127.0.0.1",
                f"--conf={conf}",
            ],
            env={**os.environ, **env, "FLOWER_UNAUTHENTICATED_API": "true"},
            stdout=flower_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=str(work),
        )
        base = f"http://127.0.0.1:{port}"
        worker = SubprocessWorker(APP, name="shop", env=env, extra=["-E"], log=str(work / "worker.log"))
        producer = Celery(
            "p", broker=env["RT_BROKER_URL"], backend=env["RT_RESULT_BACKEND"], set_as_current=False
        )
        try:
            with worker:
                # Flower only hears events sent while it listens: wait for a heartbeat.
                online = re.compile(r'flower_worker_online\{worker="shop@[^"]*"\} 1\.0')
                wait_until(lambda: online.search(get(base + "/metrics") or ""), timeout=60, what="flower")
                fresh = producer.send_task("telemetry.price", args=["sku-9"]).get(timeout=30)
                redis.client(1).set(PRICING_DOWN, 1)
                served = producer.send_task("telemetry.price", args=["sku-9"])
                envelope = served.get(timeout=30)
                print("fresh:", fresh)
                print("served:", envelope)

                def shown() -> dict[str, Any] | None:
                    text = get(f"{base}/api/task/info/{served.id}")
                    info = json.loads(text) if text else None
                    if info and info["state"] == "SUCCESS" and info.get("resilience_fallback_served"):
                        return dict(info)
                    return None

                info = wait_until(shown, timeout=30, what="the task in flower")
                print("flower:", {k: v for k, v in info.items() if k.startswith("resilience_")})
                screenshot(f"{base}/task/{served.id}", out, str(work / "chromium"))
                print(f"wrote {out} ({base}/task/{served.id})")
        finally:
            producer.close()
            flower.terminate()
            try:
                flower.wait(timeout=10)
            except subprocess.TimeoutExpired:
                flower.kill()
            flower_log.close()
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else ROOT / "docs" / "flower-fallback.png")
