"""The expert atlas: its counts against transformers' routing, the same atlas whatever the workers, shards or
interruptions, its inputs, its errors and its page (in headless Chromium)."""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import minimoe
import minimoe.atlas
from minimoe import MinimoeError
from minimoe.atlas import aggregates
from minimoe.atlas.aggregates import Atlas, read_atlas
from minimoe.atlas.engine import KILL_ONCE
from minimoe.inspect.tracing import Windowing

from parity import ROUTER_PROB_TOLERANCE

MODEL = minimoe.default_model_path()  # the bundled model: 4 sparse layers, 60 experts, top-4, and a tokenizer
WINDOW = 48  # short windows, so that the longer documents are traced in several
CODE = ["def add(a, b):\n    return a + b\n\n\nclass Stack:\n    def __init__(self):\n        self.items = []\n\n"
        "    def push(self, item):\n        self.items.append(item)\n",
        "import os\nfor name in sorted(os.listdir('.')):\n    if name.endswith('.py'):\n        print(name)\n" * 3,
        "x = 1\n"]
PROSE = ["The quick brown fox jumps over the lazy dog. " * 6,
         "Experts are chosen per token by a router; the shared expert runs on every token.\n" * 2,
         ""]  # an empty document counts nothing


def write_corpus(root: Path) -> Path:
    for domain, texts in (("code", CODE), ("prose", PROSE)):
        (root / domain / "more").mkdir(parents=True)
        for i, text in enumerate(texts):
            # A file in a subfolder keeps its domain: the first folder under the root.
            (root / domain / ("more" if i == 1 else "") / f"doc{i}.txt").write_text(text, encoding="utf-8")
    return root


def build(corpus, out, **options) -> Atlas:
    options = {"window": WINDOW, "progress": False, "page": False, **options}
    return minimoe.atlas.build([corpus], out, MODEL, **options)


def arrays(atlas: Atlas) -> dict:
    return {name: value for name, value in vars(atlas).items()}


def assert_same(a: Atlas, b: Atlas) -> None:
    for name, value in arrays(a).items():
        other = getattr(b, name)
        if isinstance(value, np.ndarray):
            assert value.dtype == other.dtype and np.array_equal(value, other), name
        else:
            assert value == other, name


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def built(corpus, tmp_path_factory) -> tuple[Atlas, Path]:
    out = tmp_path_factory.mktemp("atlas")
    return build(corpus, out, page=True), out


# --- the counts, against transformers ----------------------------------------------------------------

@functools.cache
def transformers_model():
    torch = pytest.importorskip("torch", reason="the reference router needs torch + transformers")
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()


def transformers_routing(ids: list[int]) -> np.ndarray:
    """Each token's chosen experts ``[L, T, k]`` as transformers' router picks them, window by window as the
    atlas traces (each window a fresh sequence; its context tokens routed but not kept)."""
    import torch

    model = transformers_model()
    k = model.config.num_experts_per_tok
    pieces = []
    for part in Windowing.plan(len(ids), model.config.max_position_embeddings, WINDOW).windows():
        with torch.no_grad():
            output = model(torch.tensor([ids[part.start : part.stop]]), output_router_logits=True)
        layers = []
        for logits in output.router_logits:  # [T, E] per sparse layer
            probs = logits.float().softmax(-1)
            top = probs.topk(k + 1, dim=-1)
            margin = (top.values[:, k - 1] - top.values[:, k]).min().item()
            # minimoe's router probabilities are within ROUTER_PROB_TOLERANCE of these: a wider margin cannot flip.
            assert margin > 2 * ROUTER_PROB_TOLERANCE, "a near-tie in the top-k: the comparison would be fragile"
            layers.append(top.indices[:, :k].numpy())
        pieces.append(np.stack(layers)[:, part.traced - part.start :])
    return np.concatenate(pieces, axis=1)


def test_counts_are_transformers_routing_counted_token_by_token(built):
    atlas, _ = built
    tokenizer = minimoe.load_tokenizer(MODEL)
    L, E, k = 4, 60, 4
    slots, top1, coact, moves = Counter(), Counter(), Counter(), Counter()
    domain_tokens, domain_slots, token_counts, repeats, distinct = Counter(), Counter(), Counter(), Counter(), Counter()
    batches, pairs = Counter(), 0
    for domain, texts in (("code", CODE), ("prose", PROSE)):
        for text in texts:
            ids = tokenizer.encode(text)
            if not ids:
                continue
            chosen = transformers_routing(ids)
            pairs += len(ids) - 1
            for t, token in enumerate(ids):
                domain_tokens[domain] += 1
                token_counts[token] += 1
                for s in range(L):
                    experts = chosen[s, t].tolist()
                    top1[s, experts[0]] += 1
                    if t and chosen[s, t - 1, 0] == experts[0]:
                        repeats[s] += 1
                    if s + 1 < L:
                        moves[s, experts[0], int(chosen[s + 1, t, 0])] += 1
                    for i in experts:
                        slots[s, i] += 1
                        domain_slots[domain, s, i] += 1
                        for j in experts:
                            coact[s, i, j] += 1
            for b in range(1, 9):
                for start in range(0, len(ids) - b + 1, b):
                    batches[b] += 1
                    for s in range(L):
                        distinct[s, b] += len(set(chosen[s, start : start + b].ravel().tolist()))

    def dense(counter, shape):
        array = np.zeros(shape, dtype=np.int64)
        for key, value in counter.items():
            array[key] = value
        return array

    assert atlas.domains == ["code", "prose"]
    assert atlas.tokens == sum(domain_tokens.values()) and atlas.documents == 5  # the empty one is not a document
    assert atlas.domain_tokens.tolist() == [domain_tokens["code"], domain_tokens["prose"]]
    assert np.array_equal(atlas.slot_counts, dense(slots, (L, E)))
    assert np.array_equal(atlas.top1_counts, dense(top1, (L, E)))
    domain_index = {"code": 0, "prose": 1}
    assert np.array_equal(atlas.domain_slot_counts,
                          dense({(domain_index[d], s, e): v for (d, s, e), v in domain_slots.items()}, (2, L, E)))
    assert np.array_equal(atlas.coactivation, dense(coact, (L, E, E)))
    assert np.array_equal(atlas.transitions, dense(moves, (L - 1, E, E)))
    assert atlas.repeat_pairs == pairs and atlas.repeat_top1.tolist() == [repeats[s] for s in range(L)]
    assert np.array_equal(atlas.token_counts, dense(token_counts, (atlas.model["vocab_size"],)))
    assert atlas.distinct_batches[:8].tolist() == [batches[b] for b in range(1, 9)]
    assert np.array_equal(atlas.distinct_sum[:, :8], dense({(s, b - 1): v for (s, b), v in distinct.items()}, (L, 8)))
    ids, per_token = atlas.vocabulary(count=5)
    assert per_token.sum((1, 2)).tolist() == (atlas.token_counts[ids] * L).tolist()  # every top-1, in each layer


def test_the_histograms_and_samples_hold_every_token(built):
    atlas, _ = built
    for hist in (atlas.entropy_hist, atlas.mass_hist, atlas.shared_gate_hist):
        assert hist.sum(1).tolist() == [atlas.tokens] * 4
    kept = atlas.sample_hash != aggregates.EMPTY_HASH
    assert np.array_equal(kept.sum(-1), np.minimum(atlas.slot_counts, aggregates.SAMPLES))
    tokenizer = minimoe.load_tokenizer(MODEL)
    s, e = np.unravel_index(atlas.slot_counts.argmax(), atlas.slot_counts.shape)
    context = atlas.sample_context[s, e, 0]
    assert tokenizer.decode(context[context >= 0].tolist()) in "".join(CODE + PROSE)


def test_bottom_m_samples_merge_exactly():
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 6, 200)
    hashes = rng.integers(0, 2**63, 200).astype(np.uint64)
    context = np.arange(200)[:, None].repeat(3, 1).astype(np.int32)
    empty_h = np.full((2, 3, aggregates.SAMPLES), aggregates.EMPTY_HASH, dtype=np.uint64)
    empty_c = np.full((2, 3, aggregates.SAMPLES, 3), -1, dtype=np.int32)
    whole = aggregates.keep_smallest(empty_h, empty_c, hashes, context, groups)
    half = aggregates.keep_smallest(empty_h, empty_c, hashes[:120], context[:120], groups[:120])
    both = aggregates.keep_smallest(*half, hashes[120:], context[120:], groups[120:])
    assert np.array_equal(whole[0], both[0]) and np.array_equal(whole[1], both[1])
    for g in range(6):
        expected = np.sort(hashes[groups == g])[: aggregates.SAMPLES]
        assert whole[0].reshape(6, -1)[g][: len(expected)].tolist() == expected.tolist()


# --- one atlas whatever the run -----------------------------------------------------------------------

def test_the_same_atlas_whatever_the_workers_shards_and_interruptions(built, corpus, tmp_path, monkeypatch):
    atlas, _ = built
    assert_same(atlas, build(corpus, tmp_path / "two", workers=2, shard_size=1))
    # A worker killed mid-shard: its shard is computed again.
    marker = tmp_path / "kill-once"
    marker.touch()
    monkeypatch.setenv(KILL_ONCE, str(marker))
    assert_same(atlas, build(corpus, tmp_path / "killed", workers=2, shard_size=2))
    assert not marker.exists()  # the worker did die
    monkeypatch.delenv(KILL_ONCE)
    # An interrupted run (some shards never written) resumed.
    out = tmp_path / "resumed"
    build(corpus, out, shard_size=1)
    shards = sorted((out / "shards").glob("*.npz"))
    kept = {path: path.stat().st_mtime_ns for path in shards[:2]}
    for path in shards[2:]:
        path.unlink()
    (out / "atlas.npz").unlink()
    assert_same(atlas, build(corpus, out, shard_size=1, resume=True))
    assert all(path.stat().st_mtime_ns == mtime for path, mtime in kept.items())  # finished shards were kept
    with pytest.raises(MinimoeError, match="already holds 6 finished shards: pass --resume"):
        build(corpus, out, shard_size=1)
    with pytest.raises(MinimoeError, match="shard_size changed"):
        build(corpus, out, shard_size=2, resume=True)


def test_merging_is_the_atlas_of_both(built, corpus, tmp_path):
    atlas, out = built
    code = build(corpus / "code", tmp_path / "code", domains=["code"])
    prose = build(corpus / "prose", tmp_path / "prose", domains=["prose"])
    both = prose.merge(code)
    for name in ("tokens", "documents", "domains", "domain_tokens", "slot_counts", "coactivation", "transitions",
                 "distinct_sum", "entropy_hist", "token_top1_keys", "token_top1_values"):
        assert np.array_equal(getattr(both, name), getattr(atlas, name)), name
    assert_same(both, code.merge(prose))


# --- inputs -------------------------------------------------------------------------------------------

def test_jsonl_and_parquet_give_the_same_counts_as_the_files(built, tmp_path):
    atlas, _ = built
    records = [{"text": text, "domain": domain, "id": i}
               for domain, texts in (("code", CODE), ("prose", PROSE)) for i, text in enumerate(texts)]
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in records[:3]) + "\n\n" + "\n".join(json.dumps(r) for r in
                                                                                        records[3:]) + "\n")
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    parquet = tmp_path / "corpus.parquet"
    pq.write_table(pyarrow.Table.from_pylist(records), parquet)
    for source in (jsonl, parquet):
        other = minimoe.atlas.build([source], tmp_path / source.suffix[1:], MODEL, window=WINDOW, progress=False,
                                    page=False)
        for name in ("domains", "domain_tokens", "slot_counts", "top1_counts", "coactivation", "transitions",
                     "repeat_top1", "distinct_sum", "mass_hist", "token_top1_values"):
            assert np.array_equal(getattr(other, name), getattr(atlas, name)), (source.suffix, name)


def test_domains_from_flags_and_without_a_domain_field(corpus, tmp_path):
    jsonl = tmp_path / "plain.jsonl"
    jsonl.write_text(json.dumps({"body": CODE[0]}) + "\n")
    one = minimoe.atlas.build([jsonl, corpus / "prose"], tmp_path / "out", MODEL, text_field="body",
                              domains=["mine", "words"], window=WINDOW, progress=False, page=False)
    assert one.domains == ["mine", "words"] and one.documents == 3


@pytest.mark.parametrize("content, message", [
    ('{"text": "fine"}\n{"txt": "oops"}\n', r"corpus.jsonl:2: no 'text' field \(its fields: txt\)"),
    ('{"text": "fine"}\n{"text": \n', r"corpus.jsonl:2: not a JSON line"),
    ('{"text": 3}\n', r"corpus.jsonl:1: the 'text' field is a int, not a string"),
])
def test_bad_jsonl_lines_are_named(tmp_path, content, message):
    (tmp_path / "corpus.jsonl").write_text(content)
    with pytest.raises(MinimoeError, match=message):
        minimoe.atlas.build([tmp_path / "corpus.jsonl"], tmp_path / "out", MODEL, progress=False, page=False)


def test_bad_inputs_are_named(corpus, tmp_path):
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pyarrow.Table.from_pylist([{"body": "x"}]), tmp_path / "t.parquet")
    with pytest.raises(MinimoeError, match=r"t.parquet: no column 'text' \(its columns: body\)"):
        minimoe.atlas.build([tmp_path / "t.parquet"], tmp_path / "o1", MODEL, progress=False)
    latin = tmp_path / "latin" / "a"
    latin.mkdir(parents=True)
    (latin / "bad.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(MinimoeError, match=r"bad.txt: not UTF-8 text \(unexpected end of data at byte 3\)"):
        minimoe.atlas.build([tmp_path / "latin"], tmp_path / "o2", MODEL, progress=False, page=False)
    (latin / "good.txt").write_text("fine text")
    skipped = minimoe.atlas.build([tmp_path / "latin"], tmp_path / "o3", MODEL, progress=False, page=False,
                                  skip_unreadable=True)
    assert skipped.documents == 1 and "bad.txt: not UTF-8" in skipped.skipped[0]
    (tmp_path / "empty").mkdir()
    with pytest.raises(MinimoeError, match="the corpus is empty: no documents in"):
        minimoe.atlas.build([tmp_path / "empty"], tmp_path / "o4", MODEL, progress=False)
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "e.txt").write_text("")
    with pytest.raises(MinimoeError, match="the corpus has no tokens"):
        minimoe.atlas.build([tmp_path / "blank"], tmp_path / "o5", MODEL, progress=False)
    with pytest.raises(MinimoeError, match="missing.txt: no such file or folder"):
        minimoe.atlas.build([tmp_path / "missing.txt"], tmp_path / "o6", MODEL, progress=False)
    with pytest.raises(MinimoeError, match="--domain was given 2 times for 1 inputs"):
        minimoe.atlas.build([corpus], tmp_path / "o7", MODEL, domains=["a", "b"], progress=False)


def test_another_models_shards_are_refused(built, corpus, tmp_path):
    _, out = built
    other = tmp_path / "other-model"
    shutil.copytree(MODEL, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "router_aux_loss_coef": 0.02}))  # other bytes
    with pytest.raises(MinimoeError, match=r"holds the atlas of another model \(model tiny-moe .*\), not of "
                                           r"model other-model"):
        minimoe.atlas.build([corpus], out, other, window=WINDOW, progress=False, resume=True)


def test_load_says_what_is_missing(tmp_path):
    with pytest.raises(MinimoeError, match="no atlas here"):
        minimoe.atlas.load(tmp_path)
    (tmp_path / "atlas.npz").write_bytes(b"not a zip")
    with pytest.raises(MinimoeError, match="not a readable atlas file"):
        minimoe.atlas.load(tmp_path)


# --- the command and the page ---------------------------------------------------------------------------

def test_the_command_writes_the_atlas_and_its_page(corpus, tmp_path, capsys):
    from minimoe.tools.cli import main

    out = tmp_path / "out"
    assert main(["atlas", str(corpus / "code"), "--out", str(out), "--window", str(WINDOW), "--shard-size", "2"]) == 0
    assert capsys.readouterr().out.strip() == str(out / "index.html")
    atlas, header = read_atlas(out / "atlas.npz")
    assert atlas.domains == ["code", "more"] and header["format"] == aggregates.FORMAT
    assert {p.name for p in out.iterdir()} >= {"atlas.json", "atlas.npz", "index.html", "load.png", "domains.png",
                                              "distinct_experts.png", "histograms.png", "shards"}
    assert main(["atlas", str(corpus), "--out", str(tmp_path / "o"), "--engine", "local", "--address", "x:1"]) == 1
    assert "--address is for --engine ray" in capsys.readouterr().err


def test_the_page_renders_and_a_click_opens_a_card(built, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium): the page cannot be rendered")
    atlas, out = built
    s, e = (int(i) for i in np.unravel_index(atlas.slot_counts.argmax(), atlas.slot_counts.shape))
    # Errors (thrown, or written to the console) land on the root element, where --dump-dom shows them.
    catch = ("<script>const note = m => document.documentElement.dataset.errors = "
             "(document.documentElement.dataset.errors || '') + m + ';';"
             "window.addEventListener('error', event => note(event.message));"
             "const original = console.error; console.error = (...args) => { note(args.join(' ')); };</script>")
    click = (f"<script>{{document.querySelector('#grid .cell[data-layer=\"{s}\"][data-expert=\"{e}\"]').click();"
             "const select = document.getElementById('stat'); select.value = 'pref1';"
             "select.dispatchEvent(new Event('change'));}</script>")
    page = tmp_path / "page.html"
    page.write_text((out / "index.html").read_text(encoding="utf-8").replace("<head>", "<head>" + catch, 1)
                    .replace("</body>", click + "</body>"), encoding="utf-8")
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert "data-errors" not in dom
    card = re.search(r'<div id="card" data-open="([0-9:]+)"[^>]*>(.*?)</div>\s*<figure', dom, re.S)
    assert card[1] == f"{s}:{e}"
    assert f"<h2>Layer {atlas.layers[s]}, expert {e}</h2>" in card[2]
    assert f"Load: {atlas.slot_counts[s, e]:,} of {atlas.tokens * 4:,} top-4 assignments" in card[2]
    assert card[2].count('<div class="ctx">') == aggregates.SAMPLES
    cells = re.findall(r'<div class="cell[^"]*" data-layer="\d+" data-expert="\d+" title="[^"]*" '
                       r'style="background: ([^;]+);', dom)
    assert len(cells) == 4 * 60 and len(set(cells)) > 3  # coloured, by more than one value
    assert "preference for prose" in dom
