"""Plots of expert routing, one small function per view, each returning a matplotlib ``Figure``.

Every function builds its figure with the object API (``Figure()``, ``fig.subplots()``),
never with pyplot's global state, so it needs no GUI backend: it works headless (save
with ``fig.savefig("x.png")``) and displays inline in a notebook (a ``Figure`` is the
last value of a cell).  Every plot colours an expert with the same colour,
:func:`expert_colors`, so expert 7 looks the same in the token grid and elsewhere.

    trace = model.trace(ids, tokenizer=tok)
    plot_token_experts(trace).savefig("tokens.png")
    plot_expert_load(analysis.expert_load(trace), trace.layers).savefig("load.png")
"""

from __future__ import annotations

import itertools
import math
from functools import lru_cache
from typing import Mapping, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import BoundaryNorm, ListedColormap, TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from ..errors import MinimoeError

TOKENS_PER_PANEL = 64  # the token grid wraps into panels of this many tokens
MAX_PLOTTED_TOKENS = 512  # per-token plots draw at most this many tokens, the first ones, and say so
# Cells in the token grid up to which each cell gets its expert id written in it: Qwen1.5-MoE's 24 sparse
# layers at the default cut.  Among 60 colours the id, not the colour, says which expert a cell is.
ANNOTATE_CELLS = 24 * MAX_PLOTTED_TOKENS
# Inches: the report's column (1,168 px) at 100 dpi.  More experts get narrower cells, not a wider figure.
MAX_FIGURE_WIDTH = 11.5
MAX_MATRIX_SIZE = 9.0  # inches: an E x E matrix stays on one screen
MAX_TICK_LABELS = 16  # an axis of expert (or layer) numbers labels at most this many, at a round step
MAX_LEGEND_LINES = 8  # more lines than this (one per layer) get a colour bar instead of a legend
CELL_FONTSIZE = 6  # points: numbers written in heatmap cells; smaller where the cells are narrow, down to
MIN_CELL_FONTSIZE = 5  # points: below this a number is not written at all (the colour bar gives the value)
DIGIT_WIDTH = 0.64  # em: a digit of DejaVu Sans (matplotlib's font) is 0.636 of the font size wide
PADDING = (0.85, 0.85, 0.85, 1.0)  # cells without an expert (padding -1 after a per-layer intervention)


# --- colours and labels ----------------------------------------------------------------

def expert_colors(num_experts: int) -> list[tuple[float, float, float, float]]:
    """One RGBA colour per expert id, the same in every plot, for any number of experts.

    Colour ``i`` is the sRGB colour farthest (by the CIE94 colour difference, which
    follows what the eye sees) from colours ``0 .. i-1`` and from white, black and the
    padding grey.  So
    the first ``E`` colours are as distinct as ``E`` colours can be, neighbouring ids are
    never similar (``i + 1`` is chosen to be far from ``i``), and expert ``i`` keeps its
    colour whatever ``E`` is.
    """
    if num_experts < 0:
        raise MinimoeError(f"num_experts must be non-negative, got {num_experts}")
    palette = _distinct_colors(max(num_experts, 64))
    return [(*rgb, 1.0) for rgb in palette[:num_experts]]


@lru_cache(maxsize=8)
def _distinct_colors(count: int) -> tuple[tuple[float, float, float], ...]:
    """``count`` sRGB colours by farthest-point sampling (CIE94) over a 21^3 grid of candidates."""
    levels = np.linspace(0.0, 1.0, 21)
    candidates = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), axis=-1).reshape(-1, 3)
    if count > len(candidates):
        raise MinimoeError(f"at most {len(candidates)} distinct expert colours, asked for {count}")
    lab = _srgb_to_lab(candidates)
    avoid = _srgb_to_lab(np.array([(1.0, 1.0, 1.0), (0.0, 0.0, 0.0), PADDING[:3]]))  # background, ink, padding
    distance = np.min([_delta_e94(lab, colour) for colour in avoid], axis=0)  # to the nearest colour taken
    chosen = []
    for _ in range(count):
        best = int(distance.argmax())
        chosen.append(tuple(float(c) for c in candidates[best]))
        distance = np.minimum(distance, _delta_e94(lab, lab[best]))
    return tuple(chosen)


def _srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB ``[..., 3]`` in 0..1 -> CIELAB ``[..., 3]`` (D65 white), the standard formulas."""
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    to_xyz = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = linear @ to_xyz.T / np.array([0.95047, 1.0, 1.08883])
    delta = 6 / 29
    f = np.where(xyz > delta**3, np.cbrt(xyz), xyz / (3 * delta**2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


def _delta_e94(lab: np.ndarray, other: np.ndarray) -> np.ndarray:
    """CIE94 colour difference (graphic-arts weights) between CIELAB ``[..., 3]`` and ``[3]``.

    Unlike plain Lab distance it discounts differences in chroma among saturated colours,
    where the eye tells them apart less well.  Made symmetric with the geometric mean chroma.
    """
    dl = lab[..., 0] - other[..., 0]
    c1, c2 = np.hypot(lab[..., 1], lab[..., 2]), np.hypot(other[..., 1], other[..., 2])
    dc = c1 - c2
    dh_squared = np.maximum((lab[..., 1] - other[..., 1]) ** 2 + (lab[..., 2] - other[..., 2]) ** 2 - dc**2, 0.0)
    chroma = np.sqrt(c1 * c2)
    return np.sqrt(dl**2 + (dc / (1 + 0.045 * chroma)) ** 2 + dh_squared / (1 + 0.015 * chroma) ** 2)


def delta_e(a: Sequence[float], b: Sequence[float]) -> float:
    """The CIE94 colour difference of two sRGB(A) colours (about 1 is just noticeable)."""
    lab = _srgb_to_lab(np.array([a[:3], b[:3]], dtype=np.float64))
    return float(_delta_e94(lab[0], lab[1]))


def text_color(rgba: Sequence[float]) -> str:
    """``"black"`` or ``"white"``, whichever reads better on a background of colour ``rgba``."""
    r, g, b = rgba[:3]
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.55 else "white"


# How whitespace shows in labels: the symbols DejaVu (matplotlib's font) draws.  Other control
# characters show as their escape (\r, \x1b).
VISIBLE = {" ": "\u2423", "\n": "\u21b5", "\t": "\u21e5"}  # ␣ ↵ ⇥ (DejaVu draws ⏎ too small to read)


def visible_text(text: str, spaces: bool = True) -> str:
    """``text`` with whitespace and control characters as visible symbols (``spaces=False`` keeps spaces)."""
    out = []
    for ch in text:
        if ch in VISIBLE and (spaces or ch != " "):
            out.append(VISIBLE[ch])
        elif ch.isprintable():
            out.append(ch)
        else:
            out.append(repr(ch)[1:-1])
    return "".join(out)


def token_label(text: str | None, token_id: int | None = None, width: int = 12) -> str:
    """A token as a tick label: its text with visible whitespace (␣ ↵ ⇥), shortened to ``width``; else its id."""
    label = visible_text(text) if text is not None else str(token_id)
    return label if len(label) <= width else label[: width - 1] + "…"


def trace_labels(trace) -> list[str]:
    """Tick labels for every token of a trace (its text when traced with a tokenizer, else its id)."""
    if trace.tokens is None:
        return [token_label(None, int(t)) for t in trace.token_ids]
    return [token_label(text) for text in trace.tokens]


def first_tokens(trace, max_tokens: int) -> tuple:
    """(the trace of its first ``max_tokens`` tokens, the words that say so: "first 512 of 3,493 tokens")."""
    if max_tokens < 1:
        raise MinimoeError(f"max_tokens must be at least 1, got {max_tokens}")
    shown = trace.first(max_tokens)
    if shown.num_tokens == trace.num_tokens:
        return shown, f"all {trace.num_tokens:,} tokens"
    return shown, f"first {shown.num_tokens:,} of {trace.num_tokens:,} tokens"


def _layer_index(layer: int, count: int, layers: Sequence[int] | None) -> int:
    """The S-axis index of decoder layer ``layer`` (``layers`` lists the sparse layers; default 0..count-1)."""
    layers = list(range(count)) if layers is None else [int(x) for x in layers]
    if len(layers) != count:
        raise MinimoeError(f"{len(layers)} layer numbers given for {count} sparse layers")
    if layer not in layers:
        raise MinimoeError(f"layer {layer} is not one of the sparse layers {layers}")
    return layers.index(layer)


# --- token x layer grid ----------------------------------------------------------------

def plot_token_experts(trace, rank: int = 0, tokens_per_panel: int = TOKENS_PER_PANEL,
                       max_tokens: int = MAX_PLOTTED_TOKENS) -> Figure:
    """The token x layer grid: each cell is coloured by the token's rank-``rank`` expert (0 = top-1) in that layer.

    One row per sparse layer, one column per token, the expert id written in the cell;
    texts longer than ``tokens_per_panel`` wrap into several panels, one under the other.
    At most the first ``max_tokens`` tokens are drawn, and the title says how many of how many.
    """
    k = trace.expert_ids.shape[2]
    if not 0 <= rank < k:
        raise MinimoeError(f"rank must be in [0, {k}) for this trace (k = {k}), got {rank}")
    if tokens_per_panel < 1:
        raise MinimoeError(f"tokens_per_panel must be at least 1, got {tokens_per_panel}")
    trace, cut = first_tokens(trace, max_tokens)
    ids = trace.expert_ids[:, :, rank]  # [S, T]
    num_layers, num_tokens = ids.shape
    labels = trace_labels(trace)
    panels = max(1, math.ceil(num_tokens / tokens_per_panel))
    per_panel = min(tokens_per_panel, max(num_tokens, 1))
    panel_height = 0.32 * num_layers + 1.1  # rows plus the rotated token labels
    fig = Figure(figsize=(max(6.5, 0.26 * per_panel + 1.6), panel_height * panels + 0.7), layout="constrained")
    axes = np.atleast_1d(fig.subplots(panels, 1, squeeze=False)[:, 0])
    colors = expert_colors(trace.num_experts)
    cmap = ListedColormap(colors).with_extremes(bad=PADDING)
    norm = BoundaryNorm(np.arange(-0.5, trace.num_experts + 0.5), trace.num_experts)
    annotate = ids.size <= ANNOTATE_CELLS
    for p, ax in enumerate(axes):
        start, stop = p * tokens_per_panel, min(num_tokens, (p + 1) * tokens_per_panel)
        _token_panel(ax, ids[:, start:stop], start, labels[start:stop], trace.layers, cmap, norm, colors, annotate)
        ax.set_xlim(start - 0.5, start + per_panel - 0.5)  # a short last panel keeps the others' cell width
    which = "top-1" if rank == 0 else f"rank-{rank + 1}"
    # Left-aligned: a wide grid is seen through a scrolling box, which starts at the left.
    fig.suptitle(f"The {which} expert of each token in each sparse layer\n({cut}; {trace.num_experts} experts, "
                 f"k = {k}; whitespace drawn as ␣ ↵ ⇥)", x=0.01, ha="left")
    return fig


def _token_panel(ax, ids, start, labels, layers, cmap, norm, colors, annotate) -> None:
    """One panel of the token grid: tokens ``start .. start + len(labels)``."""
    stop = start + ids.shape[1]
    ax.imshow(np.ma.masked_less(ids, 0), cmap=cmap, norm=norm, aspect="auto", interpolation="nearest",
              extent=(start - 0.5, stop - 0.5, ids.shape[0] - 0.5, -0.5))
    ax.set_xticks(np.arange(start, stop), labels, rotation=90, fontsize=7, fontfamily="monospace")
    ax.set_yticks(np.arange(ids.shape[0]), [f"layer {int(layer)}" for layer in layers], fontsize=8)
    ax.tick_params(length=0)
    # Thin white lines between cells, so that neighbours with one expert still read as separate tokens.
    ax.vlines(np.arange(start, stop - 1) + 0.5, -0.5, ids.shape[0] - 0.5, colors="white", linewidth=0.6)
    ax.hlines(np.arange(ids.shape[0] - 1) + 0.5, start - 0.5, stop - 0.5, colors="white", linewidth=0.6)
    if annotate:
        for (row, column), expert in np.ndenumerate(ids):
            if expert >= 0:
                ax.text(start + column, row, str(expert), ha="center", va="center", fontsize=CELL_FONTSIZE,
                        color=text_color(colors[expert]))
    for spine in ax.spines.values():
        spine.set_visible(False)


# --- load, co-activation, entropy ------------------------------------------------------

HEATMAP_MARGIN = 3.2  # inches of a heatmap's width that are not cells: row labels and the colour bar


def _heatmap_size(rows: int, columns: int) -> tuple[float, float]:
    """(width, height) in inches of a rows x columns heatmap: 0.32 inch a cell, narrower when that is too wide."""
    return min(MAX_FIGURE_WIDTH, max(5.0, 0.32 * columns + HEATMAP_MARGIN)), max(2.6, 0.32 * rows + 1.6)


def cell_fontsize(columns: int, characters: int) -> float | None:
    """The font size (points) at which numbers of ``characters`` digits fit the cells of a heatmap of ``columns``
    columns (:data:`CELL_FONTSIZE` if they can), or None if that would be under :data:`MIN_CELL_FONTSIZE`."""
    cell = (_heatmap_size(1, columns)[0] - HEATMAP_MARGIN) / columns  # inches
    size = min(CELL_FONTSIZE, cell * 72 / (characters * DIGIT_WIDTH))
    return size if size >= MIN_CELL_FONTSIZE else None


def plot_expert_load(load, layers: Sequence[int]) -> Figure:
    """Each expert's share of the assignments per sparse layer (an ``ExpertLoad``), layers x experts.

    The colour bar marks the uniform share 1/E; the y labels give each layer's
    coefficient of variation of the counts (0 = perfectly even).
    """
    share = np.asarray(load.share)
    num_layers, num_experts = share.shape
    if len(layers) != num_layers:
        raise MinimoeError(f"{len(layers)} layer numbers given for {num_layers} sparse layers")
    fig = Figure(figsize=_heatmap_size(num_layers, num_experts), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(share, cmap="viridis", vmin=0, aspect="auto", interpolation="nearest")
    uniform = 1.0 / num_experts
    bar = fig.colorbar(image, ax=ax, label=f"share of the layer's assignments\n(uniform = 1/E = {uniform:.3f}, line)")
    bar.ax.axhline(uniform, color="white", linewidth=2)
    bar.ax.axhline(uniform, color="black", linewidth=1)
    _expert_ticks(ax, num_experts, axis="x")
    ax.set_yticks(np.arange(num_layers), [f"layer {int(layer)}  CV {cv:.2f}" for layer, cv in zip(layers, load.cv)])
    ax.set_xlabel("expert")
    ax.set_title("Expert load: share of the top-k assignments per layer")
    return fig


def tick_step(count: int, max_labels: int = MAX_TICK_LABELS) -> int:
    """How far apart to label an axis of ``count`` numbers (0 .. count-1): the smallest of 1, 2, 5, 10, 20, 50 ...
    that labels at most ``max_labels`` of them (16 experts: every one; 60: every 5th; 128: every 10th)."""
    for power in itertools.count():
        for step in (1 * 10**power, 2 * 10**power, 5 * 10**power):
            if math.ceil(count / step) <= max_labels:
                return step


def _expert_ticks(ax, num_experts: int, axis: str) -> None:
    """Expert ids labelled at :func:`tick_step`'s spacing, with an unlabelled tick at every expert between."""
    step = tick_step(num_experts)
    ticks = np.arange(0, num_experts, step)
    scale = ax.xaxis if axis == "x" else ax.yaxis
    scale.set_ticks(ticks, [str(t) for t in ticks], fontsize=7)
    scale.set_ticks(np.arange(num_experts) if step > 1 else [], minor=True)  # so that one can count the cells


def plot_coactivation(matrix, layer: int, layers: Sequence[int] | None = None) -> Figure:
    """The co-activation matrix of one layer: cell (i, j) = P(expert j chosen | expert i chosen).

    ``matrix`` is one layer's ``[E, E]`` or :func:`minimoe.inspect.analysis.coactivation`'s
    ``[S, E, E]``; for the latter ``layer`` is a decoder layer, looked up in ``layers``
    (the trace's sparse layers; default 0..S-1).  The diagonal (always 1) is greyed out
    so that the colour scale shows the pairs.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.ndim == 3:
        matrix = matrix[_layer_index(layer, matrix.shape[0], layers)]
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise MinimoeError(f"a co-activation matrix is [E, E] or [S, E, E], got shape {matrix.shape}")
    num_experts = matrix.shape[0]
    pairs = np.ma.masked_array(matrix, mask=np.eye(num_experts, dtype=bool))
    cmap = colormaps["magma"].with_extremes(bad=PADDING)
    size = min(MAX_MATRIX_SIZE, max(4.5, 0.22 * num_experts + 2.5))
    fig = Figure(figsize=(size + 1.0, size), layout="constrained")
    ax = fig.subplots()
    top = float(pairs.max()) if pairs.count() else 1.0
    image = ax.imshow(pairs, cmap=cmap, vmin=0, vmax=max(top, 1e-9), interpolation="nearest")
    fig.colorbar(image, ax=ax, label="P(expert j chosen | expert i chosen)", shrink=0.85)
    _expert_ticks(ax, num_experts, axis="x")
    _expert_ticks(ax, num_experts, axis="y")
    ax.set_xlabel("expert j (chosen together with i)")
    ax.set_ylabel("expert i")
    ax.set_title(f"Co-activation in layer {layer}")
    return fig


def plot_entropy(entropy, layers: Sequence[int], top_k: int | None = None) -> Figure:
    """Router confidence per sparse layer, from a ``RoutingEntropy``: two panels.

    Left: mean entropy of the router's distribution (bars, with the tokens' standard
    deviation) against the uniform router's ``log E``.  Right: the mean probability of
    the top-1 expert and of the k chosen together, with the uniform values 1/E (and
    k/E when ``top_k`` is given).
    """
    num_layers = len(np.asarray(entropy.mean_entropy))
    if len(layers) != num_layers:
        raise MinimoeError(f"{len(layers)} layer numbers given for {num_layers} sparse layers")
    names = [str(int(layer)) for layer in layers]
    x = np.arange(num_layers)
    num_experts = round(math.exp(entropy.max_entropy))
    fig = Figure(figsize=(max(8.0, 0.5 * num_layers + 5.0), 4.2), layout="constrained")
    left, right = fig.subplots(1, 2)
    left.bar(x, entropy.mean_entropy, yerr=np.asarray(entropy.entropy).std(axis=1), color="tab:blue",
             capsize=2, label="mean over tokens (± std)")
    left.axhline(entropy.max_entropy, color="black", linestyle="--",
                 label=f"uniform: log E = {entropy.max_entropy:.2f}")
    left.set_ylim(0, entropy.max_entropy * 1.15)
    left.set(xticks=x, xlabel="layer", ylabel="entropy (nats)", title="Routing entropy")
    left.set_xticklabels(names)
    left.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, fontsize=8)
    right.plot(x, entropy.top1_mass, "o-", color="tab:orange", label="top-1 expert")
    right.plot(x, entropy.topk_mass, "s-", color="tab:green", label="k chosen experts")
    right.axhline(1 / num_experts, color="tab:orange", linestyle=":", label=f"uniform 1/E = {1 / num_experts:.3f}")
    if top_k is not None:
        right.axhline(top_k / num_experts, color="tab:green", linestyle=":",
                      label=f"uniform k/E = {top_k / num_experts:.3f}")
    right.set_ylim(0, 1)
    right.set(xticks=x, xlabel="layer", ylabel="router probability (mean over tokens)", title="Probability mass chosen")
    right.set_xticklabels(names)
    right.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, fontsize=8)
    return fig


def plot_consecutive_rate(rate, layers: Sequence[int]) -> Figure:
    """How often neighbouring tokens share their top-1 expert, per layer (a ``ConsecutiveRate``), against chance.

    Two baselines: 1/E (uniform routing) and the rate two unrelated tokens would
    agree given the observed top-1 load; only bars above the second mean that
    neighbours really route alike.
    """
    num_layers = len(np.asarray(rate.top1_rate))
    if len(layers) != num_layers:
        raise MinimoeError(f"{len(layers)} layer numbers given for {num_layers} sparse layers")
    x = np.arange(num_layers)
    fig = Figure(figsize=(max(5.5, 0.5 * num_layers + 3.0), 3.4), layout="constrained")
    ax = fig.subplots()
    ax.bar(x, rate.top1_rate, color="tab:blue", label="same top-1 expert as the previous token")
    ax.plot(x, rate.chance_given_load, "D", color="tab:red", label="chance given the load (sum of q²)")
    ax.axhline(rate.chance_uniform, color="black", linestyle="--", label=f"chance 1/E = {rate.chance_uniform:.3f}")
    ax.set(xticks=x, xlabel="layer", ylabel="fraction of adjacent token pairs",
           title="Consecutive tokens routed to the same expert")
    ax.set_xticklabels([str(int(layer)) for layer in layers])
    top = max(float(np.max(rate.top1_rate)), float(np.max(rate.chance_given_load)), rate.chance_uniform)
    ax.set_ylim(0, min(1.0, top * 1.6) if top > 0 else 1.0)
    ax.legend(fontsize=8, loc="best")
    return fig


# --- token queries ---------------------------------------------------------------------

def plot_token_routing(routings: Sequence) -> Figure:
    """Where each queried token goes: one panel per :class:`~minimoe.inspect.analysis.TokenRouting`, layers x experts.

    A cell is the share of the token's occurrences that chose the expert (among its k),
    written in percent; the most frequent top-1 expert of each layer is outlined, and the
    row label gives how consistently it was the top-1.
    """
    if not routings:
        raise MinimoeError("plot_token_routing needs at least one token")
    num_layers, num_experts = routings[0].counts.shape
    fig = Figure(figsize=_heatmap_size(num_layers * len(routings) + len(routings), num_experts),
                 layout="constrained")
    axes = fig.subplots(len(routings), 1, squeeze=False)[:, 0]
    fontsize = cell_fontsize(num_experts, len("100"))
    for ax, routing in zip(axes, routings):
        share = routing.counts / max(routing.occurrences, 1)  # [S, E]
        image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
        for (row, column), value in np.ndenumerate(share if fontsize else np.zeros(0)):
            if value > 0:
                ax.text(column, row, f"{100 * value:.0f}", ha="center", va="center", fontsize=fontsize,
                        color="white" if value > 0.6 else "black")
        for row, expert in enumerate(routing.top1_expert):
            if expert >= 0:
                ax.add_patch(Rectangle((expert - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="tab:red", linewidth=1.5))
        ax.set_yticks(np.arange(num_layers), [
            f"layer {int(layer)}: top-1 e{int(e)} {100 * c:.0f}%" if e >= 0 else f"layer {int(layer)}"
            for layer, e, c in zip(routing.layers, routing.top1_expert, routing.top1_consistency)], fontsize=7)
        _expert_ticks(ax, num_experts, axis="x")
        name = token_label(routing.text, routing.token_id, width=24)
        ax.set_title(f"{name} (id {routing.token_id}): {routing.occurrences:,} occurrences"
                     + ("" if routing.occurrences else " (not in the text)"), fontsize=9, fontfamily="monospace")
    fig.colorbar(image, ax=list(axes), label="share of the token's occurrences\nchoosing the expert")
    axes[-1].set_xlabel(("expert (cell: % of the token's occurrences choosing it; " if fontsize else "expert (")
                        + "red box: most frequent top-1)")
    fig.suptitle("Where each token is routed, per sparse layer")
    return fig


def plot_expert_tokens(vocabulary, layer: int, texts: Sequence[str] | None = None) -> Figure:
    """The tokens one expert takes most often (an :class:`~minimoe.inspect.analysis.ExpertVocabulary`), as bars.

    ``texts`` are the tokens' texts (parallel to ``vocabulary.token_ids``; default: their
    ids).  Each bar is labelled with its count and exclusivity: the share of that token's
    occurrences that went to this expert.
    """
    ids = np.asarray(vocabulary.token_ids)
    labels = [token_label(texts[i] if texts is not None else None, int(t), width=20) for i, t in enumerate(ids)]
    fig = Figure(figsize=(6.5, 1.4 + 0.28 * max(len(ids), 1)), layout="constrained")
    ax = fig.subplots()
    y = np.arange(len(ids))
    color = expert_colors(vocabulary.expert + 1)[vocabulary.expert]
    bars = ax.barh(y, vocabulary.counts, color=color, edgecolor="black", linewidth=0.5)
    ax.bar_label(bars, labels=[f"{c} ({100 * x:.0f}% of its occurrences)" for c, x in
                               zip(vocabulary.counts, vocabulary.exclusivity)], fontsize=7, padding=2)
    ax.set_yticks(y, labels, fontsize=8, fontfamily="monospace")
    ax.invert_yaxis()  # most frequent on top
    ax.set_xlim(0, max(1, int(np.max(vocabulary.counts, initial=0))) * 1.6)
    ax.set(xlabel="times chosen (among the token's k experts)",
           title=f"The tokens expert {vocabulary.expert} of layer {layer} takes most often")
    return fig


# --- shared expert, domains, interventions ----------------------------------------------

def plot_shared_gate(trace, tokens_per_panel: int = TOKENS_PER_PANEL, layers: Sequence[int] | None = None,
                     max_tokens: int = MAX_PLOTTED_TOKENS) -> Figure:
    """The shared expert's gate ``sigmoid(h @ w)`` per token, one line per sparse layer.

    ``layers`` picks the decoder layers to draw (default: every sparse layer; with
    many layers a few spread out read better).  Every token has its tick label; texts
    longer than ``tokens_per_panel`` wrap into several panels, one under the other, as
    in :func:`plot_token_experts`, which also draws at most ``max_tokens`` and says so.
    """
    if tokens_per_panel < 1:
        raise MinimoeError(f"tokens_per_panel must be at least 1, got {tokens_per_panel}")
    trace, cut = first_tokens(trace, max_tokens)
    rows = [_layer_index(int(layer), len(trace.layers), trace.layers) for layer in
            (trace.layers if layers is None else layers)]
    if not rows:
        raise MinimoeError("plot_shared_gate: no layers to draw")
    gate = np.asarray(trace.shared_gate)[rows]
    drawn = [int(trace.layers[s]) for s in rows]
    num_layers, num_tokens = gate.shape
    panels = max(1, math.ceil(num_tokens / tokens_per_panel))
    per_panel = min(tokens_per_panel, max(num_tokens, 1))
    fig = Figure(figsize=(max(7.0, 0.26 * per_panel + 2.6), 2.9 * panels + 0.5), layout="constrained")
    axes = fig.subplots(panels, 1, squeeze=False)[:, 0]
    line_colors = layer_colors(num_layers)
    labels = trace_labels(trace)
    for p, ax in enumerate(axes):
        start, stop = p * tokens_per_panel, min(num_tokens, (p + 1) * tokens_per_panel)
        x = np.arange(start, stop)
        for s, layer in enumerate(drawn):
            ax.plot(x, gate[s, start:stop], color=line_colors[s], linewidth=1.2, marker=".", label=f"layer {layer}")
        ax.set_xticks(x, labels[start:stop], rotation=90, fontsize=7, fontfamily="monospace")
        ax.set_xlim(start - 0.5, start + per_panel - 0.5)
        ax.set_ylim(0, 1)
        ax.set_ylabel("gate (sigmoid)")
        ax.grid(axis="y", alpha=0.3)
    _layer_key(fig, axes, drawn, line_colors, fontsize=7, loc="lower left", bbox_to_anchor=(1.0, 0.0))
    fig.suptitle(f"The shared expert's gate per token ({cut}):\nhow much of the always-on expert each token takes",
                 x=0.01, ha="left")
    return fig


def plot_domain_specialization(spec, layer: int, layers: Sequence[int] | None = None) -> Figure:
    """Domains x experts in one layer (a ``DomainSpecialization``): each domain's share relative to uniform.

    Diverging colours centred on 1 (uniform): red cells are experts a domain uses more
    than 1/E, blue less.  ``layer`` is a decoder layer, looked up in ``layers`` (the
    traces' sparse layers; default 0..S-1).
    """
    ratio = np.asarray(spec.ratio, dtype=np.float64)
    matrix = ratio[:, _layer_index(layer, ratio.shape[1], layers)]  # [D, E]
    num_domains, num_experts = matrix.shape
    fig = Figure(figsize=_heatmap_size(num_domains, num_experts), layout="constrained")
    ax = fig.subplots()
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=max(2.0, float(matrix.max())))
    image = ax.imshow(matrix, cmap="RdBu_r", norm=norm, aspect="auto", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="share / uniform share 1/E\n(1 = uniform)")
    fontsize = cell_fontsize(num_experts, len("12.5"))
    if matrix.size <= 400 and fontsize:
        for (row, column), value in np.ndenumerate(matrix):
            ax.text(column, row, f"{value:.1f}", ha="center", va="center", fontsize=fontsize,
                    color="white" if abs(norm(value) - 0.5) > 0.3 else "black")
    _expert_ticks(ax, num_experts, axis="x")
    ax.set_yticks(np.arange(num_domains), list(spec.domains))
    ax.set_xlabel("expert")
    ax.set_title(f"Domain specialization in layer {layer}")
    return fig


def plot_intervention_effects(effects: Mapping[str, object]) -> Figure:
    """Horizontal bars per named ``InterventionEffect``: mean KL from the unmodified model, and the loss change.

    A loss change that could not be measured (a one-token text) is shown as "n/a".
    """
    if not effects:
        raise MinimoeError("plot_intervention_effects needs at least one intervention")
    names = list(effects)
    y = np.arange(len(names))
    kl = np.array([effects[name].mean_kl for name in names], dtype=np.float64)
    change = np.array([effects[name].loss_change for name in names], dtype=np.float64)
    fig = Figure(figsize=(9.0, 1.2 + 0.45 * len(names)), layout="constrained")
    left, right = fig.subplots(1, 2, sharey=True)
    _labelled_bars(left, y, kl, "tab:purple", "{:.3f}")
    left.set(xlabel="mean KL(original || intervened), nats", title="Change in next-token predictions")
    left.set_yticks(y, names)
    left.invert_yaxis()  # first intervention on top
    _labelled_bars(right, y, change, "tab:red", "{:+.3f}")
    right.axvline(0, color="black", linewidth=0.8)
    right.set(xlabel="loss change, nats per token", title="Change in loss on the text")
    return fig


def plot_expert_cache_hits(hits, layers: Sequence[int]) -> Figure:
    """Hit rate of an LRU expert cache against its size, one line per sparse layer (an ``ExpertCacheHits``).

    The dashed line is what a cache would hit if the experts a token needs were drawn
    uniformly at random: ``size / E``, the share of experts it holds.
    """
    rates = np.asarray(hits.hit_rate)
    if len(layers) != rates.shape[0]:
        raise MinimoeError(f"{len(layers)} layer numbers given for {rates.shape[0]} sparse layers")
    sizes = np.asarray(hits.cache_sizes)
    fig = Figure(figsize=(5.5, 3.6), layout="constrained")
    ax = fig.subplots()
    colors = layer_colors(len(layers))
    for s, layer in enumerate(layers):
        ax.plot(sizes, rates[s], marker="o", color=colors[s], label=f"layer {int(layer)}")
    num_experts = int(sizes.max())
    ax.plot(sizes, np.minimum(sizes / num_experts, 1.0), "k--", label="no reuse (size / E)")
    ax.set(xlabel="experts cached per layer", ylabel="hit rate", ylim=(0, 1.02),
           title="LRU expert cache, replayed on the trace")
    _layer_key(fig, [ax], layers, colors, fontsize=8, loc="lower right")
    return fig


def layer_colors(count: int) -> np.ndarray:
    """One colour per line of a per-layer plot, ``[count, 4]``: dark (first layer) to light (last), in order."""
    return colormaps["viridis"](np.linspace(0.0, 0.9, count))


def _layer_key(fig, axes, layers: Sequence[int], colors, **legend_options) -> None:
    """Say which line is which layer: a legend for a few layers; a colour bar of the layers for many
    (24 legend entries swamp the plot), with a legend for the other lines only."""
    if len(layers) <= MAX_LEGEND_LINES:
        axes[0].legend(**legend_options)
        return
    names = {f"layer {int(layer)}" for layer in layers}
    others = [line for line in axes[0].get_lines() if line.get_label() not in names]
    if others:
        axes[0].legend(handles=others, **legend_options)
    bar = fig.colorbar(ScalarMappable(BoundaryNorm(np.arange(len(layers) + 1) - 0.5, len(layers)),
                                      ListedColormap(colors)), ax=list(axes), label="layer (line colour)")
    ticks = np.arange(0, len(layers), tick_step(len(layers)))
    bar.set_ticks(ticks, labels=[str(int(layers[i])) for i in ticks])


def _labelled_bars(ax, y, values, color, fmt: str) -> None:
    finite = np.where(np.isfinite(values), values, 0.0)
    bars = ax.barh(y, finite, color=color)
    ax.bar_label(bars, labels=[fmt.format(v) if np.isfinite(v) else "n/a" for v in values], fontsize=8, padding=2)
    low, high = min(0.0, finite.min()), max(0.0, finite.max())
    margin = 0.25 * (high - low) or 0.1
    ax.set_xlim(low - (margin if low < 0 else 0), high + margin)
