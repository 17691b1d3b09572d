"""The runtime dependencies in pyproject.toml are exactly the packages minimoe imports."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

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


def requirement_name(requirement: str) -> str:
    """``"mkdocstrings[python]>=0.26"`` -> ``"mkdocstrings"``."""
    return canonical(re.split(r"[<>=!~;\[ ]", requirement)[0])


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
    declared = {requirement_name(requirement) for requirement in project["dependencies"]}
    imported = {canonical(name) for name in imported_packages() - set(OPTIONAL)}
    assert declared == imported, f"declared but not imported: {declared - imported}; imported, not declared: " \
                                 f"{imported - declared}"
    assert set(OPTIONAL) <= imported_packages()  # each optional one is still used, or it leaves this list


def test_the_docs_extra_installs_what_mkdocs_yml_uses():
    """`pip install -e ".[docs]" && mkdocs serve`: the extra names the package behind the theme, every plugin and
    the mkdocstrings handler of mkdocs.yml (found through the entry points those packages register)."""
    from importlib.metadata import entry_points

    yaml = pytest.importorskip("yaml")
    pytest.importorskip("mkdocstrings_handlers.python")
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    docs = {requirement_name(r) for r in extras["docs"]}
    assert "minimoe-docs" not in docs and any(r.startswith("minimoe[docs]") for r in extras["test"])
    site = yaml.load((REPO / "mkdocs.yml").read_text(), Loader=yaml.BaseLoader)
    plugins = [next(iter(p)) if isinstance(p, dict) else p for p in site["plugins"]]

    def provider(group: str, name: str) -> str:
        (point,) = [p for p in entry_points(group=group) if p.name == name]
        return canonical(point.dist.name)

    needed = {provider("mkdocs.plugins", name) for name in plugins} | {provider("mkdocs.themes", site["theme"]["name"])}
    assert needed - {"mkdocs"} <= docs, needed - docs
    handler = next(p for p in site["plugins"] if isinstance(p, dict) and "mkdocstrings" in p)["mkdocstrings"]
    assert handler["default_handler"] == "python"
    assert any(r.startswith("mkdocstrings[python]") for r in extras["docs"])  # the python handler is that extra
