"""Every notebook in notebooks/ runs top to bottom, offline, on the bundled model, in under 3 minutes.

Each notebook checks itself (np.testing.assert_allclose against the model's own forward,
parameter counts against the blog's table, ...), so a notebook that runs without an error
is a notebook whose claims still hold.  The kernel is started with the repository root
first on PYTHONPATH, so it imports this checkout's minimoe whatever is installed.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
BUDGET_SECONDS = 180  # per notebook, on the project's 2-core machine
CELL_TIMEOUT = 600  # generous per cell: a slow machine should fail on the budget, with its time, not here


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 4, NOTEBOOKS


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[path.name for path in NOTEBOOKS])
def test_notebook_is_saved_with_its_outputs(notebook: Path):
    """Committed executed in one pass, top to bottom, so that it reads well where it is hosted."""
    cells = [cell for cell in nbformat.read(notebook, as_version=4).cells if cell.cell_type == "code"]
    assert [cell.execution_count for cell in cells] == list(range(1, len(cells) + 1))
    errors = [out for cell in cells for out in cell.outputs if out.output_type == "error"]
    assert not errors, errors


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[path.name for path in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(notebook: Path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    nb = nbformat.read(notebook, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                                     resources={"metadata": {"path": str(notebook.parent)}})
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError, naming the cell, on any error
    seconds = time.perf_counter() - start
    print(f"{notebook.name}: {seconds:.1f} s")
    assert seconds < BUDGET_SECONDS, f"{notebook.name} took {seconds:.0f} s (budget {BUDGET_SECONDS} s)"
