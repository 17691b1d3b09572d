"""Running a model to study its routing: traces of texts of any length, of generations, and what
an intervention changes.

:func:`trace_text` traces one text window by window, :func:`trace_generation` traces a
generation token by token through the KV cache, :func:`measure_interventions` compares the
next-token distributions with and without each of some interventions.  Each drives a model's forward
pass (:mod:`minimoe.model`) and records through :mod:`minimoe.hooks`; the results are
:class:`~minimoe.inspect.trace.RoutingTrace` and :class:`InterventionEffect`.

Texts longer than the model's context are traced and measured window by window.

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
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from ..errors import MinimoeError
from ..hooks import Interventions, Recorder, describe_interventions
from .trace import RoutingTrace

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


def trace_text(model, ids, tokenizer=None, *, interventions: Mapping | Interventions | None = None,
               window: int | None = None, overlap: int | None = None, keep_logits: bool | None = None,
               progress: Progress = True) -> RoutingTrace:
    """Trace ``ids`` ``[T]`` of any length, window by window (see the module docstring for the policy).

    Where the text fits one window this is exactly one forward pass, logits included.
    ``keep_logits`` (default: only when the text fits one window) keeps the ``[T, vocab]``
    logits; otherwise the trace holds an empty ``[T, 0]`` array.  ``progress``: ``True``
    shows a tqdm bar on a terminal, or pass a wrapper such as ``tqdm.tqdm``.
    ``interventions`` (as :meth:`Model.forward` takes them) apply in every window.
    """
    ids = np.asarray(ids)
    if ids.ndim != 1:
        raise MinimoeError("trace takes one sequence of ids [T]; trace a batch one row at a time")
    plan = Windowing.plan(len(ids), model.config.max_position_embeddings, window, overlap)
    keep = plan.fits if keep_logits is None else keep_logits
    trace = RoutingTrace.concat(list(trace_windows(model, ids, plan, interventions=interventions, keep_logits=keep,
                                                   progress=progress)))
    if tokenizer is not None:
        trace.tokens = tokenizer.token_texts(trace.token_ids)
    return trace


def trace_windows(model, ids, plan: Windowing, *, interventions: Mapping | Interventions | None = None,
                  keep_logits: bool = False, progress: Progress = False) -> Iterator[RoutingTrace]:
    """The traces of ``plan``'s windows over ``ids`` ``[T]``, one at a time and in order: each covers the
    window's traced tokens only, at the text's positions, so together they cover every token once.

    :func:`trace_text` joins them; a caller that folds each into running statistics (:mod:`minimoe.atlas`)
    holds one window's trace at a time, however long the text.  Without ``keep_logits`` each trace
    holds an empty ``[t, 0]`` logits array.
    """
    interventions = Interventions.of(model.config, interventions)  # checked once, before the first window
    for part in _progress(progress, plan.windows(), desc="tracing", unit="window"):
        recorder = Recorder()
        model.forward(ids[part.start : part.stop], record=recorder, interventions=interventions)
        piece = RoutingTrace.from_recorder(recorder, model.config, interventions=interventions).select(
            part.traced - part.start).shifted(part.start)
        del recorder  # this window's [window, vocab] logits go with it, unless kept
        yield piece if keep_logits else piece.without_logits()


def measure_interventions(model, ids, interventions: Mapping[str, Mapping | Interventions], *,
                          window: int | None = None, overlap: int | None = None,
                          base_logits: np.ndarray | None = None,
                          progress: Progress = True) -> dict[str, InterventionEffect]:
    """How each named intervention changes the next-token distributions over ``ids`` ``[T]``, a text of any length.

    ``interventions`` names each one: ``{"no shared expert": {"shared_expert": False}, ...}``.
    The plain model and each intervention run on the same text; per position, the KL
    divergence of the next-token distributions and the loss on the actual next token are
    kept, the logits are not (a text longer than the context is measured window by window,
    the windows of :func:`trace_text`).  ``base_logits`` ``[T, vocab]`` (``model.forward(ids)``,
    or a one-window trace's logits) saves the plain runs.
    """
    ids = np.asarray(ids)
    if ids.ndim != 1:
        raise MinimoeError("measure_interventions takes one sequence of ids [T]; measure a batch one row at a time")
    if base_logits is not None and len(base_logits) != len(ids):
        raise MinimoeError(f"base_logits hold {len(base_logits)} positions but the text has {len(ids)} tokens")
    changes = {name: Interventions.of(model.config, change) for name, change in interventions.items()}
    plan = Windowing.plan(len(ids), model.config.max_position_embeddings, window, overlap)
    parts: dict[str, list] = {name: [] for name in changes}
    for part in _progress(progress, plan.windows(), desc="interventions", unit="window"):
        piece = ids[part.start : part.stop]
        traced = slice(part.traced - part.start, None)
        plain = base_logits[part.start : part.stop] if base_logits is not None else model.forward(piece)
        base = log_softmax(plain[traced])
        next_ids = ids[part.traced + 1 : part.stop + 1]  # the last token of the text has none
        for name, change in changes.items():
            changed = log_softmax(model.forward(piece, interventions=change)[traced])
            parts[name].append(next_token_effect(base, changed, next_ids))
    return {name: InterventionEffect.join(pieces, describe_interventions(changes[name]))
            for name, pieces in parts.items()}


def trace_generation(model, ids, max_new_tokens: int, tokenizer=None, *,
                     interventions: Mapping | Interventions | None = None,
                     window: int | None = None, overlap: int | None = None,
                     **sampling) -> tuple[list[int], RoutingTrace]:
    """Generate after ``ids`` and trace every token the model read: (new ids, trace).

    The trace grows token by token through the KV cache: it covers the prompt and each
    generated token that was fed back (all but the last, which no forward pass reads).
    ``sampling`` takes :meth:`~minimoe.loading.LoadedModel.generate`'s keywords (temperature, top_k, top_p, seed, ...).

    A prompt too long to leave ``max_new_tokens`` positions free in the context is traced
    window by window (``window``, ``overlap``: see :mod:`minimoe.inspect.tracing`), and generation
    continues from its last ``context - max_new_tokens`` tokens, all the model can see;
    the generated tokens' positions continue the prompt's.
    """
    ids = [int(i) for i in ids]
    interventions = Interventions.of(model.config, interventions)
    seen = model.config.max_position_embeddings - max_new_tokens  # prompt tokens generation can read
    long_prompt = 0 < seen < len(ids)
    recorder = Recorder()
    new_ids = list(model.generate_stream(ids[-seen:] if long_prompt else ids, max_new_tokens, record=recorder,
                                         interventions=interventions, tokenizer=tokenizer, **sampling))
    grown = RoutingTrace.from_recorder(recorder, model.config, interventions=interventions)
    if long_prompt:
        prompt = trace_text(model, ids, interventions=interventions, window=window, overlap=overlap)
        generated = grown.select(seen).shifted(len(ids) - seen)
        grown = RoutingTrace.concat([prompt, generated if prompt.logits.shape[1] else generated.without_logits()])
    if tokenizer is not None:
        grown.tokens = tokenizer.token_texts(grown.token_ids)
    return new_ids, grown


# --- measuring an intervention ----------------------------------------------------------------

@dataclass(frozen=True)
class NextTokenChange:
    """Per position, how an intervention changed the next-token distribution (a piece of a text)."""

    kl: np.ndarray  # [n] KL(original || intervened), nats
    top1_changed: np.ndarray  # [n] bool: the most likely next token changed
    base_nll: np.ndarray  # [m <= n] -log p(actual next token), original; m < n at the end of the text
    nll: np.ndarray  # [m] the same, intervened


@dataclass(frozen=True)
class InterventionEffect:
    """How an intervention changed the next-token distribution, position by position."""

    kl_per_token: np.ndarray  # [T] KL(original || intervened) of each position's next-token distribution, nats
    mean_kl: float
    last_kl: float  # at the last position: the distribution the next generated token comes from
    loss: float  # mean cross-entropy of the actual next tokens (positions 0..T-2), intervened
    base_loss: float  # the same without the intervention
    top1_changed: float  # fraction of positions whose most likely next token changed
    interventions: str = "none"  # what was changed, in words (Interventions.describe)

    @property
    def loss_change(self) -> float:
        return self.loss - self.base_loss

    def __repr__(self) -> str:
        return (f"InterventionEffect({self.interventions}, over {len(self.kl_per_token):,} positions: mean KL "
                f"{self.mean_kl:.4g} nats (last {self.last_kl:.4g}), loss {self.base_loss:.4g} -> {self.loss:.4g}, "
                f"top-1 changed at {self.top1_changed:.1%} of positions)")

    @classmethod
    def join(cls, pieces: Sequence[NextTokenChange], interventions: str = "none") -> "InterventionEffect":
        """The effect over a whole text from its pieces, in order (one piece, or one per window)."""
        kl = np.concatenate([p.kl for p in pieces])
        base_nll, nll = np.concatenate([p.base_nll for p in pieces]), np.concatenate([p.nll for p in pieces])

        def mean(values: np.ndarray) -> float:
            return float(values.mean()) if len(values) else float("nan")  # a one-token text has no next token

        changed = np.concatenate([p.top1_changed for p in pieces])
        return cls(kl_per_token=kl, mean_kl=float(kl.mean()), last_kl=float(kl[-1]), loss=mean(nll),
                   base_loss=mean(base_nll), top1_changed=float(changed.mean()), interventions=interventions)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """``[..., V]`` -> ``[..., V]`` float64 log-probabilities."""
    z = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def next_token_effect(base: np.ndarray, changed: np.ndarray, next_ids: np.ndarray) -> NextTokenChange:
    """Compare log-probabilities ``[n, V]`` position by position; ``next_ids`` ``[m <= n]``: the actual next tokens."""
    rows = np.arange(len(next_ids))
    return NextTokenChange(kl=(np.exp(base) * (base - changed)).sum(-1),
                           top1_changed=base.argmax(-1) != changed.argmax(-1),
                           base_nll=-base[rows, next_ids], nll=-changed[rows, next_ids])
