"""Plots (minimoe.viz), the HTML report (minimoe.report) and ``minimoe inspect``, on the bundled model."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from matplotlib.colors import TwoSlopeNorm, to_hex
from matplotlib.figure import Figure

import minimoe
from minimoe import analysis, cli, report, viz
from minimoe.routing import RoutingTrace, measure_intervention

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


# --- plots ---------------------------------------------------------------------------------------

def test_token_grid_shows_each_tokens_top1_expert(trace):
    fig = viz.plot_token_experts(trace)
    assert isinstance(fig, Figure)
    (ax,) = fig.axes
    assert tick_texts(ax) == [repr(t) if len(repr(t)) <= 12 else repr(t)[:11] + "…" for t in trace.tokens]
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
    assert "1/E = 0.062" in fig.axes[1].get_ylabel()  # the colour bar


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
    effects = {"top-1": measure_intervention(model, trace.token_ids, trace.logits, top_k=1),
               "no shared": measure_intervention(model, trace.token_ids, trace.logits, shared_expert=False)}
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
    html_path = report.write_report(model, tok, TEXT, tmp_path / "out", title="A <title>")
    assert html_path == tmp_path / "out" / "report.html"
    trace = RoutingTrace.load_npz(tmp_path / "out" / "trace.npz")
    plots = [name.format(layer=layer) for name in report.PLOTS
             for layer in (report.coactivation_layers(trace) if "{layer}" in name else [None])]
    for name in [*plots, *report.DATA_FILES, "report.html"]:
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


@pytest.mark.parametrize("text, message", [("", "is empty"), (" \n ", "only whitespace"), ("x", "at least 2"),
                                           ("ab " * 1100, "longer than the model's context of 1024")])
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
    assert {"trace.npz", "trace.json", "routing.csv", "token_experts.png"} <= {path.name for path in printed}
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
