"""Structure checks that ``lint-imports`` cannot make: where imports sit, and the architecture's module table.

docs/architecture.md says a module imports at its top, and inside a function only an optional (or
named heavy) dependency; its module table has one row per module of ``src/memdec``.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "memdec"
ARCHITECTURE = ROOT / "docs" / "architecture.md"

# The packages a function may import (docs/architecture.md, "Lazy imports"): the optional extras of
# pyproject.toml (``vllm``: the plugin's ``register``) and the undeclared ``datasets``; faiss and matplotlib,
# required but imported only by the step that uses them.
LAZY = {"datasets", "faiss", "fastapi", "lm_eval", "matplotlib", "peft", "starlette", "uvicorn", "vllm"}


def function_level_imports(source: str) -> list[tuple[int, str]]:
    """(line, top-level package) of every import inside a function (a method, a nested function)
    of ``source``; relative imports give ``"."``."""
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if in_function and isinstance(child, ast.Import):
                found.extend((child.lineno, alias.name.split(".")[0]) for alias in child.names)
            elif in_function and isinstance(child, ast.ImportFrom):
                found.append((child.lineno, "." if child.level else child.module.split(".")[0]))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(source), False)
    return found


def test_function_level_imports_are_found_wherever_they_sit():
    source = (
        "import os\n"
        "def f():\n    import torch\n    from . import x\n"
        "class C:\n    def m(self):\n        def g():\n            from faiss.contrib import ondisk\n"
        "try:\n    import peft\nexcept ImportError:\n    pass\n"
    )
    assert function_level_imports(source) == [(3, "torch"), (4, "."), (8, "faiss")]


def test_only_optional_dependencies_are_imported_inside_functions():
    bad = [f"{path.relative_to(ROOT)}:{line}: {name}"
           for path in sorted(PACKAGE.rglob("*.py"))
           for line, name in function_level_imports(path.read_text(encoding="utf-8"))
           if name not in LAZY]
    assert not bad, "import these at the module's top (docs/architecture.md, Lazy imports):\n" + "\n".join(bad)


def test_the_architecture_names_the_lazy_imports():
    rule = next(line for line in ARCHITECTURE.read_text(encoding="utf-8").splitlines()
                if line.startswith("Lazy imports:"))
    assert set(re.findall(r"`([\w.]+)`", rule)) == LAZY


def table_modules() -> list[str]:
    """The module names of docs/architecture.md's module table, in order (first cell of each row)."""
    rows = re.findall(r"^\| `([\w.]+)` \|", ARCHITECTURE.read_text(encoding="utf-8"), flags=re.MULTILINE)
    assert rows, "docs/architecture.md has no module table"
    return rows


def package_modules() -> set[str]:
    """The modules and subpackages directly under src/memdec."""
    modules = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    return modules | {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}


def test_the_module_table_has_one_row_per_module():
    rows = table_modules()
    assert len(rows) == len(set(rows)), "a module has two rows"
    assert sorted(package_modules() - set(rows)) == [], "modules without a row in docs/architecture.md"
    assert sorted(set(rows) - package_modules()) == [], "rows of docs/architecture.md naming no module"


def test_every_command_checks_its_config_with_check_config():
    """One name for the job across modules (issue 25): the builder's check is ``check_config`` as in adapt,
    train, evaluate, serve and baselines, and no module keeps a private ``_check_config``."""
    from memdec import adapt, baselines, datastore, evaluate, serve, train

    for module in (adapt, baselines, datastore, evaluate, serve, train):
        assert callable(module.check_config), module.__name__
    assert [p.name for p in PACKAGE.rglob("*.py") if "def _check_config(" in p.read_text(encoding="utf-8")] == []
