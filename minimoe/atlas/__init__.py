"""The expert atlas: routing statistics over a whole corpus, streaming, resumable, on one machine or a Ray cluster.

``minimoe atlas INPUT... --out DIR`` (or :func:`build`) traces every token of a corpus once and
folds each window's routing into mergeable counts (:mod:`minimoe.atlas.aggregates`); shards of
documents run on worker processes or Ray actors (:mod:`minimoe.atlas.engine`) and the result is
browsable as ``DIR/index.html`` (:mod:`minimoe.atlas.page`).  ``minimoe.atlas.load(DIR)`` reads it back::

    atlas = minimoe.atlas.load("atlas-out")
    atlas.tokens, atlas.domains, atlas.domain_tokens      # [D]
    atlas.slot_counts, atlas.top1_counts                  # [L, E]
    atlas.domain_slot_counts                              # [D, L, E]
    atlas.coactivation, atlas.transitions                 # [L, E, E], [L-1, E, E]
"""

from .aggregates import Atlas, load
from .engine import build

__all__ = ["Atlas", "build", "load"]
