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

import json
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


# --- what the prose says, held to its sources ---------------------------------------------------

FENCED = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
USER_PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "notebooks").glob("*.ipynb")),
              *sorted((ROOT / "minimoe" / "assets").glob("*/README.md"))]


def markdown_of(page: Path) -> str:
    """A page's Markdown: the file itself, or a notebook's Markdown cells."""
    if page.suffix == ".ipynb":
        cells = json.loads(page.read_text(encoding="utf-8"))["cells"]
        return "\n\n".join("".join(cell["source"]) for cell in cells if cell["cell_type"] == "markdown")
    return page.read_text(encoding="utf-8")


# Words that tell the project's history instead of describing the software as it is.
HISTORY = re.compile(r"\b(this round|next round|an earlier round|previous round|the issue|this release|previously|"
                     r"no longer|was removed|were removed|once kept|the project's machine|of the project|"
                     r"before this experiment|previous tiny-moe|PREVIOUS_TINY_MOE|two checkouts|a first version|"
                     r"an earlier version|now does|as before)\b", re.IGNORECASE)


def test_history_finder():
    assert HISTORY.findall("This round adds x. It was removed. The dense model keeps its norm.") == ["This round",
                                                                                                       "was removed"]


@pytest.mark.parametrize("page", USER_PAGES, ids=[page.name for page in USER_PAGES])
def test_docs_describe_the_software_not_its_history(page: Path):
    prose = FENCED.sub("", markdown_of(page))
    found = [prose[max(0, m.start() - 50) : m.end() + 30].replace("\n", " ") for m in HISTORY.finditer(prose)]
    assert not found, f"{page.name} speaks of the project's history: {found}"


LINK = re.compile(r"\]\(([^)\s]+)\)")
REPO_PATH = re.compile(r"`((?:minimoe|scripts|docs|notebooks|tests)/[^`\s]*)`")


@pytest.mark.parametrize("page", USER_PAGES, ids=[page.name for page in USER_PAGES])
def test_links_and_paths_in_the_prose_resolve(page: Path):
    """Every relative link, and every repository path written in backticks (globs allowed), names a file here."""
    text = markdown_of(page)
    missing = [link for link in LINK.findall(text) if not link.startswith(("http:", "https:", "#", "mailto:"))
               and not (page.parent / link.split("#")[0]).exists()]
    for path in REPO_PATH.findall(text):
        path = path.rstrip(".,:;")
        pattern = re.sub(r"\{[^}]*\}|<[^>]*>", "*", path)  # {l}, <hash>: any name
        if not (list(ROOT.glob(pattern)) if "*" in pattern else (ROOT / path).exists()):
            missing.append(path)
    assert not missing, f"{page.name}: {missing}"


def notebooks_taking_model_path() -> set[str]:
    """The notebooks whose first code cell sets MODEL_PATH, by their prefix (01, A1, ...)."""
    names = set()
    for notebook in (ROOT / "notebooks").glob("*.ipynb"):
        cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
        first = next(cell for cell in cells if cell["cell_type"] == "code")
        if re.search(r"^MODEL_PATH\s*=", "".join(first["source"]), re.MULTILINE):
            names.add(notebook.name.split("_")[0])
    return names


@pytest.mark.parametrize("name", ["README.md", "docs/index.md"])
def test_the_pages_name_the_notebooks_that_take_model_path(name):
    """README and the overview say which notebooks run on the real model through MODEL_PATH: exactly those."""
    text = re.sub(r"\s+", " ", (ROOT / name).read_text(encoding="utf-8"))
    (sentence,) = [s for s in re.split(r"(?<=[.:])\s", text) if "MODEL_PATH" in s and "first cell" in s]
    named = set(re.findall(r"\b(0\d|A\d)\b(?!\.\d)", sentence))  # not the A2 of A2.7B
    assert named == notebooks_taking_model_path(), sentence


def test_the_readme_states_the_measured_memory_ratio():
    """README's "in 0.03x the memory" is the ratio of the two peak RssAnon figures docs/benchmarks.md measured."""
    benchmarks = (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    ours, theirs, shown = re.search(r"^\| peak RssAnon \| ([\d.]+) GB \| ([\d.]+) GB \| ([\d.]+)x \|$", benchmarks,
                                    re.MULTILINE).groups()
    ratio = f"{float(ours) / float(theirs):.2f}"
    assert ratio == shown
    readme = re.sub(r"\s+", " ", (ROOT / "README.md").read_text(encoding="utf-8"))
    assert f"in {ratio}x the memory" in readme


EXPERIMENT = ROOT / "docs" / "data" / "upcycling_experiment.json"


def test_the_experiment_compares_arms_on_the_same_seed():
    """docs/architecture.md sets drop-0.1 (one seed) beside the other arms' seed 0: the figures are the JSON's."""
    summary = json.loads(EXPERIMENT.read_text(encoding="utf-8"))["summary"]
    text = re.sub(r"\s+", " ", (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8"))
    paragraph = text[text.index("Seed 0 alone") :].split(" What it says")[0]
    shown = re.findall(r"`([\w.-]+)` (?:reaches the parent's loss )?after (\d+)K", paragraph)
    assert {arm for arm, _ in shown} >= {"dense", "copy", "drop-0.1"}, paragraph
    for arm, thousands in shown:
        assert round(summary["arms"][arm]["tokens_to_parent_by_seed"]["0"] / 1000) == int(thousands), arm
    assert summary["arms"]["drop-0.1"]["seeds"] == [0]


def test_the_experiments_caveats_are_computed():
    """The caveats' figures: copy's distinct expert windows, the optimiser steps, the parent's training tokens."""
    from minimoe.tools.upcycle import segment_neurons

    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from train_bundled_model import UPCYCLE
    except ImportError as error:  # torch: a test extra
        pytest.skip(f"scripts/train_bundled_model.py needs {error.name}")
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    dense = json.loads((ROOT / "minimoe" / "assets" / "tiny-dense" / "config.json").read_text(encoding="utf-8"))
    windows = segment_neurons(dense["intermediate_size"], UPCYCLE["experts"], UPCYCLE["expert_size"], shuffled=False)
    routed = windows[UPCYCLE["shared_experts"] :]
    distinct = len({tuple(w) for w in routed.tolist()})
    runs = json.loads(EXPERIMENT.read_text(encoding="utf-8"))["runs"]
    (steps,) = {run["steps"] for run in runs}
    parent = json.loads((ROOT / "minimoe" / "assets" / "tiny-dense" / "training.json").read_text(encoding="utf-8"))
    text = re.sub(r"\s+", " ", (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8"))
    assert f"{dense['intermediate_size']}-wide FFN into segments of {UPCYCLE['expert_size']}" in text
    assert f"give {distinct} distinct windows of neurons among the {len(routed)} routed experts" in text
    assert f"({len(routed) - distinct} routed experts are exact duplicates of another)" in text
    assert f"{steps} optimiser steps" in text
    assert f"after {parent['tokens_seen'] / 1e6:.1f}M tokens of training" in text
