"""The CUDA kernels' own code, run on a CPU (tests/cuda_on_cpu.py), held to the NumPy functions they replace.

Every CUDA thread is a std::thread here, so the shapes are small -- but chosen so that no size is a
multiple of the block it is split into (a kernel dividing by its block size instead of the real size
fails), and, where the CPU can afford it, at the real model's sizes (hidden 2048, 16 heads of 128,
60 experts, top-4, moe_intermediate 1408).  ``python -m minimoe.gpu_check`` runs the same checks at
the real shapes throughout on a GPU.
"""

from __future__ import annotations

import numpy as np
import pytest

import minimoe
from minimoe.tools import gpu_check

from conftest import FIXTURES
import cuda_on_cpu

pytestmark = pytest.mark.skipif(cuda_on_cpu.unavailable_reason() is not None,
                                reason=f"kernels not compiled for the CPU: {cuda_on_cpu.unavailable_reason()}")

# Sizes that are no multiple of the blocks they are cut into: hidden 72 (the norm's block is 96
# threads, the GEMM's k-steps 16, the GEMV's lanes 32 x 8), head_dim 20 (lanes hold dims lane,
# lane + 32), 12 experts (a warp holds 32), matmul outputs 40 and 48 (tiles of 64, GEMV blocks of 8).
TINY = dict(hidden=72, heads=4, head_dim=20, experts=12, moe_intermediate=24, shared_intermediate=40, top_k=3,
            vocab=300)
# The real model's sizes where a thread per CUDA thread stays cheap; only the expert and shared
# widths are cut (their matmuls would start ~10^5 threads).
NEAR_REAL = gpu_check.REAL_SHAPES | dict(moe_intermediate=24, shared_intermediate=40, vocab=300)


def make_inputs(monkeypatch, shapes):
    cuda_on_cpu.install(monkeypatch)
    import cupy  # the NumPy stand-in

    return gpu_check.Inputs(cupy, np.random.default_rng(0), shapes)


@pytest.fixture
def inputs(monkeypatch):
    return make_inputs(monkeypatch, TINY)


@pytest.fixture
def near_real(monkeypatch):
    return make_inputs(monkeypatch, NEAR_REAL)


def assert_passed(checks):
    assert checks and [(c.name, c.error) for c in checks if not c.passed] == []


def test_norms(inputs):
    assert_passed(gpu_check.check_norms(inputs))


def test_norms_at_real_width(monkeypatch):
    inputs = make_inputs(monkeypatch, gpu_check.REAL_SHAPES)  # hidden 2048
    assert_passed(gpu_check.check_norms(inputs, rows=3))


@pytest.mark.parametrize("heads, kv_heads, tokens, start", [(4, 4, 6, 0), (4, 2, 5, 3)])
def test_rope_store_kv_and_attention(inputs, heads, kv_heads, tokens, start):
    assert_passed(gpu_check.check_rope_and_attention(inputs, heads, kv_heads, tokens, start))


def test_rope_store_kv_and_attention_at_real_heads(near_real):
    assert_passed(gpu_check.check_rope_and_attention(near_real, 16, 16, 3, 2))


@pytest.mark.parametrize("heads, kv_heads, keys, batch", [(2, 1, 300, 2), (1, 1, 3000, 1)])  # 5 and 47 splits per head
def test_flash_decoding_over_a_long_cache(inputs, heads, kv_heads, keys, batch):
    assert_passed(gpu_check.check_decode_attention(inputs, heads, kv_heads, keys, batch))


@pytest.mark.parametrize("tokens", [1, 2, 10])  # one-row GEMV (decode), GEMV and GEMM (prefill) paths
def test_router_dispatch_grouped_matmul_and_combine(inputs, tokens):
    experts = gpu_check.bf16_matrix(inputs.rng, (TINY["experts"], 2 * TINY["moe_intermediate"], TINY["hidden"]))
    assert_passed(gpu_check.check_moe(inputs, tokens, experts))


def test_the_moe_chain_at_real_hidden_experts_and_top_k(near_real):
    experts = gpu_check.bf16_matrix(near_real.rng, (60, 2 * NEAR_REAL["moe_intermediate"], 2048))
    assert_passed(gpu_check.check_moe(near_real, 2, experts))  # GEMV; the GEMM at hidden 2048: test_bf16_linear


def test_router_ties_take_the_lower_expert_id_first(inputs):
    assert_passed(gpu_check.check_router_ties(inputs, 40))


def test_router_ties_and_unusable_rows_with_60_experts_top_4(near_real):
    assert_passed(gpu_check.check_router_ties(near_real, 40) + gpu_check.check_unusable_router_rows(near_real))


def test_rows_with_no_usable_logit_never_index_out_of_range(inputs):
    assert_passed(gpu_check.check_unusable_router_rows(inputs))


# 70: not a multiple of 8 (the GEMV's scalar path); 1408: the experts' down projection, 5.5 rounds of the
# warp's 256-wide loads (the GEMV's unrolled loads run past the end), 2 warps per output; 2048: real, 4 warps
# per output; 1030: 2 warps per output on the scalar path
@pytest.mark.parametrize("hidden", [72, 70, 1408, 2048, 1030])
@pytest.mark.parametrize("tokens", [1, 3, 70])
def test_bf16_linear(monkeypatch, hidden, tokens):
    inputs = make_inputs(monkeypatch, TINY | dict(hidden=hidden))
    assert_passed(gpu_check.check_linear(inputs, 40, tokens, bias=True))


# a SwiGLU MLP, its activation formed by the gate/up GEMV (one row and several) or by the down GEMM (70 rows);
# vector and odd widths
@pytest.mark.parametrize("hidden, inter", [(70, 40), (1408, 24), (72, 1408), (2048, 24)])
@pytest.mark.parametrize("tokens", [1, 3, 70])
def test_bf16_swiglu(monkeypatch, hidden, inter, tokens):
    inputs = make_inputs(monkeypatch, TINY | dict(hidden=hidden))
    assert_passed(gpu_check.check_swiglu(inputs, inter, tokens))


def test_a_fixture_model_prefill_and_decode_match_numpy(monkeypatch):
    cuda_on_cpu.install(monkeypatch)
    from minimoe.gpu.decode import GraphDecoder

    cpu, gpu = minimoe.load(FIXTURES / "moe_gqa"), minimoe.load(FIXTURES / "moe_gqa", backend="cupy")
    ids = np.arange(12) * 7 % cpu.config.vocab_size
    assert gpu_check.relative_error(gpu.forward(ids[:10]), cpu.forward(ids[:10])) < 1e-5  # 10 tokens: the GEMM path
    caches = cpu.new_cache(capacity=300), gpu.new_cache(capacity=300)
    cpu.forward(ids[:8], cache=caches[0]), gpu.forward(ids[:8], cache=caches[1])
    for position in (8, 9):  # decode: GEMV and the decode attention kernel, over the cache rope_store_kv filled
        step = ids[position : position + 1]
        assert gpu_check.relative_error(gpu.forward(step, cache=caches[1]), cpu.forward(step, cache=caches[0])) < 1e-5
    # Then GraphDecoder's fixed-buffer step, run eagerly (the CPU has no CUDA graphs): the position read on
    # the device by rope_store_kv and attention_decode, which attends over the whole 300-position cache
    # in 5 splits per head (most of them past position 11: empty).
    decoder = GraphDecoder(gpu, caches[1], capture=False)
    for position in (10, 11):
        got = decoder([ids[position]])
        assert gpu_check.relative_error(got, cpu.forward(ids[position : position + 1], cache=caches[0])) < 1e-5


@pytest.mark.parametrize("unroll", [1, 2, 3])  # 3: the unrolled loads run past the end of a 1408-wide row
def test_the_gemv_gives_the_same_product_at_every_unrolling(monkeypatch, unroll):
    inputs = make_inputs(monkeypatch, TINY | dict(hidden=1408))
    from minimoe.gpu import profile

    with profile.compiled_with(GEMV_UNROLL=unroll):
        assert_passed(gpu_check.check_linear(inputs, 40, 3, bias=True))
