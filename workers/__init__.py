"""Worker entry points: ``celery -A workers.app worker``."""
