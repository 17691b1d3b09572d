"""What minimoe quotes from the Qwen1.5-MoE blog: the one home of its figures and words in the tests.

The blog: "Qwen1.5-MoE: Matching 7B Model Performance with 1/3 Activated Parameters" (Qwen team,
2024-03-28, https://qwenlm.github.io/blog/qwen-moe/).  Its text, as captured, is kept beside a
checkout of this repository in ``shared/qwen1.5-moe-blog.txt`` (``../shared`` from the repository
root); ``tests/test_blog_quotes.py`` checks every entry below against it, and checks that every
passage the README, the docs and the notebooks quote as the blog's is one of them.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# A clean clone has shared/ beside it; a checkout may also carry it inside.
BLOG_TEXT_CANDIDATES = (ROOT.parent / "shared" / "qwen1.5-moe-blog.txt", ROOT / "shared" / "qwen1.5-moe-blog.txt")

# The parameter table of the blog's "Costs and Efficiency" section, row by row as printed: the model
# as the blog names it, then billions of parameters, activated parameters and activated
# non-embedding parameters.  Keyed by the name of minimoe's shipped config for that model.
BLOG_TABLE = {
    "mistral-7b": ("Mistral-7B", 7.2, 7.2, 7.0),
    "gemma-7b": ("Gemma-7B", 8.5, 7.8, 7.8),
    "qwen1.5-7b": ("Qwen1.5-7B", 7.7, 7.7, 6.4),
    "deepseek-moe-16b-base": ("DeepSeekMoE 16B", 16.4, 2.8, 2.4),
    "qwen1.5-moe-a2.7b": ("Qwen1.5-MoE-A2.7B", 14.3, 2.7, 2.0),
}

# Every passage minimoe quotes, word for word.  A page may quote part of one.
BLOG_QUOTES = (
    "6.5 billion non-embedding parameters",
    "approximately one-third",
    "75% decrease in training expenses",
    "accelerates inference speed by a factor of 1.74",
    "we have observed a remarkable reduction of 75% in training costs",
    "a total of 64 experts, representing an 8-time increase compared to the conventional MoE setup of 8 experts",
    "we partition a single FFN into several segments, each serving as an individual expert",
    "we have incorporated 4 shared experts to be always activated alongside 60 routing experts with 4 to be activated",
    "we start by repurposing our existing Qwen-1.8B, transforming it into Qwen1.5-MoE-A2.7B",
    "introducing randomness during initialization significantly expedites convergence",
    "training a MoE model from scratch may prove inefficient",
    "we start by repurposing our existing Qwen-1.8B, transforming it into Qwen1.5-MoE-A2.7B. A noteworthy finding is "
    "that introducing randomness during initialization significantly expedites convergence",
    "contains only 2.0 billion non-embedding parameters, approximately one-third of Qwen1.5-7B’s size",
    "it achieves a 75% decrease in training expenses",
    "Typically, as seen in methods like Mixtral, MoE layers within each transformer block employ eight experts and "
    "utilize a top-2 gating strategy for routing purposes.",
    "have demonstrated the effectiveness of using fine-grained experts",
    "this is a generalized MoE routing approach, as having zero shared experts effectively reduces to the "
    "conventional MoE routing setup.",
    "Of particular…",  # where the captured text ends: the pages say so where they say what it does not tell
)


def normalise(text: str) -> str:
    """Whitespace collapsed to single spaces, so that a quote may wrap across lines."""
    return re.sub(r"\s+", " ", text).strip()


def table_row_text(key: str) -> str:
    """How the blog's flattened text spells one row of its table, e.g. ``"Gemma-7B 8.5 7.8 7.8"``."""
    name, *figures = BLOG_TABLE[key]
    return " ".join([name, *(f"{figure:.1f}" for figure in figures)])


def blog_text() -> str | None:
    """The captured blog text, whitespace normalised; None when no shared/ folder is beside the checkout."""
    for path in BLOG_TEXT_CANDIDATES:
        if path.exists():
            return normalise(path.read_text(encoding="utf-8"))
    return None
