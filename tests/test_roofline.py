"""The roofline's arithmetic, on a config small enough to count by hand (no timing here)."""

from __future__ import annotations

import numpy as np
import pytest

from minimoe import ModelConfig
from minimoe.tools import roofline
from minimoe.tools.roofline import Rates

# 1 sparse layer: hidden 4 (2 heads of 2), 2 experts of width 3 (top-1), a shared expert of 6, vocab 10.
CONFIG = ModelConfig.from_dict(dict(
    model_type="qwen2_moe", vocab_size=10, hidden_size=4, num_hidden_layers=1, num_attention_heads=2,
    num_key_value_heads=2, intermediate_size=8, max_position_embeddings=16, num_experts=2, num_experts_per_tok=1,
    moe_intermediate_size=3, shared_expert_intermediate_size=6))
LOADS = [np.array([2, 0])]  # both tokens went to expert 0; expert 1 is never read


def test_work_lists_every_matrix_once_with_its_tokens():
    work = roofline.prefill_work(CONFIG, tokens=2, loads=LOADS, small_elements=0)
    names = [w.name for w in work]
    assert names == ["layer 0 q", "layer 0 k", "layer 0 v", "layer 0 o", "layer 0 router",
                     "layer 0 expert 0.gate", "layer 0 expert 0.up", "layer 0 expert 0.down",
                     "layer 0 shared expert.gate", "layer 0 shared expert.up", "layer 0 shared expert.down",
                     "layer 0 shared gate", "lm_head"]
    q = work[0]
    assert (q.rows, q.cols, q.tokens, q.flops, q.upcast_bytes) == (4, 4, 2, 2 * 2 * 16, 16 * 2)


def test_roofline_by_hand_bandwidth_bound():
    """At 1 FLOP/s and 0.25 byte/s every bf16 matrix is bound by streaming its 2 bytes an element."""
    elements = 4 * 16 + 2 * 4 + 3 * 12 + 3 * 24 + 1 * 4 + 10 * 4  # q k v o, router, expert 0, shared, gate, head
    # ... except the router and shared gate, float32 from load (small matrices; here: up to 8 elements): GEMM only.
    line = roofline.roofline(CONFIG, 2, LOADS, Rates(gemm_flops=1, copy_bytes=0.25, cast_bytes=1e12), small_elements=8)
    small_flops = 2 * 2 * (2 * 4) + 2 * 2 * 4
    assert line.bandwidth_s == pytest.approx(2 * (elements - 2 * 4 - 4) / 0.25)
    assert line.matmul_s == pytest.approx(small_flops)
    assert line.attention_s == pytest.approx(1 * 2 * 2 * 2 * 2 * 2 * 2)  # layers * 2 * 2 * T * T * heads * head_dim
    assert line.tokens_per_s == pytest.approx(2 / (line.matmul_s + line.bandwidth_s + line.attention_s))


def test_roofline_by_hand_compute_bound():
    """With free memory traffic, the roofline is the FLOPs: 2 * tokens * elements of every matrix, plus attention."""
    elements = 4 * 16 + 2 * 4 + 3 * 12 + 3 * 24 + 1 * 4 + 10 * 4
    line = roofline.roofline(CONFIG, 2, LOADS, Rates(gemm_flops=1, copy_bytes=1e12, cast_bytes=1e12), small_elements=8)
    assert line.matmul_s == pytest.approx(2 * 2 * elements) and line.bandwidth_s == pytest.approx(0, abs=1e-6)
    assert line.seconds == pytest.approx(2 * 2 * elements + 64)


def test_cast_bound_roofline_streams_the_weights_at_the_cast_rate():
    """``cast_bound``: every bf16 matrix streams its 2 bytes an element at ``cast_bytes``, not ``copy_bytes``."""
    bf16_elements = 4 * 16 + 3 * 12 + 3 * 24 + 10 * 4  # q k v o, expert 0, shared, head (router, gate: float32)
    line = roofline.roofline(CONFIG, 2, LOADS, Rates(gemm_flops=1, copy_bytes=0.25, cast_bytes=0.125),
                             small_elements=8, cast_bound=True)
    assert line.bandwidth_s == pytest.approx(2 * bf16_elements / 0.125)
    assert line.matmul_s == pytest.approx(2 * 2 * (2 * 4) + 2 * 2 * 4)  # the router and the shared gate
    assert line.attention_s == pytest.approx(1 * 2 * 2 * 2 * 2 * 2 * 2)


def test_float32_weights_need_no_upcast():
    line = roofline.roofline(CONFIG, 2, LOADS, Rates(gemm_flops=1e12, copy_bytes=1, cast_bytes=1), stored_bytes=4, small_elements=0)
    assert line.bandwidth_s == 0


def test_expert_loads_count_tokens_per_expert_and_skip_padding():
    ids = np.array([[[0, 2], [2, -1], [2, 1]]])  # [S=1, T=3, k=2], -1 = padding of a per-layer k
    assert roofline.expert_loads(ids, 4)[0].tolist() == [1, 1, 3, 0]
