"""Run every ```python block of README.md, in order, as a reader would.

``python -m tests.integration.readme_runner README.md redis://127.0.0.1:PORT``

The blocks run one after another in one module named ``shop`` (as if pasted into
``shop.py``, which later blocks may import), with ``redis://127.0.0.1:6379`` replaced by
the given server. A block that publishes (``.delay(`` or ``.apply_async(``) runs while an
in-process worker consumes for the module's ``app``. Tracebacks name README.md lines. The
last line printed is a JSON report: blocks run, blocks run with a worker, the app's tasks.
"""

from __future__ import annotations

import gc
import json
import re
import sys
import types
from pathlib import Path
from typing import Any

from resilient_tasks.testing import in_process_worker

README_REDIS = "redis://127.0.0.1:6379"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)
PUBLISHES = re.compile(r"\.(delay|apply_async)\(")


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(first line number, code)`` of every block fenced as ```python."""
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in BLOCK.finditer(text)]


def run(readme: Path, redis_base: str) -> dict[str, Any]:
    module = types.ModuleType("shop")
    sys.modules["shop"] = module
    report: dict[str, Any] = {"blocks": 0, "with_worker": 0}
    for line, code in python_blocks(readme.read_text(encoding="utf-8")):
        code = code.replace(README_REDIS, redis_base)
        if ":6379" in code:
            raise SystemExit(f"README.md:{line}: a block names a Redis this runner does not replace")
        compiled = compile("\n" * (line - 1) + code, str(readme), "exec")
        if PUBLISHES.search(code):
            with in_process_worker(module.app, concurrency=1):
                exec(compiled, module.__dict__)
            report["with_worker"] += 1
        else:
            exec(compiled, module.__dict__)
        report["blocks"] += 1
    app = module.__dict__.get("app")
    if app is not None:
        report["tasks"] = sorted(name for name in app.tasks if not name.startswith("celery."))
        gc.collect()  # results unsubscribe from the backend while it still answers
        app.close()
    return report


def main(argv: list[str]) -> None:
    readme, redis_base = argv
    print(json.dumps(run(Path(readme), redis_base)))


if __name__ == "__main__":
    main(sys.argv[1:])
