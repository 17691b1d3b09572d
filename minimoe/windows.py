"""Texts longer than the model's context: traced and measured window by window.

The policy, one home for it (:meth:`Windowing.windows`):

* windows of ``window`` tokens, by default the model's context (``max_position_embeddings``);
* each window after the first re-reads the last ``overlap`` tokens before it as context
  only (by default ``window // 2``, the stride of half a window that transformers' guide to
  the perplexity of fixed-length models uses) and traces the tokens after them, so every
  token is traced exactly once and with at least ``overlap`` tokens of the text before it
  (a token of the first window has all of the text before it);
* the last window is moved back to the full ``window`` length where the text allows, so its
  tokens get more context at no extra cost.

Each window is a fresh sequence to the model (RoPE positions from 0, an empty KV cache); the
joined trace's ``positions`` are the text's.  The cost is about ``window / (window - overlap)``
forward passes per token (2 by default).

Memory is one window's activations plus the trace itself, which grows with the text by a few
hundred bytes per token and sparse layer (router logits and probabilities ``[E]``, the chosen
``[k]``).  The ``[T, vocab]`` logits do not: for Qwen1.5-MoE they are 0.6 MB a token (60 GB for a
100k-token file), so a trace of more than one window keeps an empty ``[T, 0]`` logits array unless
``keep_logits=True``; next-token losses and intervention effects are computed window by window
(:func:`measure_interventions`) and need no logits kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import numpy as np

from .errors import MinimoeError
from .routing import InterventionEffect, Recorder, RoutingTrace, log_softmax, next_token_effect

Progress = Callable[..., Iterable] | bool | None


@dataclass(frozen=True)
class Window:
    """One forward pass over the text's tokens ``start .. stop - 1``; those before ``traced`` are context only."""

    start: int
    traced: int
    stop: int


@dataclass(frozen=True)
class Windowing:
    """How a text of ``num_tokens`` is cut into windows (see the module docstring for the policy)."""

    num_tokens: int
    window: int
    overlap: int

    @classmethod
    def plan(cls, num_tokens: int, context: int, window: int | None = None, overlap: int | None = None) -> "Windowing":
        """How to window ``num_tokens`` for a model of ``context`` positions; MinimoeError for a bad window/overlap."""
        window = context if window is None else window
        if not (isinstance(window, int) and 2 <= window <= context):
            raise MinimoeError(f"window must be an integer from 2 to the model's context of {context} positions, "
                               f"got {window!r}")
        overlap = window // 2 if overlap is None else overlap
        if not (isinstance(overlap, int) and 0 <= overlap < window):
            raise MinimoeError(f"overlap must be an integer from 0 to window - 1 = {window - 1}, got {overlap!r}")
        if num_tokens < 1:
            raise MinimoeError("there are no tokens to cut into windows")
        return cls(num_tokens, window, overlap)

    @property
    def fits(self) -> bool:
        """Whether the text fits one window (then the windowed trace is the plain single pass)."""
        return self.num_tokens <= self.window

    def windows(self) -> list[Window]:
        """The windows, in order; their ``traced .. stop`` ranges tile ``0 .. num_tokens`` exactly."""
        first = Window(0, 0, min(self.window, self.num_tokens))
        result = [first]
        while result[-1].stop < self.num_tokens:
            traced = result[-1].stop
            # Normally `overlap` tokens of context; the last window reaches further back to a full window.
            start = max(0, min(traced - self.overlap, self.num_tokens - self.window))
            result.append(Window(start, traced, min(start + self.window, self.num_tokens)))
        return result

    def describe(self) -> str:
        """One sentence saying how the text was windowed (for reports and logs)."""
        count = len(self.windows())
        if count == 1:
            return f"all {self.num_tokens:,} tokens in one pass (window {self.window:,})"
        return (f"{count} windows of up to {self.window:,} tokens, each re-reading the {self.overlap:,} tokens before "
                f"it as context, so every token was traced with at least {self.overlap:,} tokens of the text before "
                "it (or all of them)")


def _progress(progress: Progress, items: list, **labels) -> Iterable:
    """``items`` wrapped in a progress bar: ``True`` is tqdm (only for more than one item, only on a terminal)."""
    if progress is True:
        if len(items) < 2:
            return items
        from tqdm import tqdm

        return tqdm(items, leave=False, disable=None, **labels)
    return progress(items, **labels) if progress else items


def trace_text(model, ids, tokenizer=None, window: int | None = None, overlap: int | None = None,
               keep_logits: bool | None = None, progress: Progress = True, **interventions) -> RoutingTrace:
    """Trace ``ids`` ``[T]`` of any length, window by window (see the module docstring for the policy).

    Where the text fits one window this is exactly one forward pass, logits included.
    ``keep_logits`` (default: only when the text fits one window) keeps the ``[T, vocab]``
    logits; otherwise the trace holds an empty ``[T, 0]`` array.  ``progress``: ``True``
    shows a tqdm bar on a terminal, or pass a wrapper such as ``tqdm.tqdm``.  The
    keywords are routing interventions, applied in every window.
    """
    ids = np.asarray(ids)
    if ids.ndim != 1:
        raise MinimoeError("trace takes one sequence of ids [T]; trace a batch one row at a time")
    plan = Windowing.plan(len(ids), model.config.max_position_embeddings, window, overlap)
    keep = plan.fits if keep_logits is None else keep_logits
    pieces = []
    for part in _progress(progress, plan.windows(), desc="tracing", unit="window"):
        recorder = Recorder()
        model.forward(ids[part.start : part.stop], record=recorder, **interventions)
        piece = RoutingTrace.from_recorder(recorder, model.config).select(part.traced - part.start)
        pieces.append(piece.shifted(part.start) if keep else piece.shifted(part.start).without_logits())
        del recorder  # this window's [window, vocab] logits go now, not after the next forward
    trace = RoutingTrace.concat(pieces)
    if tokenizer is not None:
        trace.tokens = [tokenizer.decode([int(t)]) for t in trace.token_ids]
    return trace


def measure_interventions(model, ids, options: Mapping[str, Mapping], window: int | None = None,
                          overlap: int | None = None, base_logits: np.ndarray | None = None,
                          progress: Progress = True) -> dict[str, InterventionEffect]:
    """:func:`~minimoe.routing.measure_intervention` for each named set of ``options``, over a text of any length.

    Window by window (the windows of :func:`trace_text`), the plain model and each
    intervention run once; each traced position's KL and next-token loss are kept, the
    logits are not.  ``base_logits`` ``[T, vocab]`` (a one-window trace's logits) saves
    the plain runs.
    """
    ids = np.asarray(ids)
    plan = Windowing.plan(len(ids), model.config.max_position_embeddings, window, overlap)
    parts: dict[str, list] = {name: [] for name in options}
    for part in _progress(progress, plan.windows(), desc="interventions", unit="window"):
        piece = ids[part.start : part.stop]
        traced = slice(part.traced - part.start, None)
        plain = base_logits[part.start : part.stop] if base_logits is not None else model.forward(piece)
        base = log_softmax(plain[traced])
        next_ids = ids[part.traced + 1 : part.stop + 1]  # the last token of the text has none
        for name, kwargs in options.items():
            changed = log_softmax(model.forward(piece, **kwargs)[traced])
            parts[name].append(next_token_effect(base, changed, next_ids))
    return {name: InterventionEffect.join(pieces) for name, pieces in parts.items()}
