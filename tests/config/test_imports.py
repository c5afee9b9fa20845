"""``config`` sits on the policy layer: it imports only ``policy``, ``errors`` and the stdlib."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import resilient_tasks.config

PACKAGE = Path(resilient_tasks.config.__file__).parent


def test_config_imports_only_policy_errors_and_the_standard_library() -> None:
    for module in PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(module.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 2:
                assert node.module in ("policy", "errors"), (module.name, node.module)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                assert node.module.split(".")[0] in sys.stdlib_module_names, (module.name, node.module)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    assert alias.name.split(".")[0] in sys.stdlib_module_names, (module.name, alias.name)
