"""The house rule: every import points down the stack, lazy imports inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "dragonrec"

# Lowest first. A module may import its own layer and any layer below it, never one above.
LAYERS: list[tuple[str, ...]] = [
    ("schema", "progress"),
    ("data", "registry", "store"),
    ("text", "embed", "index"),
    ("model",),
    ("candidates", "scorers"),
    ("recommenders",),
    ("rerank",),
    ("pipeline", "rag", "rewards", "preferences", "reward_model"),
    ("train", "evaluate", "loop", "tune"),
    ("serve", "cli"),
]
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}


def _top(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "dragonrec" and len(parts) > 1 else None


def _imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
    return out


def _modules() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py") if p.name != "__main__.py")


def test_every_package_has_a_layer():
    tops = {p.relative_to(SRC).parts[0].removesuffix(".py") for p in _modules()} - {"__init__"}
    assert tops <= set(LAYER_OF), f"add {sorted(tops - set(LAYER_OF))} to LAYERS"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(SRC)))
def test_imports_point_down(path: Path):
    own = path.relative_to(SRC).parts[0].removesuffix(".py")
    if own == "__init__":
        return
    bad = [f"line {line}: {mod}" for line, mod in _imports(path)
           if (top := _top(mod)) is not None and top in LAYER_OF and LAYER_OF[top] > LAYER_OF[own]]
    assert not bad, f"{path.relative_to(SRC)} ({own}) imports a higher layer: {bad}"
