"""``make demo`` end to end, shortened: ``python -m examples.demo`` as a real command.

The demo starts its own redis-server, payments provider and two worker processes, takes
the provider down and back, runs ``celery -A workers.app resilience open|close payments``
and exits 0 only if every closing check held. Here its phases are cut to about 25 s.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# The recovery lasts two probe periods (open_for is 3 s), so one probe failing at the
# healthy failure rate still leaves the next one time to close the breaker.
SHORT = ["--healthy", "4", "--outage", "9", "--recovery", "7", "--maintenance", "4", "--normal", "2",
         "--rate", "8", "--failure-rate", "0.03", "--timeout", "20", "--seed", "16"]


def test_the_demo_tells_the_outage_story_and_its_checks_pass(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "RESILIENT_TASKS_POLICIES")}
    env["COLUMNS"] = "160"  # wide enough that no line the checks read is wrapped, whoever runs it
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "examples.demo", *SHORT, "--logs", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=150, check=False,
    )
    took = time.monotonic() - started
    logs = "".join(f"\n--- {log.name}\n{log.read_text(errors='replace')[-3000:]}"
                   for log in sorted(tmp_path.glob("demo-*.log")))
    out = done.stdout + done.stderr
    assert done.returncode == 0, out + logs
    # the breaker opened fleet-wide, failed a half-open probe, and a probe closed it
    assert "breaker payments tripped: closed -> open" in out, out
    assert "half-open probe failed" in out or "half-open probes failed" in out, out
    assert "half-open probe succeeded -> payments closed" in out, out
    # fallbacks were served from the cache, with their age
    served = re.search(r"(\d+) cached \(oldest (\d+\.\d)s\)", out)
    assert served is not None and int(served.group(1)) > 0 and float(served.group(2)) > 0, out
    # the operator's real commands, and the switch they flipped
    assert "$ celery -A workers.app resilience open payments  ->  payments: forced_open" in out, out
    assert "switch of payments: normal -> forced_open" in out, out
    assert "$ celery -A workers.app resilience close payments" in out, out
    # the closing checks, every one green
    checks = re.search(r"checks: (\d+)/(\d+) passed", out)
    assert checks is not None and checks.group(1) == checks.group(2), out
    assert "each order was charged exactly once" in out and "✗" not in out, out
    assert "all processes stopped" in out, out
    assert took < 90, f"the short demo took {took:.0f}s"
