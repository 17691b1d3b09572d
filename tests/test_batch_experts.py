"""How many experts a batch of tokens touches: the uniform-routing formula and the measurement on traces.

``expected_distinct_experts`` is held against an exact enumeration and a Monte-Carlo simulation of a
uniform router; ``distinct_experts_per_batch`` against routings whose answer is known by hand, and
against the formula on a trace routed uniformly at random.
"""

from __future__ import annotations

from itertools import combinations, product

import numpy as np
import pytest

from minimoe import MinimoeError
from minimoe.inspect.analysis import distinct_experts_per_batch, expected_distinct_experts
from test_analysis import make_trace


def uniform_choices(rng: np.random.Generator, tokens: int, num_experts: int, top_k: int) -> np.ndarray:
    """``[tokens, k]``: each token's k distinct experts, every set of k equally likely."""
    return np.argsort(rng.random((tokens, num_experts)), axis=1)[:, :top_k]


@pytest.mark.parametrize("num_experts,top_k,batch", [(4, 2, 1), (4, 2, 2), (5, 2, 3), (6, 3, 2)])
def test_formula_against_exact_enumeration(num_experts, top_k, batch):
    sets = list(combinations(range(num_experts), top_k))
    exact = np.mean([len(set().union(*chosen)) for chosen in product(sets, repeat=batch)])
    np.testing.assert_allclose(expected_distinct_experts(num_experts, top_k, batch), exact, rtol=1e-12)


def test_formula_against_monte_carlo_at_qwen_shape():
    rng = np.random.default_rng(0)
    draws, batches = 2000, np.array([1, 8, 32, 64])
    for batch in batches:
        counts = [len(np.unique(uniform_choices(rng, batch, 60, 4))) for _ in range(draws)]
        standard_error = np.std(counts) / np.sqrt(draws) + 1e-9
        assert abs(np.mean(counts) - expected_distinct_experts(60, 4, batch)) < 5 * standard_error + 1e-6, batch
    np.testing.assert_allclose(expected_distinct_experts(60, 4, batches),
                               [expected_distinct_experts(60, 4, b) for b in batches])  # arrays as ints


def test_a_batch_of_tokens_that_all_choose_the_same_experts_touches_only_those():
    trace = make_trace([[[3, 7]] * 20], num_experts=10)
    result = distinct_experts_per_batch(trace, [1, 5, 20], draws=10)
    np.testing.assert_array_equal(result.distinct, [[2, 2, 2]])
    np.testing.assert_allclose(result.uniform, expected_distinct_experts(10, 2, np.array([1, 5, 20])))


def test_the_whole_pool_touches_every_expert_any_token_chose_and_padding_is_no_expert():
    first = make_trace([[[0, 1], [2, 3], [0, 2]], [[5, -1], [5, 4], [4, -1]]], num_experts=6)
    second = make_trace([[[1, 0]], [[5, 3]]], num_experts=6)
    result = distinct_experts_per_batch([first, second], [1, 4], draws=5)  # 4 = every token pooled
    np.testing.assert_array_equal(result.distinct[:, 1], [4, 3])  # layer 0: {0,1,2,3}; layer 1: {3,4,5}
    assert (result.distinct[1, 0] >= 1) and (result.distinct[:, 0] <= 2).all()


def test_uniformly_routed_tokens_follow_the_formula():
    rng = np.random.default_rng(1)
    choices = uniform_choices(rng, 4000, 60, 4)
    trace = make_trace([choices.tolist()], num_experts=60)
    result = distinct_experts_per_batch(trace, [1, 4, 16, 64], draws=400, seed=2)
    np.testing.assert_allclose(result.distinct[0], result.uniform, rtol=0.03)


def test_batch_sizes_are_checked():
    trace = make_trace([[[0, 1]] * 3], num_experts=4)
    for sizes in ([0], [4], []):
        with pytest.raises(MinimoeError, match="batch sizes"):
            distinct_experts_per_batch(trace, sizes)
