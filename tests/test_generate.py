"""Sampling and generation: filters against transformers' logits warpers, draws against the
distribution they define, and stopping rules."""

from __future__ import annotations

import numpy as np
import pytest

import minimoe
from minimoe import MinimoeError
from minimoe.generate import filter_top_k, filter_top_p, next_token_distribution, sample_next

from conftest import FIXTURES, load_reference

torch = pytest.importorskip("torch", reason="the reference warpers need torch + transformers")
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


def test_default_eos_comes_from_generation_config():
    bundled = minimoe.load(minimoe.default_model_path())
    assert bundled.eos_token_ids == [0, 2]


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=46), "prompt of 3 tokens \\+ 46 new tokens exceeds the context of 48"),
    (dict(max_new_tokens=2, temperature=-1), "temperature must be >= 0"),
    (dict(max_new_tokens=2, top_k=0), "top_k must be >= 1"),
    (dict(max_new_tokens=2, top_p=1.5), "top_p must be in \\(0, 1\\]"),
    (dict(max_new_tokens=-1), "max_new_tokens must be a non-negative integer"),
    (dict(max_new_tokens=2, stop_strings=["x"]), "stop_strings need a tokenizer"),
])
def test_bad_generation_arguments(model, kwargs, message):
    with pytest.raises(MinimoeError, match=message):
        model.generate([5, 6, 7], **kwargs)
