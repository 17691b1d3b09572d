"""The documentation builds without a warning, and every Python example in it runs.

``mkdocs build --strict`` renders docs/ and the API reference from the docstrings
(mkdocstrings), failing on any warning: a broken link, a missing image, a docstring
griffe cannot parse, an example that raises.  The build itself runs the blocks marked
```python exec="on" ...``` (markdown-exec) and shows what they print beneath them, so no
output on the site is typed by hand.  Then every ```python block of docs/*.md and
README.md runs, marked or not, the blocks of one page in order in one namespace (as a
reader would paste them), in a temporary folder, offline, on the bundled model.  A block whose first line is
``# requires: gpu`` needs CuPy and a GPU; without them the page stops there and the test
is skipped with that reason.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYTHON_BLOCK = re.compile(r"^```python(?: [^\n]*)?\n(.*?)^```", re.MULTILINE | re.DOTALL)  # plain or exec="on"
EXECUTED_BLOCK = re.compile(r'^```python .*exec="on".*$', re.MULTILINE)
GPU_MARK = "# requires: gpu"


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number of its first line, source) of each ```python block of a Markdown text, in order."""
    return [(text.count("\n", 0, match.start()) + 2, match.group(1)) for match in PYTHON_BLOCK.finditer(text)]


PAGES = [page for page in sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
         if python_blocks(page.read_text(encoding="utf-8"))]


def gpu_available() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no CuPy, no driver, no device: all mean "no GPU here"
        return False


def test_mkdocs_build_is_clean(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               NO_MKDOCS_2_WARNING="1")  # mkdocs-material's banner about its successor, not a warning about the docs
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(tmp_path / "site")],
        capture_output=True, text=True, env=env, cwd=ROOT,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0 and "WARNING" not in log, log
    assert (tmp_path / "site" / "api" / "index.html").read_text(encoding="utf-8").count("minimoe.model.Model") > 0


def test_the_pages_with_examples_are_found():
    assert {"README.md", "index.md", "architecture.md", "routing.md", "real-weights.md"} <= {p.name for p in PAGES}


def test_block_extraction():
    page = ("# t\n\n```python\na = 1\n```\n\n```bash\nnot python\n```\n```python\n# requires: gpu\nb = 2\n```\n"
            '```python exec="on" source="above" session="t"\nprint(a)\n```\n')
    assert python_blocks(page) == [(4, "a = 1\n"), (11, "# requires: gpu\nb = 2\n"), (15, "print(a)\n")]


def test_the_site_shows_what_examples_print():
    """The pages whose examples teach by their output run them at build time, one session per page."""
    for name in ("index.md", "architecture.md", "routing.md", "real-weights.md"):
        text = (ROOT / "docs" / name).read_text(encoding="utf-8")
        executed = EXECUTED_BLOCK.findall(text)
        assert executed, name
        session = f'session="{name.removesuffix(".md")}"'
        assert all(session in line for line in executed), (name, executed)


@pytest.mark.parametrize("page", PAGES, ids=[page.name for page in PAGES])
def test_python_examples_run(page: Path, tmp_path, monkeypatch):
    blocks = python_blocks(page.read_text(encoding="utf-8"))
    monkeypatch.chdir(tmp_path)  # examples may write files (plots, reports, traces)
    namespace: dict = {"__name__": "__docs__"}
    for line, source in blocks:
        if source.startswith(GPU_MARK) and not gpu_available():
            pytest.skip(f"{page.name}: the block at line {line} and those after it need CuPy and a GPU")
        exec(compile(source, f"{page.name}:{line}", "exec"), namespace)
