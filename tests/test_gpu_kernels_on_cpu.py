"""The CUDA kernels' own code, run on a CPU (tests/cuda_on_cpu.py), held to the NumPy functions they replace.

Tiny shapes: every CUDA thread is a std::thread here.  The same checks run at the real
model's shapes on a GPU in ``python -m minimoe.gpu_check``.
"""

from __future__ import annotations

import numpy as np
import pytest

import minimoe
from minimoe import gpu_check

from conftest import FIXTURES
import cuda_on_cpu

pytestmark = pytest.mark.skipif(cuda_on_cpu.unavailable_reason() is not None,
                                reason=f"kernels not compiled for the CPU: {cuda_on_cpu.unavailable_reason()}")

TINY = dict(hidden=64, heads=4, head_dim=16, experts=12, moe_intermediate=24, shared_intermediate=40, top_k=3,
            vocab=300)


@pytest.fixture
def inputs(monkeypatch):
    cuda_on_cpu.install(monkeypatch)
    import cupy  # the NumPy stand-in

    return gpu_check.Inputs(cupy, np.random.default_rng(0), TINY)


def assert_passed(checks):
    assert checks and [(c.name, c.error) for c in checks if not c.passed] == []


def test_norms_and_swiglu(inputs):
    assert_passed(gpu_check.check_norms(inputs) + gpu_check.check_silu_mul(inputs))


@pytest.mark.parametrize("heads, kv_heads, tokens, start", [(4, 4, 6, 0), (4, 2, 5, 3)])
def test_rope_store_kv_and_attention(inputs, heads, kv_heads, tokens, start):
    assert_passed(gpu_check.check_rope_and_attention(inputs, heads, kv_heads, tokens, start))


@pytest.mark.parametrize("tokens", [2, 10])  # GEMV (decode) and GEMM (prefill) paths
def test_router_dispatch_grouped_matmul_and_combine(inputs, tokens):
    experts = gpu_check.bf16_matrix(inputs.rng, (TINY["experts"], 2 * TINY["moe_intermediate"], TINY["hidden"]))
    assert_passed(gpu_check.check_moe(inputs, tokens, experts))


def test_router_ties_take_the_lower_expert_id_first(inputs):
    assert_passed(gpu_check.check_router_ties(inputs, 40))


def test_rows_with_no_usable_logit_never_index_out_of_range(inputs):
    assert_passed(gpu_check.check_unusable_router_rows(inputs))


@pytest.mark.parametrize("tokens", [3, 70])
def test_bf16_linear(inputs, tokens):
    assert_passed(gpu_check.check_linear(inputs, 40, tokens, bias=True))


def test_a_fixture_model_prefill_and_decode_match_numpy(monkeypatch):
    cuda_on_cpu.install(monkeypatch)
    cpu, gpu = minimoe.load(FIXTURES / "moe_gqa"), minimoe.load(FIXTURES / "moe_gqa", backend="cupy")
    ids = np.arange(10) * 7 % cpu.config.vocab_size
    assert gpu_check.relative_error(gpu.forward(ids), cpu.forward(ids)) < 1e-5  # 10 tokens: the GEMM path
    caches = cpu.new_cache(), gpu.new_cache()
    cpu.forward(ids[:8], cache=caches[0]), gpu.forward(ids[:8], cache=caches[1])
    for position in (8, 9):  # decode: GEMV and the decode attention kernel, over the cache rope_store_kv filled
        step = ids[position : position + 1]
        assert gpu_check.relative_error(gpu.forward(step, cache=caches[1]), cpu.forward(step, cache=caches[0])) < 1e-5
