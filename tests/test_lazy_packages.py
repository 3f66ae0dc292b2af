"""d2l_store and d2l_memory load their public names on first use (PEP 562).

Importing a package, its configs or its errors costs no torch, transformers or SQLAlchemy import
(the command line's `--help` depends on it); every exported name is the object its module defines;
and the TYPE_CHECKING re-exports that type checkers read list exactly the names and modules of the
runtime table, so the two cannot drift apart.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGES = ("d2l_store", "d2l_memory")

# Per package: imports a light user (or the command line) makes, which must stay free of heavy modules.
LIGHT_IMPORTS = {
    "d2l_store": "from d2l_store import AdapterRecord, MemoryKind, RecordNotFound, Scope, StoreError",
    "d2l_memory": "import d2l_memory.cli\nfrom d2l_memory import ChunkConfig, D2LMemoryError, HypernetConfig, Scope",
}
HEAVY_MODULES = ("torch", "transformers", "sqlalchemy")


def _type_checking_reexports(package: str) -> dict[str, str]:
    source = Path(importlib.import_module(package).__file__ or "").read_text(encoding="utf-8")
    guard = next(node for node in ast.parse(source).body
                 if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING")
    found: dict[str, str] = {}
    for node in guard.body:
        assert isinstance(node, ast.ImportFrom) and node.module, ast.unparse(node)
        for alias in node.names:
            assert alias.asname == alias.name, f"{ast.unparse(node)}: re-export as `X as X`"
            found[alias.name] = node.module
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_type_checking_reexports_match_the_runtime_table(package: str) -> None:
    module = importlib.import_module(package)
    assert _type_checking_reexports(package) == module._EXPORTS
    assert module.__all__ == sorted(module._EXPORTS)


@pytest.mark.parametrize("package", PACKAGES)
def test_every_exported_name_is_the_object_its_module_defines(package: str) -> None:
    module = importlib.import_module(package)
    for name, home in module._EXPORTS.items():
        assert getattr(module, name) is getattr(importlib.import_module(home), name), name
    assert set(module.__all__) <= set(dir(module))


@pytest.mark.parametrize("package", PACKAGES)
def test_unknown_names_fail_like_ordinary_missing_attributes(package: str) -> None:
    module = importlib.import_module(package)
    with pytest.raises(AttributeError, match="no_such_name"):
        module.no_such_name  # noqa: B018 - the lookup is the test
    with pytest.raises(ImportError, match="no_such_name"):
        exec(f"from {package} import no_such_name")


@pytest.mark.parametrize("package", PACKAGES)
def test_light_imports_load_no_heavy_module(package: str) -> None:
    probe = f"{LIGHT_IMPORTS[package]}\nimport sys\nprint([m for m in {HEAVY_MODULES!r} if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
