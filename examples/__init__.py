"""Runnable examples: a flaky payments service (``downstream``) and ``make demo`` (``demo``)."""
