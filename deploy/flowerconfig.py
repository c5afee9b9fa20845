"""Flower's config file in the compose stack: ``celery flower --conf=deploy/flowerconfig.py``.

Flower shows a task only through Celery's ``Task._fields``, so the fields of our custom
task events (outcomes, breaker, fallback age) would reach its ``/metrics`` but not its
task page; ``show_in_flower`` adds them, in Flower's process (docs/OBSERVABILITY.md).
"""

from resilient_tasks.telemetry import show_in_flower

show_in_flower()
