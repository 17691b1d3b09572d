"""What the README, the docs and the notebooks show as the Qwen1.5-MoE blog's is the blog's.

The blog's figures and words live in one place, ``tests/blog_quotes.py``.  Here: each of them is
in the blog's text, word for word; every passage a page quotes where it speaks of the blog is one
of them (or part of one, or of a row of the blog's table); and the parameter table the README and
notebook 03 set beside our counts is the blog's.
"""

from __future__ import annotations

import ast
import json
import re

import pytest

from blog_quotes import BLOG_QUOTES, BLOG_TABLE, ROOT, blog_text, normalise, table_row_text

NOTEBOOK_03 = ROOT / "notebooks" / "03_parameters_and_cost.ipynb"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "notebooks").glob("*.ipynb")),
         *sorted((ROOT / "minimoe" / "assets").glob("*/README.md"))]
FENCED_CODE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
QUOTED = re.compile(r'"([^"]+)"|“([^”]+)”')


@pytest.fixture(scope="module")
def blog() -> str:
    text = blog_text()
    if text is None:
        pytest.skip("the blog's text is not here: tests/blog_quotes.py looks for shared/qwen1.5-moe-blog.txt "
                    "beside the repository (../shared) or inside it")
    return text


@pytest.mark.parametrize("quote", BLOG_QUOTES)
def test_every_quote_is_the_blogs_word_for_word(quote, blog):
    assert normalise(quote) in blog


@pytest.mark.parametrize("key", sorted(BLOG_TABLE))
def test_every_table_row_is_the_blogs(key, blog):
    assert table_row_text(key) in blog


def prose(page) -> str:
    """What a reader reads of a page as prose: Markdown without code, or a notebook's Markdown and printed output."""
    if page.suffix == ".ipynb":
        cells = json.loads(page.read_text(encoding="utf-8"))["cells"]
        parts = ["".join(cell["source"]) for cell in cells if cell["cell_type"] == "markdown"]
        parts += ["".join(out.get("text", "")) for cell in cells if cell["cell_type"] == "code"
                  for out in cell["outputs"] if out["output_type"] == "stream"]
        text = "\n\n".join(parts)
    else:
        text = page.read_text(encoding="utf-8")
    return INLINE_CODE.sub("", FENCED_CODE.sub("", text))


def quotes_of_the_blog(text: str) -> list[str]:
    """Every quoted passage of a paragraph that speaks of the blog."""
    paragraphs = [normalise(p) for p in re.split(r"\n\s*\n", text)]
    return [a or b for p in paragraphs if "blog" in p.lower() for a, b in QUOTED.findall(p)]


def test_quote_finder():
    text = 'The blog says "75% decrease in training\nexpenses".\n\nNot "this" one.\n\nThe blog: “approximately one-third”'
    assert quotes_of_the_blog(text) == ["75% decrease in training expenses", "approximately one-third"]


@pytest.mark.parametrize("page", PAGES, ids=[page.name for page in PAGES])
def test_what_a_page_quotes_as_the_blogs_is_in_the_table_of_quotes(page):
    known = [normalise(quote) for quote in BLOG_QUOTES] + [table_row_text(key) for key in BLOG_TABLE]
    unknown = [q for q in quotes_of_the_blog(prose(page)) if not any(q in quote for quote in known)]
    assert not unknown, f"{page.name} quotes these as the blog's; add them to tests/blog_quotes.py: {unknown}"


def figures_by_model(rows: dict[str, tuple[float, ...]]) -> dict[str, tuple[float, ...]]:
    """Rows keyed by the model's name in lower case without spaces or hyphens (DeepSeekMoE-16B = DeepSeekMoE 16B)."""
    return {re.sub(r"[\s-]", "", name).lower(): tuple(figures) for name, figures in rows.items()}


BLOG_ROWS = figures_by_model({name: figures for name, *figures in BLOG_TABLE.values()})


def test_the_readme_shows_the_blogs_table_as_it_stands():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| ([^|]+?) \|.*\| ([\d.]+) / ([\d.]+) / ([\d.]+) \|$", readme, re.MULTILINE)
    shown = figures_by_model({name: tuple(map(float, figures)) for name, *figures in rows})
    assert shown == BLOG_ROWS


def test_notebook_03_shows_the_blogs_table_as_it_stands():
    """Notebook 03 keeps the blog's table in a dict named BLOG_TABLE: model -> (total, activated, non-embedding)."""
    cells = json.loads(NOTEBOOK_03.read_text(encoding="utf-8"))["cells"]
    sources = ["".join(cell["source"]) for cell in cells if cell["cell_type"] == "code"]
    assignments = [node for source in sources for node in ast.walk(ast.parse(source.replace("%", "#")))
                   if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "BLOG_TABLE" for t in node.targets)]
    assert len(assignments) == 1, "notebook 03 should define BLOG_TABLE once"
    assert figures_by_model(ast.literal_eval(assignments[0].value)) == BLOG_ROWS
