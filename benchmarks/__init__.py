"""Benchmarks for resilient-tasks; run them as modules (``python -m benchmarks.overhead``)."""
