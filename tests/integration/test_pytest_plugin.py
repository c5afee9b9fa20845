"""The pytest plugin is opt-in, and the example test of ``examples/`` passes as a user's would.

Each case runs pytest in a subprocess: which plugins load is decided when pytest starts.
"""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

USES_OUR_FIXTURE = """
def test_a_private_server(rt_redis_flushed):
    client = rt_redis_flushed.client()
    client.set("k", "v")
    assert client.dbsize() == 1
    assert rt_redis_flushed.port != 6379
"""

#: What a user's root conftest.py says: importing the module first is the common case.
OPT_IN_CONFTEST = """
from resilient_tasks.testing import RedisServer

pytest_plugins = ["resilient_tasks.testing"]
"""


def run_pytest(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=240,
    )


def a_project(tmp_path: Path, conftest: str = "") -> Path:
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # its own rootdir, not ours
    (tmp_path / "test_user.py").write_text(USES_OUR_FIXTURE)
    if conftest:
        (tmp_path / "conftest.py").write_text(conftest)
    return tmp_path


def test_installing_the_package_registers_no_pytest_plugin() -> None:
    ours = [ep for ep in entry_points(group="pytest11") if ep.value.startswith("resilient_tasks")]
    assert ours == []


def test_a_project_that_does_not_opt_in_gets_none_of_our_fixtures(tmp_path: Path) -> None:
    run = run_pytest(cwd=a_project(tmp_path))
    assert run.returncode == 1, run.stdout + run.stderr
    assert "fixture 'rt_redis_flushed' not found" in run.stdout


@pytest.mark.parametrize(
    ("conftest", "option"),
    [
        (OPT_IN_CONFTEST, ()),
        ("", ("-p", "resilient_tasks.testing")),
        ("", ("-p", "resilient_tasks.pytest_plugin")),  # the older name, kept as an alias
    ],
    ids=["pytest_plugins", "-p testing", "-p pytest_plugin"],
)
def test_a_project_that_opts_in_gets_a_private_redis_server(
    tmp_path: Path, conftest: str, option: tuple[str, ...]
) -> None:
    run = run_pytest(*option, cwd=a_project(tmp_path, conftest))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 passed" in run.stdout
    assert "warning" not in run.stdout.lower(), run.stdout


def test_the_example_with_celerys_fixtures_passes() -> None:
    run = run_pytest("examples/test_with_celery_fixtures.py", cwd=ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    assert " passed" in run.stdout
    for other in ("failed", "skipped", "error", "warning"):
        assert other not in run.stdout.lower(), run.stdout
