"""Plots and the report stay readable with Qwen1.5-MoE's 60 routed experts (and its 24 layers).

The 60-expert model is made here the way the bundled one is, with ``minimoe.upcycle``: from the
tiny dense fixture, 60 experts, top-4, a shared expert 4 experts wide.  Readability is checked as
geometry on the drawn figure (tick labels that do not overlap, numbers that fit their cells, a
figure that fits the report's column) and as counts (labels, legend entries, legend chips).
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from matplotlib.colors import to_hex
from test_viz_report import synthetic_trace

import minimoe
from minimoe.inspect import analysis, report, viz

DENSE = Path(__file__).resolve().parent / "fixtures" / "dense_qwen2"
EXPERTS = 60
TEXT = "def f(self, x):\n    return self.x + x  # add\n" * 6


class CharTokenizer:
    """One token per character: printable ASCII is ids 0..94, a newline 95 (the dense fixture's 96 ids)."""

    def encode(self, text: str) -> list[int]:
        return [95 if ch == "\n" else ord(ch) - 32 for ch in text]

    def decode(self, ids) -> str:
        return "".join(self.token_texts(ids))

    def token_texts(self, ids) -> list[str]:
        return ["\n" if i == 95 else chr(i + 32) for i in ids]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    # Qwen1.5-MoE's recipe: 64 experts' worth of neurons, 4 of them the shared expert, 60 routed.
    out = minimoe.upcycle(DENSE, tmp_path_factory.mktemp("moe60") / "moe", num_experts=EXPERTS + 4, shared_experts=4,
                          top_k=4, expert_size=12, router_std=1.0)
    loaded = minimoe.load(out)
    assert (loaded.config.num_experts, loaded.config.num_experts_per_tok) == (EXPERTS, 4)
    return loaded


@pytest.fixture(scope="module")
def built(model):
    return report.build_report(model, CharTokenizer(), TEXT, tokens=["x"], experts=[(1, 7)], progress=False)


@pytest.fixture(scope="module")
def trace(built):
    return built.trace


def drawn(fig):
    """The figure, laid out and drawn (without pixels), so that texts have their final positions."""
    fig.draw_without_rendering()
    return fig


def labelled_ticks(ax, axis: str = "x"):
    return [t for t in (ax.get_xticklabels() if axis == "x" else ax.get_yticklabels()) if t.get_text()]


def overlapping(texts) -> list[tuple[str, str]]:
    """Pairs of texts whose drawn boxes intersect."""
    boxes = [(t.get_text(), t.get_window_extent()) for t in texts]
    return [(a, b) for i, (a, box_a) in enumerate(boxes) for b, box_b in boxes[:i] if box_a.overlaps(box_b)]


# --- tick spacing ---------------------------------------------------------------------------------

@pytest.mark.parametrize("count, step", [(0, 1), (8, 1), (16, 1), (17, 2), (24, 2), (32, 2), (60, 5), (64, 5),
                                         (80, 5), (81, 10), (128, 10), (1000, 100)])
def test_tick_step_is_a_round_number_giving_at_most_16_labels(count, step):
    assert viz.tick_step(count) == step
    assert math.ceil(count / step) <= 16


def expert_axes(model, trace):
    """(figure, axes, axis) for every plot with an axis of expert ids."""
    load = analysis.expert_load(trace)
    prose = model.trace(CharTokenizer().encode("The cat sat on the mat, and then it slept.\n" * 3))
    spec = analysis.domain_specialization({"code": trace, "prose": prose})
    routing = analysis.token_routing(trace, CharTokenizer().encode("x")[0], "x")
    layer = int(trace.layers[-1])
    coactivation = drawn(viz.plot_coactivation(analysis.coactivation(trace), layer, trace.layers))
    figures = [(drawn(viz.plot_expert_load(load, trace.layers)), "x"), (coactivation, "x"), (coactivation, "y"),
               (drawn(viz.plot_domain_specialization(spec, layer, trace.layers)), "x"),
               (drawn(viz.plot_token_routing([routing])), "x")]
    return [(fig, fig.axes[0], axis) for fig, axis in figures]


def test_an_axis_of_60_experts_labels_every_5th_without_overlap(model, trace):
    for fig, ax, axis in expert_axes(model, trace):
        labels = labelled_ticks(ax, axis)
        assert [t.get_text() for t in labels] == [str(e) for e in range(0, EXPERTS, 5)], ax.get_title()
        assert not overlapping(labels), ax.get_title()
        scale = ax.xaxis if axis == "x" else ax.yaxis
        ticks = np.union1d(scale.get_majorticklocs(), scale.get_minorticklocs())
        np.testing.assert_array_equal(ticks, np.arange(EXPERTS))  # a tick on every expert, to count cells by


def test_16_experts_keep_a_label_on_every_expert():
    trace = synthetic_trace(100, num_experts=16)
    ax = drawn(viz.plot_expert_load(analysis.expert_load(trace), trace.layers)).axes[0]
    assert [t.get_text() for t in labelled_ticks(ax)] == [str(e) for e in range(16)]
    assert not overlapping(labelled_ticks(ax)) and not len(ax.xaxis.get_minorticklocs())


def test_numbers_written_in_cells_fit_their_cells(trace):
    once = trace.first(1)  # a token seen once chose each of its experts in 100% of its occurrences
    routing = analysis.token_routing(once, int(once.token_ids[0]), once.tokens[0])
    ax = drawn(viz.plot_token_routing([routing])).axes[0]
    assert {text.get_text() for text in ax.texts} == {"100"}  # the widest number: 60 experts still get it written
    cell = ax.get_window_extent().width / EXPERTS
    widest = max(text.get_window_extent().width for text in ax.texts)
    assert widest <= cell, (widest, cell)


def test_report_plots_fit_the_page_column_unshrunk(built):
    """Every plot but the scrolled ones is at most as wide as the page's column, so it is shown at full size."""
    page = re.search(r"body \{[^}]*max-width: (\d+)px[^}]*padding: 0 (\d+)em", report.CSS)
    column = int(page[1]) - 2 * 16 * int(page[2])  # 1em = 16 px
    for plot in built.plots:
        if plot.name not in report.FULL_SIZE_PLOTS:
            width = int.from_bytes(plot.png[16:20], "big")  # the PNG header's width field
            assert width <= column, (plot.name, width, column)


# --- keys: colour bars, legends ----------------------------------------------------------------------

def test_token_routing_has_a_labelled_colour_bar(trace):
    routing = analysis.token_routing(trace, CharTokenizer().encode("x")[0], "x")
    _, bar = viz.plot_token_routing([routing]).axes
    assert "share of the token's occurrences" in bar.get_ylabel()


@pytest.mark.parametrize("layers", [4, 24])
def test_per_layer_lines_have_a_short_legend(layers):
    """24 layers (Qwen1.5-MoE's) get a colour bar of layers; a legend has at most 8 entries."""
    trace = synthetic_trace(120, layers=layers)
    figures = (viz.plot_expert_cache_hits(analysis.expert_cache_hit_rate(trace), trace.layers),
               viz.plot_shared_gate(trace, tokens_per_panel=200))
    for fig in figures:
        legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
        entries = [text.get_text() for legend in legends for text in legend.get_texts()]
        assert len(entries) <= viz.MAX_LEGEND_LINES
        bars = [ax for ax in fig.axes if ax.get_ylabel() == "layer (line colour)"]
        if layers <= viz.MAX_LEGEND_LINES:
            assert [f"layer {s}" for s in range(layers)] == [e for e in entries if e.startswith("layer")]
            assert not bars
        else:
            (bar,) = bars
            drawn(fig)
            ticks = [t.get_text() for t in bar.get_yticklabels() if t.get_text()]
            assert ticks == [str(s) for s in range(0, layers, viz.tick_step(layers))]


def test_the_real_models_token_grid_still_writes_every_expert_id():
    """512 tokens x 24 layers among 60 colours: the ids, not the colours, tell the experts apart."""
    trace = synthetic_trace(viz.MAX_PLOTTED_TOKENS, layers=24)
    fig = viz.plot_token_experts(trace)
    written = [int(text.get_text()) for ax in fig.axes for text in ax.texts]
    assert len(written) == 24 * viz.MAX_PLOTTED_TOKENS
    per_panel = [ax.images[0].get_array() for ax in fig.axes]
    assert written == [int(e) for ids in per_panel for e in ids.reshape(-1)]


# --- the report's colour legend ----------------------------------------------------------------------

class Chips(HTMLParser):
    """The expert chips of the page's legend: id -> (shown, background colour)."""

    def __init__(self):
        super().__init__()
        self.chips, self.inside = {}, False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "p" and attrs.get("class") == "legend":
            self.inside = True
        elif tag == "span" and self.inside:
            colour = re.search(r"background:(#[0-9a-f]{6})", attrs["style"])[1]
            self.chips[int(attrs["data-e"])] = ("hidden" not in attrs, colour)

    def handle_endtag(self, tag):
        if tag == "p":
            self.inside = False


def chips(page: str) -> dict[int, tuple[bool, str]]:
    parser = Chips()
    parser.feed(page)
    return parser.chips


def test_legend_shows_only_the_experts_coloured_in_the_text(built, trace):
    shown = {e for e, (visible, _) in chips(built.html()).items() if visible}
    assert shown == set(trace.expert_ids[0, :, 0].tolist())  # the top-1 experts of the first layer
    assert len(shown) < EXPERTS
    palette = viz.expert_colors(EXPERTS)
    assert all(colour == to_hex(palette[e]) for e, (_, colour) in chips(built.html()).items())


def test_chromium_shows_each_layers_own_legend(built, trace, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium): the page's script cannot be run")
    last = len(trace.layers) - 1
    # Pick the last layer as a reader would, then record which chips the browser lays out (display: none has no
    # offsetParent), so that the page's CSS is checked as well as its script.
    pick = (f"<script>const picker = document.getElementById('layer'); picker.value = '{last}';"
            "picker.dispatchEvent(new Event('change'));"
            "document.body.dataset.shown = [...document.querySelectorAll('.legend span')]"
            ".filter(chip => chip.offsetParent !== null).map(chip => chip.dataset.e).join(' ');</script>")
    page = tmp_path / "page.html"
    page.write_text(built.html().replace("</body>", pick + "</body>"), encoding="utf-8")
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    shown = {int(e) for e in re.search(r'<body data-shown="([0-9 ]*)"', dom)[1].split()}
    assert shown == set(trace.expert_ids[last, :, 0].tolist())
    assert shown != set(trace.expert_ids[0, :, 0].tolist())  # the picker changed it
