"""The runtime dependencies in pyproject.toml are exactly the packages minimoe imports."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
# Imported only where an optional feature needs them, each behind a clear MinimoeError when missing.
OPTIONAL = {"cupy": "the gpu extra", "pandas": "RoutingTrace.to_dataframe", "ray": "the ray extra (minimoe atlas)",
            "pyarrow": "the parquet extra (minimoe atlas)"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def imported_packages() -> set[str]:
    """Top-level names of every third-party package imported anywhere in minimoe/ (at any depth of the code)."""
    names = set()
    for path in (REPO / "minimoe").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {name for name in names if name not in sys.stdlib_module_names and name != "minimoe"}


def test_runtime_dependencies_are_what_the_package_imports():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {canonical(re.split(r"[<>=!~;\[ ]", requirement)[0]) for requirement in project["dependencies"]}
    imported = {canonical(name) for name in imported_packages() - set(OPTIONAL)}
    assert declared == imported, f"declared but not imported: {declared - imported}; imported, not declared: " \
                                 f"{imported - declared}"
    assert set(OPTIONAL) <= imported_packages()  # each optional one is still used, or it leaves this list
