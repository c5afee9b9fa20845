"""Policies files shared by the config tests."""

from __future__ import annotations

from pathlib import Path

GOOD = """
[defaults]
deadline = 600

[defaults.breaker]
window = 30
open_for = 5

[downstreams."payments"]
failure_rate = 0.25
min_calls = 40

[tasks."shop.charge"]
deadline = 30

[tasks."shop.charge".retry]
max_retries = 2
retry_on = ["ConnectionError", "socket.timeout"]
budget = { ratio = 0.5, min_per_window = 3 }

[tasks."shop.charge".breaker]
open_for = 12

[switches]
inventory = "fallback_only"
"""


def write(tmp_path: Path, text: str | bytes, name: str = "policies.toml") -> str:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return str(path)

#: Ten broken files, each with the one error ``load`` and ``check`` must name.
BROKEN = {
    "unknown_table.toml": ("[defualts]\ndeadline = 1\n", "line 1, [defualts]: unknown table"),
    "syntax.toml": ("[defaults\n", "not valid TOML"),
    "unknown_key.toml": (
        '[downstreams."payments"]\nfailure_ratio = 0.5\n',
        'line 2, [downstreams."payments"] failure_ratio: unknown key',
    ),
    "range.toml": (
        '[downstreams."payments"]\n\nfailure_rate = 2\n',
        'line 3, [downstreams."payments"] failure_rate: must be in (0, 1], got 2',
    ),
    "type.toml": (
        '[defaults.retry]\nmax_retries = "five"\n',
        "line 2, [defaults.retry] max_retries: must be an integer, got str",
    ),
    "exception.toml": (
        '[tasks."a"]\n[tasks."a".retry]\nretry_on = ["NoSuchError"]\n',
        "line 3, [tasks.\"a\".retry] retry_on: 'NoSuchError' is not an importable exception type",
    ),
    "switch.toml": ('[switches]\npayments = "off"\n', "line 2, [switches] payments: must be one of normal"),
    "task_key.toml": (
        '[tasks."a"]\nretries = 3\n',
        'line 2, [tasks."a"] retries: unknown key; a task table has',
    ),
    "backoff.toml": (
        '[defaults.retry]\nbackoff = "linear"\n',
        "line 2, [defaults.retry] backoff: must be one of full_jitter",
    ),
    "cross_field.toml": (
        "[defaults.breaker]\nopen_for = 60\nopen_for_max = 10\n",
        "line 3, [defaults.breaker] open_for_max: must be >= open_for",
    ),
}
