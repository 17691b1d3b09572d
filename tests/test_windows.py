"""Texts longer than the context: the window plan, windowed traces and measurements, on the bundled model."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import minimoe
from minimoe import MinimoeError
from minimoe.inspect.tracing import Windowing, measure_interventions, trace_generation, trace_text


@pytest.fixture(scope="module")
def bundled():
    path = minimoe.default_model_path()
    return minimoe.load(path), minimoe.load_tokenizer(path)


@pytest.fixture(scope="module")
def ids(bundled) -> np.ndarray:
    """About 600 tokens of Python."""
    _, tok = bundled
    text = "".join(f"def f{i}(self, x):\n    return self.x * {i} + x\n\n" for i in range(30))
    return np.array(tok.encode(text))


# --- the plan --------------------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(tokens=st.integers(1, 3000), window=st.integers(2, 1024), data=st.data())
def test_windows_tile_the_text_with_the_documented_context(tokens, window, data):
    overlap = data.draw(st.integers(0, window - 1))
    plan = Windowing.plan(tokens, 1024, window, overlap)
    windows = plan.windows()
    assert windows[0].start == windows[0].traced == 0
    assert [w.traced for w in windows[1:]] == [w.stop for w in windows[:-1]]  # traced ranges tile 0..T, in order
    assert windows[-1].stop == tokens
    for w in windows:
        assert w.start <= w.traced < w.stop and w.stop - w.start <= window
        assert w.traced - w.start >= min(overlap, w.traced)  # every traced token has `overlap` tokens before it
    for w in windows[1:-1]:
        assert w.traced - w.start == overlap and w.stop - w.start == window  # the stride is window - overlap
    if len(windows) > 1:
        assert windows[-1].stop - windows[-1].start == window  # the last window is moved back to full length
    assert plan.fits == (len(windows) == 1)


def test_default_window_is_the_context_and_overlap_half_of_it():
    plan = Windowing.plan(3493, 1024)
    assert (plan.window, plan.overlap) == (1024, 512)
    assert [(w.start, w.traced, w.stop) for w in plan.windows()] == [
        (0, 0, 1024), (512, 1024, 1536), (1024, 1536, 2048), (1536, 2048, 2560), (2048, 2560, 3072),
        (2469, 3072, 3493)]
    assert plan.describe().startswith("6 windows of up to 1,024 tokens, each re-reading the 512 tokens before it")
    assert Windowing.plan(40, 1024).describe() == "all 40 tokens in one pass (window 1,024)"


@pytest.mark.parametrize("window, overlap, message", [
    (2000, None, "window must be an integer from 2 to the model's context of 1024"), (1, None, "from 2"),
    (64, 64, "overlap must be an integer from 0 to window - 1 = 63"), (64, -1, "overlap"),
])
def test_bad_windows_are_refused(window, overlap, message):
    with pytest.raises(MinimoeError, match=message):
        Windowing.plan(100, 1024, window, overlap)


# --- traces ----------------------------------------------------------------------------------------

def test_a_text_that_fits_is_one_plain_pass(bundled, ids):
    model, tok = bundled
    windowed = model.trace(ids, tokenizer=tok)
    plain = model.trace_continuation(ids, model.new_cache(), tokenizer=tok)  # one forward through a cache, recorded
    for name in ("token_ids", "positions", "router_logits", "expert_ids", "expert_weights", "shared_gate", "logits"):
        np.testing.assert_array_equal(getattr(windowed, name), getattr(plain, name), err_msg=name)
    assert windowed.tokens == plain.tokens and windowed.logits.shape == (len(ids), model.config.vocab_size)


def test_each_window_traces_its_tokens_as_a_pass_over_the_window_would(bundled, ids):
    model, tok = bundled
    windowed = model.trace(ids, tokenizer=tok, window=128, overlap=48, keep_logits=True, progress=False)
    np.testing.assert_array_equal(windowed.token_ids, ids)
    np.testing.assert_array_equal(windowed.positions, np.arange(len(ids)))  # the text's positions, not the window's
    assert windowed.tokens == [tok.decode([int(i)]) for i in ids]
    for w in Windowing.plan(len(ids), 1024, 128, 48).windows():
        alone = model.trace_continuation(ids[w.start : w.stop], model.new_cache())
        keep = slice(w.traced - w.start, None)
        span = slice(w.traced, w.stop)
        np.testing.assert_array_equal(windowed.expert_ids[:, span], alone.expert_ids[:, keep])
        np.testing.assert_array_equal(windowed.router_probs[:, span], alone.router_probs[:, keep])
        np.testing.assert_array_equal(windowed.attention_norm[:, span], alone.attention_norm[:, keep])
        np.testing.assert_array_equal(windowed.logits[span], alone.logits[keep])


def test_long_traces_drop_logits_and_take_interventions(bundled, ids):
    model, _ = bundled
    trace = model.trace(ids, window=100, progress=False, interventions={"disabled_experts": {1: [0, 1]}})
    assert trace.logits.shape == (len(ids), 0)
    assert not np.isin(trace.expert_ids[1], [0, 1]).any()  # the intervention reached every window
    assert trace.interventions == "disabled 2 experts in layer 1" and "interventions: disabled 2" in repr(trace)
    seen = []
    model.trace(ids, window=100, progress=lambda items, **labels: seen.append(labels) or items)
    assert seen == [{"desc": "tracing", "unit": "window"}]


def traced_peak(model, tokens: int) -> tuple[int, int]:
    """(peak NumPy bytes while tracing ``tokens`` random ids in windows of 256, bytes the trace holds)."""
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, tokens)
    tracemalloc.start()
    try:
        trace = trace_text(model, ids, window=256, progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert trace.num_tokens == tokens
    return peak, sum(value.nbytes for value in vars(trace).values() if isinstance(value, np.ndarray))


def test_memory_is_bounded_by_the_window_not_the_text(bundled):
    """Twice the text costs what the trace itself grows by, not the [T, vocab] logits (32 MiB more here).

    At most twice the trace's growth: the windows' pieces and the joined arrays coexist while they are
    concatenated.
    """
    model, _ = bundled
    traced_peak(model, 256)  # warm: allocator, the model's first-use caches
    (short_peak, short_trace), (long_peak, long_trace) = traced_peak(model, 2048), traced_peak(model, 4096)
    logits_growth = 2048 * model.config.vocab_size * 4
    growth = long_peak - short_peak
    assert growth < 2 * (long_trace - short_trace) + logits_growth / 4, f"{growth / 2**20:.1f} MiB more"


# --- measurements and generation ---------------------------------------------------------------------

def test_base_logits_save_the_plain_runs_and_change_nothing(bundled, ids):
    model, _ = bundled
    interventions = {"top-1": {"top_k": 1}, "no shared": {"shared_expert": False}}
    measured = measure_interventions(model, ids, interventions, progress=False)
    saved = measure_interventions(model, ids, interventions, base_logits=model.forward(ids), progress=False)
    for name in interventions:
        np.testing.assert_array_equal(saved[name].kl_per_token, measured[name].kl_per_token)
        assert (saved[name].loss, saved[name].base_loss) == (measured[name].loss, measured[name].base_loss)
    with pytest.raises(MinimoeError, match="base_logits hold 3 positions but the text has"):
        measure_interventions(model, ids, interventions, base_logits=model.forward(ids[:3]), progress=False)


def test_windowed_measurement_is_per_window_arithmetic(bundled, ids):
    model, _ = bundled
    effect = measure_interventions(model, ids, {"top-1": {"top_k": 1}}, window=128, overlap=32, progress=False)["top-1"]
    assert effect.kl_per_token.shape == (len(ids),)
    # Independently: the loss of each traced position's actual next token, window by window.
    nll, kl = [], []
    for w in Windowing.plan(len(ids), 1024, 128, 32).windows():
        piece = ids[w.start : w.stop]
        base, changed = (np.log(softmax(model.forward(piece, interventions=change).astype(np.float64)))
                         for change in (None, {"top_k": 1}))
        for t in range(w.traced, w.stop):
            r = t - w.start
            kl.append(float((np.exp(base[r]) * (base[r] - changed[r])).sum()))
            if t + 1 < len(ids):
                nll.append(-changed[r, ids[t + 1]])
    np.testing.assert_allclose(effect.kl_per_token, kl, rtol=1e-6, atol=1e-12)
    assert effect.loss == pytest.approx(np.mean(nll), rel=1e-9)
    assert repr(effect).startswith(f"InterventionEffect(top-1, over {len(ids):,} positions: mean KL {effect.mean_kl:.4g}")


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def test_generation_after_a_prompt_longer_than_the_context(bundled):
    model, tok = bundled
    prompt = tok.encode("x = 1\n" * 400)  # 1,200 tokens, more than the context of 1,024
    assert len(prompt) > model.config.max_position_embeddings
    new_ids, trace = trace_generation(model, prompt, 8, tokenizer=tok, temperature=0, window=512)
    seen = model.config.max_position_embeddings - 8
    assert new_ids == model.generate(prompt[-seen:], 8, temperature=0)  # from all the model can see
    assert trace.num_tokens == len(prompt) + len(new_ids) - 1
    np.testing.assert_array_equal(trace.positions, np.arange(trace.num_tokens))
    np.testing.assert_array_equal(trace.token_ids, prompt + new_ids[:-1])
    assert trace.tokens[-1] == tok.decode([new_ids[-2]]) and trace.logits.shape[1] == 0


def test_a_text_that_fits_one_window_is_traced_without_copying_its_logits():
    """One window: the trace holds the forward's own [T, vocab] logits (a copy would double the peak memory)."""
    model = minimoe.load(minimoe.default_model_path())
    ids = np.arange(600) % model.config.vocab_size
    model.forward(ids)  # warm: allocator, caches
    tracemalloc.start()
    model.forward(ids)
    forward_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.reset_peak()
    model.trace(ids)
    trace_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    logits = len(ids) * model.config.vocab_size * 4
    assert trace_peak - forward_peak < logits / 2, (trace_peak, forward_peak)  # a copy would add all of them
