"""Sampling and generation: filters against transformers' logits warpers, draws against the
distribution they define, and stopping rules."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import minimoe
from minimoe import MinimoeError
from minimoe.generate import filter_top_k, filter_top_p, next_token_distribution, sample_next

from conftest import FIXTURES, load_reference
from parity import LOGIT_TOLERANCE, relative_error

torch = pytest.importorskip("torch", reason="the reference warpers need torch + transformers")
transformers = pytest.importorskip("transformers")
warpers = pytest.importorskip("transformers.generation.logits_process")

rng = np.random.default_rng(0)


def reference_distribution(logits: np.ndarray, temperature: float, top_k: int | None, top_p: float | None) -> np.ndarray:
    """transformers' warpers in generate()'s order, then softmax."""
    scores = torch.from_numpy(logits.astype(np.float32))[None]
    ids = torch.zeros((1, 1), dtype=torch.long)
    scores = warpers.TemperatureLogitsWarper(temperature)(ids, scores)
    if top_k is not None:
        scores = warpers.TopKLogitsWarper(top_k)(ids, scores)
    if top_p is not None:
        scores = warpers.TopPLogitsWarper(top_p)(ids, scores)
    return torch.softmax(scores.double(), dim=-1)[0].numpy()


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, None, None), (0.7, 5, None), (1.3, None, 0.8),
                                                        (1.0, 20, 0.5), (0.5, 3, 0.95), (1.0, None, 0.1)])
def test_filters_keep_exactly_the_tokens_transformers_keeps(temperature, top_k, top_p):
    for trial in range(20):
        logits = rng.standard_normal(50).astype(np.float32) * 2
        ours = next_token_distribution(logits, temperature, top_k, top_p)
        theirs = reference_distribution(logits, temperature, top_k, top_p)
        np.testing.assert_array_equal(ours > 0, theirs > 0)
        np.testing.assert_allclose(ours, theirs, atol=1e-6)


def test_top_k_keeps_ties_and_top_p_keeps_at_least_one():
    logits = np.array([3.0, 1.0, 3.0, 2.0, 3.0])
    assert np.isfinite(filter_top_k(logits, 2)).sum() == 3  # the three tied maxima stay
    assert np.isfinite(filter_top_p(np.array([10.0, 0.0, -1.0]), 0.01)).tolist() == [True, False, False]


def test_draws_follow_the_filtered_distribution():
    """20,000 draws against the distribution: every kept token within 5 sigma, no filtered token ever."""
    logits = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
    expected = next_token_distribution(logits, 0.9, 6, 0.9)
    draws = np.random.default_rng(1)
    counts = np.bincount([sample_next(logits, draws, 0.9, 6, 0.9) for _ in range(20_000)], minlength=logits.size)
    assert (counts[expected == 0] == 0).all()
    sigma = np.sqrt(20_000 * expected * (1 - expected))
    assert (np.abs(counts - 20_000 * expected) <= 5 * sigma + 1).all()


@pytest.fixture(scope="module")
def model():
    return minimoe.load(FIXTURES / "moe_gqa")


def test_greedy_generation_matches_transformers(model):
    reference = load_reference(FIXTURES / "moe_gqa")
    greedy = reference["greedy"].tolist()
    assert model.generate(reference["ids"][0], len(greedy), temperature=0, eos_token_ids=[]) == greedy


def test_generation_applies_interventions_at_every_step(model):
    """Greedy decoding through the cache with top-1 routing picks what a fresh top-1 forward over the whole
    sequence ranks first, token after token."""
    top1 = {"top_k": 1}
    got = model.generate([5, 6, 7], 6, temperature=0, eos_token_ids=[], interventions=top1)
    ids = [5, 6, 7]
    for _ in range(6):
        ids.append(int(model.forward(ids, interventions=top1)[-1].argmax()))
    assert got == ids[3:]
    with pytest.raises(MinimoeError, match="unknown intervention 'topk'"):
        model.generate([5, 6, 7], 2, interventions={"topk": 1})


def test_seed_makes_sampling_reproducible(model):
    prompt = [5, 6, 7]
    first = model.generate(prompt, 12, temperature=1.5, seed=3, eos_token_ids=[])
    assert model.generate(prompt, 12, temperature=1.5, seed=3, eos_token_ids=[]) == first
    assert model.generate(prompt, 12, temperature=1.5, seed=4, eos_token_ids=[]) != first


def test_stops_on_eos_and_yields_it(model):
    prompt = [5, 6, 7]
    free = model.generate(prompt, 10, temperature=0, eos_token_ids=[])
    stop_at = free[3]
    first_hit = free.index(stop_at)
    assert model.generate(prompt, 10, temperature=0, eos_token_ids=[stop_at]) == free[: first_hit + 1]


def test_stops_on_stop_strings():
    bundled = minimoe.load(minimoe.default_model_path())
    tok = minimoe.load_tokenizer(minimoe.default_model_path())
    prompt = tok.encode("def main():\n")
    free = bundled.generate(prompt, 30, temperature=0, eos_token_ids=[])
    text = tok.decode(free)
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    stopped = bundled.generate(prompt, 30, temperature=0, eos_token_ids=[], stop_strings=[stop], tokenizer=tok)
    assert stop in tok.decode(stopped) and stop not in tok.decode(stopped[:-1])
    assert stopped == free[: len(stopped)]


# config.json says eos 2, generation_config.json says [5, 7]: reading the wrong file shows.
EXPLICIT = FIXTURES / "moe_explicit_fields"


def test_eos_comes_from_generation_config_as_in_transformers(tmp_path):
    theirs = transformers.GenerationConfig.from_pretrained(EXPLICIT).eos_token_id
    assert minimoe.load(EXPLICIT).eos_token_ids == theirs == [5, 7]
    copy = tmp_path / "model"
    shutil.copytree(EXPLICIT, copy)
    (copy / "generation_config.json").unlink()
    fallback = transformers.GenerationConfig.from_model_config(transformers.AutoConfig.from_pretrained(copy))
    assert minimoe.load(copy).eos_token_ids == [fallback.eos_token_id] == [2]


def test_generation_stops_at_eos_where_transformers_generate_stops(tmp_path):
    """generation_config.json names a token the greedy continuation reaches; both stop on it."""
    prompt = load_reference(EXPLICIT)["ids"][0]
    free = minimoe.load(EXPLICIT).generate(prompt, 10, temperature=0, eos_token_ids=[])
    stop = free[3]
    copy = tmp_path / "model"
    shutil.copytree(EXPLICIT, copy)
    (copy / "generation_config.json").write_text(json.dumps({"eos_token_id": stop, "bos_token_id": 1}))
    ours = minimoe.load(copy).generate(prompt, 10, temperature=0)
    reference = transformers.AutoModelForCausalLM.from_pretrained(copy, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = reference.generate(torch.from_numpy(prompt)[None], max_new_tokens=10, do_sample=False)
    assert ours == theirs[0, len(prompt):].tolist() == free[: free.index(stop) + 1]


# --- top-p at ties: transformers' TopPLogitsWarper decides which tied tokens go -----------------

def kept_by_transformers(logits, p: float) -> list[bool]:
    scores = warpers.TopPLogitsWarper(p)(None, torch.tensor([logits], dtype=torch.float32))
    return torch.isfinite(scores[0]).tolist()


@pytest.mark.parametrize("logits, p, kept", [
    ([0.0, 0.0], 0.5, [False, True]),  # running mass 0.5 <= 1 - p: the first of the tie goes
    ([2.0, 1.0, 1.0], 0.75, [True, False, True]),
    ([1.0, 1.0, 1.0, 1.0], 0.75, [False, True, True, True]),
    ([3.0, 0.0, 0.0, 0.0], 0.9, [True, False, False, True]),
    ([0.0, 5.0, 0.0], 0.01, [False, True, False]),
    ([0.0, 0.0], 1e-20, [False, True]),  # 1 - p rounds to 1: all the mass is "at most 1 - p", one token stays
])
def test_top_p_ties_keep_what_transformers_keeps(logits, p, kept):
    assert kept_by_transformers(logits, p) == kept  # the cases say what they claim
    assert np.isfinite(filter_top_p(np.array(logits), p)).tolist() == kept


def running_masses(logits: np.ndarray, temperature: float, top_k: int | None) -> np.ndarray:
    """The ascending running probability masses top-p compares with 1 - p (float64, independent of minimoe)."""
    scaled = logits.astype(np.float64) / temperature
    if top_k is not None:
        scaled = np.where(scaled >= np.sort(scaled)[-min(top_k, scaled.size)], scaled, -np.inf)
    probs = np.exp(np.sort(scaled) - scaled.max())
    return np.cumsum(probs / probs.sum())


@settings(max_examples=400, deadline=None)
@given(levels=st.lists(st.integers(-3, 3), min_size=2, max_size=16),  # few levels: ties everywhere
       scale=st.sampled_from([0.5, 1.0, 3.0]), temperature=st.sampled_from([0.5, 1.0, 2.0]),
       top_k=st.none() | st.integers(1, 16), p=st.floats(0.01, 0.99) | st.sampled_from([0.25, 0.5, 0.75]))
def test_top_p_with_ties_matches_transformers_everywhere(levels, scale, temperature, top_k, p):
    """Up to 16 tokens, where torch.sort keeps tied tokens in index order (its tie order
    beyond that is unspecified); cases whose outcome hangs on the last bit of a running
    mass (float32 there, float64 here) are left out, exact ties at 1 - p are kept in."""
    logits = np.array(levels, dtype=np.float32) * np.float32(scale)
    gaps = np.abs(running_masses(logits, temperature, top_k) - (1 - p))
    assume(not ((gaps > 0) & (gaps < 1e-5)).any())
    ours = next_token_distribution(logits, temperature, top_k, p)
    theirs = reference_distribution(logits, temperature, top_k, p)
    np.testing.assert_array_equal(ours > 0, theirs > 0)
    np.testing.assert_allclose(ours, theirs, atol=1e-6)


def test_top_p_of_one_keeps_everything(model):
    logits = np.array([3.0, -2.0, 0.5, -40.0])
    assert (next_token_distribution(logits, 1.0, None, 1.0) > 0).all()
    assert len(model.generate([5, 6], 2, top_p=1.0, seed=0, eos_token_ids=[])) == 2


# --- the context boundary -----------------------------------------------------------------------

def test_prompt_plus_new_tokens_may_fill_the_context_exactly(model):
    """moe_gqa's context is 48: 3 + 45 runs (and decodes as transformers does), 3 + 46 is refused."""
    context = model.config.max_position_embeddings
    prompt = [5, 6, 7]
    ours = model.generate(prompt, context - len(prompt), temperature=0, eos_token_ids=[])
    reference = transformers.AutoModelForCausalLM.from_pretrained(FIXTURES / "moe_gqa", dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = reference.generate(torch.tensor([prompt]), max_new_tokens=context - len(prompt), do_sample=False,
                                    eos_token_id=None)
    assert ours == theirs[0, len(prompt):].tolist() and len(ours) == context - len(prompt)
    with pytest.raises(MinimoeError, match=f"exceeds the context of {context}"):
        model.generate(prompt, context - len(prompt) + 1, temperature=0)


def test_forward_and_cache_fill_the_context_exactly(model):
    context = model.config.max_position_embeddings
    ids = np.arange(context + 1) * 7 % model.config.vocab_size
    reference = transformers.AutoModelForCausalLM.from_pretrained(FIXTURES / "moe_gqa", dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = reference(torch.from_numpy(ids[:context])[None]).logits[0].numpy()
    assert relative_error(model.forward(ids[:context]), theirs) < LOGIT_TOLERANCE  # the last position included
    with pytest.raises(MinimoeError, match=f"0 cached \\+ {context + 1} new tokens exceed the context of {context}"):
        model.forward(ids)
    cache = model.new_cache()
    model.forward(ids[: context - 1], cache=cache)
    last = model.forward(ids[context - 1 : context], cache=cache)
    assert relative_error(last, theirs[-1:]) < LOGIT_TOLERANCE
    with pytest.raises(MinimoeError, match=f"{context} cached \\+ 1 new tokens exceed"):
        model.forward(ids[context:], cache=cache)


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=46), "prompt of 3 tokens \\+ 46 new tokens exceeds the context of 48"),
    (dict(max_new_tokens=2, temperature=-1), "temperature must be a finite number >= 0"),
    (dict(max_new_tokens=2, temperature=float("nan")), "temperature must be a finite number >= 0"),
    (dict(max_new_tokens=2, top_k=0), "top_k must be >= 1"),
    (dict(max_new_tokens=2, top_p=1.5), "top_p must be in \\(0, 1\\]"),
    (dict(max_new_tokens=2, top_p=float("nan")), "top_p must be in \\(0, 1\\]"),
    (dict(max_new_tokens=-1), "max_new_tokens must be a non-negative integer"),
    (dict(max_new_tokens=2, temperature=1.0, seed=-1), "seed must be a non-negative integer"),
    (dict(max_new_tokens=2, stop_strings=[""]), "stop_strings must be non-empty"),
    (dict(max_new_tokens=2, stop_strings=["x"]), "stop_strings need a tokenizer"),
])
def test_bad_generation_arguments(model, kwargs, message):
    with pytest.raises(MinimoeError, match=message):
        model.generate([5, 6, 7], **kwargs)
