"""Imports flow one way (DESIGN.md). Checked statically over every module's imports."""

from __future__ import annotations

import ast
import pathlib

import pytest

SRC = pathlib.Path(__file__).resolve().parent.parent / "src" / "scalellm"

# part -> scalellm parts it must not import
FORBIDDEN = {
    "protocol": {"tokenizer", "engine", "worker", "models", "layers", "loader", "quant", "distributed", "entrypoints", "formats"},
    "formats": {"tokenizer", "engine", "worker", "models", "layers", "loader", "quant", "distributed", "entrypoints"},
    "tokenizer": {"engine", "worker", "models", "layers", "loader", "quant", "distributed", "entrypoints"},
    "models": {"engine", "worker", "loader", "entrypoints", "tokenizer"},
    "layers": {"engine", "worker", "models", "loader", "entrypoints", "tokenizer"},
    "quant": {"engine", "worker", "models", "layers", "entrypoints", "tokenizer"},
    "distributed": {"engine", "worker", "models", "layers", "loader", "entrypoints", "tokenizer"},
    "loader": {"engine", "worker", "entrypoints"},
    "worker": {"engine", "entrypoints"},
    "engine": {"entrypoints", "server", "api"},
    "api": {"engine", "worker", "models", "layers", "loader", "quant", "distributed", "tokenizer", "server", "entrypoints"},
    "server": {"entrypoints", "worker", "models", "layers", "gateway"},
    "gateway": {"engine", "worker", "models", "layers", "loader", "quant", "distributed", "tokenizer", "server",
                "entrypoints"},
}
# engine bookkeeping modules never touch tensors
NO_TORCH = ["api", "gateway", "engine/request.py", "engine/block_pool.py", "engine/kv_cache_manager.py", "engine/scheduler.py",
            "engine/core.py", "engine/config.py", "protocol", "tokenizer", "formats"]


def _imports(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _modules(part: str) -> list[pathlib.Path]:
    p = SRC / part
    return sorted(p.rglob("*.py")) if p.is_dir() else [p]


@pytest.mark.parametrize("part", sorted(FORBIDDEN))
def test_parts_import_one_way(part):
    bad = []
    for mod in _modules(part):
        for name in _imports(mod):
            parts = name.split(".")
            if parts[0] == "scalellm" and len(parts) > 1 and parts[1] in FORBIDDEN[part]:
                bad.append(f"{mod.relative_to(SRC)} imports {name}")
    assert not bad, bad


@pytest.mark.parametrize("part", NO_TORCH)
def test_bookkeeping_has_no_torch(part):
    bad = [str(m.relative_to(SRC)) for m in _modules(part) if any(n.split(".")[0] == "torch" for n in _imports(m))]
    assert not bad, bad
