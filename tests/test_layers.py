"""Imports only point down the layers of STYLE.md: the model never sees files, kernels know nothing of
positions or models, plots never import torch, and nothing but the CLI imports the commands."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "alibi_lm"

LAYERS = {
    "errors": 0,
    "kernels": 1,
    "positions": 2,
    "tokenizer": 2,
    "model": 3,
    "data": 3,
    "config": 4,
    "checkpoint": 4,
    "distributed": 4,
    "evaluate": 5,
    "generate": 5,
    "train": 6,
    "hf": 6,
    "plots": 6,
    "demo": 7,
    "cli": 8,
    "commands": 8,
}


def top_module(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def imported_alibi_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return {name.split(".")[1] for name in names if name.startswith("alibi_lm.") and name.count(".") >= 1}


def source_files() -> list[Path]:
    return [p for p in PACKAGE.rglob("*.py") if p != PACKAGE / "__init__.py" and p.name != "__main__.py"]


def test_every_module_has_a_layer():
    unplaced = sorted({top_module(p) for p in source_files()} - set(LAYERS))
    assert not unplaced, f"give these modules a layer in tests/test_layers.py: {unplaced}"


def test_imports_point_down():
    wrong = []
    for path in source_files():
        own = top_module(path)
        for target in imported_alibi_modules(path):
            if target != own and LAYERS.get(target, 99) >= LAYERS[own]:
                wrong.append(f"{path.relative_to(PACKAGE)} imports alibi_lm.{target}")
    assert not wrong, "imports that point up or sideways:\n" + "\n".join(wrong)


def test_plots_never_import_torch():
    plots = PACKAGE / "plots.py"
    if plots.exists():
        tree = ast.parse(plots.read_text())
        modules = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        modules |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not any(m == "torch" or m.startswith("torch.") for m in modules)
