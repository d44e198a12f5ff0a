"""The lower floors never reach up: what the engine and erasure packages may import."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import zimage_stream

PACKAGE = Path(zimage_stream.__file__).parent
#: the project modules each floor may import besides its own package
ALLOWED = {
    "engine": {"errors", "schemas", "settings"},
    "erase": {"errors", "schemas", "storage"},
}


def _project_imports(path: Path) -> set[str]:
    """The project modules ``path`` imports, by their top-level name (``errors``, ``erase``)."""
    package = ["zimage_stream", path.parent.name]
    modules: list[str] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            modules.append(node.module or "")
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1])
            if node.module:
                modules.append(f"{base}.{node.module}")
            else:  # ``from .. import errors``
                modules += [f"{base}.{alias.name}" for alias in node.names]
    return {name.split(".")[1] for name in modules if name.startswith("zimage_stream.")}


@pytest.mark.parametrize("floor", sorted(ALLOWED))
def test_a_floor_imports_only_the_contract_below_it(floor: str) -> None:
    for path in sorted((PACKAGE / floor).glob("*.py")):
        reached = _project_imports(path) - ALLOWED[floor] - {floor}
        assert not reached, f"{floor}/{path.name} imports {sorted(reached)}"
