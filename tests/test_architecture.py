"""The import layers (docs/ARCHITECTURE.md): storage at the bottom, the engine's rooms above it,
the CLI on top, and no room importing one above it (lazy imports inside functions included)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# room -> the rooms it may import (besides itself)
ALLOWED: dict[str, set[str]] = {
    "registry": set(),
    "adapters.bases": {"registry"},
    "adapters.methods": {"registry", "adapters.bases"},
    "adapters.training": {"registry", "adapters.bases", "adapters.methods"},
    "adapters.serving": {"registry", "adapters.bases"},
    "adapters.merging": {"registry", "adapters.bases", "adapters.training"},
    "adapters.bench": {
        "registry",
        "adapters.bases",
        "adapters.methods",
        "adapters.training",
        "adapters.serving",
        "adapters.merging",
    },  # fmt: skip
    "adapters.testing": {"registry", "adapters.bases"},
    "cli": {
        "registry",
        "adapters.bases",
        "adapters.methods",
        "adapters.training",
        "adapters.serving",
        "adapters.merging",
        "adapters.bench",
    },  # fmt: skip
}


def room_of_file(path: Path) -> str:
    parts = path.relative_to(REPO).parts
    if parts[0] != "adapters":
        return parts[0]
    return f"adapters.{parts[1] if len(parts) > 2 else Path(parts[1]).stem}"


def room_of_module(module: str) -> str:
    parts = module.split(".")  # adaptory.<top>.<room>...
    if parts[1] != "adapters":
        return parts[1]
    return f"adapters.{parts[2]}" if len(parts) > 2 else "adapters"


def imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("adaptory."):
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("adaptory.")]
    return found


SOURCES = sorted(
    p
    for top in ("adapters", "registry", "cli")
    for p in (REPO / top).rglob("*.py")
    if "__pycache__" not in p.parts
)


def test_every_source_file_belongs_to_a_known_room():
    assert SOURCES
    unknown = {room_of_file(p) for p in SOURCES} - set(ALLOWED) - {"adapters.__init__"}
    assert not unknown, unknown


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_room_imports_a_room_above_it(path):
    room = room_of_file(path)
    allowed = ALLOWED.get(room, set()) | {room}
    wrong = [
        f"line {line}: {module}"
        for line, module in imports(path)
        if room_of_module(module) not in allowed and room_of_module(module) != "adapters"
    ]
    assert not wrong, f"{room} may import only {sorted(allowed)}: {wrong}"
