"""The package's import drawing: no circle, and no import from a lower floor to a higher one.

Every module of the package is placed on a floor below; a module may import modules on
its own floor or lower ones, never higher. The engine and erasure are rooms side by side
that know nothing of each other (the engine process injects the diffusion inpainter into
the eraser), and nothing below the worker knows Kafka, the cache or the fast path. The
worker's process never imports torch or a native image stack: those live in the engine
process.
Imports anywhere in a module count, also those inside functions.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "zimage_stream"

FLOORS: list[set[str]] = [
    # 0. the contract: errors, settings, styles and the events
    {"errors", "settings", "styles", "schemas"},
    # 1. plain services and pure bookkeeping
    {"imaging", "storage", "kafka_security", "offsets", "batcher", "broker", "logs"},
    # 2. the rooms that compute: the model and text erasure
    {"engine", "erase"},
    # 3. I/O around the stream: Kafka clients, the cache and the fast path, metrics; the
    #    engine process, which composes the two rooms that compute
    {
        "cache",
        "dedup",
        "consumer",
        "raw_records",
        "producer",
        "client",
        "topics",
        "replay",
        "asyncapi",
        "metrics",
        "progress",
        "suspects",
        "preflight",
        "engine_process",
    },
    # 4. the stages, and what leaves the worker for a record
    {"erasures", "generations", "outbox", "worker"},
    # 5. the edges: command line, demo, local services for tests and benchmarks
    {"cli", "demo", "testing", "__main__", "__init__"},
]
SIDE_BY_SIDE = [("engine", "erase")]


def _room(path: Path) -> str:
    """A module's room: its top-level name inside the package (``engine`` for
    ``engine/pipeline.py``)."""
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _imports(path: Path) -> set[str]:
    """The rooms of the package that ``path`` imports."""
    tree = ast.parse(path.read_text())
    depth = len(path.relative_to(PACKAGE).parts) - 1  # 0 for top-level modules
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                parts = (node.module or "").split(".")
                if parts[0] == "zimage_stream" and len(parts) > 1:
                    found.add(parts[1])
                continue
            up = node.level - 1  # ``.`` is this module's package
            if up < depth:  # inside the same subpackage
                continue
            target = (node.module or "").split(".")[0]
            names = [target] if target else [alias.name for alias in node.names]
            found.update(names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "zimage_stream" and len(parts) > 1:
                    found.add(parts[1])
    return found


def _graph() -> dict[str, set[str]]:
    """Room -> the rooms it imports (names that are no room, ``__version__``, dropped)."""
    paths = list(PACKAGE.rglob("*.py"))
    rooms = {_room(path) for path in paths}
    graph: dict[str, set[str]] = {room: set() for room in rooms}
    for path in paths:
        room = _room(path)
        graph[room] |= (_imports(path) & rooms) - {room}
    return graph


def _floor(room: str) -> int:
    for number, floor in enumerate(FLOORS):
        if room in floor:
            return number
    raise AssertionError(f"{room} is on no floor: place it in FLOORS")


def test_every_room_is_on_a_floor() -> None:
    for room in _graph():
        _floor(room)


@pytest.mark.parametrize("room", sorted(_graph()))
def test_no_room_imports_a_higher_floor(room: str) -> None:
    above = {
        target
        for target in _graph()[room]
        if _floor(target) > _floor(room)
        or (room, target) in SIDE_BY_SIDE
        or (target, room) in SIDE_BY_SIDE
    }
    assert not above, f"{room} (floor {_floor(room)}) imports {sorted(above)}"


def test_the_import_drawing_has_no_circle() -> None:
    graph = _graph()
    visiting: list[str] = []
    done: set[str] = set()

    def visit(room: str) -> None:
        if room in done:
            return
        assert room not in visiting, f"import circle: {' -> '.join([*visiting, room])}"
        visiting.append(room)
        for target in sorted(graph.get(room, ())):
            visit(target)
        visiting.pop()
        done.add(room)

    for room in sorted(graph):
        visit(room)


def test_the_drawing_sees_imports() -> None:
    """The checks above are only as good as the import reader: it finds the worker's."""
    worker = _imports(PACKAGE / "worker.py")
    assert {"dedup", "consumer", "engine", "schemas", "settings"} <= worker
    assert "pipeline" not in _imports(PACKAGE / "engine" / "runner.py")  # same room


def test_the_worker_process_imports_no_model_stack() -> None:
    """The worker shares no fate with native model code: torch, diffusers, OpenCV and the
    OCR runtime are imported only in the engine process."""
    code = (
        "import sys, zimage_stream.worker, zimage_stream.cli, zimage_stream.testing\n"
        "heavy = {'torch', 'diffusers', 'transformers', 'cv2', 'onnxruntime', 'rapidocr'}\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
