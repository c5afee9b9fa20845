"""Every ```python block of README.md runs, against a private redis-server and a real worker.

The blocks run in a subprocess (``readme_runner``): the README's app becomes the current
Celery app and its decorated tasks are shared with every app created afterwards, which
must not leak into the other tests of this process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from resilient_tasks.testing import RedisServer
from tests.integration.readme_runner import python_blocks

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"


def test_only_python_fences_are_run() -> None:
    text = README.read_text(encoding="utf-8")
    blocks = python_blocks(text)
    assert len(blocks) == text.count("```python\n") >= 4
    for line, code in blocks:
        assert not code.lstrip().startswith(("$", "celery ", "make ", "[")), f"README.md:{line}"


def test_every_python_block_of_the_readme_runs(rt_redis_flushed: RedisServer) -> None:
    base = rt_redis_flushed.url(0).rsplit("/", 1)[0]
    run = subprocess.run(
        [sys.executable, "-m", "tests.integration.readme_runner", str(README), base],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["blocks"] == len(python_blocks(README.read_text(encoding="utf-8")))
    assert report["with_worker"] >= 1, "no block published a task through a worker"
    # both forms are registered, so a worker lists them and consumes their messages
    assert {"shop.charge", "shop.sync_inventory"} <= set(report["tasks"])
    # the store and the result backend of the README are the private server's
    store = rt_redis_flushed.client(1)
    results = rt_redis_flushed.client(2)
    try:
        assert store.dbsize() > 0
        assert results.dbsize() > 0
    finally:
        store.close()
        results.close()
