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
