"""Imports only point down the layers of STYLE.md: the model never sees files, kernels know nothing of
positions or models, plots never import torch, and nothing but the CLI imports the commands.

A module may import only from a lower layer: two modules of one layer are independent of each other."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "alibi_lm"

# STYLE.md, section 2, with the modules it does not name placed where their imports put them. Layer 0,
# the config layer (standard library only), has an order of its own: errors, then the helpers, then config.
LAYERS = {
    "errors": 0,
    "files": 0.1,
    "progress": 0.1,
    "model_config": 0.1,
    "config": 0.2,
    "positions": 1,
    "kernels": 1,
    "tokenizer": 1,
    "model": 2,
    "data": 2,
    "checkpoint": 3,
    "distributed": 3,
    "evaluate": 4,
    "generate": 4,
    "train": 5,
    "hf": 5,
    "plots": 5,
    "demo": 6,
    "cli": 7,
    "commands": 7,
}

#: the config layer is stdlib only: reading a TOML file must not pull in torch
TORCH_FREE = ("config", "model_config", "errors", "files", "progress", "plots", "tokenizer")


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


def source_files(package: Path = PACKAGE) -> list[Path]:
    return [p for p in package.rglob("*.py") if p != package / "__init__.py" and p.name != "__main__.py"]


def wrong_way_imports(package: Path = PACKAGE) -> list[str]:
    """'file imports alibi_lm.x' for every import of a module of the same or a higher layer."""
    wrong = []
    for path in source_files(package):
        own = path.relative_to(package).parts[0].removesuffix(".py")
        for target in sorted(imported_alibi_modules(path)):
            if target != own and LAYERS.get(target, 99) >= LAYERS[own]:
                wrong.append(f"{path.relative_to(package)} imports alibi_lm.{target}")
    return sorted(wrong)


def test_every_module_has_a_layer():
    unplaced = sorted({top_module(p) for p in source_files()} - set(LAYERS))
    assert not unplaced, f"give these modules a layer in tests/test_layers.py: {unplaced}"


def test_imports_point_down():
    wrong = wrong_way_imports()
    assert not wrong, "imports that point up or sideways:\n" + "\n".join(wrong)


def test_the_guard_catches_wrong_way_imports(tmp_path):
    """Up (kernels -> model) and sideways (positions -> kernels, one layer) fail; down (config -> errors)
    passes."""
    fake = tmp_path / "alibi_lm"
    (fake / "kernels").mkdir(parents=True)
    (fake / "kernels" / "triton.py").write_text("from alibi_lm.model import TransformerLM\n")
    (fake / "positions.py").write_text("from alibi_lm.kernels import attention\n")
    (fake / "config.py").write_text("from alibi_lm.errors import UserError\n")
    assert wrong_way_imports(fake) == ["kernels/triton.py imports alibi_lm.model",
                                       "positions.py imports alibi_lm.kernels"]


@pytest.mark.parametrize("module", TORCH_FREE)
def test_torch_free_modules_do_not_load_torch(module):
    code = f"import sys, alibi_lm.{module}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False", f"import alibi_lm.{module} loads torch"


def test_cli_help_does_not_load_torch():
    code = "import sys; from alibi_lm.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_registries_match_the_config_layers_names():
    from alibi_lm import kernels, model_config, positions

    assert tuple(positions.POSITIONS) == model_config.POSITION_NAMES
    assert tuple(positions.SLOPE_RULES) == model_config.SLOPE_RULE_NAMES
    assert tuple(kernels.BACKENDS) == model_config.ATTENTION_BACKENDS
