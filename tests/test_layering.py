"""The rooms import one way (docs/architecture.md): read every module's imports and check them.

Imports inside functions count as much as those at the top: a lazy import is still a
dependency. ``if TYPE_CHECKING:`` imports count too, and so does a module's name written down
for another program to import (a ``…_LOADER`` constant: the loader module an MLmodel names).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# room -> (its folder, the ldmflow rooms it may import)
ROOMS = {
    "core": ("ldmflow", set()),
    "model": ("model", {"core"}),
    "data": ("data", {"core", "model"}),
    "registry": ("registry", {"core", "model", "data"}),
    "training": ("training", {"core", "model", "data", "registry"}),
    "serving": ("serving", {"core", "model", "data", "registry"}),
    "flows": ("flows", {"core", "model", "data", "registry", "training", "serving"}),
}
# third-party packages a room must never import
FORBIDDEN = {
    "core": {"torch", "diffusers", "ray", "mlflow", "prefect"},
    "model": {"ray", "mlflow", "prefect", "boto3"},
    "data": {"mlflow", "prefect"},
    "registry": {"ray", "prefect"},
    "training": {"prefect"},
    "serving": {"prefect"},
    "flows": set(),
}
TOP_LEVEL_NAMES = {"data", "training", "serving", "flows", "model", "registry"}


def room_of(module: str) -> str | None:
    """The room of an ``ldmflow.…`` module name."""
    parts = module.split(".")
    if parts[0] != "ldmflow":
        return None
    if len(parts) == 1 or parts[1] not in {folder for folder, _ in ROOMS.values()}:
        return "core"
    return next(room for room, (folder, _) in ROOMS.items() if folder == parts[1])


def imports(path: Path) -> list[tuple[int, str]]:
    """Every module ``path`` imports, with its line: ``from a.b import c`` gives ``a.b.c``
    (which may be a name, not a module: the room is decided by the package part)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.lineno, "." * node.level + (node.module or "")))
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id.endswith("_LOADER")
                                                  for t in node.targets):
            if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
                found.append((node.lineno, node.value.value))  # imported by whoever reads the name
    return found


def modules(room: str, root: Path = ROOT) -> list[Path]:
    return sorted((root / ROOMS[room][0]).glob("*.py"))


def violations(room: str, root: Path = ROOT) -> list[str]:
    allowed = ROOMS[room][1] | {room}
    problems = []
    for path in modules(room, root):
        where = path.relative_to(root)
        for line, name in imports(path):
            top = name.split(".")[0]
            if name.startswith("."):
                problems.append(f"{where}:{line}: relative import {name} (write ldmflow.…)")
            elif top in TOP_LEVEL_NAMES:
                problems.append(f"{where}:{line}: imports {name}, a top-level name (write ldmflow.{name})")
            elif top == "ldmflow" and room_of(name) not in allowed:
                problems.append(f"{where}:{line}: {room} imports {name} ({room_of(name)})")
            elif top in FORBIDDEN[room]:
                problems.append(f"{where}:{line}: {room} imports {top}")
    return problems


@pytest.mark.parametrize("room", list(ROOMS))
def test_room_imports_only_what_it_may(room):
    assert modules(room), f"no modules found for {room}"
    assert violations(room) == []


def test_training_and_serving_never_import_each_other():
    assert "serving" not in ROOMS["training"][1] and "training" not in ROOMS["serving"][1]


def test_the_checker_catches_a_violation(tmp_path):
    """The rule reads real source: a model-layer file importing MLflow and training fails it."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "bad.py").write_text("import mlflow\n\nPYFUNC_LOADER = 'ldmflow.serving.pyfunc'\n\n\n"
                                   "def f():\n    from ldmflow.training import train\n")
    problems = violations("model", tmp_path)
    assert any("imports mlflow" in p for p in problems) and any("ldmflow.training.train" in p for p in problems)
    assert any(":3: model imports ldmflow.serving.pyfunc" in p for p in problems)


def test_the_pyfunc_loader_an_mlmodel_names_is_a_module_of_the_registry():
    from ldmflow.registry import models

    assert room_of(models.PYFUNC_LOADER) == "registry"
    assert (ROOT / "registry" / f"{models.PYFUNC_LOADER.rsplit('.', 1)[1]}.py").exists()


def test_tests_and_benchmarks_import_the_package_by_its_name():
    problems = []
    for path in sorted([*(ROOT / "tests").glob("*.py"), *(ROOT / "benchmarks").glob("*.py")]):
        for line, name in imports(path):
            if name.split(".")[0] in TOP_LEVEL_NAMES:
                problems.append(f"{path.relative_to(ROOT)}:{line}: {name}")
    assert problems == []


def test_only_ldmflow_is_installed_at_the_top_level(tmp_path):
    """From a folder outside the checkout, the rooms import as ldmflow.… and by no other name."""
    import subprocess
    import sys

    probe = ("import importlib.util, ldmflow.data, ldmflow.model, ldmflow.flows\n"
             "print([n for n in ('data', 'training', 'serving', 'flows', 'model', 'registry')"
             " if importlib.util.find_spec(n) is not None])")
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                            env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_no_module_over_400_lines_and_no_function_over_80():
    """Sizes a reader can hold: a module over 400 lines is two subjects, a function over 80
    several steps that want names."""
    too_long = []
    for room in ROOMS:
        for path in modules(room):
            text = path.read_text()
            where = path.relative_to(ROOT)
            if len(text.splitlines()) > 400:
                too_long.append(f"{where}: {len(text.splitlines())} lines")
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                    too_long.append(f"{where}:{node.lineno}: {node.name} is {node.end_lineno - node.lineno + 1} lines")
    assert too_long == []
