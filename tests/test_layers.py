"""The package's layers: each module imports only modules of its own layer or below
(imports inside functions included), and no two modules import each other in a circle.

Read bottom-up, the layers are the architecture (docs/ARCHITECTURE.md): plain values
and rules, the policies file, the store, the guards, one execution's pipeline, the
per-app runtime, the task, and the tools around them.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "resilient_tasks"

LAYERS: list[tuple[str, ...]] = [
    ("errors", "process", "memo", "codec", "sealing", "transient"),
    ("policy", "backoff", "keys", "fallback"),
    ("config",),
    ("store",),
    ("settings", "guards.base", "guards.tally"),
    ("guards", "telemetry"),
    ("pipeline", "heartbeat", "prometheus"),
    ("runtime",),
    ("task", "switches"),
    ("cli",),
    ("__init__", "testing", "faultproxy", "pytest_plugin"),
]


def _modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1]) if parts[-1] == "__init__" and len(parts) > 1 else ".".join(parts)
        found[name] = path
    return found


MODULES = _modules()


def _layer_of(module: str) -> int:
    """The layer of the longest LAYERS name that ``module`` is or is under."""
    matches = [
        (len(name), index)
        for index, names in enumerate(LAYERS)
        for name in names
        if module == name or module.startswith(name + ".")
    ]
    assert matches, f"{module} belongs to no layer: add it to LAYERS"
    return max(matches)[1]


def _imports(module: str, path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for node in ast.walk(block)
    }
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped or not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = package.split(".") if package else []
            base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
            target = ".".join([*base, *([node.module] if node.module else [])])
        elif node.module and node.module.startswith("resilient_tasks"):
            target = node.module.removeprefix("resilient_tasks").lstrip(".")
        else:
            continue
        for alias in node.names:
            candidate = f"{target}.{alias.name}" if target else alias.name
            name = candidate if candidate in MODULES else target
            if name in MODULES and name != module:
                found.add(name)
    return found


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


def test_every_import_points_down_or_across() -> None:
    upward = [
        f"{module} (layer {_layer_of(module)}) imports {target} (layer {_layer_of(target)})"
        for module, targets in GRAPH.items()
        for target in targets
        if _layer_of(target) > _layer_of(module)
    ]
    assert upward == []


def test_no_import_circles() -> None:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in GRAPH[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            part = []
            while True:
                top = stack.pop()
                part.append(top)
                if top == node:
                    break
            if len(part) > 1:
                circles.append(sorted(part))

    for module in GRAPH:
        if module not in index:
            visit(module)
    assert circles == []


def test_no_protocol_client_and_no_private_modules_of_libraries() -> None:
    offenders = []
    for module, path in MODULES.items():
        text = path.read_text(encoding="utf-8")
        if module not in ("testing", "faultproxy") and ("import socket" in text or "redis._parsers" in text):
            offenders.append(module)
        if "._sock" in text or "from redis._" in text or "import redis._" in text:
            offenders.append(module)
    assert offenders == []
