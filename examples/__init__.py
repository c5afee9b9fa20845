"""Runnable examples: a flaky payments service (``downstream``), ``make demo`` (``demo``),
and a test of a user's own task with Celery's pytest fixtures (``test_with_celery_fixtures``)."""
