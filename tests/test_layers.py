"""Layers without back-arrows: the library below never imports the command layer, and config imports no method."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "robustft"
COMMAND_LAYER = ("robustft.runner", "robustft.compare", "robustft.sweep", "robustft.domainbed", "robustft.demo")
COMMAND_LAYER += ("robustft.cli", "robustft.commands")
LIBRARY = ("robustft.methods", "robustft.engine", "robustft.evaluate", "robustft.posthoc", "robustft.backbones")
LIBRARY += ("robustft.data", "robustft.adapters", "robustft.sparse", "robustft.cam", "robustft.config")
LIBRARY += ("robustft.calibration", "robustft.class_spaces", "robustft.checkpoint", "robustft.distributed")


def imports(path: Path) -> list[tuple[str, int]]:
    """Every robustft module ``path`` imports, at the top or inside a function, with its line."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("robustft"):
            found.append((node.module, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names if alias.name.startswith("robustft")]
    return found


def module_name(path: Path) -> str:
    return ".".join(("robustft", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")


def test_no_library_module_imports_the_command_layer() -> None:
    back_arrows = [
        f"{module_name(path)} -> {target} (line {line})"
        for path in sorted(PACKAGE.rglob("*.py"))
        if module_name(path).startswith(LIBRARY)
        for target, line in imports(path)
        if target.startswith(COMMAND_LAYER)
    ]
    assert not back_arrows, back_arrows


def test_config_imports_only_foundation_modules() -> None:
    foundations = {"robustft.errors", "robustft.files", "robustft.safe_io"}
    assert {target for target, _ in imports(PACKAGE / "config.py")} <= foundations
    for module in ("files.py", "safe_io.py", "errors.py"):
        assert {target for target, _ in imports(PACKAGE / module)} <= foundations, module


def test_importing_the_engine_imports_no_method() -> None:
    code = (
        "import sys, robustft.engine\n"
        "print(sorted(m for m in sys.modules if m.startswith('robustft.methods.') "
        "and m not in ('robustft.methods.base', 'robustft.methods.registry')))\n"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert completed.stdout.strip() == "[]"
