"""Routing analyses on hand-made traces whose answers are known by construction (no model is loaded)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from minimoe import MinimoeError
from minimoe.inspect.analysis import (
    coactivation,
    consecutive_same_expert,
    domain_specialization,
    expert_cache_hit_rate,
    expert_load,
    expert_tokens,
    layer_transitions,
    routing_entropy,
    shared_vs_routed,
    token_ids_for,
    token_routing,
    vocabulary_specialization,
)
from minimoe.layers import load_balancing_loss
from minimoe.inspect.trace import RoutingTrace


def make_trace(expert_ids, num_experts: int, router_probs=None, layers=None, token_ids=None, positions=None,
               shared_gate=None, shared_norm=None, routed_norm=None) -> RoutingTrace:
    """A valid RoutingTrace around ``expert_ids`` ``[S, T, k]`` (a ``[S, T]`` list means k = 1).

    Without ``router_probs`` the chosen experts get logits k, k-1, ..., 1 by rank and
    the others 0, so that the softmax puts them on top in the given order.  Logits are
    ``log(router_probs)`` (-inf where a probability is 0), raw and scaled weights are the
    chosen experts' probabilities; per-token extras default to arange / 0.5 / 1.
    """
    ids = np.asarray(expert_ids, dtype=np.int64)
    if ids.ndim == 2:
        ids = ids[:, :, None]
    num_layers, tokens, k = ids.shape
    if router_probs is None:
        logits = np.zeros((num_layers, tokens, num_experts))
        np.put_along_axis(logits, ids, np.arange(k, 0, -1, dtype=np.float64), axis=-1)
        probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    else:
        probs = np.broadcast_to(np.asarray(router_probs, dtype=np.float64), (num_layers, tokens, num_experts))
    with np.errstate(divide="ignore"):
        logits = np.log(probs)
    raw = np.take_along_axis(probs, ids, axis=-1)
    layers = np.arange(num_layers) if layers is None else np.asarray(layers)

    def per_token(value, default):
        return np.broadcast_to(np.asarray(default if value is None else value, dtype=np.float32),
                               (num_layers, tokens)).copy()

    return RoutingTrace(
        token_ids=np.arange(tokens) if token_ids is None else np.asarray(token_ids),
        positions=np.arange(tokens) if positions is None else np.asarray(positions),
        layers=layers,
        router_logits=logits.astype(np.float32),
        router_probs=probs.astype(np.float32),
        expert_ids=ids,
        raw_weights=raw.astype(np.float32),
        expert_weights=raw.astype(np.float32),
        shared_gate=per_token(shared_gate, 0.5),
        attention_norm=np.ones((int(layers.max()) + 1, tokens), dtype=np.float32),
        shared_norm=per_token(shared_norm, 1.0),
        routed_norm=per_token(routed_norm, 1.0),
        logits=np.zeros((tokens, 3), dtype=np.float32),
        num_experts=num_experts,
        top_k=k,
    )


def pair_01(tokens: int = 5, num_experts: int = 4) -> RoutingTrace:
    """One layer where every token picks experts 0 and 1."""
    return make_trace([[[0, 1]] * tokens], num_experts)


# --- expert_cache_hit_rate -----------------------------------------------------------------

def test_lru_hits_by_hand():
    """Top-1 experts 0 1 0 2 0 1 through caches of 1, 2 and 3 experts, worked out on paper.

    size 1: every request differs from the one before: 0 hits.  size 2: 0 1 [0 hit] 2 (evicts 1)
    [0 hit] 1 (evicts 2): 2 hits.  size 3: only the first 0, 1 and 2 miss: 3 hits.
    """
    hits = expert_cache_hit_rate(make_trace([[0, 1, 0, 2, 0, 1]], num_experts=4), cache_sizes=[1, 2, 3])
    np.testing.assert_allclose(hits.hit_rate, [[0 / 6, 2 / 6, 3 / 6]])
    assert hits.requests == 6


def test_lru_default_sizes_and_every_rank_is_a_request():
    """With k = 2, every token needs 2 experts; at cache size E only the first load of each expert misses."""
    trace = make_trace([[[0, 1], [2, 3], [0, 1], [2, 3]]], num_experts=4)
    hits = expert_cache_hit_rate(trace)
    assert hits.cache_sizes.tolist() == [2, 4]
    # size 2 holds exactly the previous token's pair, which the next token never reuses; size 4 misses 4 of 8
    np.testing.assert_allclose(hits.hit_rate, [[0.0, 0.5]])


def test_lru_each_trace_starts_cold_and_sizes_are_checked():
    one = make_trace([[0, 0, 0]], num_experts=4)
    assert expert_cache_hit_rate([one, one], cache_sizes=[1]).hit_rate[0, 0] == pytest.approx(4 / 6)
    with pytest.raises(MinimoeError, match="at least 1"):
        expert_cache_hit_rate(one, cache_sizes=[0])


# --- expert_load ---------------------------------------------------------------------------

def test_load_of_a_fixed_pair():
    load = expert_load(pair_01(tokens=5))
    np.testing.assert_array_equal(load.counts, [[5, 5, 0, 0]])
    np.testing.assert_allclose(load.share, [[0.5, 0.5, 0, 0]])
    # counts 5,5,0,0: mean 2.5, population std 2.5
    np.testing.assert_allclose(load.cv, [1.0])
    np.testing.assert_allclose(load.max_over_mean, [2.0])


def test_load_of_even_routing_and_pooling():
    # Layer 0 cycles through all 4 experts (even); layer 1 always picks expert 2.
    a = make_trace([[0, 1, 2, 3], [2, 2, 2, 2]], 4)
    b = make_trace([[3, 2, 1, 0], [2, 2, 2, 2]], 4)
    load = expert_load([a, b])
    np.testing.assert_array_equal(load.counts, [[2, 2, 2, 2], [0, 0, 8, 0]])
    np.testing.assert_allclose(load.share.sum(axis=1), [1, 1])
    np.testing.assert_allclose(load.cv, [0.0, np.sqrt(3)])  # counts 0,0,8,0: mean 2, std sqrt(12)
    np.testing.assert_allclose(load.max_over_mean, [1.0, 4.0])
    np.testing.assert_array_equal(expert_load(a).counts, expert_load([a]).counts)  # one trace = a list of one


def test_balance_loss_known_values():
    uniform = make_trace([[[0, 1]] * 6], 8, router_probs=np.full(8, 1 / 8))
    np.testing.assert_allclose(expert_load(uniform).balance_loss, [2.0], rtol=1e-6)  # k
    # All probability on expert 0 (the others disabled): f_0 = 1, P_0 = 1, loss = E * 1 * 1.
    collapsed = make_trace([[0] * 5], 4, router_probs=[1.0, 0, 0, 0])
    np.testing.assert_allclose(expert_load(collapsed).balance_loss, [4.0], rtol=1e-6)


def test_balance_loss_is_the_transformers_loss_per_layer_pooled_over_traces():
    rng = np.random.default_rng(0)
    traces = []
    for tokens in (7, 4):
        logits = rng.normal(size=(3, tokens, 6))
        probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
        ids = np.argsort(-probs, axis=-1)[:, :, :2]
        traces.append(make_trace(ids, 6, router_probs=probs))
    loss = expert_load(traces).balance_loss
    for s in range(3):
        pooled = np.concatenate([t.router_logits[s] for t in traces])
        assert loss[s] == pytest.approx(load_balancing_loss(np, [pooled], 6, 2), rel=1e-6)
    assert len(set(np.round(loss, 6))) == 3  # really one loss per layer, not one for all


# --- routing_entropy ----------------------------------------------------------------------------

def test_entropy_of_a_uniform_router():
    result = routing_entropy([make_trace([[[0, 1]] * 3] * 2, 8, router_probs=np.full(8, 1 / 8)),
                              make_trace([[[2, 3]] * 2] * 2, 8, router_probs=np.full(8, 1 / 8))])
    assert result.entropy.shape == (2, 5)  # [S, tokens of both traces]
    np.testing.assert_allclose(result.entropy, np.log(8), rtol=1e-6)
    np.testing.assert_allclose(result.mean_entropy, [np.log(8)] * 2, rtol=1e-6)
    assert result.max_entropy == pytest.approx(np.log(8))
    np.testing.assert_allclose(result.top1_mass, [1 / 8] * 2, rtol=1e-6)
    np.testing.assert_allclose(result.topk_mass, [2 / 8] * 2, rtol=1e-6)


def test_entropy_with_zero_probability_experts():
    # Token 0 is certain (entropy 0), token 1 splits evenly over two experts (log 2); the rest are disabled.
    trace = make_trace([[[0, 1], [2, 3]]], 4, router_probs=[[[1.0, 0, 0, 0], [0, 0, 0.5, 0.5]]])
    assert np.isneginf(trace.router_logits).any()
    result = routing_entropy(trace)
    np.testing.assert_allclose(result.entropy, [[0.0, np.log(2)]], atol=1e-7)
    np.testing.assert_allclose(result.mean_entropy, [np.log(2) / 2], rtol=1e-6)
    np.testing.assert_allclose(result.top1_mass, [0.75])
    np.testing.assert_allclose(result.topk_mass, [1.0])


# --- coactivation ---------------------------------------------------------------------------

def test_coactivation_of_a_fixed_pair():
    matrix = coactivation(pair_01())
    expected = np.zeros((1, 4, 4))
    expected[0, :2, :2] = 1  # 0 and 1 always together; 2 and 3 never chosen: zero rows, not NaN
    np.testing.assert_array_equal(matrix, expected)


def test_coactivation_is_conditional_and_asymmetric():
    trace = make_trace([[[0, 1], [0, 2], [1, 0], [3, 0]]], 4)
    matrix = coactivation(trace)[0]
    np.testing.assert_allclose(matrix[0], [1, 0.5, 0.25, 0.25])  # expert 0 chosen 4 times, with 1 twice
    np.testing.assert_allclose(matrix[1], [1, 1, 0, 0])  # expert 1 only ever with 0
    np.testing.assert_allclose(np.diagonal(matrix), [1, 1, 1, 1])


# --- consecutive_same_expert -----------------------------------------------------------------

@pytest.mark.parametrize("top1, rate", [([0, 1, 0, 1], 0.0), ([0, 0, 0, 1], 2 / 3), ([2, 2, 2, 2], 1.0)])
def test_consecutive_top1_rate(top1, rate):
    result = consecutive_same_expert(make_trace([top1], 8))
    np.testing.assert_allclose(result.top1_rate, [rate])
    assert result.chance_uniform == pytest.approx(1 / 8)


def test_consecutive_pairs_never_cross_traces():
    # Within each trace: (0,0) same, (0,1) not.  Counting across the boundary would add (0,0): 2/3.
    # The second trace's positions even continue the first's: the list, not the positions, separates them.
    result = consecutive_same_expert([make_trace([[0, 0]], 4), make_trace([[0, 1]], 4, positions=[2, 3])])
    np.testing.assert_allclose(result.top1_rate, [0.5])
    # q = (3/4, 1/4) over all four tokens
    np.testing.assert_allclose(result.chance_given_load, [0.75**2 + 0.25**2])


def test_consecutive_pairs_follow_positions():
    # Two sequences in one trace (positions restart): the pair (1, 2) is not adjacent.
    trace = make_trace([[0, 0, 1, 1]], 4, positions=[0, 1, 0, 1])
    np.testing.assert_allclose(consecutive_same_expert(trace).top1_rate, [1.0])


def test_consecutive_topk_overlap():
    # {0,1}->{1,2} share expert 1; {1,2}->{3,0} share none; {3,0}->{0,2} share 0 (at another rank).
    trace = make_trace([[[0, 1], [1, 2], [3, 0], [0, 2]]], 4)
    result = consecutive_same_expert(trace)
    np.testing.assert_allclose(result.topk_overlap, [2 / 3])
    np.testing.assert_allclose(result.top1_rate, [0.0])
    np.testing.assert_allclose(result.chance_given_load, [0.25 + 0.0625 + 0.0625])  # top-1 0,1,3,0


def test_consecutive_needs_a_pair():
    with pytest.raises(MinimoeError, match="two consecutive"):
        consecutive_same_expert([make_trace([[0]], 4), make_trace([[1]], 4)])


# --- vocabulary_specialization --------------------------------------------------------------

def test_vocabulary_of_each_expert():
    tokens = [5, 5, 7, 5, 9, 7, 4]
    # Decoder layers 1 and 3 are sparse; layer 1's routing is a decoy (all to expert 3).
    trace = make_trace([[3] * 7, [2, 2, 2, 2, 1, 0, 1]], 4, layers=[1, 3], token_ids=tokens)
    vocab = vocabulary_specialization(trace, layer=3)
    assert [v.expert for v in vocab] == [0, 1, 2, 3]
    by_expert = {v.expert: (v.token_ids.tolist(), v.counts.tolist(), v.exclusivity.tolist()) for v in vocab}
    assert by_expert[2] == ([5, 7], [3, 1], [1.0, 0.5])  # every 5 goes to expert 2, one of the two 7s
    assert by_expert[0] == ([7], [1], [0.5])
    assert by_expert[1] == ([4, 9], [1, 1], [1.0, 1.0])  # a tie: the smaller id first
    assert by_expert[3] == ([], [], [])  # never chosen in layer 3
    assert vocabulary_specialization(trace, layer=1)[3].token_ids.tolist() == [5, 7, 4, 9]
    assert vocabulary_specialization(trace, layer=3, top=1)[2].token_ids.tolist() == [5]


def test_vocabulary_counts_every_rank_and_pools():
    a = make_trace([[[0, 1], [1, 0]]], 2, token_ids=[8, 8])
    b = make_trace([[[1, 0]]], 2, token_ids=[6])
    vocab = vocabulary_specialization([a, b], layer=0)
    assert vocab[0].token_ids.tolist() == [8, 6] and vocab[0].counts.tolist() == [2, 1]
    np.testing.assert_allclose(vocab[0].exclusivity, [1.0, 1.0])  # k = 2: every token reaches both experts


def test_vocabulary_rejects_bad_layer_and_top():
    trace = make_trace([[0, 1]], 2, layers=[1])
    with pytest.raises(MinimoeError, match="not a sparse layer"):
        vocabulary_specialization(trace, layer=0)
    with pytest.raises(MinimoeError, match="top"):
        vocabulary_specialization(trace, layer=1, top=0)


def test_expert_tokens_is_one_experts_vocabulary():
    trace = make_trace([[2, 2, 2, 2, 1, 0, 1]], 4, layers=[3], token_ids=[5, 5, 7, 5, 9, 7, 4])
    two = expert_tokens(trace, 3, 2)
    assert (two.expert, two.token_ids.tolist(), two.counts.tolist(), two.exclusivity.tolist()) == (
        2, [5, 7], [3, 1], [1.0, 0.5])
    with pytest.raises(MinimoeError, match=r"expert 4 is outside \[0, 4\)"):
        expert_tokens(trace, 3, 4)


# --- token_routing -----------------------------------------------------------------------------

def test_token_routing_by_hand():
    # Token 5 occurs at positions 0, 2, 4; k = 2, two sparse layers (decoder layers 0 and 2).
    expert_ids = [
        [[1, 0], [3, 2], [1, 2], [0, 1], [3, 1], [2, 0]],  # layer 0: token 5 -> (1,0) (1,2) (3,1)
        [[2, 3], [0, 1], [2, 3], [1, 2], [2, 3], [3, 0]],  # layer 2: token 5 -> (2,3) three times
    ]
    trace = make_trace(expert_ids, 4, layers=[0, 2], token_ids=[5, 7, 5, 8, 5, 7],
                       router_probs=[0.1, 0.2, 0.3, 0.4])  # every token the same probabilities
    trace = dataclasses.replace(trace, tokens=["a", "b", "a", "c", "a", "b"])
    five = token_routing(trace, 5)
    assert (five.token_id, five.text, five.occurrences) == (5, "a", 3)
    assert five.counts.tolist() == [[1, 3, 1, 1], [0, 0, 3, 3]]
    assert five.top1_counts.tolist() == [[0, 2, 0, 1], [0, 0, 3, 0]]
    assert five.top1_expert.tolist() == [1, 2]
    np.testing.assert_allclose(five.top1_consistency, [2 / 3, 1.0])
    # A weight is the expert's router probability here, so each chosen expert's mean weight is its probability.
    np.testing.assert_allclose(five.mean_weight, [[0.1, 0.2, 0.3, 0.4], [0, 0, 0.3, 0.4]], rtol=1e-6)
    np.testing.assert_array_equal(five.layers, [0, 2])


def test_token_routing_of_an_absent_token_and_pooled_traces():
    a = make_trace([[0, 1, 0]], 2, token_ids=[4, 4, 6])
    b = make_trace([[1, 1]], 2, token_ids=[4, 9])
    four = token_routing([a, b], 4)
    assert four.occurrences == 3 and four.counts.tolist() == [[1, 2]] and four.top1_expert.tolist() == [1]
    absent = token_routing([a, b], 99, text="x")
    assert (absent.occurrences, absent.text) == (0, "x") and absent.top1_expert.tolist() == [-1]
    assert absent.top1_consistency.tolist() == [0.0] and absent.mean_weight.tolist() == [[0.0, 0.0]]  # no NaN


class WordTokenizer:
    """A vocabulary of whole pieces: a text is one token if listed, else one token per character."""

    VOCAB = {"def": 10, " def": 11, " self": 12, "\n": 13, "s": 20, "e": 21, "l": 22, "f": 23, " ": 24}

    def encode(self, text):
        return [self.VOCAB[text]] if text in self.VOCAB else [self.VOCAB[ch] for ch in text]

    def decode(self, ids):
        return "".join(self.token_texts(ids))

    def token_texts(self, ids):
        names = {v: k for k, v in self.VOCAB.items()}
        return [names[i] for i in ids]


@pytest.mark.parametrize("query, ids", [
    ("def", [10, 11]),  # no leading space: both spellings
    (" def", [11]),  # a leading space: exactly that one
    ("self", [12]),  # "self" is not one token, " self" is
    ("\n", [13]),
    (42, [42]),  # an id as is
])
def test_token_ids_for_follows_the_leading_space_rule(query, ids):
    assert token_ids_for(WordTokenizer(), query) == ids


def test_token_ids_for_a_text_of_several_tokens_says_how_it_splits():
    with pytest.raises(MinimoeError, match=r"'elf' is not one token of this vocabulary \('elf' -> \['e', 'l', 'f'\]"):
        token_ids_for(WordTokenizer(), "elf")
    with pytest.raises(MinimoeError, match="empty"):
        token_ids_for(WordTokenizer(), "")


# --- domain_specialization -------------------------------------------------------------------

def test_domain_ratio():
    code = make_trace([[3] * 6, [3] * 6], 4)  # only expert 3
    prose = [make_trace([[0, 1, 2, 3], [3, 2, 1, 0]], 4), make_trace([[1, 0, 3, 2], [0, 1, 2, 3]], 4)]
    result = domain_specialization({"code": code, "prose": prose})
    assert result.domains == ["code", "prose"]
    assert result.share.shape == result.ratio.shape == (2, 2, 4)
    np.testing.assert_allclose(result.ratio[0], [[0, 0, 0, 4], [0, 0, 0, 4]])  # E at expert 3
    np.testing.assert_allclose(result.ratio[1], np.ones((2, 4)))  # uniform
    np.testing.assert_allclose(result.share[0, :, 3], [1, 1])


def test_domains_must_share_a_model():
    with pytest.raises(MinimoeError, match="different models"):
        domain_specialization({"a": make_trace([[0]], 4), "b": make_trace([[0]], 5)})
    with pytest.raises(MinimoeError):
        domain_specialization({})


# --- layer_transitions ----------------------------------------------------------------------

def test_transitions_of_a_deterministic_mapping():
    top1 = np.arange(8) % 4
    trace = make_trace([top1, (top1 + 1) % 4, np.zeros(8, int)], 4, layers=[0, 2, 5])
    shift = np.roll(np.eye(4), 1, axis=1)  # row i has its 1 at (i + 1) % 4
    np.testing.assert_array_equal(layer_transitions(trace, 0, 2), shift)
    np.testing.assert_array_equal(layer_transitions(trace, 2, 0), shift.T)  # the inverse permutation
    np.testing.assert_array_equal(layer_transitions(trace, 0, 5), np.tile([[1, 0, 0, 0]], (4, 1)))
    with pytest.raises(MinimoeError, match="not a sparse layer"):
        layer_transitions(trace, 0, 1)


def test_transitions_are_row_normalised_with_zero_rows():
    # From layer 0 expert 0: twice to 1, once to 2.  Expert 3 is never top-1 at layer 0.
    trace = make_trace([[[0, 3], [0, 3], [0, 3], [1, 3]], [[1, 0], [1, 0], [2, 0], [1, 0]]], 4)
    matrix = layer_transitions(trace, 0, 1)
    np.testing.assert_allclose(matrix[0], [0, 2 / 3, 1 / 3, 0])
    np.testing.assert_allclose(matrix[1], [0, 1, 0, 0])
    np.testing.assert_array_equal(matrix[2:], 0)


# --- shared_vs_routed -----------------------------------------------------------------------

def test_shared_vs_routed():
    trace = make_trace([[0, 1, 2]], 4, shared_gate=[[0.2, 0.6, 0.4]], shared_norm=[[1.0, 1.0, 0.0]],
                       routed_norm=[[3.0, 0.0, 0.0]])
    result = shared_vs_routed(trace)
    np.testing.assert_allclose(result.mean_shared_gate, [0.4], rtol=1e-6)
    np.testing.assert_allclose(result.mean_shared_norm, [2 / 3], rtol=1e-6)
    np.testing.assert_allclose(result.mean_routed_norm, [1.0], rtol=1e-6)
    # per token 1/4, 1, and 0 for 0/0; the ratio of the means would be 0.4
    np.testing.assert_allclose(result.shared_fraction, [(0.25 + 1.0 + 0.0) / 3], rtol=1e-6)


# --- input validation ------------------------------------------------------------------------

EVERY_FUNCTION = [
    expert_load, routing_entropy, coactivation, consecutive_same_expert, shared_vs_routed, expert_cache_hit_rate,
    lambda traces: vocabulary_specialization(traces, layer=0),
    lambda traces: expert_tokens(traces, 0, 1),
    lambda traces: token_routing(traces, 0),
    lambda traces: layer_transitions(traces, 0, 0),
    lambda traces: domain_specialization({"only": traces}),
]


@pytest.mark.parametrize("function", EVERY_FUNCTION)
def test_every_function_validates_its_traces(function):
    trace = make_trace([[0, 1]], 4)
    assert function(trace) is not None and function([trace, trace]) is not None
    with pytest.raises(MinimoeError, match="no routing traces"):
        function([])
    with pytest.raises(MinimoeError, match="different models"):
        function([trace, make_trace([[0, 1]], 5)])  # other number of experts
    with pytest.raises(MinimoeError, match="different models"):
        function([trace, make_trace([[0, 1]], 4, layers=[1])])  # other sparse layers
    with pytest.raises(MinimoeError, match="experts per token"):
        function([trace, make_trace([[[0, 1], [1, 2]]], 4)])
    with pytest.raises(MinimoeError, match="not a RoutingTrace"):
        function([trace, "trace"])


def test_results_are_frozen():
    load = expert_load(pair_01())
    with pytest.raises(dataclasses.FrozenInstanceError):
        load.cv = np.zeros(1)


# --- one-line summaries ------------------------------------------------------------------------------

def test_a_trace_prints_as_one_line_of_what_it_covers():
    trace = make_trace([[0, 1, 0, 2], [3, 3, 1, 0]], num_experts=4, layers=[1, 3], positions=[7, 8, 9, 10])
    assert repr(trace) == ("RoutingTrace(4 tokens at positions 7..10, sparse layers [1, 3] of 4, 4 experts, top-1, "
                           "interventions: none, logits [4, 3])")
    assert "layers 0..5 of 6" in repr(make_trace([[0]] * 6, num_experts=2))  # a run of layers is written as one
    assert "no logits" in repr(trace.without_logits()) and str(trace) == repr(trace)


def test_the_analyses_print_one_line_with_their_figures():
    trace = make_trace([[[0, 1]] * 4 + [[2, 3]] * 4, [[1, 0]] * 8], num_experts=4)  # 2 layers, 8 tokens, k = 2
    load, entropy = expert_load(trace), routing_entropy(trace)
    results = [load, entropy, consecutive_same_expert(trace), shared_vs_routed(trace),
               expert_cache_hit_rate(trace, cache_sizes=[1, 2]), token_routing(trace, 0, "a"),
               vocabulary_specialization(trace, 0)[0], domain_specialization({"x": [trace], "y": [trace]})]
    for result in results:
        text = repr(result)
        assert text.startswith(type(result).__name__ + "(") and "\n" not in text and len(text) < 300, text
    # the figures are the fields' own: a per-layer field as smallest..largest, a single value as itself
    assert "2 layers x 4 experts, 16 assignments a layer" in repr(load)
    assert f"cv {load.cv.min():.3g}..{load.cv.max():.3g}" in repr(load)
    assert f"at most {np.log(4):.2f} nats" in repr(entropy)
    assert "TokenRouting(token 0 'a', 1 occurrence, 2 layers" in repr(results[5])
