"""Layer functions and model plumbing, each held against an independent, plainer formulation."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import minimoe
from minimoe import MinimoeError, backend, layers
from minimoe.backend import Linear

from conftest import FIXTURES

rng = np.random.default_rng(0)


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32])
@pytest.mark.parametrize("tokens", [1, 3, 40])
def test_linear_blocked_upcast_equals_float32_matmul(monkeypatch, dtype, tokens):
    monkeypatch.setattr(backend, "SMALL_MATRIX_ELEMENTS", 0)
    monkeypatch.setattr(backend, "UPCAST_ELEMENTS", 11 * 24)  # 11-row blocks do not divide 50 rows
    monkeypatch.setattr(backend, "SMALL_GEMM_MNK", 3 * tokens * 24)  # few tokens: 3-row pieces of each block
    weight = rng.standard_normal((50, 24)).astype(dtype)
    bias = rng.standard_normal(50).astype(np.float32)
    x = rng.standard_normal((tokens, 24)).astype(np.float32)
    expected = x.astype(np.float64) @ weight.astype(np.float64).T + bias
    linear = Linear(weight, bias)
    assert linear.weight.dtype == dtype  # kept as stored
    np.testing.assert_allclose(linear(x), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(linear(x.reshape(1, tokens, 24)), expected[None], rtol=1e-5, atol=1e-5)


def test_rope_is_rotate_half_with_positions_from_the_cache():
    """Against the complex-number form: pair (x[i], x[i + D/2]) rotated by angle p * theta^(-2i/D)."""
    head_dim, theta = 8, 10000.0
    positions = np.array([5, 6, 7])
    x = rng.standard_normal((1, 2, 3, head_dim)).astype(np.float32)
    cos, sin = layers.rope_tables(np, positions, head_dim, theta)
    rotated = layers.apply_rope(np, x, cos, sin)
    half = head_dim // 2
    freqs = theta ** (-np.arange(half) * 2.0 / head_dim)
    z = (x[..., :half] + 1j * x[..., half:]) * np.exp(1j * positions[:, None] * freqs)
    np.testing.assert_allclose(rotated, np.concatenate([z.real, z.imag], axis=-1), rtol=1e-5, atol=1e-5)


def test_route_softmax_over_all_then_topk():
    logits = np.array([[0.0, 3.0, 1.0, 2.0], [5.0, 5.5, -1.0, 0.0]], dtype=np.float32)
    probs, ids, weights = layers.route(np, logits, top_k=2, norm_topk_prob=False)[1:4]
    full = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    np.testing.assert_allclose(probs, full, rtol=1e-6)
    assert ids.tolist() == [[1, 3], [1, 0]]  # highest first
    np.testing.assert_allclose(weights, np.take_along_axis(full, ids, -1), rtol=1e-6)
    assert (weights.sum(-1) < 1).all()  # Qwen1.5-MoE: the top-k weights do not sum to 1
    normalised = layers.route(np, logits, top_k=2, norm_topk_prob=True).expert_weights
    np.testing.assert_allclose(normalised.sum(-1), 1.0, rtol=1e-6)


def test_routed_experts_equal_dense_masked_sum():
    """Dispatching tokens per expert gives the same as running every expert on every token."""
    tokens, hidden, inter, num_experts, k = 9, 6, 4, 5, 2
    h = rng.standard_normal((tokens, hidden)).astype(np.float32)
    mlps = [tuple(Linear(rng.standard_normal(shape).astype(np.float32))
                  for shape in ((inter, hidden), (inter, hidden), (hidden, inter))) for _ in range(num_experts)]
    experts = [swiglu_callable(*mlp) for mlp in mlps]
    choice = layers.route(np, rng.standard_normal((tokens, num_experts)).astype(np.float32), k, False)
    ids, weights = choice.expert_ids, choice.expert_weights
    got = layers.routed_experts(np, h, ids, weights, experts)
    expected = np.zeros_like(h)
    for t in range(tokens):
        for slot in range(k):
            gate, up, down = mlps[ids[t, slot]]
            expected[t] += weights[t, slot] * down(layers.silu(np, gate(h[t:t + 1])) * up(h[t:t + 1]))[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def swiglu_callable(gate, up, down):
    """An expert as routed_experts takes it: a one-argument callable."""
    return lambda x: layers.swiglu(np, x, gate, up, down)


class OnlyIndexed:
    """A list of experts that records which ones are looked up and refuses to be scanned."""

    def __init__(self, experts):
        self.experts, self.looked_up = experts, []

    def __getitem__(self, index):
        self.looked_up.append(index)
        return self.experts[index]

    def __iter__(self):
        raise AssertionError("routed_experts scanned every expert")

    def __len__(self):
        raise AssertionError("routed_experts asked for the number of experts")


def test_routed_experts_touch_only_the_chosen_experts():
    """Per-token work must not grow with the number of experts: a token of a 1000-expert layer visits its k."""
    hidden, num_experts, k = 4, 1000, 3
    expert = swiglu_callable(*(Linear(rng.standard_normal(shape).astype(np.float32))
                               for shape in ((2, hidden), (2, hidden), (hidden, 2))))
    experts = OnlyIndexed([expert] * num_experts)
    ids = np.array([[917, 3, 500]])
    layers.routed_experts(np, rng.standard_normal((1, hidden)).astype(np.float32), ids, np.ones((1, k), np.float32), experts)
    assert sorted(experts.looked_up) == [3, 500, 917]


def test_causal_attention_matches_explicit_loop():
    batch, heads, kv_heads, tokens, head_dim, start = 1, 4, 2, 3, 8, 2
    q = rng.standard_normal((batch, heads, tokens, head_dim)).astype(np.float32)
    k = rng.standard_normal((batch, kv_heads, start + tokens, head_dim)).astype(np.float32)
    v = rng.standard_normal((batch, kv_heads, start + tokens, head_dim)).astype(np.float32)
    got = layers.causal_attention(np, q, k, v, query_start=start).reshape(batch, tokens, heads, head_dim)
    for head in range(heads):
        kv = head // (heads // kv_heads)
        for i in range(tokens):
            visible = start + i + 1
            scores = k[0, kv, :visible] @ q[0, head, i] / np.sqrt(head_dim)
            weights = np.exp(scores - scores.max())
            weights /= weights.sum()
            np.testing.assert_allclose(got[0, i, head], weights @ v[0, kv, :visible], rtol=1e-5, atol=1e-6)


def test_load_balancing_loss_on_uniform_routing_is_k():
    """Equal router logits: every expert gets share k/E and probability 1/E, so the loss is k."""
    logits = [np.zeros((8, 4), np.float32)] * 3
    # with all-equal probabilities the top-k choice is arbitrary but always k distinct experts per row
    assert layers.load_balancing_loss(np, logits, num_experts=4, top_k=2) == pytest.approx(2.0)


# --- the model's inputs and cache ------------------------------------------------------------

@pytest.fixture(scope="module")
def model():
    return minimoe.load(FIXTURES / "moe_gqa")


@pytest.mark.parametrize(
    "ids, message",
    [
        ([3, 96, 4], r"token id 96 at position \(1,\) is outside the vocabulary \[0, 96\)"),
        ([[1, 2], [3, -1]], r"token id -1 at position \(1, 1\)"),
        ([], "non-empty"),
        ([[[1]]], "non-empty"),
        ([1.5, 2.0], "must be integers"),
    ],
)
def test_bad_token_ids(model, ids, message):
    with pytest.raises(MinimoeError, match=message):
        model.forward(ids)


def test_prompt_past_the_context(model):
    context = model.config.max_position_embeddings
    model.forward(np.zeros(context, np.int64))  # exactly the context is fine
    with pytest.raises(MinimoeError, match=f"0 cached \\+ {context + 1} new tokens exceed the context of {context}"):
        model.forward(np.zeros(context + 1, np.int64))
    cache = model.new_cache()
    model.forward(np.zeros(context - 1, np.int64), cache=cache)
    model.forward([1], cache=cache)
    with pytest.raises(MinimoeError, match=f"{context} cached \\+ 1 new tokens exceed"):
        model.forward([1], cache=cache)


def test_cache_is_preallocated_and_grows_by_doubling(model):
    cache = model.new_cache(capacity=4)
    model.forward([[1, 2, 3]], cache=cache)
    first = cache.keys[0]
    assert first.shape[2] == 4
    model.forward([[4]], cache=cache)
    assert cache.keys[0] is first  # written in place, no new arrays
    model.forward([[5]], cache=cache)
    assert cache.keys[0].shape[2] == 8 and cache.length == 5
    with pytest.raises(MinimoeError, match="holds a batch of 1 sequences, got a batch of 2"):
        model.forward([[1], [2]], cache=cache)


def test_unknown_backend_is_refused():
    with pytest.raises(MinimoeError, match="unknown backend 'jax'"):
        minimoe.load(FIXTURES / "moe_gqa", backend="jax")


@pytest.mark.parametrize("weight_first_below", [0, 1000], ids=["x @ W.T", "W @ x.T"])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_linear_in_row_blocks_over_threads_equals_a_plain_float32_matmul(monkeypatch, threads, weight_first_below):
    """Blocked upcast + per-thread rows give x @ W.T + b of the float32 weights (rows not a multiple of anything),
    whichever way round the blocks are multiplied."""
    monkeypatch.setattr(backend, "SMALL_MATRIX_ELEMENTS", 0)
    monkeypatch.setattr(backend, "WEIGHT_FIRST_BELOW_TOKENS", weight_first_below)
    monkeypatch.setattr(backend, "UPCAST_ELEMENTS", 5 * 16)  # 5 rows per block
    monkeypatch.setattr(backend, "SMALL_GEMM_MNK", 2 * 6 * 16)  # the 6 tokens multiply 2 rows at a time
    monkeypatch.setattr(backend, "NUM_THREADS", threads)
    for rows in (1, 7, 23, 40):
        weight = rng.standard_normal((rows, 16)).astype(ml_dtypes.bfloat16)
        bias = rng.standard_normal(rows).astype(np.float32)
        x = rng.standard_normal((2, 3, 16)).astype(np.float32)
        expected = x @ weight.astype(np.float32).T + bias
        np.testing.assert_allclose(Linear(weight, bias)(x), expected, rtol=1e-6, atol=1e-6)


def test_linear_blocks_cover_every_row_once_in_upcast_sized_blocks():
    """A real-shape expert matrix: each thread's blocks are at most UPCAST_ELEMENTS, and together every row once."""
    weight = np.zeros((1408, 2048), dtype=ml_dtypes.bfloat16)
    blocks = []
    Linear(weight).in_row_blocks(lambda w, rows: blocks.append((w.shape, rows)))
    covered = sorted(r for _, rows in blocks for r in range(rows.start, rows.stop))
    assert covered == list(range(1408))
    assert all(shape == (rows.stop - rows.start, 2048) for shape, rows in blocks)
    assert max(shape[0] for shape, _ in blocks) == min(backend.UPCAST_ELEMENTS // 2048, -(-1408 // backend.NUM_THREADS))


@pytest.mark.parametrize("tokens", [1, 4, 15])
def test_few_tokens_multiply_in_pieces_under_the_small_gemm_bound(tokens):
    """Below FEW_TOKENS a piece's rows * tokens * in stays within OpenBLAS's small-matrix kernel."""
    rows = backend.small_gemm_rows(tokens, 2048)
    assert rows * tokens * 2048 <= backend.SMALL_GEMM_MNK < (rows + 1) * tokens * 2048


@pytest.mark.parametrize("tokens", [1, 3, 6, 16])
@pytest.mark.parametrize("rows", [1, 2, 5, 11])
def test_weight_first_product_in_stacked_pieces_equals_the_plain_product(monkeypatch, tokens, rows):
    """The stack of pieces and the rows left over give block @ x.T (pieces of 2 rows here)."""
    monkeypatch.setattr(backend, "SMALL_GEMM_MNK", 2 * 6 * 8)
    block = rng.standard_normal((rows, 8)).astype(np.float32)
    x = rng.standard_normal((tokens, 8)).astype(np.float32)
    np.testing.assert_allclose(Linear.weight_first_product(block, x), block @ x.T, rtol=1e-6, atol=1e-6)


def test_parallel_map_inside_a_worker_runs_there():
    """A Linear inside an expert that runs on a worker thread maps its rows in that thread: nested maps
    neither wait on the busy pool (a deadlock with as many tasks as threads) nor fan out further."""
    import threading

    def outer(i):
        here = threading.current_thread()
        inner = backend.parallel_map(lambda j: (threading.current_thread() is here, i * 10 + j), range(3))
        return [same for same, _ in inner], [value for _, value in inner]

    results = backend.parallel_map(outer, range(backend.NUM_THREADS + 2))
    assert all(all(same) for same, _ in results)
    assert [values for _, values in results] == [[i * 10, i * 10 + 1, i * 10 + 2] for i in range(backend.NUM_THREADS + 2)]


def test_routed_experts_on_threads_equal_one_after_another():
    """The NumPy model runs the chosen experts with backend.parallel_map: the same sum as the built-in map."""
    tokens, hidden, inter, num_experts, k = 40, 8, 6, 12, 3
    h = rng.standard_normal((tokens, hidden)).astype(np.float32)
    experts = [swiglu_callable(*(Linear(rng.standard_normal(shape).astype(ml_dtypes.bfloat16))
                                 for shape in ((inter, hidden), (inter, hidden), (hidden, inter))))
               for _ in range(num_experts)]
    choice = layers.route(np, rng.standard_normal((tokens, num_experts)).astype(np.float32), k, False)
    mapped = []

    def recording_map(function, groups):
        mapped.append(len(groups))
        return backend.parallel_map(function, groups)

    threaded = layers.routed_experts(np, h, choice.expert_ids, choice.expert_weights, experts, recording_map)
    sequential = layers.routed_experts(np, h, choice.expert_ids, choice.expert_weights, experts)
    assert mapped == [len(np.unique(choice.expert_ids))]  # one call, one item per chosen expert
    np.testing.assert_array_equal(threaded, sequential)


@pytest.mark.parametrize("parts", [2, 3, 7])
def test_swiglu_split_by_inner_width_equals_the_whole_mlp(monkeypatch, parts):
    """On the CPU an MLP run alone is split into slices of its inner width (rows of gate and up, columns of down),
    one a thread: they add up to the MLP, and the SwiGLU a learner inspects stays its gate, up and down."""
    from minimoe import ops
    from minimoe.model import SwiGLU

    monkeypatch.setattr(backend, "SMALL_MATRIX_ELEMENTS", 0)  # keep the bf16 weights, sliced as views
    monkeypatch.setattr(ops, "NUM_THREADS", parts)
    hidden, inner = 12, 20
    gate, up, down = (rng.standard_normal(shape).astype(ml_dtypes.bfloat16)
                      for shape in ((inner, hidden), (inner, hidden), (hidden, inner)))
    h = rng.standard_normal((5, hidden)).astype(np.float32)
    mlp = SwiGLU(Linear(gate), Linear(up), Linear(down))
    whole = layers.swiglu(np, h, mlp.gate, mlp.up, mlp.down)
    table = ops.Operations()
    split = mlp(table, h)
    slices = table._wide[mlp]
    assert len(slices) == parts and sum(gate_part.shape[0] for gate_part, _, _ in slices) == inner
    assert all(down_part.weight.base is not None for _, _, down_part in slices)  # views of the stored weight
    assert (mlp.gate.weight is gate) and not hasattr(mlp, "slices")  # the MLP itself is unchanged
    # float32 sums in another order: differences of a few ulps of the largest output, not of each element
    np.testing.assert_allclose(split, whole, rtol=1e-5, atol=1e-6 * np.abs(whole).max())
    with pytest.raises(ValueError, match="bias"):
        Linear(down, np.ones(hidden, np.float32)).column_slice(range(0, 4))


@pytest.mark.parametrize("rows, parts", [(1, 2), (7, 2), (23, 3), (40, 16), (5, 1)])
def test_row_ranges_cover_every_row_once_in_near_equal_parts(rows, parts):
    ranges = backend.row_ranges(rows, parts)
    assert [r for piece in ranges for r in piece] == list(range(rows))
    assert len(ranges) == min(rows, parts) and max(map(len, ranges)) - min(map(len, ranges)) <= 1


def test_route_breaks_ties_by_the_lower_expert_id():
    """Integer-valued logits tie often: among equal probabilities the lower expert id is chosen, and comes first.

    The rule is ours (torch.topk's order among ties is implementation-defined); the GPU kernel follows it too.
    """
    logits = rng.integers(-2, 3, size=(500, 16)).astype(np.float32)
    choice = layers.route(np, logits, top_k=4, norm_topk_prob=False)
    for row_logits, ids in zip(logits, choice.expert_ids):
        expected = sorted(range(16), key=lambda e: (-row_logits[e], e))[:4]  # equal logits <=> equal probabilities
        assert ids.tolist() == expected


def test_attention_in_query_chunks_equals_one_pass(monkeypatch):
    """A long prompt attends in chunks of queries (each reading only the keys it may see): same output."""
    model = minimoe.load(FIXTURES / "moe_gqa")
    ids = rng.integers(0, model.config.vocab_size, size=40)
    whole = model.forward(ids)
    monkeypatch.setattr(minimoe.ops, "QUERY_CHUNK", 7)  # 40 tokens: chunks of 7, the last of 5
    np.testing.assert_allclose(model.forward(ids), whole, rtol=1e-5, atol=1e-5)
    cache = model.new_cache()  # and continuing a cache: chunks start after the cached positions
    model.forward(ids[:9], cache=cache)
    np.testing.assert_allclose(model.forward(ids[9:], cache=cache), whole[9:], rtol=1e-5, atol=1e-5)
