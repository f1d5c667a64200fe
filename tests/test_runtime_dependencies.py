"""Every third-party import of the library, pipelines and scripts is a declared runtime dependency.

A test-only package imported at run time once broke the README's main job on a fresh `pip install -e .` while CI,
which installs the test extra, stayed green. Imports are read from the source (ast), mapped to their
distributions by the installed metadata (`skimage` -> scikit-image), and looked up in pyproject's
`[project] dependencies`. Optional accelerators are allowed only where their import is guarded.
"""

from __future__ import annotations

import ast
import importlib.metadata
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
RUNTIME_TREES = ("emov2_gen", "pipelines", "train", "eval")
# Imports a user never needs: each must sit inside a try/except ImportError or a function (checked below).
OPTIONAL = {"triton": "fused CUDA LayerNorm kernel", "wandb": "--logger wandb"}


def declared_runtime_dependencies() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {canonicalize_name(Requirement(spec).name) for spec in project["dependencies"]}


def third_party_imports(tree: ast.AST) -> list[tuple[str, ast.AST]]:
    """(top-level module name, node) of every absolute import that is neither stdlib nor emov2_gen."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top not in sys.stdlib_module_names and top != "emov2_gen":
                found.append((top, node))
    return found


def guarded_nodes(tree: ast.AST) -> set[ast.AST]:
    """Import nodes inside a function body or a `try` that catches ImportError."""
    guarded = set()
    for node in ast.walk(tree):
        catches_import_error = isinstance(node, ast.Try) and any(
            handler.type is not None and "ImportError" in ast.unparse(handler.type) for handler in node.handlers
        )
        if catches_import_error or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body if catches_import_error else [node]
            guarded.update(inner for stmt in body for inner in ast.walk(stmt))
    return guarded


def sources() -> list[Path]:
    return sorted(path for tree in RUNTIME_TREES for path in (ROOT / tree).rglob("*.py"))


def test_every_runtime_import_is_a_declared_dependency():
    declared = declared_runtime_dependencies()
    distributions = importlib.metadata.packages_distributions()
    missing, unguarded = [], []
    for path in sources():
        tree = ast.parse(path.read_text(), filename=str(path))
        guarded = guarded_nodes(tree)
        for module, node in third_party_imports(tree):
            where = f"{path.relative_to(ROOT)}:{node.lineno} imports {module}"
            if module in OPTIONAL:
                if node not in guarded:
                    unguarded.append(where)
                continue
            names = {canonicalize_name(d) for d in distributions.get(module, [module])}
            if not names & declared:
                missing.append(f"{where} (distribution {sorted(names)})")
    assert not missing, "not in pyproject's runtime dependencies:\n" + "\n".join(missing)
    assert not unguarded, "optional packages imported unguarded:\n" + "\n".join(unguarded)


def test_the_checker_sees_a_test_only_import_and_an_unguarded_optional_one():
    tree = ast.parse("import pytest\nfrom skimage import draw\ntry:\n    import triton\nexcept ImportError:\n    pass\nimport wandb\n")
    assert sorted(module for module, _ in third_party_imports(tree)) == ["pytest", "skimage", "triton", "wandb"]
    guarded = guarded_nodes(tree)
    assert [module for module, node in third_party_imports(tree) if node in guarded] == ["triton"]
    assert "pytest" not in declared_runtime_dependencies()
