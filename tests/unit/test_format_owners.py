"""Each on-disk format has one owner module: the only product module (plugins/, handlers/, mlflow_project/) whose
code names the format's files. Code means string literals, f-string parts included; docstrings may describe a
format. Every other module reads and writes the format through the owner (VictimExport, handlers.config,
handlers.bundle_document)."""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PRODUCT = ("plugins", "handlers", "mlflow_project")

# format: (the file names it is made of, the module(s) allowed to spell them)
OWNERS = {
    "victim export directory": (
        ("input_spec.json", "state_dict.pt", "model.pt2", "model.torchscript.pt", "model.onnx"),
        {"handlers/victim_export.py"},
    ),
    "archive model-config.yaml and its labels": (("model-config.yaml", "index_to_name.json"), {"handlers/config.py"}),
    "defense bundle": (("surrogate_state_dict.pt",), {"handlers/bundle_document.py"}),
    # defense.json is the bundle's document and, by the same name, an evaluate run's defense-config artifact
    "defense.json": (("defense.json",), {"handlers/bundle_document.py", "mlflow_project/lab/evaluate.py"}),
}


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


def product_files() -> list[Path]:
    return [path for top in PRODUCT for path in sorted((REPO / top).rglob("*.py"))]


@functools.cache
def parsed(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"))


@functools.cache
def literals(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every string constant in ``path`` but its docstrings."""
    tree = parsed(path)
    skip = _docstrings(tree)
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip]


def spellings(name: str) -> list[tuple[str, int]]:
    """Where product code spells the file ``name`` (as a whole name: ``surrogate_state_dict.pt`` is not
    ``state_dict.pt``)."""
    pattern = re.compile(rf"(?<![\w.]){re.escape(name)}(?![\w])")
    hits = []
    for path in product_files():
        for line, text in literals(path):
            if pattern.search(text):
                hits.append((path.relative_to(REPO).as_posix(), line))
    return hits


@pytest.mark.parametrize("fmt", list(OWNERS))
def test_each_format_is_spelled_only_by_its_owner(fmt):
    names, owners = OWNERS[fmt]
    for name in names:
        hits = spellings(name)
        assert {path for path, _ in hits} & owners, f"{name}: its owner {owners} no longer names it; update OWNERS"
        strays = [f"{path}:{line}" for path, line in hits if path not in owners]
        assert not strays, f"{fmt}: {name!r} is spelled outside its owner {sorted(owners)}: {strays}"


def test_the_grep_sees_a_stray_spelling(tmp_path):
    """The check itself: a literal in code is found, the same name in a docstring or inside a longer name is not."""
    probe = tmp_path / "probe.py"
    probe.write_text('"""reads input_spec.json"""\nA = "x/input_spec.json"\nB = f"{A}/surrogate_state_dict.pt"\n')
    found = [text for _, text in literals(probe)]
    assert "x/input_spec.json" in found and "reads input_spec.json" not in found
    pattern = re.compile(r"(?<![\w.])state_dict\.pt(?![\w])")
    assert not any(pattern.search(t) for t in found)


def test_the_stealguard_section_key_is_spelled_only_by_handlers_config():
    """Inside handlers/ (what ships in an archive) only config.py names the archive's section."""
    strays = [f"{path.relative_to(REPO)}:{line}" for path in sorted((REPO / "handlers").glob("*.py"))
              if path.name != "config.py" for line, text in literals(path) if text == "stealguard"]
    assert not strays, f"the 'stealguard' section key is spelled outside handlers/config.py (use SECTION): {strays}"


def test_the_runtimes_are_listed_once():
    """The runtimes (eager, export, torchscript, onnx) are enumerated by handlers.config.RUNTIMES alone; the export
    directory's file table (victim_export.FILES, one file per runtime) is checked against it."""
    from handlers import config, victim_export

    assert tuple(victim_export.FILES) == config.RUNTIMES
    every = set(config.RUNTIMES)
    lists = []
    for path in product_files():
        for node in ast.walk(parsed(path)):
            items = node.keys if isinstance(node, ast.Dict) else getattr(node, "elts", None)
            if isinstance(node, ast.Tuple | ast.List | ast.Set | ast.Dict) and every <= {
                    k.value for k in items if isinstance(k, ast.Constant)}:
                lists.append(f"{path.relative_to(REPO).as_posix()}:{node.lineno}")
    assert [h.split(":")[0] for h in lists] == ["handlers/config.py", "handlers/victim_export.py"], lists
