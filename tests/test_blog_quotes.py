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


# --- what the pages say about the blog's table and its text, computed here ------------------------

def our_counts() -> dict[str, tuple[float, float, float]]:
    """minimoe's counts of each model of the blog's table, in billions: (total, activated, activated non-embedding)."""
    from minimoe.config import shipped_configs
    from minimoe.inspect.params import Architecture, count_parameters

    counts = {key: count_parameters(Architecture.from_file(shipped_configs()[key])) for key in BLOG_TABLE}
    return {key: (c.total / 1e9, c.activated / 1e9, c.activated_non_embedding / 1e9) for key, c in counts.items()}


COLUMNS = ("total", "activated", "activated non-embedding")


def test_the_blogs_table_is_our_counts_rounded_but_for_three_entries():
    """The entries the README and notebook 03 single out are exactly those our rounded counts do not give,
    and the two non-embedding ones are below our rounded count (lower than rounding), not above it."""
    counts = our_counts()
    unlike = {(key, column): (blog, ours)
              for key, (_, *figures) in BLOG_TABLE.items()
              for column, blog, ours in zip(COLUMNS, figures, counts[key]) if round(ours, 1) != blog}
    assert set(unlike) == {("gemma-7b", "activated"), ("qwen1.5-7b", "activated non-embedding"),
                           ("qwen1.5-moe-a2.7b", "activated non-embedding")}
    for (key, column), (blog, ours) in unlike.items():
        if column == "activated non-embedding":
            assert blog < round(ours, 1), (key, blog, ours)


def test_the_rows_the_readme_says_round_do_round():
    """README: "the table's other rows round (6.98 → 7.0, ...)": each pair is one of our counts and its
    rounding, which is the blog's figure for that entry."""
    readme = normalise((ROOT / "README.md").read_text(encoding="utf-8"))
    pairs = re.findall(r"(\d+\.\d\d) → (\d+\.\d)", readme)
    assert len(pairs) >= 3, pairs
    ours = {f"{value:.2f}": (key, column) for key, values in our_counts().items()
            for column, value in zip(COLUMNS, values)}
    for shown, rounded in pairs:
        key, column = ours[shown]  # a count of ours, to two decimals
        assert f"{float(shown):.1f}" == rounded
        assert BLOG_TABLE[key][1 + COLUMNS.index(column)] == float(rounded)


def test_the_blog_text_we_have_ends_before_it_says_how_it_measured_its_speed(blog):
    """Pages say the excerpt "ends at "Of particular…"" before it explains the 1.74x: 1.74 occurs once, in
    the introduction's claim, and the capture stops at that phrase."""
    assert blog.count("1.74") == 1
    tail = blog[blog.rindex("Of particular…"):]  # the header line names it too
    assert len(tail) < 200 and "1.74" not in tail, tail
