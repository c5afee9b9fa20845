"""The real ``celery -A APP resilience ...`` command, run as an operator would, for the
CLI tests: the environment is the test's own (inherited RESILIENT_TASKS_*/RT_* dropped)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any


def resilience(app: str, env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RESILIENT_TASKS_", "RT_"))}
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", app, "resilience", *args],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    if check and done.returncode != 0:
        raise AssertionError(f"exit {done.returncode}\n{done.stdout}\n{done.stderr}")
    return done


def status_of(app: str, env: dict[str, str]) -> dict[str, dict[str, Any]]:
    """``status --json`` by downstream name."""
    return {row["downstream"]: row for row in json.loads(resilience(app, env, "status", "--json").stdout)}
