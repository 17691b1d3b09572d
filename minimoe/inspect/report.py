"""A routing report for one text: one self-contained HTML page, its plots, and the trace as data.

    html = write_report(model, tokenizer, "def f(x):\\n    return x\\n", "report/")

traces the text, runs the analyses of :mod:`minimoe.inspect.analysis`, measures a few routing
interventions, and writes into the output folder:

* ``report.html`` -- the text coloured token by token by its top-1 expert in a layer
  the reader picks (hover a token for every layer's experts, weights and shared gate),
  a per-layer summary table, and the plots with a caption on what to look for.  The
  PNGs are embedded as data URIs and the CSS and script are inline, so the file can be
  mailed or opened offline on its own;
* the plots as PNG files (see :data:`PLOTS`);
* the routing as ``trace.npz``: the chosen experts, their weights, the shared gate and the
  norms, a few dozen bytes per token and sparse layer
  (:meth:`~minimoe.inspect.trace.RoutingTrace.load_npz` reads it back);
* ``report-files.txt``, the list of these files: a later report into the same folder removes
  those of them it does not write again, and nothing else.

On request (``data=``, see :data:`EXTRA_DATA`), the large formats: every expert's router
logits and probabilities ``[S, T, E]`` in ``trace.npz``, the whole trace as ``trace.json``, and
``routing.csv`` (one row per token x layer x chosen expert).  For a 17,000-token text on the
bundled model these are about 10x, 60x and 7x the size of the compact ``trace.npz``; JSON and
CSV are written a block of rows at a time, never held in memory whole.

A text of any length is traced window by window (:mod:`minimoe.inspect.tracing`); the page says
how.  Token queries (``tokens=["def", "return"]``: where each goes, see
:func:`minimoe.inspect.analysis.token_routing`) and expert queries (``experts=[(layer, expert)]``:
which tokens it takes) add a section, tables and plots.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.colors import to_hex

from ..errors import MinimoeError
from ..files import atomic_write, write_text
from . import analysis, viz
from .params import describe_model
from .trace import RoutingTrace
from .tracing import InterventionEffect, Progress, Windowing, measure_interventions, trace_text

REPORT = "report.html"
TRACE = "trace.npz"
MANIFEST = "report-files.txt"  # the files a report wrote, so that the next one into the folder can remove its own
# The large outputs, written only when asked for (Report.write's `data`): name -> what it adds.
EXTRA_DATA = {
    "router_scores": "trace.npz keeps router_logits and router_probs [S, T, E]: every expert's score",
    "json": "trace.json: every array of the trace as JSON",
    "csv": "routing.csv: one row per token x sparse layer x chosen expert",
}
EXTRA_FILES = {"json": "trace.json", "csv": "routing.csv"}
# The PNG files, in the report's order (the co-activation plots are per layer: coactivation_layer{L}.png;
# with queries, token_routing.png and expert_tokens_layer{L}_expert{E}.png come last; shared_gate.png only for a
# model with a shared expert).
PLOTS = ("token_experts.png", "expert_load.png", "entropy.png", "consecutive.png", "coactivation_layer{layer}.png",
         "shared_gate.png", "interventions.png")
QUERY_PLOTS = ("token_routing.png", "expert_tokens_layer{layer}_expert{expert}.png")
# The per-token plots (token grid, shared gate) show at most this many tokens: the first ones, as each
# plot's title says.  The analyses cover every token.
MAX_PLOTTED_TOKENS = viz.MAX_PLOTTED_TOKENS
MAX_TEXT_TOKENS = 10_000  # the coloured text on the page shows at most this many tokens (each carries a hover table)
SHARED_GATE_LINES = 4  # layers drawn in the shared-gate plot, spread from the first to the last
EXPERT_TOKENS_SHOWN = 20  # an expert query lists this many of the expert's tokens


@dataclass(frozen=True, eq=False)
class Analyses:
    """Everything the report computes from one trace."""

    load: analysis.ExpertLoad
    entropy: analysis.RoutingEntropy
    coactivation: np.ndarray  # [S, E, E]
    consecutive: analysis.ConsecutiveRate
    shared: analysis.SharedVsRouted
    effects: dict[str, InterventionEffect]
    disabled: dict[int, int]  # decoder layer -> the busiest expert, switched off in one intervention


@dataclass(frozen=True)
class Plot:
    name: str  # file name
    png: bytes
    caption: str


# --- input ---------------------------------------------------------------------------------

def encode_text(tokenizer, text: str) -> list[int]:
    """The text's token ids; MinimoeError if it is empty or a single token (any length above that is fine)."""
    if not isinstance(text, str):
        raise MinimoeError(f"the text to inspect must be a str, got {type(text).__name__}")
    if not text.strip():
        raise MinimoeError("the text to inspect is empty" if not text else "the text to inspect is only whitespace")
    ids = tokenizer.encode(text)
    if len(ids) < 2:
        raise MinimoeError(f"the text is only {len(ids)} token; the report needs at least 2 "
                           "(to compare neighbouring tokens and measure next-token loss)")
    return ids


# --- analyses --------------------------------------------------------------------------------

def report_interventions(trace: RoutingTrace, load: analysis.ExpertLoad, shared_expert: bool = True) -> dict[str, dict]:
    """The interventions the report measures, by name (as :func:`~minimoe.inspect.tracing.measure_interventions` takes them).

    ``shared_expert``: whether the model has one to switch off (Mixtral, OLMoE, Qwen3-MoE do not).
    """
    interventions = {}
    if trace.num_experts - 1 >= trace.top_k:  # disabling one must leave k experts to choose from
        busiest = {int(layer): int(load.counts[s].argmax()) for s, layer in enumerate(trace.layers)}
        interventions["disable busiest expert"] = {"disabled_experts": {layer: [e] for layer, e in busiest.items()}}
    if trace.top_k > 1:
        interventions[f"top-1 instead of top-{trace.top_k}"] = {"top_k": 1}
    if shared_expert:
        interventions["no shared expert"] = {"shared_expert": False}
    return interventions


def analyse(model, ids: list[int], trace: RoutingTrace, windowing: Windowing, progress: Progress = True) -> Analyses:
    """The routing analyses of ``trace`` and the effects of :func:`report_interventions` on ``ids``.

    The interventions run over the same windows as the trace.
    """
    load = analysis.expert_load(trace)
    interventions = report_interventions(trace, load, model.config.has_shared_expert)
    # A one-window trace keeps the plain forward's logits: each intervention then costs one forward, not two.
    effects = measure_interventions(model, ids, interventions, window=windowing.window, overlap=windowing.overlap,
                                    base_logits=trace.logits if trace.logits.shape[1] else None, progress=progress)
    disabled = {layer: experts[0] for layer, experts in
                interventions.get("disable busiest expert", {}).get("disabled_experts", {}).items()}
    return Analyses(load=load, entropy=analysis.routing_entropy(trace), coactivation=analysis.coactivation(trace),
                    consecutive=analysis.consecutive_same_expert(trace), shared=analysis.shared_vs_routed(trace),
                    effects=effects, disabled=disabled)


# --- queries ---------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class ExpertQuery:
    layer: int
    vocabulary: analysis.ExpertVocabulary
    texts: list[str]  # the text of each of vocabulary.token_ids


@dataclass(frozen=True, eq=False)
class Queries:
    """The answers to the questions asked about single tokens and single experts."""

    tokens: list[analysis.TokenRouting]
    experts: list[ExpertQuery]


def query_token_ids(model, tokenizer, tokens=(), experts=()) -> list[int]:
    """The ids the token queries name (see :func:`~minimoe.inspect.analysis.token_ids_for`), with the queries checked
    against the model: a typo fails before a long text is traced, not after."""
    ids = [token_id for query in tokens for token_id in analysis.token_ids_for(tokenizer, query)]
    bad_ids = [i for i in ids if not 0 <= i < model.config.vocab_size]
    if bad_ids:
        raise MinimoeError(f"token id {bad_ids[0]} is outside the vocabulary [0, {model.config.vocab_size})")
    for layer, expert in experts:
        if layer not in model.config.sparse_layers:
            raise MinimoeError(f"layer {layer} is not a sparse layer (sparse layers: {model.config.sparse_layers})")
        if not 0 <= expert < model.config.num_experts:
            raise MinimoeError(f"expert {expert} is outside [0, {model.config.num_experts})")
    return ids


def run_queries(trace: RoutingTrace, tokenizer, token_ids=(), experts=()) -> Queries:
    """Answer token queries (``token_ids``, from :func:`query_token_ids`) and expert queries
    (``(layer, expert)`` pairs) on ``trace``."""
    routings = [analysis.token_routing(trace, token_id, text)
                for token_id, text in zip(token_ids, tokenizer.token_texts(token_ids))]
    answers = []
    for layer, expert in experts:
        vocabulary = analysis.expert_tokens(trace, layer, expert, EXPERT_TOKENS_SHOWN)
        answers.append(ExpertQuery(layer, vocabulary, tokenizer.token_texts(vocabulary.token_ids)))
    return Queries(routings, answers)


def token_rows(routing: analysis.TokenRouting, shown: int = 4) -> list[tuple[str, ...]]:
    """Per layer: (layer, top-1 expert, its consistency, the ``shown`` most chosen experts: count, mean weight)."""
    rows = []
    for s, layer in enumerate(routing.layers):
        order = [int(e) for e in np.argsort(-routing.counts[s], kind="stable")[:shown] if routing.counts[s, e] > 0]
        top1 = int(routing.top1_expert[s])
        rows.append((str(int(layer)), f"e{top1}" if top1 >= 0 else "-",
                     f"{100 * routing.top1_consistency[s]:.0f}%" if top1 >= 0 else "-",
                     "  ".join(f"e{e} x{routing.counts[s, e]} w{routing.mean_weight[s, e]:.2f}" for e in order)))
    return rows


TOKEN_COLUMNS = ("layer", "top-1", "same top-1", "most chosen experts: times, mean weight")


def occurrences(count: int) -> str:
    """``"1 occurrence"``, ``"3 occurrences"``, ``"1,024 occurrences"``."""
    return f"{count:,} occurrence{'' if count == 1 else 's'}"


def never_occurs(text: str) -> str:
    return f"{text!r} never occurs in this text: there is no routing of it to show"


def takes_nothing(query: ExpertQuery) -> str:
    return f"expert {query.vocabulary.expert} of layer {query.layer} is chosen for none of this text's tokens"


def query_lines(queries: Queries) -> list[str]:
    """The answers as plain-text tables (what ``minimoe inspect --token/--expert`` prints)."""
    lines = []
    for routing in queries.tokens:
        lines.append(f"token {routing.text!r} (id {routing.token_id}): {occurrences(routing.occurrences)}")
        if routing.occurrences:
            widths = (6, 6, 11)
            lines.append("  " + "".join(c.ljust(w) for c, w in zip(TOKEN_COLUMNS, widths)) + TOKEN_COLUMNS[-1])
            lines += ["  " + "".join(c.ljust(w) for c, w in zip(row, widths)) + row[-1] for row in token_rows(routing)]
        else:
            lines.append(f"  {never_occurs(routing.text)}")
        lines.append("")
    for query in queries.experts:
        v = query.vocabulary
        lines.append(f"expert {v.expert} of layer {query.layer}: the tokens it takes most often")
        if len(v.token_ids):
            lines.append("  " + "times".ljust(7) + "share".ljust(7) + "token")
            lines += ["  " + str(int(c)).ljust(7) + f"{100 * x:.0f}%".ljust(7) + f"{text!r} (id {int(t)})"
                      for t, c, x, text in zip(v.token_ids, v.counts, v.exclusivity, query.texts)]
        else:
            lines.append(f"  {takes_nothing(query)}")
        lines.append("")
    if queries.tokens:
        lines.append("same top-1: share of the occurrences whose top-1 expert is the one shown; a token without a "
                     "leading space also names its ' '-variant (both are listed)")
    if queries.experts:
        lines.append("share: of all the occurrences of that token, the share this expert took")
    return lines


# --- plots -----------------------------------------------------------------------------------

def png_bytes(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def weights_caption(config) -> str:
    if config.norm_topk_prob:
        return ("the experts' weights are renormalised to sum to 1 (norm_topk_prob = true), but the router "
                "probability they came from is this top-k mass")
    return ("this top-k mass is also the sum of the weights that scale the chosen experts' outputs, below 1 because "
            "Qwen1.5-MoE does not renormalise the top-k weights (norm_topk_prob = false)")


def spread_layers(trace: RoutingTrace, count: int) -> list[int]:
    """Up to ``count`` sparse layers spread evenly from the first to the last (decoder layer numbers)."""
    picks = np.unique(np.linspace(0, len(trace.layers) - 1, min(count, len(trace.layers))).round().astype(int))
    return [int(trace.layers[s]) for s in picks]


def coactivation_layers(trace: RoutingTrace) -> list[int]:
    """The sparse layers whose co-activation the report shows: the first and the last."""
    return sorted({int(trace.layers[0]), int(trace.layers[-1])})


def make_plots(model, trace: RoutingTrace, results: Analyses, queries: Queries | None = None) -> list[Plot]:
    """Every plot of the report, rendered to PNG, with its caption."""
    E, k, layers = trace.num_experts, trace.top_k, trace.layers
    chance_pair = (k - 1) / (E - 1) if E > 1 else 0.0
    disabled = ", ".join(f"layer {layer}: expert {e}" for layer, e in results.disabled.items())
    _, cut = viz.first_tokens(trace, MAX_PLOTTED_TOKENS)
    first = f" ({cut} shown)"
    gate_layers = spread_layers(trace, SHARED_GATE_LINES)
    some_layers = (f" (layers {', '.join(map(str, gate_layers))} of {len(layers)}; the table above has every "
                   "layer's mean)" if len(gate_layers) < len(layers) else "")
    plots = [
        ("token_experts.png", viz.plot_token_experts(trace, max_tokens=MAX_PLOTTED_TOKENS),
         f"Each cell is the top-1 expert of a token (column) in a sparse layer (row){first}: runs of one colour "
         "along a row are neighbouring tokens sharing an expert; expert ids are not related across layers, so the same "
         "colour down a column is a coincidence, not a path."),
        ("expert_load.png", viz.plot_expert_load(results.load, layers),
         f"Each expert's share of the layer's {k} x {trace.num_tokens} assignments against the uniform 1/E = "
         f"{1 / E:.3f} (the line in the colour bar): a high CV (coefficient of variation, in the row labels) means "
         "a few experts take most tokens, which the load-balancing loss in training works against."),
        ("entropy.png", viz.plot_entropy(results.entropy, layers, top_k=k),
         f"Left, how undecided the router is (entropy of its softmax; log E = {results.entropy.max_entropy:.2f} "
         f"would be a uniform guess); right, the probability of the top-1 and the {k} chosen experts: "
         f"{weights_caption(model.config)}."),
        ("consecutive.png", viz.plot_consecutive_rate(results.consecutive, layers),
         f"How often a token's top-1 expert is the previous token's, against chance 1/E = {1 / E:.3f} and against "
         "the rate two unrelated tokens would agree given the uneven load (diamonds): only bars above the diamonds "
         "show that neighbouring tokens really route alike."),
    ]
    for layer in coactivation_layers(trace):
        plots.append((f"coactivation_layer{layer}.png", viz.plot_coactivation(results.coactivation, layer, layers),
                      f"Layer {layer}: cell (i, j) is how often expert j is among a token's {k} experts when expert i "
                      f"is; independent uniform routing would give (k-1)/(E-1) = {chance_pair:.2f} everywhere, so "
                      "bright cells are pairs of experts that work together."))
    if model.config.has_shared_expert:  # Mixtral, OLMoE and Qwen3-MoE have none
        plots.append(
            ("shared_gate.png", viz.plot_shared_gate(trace, layers=gate_layers, max_tokens=MAX_PLOTTED_TOKENS),
             f"The shared expert runs for every token, scaled by this sigmoid gate{some_layers}{first}, beside the "
             "routed experts: a gate that swings from token to token shows the model choosing how much "
             "general-purpose computation each token gets."))
    plots += [
        ("interventions.png", viz.plot_intervention_effects(results.effects),
         "How much each change to the routing moves the next-token predictions (mean KL divergence from the "
         "unmodified model) and the loss on this text"
         + (f" (busiest experts disabled: {disabled})" if disabled else "")
         + ": a large change means the model relies on what was removed."),
    ]
    if queries is not None and queries.tokens:
        plots.append((QUERY_PLOTS[0], viz.plot_token_routing(queries.tokens),
                      "Where each queried token goes in each layer: a cell is the share of the token's occurrences "
                      "that chose the expert (among its k), the red box the expert most often top-1. A token without "
                      "a leading space is shown with its ' '-variant, a different token of the vocabulary."))
    for query in queries.experts if queries is not None else ():
        name = QUERY_PLOTS[1].format(layer=query.layer, expert=query.vocabulary.expert)
        plots.append((name, viz.plot_expert_tokens(query.vocabulary, query.layer, query.texts),
                      f"The tokens expert {query.vocabulary.expert} of layer {query.layer} takes most often, with "
                      "the share of each token's occurrences it took: high shares mark a specialist."))
    return [Plot(name, png_bytes(fig), caption) for name, fig, caption in plots]


# --- HTML ------------------------------------------------------------------------------------

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; } .meta { color: #555; margin-top: 0; }
.text { font-family: ui-monospace, monospace; white-space: pre-wrap; line-height: 1.9; border: 1px solid #ccc;
        padding: 0.8em; border-radius: 4px; max-height: 70vh; overflow: auto; }
/* A white edge on each side of every token: neighbours routed to one expert still read as two tokens. */
.t { border-radius: 3px; padding: 1px 0; cursor: help; box-shadow: inset 1px 0 #fff, inset -1px 0 #fff; }
.legend span { display: inline-block; min-width: 2em; text-align: center; margin: 1px; border-radius: 2px;
               font-family: ui-monospace, monospace; font-size: 0.85em; }
.legend span[hidden] { display: none; }  /* the display above would otherwise show hidden chips */
table { border-collapse: collapse; font-size: 0.9em; } th, td { border: 1px solid #ccc; padding: 3px 8px; }
td { text-align: right; } td.l { text-align: left; font-family: ui-monospace, monospace; }
figure { margin: 2em 0; } figure img { max-width: 100%; }
/* The token grid at full size: scroll it rather than shrink it to unreadable. */
figure .scroll { overflow: auto; max-height: 80vh; border: 1px solid #ccc; }
figure .scroll img { max-width: none; display: block; }
figcaption { color: #444; max-width: 60em; }
"""

PAINT_SCRIPT = """
const colors = %s, inks = %s;
function paint(s) {
  const used = new Set();
  for (const t of document.querySelectorAll('.t')) {
    const e = +t.dataset.e.split(',')[s];
    used.add(e);
    t.style.background = e < 0 ? '#d9d9d9' : colors[e];
    t.style.color = e < 0 ? '#000' : inks[e];
  }
  for (const chip of document.querySelectorAll('.legend span')) chip.hidden = !used.has(+chip.dataset.e);
}
document.getElementById('layer').addEventListener('change', ev => paint(+ev.target.value));
"""
FULL_SIZE_PLOTS = ("token_experts.png", "shared_gate.png")  # shown at full size in a scrolling box


def visible(text: str) -> str:
    """A token's text as shown on the page: a newline gets a visible mark before it, control characters their
    escape; spaces and tabs stay as they are (the token's background shows them)."""
    return "".join(viz.VISIBLE["\n"] + ch if ch == "\n" else ch if ch in " \t" else viz.visible_text(ch)
                   for ch in text)


def token_title(trace: RoutingTrace, t: int) -> str:
    """The hover text of token ``t``: position, text, and per layer its experts, weights and shared gate."""
    text = repr(trace.tokens[t]) if trace.tokens is not None else "?"
    lines = [f"position {int(trace.positions[t])}: {text} (id {int(trace.token_ids[t])})"]
    for s, layer in enumerate(trace.layers):
        chosen = [(int(e), float(w)) for e, w in zip(trace.expert_ids[s, t], trace.expert_weights[s, t]) if e >= 0]
        experts = ", ".join(f"e{e} {w:.2f}" for e, w in chosen)
        total = sum(w for _, w in chosen)
        lines.append(f"layer {int(layer)}: {experts} (sum {total:.2f}); shared gate {trace.shared_gate[s, t]:.2f}")
    return "\n".join(lines)


def token_spans(trace: RoutingTrace, colors: list[str], inks: list[str], layer_index: int = 0) -> str:
    """The text as one ``<span>`` per token, coloured by its top-1 expert in sparse layer ``layer_index``.

    Every token's text and hover text is HTML-escaped; ``data-e`` lists its top-1
    expert in every sparse layer, for the layer picker's script.
    """
    top1 = trace.expert_ids[:, :, 0]  # [S, T]
    texts = trace.tokens if trace.tokens is not None else [f"[{int(i)}]" for i in trace.token_ids]
    spans = []
    for t, text in enumerate(texts):
        e = int(top1[layer_index, t])
        style = f"background:{colors[e]};color:{inks[e]}" if e >= 0 else "background:#d9d9d9"
        spans.append(f'<span class="t" data-e="{",".join(str(int(x)) for x in top1[:, t])}" style="{style}" '
                     f'title="{html.escape(token_title(trace, t))}">{html.escape(visible(text))}</span>')
    return "".join(spans)


def text_section(trace: RoutingTrace) -> str:
    """The layer picker, the expert colour legend and the coloured text (at most :data:`MAX_TEXT_TOKENS` tokens),
    with the script that repaints it."""
    palette = viz.expert_colors(trace.num_experts)
    colors = [to_hex(c) for c in palette]
    inks = [viz.text_color(c) for c in palette]
    options = "".join(f'<option value="{s}">layer {int(layer)}</option>' for s, layer in enumerate(trace.layers))
    script = PAINT_SCRIPT % (json.dumps(colors), json.dumps(inks))
    shown, cut = viz.first_tokens(trace, MAX_TEXT_TOKENS)
    return (f'<h2>The text, coloured by top-1 expert ({cut})</h2>\n<p><label>Sparse layer: <select id="layer">'
            f'{options}</select></label> &nbsp; Hover a token for its experts and weights in every layer; a thin white '
            f'edge separates tokens, {viz.VISIBLE[chr(10)]} marks a newline.</p>\n'
            f'<p class="legend">Experts that are some token\'s top-1 in this layer: {legend_chips(shown, colors, inks)}'
            f'</p>\n<div class="text">{token_spans(shown, colors, inks)}</div>\n'
            f"<script>{script}</script>\n")


def legend_chips(trace: RoutingTrace, colors: list[str], inks: list[str], layer_index: int = 0) -> str:
    """A chip per expert in its colour; those that are no token's top-1 in sparse layer ``layer_index`` are hidden
    (the layer picker's script shows each layer's own), so that 60 experts do not make a legend of 60."""
    used = set(trace.expert_ids[layer_index, :, 0].tolist())
    return "".join(f'<span data-e="{e}"{"" if e in used else " hidden"} style="background:{c};color:{ink}">{e}</span>'
                   for e, (c, ink) in enumerate(zip(colors, inks)))


def summary_table(trace: RoutingTrace, results: Analyses) -> str:
    """One row per sparse layer: load balance, router confidence, locality, shared expert."""
    header = ("layer", "CV of load", "busiest / mean", "balance loss", "entropy (nats)", "top-1 mass", "top-k mass",
              "same top-1 as previous", "chance given load", "shared gate", "shared fraction")
    r = results
    rows = []
    for s, layer in enumerate(trace.layers):
        cells = (int(layer), f"{r.load.cv[s]:.2f}", f"{r.load.max_over_mean[s]:.2f}", f"{r.load.balance_loss[s]:.2f}",
                 f"{r.entropy.mean_entropy[s]:.2f}", f"{r.entropy.top1_mass[s]:.2f}", f"{r.entropy.topk_mass[s]:.2f}",
                 f"{r.consecutive.top1_rate[s]:.2f}", f"{r.consecutive.chance_given_load[s]:.2f}",
                 f"{r.shared.mean_shared_gate[s]:.2f}", f"{r.shared.shared_fraction[s]:.2f}")
        rows.append(cells)
    return ("<h2>Per layer</h2>\n" + html_table(header, rows) + f"<p class=\"meta\">Uniform routing: entropy log E = "
            f"{r.entropy.max_entropy:.2f}, top-1 mass 1/E = {1 / trace.num_experts:.3f}, top-k mass k/E = "
            f"{trace.top_k / trace.num_experts:.3f}, balance loss k = {trace.top_k}; same top-1 by chance 1/E = "
            f"{r.consecutive.chance_uniform:.3f}.</p>\n")


def html_table(header, rows, left: int = 0) -> str:
    """An HTML table, every cell escaped; the last ``left`` columns left-aligned (text, not numbers)."""
    def cell(i, value, count):
        align = ' class="l"' if i >= count - left else ""
        return f"<td{align}>{html.escape(str(value))}</td>"

    body = "".join("<tr>" + "".join(cell(i, v, len(row)) for i, v in enumerate(row)) + "</tr>\n" for row in rows)
    return "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>\n" + body + "</table>\n"


def queries_section(queries: Queries) -> str:
    """The token and expert queries' answers as tables."""
    parts = []
    for routing in queries.tokens:
        parts.append(f"<h3>Token {html.escape(repr(routing.text))} (id {routing.token_id}): "
                     f"{occurrences(routing.occurrences)}</h3>\n")
        if routing.occurrences:
            parts.append(html_table(TOKEN_COLUMNS, token_rows(routing), left=1))
        else:
            parts.append(f"<p>{html.escape(never_occurs(routing.text))}.</p>\n")
    for query in queries.experts:
        v = query.vocabulary
        parts.append(f"<h3>Expert {v.expert} of layer {query.layer}: the tokens it takes most often</h3>\n")
        rows = [(repr(text), int(t), int(c), f"{100 * x:.0f}%")
                for t, c, x, text in zip(v.token_ids, v.counts, v.exclusivity, query.texts)]
        parts.append(html_table(("token", "id", "times chosen", "share of its occurrences"), rows) if rows else
                     f"<p>{html.escape(takes_nothing(query))}.</p>\n")
    if not parts:
        return ""
    return ("<h2>Queries</h2>\n<p class=\"meta\">A text without a leading space names two tokens: itself and its "
            "' '-variant (how a word after a space is spelled), both listed.</p>\n" + "".join(parts))


def figure_html(plot: Plot) -> str:
    data = base64.b64encode(plot.png).decode("ascii")
    image = f'<img src="data:image/png;base64,{data}" alt="{html.escape(plot.name)}">'
    if plot.name in FULL_SIZE_PLOTS:
        image = f'<div class="scroll">{image}</div>'
    anchor = html.escape(plot.name.removesuffix(".png"))  # report.html#token_experts links to the plot
    return f'<figure id="{anchor}">{image}<figcaption>{html.escape(plot.caption)}</figcaption></figure>\n'


# --- the report ----------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Report:
    """A traced, analysed text, ready to write (see :func:`build_report`)."""

    model: object
    text: str
    title: str
    trace: RoutingTrace
    windowing: Windowing
    results: Analyses
    queries: Queries
    plots: list[Plot]

    def data_files(self, data: Collection[str] = ()) -> list[str]:
        """The data files written beside the page: trace.npz, and the large formats ``data`` asks for."""
        return [TRACE] + [EXTRA_FILES[name] for name in EXTRA_FILES if name in data]

    def html(self, data: Collection[str] = ()) -> str:
        """The page, linking to the data files written with ``data`` (see :meth:`write`)."""
        trace = self.trace
        scores = " and every expert's router scores" if "router_scores" in data else ""
        files = [f'<a href="{TRACE}">{TRACE}</a> (the routing: chosen experts, their weights, the shared gate{scores})']
        files += [f'<a href="{name}">{name}</a>' for name in self.data_files(data)[1:]]
        not_asked = [EXTRA_DATA[name] for name in EXTRA_DATA if name not in data]
        on_request = f" Written on request: {'; '.join(not_asked)}." if not_asked else ""
        return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
                f"<title>{html.escape(self.title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
                f"<h1>{html.escape(self.title)}</h1>\n"
                f'<p class="meta">Model: {html.escape(describe_model(self.model.config))}.<br>Text: '
                f"{len(self.text):,} characters, {trace.num_tokens:,} tokens, traced in "
                f"{html.escape(self.windowing.describe())}; {len(trace.layers)} sparse layers, each choosing "
                f"{trace.top_k} of {trace.num_experts} experts per token (routing: "
                f"{html.escape(trace.routing_rule)}).<br>Data beside this page: {', '.join(files)}."
                f"{html.escape(on_request)}</p>\n"
                + text_section(trace) + summary_table(trace, self.results) + queries_section(self.queries)
                + "<h2>Plots</h2>\n" + "".join(figure_html(plot) for plot in self.plots) + "</body>\n</html>\n")

    def write(self, out_dir: str | Path, data: Collection[str] = ()) -> list[Path]:
        """Write the page, plots and trace into ``out_dir`` (created if needed); every path written, the page last.

        ``data``: the large formats to write too, keys of :data:`EXTRA_DATA` (``"router_scores"``,
        ``"json"``, ``"csv"``).  Files that an earlier report listed in ``out_dir``'s :data:`MANIFEST`
        and this one does not write again are removed, so no stale plot stays beside the new ones;
        no other file is touched.
        """
        check_data(data)
        out = Path(out_dir)
        page = self.html(data)
        names = [plot.name for plot in self.plots] + self.data_files(data) + [REPORT]
        try:
            out.mkdir(parents=True, exist_ok=True)
            earlier = read_manifest(out)
            write_manifest(out, [*names, *earlier])  # stopped midway, the next report still knows both sets
            for plot in self.plots:
                with atomic_write(out / plot.name) as handle:
                    handle.write(plot.png)
            # Never the [T, vocab] logits; every expert's scores only when asked for.
            self.trace.save_npz(out / TRACE, include_logits=False, include_router_scores="router_scores" in data)
            if "json" in data:
                self.trace.write_json(out / EXTRA_FILES["json"])
            if "csv" in data:
                self.trace.write_csv(out / EXTRA_FILES["csv"])
            write_text(out / REPORT, page)  # last: a whole page means a whole report
            for name in set(earlier) - set(names):
                (out / name).unlink(missing_ok=True)
            write_manifest(out, names)
        except OSError as exc:
            raise MinimoeError(f"{out}: cannot write the report there ({exc.strerror or exc})") from None
        return [out / name for name in names[:-1]] + [out / MANIFEST, out / REPORT]


def check_data(data: Collection[str]) -> None:
    """MinimoeError unless every name in ``data`` is one of :data:`EXTRA_DATA`."""
    if unknown := sorted(set(data) - set(EXTRA_DATA)):
        raise MinimoeError(f"unknown report data {unknown[0]!r}: one of {', '.join(EXTRA_DATA)}")


def report_file_pattern() -> re.Pattern:
    """The names a report writes (its page, plots, data files): the only names a manifest may make it remove."""
    names = [REPORT, TRACE, *EXTRA_FILES.values(), *PLOTS, *QUERY_PLOTS]
    return re.compile("|".join(re.escape(name).replace(r"\{layer\}", r"\d+").replace(r"\{expert\}", r"\d+")
                               for name in names))


def read_manifest(out: Path) -> list[str]:
    """The files an earlier report in ``out`` listed as its own (only names a report writes; none if no list)."""
    try:
        lines = (out / MANIFEST).read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return []
    pattern = report_file_pattern()
    return [line for line in lines if pattern.fullmatch(line)]


def write_manifest(out: Path, names: list[str]) -> None:
    listed = "\n".join(dict.fromkeys(names))
    write_text(out / MANIFEST, f"# written by minimoe: the files of the report in this folder\n{listed}\n")


def build_report(model, tokenizer, text: str, title: str | None = None, window: int | None = None,
                 overlap: int | None = None, tokens=(), experts=(), progress: Progress = True) -> Report:
    """Trace ``text`` (window by window if it is long), analyse its routing, answer the queries, draw the plots.

    ``window``/``overlap``: see :mod:`minimoe.inspect.tracing`.  ``tokens``: ids or texts to ask
    "where does this token go?" about; ``experts``: ``(layer, expert)`` pairs to ask
    "which tokens does it take?" about.  MinimoeError for an empty or one-token text, a
    bad window, or a query that names no token, layer or expert of the model.
    """
    ids = encode_text(tokenizer, text)
    windowing = Windowing.plan(len(ids), model.config.max_position_embeddings, window, overlap)
    token_ids = query_token_ids(model, tokenizer, tokens, experts)
    trace = trace_text(model, ids, tokenizer, window=windowing.window, overlap=windowing.overlap, progress=progress)
    queries = run_queries(trace, tokenizer, token_ids, experts)
    results = analyse(model, ids, trace, windowing, progress)
    plots = make_plots(model, trace, results, queries)
    return Report(model, text, title or "minimoe routing report", trace, windowing, results, queries, plots)


def write_report_files(model, tokenizer, text: str, out_dir: str | Path, title: str | None = None,
                       data: Collection[str] = (), **options) -> list[Path]:
    """Write the report of ``text`` into ``out_dir`` (created if needed); every path written, ``report.html`` last.

    ``data``: the large formats to add (see :meth:`Report.write`); ``options``: :func:`build_report`'s (window,
    overlap, tokens, experts, progress).
    """
    check_data(data)  # before the text is traced, not after
    return build_report(model, tokenizer, text, title, **options).write(out_dir, data)


def write_report(model, tokenizer, text: str, out_dir: str | Path, title: str | None = None,
                 data: Collection[str] = (), **options) -> Path:
    """Trace ``text``, analyse its routing and write the report into ``out_dir``; returns the HTML file's path.

    MinimoeError if the text is empty or only whitespace or a single token, or if
    ``out_dir`` cannot be written.  A text of any length is fine: a long one is traced
    window by window.
    """
    return write_report_files(model, tokenizer, text, out_dir, title, data, **options)[-1]
