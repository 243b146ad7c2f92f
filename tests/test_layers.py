"""The package layering of docs/ARCHITECTURE.md holds: each package imports only from the layers below it
(imports inside functions included), so there are no import cycles; and no source file grows past 500 lines."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lowbit"

# package -> the lowbit packages it may import (besides itself)
ALLOWED = {
    "spec": set(),
    "quant": set(),
    "models": set(),
    "kernels": {"quant"},
    "kv": {"quant", "kernels", "spec"},
    "wa": {"quant", "kernels", "spec"},
    "lut": {"quant", "spec"},
    "generation": {"kv"},
    "engine": {"quant", "kernels", "kv", "wa", "lut", "models", "spec"},
    "eval": {"kv", "wa", "lut", "models", "generation", "spec", "quant"},
    "serve": {"engine", "eval", "kv", "wa", "lut", "models", "generation", "spec", "quant"},
    "bench": {"engine", "serve", "eval", "kv", "wa", "lut", "models", "generation", "kernels", "spec", "quant"},
    "cli": {"engine", "bench", "serve", "eval", "kv", "wa", "lut", "models", "generation", "kernels", "spec", "quant"},
    "__init__": {"models"},
}
assert ALLOWED["__init__"] <= {"models"} and not ALLOWED["models"]


def _package(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _lowbit_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "lowbit" and len(parts) > 1:
                found.add(parts[1])
            elif parts[0] == "lowbit":
                found.add("__init__")
    return found


SOURCES = sorted(SRC.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_follow_the_layers(path):
    pkg = _package(path)
    assert pkg in ALLOWED, f"{pkg} has no layer in ALLOWED (add it, and to docs/ARCHITECTURE.md)"
    bad = _lowbit_imports(path) - ALLOWED[pkg] - {pkg, "__init__"}  # the top level (version, load_model) sits on models
    assert not bad, f"{path.relative_to(SRC)} ({pkg}) imports {sorted(bad)}; allowed: {sorted(ALLOWED[pkg])}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(SRC)))
def test_source_files_stay_short(path):
    assert len(path.read_text().splitlines()) <= 500
