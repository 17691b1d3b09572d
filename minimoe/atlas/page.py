"""What a person looks at: ``DIR/index.html``, a browsable atlas, and PNG plots of it.

The page is one self-contained file: a layer x expert grid coloured by a statistic the reader
picks (each expert's load against uniform, or its preference for a domain), and a card for the
expert clicked: its load, its domain profile against chance, the tokens it takes most (by count
and by specialisation) with example contexts, the experts chosen with it, and where its tokens go
in the next layer and come from in the one before.

The statistics follow the routing analyses of OLMoE (Muennighoff et al., 2024,
arXiv:2409.02060: domain and vocabulary specialisation, co-activation) and Mixtral (Jiang et al.,
2024, arXiv:2401.04088, section 5: consecutive tokens).
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np

from ..files import write_text
from .aggregates import CONTEXT_BEFORE, EMPTY_HASH, Atlas

TOP = 10  # tokens, partners listed per card
MIN_OCCURRENCES = 10  # a token's specialisation is shown only when it occurs this often


def top_tokens(atlas: Atlas, score: np.ndarray, eligible: np.ndarray) -> list[list[tuple[int, float]]]:
    """Per (layer, expert) group, the ``TOP`` token ids with the highest ``score`` of the sparse top-1 entries
    (``eligible`` ones only) -> ``[L * E]`` lists of (id, score)."""
    L, E = len(atlas.layers), atlas.num_experts
    token, group = np.divmod(atlas.token_top1_keys, L * E)
    token, group, score = token[eligible], group[eligible], score[eligible]
    order = np.lexsort((token, -score, group))
    sorted_group = group[order]
    rank = np.arange(len(order)) - np.searchsorted(sorted_group, sorted_group, side="left")
    result: list[list[tuple[int, float]]] = [[] for _ in range(L * E)]
    for i in order[rank < TOP]:
        result[group[i]].append((int(token[i]), float(score[i])))
    return result


def page_data(atlas: Atlas, tokenizer) -> dict:
    """Everything the page shows, as JSON-ready lists (rounded: the page is for eyes)."""
    L, E, k = len(atlas.layers), atlas.num_experts, atlas.top_k
    counts = atlas.token_counts[np.divmod(atlas.token_top1_keys, L * E)[0]]
    by_count = top_tokens(atlas, atlas.token_top1_values.astype(float), np.ones(len(counts), bool))
    by_share = top_tokens(atlas, atlas.token_top1_values / np.maximum(counts, 1), counts >= MIN_OCCURRENCES)
    ids = sorted({i for lists in (by_count, by_share) for group in lists for i, _ in group})
    texts = dict(zip(ids, tokenizer.token_texts(ids))) if ids else {}
    coact = atlas.coactivation / np.maximum(atlas.slot_counts[:, :, None], 1)  # P(j chosen | i chosen)
    preference = atlas.domain_preference()
    cards = []
    for s in range(L):
        for e in range(E):
            group = s * E + e
            partners = np.argsort(-coact[s, e], kind="stable")
            partners = [int(j) for j in partners if j != e][:5]
            card = {
                "by_count": [[texts[i], int(c)] for i, c in by_count[group]],
                "by_share": [[texts[i], round(c, 3), int(atlas.token_counts[i])] for i, c in by_share[group]],
                "coactive": [[j, round(float(coact[s, e, j]), 3)] for j in partners],
                "examples": examples(atlas, tokenizer, s, e),
            }
            top1 = max(int(atlas.top1_counts[s, e]), 1)
            if s + 1 < L:
                row = atlas.transitions[s, e]
                card["next"] = [[int(j), round(row[j] / top1, 3)] for j in np.argsort(-row, kind="stable")[:5]
                                if row[j]]
            if s > 0:
                column = atlas.transitions[s - 1, :, e]
                card["previous"] = [[int(j), round(column[j] / top1, 3)]
                                    for j in np.argsort(-column, kind="stable")[:5] if column[j]]
            cards.append(card)
    return {
        "model": atlas.model, "tokens": atlas.tokens, "documents": atlas.documents, "domains": atlas.domains,
        "domain_tokens": atlas.domain_tokens.tolist(), "layers": atlas.layers, "experts": E, "top_k": k,
        "slots": atlas.slot_counts.tolist(), "top1": atlas.top1_counts.tolist(),
        "load": np.round(atlas.load_share() * E, 4).tolist(),
        "preference": np.round(preference, 4).tolist(), "repeat": np.round(atlas.repeat_rate(), 4).tolist(),
        "cards": cards,
    }


def examples(atlas: Atlas, tokenizer, s: int, e: int) -> list[list[str]]:
    """The expert's sampled contexts as (before, token, after) texts."""
    result = []
    for hash_value, context in zip(atlas.sample_hash[s, e], atlas.sample_context[s, e]):
        if hash_value == EMPTY_HASH:
            continue
        before, token, after = context[:CONTEXT_BEFORE], context[CONTEXT_BEFORE:CONTEXT_BEFORE + 1], \
            context[CONTEXT_BEFORE + 1:]
        result.append([tokenizer.decode(part[part >= 0].tolist()) for part in (before, token, after)])
    return result


def write_page(atlas: Atlas, out: str | Path, model_path: str | Path) -> list[Path]:
    """Write ``out/index.html`` and the PNG plots beside it -> their paths."""
    from ..tokenizer import load_tokenizer

    out = Path(out)
    plots = write_plots(atlas, out)
    data = json.dumps(page_data(atlas, load_tokenizer(model_path)), separators=(",", ":"))
    data = data.replace("</", "<\\/")  # a token text cannot end the script element
    figures = "".join(f'<figure><img src="{p.name}" alt="{p.stem}"></figure>' for p in plots)
    page = PAGE.replace("$TITLE", html.escape(f"Expert atlas: {atlas.model['name']}")).replace("$DATA", data)
    page = page.replace("$FIGURES", figures)
    write_text(out / "index.html", page)
    return [*plots, out / "index.html"]


# --- plots ---------------------------------------------------------------------------------------------

def write_plots(atlas: Atlas, out: Path) -> list[Path]:
    paths = []
    for name, figure in (("load", plot_load(atlas)), ("domains", plot_domains(atlas)),
                         ("distinct_experts", plot_distinct(atlas)), ("histograms", plot_histograms(atlas))):
        path = out / f"{name}.png"
        figure.savefig(path, dpi=110, bbox_inches="tight")
        paths.append(path)
    return paths


def _figure(width: float, height: float, rows: int = 1, cols: int = 1):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    return figure, figure.subplots(rows, cols, squeeze=False)


def diverging():
    """Blue below, red above, grey for an expert never chosen (NaN)."""
    import matplotlib

    return matplotlib.colormaps["RdBu_r"].with_extremes(bad="#bbbbbb")


def unused_masked(atlas: Atlas, values: np.ndarray) -> np.ndarray:
    """``values [L, E]`` with NaN where the expert was never chosen."""
    return np.where(atlas.slot_counts == 0, np.nan, values)


def plot_load(atlas: Atlas):
    """Each expert's share of its layer's assignments against uniform (log2; 0 is an even share)."""
    figure, axes = _figure(10, 1 + 0.35 * len(atlas.layers))
    ratio = unused_masked(atlas, np.log2(np.maximum(atlas.load_share() * atlas.num_experts, 1e-3)))
    image = axes[0, 0].imshow(ratio, aspect="auto", cmap=diverging(), vmin=-3, vmax=3, interpolation="nearest")
    axes[0, 0].set(xlabel="expert (grey: never chosen)", ylabel="layer", yticks=range(len(atlas.layers)),
                   yticklabels=atlas.layers,
                   title=f"load against uniform over {atlas.tokens:,} tokens (log2: +1 is twice its share)")
    figure.colorbar(image, ax=axes[0, 0], label="log2(load x E)")
    return figure


def plot_domains(atlas: Atlas, top: int = 12):
    """Per domain (the ``top`` largest), its preference for each expert of the middle layer (OLMoE's plot)."""
    layer = len(atlas.layers) // 2
    order = np.argsort(-atlas.domain_tokens, kind="stable")[:top]
    figure, axes = _figure(10, 1.2 + 0.3 * len(order))
    ratio = np.log2(np.maximum(atlas.domain_preference()[order, layer], 1e-3))
    ratio[:, atlas.slot_counts[layer] == 0] = np.nan
    image = axes[0, 0].imshow(ratio, aspect="auto", cmap=diverging(), vmin=-2, vmax=2, interpolation="nearest")
    axes[0, 0].set(xlabel="expert (grey: never chosen)", yticks=range(len(order)), yticklabels=[atlas.domains[d] for d in order],
                   title=f"layer {atlas.layers[layer]}: P(domain | expert) / P(domain), log2 (0 is chance)")
    figure.colorbar(image, ax=axes[0, 0], label="log2 preference")
    return figure


def plot_distinct(atlas: Atlas):
    """Distinct experts touched by b consecutive tokens, per layer, against uniform routing."""
    figure, axes = _figure(6.5, 4)
    ax = axes[0, 0]
    b = np.arange(1, atlas.distinct_sum.shape[1] + 1)
    for s, layer in enumerate(atlas.layers):
        ax.plot(b, atlas.distinct_experts()[s], lw=1, label=f"layer {layer}")
    ax.plot(b, atlas.uniform_distinct(), "k--", lw=1.5, label="uniform: E(1-(1-k/E)^b)")
    ax.axhline(atlas.num_experts, color="grey", lw=0.8)
    ax.set(xscale="log", xlabel="b consecutive tokens", ylabel="distinct experts touched",
           title="experts a batch of b tokens needs in memory")
    ax.legend(fontsize=7, ncol=2)
    return figure


def plot_histograms(atlas: Atlas):
    """The router's entropy, the top-k weight mass and the shared expert's gate, per layer."""
    figure, axes = _figure(11, 3.2, 1, 3)
    for ax, values, top, title in ((axes[0, 0], atlas.entropy_hist, np.log(atlas.num_experts), "router entropy (nats)"),
                                   (axes[0, 1], atlas.mass_hist, 1.0, "top-k weight mass"),
                                   (axes[0, 2], atlas.shared_gate_hist, 1.0, "shared expert's gate")):
        centres = (np.arange(values.shape[1]) + 0.5) / values.shape[1] * top
        for s, layer in enumerate(atlas.layers):
            ax.plot(centres, values[s] / max(values[s].sum(), 1), lw=1, label=f"layer {layer}")
        ax.set(title=title, xlabel=title.split(" (")[0], ylabel="share of tokens")
    axes[0, 0].legend(fontsize=7)
    return figure


PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>$TITLE</title>
<style>
body { font: 14px system-ui, sans-serif; margin: 1.2em; color: #222; }
#grid { display: grid; gap: 1px; margin: .8em 0; }
#grid div.cell { height: 18px; cursor: pointer; }
#grid div.cell.on { outline: 2px solid #000; z-index: 1; }
#grid div.label { font-size: 11px; text-align: right; padding-right: 4px; }
#card { border: 1px solid #bbb; padding: .6em 1em; max-width: 70em; display: none; }
#card h2 { margin: .2em 0; font-size: 17px; }
#card table { border-collapse: collapse; margin: .3em 0 .8em; }
#card td, #card th { padding: 1px 8px; text-align: left; font-size: 13px; }
.tok { font-family: ui-monospace, monospace; background: #eef; white-space: pre; }
.ctx { font-family: ui-monospace, monospace; white-space: pre-wrap; font-size: 12px; margin: 2px 0; }
.ctx b { background: #fd8; }
.cols { display: flex; gap: 2em; flex-wrap: wrap; }
figure img { max-width: 100%; }
</style></head><body>
<h1>$TITLE</h1>
<p id="summary"></p>
<label>Colour by <select id="stat"></select></label>
<span id="scale"></span>
<div id="grid"></div>
<div id="card"></div>
$FIGURES
<p>Statistics after the routing analyses of OLMoE (Muennighoff et al., 2024,
<a href="https://arxiv.org/abs/2409.02060">arXiv:2409.02060</a>: domain and vocabulary specialisation,
co-activation) and Mixtral (Jiang et al., 2024, <a href="https://arxiv.org/abs/2401.04088">arXiv:2401.04088</a>,
section 5: consecutive tokens).</p>
<script type="application/json" id="data">$DATA</script>
<script>
"use strict";
const atlas = JSON.parse(document.getElementById("data").textContent);
const E = atlas.experts, L = atlas.layers.length;
const fmt = n => n.toLocaleString("en");
document.getElementById("summary").textContent =
  `${fmt(atlas.tokens)} tokens in ${fmt(atlas.documents)} documents of ${atlas.domains.length} domains; ` +
  `${L} sparse layers of ${E} experts, top-${atlas.top_k}. Click an expert for its card.`;
const stats = [["load", "load against uniform (log2)"]].concat(
  atlas.domains.map((d, i) => ["pref" + i, `preference for ${d} (log2, 0 is chance)`]));
const select = document.getElementById("stat");
for (const [value, label] of stats) {
  const option = document.createElement("option");
  option.value = value; option.textContent = label; select.appendChild(option);
}
function value(stat, s, e) {
  if (atlas.slots[s][e] === 0) return null;  // never chosen: grey
  const v = stat === "load" ? atlas.load[s][e] : atlas.preference[+stat.slice(4)][s][e];
  return Math.log2(Math.max(v, 1 / 8));
}
function colour(v) {  // -3 .. 3 -> blue .. white .. red; null (never chosen) -> grey
  if (v === null) return "rgb(187, 187, 187)";
  const t = Math.max(-1, Math.min(1, v / 3));
  const a = Math.round(255 * (1 - Math.abs(t)));
  return t >= 0 ? `rgb(255,${a},${a})` : `rgb(${a},${a},255)`;
}
const grid = document.getElementById("grid");
grid.style.gridTemplateColumns = `5em repeat(${E}, minmax(6px, 1fr))`;
const cells = [];
for (let s = 0; s < L; s++) {
  const label = document.createElement("div");
  label.className = "label"; label.textContent = `layer ${atlas.layers[s]}`; grid.appendChild(label);
  for (let e = 0; e < E; e++) {
    const cell = document.createElement("div");
    cell.className = "cell"; cell.dataset.layer = s; cell.dataset.expert = e;
    cell.addEventListener("click", () => openCard(s, e));
    grid.appendChild(cell); cells.push(cell);
  }
}
function paint() {
  for (const cell of cells) {
    const s = +cell.dataset.layer, e = +cell.dataset.expert, v = value(select.value, s, e);
    cell.style.background = colour(v);
    cell.title = `layer ${atlas.layers[s]}, expert ${e}: ${v === null ? "never chosen" : v.toFixed(2)}`;
  }
  document.getElementById("scale").textContent =
    " blue below, red above (log2 ratio, clipped at ±3); grey: never chosen";
}
select.addEventListener("change", paint);
paint();
function esc(text) {
  return String(text).replace(/[&<>"]/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"})[c]);
}
function rows(header, items) {
  return `<table><tr>${header.map(h => `<th>${h}</th>`).join("")}</tr>` +
    items.map(r => `<tr>${r.map(c => `<td>${c}</td>`).join("")}</tr>`).join("") + "</table>";
}
function openCard(s, e) {
  for (const cell of cells) cell.classList.toggle("on", +cell.dataset.layer === s && +cell.dataset.expert === e);
  const card = atlas.cards[s * E + e], layer = atlas.layers[s];
  const total = atlas.slots[s].reduce((a, b) => a + b, 0);
  const share = atlas.slots[s][e] / Math.max(total, 1);
  const domains = atlas.domains.map((d, i) => [esc(d), fmt(atlas.domain_tokens[i]),
    atlas.preference[i][s][e].toFixed(2)]);
  const tok = t => `<span class="tok">${esc(t)}</span>`;
  let body = `<h2>Layer ${layer}, expert ${e}</h2>` +
    `<p>Load: ${fmt(atlas.slots[s][e])} of ${fmt(total)} top-${atlas.top_k} assignments ` +
    `(${(100 * share).toFixed(2)}%, ${atlas.load[s][e].toFixed(2)}× uniform); first choice of ` +
    `${fmt(atlas.top1[s][e])} tokens.</p><div class="cols">` +
    `<div><b>Domains</b> (preference: P(domain | expert) / P(domain); 1 is chance)` +
    rows(["domain", "tokens", "preference"], domains) + `</div>` +
    `<div><b>Top tokens by count</b> (first choice)` + rows(["token", "count"],
      card.by_count.map(([t, c]) => [tok(t), fmt(c)])) + `</div>` +
    `<div><b>By specialisation</b> (share of the token's occurrences)` + rows(["token", "share", "occurs"],
      card.by_share.map(([t, p, n]) => [tok(t), p.toFixed(3), fmt(n)])) + `</div>` +
    `<div><b>Chosen with it</b>` + rows(["expert", "P(chosen | this one)"],
      card.coactive.map(([j, p]) => [j, p.toFixed(3)])) + `</div>`;
  if (card.previous) body += `<div><b>From layer ${atlas.layers[s - 1]}</b>` +
    rows(["expert", "share of its top-1 tokens"], card.previous.map(([j, p]) => [j, p.toFixed(3)])) + `</div>`;
  if (card.next) body += `<div><b>To layer ${atlas.layers[s + 1]}</b>` +
    rows(["expert", "share of its top-1 tokens"], card.next.map(([j, p]) => [j, p.toFixed(3)])) + `</div>`;
  body += `</div><b>Example contexts</b>` + card.examples.map(([before, t, after]) =>
    `<div class="ctx">${esc(before)}<b>${esc(t)}</b>${esc(after)}</div>`).join("");
  const element = document.getElementById("card");
  element.innerHTML = body; element.style.display = "block"; element.dataset.open = `${s}:${e}`;
}
</script></body></html>
"""
