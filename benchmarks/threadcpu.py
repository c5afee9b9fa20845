"""Where a pool process's own thread spends CPU per task, inside a real prefork worker.

Opt-in (``benchmarks.prefork --thread-cpu``): it wraps ``ResilientTask.__call__``, the
store's ``run`` (one round trip each) and Celery's ``Backend.store_result`` (the result
write every variant pays, plain included) with ``time.thread_time_ns`` and keeps the sums
per task name. Each pool process writes its sums to ``<dir>/<pid>.json`` every
``FLUSH_EVERY`` tasks; the benchmark adds them up.

Why: a tight loop on one process (``task.apply`` in a loop) runs with warm CPU caches. A
pool process runs one task between the worker's and both redis-servers' turns on the same
cores, so the same code costs several times more there. This shows what it costs there.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["FLUSH_EVERY", "LABELS", "install", "read"]

#: Labels of the sums: our whole call, one store round trip, Celery's result write.
LABELS = ("call", "store_trip", "result_write")
FLUSH_EVERY = 50

_current = [""]  # the task this process is running (one at a time in a pool process)


def install(folder: str) -> None:
    """Wrap the three places, in this process (the worker app's module, at import)."""
    from celery.backends.base import Backend

    from resilient_tasks.store.redis import RedisStore
    from resilient_tasks.task import ResilientTask

    sums: dict[str, dict[str, list[int]]] = {}
    done = [0]
    clock = time.thread_time_ns

    def add(task: str, label: str, spent: int) -> None:
        entry = sums.setdefault(task, {}).setdefault(label, [0, 0])
        entry[0] += spent
        entry[1] += 1

    def flush() -> None:
        Path(folder, f"{os.getpid()}.json").write_text(json.dumps(sums))

    def timed_call(original: Callable[..., Any]) -> Callable[..., Any]:
        def call(self: Any, *args: Any, **kwargs: Any) -> Any:
            _current[0] = self.name
            started = clock()
            try:
                return original(self, *args, **kwargs)
            finally:
                add(self.name, "call", clock() - started)

        return call

    def timed_trip(original: Callable[..., Any]) -> Callable[..., Any]:
        def run(self: Any, ops: Any) -> Any:
            started = clock()
            try:
                return original(self, ops)
            finally:
                add(_current[0], "store_trip", clock() - started)

        return run

    def timed_write(original: Callable[..., Any]) -> Callable[..., Any]:
        def store_result(self: Any, task_id: Any, result: Any, state: Any, *args: Any, **kwargs: Any) -> Any:
            request = kwargs.get("request") or (args[1] if len(args) > 1 else None)
            name = str(getattr(request, "task", None) or _current[0])
            started = clock()
            try:
                return original(self, task_id, result, state, *args, **kwargs)
            finally:
                add(name, "result_write", clock() - started)
                done[0] += 1
                if done[0] % FLUSH_EVERY == 0:
                    flush()

        return store_result

    ResilientTask.__call__ = timed_call(ResilientTask.__call__)  # type: ignore[method-assign]
    RedisStore.run = timed_trip(RedisStore.run)  # type: ignore[method-assign]
    Backend.store_result = timed_write(Backend.store_result)


def read(folder: str) -> dict[str, dict[str, float]]:
    """Microseconds per event, by task name and label, summed over every pool process."""
    totals: dict[str, dict[str, list[int]]] = {}
    for path in Path(folder).glob("*.json"):
        for task, labels in json.loads(path.read_text()).items():
            for label, (spent, count) in labels.items():
                entry = totals.setdefault(task, {}).setdefault(label, [0, 0])
                entry[0] += spent
                entry[1] += count
    return {
        task: {label: spent / count / 1000 for label, (spent, count) in labels.items() if count}
        for task, labels in totals.items()
    }
