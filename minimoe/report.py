"""A routing report for one text: one self-contained HTML page, its plots, and the trace as data.

    html = write_report(model, tokenizer, "def f(x):\\n    return x\\n", "report/")

traces the text, runs the analyses of :mod:`minimoe.analysis`, measures a few routing
interventions, and writes into the output folder:

* ``report.html`` -- the text coloured token by token by its top-1 expert in a layer
  the reader picks (hover a token for every layer's experts, weights and shared gate),
  a per-layer summary table, and the plots with a caption on what to look for.  The
  PNGs are embedded as data URIs and the CSS and script are inline, so the file can be
  mailed or opened offline on its own;
* the plots as PNG files (see :data:`PLOTS`);
* the trace as ``trace.npz`` (:meth:`~minimoe.routing.RoutingTrace.load_npz` reads it
  back), ``trace.json`` and ``routing.csv`` (one row per token x layer x chosen expert).
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.colors import to_hex

from . import analysis, viz
from .errors import MinimoeError
from .params import describe_model
from .routing import InterventionEffect, RoutingTrace, measure_intervention

REPORT = "report.html"
DATA_FILES = ("trace.npz", "trace.json", "routing.csv")
# The PNG files, in the report's order (the co-activation plots are per layer: coactivation_layer{L}.png).
PLOTS = ("token_experts.png", "expert_load.png", "entropy.png", "consecutive.png", "coactivation_layer{layer}.png",
         "shared_gate.png", "interventions.png")
# The per-token plots (token grid, shared gate) show at most this many tokens: the first ones.
# (The analyses and the coloured text cover every token.)
MAX_PLOTTED_TOKENS = 512
SHARED_GATE_LINES = 4  # layers drawn in the shared-gate plot, spread from the first to the last


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

def encode_text(model, tokenizer, text: str) -> list[int]:
    """The text's token ids; MinimoeError if it is empty, a single token, or longer than the model's context."""
    if not isinstance(text, str):
        raise MinimoeError(f"the text to inspect must be a str, got {type(text).__name__}")
    if not text.strip():
        raise MinimoeError("the text to inspect is empty" if not text else "the text to inspect is only whitespace")
    ids = tokenizer.encode(text)
    context = model.config.max_position_embeddings
    if len(ids) < 2:
        raise MinimoeError(f"the text is only {len(ids)} token; the report needs at least 2 "
                           "(to compare neighbouring tokens and measure next-token loss)")
    if len(ids) > context:
        raise MinimoeError(f"the text is {len(ids)} tokens, longer than the model's context of {context} positions "
                           "(max_position_embeddings): inspect a shorter piece")
    return ids


# --- analyses --------------------------------------------------------------------------------

def intervention_options(trace: RoutingTrace, load: analysis.ExpertLoad) -> dict[str, dict]:
    """The interventions the report measures: a name for each, and its keyword arguments."""
    options = {}
    if trace.num_experts - 1 >= trace.top_k:  # disabling one must leave k experts to choose from
        busiest = {int(layer): int(load.counts[s].argmax()) for s, layer in enumerate(trace.layers)}
        options["disable busiest expert"] = {"disabled_experts": {layer: [e] for layer, e in busiest.items()}}
    if trace.top_k > 1:
        options[f"top-1 instead of top-{trace.top_k}"] = {"top_k": 1}
    options["no shared expert"] = {"shared_expert": False}
    return options


def analyse(model, ids: list[int], trace: RoutingTrace) -> Analyses:
    """The routing analyses of ``trace`` and the effects of :func:`intervention_options` on ``ids``."""
    load = analysis.expert_load(trace)
    options = intervention_options(trace, load)
    # The trace's logits are the plain forward's: each intervention costs one more forward, not two.
    effects = {name: measure_intervention(model, ids, base_logits=trace.logits, **kwargs)
               for name, kwargs in options.items()}
    disabled = {layer: experts[0] for layer, experts in
                options.get("disable busiest expert", {}).get("disabled_experts", {}).items()}
    return Analyses(load=load, entropy=analysis.routing_entropy(trace), coactivation=analysis.coactivation(trace),
                    consecutive=analysis.consecutive_same_expert(trace), shared=analysis.shared_vs_routed(trace),
                    effects=effects, disabled=disabled)


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


def make_plots(model, trace: RoutingTrace, results: Analyses) -> list[Plot]:
    """Every plot of the report, rendered to PNG, with its caption."""
    E, k, layers = trace.num_experts, trace.top_k, trace.layers
    chance_pair = (k - 1) / (E - 1) if E > 1 else 0.0
    disabled = ", ".join(f"layer {layer}: expert {e}" for layer, e in results.disabled.items())
    shown = trace.first(MAX_PLOTTED_TOKENS)
    first = (f" (the first {shown.num_tokens} of the {trace.num_tokens} tokens)"
             if shown.num_tokens < trace.num_tokens else "")
    gate_layers = spread_layers(trace, SHARED_GATE_LINES)
    some_layers = (f" (layers {', '.join(map(str, gate_layers))} of {len(layers)}; the table above has every "
                   "layer's mean)" if len(gate_layers) < len(layers) else "")
    plots = [
        ("token_experts.png", viz.plot_token_experts(shown),
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
    plots += [
        ("shared_gate.png", viz.plot_shared_gate(shown, layers=gate_layers),
         f"The shared expert runs for every token, scaled by this sigmoid gate{some_layers}{first}, beside the "
         "routed experts: a gate that swings from token to token shows the model choosing how much general-purpose "
         "computation each token gets."),
        ("interventions.png", viz.plot_intervention_effects(results.effects),
         "How much each change to the routing moves the next-token predictions (mean KL divergence from the "
         "unmodified model) and the loss on this text"
         + (f" (busiest experts disabled: {disabled})" if disabled else "")
         + ": a large change means the model relies on what was removed."),
    ]
    return [Plot(name, png_bytes(fig), caption) for name, fig, caption in plots]


# --- HTML ------------------------------------------------------------------------------------

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; } .meta { color: #555; margin-top: 0; }
.text { font-family: ui-monospace, monospace; white-space: pre-wrap; line-height: 1.9; border: 1px solid #ccc;
        padding: 0.8em; border-radius: 4px; }
.t { border-radius: 2px; padding: 1px 0; cursor: help; }
.legend span { display: inline-block; min-width: 2em; text-align: center; margin: 1px; border-radius: 2px;
               font-family: ui-monospace, monospace; font-size: 0.85em; }
table { border-collapse: collapse; font-size: 0.9em; } th, td { border: 1px solid #ccc; padding: 3px 8px; }
td { text-align: right; } figure { margin: 2em 0; } figure img { max-width: 100%; }
figcaption { color: #444; max-width: 60em; }
"""

PAINT_SCRIPT = """
const colors = %s, inks = %s;
function paint(s) {
  for (const t of document.querySelectorAll('.t')) {
    const e = +t.dataset.e.split(',')[s];
    t.style.background = e < 0 ? '#d9d9d9' : colors[e];
    t.style.color = e < 0 ? '#000' : inks[e];
  }
}
document.getElementById('layer').addEventListener('change', ev => paint(+ev.target.value));
"""


def visible(text: str) -> str:
    """A token's text as shown in the report: a newline gets a visible mark, control characters their escape."""
    out = []
    for ch in text:
        if ch == "\n":
            out.append("↵\n")
        elif ch == "\t" or ch.isprintable():
            out.append(ch)
        else:
            out.append(repr(ch)[1:-1])
    return "".join(out)


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
    """The layer picker, the expert colour legend and the coloured text, with the script that repaints it."""
    palette = viz.expert_colors(trace.num_experts)
    colors = [to_hex(c) for c in palette]
    inks = [viz.text_color(c) for c in palette]
    options = "".join(f'<option value="{s}">layer {int(layer)}</option>' for s, layer in enumerate(trace.layers))
    legend = "".join(f'<span style="background:{c};color:{ink}">{e}</span>'
                     for e, (c, ink) in enumerate(zip(colors, inks)))
    script = PAINT_SCRIPT % (json.dumps(colors), json.dumps(inks))
    return (f'<h2>The text, coloured by top-1 expert</h2>\n<p><label>Sparse layer: <select id="layer">{options}'
            f'</select></label> &nbsp; Hover a token for its experts and weights in every layer.</p>\n'
            f'<p class="legend">Experts: {legend}</p>\n<div class="text">{token_spans(trace, colors, inks)}</div>\n'
            f"<script>{script}</script>\n")


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
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return ("<h2>Per layer</h2>\n<table><tr>" + "".join(f"<th>{h}</th>" for h in header) + "</tr>\n"
            + "\n".join(rows) + f"</table>\n<p class=\"meta\">Uniform routing: entropy log E = "
            f"{r.entropy.max_entropy:.2f}, top-1 mass 1/E = {1 / trace.num_experts:.3f}, top-k mass k/E = "
            f"{trace.top_k / trace.num_experts:.3f}, balance loss k = {trace.top_k}; same top-1 by chance 1/E = "
            f"{r.consecutive.chance_uniform:.3f}.</p>\n")


def figure_html(plot: Plot) -> str:
    data = base64.b64encode(plot.png).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(plot.name)}">'
            f"<figcaption>{html.escape(plot.caption)}</figcaption></figure>\n")


def render_html(model, trace: RoutingTrace, text: str, results: Analyses, plots: list[Plot], title: str) -> str:
    files = ", ".join(f'<a href="{name}">{name}</a>' for name in DATA_FILES)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
            f"<style>{CSS}</style>\n</head>\n<body>\n<h1>{html.escape(title)}</h1>\n"
            f'<p class="meta">Model: {html.escape(describe_model(model.config))}.<br>Text: {len(text):,} characters, '
            f"{trace.num_tokens:,} tokens; {len(trace.layers)} sparse layers, each choosing {trace.top_k} of "
            f"{trace.num_experts} experts per token. Data beside this page: {files}.</p>\n"
            + text_section(trace) + summary_table(trace, results) + "<h2>Plots</h2>\n"
            + "".join(figure_html(plot) for plot in plots) + "</body>\n</html>\n")


# --- writing -----------------------------------------------------------------------------------

def write_report_files(model, tokenizer, text: str, out_dir: str | Path, title: str | None = None) -> list[Path]:
    """Write the report of ``text`` into ``out_dir`` (created if needed); every path written, ``report.html`` last."""
    ids = encode_text(model, tokenizer, text)
    trace = model.trace(ids, tokenizer=tokenizer)
    results = analyse(model, ids, trace)
    plots = make_plots(model, trace, results)
    page = render_html(model, trace, text, results, plots, title or "minimoe routing report")
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for plot in plots:
            (out / plot.name).write_bytes(plot.png)
            written.append(out / plot.name)
        trace.save_npz(out / "trace.npz", include_logits=False)  # [T, vocab] is large; the routing is small
        trace.to_json(out / "trace.json")
        trace.write_csv(out / "routing.csv")
        written += [out / name for name in DATA_FILES]
        (out / REPORT).write_text(page, encoding="utf-8")
    except OSError as exc:
        raise MinimoeError(f"{out}: cannot write the report there ({exc.strerror or exc})") from None
    return written + [out / REPORT]


def write_report(model, tokenizer, text: str, out_dir: str | Path, title: str | None = None) -> Path:
    """Trace ``text``, analyse its routing and write the report into ``out_dir``; returns the HTML file's path.

    MinimoeError if the text is empty or only whitespace, a single token, or longer
    than the model's context, or if ``out_dir`` cannot be written.
    """
    return write_report_files(model, tokenizer, text, out_dir, title)[-1]
