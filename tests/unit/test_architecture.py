"""docs/architecture.md stays true: every module it names imports, every attribute it names exists; the
layering holds (``models`` imports nothing of ours); no function in ``cluster/`` or ``trainers/`` exceeds
60 lines; no objective hook is found by attribute probing."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("cluster", "trainers", "objectives", "data", "models")


def _named_in_doc() -> list[str]:
    text = (REPO / "docs/architecture.md").read_text()
    names = set(re.findall(r"`((?:cluster|trainers|objectives|data|models)(?:\.[A-Za-z_][A-Za-z0-9_]*)+)`", text))
    return sorted(names)


@pytest.mark.parametrize("dotted", _named_in_doc())
def test_every_name_on_the_architecture_page_exists(dotted):
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):  # the longest importable module prefix, then attributes
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for attr in parts[i:]:
            assert hasattr(obj, attr), f"docs/architecture.md names {dotted}, but {attr!r} does not exist"
            obj = getattr(obj, attr)
        return
    pytest.fail(f"docs/architecture.md names {dotted}, which does not import")


def _modules(package: str):
    for path in sorted((REPO / package).rglob("*.py")):
        yield path, ast.parse(path.read_text())


def test_models_import_nothing_of_ours():
    ours = {p for p in PACKAGES if p != "models"}
    for path, tree in _modules("models"):
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert node.module.split(".")[0] not in ours, f"{path}: imports {node.module}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    assert alias.name.split(".")[0] not in ours, f"{path}: imports {alias.name}"


@pytest.mark.parametrize("package", ["cluster", "trainers"])
def test_no_function_over_60_lines(package):
    long = [f"{path.relative_to(REPO)}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)"
            for path, tree in _modules(package) for n in ast.walk(tree)
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.end_lineno - n.lineno + 1 > 60]
    assert not long, long


def test_no_test_devices_in_production_code():
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            text = path.read_text()
            assert "fail_at_step" not in text and "audit_dir" not in text, path


def test_objective_hooks_are_not_probed():
    for package in ("cluster", "trainers"):
        for path in (REPO / package).rglob("*.py"):
            text = path.read_text()
            for hook in ("set_step", "reduce_metrics", "check_data", "fill_params", "required_special_tokens",
                         "class_text_embeddings", "setup"):
                assert not re.search(rf"(hasattr|getattr)\([^)]*['\"]{hook}['\"]", text), (path, hook)
