"""Dependencies flow one way: adapters_hub (models, kinds, registry, stack) <- jobs <- sdk
(SDK, CLI, serving). Checked on the source, imports inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# package -> the top-level packages of this repo it may not import
FORBIDDEN = {"adapters_hub": {"jobs", "sdk"}, "jobs": {"sdk"}}


def imported_packages(path: Path) -> set[tuple[str, int]]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {(a.name.split(".")[0], node.lineno) for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add((node.module.split(".")[0], node.lineno))
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_flow_one_way(package):
    bad = [f"{path.relative_to(REPO)}:{line} imports {name}"
           for path in sorted((REPO / package).rglob("*.py"))
           for name, line in imported_packages(path) if name in FORBIDDEN[package]]
    assert not bad, "\n".join(bad)


def test_the_entry_point_lives_with_the_sdk():
    text = (REPO / "pyproject.toml").read_text()
    assert 'lisa-hub = "sdk.cli:main"' in text
