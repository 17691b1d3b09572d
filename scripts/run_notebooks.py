#!/usr/bin/env python
"""Execute notebooks top to bottom and save them with their outputs, as tests/test_notebooks.py runs them.

    python scripts/run_notebooks.py notebooks/01_the_model_layer_by_layer.ipynb notebooks/03_parameters_and_cost.ipynb

Each runs in its own folder, with this checkout first on PYTHONPATH (so it imports this minimoe, whatever is
installed), offline, on the bundled model unless its first cell says otherwise.  A notebook whose outputs
name a path of this machine (the checkout's folder or the home folder) is refused: saved outputs are read
on other machines.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import nbclient
import nbformat

ROOT = Path(__file__).resolve().parent.parent


def machine_paths_in(nb) -> list[str]:
    """The outputs' lines that name this checkout's folder or the home folder."""
    paths = {str(ROOT), str(Path.home())} - {"/"}
    text = "\n".join(str(out) for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs)
    return [line for line in text.splitlines() if any(path in line for path in paths)]


def run(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}}).execute()
    leaks = machine_paths_in(nb)
    if leaks:
        sys.exit(f"{path}: outputs name paths of this machine, not saved: {leaks[:3]}")
    nbformat.write(nb, path)
    print(f"{path}: executed and saved")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="+", type=Path)
    args = parser.parse_args()
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    for path in args.notebooks:
        run(path.resolve())


if __name__ == "__main__":
    main()
