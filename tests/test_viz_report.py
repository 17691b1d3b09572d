"""Plots (minimoe.inspect.viz), the HTML report (minimoe.inspect.report) and ``minimoe inspect``, on the bundled model."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from matplotlib import image as plt_image
from matplotlib.colors import TwoSlopeNorm, to_hex
from matplotlib.figure import Figure

import minimoe
from minimoe.inspect import analysis, report, viz
from minimoe.tools import cli
from minimoe.inspect.trace import RoutingTrace
from minimoe.inspect.tracing import measure_interventions

TEXT = 'if a < b:\n    print("<b>bold</b>", a & b)\n'


@pytest.fixture(scope="module")
def bundled():
    path = minimoe.default_model_path()
    return minimoe.load(path), minimoe.load_tokenizer(path)


@pytest.fixture(scope="module")
def trace(bundled) -> RoutingTrace:
    model, tok = bundled
    return model.trace(tok.encode(TEXT), tokenizer=tok)


def tick_texts(ax, axis: str = "x") -> list[str]:
    return [label.get_text() for label in (ax.get_xticklabels() if axis == "x" else ax.get_yticklabels())]


# --- palette -------------------------------------------------------------------------------------

def test_palette_tells_60_experts_apart_and_is_stable():
    colors = viz.expert_colors(60)
    assert len(colors) == 60 and all(len(c) == 4 for c in colors)
    assert len({to_hex(c) for c in colors}) == 60
    assert viz.expert_colors(16) == colors[:16]  # an expert id has one colour whatever E is
    assert len({to_hex(c) for c in viz.expert_colors(128)}) == 128
    assert viz.text_color((1, 1, 1, 1)) == "black" and viz.text_color((0, 0, 0, 1)) == "white"


def test_lab_conversion_matches_published_values():
    # sRGB white, red and mid grey in CIELAB (D65), as colour-science references list them.
    lab = viz._srgb_to_lab(np.array([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.5, 0.5, 0.5]]))
    np.testing.assert_allclose(lab, [[100.0, 0.0, 0.0], [53.24, 80.09, 67.20], [53.39, 0.0, 0.0]], atol=0.05)


def test_palette_neighbours_are_far_apart_in_colour():
    colors = viz.expert_colors(64)
    neighbours = [viz.delta_e(colors[i], colors[i + 1]) for i in range(63)]
    every_pair = [viz.delta_e(colors[i], colors[j]) for i in range(60) for j in range(i)]
    assert min(neighbours) > 20  # CIE94; the old tab20 pairs 1/11, 3/13 ... were as close as 15
    assert min(every_pair) > 15
    first16 = [viz.delta_e(colors[i], colors[j]) for i in range(16) for j in range(i)]
    assert min(first16) > 25  # the bundled model's 16 experts are as distinct as 16 colours get
    padding = [viz.delta_e(c, viz.PADDING) for c in colors]
    assert min(padding) > 15  # no expert looks like a padding cell


def test_visible_text_marks_whitespace_and_control_characters():
    assert viz.visible_text(" def\n\t\r\x1b") == "\u2423def\u21b5\u21e5\\r\\x1b"
    assert viz.visible_text("a b\n", spaces=False) == "a b\u21b5"
    assert viz.token_label("        return x") == "\u2423" * 8 + "ret…"


# --- plots ---------------------------------------------------------------------------------------

def test_token_grid_shows_each_tokens_top1_expert(trace):
    fig = viz.plot_token_experts(trace)
    assert isinstance(fig, Figure)
    (ax,) = fig.axes
    # Whitespace drawn as symbols, written out here independently of viz's table.
    shown = [t.replace(" ", "\u2423").replace("\n", "\u21b5").replace("\t", "\u21e5") for t in trace.tokens]
    assert tick_texts(ax) == [t if len(t) <= 12 else t[:11] + "…" for t in shown]
    assert f"(all {trace.num_tokens} tokens;" in fig.get_suptitle()
    assert tick_texts(ax, "y") == [f"layer {layer}" for layer in trace.layers]
    np.testing.assert_array_equal(ax.images[0].get_array(), trace.expert_ids[:, :, 0])
    written = [int(text.get_text()) for text in ax.texts]
    assert written == trace.expert_ids[:, :, 0].reshape(-1).tolist()  # row by row, the id in each cell
    # A cell's colour is its expert's palette colour.
    image = ax.images[0]
    colors = viz.expert_colors(trace.num_experts)
    expert = int(trace.expert_ids[2, 5, 0])
    assert np.allclose(image.cmap(image.norm(expert)), colors[expert])


def test_token_grid_other_ranks_and_wrapping(trace):
    fig = viz.plot_token_experts(trace, rank=1, tokens_per_panel=8)
    assert len(fig.axes) == math.ceil(trace.num_tokens / 8)
    labels = [label for ax in fig.axes for label in tick_texts(ax)]
    assert labels == viz.trace_labels(trace)
    np.testing.assert_array_equal(np.concatenate([ax.images[0].get_array() for ax in fig.axes], axis=1),
                                  trace.expert_ids[:, :, 1])
    with pytest.raises(minimoe.MinimoeError, match="rank"):
        viz.plot_token_experts(trace, rank=trace.top_k)


def test_load_heatmap_has_a_cell_per_layer_and_expert(trace):
    load = analysis.expert_load(trace)
    fig = viz.plot_expert_load(load, trace.layers)
    ax = fig.axes[0]
    np.testing.assert_allclose(ax.images[0].get_array(), load.share)
    assert ax.images[0].get_array().shape == (len(trace.layers), trace.num_experts)
    assert tick_texts(ax, "y") == [f"layer {layer}  CV {cv:.2f}" for layer, cv in zip(trace.layers, load.cv)]
    assert f"1/E = {1 / trace.num_experts:.3f}" in fig.axes[1].get_ylabel()  # the colour bar


def test_coactivation_heatmap(trace):
    matrix = analysis.coactivation(trace)
    fig = viz.plot_coactivation(matrix, 2, trace.layers)
    shown = fig.axes[0].images[0].get_array()
    assert shown.shape == (trace.num_experts, trace.num_experts)
    assert shown.mask.diagonal().all() and not shown.mask[0, 1]  # the diagonal (always 1) is greyed out
    np.testing.assert_allclose(shown[0, 1:], matrix[2, 0, 1:])
    assert "layer 2" in fig.axes[0].get_title()
    assert np.array_equal(viz.plot_coactivation(matrix[2], 2).axes[0].images[0].get_array(), shown)
    with pytest.raises(minimoe.MinimoeError, match="layer 9"):
        viz.plot_coactivation(matrix, 9, trace.layers)


def test_entropy_plot(trace):
    entropy = analysis.routing_entropy(trace)
    fig = viz.plot_entropy(entropy, trace.layers, top_k=trace.top_k)
    left, right = fig.axes
    assert [bar.get_height() for bar in left.patches] == pytest.approx(entropy.mean_entropy)
    assert any(line.get_ydata()[0] == pytest.approx(math.log(trace.num_experts)) for line in left.lines)
    masses = [line.get_ydata() for line in right.lines[:2]]
    np.testing.assert_allclose(masses[0], entropy.top1_mass)
    np.testing.assert_allclose(masses[1], entropy.topk_mass)


def test_consecutive_plot(trace):
    rate = analysis.consecutive_same_expert(trace)
    ax = viz.plot_consecutive_rate(rate, trace.layers).axes[0]
    assert [bar.get_height() for bar in ax.patches] == pytest.approx(rate.top1_rate)


def test_expert_cache_plot_draws_each_layers_hit_rates(trace):
    hits = analysis.expert_cache_hit_rate(trace)
    ax = viz.plot_expert_cache_hits(hits, trace.layers).axes[0]
    per_layer = ax.get_lines()[: len(trace.layers)]
    for line, rates in zip(per_layer, hits.hit_rate):
        np.testing.assert_allclose(line.get_ydata(), rates)
    with pytest.raises(minimoe.MinimoeError, match="layer numbers"):
        viz.plot_expert_cache_hits(hits, [0])


def test_shared_gate_has_a_line_per_layer(trace):
    fig = viz.plot_shared_gate(trace)
    (ax,) = fig.axes
    assert len(ax.lines) == len(trace.layers)
    for s, line in enumerate(ax.lines):
        np.testing.assert_allclose(line.get_ydata(), trace.shared_gate[s])
    assert tick_texts(ax) == viz.trace_labels(trace)
    assert len(viz.plot_shared_gate(trace, tokens_per_panel=10).axes) == math.ceil(trace.num_tokens / 10)


def test_shared_gate_draws_chosen_layers(trace):
    (ax,) = viz.plot_shared_gate(trace, layers=[3, 0]).axes
    assert [line.get_label() for line in ax.lines] == ["layer 3", "layer 0"]
    np.testing.assert_allclose(ax.lines[0].get_ydata(), trace.shared_gate[3])
    with pytest.raises(minimoe.MinimoeError, match="layer 7"):
        viz.plot_shared_gate(trace, layers=[7])


def test_domain_specialization_is_centred_on_uniform(bundled, trace):
    model, tok = bundled
    spec = analysis.domain_specialization({"code": trace, "prose": model.trace(tok.encode("The cat sat on the mat."))})
    fig = viz.plot_domain_specialization(spec, 1, trace.layers)
    ax = fig.axes[0]
    image = ax.images[0]
    assert image.get_array().shape == (2, trace.num_experts)
    np.testing.assert_allclose(image.get_array(), spec.ratio[:, 1])
    assert isinstance(image.norm, TwoSlopeNorm) and image.norm.vcenter == 1.0
    assert tick_texts(ax, "y") == ["code", "prose"]


def test_intervention_bars(bundled, trace):
    model, _ = bundled
    effects = measure_interventions(model, trace.token_ids, {"top-1": {"top_k": 1}, "no shared": {"shared_expert": False}},
                                    base_logits=trace.logits, progress=False)
    kl_ax, loss_ax = viz.plot_intervention_effects(effects).axes
    assert tick_texts(kl_ax, "y") == ["top-1", "no shared"]
    assert [bar.get_width() for bar in kl_ax.patches] == pytest.approx([e.mean_kl for e in effects.values()])
    assert [bar.get_width() for bar in loss_ax.patches] == pytest.approx([e.loss_change for e in effects.values()])
    with pytest.raises(minimoe.MinimoeError):
        viz.plot_intervention_effects({})


# --- the report ----------------------------------------------------------------------------------

def test_long_texts_plot_their_first_tokens(trace):
    head = trace.first(5)
    assert head.num_tokens == 5 and head.tokens == trace.tokens[:5]
    np.testing.assert_array_equal(head.expert_ids, trace.expert_ids[:, :5])
    np.testing.assert_array_equal(head.logits, trace.logits[:5])
    np.testing.assert_array_equal(head.layers, trace.layers)
    assert trace.first(trace.num_tokens) is trace
    assert report.spread_layers(trace, 2) == [0, 3] and report.spread_layers(trace, 9) == [0, 1, 2, 3]


class Spans(HTMLParser):
    """The text and title of every token span of a page."""

    def __init__(self):
        super().__init__()
        self.tokens, self.titles, self.inside = [], [], False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "span" and attrs.get("class") == "t":
            self.inside = True
            self.tokens.append("")
            self.titles.append(attrs["title"])

    def handle_endtag(self, tag):
        self.inside = False

    def handle_data(self, data):
        if self.inside:
            self.tokens[-1] += data


def parse_spans(page: str) -> Spans:
    parser = Spans()
    parser.feed(page)
    return parser


def test_report_writes_every_file_and_a_self_contained_page(bundled, tmp_path):
    model, tok = bundled
    html_path = report.write_report(model, tok, TEXT, tmp_path / "out", title="A <title>", data=report.EXTRA_DATA)
    assert html_path == tmp_path / "out" / "report.html"
    trace = RoutingTrace.load_npz(tmp_path / "out" / "trace.npz")
    plots = [name.format(layer=layer) for name in report.PLOTS
             for layer in (report.coactivation_layers(trace) if "{layer}" in name else [None])]
    for name in [*plots, report.TRACE, *report.EXTRA_FILES.values(), report.MANIFEST, "report.html"]:
        assert (tmp_path / "out" / name).stat().st_size > 0, name
    page = html_path.read_text(encoding="utf-8")
    assert page.count('src="data:image/png;base64,') == len(plots)
    assert "http://" not in page and "https://" not in page and "<script src" not in page and "<link" not in page
    assert "<b>" not in page and "<title>A &lt;title&gt;</title>" in page
    spans = parse_spans(page)
    assert trace.tokens == [tok.decode([i]) for i in tok.encode(TEXT)]
    assert spans.tokens == [report.visible(t) for t in trace.tokens]
    assert "".join(spans.tokens).replace("↵", "") == TEXT
    top = trace.expert_ids[3, 0]
    assert f"layer 3: e{top[0]} " in spans.titles[0] and "shared gate" in spans.titles[0]
    assert (tmp_path / "out" / "routing.csv").read_text().startswith("position,token_id,token,layer,rank,expert")


def test_token_spans_escape_markup(trace):
    odd = dataclasses.replace(trace, tokens=['<b>"x"&', "\x00"] + trace.tokens[2:])
    colors, inks = ["#000000"] * trace.num_experts, ["white"] * trace.num_experts
    spans_html = report.token_spans(odd, colors, inks)
    assert "<b>" not in spans_html and "&lt;b&gt;&quot;x&quot;&amp;" in spans_html and "\x00" not in spans_html
    spans = parse_spans(spans_html)
    assert spans.tokens[:2] == ['<b>"x"&', "\\x00"]  # the parser unescapes: the reader sees the token as is
    assert spans.titles[0].startswith("position 0: '<b>\"x\"&'")


@pytest.mark.parametrize("text, message", [("", "is empty"), (" \n ", "only whitespace"), ("x", "at least 2")])
def test_report_rejects_bad_text(bundled, tmp_path, text, message):
    model, tok = bundled
    with pytest.raises(minimoe.MinimoeError, match=message):
        report.write_report(model, tok, text, tmp_path)
    assert not any(tmp_path.iterdir())  # nothing written


# --- the command ---------------------------------------------------------------------------------

def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "minimoe", *args], capture_output=True, text=True, timeout=120)


def test_inspect_writes_the_report(tmp_path):
    source = tmp_path / "in.txt"
    source.write_text("import os\nprint(os.getcwd())\n", encoding="utf-8")
    result = run("inspect", "--file", str(source), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    printed = [Path(line) for line in result.stdout.splitlines()]
    assert printed[-1] == tmp_path / "out" / "report.html"
    assert sorted(printed) == sorted((tmp_path / "out").iterdir())  # it lists every file it wrote, once
    assert {"trace.npz", "report-files.txt", "token_experts.png"} <= {path.name for path in printed}
    assert not {"trace.json", "routing.csv"} & {path.name for path in printed}  # large: only when asked for
    assert "data:image/png;base64" in (tmp_path / "out" / "report.html").read_text(encoding="utf-8")


def test_inspect_missing_file_is_a_clear_error(tmp_path):
    result = run("inspect", "--file", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "out"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"minimoe: error: {tmp_path / 'missing.txt'}: no such file")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("source, message", [
    (("--text", ""), "the text to inspect is empty"),
    (("--file", "empty.txt"), "the text to inspect is empty"),
    (("--file", "latin1.txt"), "not UTF-8 text"),
    (("--file", "."), "cannot read it"),
])
def test_inspect_bad_input_exits_1(tmp_path, monkeypatch, capsys, source, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    assert cli.main(["inspect", *source, "--out", "out"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("minimoe: error: ") and message in err
    assert not (tmp_path / "out").exists()


def test_inspect_needs_a_text_source():
    result = run("inspect", "--out", "anywhere")
    assert result.returncode == 2 and "one of the arguments --text --file is required" in result.stderr


# --- 60 experts, long texts, token queries ----------------------------------------------------------

def synthetic_trace(tokens: int, num_experts: int = 60, layers: int = 3, k: int = 4, seed: int = 0) -> RoutingTrace:
    """A trace of a model with ``num_experts`` experts (no such model needs to exist): random routing."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(layers, tokens, num_experts)).astype(np.float32)
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    ids = np.argsort(-probs, axis=-1)[:, :, :k]
    weights = np.take_along_axis(probs, ids, -1)
    per_token = np.full((layers, tokens), 0.5, dtype=np.float32)
    return RoutingTrace(
        token_ids=rng.integers(0, 50, tokens), positions=np.arange(tokens), layers=np.arange(layers),
        router_logits=logits, router_probs=probs, expert_ids=ids, raw_weights=weights, expert_weights=weights,
        shared_gate=per_token, attention_norm=np.ones((layers, tokens), np.float32), shared_norm=per_token,
        routed_norm=per_token, logits=np.zeros((tokens, 0), np.float32),
        num_experts=num_experts, top_k=k, tokens=[" x\t"] * tokens)


def test_plots_of_60_experts_state_their_cut():
    trace = synthetic_trace(600)
    fig = viz.plot_token_experts(trace)
    assert "(first 512 of 600 tokens; 60 experts, k = 4;" in fig.get_suptitle()
    assert sum(ax.images[0].get_array().shape[1] for ax in fig.axes) == 512
    drawn = {int(e) for ax in fig.axes for e in np.unique(ax.images[0].get_array())}
    colors = viz.expert_colors(60)
    for ax in fig.axes[:1]:
        image = ax.images[0]
        for e in drawn:
            assert np.allclose(image.cmap(image.norm(e)), colors[e])  # every expert its own palette colour
    assert tick_texts(fig.axes[0])[0] == "\u2423x\u21e5"
    gate = viz.plot_shared_gate(trace, max_tokens=100)
    assert "(first 100 of 600 tokens)" in gate.get_suptitle()
    assert "(all 600 tokens)" in viz.plot_shared_gate(trace, max_tokens=600).get_suptitle()


def test_token_routing_plot_annotations():
    trace = synthetic_trace(200)
    token = int(trace.token_ids[0])
    routing = analysis.token_routing(trace, token, text=" x")
    absent = analysis.token_routing(trace, 999, text="never")
    fig = viz.plot_token_routing([routing, absent])
    top, bottom, colour_bar = fig.axes
    assert "share of the token's occurrences" in colour_bar.get_ylabel()
    assert top.get_title() == f"\u2423x (id {token}): {routing.occurrences} occurrences"
    assert bottom.get_title() == "never (id 999): 0 occurrences (not in the text)"
    assert len(top.patches) == 3 and not bottom.patches  # a red box on each layer's top-1 expert
    assert tick_texts(top, "y")[0].startswith(f"layer 0: top-1 e{routing.top1_expert[0]} ")
    written = sorted(int(t.get_text()) for t in top.texts)
    expected = sorted(round(100 * c / routing.occurrences) for c in routing.counts[routing.counts > 0])
    assert written == expected


def test_expert_tokens_plot_labels_and_counts():
    trace = synthetic_trace(300)
    vocabulary = analysis.expert_tokens(trace, 1, 7, top=5)
    fig = viz.plot_expert_tokens(vocabulary, 1, ["\n"] * len(vocabulary.token_ids))
    (ax,) = fig.axes
    assert ax.get_title() == "The tokens expert 7 of layer 1 takes most often"
    assert tick_texts(ax, "y") == ["\u21b5"] * len(vocabulary.token_ids)
    assert [bar.get_width() for bar in ax.patches] == vocabulary.counts.tolist()


# --- the report of a long text, and in a browser -------------------------------------------------

LONG_TEXT = "def f(self, x):\n    return self.x + x\n\n" * 40  # ~560 tokens: windows of 128


@pytest.fixture(scope="module")
def long_report(bundled):
    model, tok = bundled
    return report.build_report(model, tok, LONG_TEXT, window=128, overlap=32, tokens=["def", 300], experts=[(2, 5)],
                               progress=False)


def test_long_report_traces_every_token_in_windows(bundled, long_report):
    model, tok = bundled
    ids = tok.encode(LONG_TEXT)
    trace = long_report.trace
    np.testing.assert_array_equal(trace.token_ids, ids)
    np.testing.assert_array_equal(trace.positions, np.arange(len(ids)))
    assert trace.logits.shape == (len(ids), 0)  # several windows: no [T, vocab] logits kept
    page = long_report.html()
    assert long_report.windowing.describe() in page and "re-reading the 32 tokens" in page
    assert page.count('<span class="t"') == len(ids)
    assert f"first 512 of {len(ids):,} tokens shown" in page  # the captions say the plots' cut


def test_long_report_answers_queries(long_report):
    queries = long_report.queries
    # 'def' starts each repeat, ' self' is in "return self.x", once a repeat ("(self" is '(' 'self').
    assert [(r.text, r.occurrences) for r in queries.tokens] == [("def", 40), (" def", 0), (" self", 40)]
    page = long_report.html()
    assert "<h3>Token &#x27;def&#x27; (id 489): 40 occurrences</h3>" in page
    assert "<h3>Expert 5 of layer 2: the tokens it takes most often</h3>" in page
    names = [plot.name for plot in long_report.plots]
    assert names[-2:] == ["token_routing.png", "expert_tokens_layer2_expert5.png"]
    lines = report.query_lines(queries)
    assert lines[0] == "token 'def' (id 489): 40 occurrences"
    assert lines[2].split()[:2] == ["0", f"e{queries.tokens[0].top1_expert[0]}"]


def test_report_page_makes_token_edges_and_a_scrolling_grid(long_report):
    page = long_report.html()
    assert "box-shadow: inset 1px 0 #fff, inset -1px 0 #fff" in page  # every token's edges, even between equals
    assert '<figure id="token_experts"><div class="scroll"><img' in page
    assert "figure .scroll img { max-width: none" in page  # full size, scrolled, not shrunk


def test_report_renders_in_chromium(long_report, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium): the page cannot be rendered")
    page = long_report.write(tmp_path)[-1]
    shot = tmp_path / "shot.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1200,1600", page.as_uri()], capture_output=True, timeout=120, check=True)
    rgb = (np.asarray(plt_image.imread(shot))[:, :, :3] * 255).round().astype(int)
    pixels = {tuple(p) for p in rgb.reshape(-1, 3).tolist()}
    # The text is painted in its tokens' expert colours (the page's hex codes): each top-1 expert of layer 0 shows.
    colors = viz.expert_colors(long_report.trace.num_experts)
    for expert in set(long_report.trace.expert_ids[0, :40, 0].tolist()):
        hex_code = to_hex(colors[expert])
        assert tuple(int(hex_code[i : i + 2], 16) for i in (1, 3, 5)) in pixels, expert


def test_a_family_without_a_shared_expert_gets_no_shared_gate_plot_or_intervention():
    """Mixtral has no shared expert: the report neither switches one off nor draws its (all-zero) gate."""
    fixtures = Path(__file__).resolve().parent / "fixtures"
    for name, has_shared in (("moe_mixtral", False), ("moe_gqa", True)):
        model = minimoe.load(fixtures / name)
        ids = list(range(3, 23))
        trace = model.trace(ids)
        windowing = report.Windowing.plan(len(ids), model.config.max_position_embeddings)
        results = report.analyse(model, ids, trace, windowing, progress=False)
        assert ("no shared expert" in results.effects) == has_shared
        files = [plot.name for plot in report.make_plots(model, trace, results)]
        assert ("shared_gate.png" in files) == has_shared


# --- what a report writes, and into a folder that holds an earlier one -------------------------------

def folder(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


def test_the_compact_trace_by_default_and_the_large_formats_on_request(long_report, tmp_path):
    trace = long_report.trace
    compact = long_report.write(tmp_path / "compact")
    assert [p.name for p in compact[-2:]] == [report.MANIFEST, "report.html"]
    assert folder(tmp_path / "compact") == sorted(p.name for p in compact)
    assert not {"trace.json", "routing.csv"} & set(folder(tmp_path / "compact"))
    small = RoutingTrace.load_npz(tmp_path / "compact" / "trace.npz")
    assert small.router_probs.shape == small.router_logits.shape == (len(trace.layers), trace.num_tokens, 0)
    for name in ("expert_ids", "raw_weights", "expert_weights", "shared_gate", "routed_norm", "positions"):
        np.testing.assert_array_equal(getattr(small, name), getattr(trace, name))
    assert small.tokens == trace.tokens

    full = long_report.write(tmp_path / "full", data=("router_scores", "json", "csv"))
    assert {"trace.json", "routing.csv"} <= {p.name for p in full}
    whole = RoutingTrace.load_npz(tmp_path / "full" / "trace.npz")
    np.testing.assert_array_equal(whole.router_probs, trace.router_probs)
    # the compact file is the chosen experts' share of the whole: k of E scores per token and layer
    assert (tmp_path / "compact" / "trace.npz").stat().st_size < (tmp_path / "full" / "trace.npz").stat().st_size / 4
    assert json.loads((tmp_path / "full" / "trace.json").read_text()) == json.loads(json.dumps(trace.to_json()))
    with open(tmp_path / "full" / "routing.csv", newline="", encoding="utf-8") as handle:  # tokens hold newlines
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(trace.layers) * trace.num_tokens * trace.top_k
    page = (tmp_path / "compact" / "report.html").read_text(encoding="utf-8")
    assert '<a href="trace.npz">' in page and '<a href="trace.json">' not in page and "Written on request" in page
    with pytest.raises(minimoe.MinimoeError, match="unknown report data 'xml'"):
        long_report.write(tmp_path / "other", data=("xml",))
    assert not (tmp_path / "other").exists()


def test_a_report_replaces_an_earlier_one_and_touches_nothing_else(bundled, long_report, tmp_path):
    out = tmp_path / "out"
    first = long_report.write(out, data=("csv",))  # with the query plots and routing.csv
    assert {"token_routing.png", "expert_tokens_layer2_expert5.png", "routing.csv"} <= {p.name for p in first}
    (out / "notes.txt").write_text("mine")
    (out / "my_plot.png").write_bytes(b"mine")
    (tmp_path / "outside.png").write_bytes(b"mine")
    with open(out / report.MANIFEST, "a", encoding="utf-8") as manifest:  # names no report writes: never removed
        manifest.write("notes.txt\nmy_plot.png\n../outside.png\n/etc/hostname\n")
    model, tok = bundled
    second = report.write_report_files(model, tok, TEXT, out, progress=False)  # no queries, no csv
    assert folder(out) == sorted([p.name for p in second] + ["my_plot.png", "notes.txt"])
    assert (tmp_path / "outside.png").exists() and (out / "notes.txt").read_text() == "mine"
    listed = (out / report.MANIFEST).read_text(encoding="utf-8").splitlines()[1:]
    assert sorted(listed) == sorted(p.name for p in second if p.name != report.MANIFEST)


def test_query_answers_say_when_there_is_nothing_to_show(bundled):
    model, tok = bundled
    trace = model.trace(tok.encode(TEXT), tokenizer=tok)
    ids = trace.token_ids.tolist()
    once = next(t for t in ids if ids.count(t) == 1)
    absent = next(t for t in range(model.config.vocab_size) if t not in ids)
    unused = next(e for e in range(trace.num_experts) if e not in trace.expert_ids[trace.layer_index(1)])
    queries = report.run_queries(trace, tok, [once, absent], [(1, unused)])
    lines = report.query_lines(queries)
    assert lines[0].endswith(": 1 occurrence") and "layer" in lines[1]
    never = lines.index(next(line for line in lines if line.endswith(": 0 occurrences")))
    assert "never occurs in this text" in lines[never + 1] and lines[never + 2] == ""
    expert = lines.index(f"expert {unused} of layer 1: the tokens it takes most often")
    assert lines[expert + 1] == f"  expert {unused} of layer 1 is chosen for none of this text's tokens"
    page = report.queries_section(queries)
    assert ": 1 occurrence</h3>" in page and "never occurs in this text" in page and "chosen for none" in page
