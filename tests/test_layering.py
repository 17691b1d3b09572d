"""The package's floors: each module imports only from the floors below it, and no import circles.

The contracts live in pyproject.toml ([tool.importlinter]); import-linter checks them here as
`lint-imports` would from the repository root.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_the_import_contracts_are_kept(monkeypatch, capsys):
    from importlinter import cli

    monkeypatch.chdir(REPO)  # the package is found from the repository root, as `lint-imports` finds it
    kept = cli.lint_imports(config_filename=str(REPO / "pyproject.toml"), no_cache=True, no_logo=True)
    report = capsys.readouterr().out
    assert kept == 0, report  # lint_imports' exit code: 0 when every contract is kept
    assert "Contracts: 2 kept, 0 broken." in report


def test_the_model_imports_nothing_above_it():
    """model.py's own imports: the layer math, the operations, the forward pass's inputs, config, checkpoint, errors."""
    import grimp

    graph = grimp.build_graph("minimoe")
    imported = {module for module in graph.find_modules_directly_imported_by("minimoe.model")}
    assert imported == {"minimoe.layers", "minimoe.ops", "minimoe.hooks", "minimoe.config", "minimoe.checkpoint.reader",
                        "minimoe.errors"}
