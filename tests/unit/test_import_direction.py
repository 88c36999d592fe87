"""Imports run one way (docs/architecture.md, "Import direction"): plugins imports neither handlers,
mlflow_project, mlflow, TorchServe (ts) nor ray; handlers never imports mlflow, mlflow_project or ray (the
sweep's executor, a lab-only dependency). Every module of
both packages is parsed with ``ast``, imports inside functions and ``if TYPE_CHECKING`` blocks included, and
relative imports are resolved against the module's own package."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = {
    "plugins": ("handlers", "mlflow_project", "mlflow", "ts", "ray"),
    "handlers": ("mlflow", "mlflow_project", "ray"),
}


def imported_modules(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import statement in the file at ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = list(path.relative_to(root).parts[:-1])  # a module's package; an __init__.py's own package
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            found.append((node.lineno, name))
    return found


def violations(package: str, root: Path = ROOT) -> list[str]:
    bad = []
    for path in sorted((root / package).rglob("*.py")):
        for line, name in imported_modules(path, root):
            top = name.split(".", 1)[0]
            if top in FORBIDDEN[package]:
                bad.append(f"{path.relative_to(root)}:{line} imports {name}")
    return bad


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_the_package_imports_only_in_the_allowed_direction(package):
    assert (ROOT / package / "__init__.py").is_file()
    assert violations(package) == [], f"{package}/ may not import {', '.join(FORBIDDEN[package])}"


@pytest.mark.parametrize(
    ("source", "package", "caught"),
    [
        ("import mlflow\n", "handlers", True),
        ("from mlflow.tracking import MlflowClient\n", "handlers", True),
        ("def f():\n    import mlflow_project.lab.data\n", "handlers", True),
        ("from ts.context import Context\n", "handlers", False),
        ("from ts.context import Context\n", "plugins", True),
        ("import ray\n", "plugins", True),
        ("def f():\n    from ray.util import ActorPool\n", "handlers", True),
        ("from handlers import config\n", "plugins", True),
        ("from ..handlers import config\n", "plugins", False),  # in plugins/sub/m.py: plugins.handlers
        ("from . import mlflow\n", "handlers", False),  # handlers.sub.mlflow, not the mlflow package
        ("import tsne\n", "plugins", False),
        ("from plugins.base import Budget\n", "handlers", False),
    ],
)
def test_the_checker_sees_each_kind_of_import(tmp_path, source, package, caught):
    module = tmp_path / package / "sub" / "m.py"
    module.parent.mkdir(parents=True)
    (tmp_path / package / "__init__.py").write_text("")
    module.write_text(source)
    found = violations(package, tmp_path)
    assert bool(found) == caught, found


def test_the_handler_file_defines_exactly_one_class():
    """TorchServe's worker refuses a handler module with more than one class ("Expected only one class in custom
    service code"): helpers such as dataclasses belong in handlers/service.py."""
    path = Path(__file__).resolve().parents[2] / "handlers" / "stealguard_handler.py"
    classes = [n.name for n in ast.parse(path.read_text()).body if isinstance(n, ast.ClassDef)]
    assert classes == ["StealGuardHandler"], classes
