"""The GPU kernels' host-side logic, on a CPU: launch shapes and the MoE dispatch bookkeeping in NumPy."""

from __future__ import annotations

import numpy as np
import pytest

from minimoe import MinimoeError, layers
from minimoe.gpu import launch


def test_kernel_constants_are_read_from_the_cu_files():
    assert launch.kernel_constants("matmul.cu") == {"GEMV_WARPS": 8, "GEMV_MAX_ROWS": 8, "GEMV_UNROLL": 2, "TILE_M": 64, "TILE_N": 64,
                                                    "TILE_K": 16, "TILE_PAD": 2, "PATCH": 4}
    assert launch.kernel_constants("moe.cu")["MAX_EXPERTS_PER_LANE"] * 32 >= 60  # Qwen1.5-MoE's experts fit


def test_elementwise_and_norm_launches_cover_every_element():
    for elements in (1, 255, 256, 257, 2048 * 4096):
        (blocks,), (threads,) = launch.elementwise_grid(elements)
        assert blocks * threads >= elements > (blocks - 1) * threads
    assert launch.norm_block(32) == (32,) and launch.norm_block(40) == (64,) and launch.norm_block(2048) == (256,)
    values = launch.kernel_constants("norm.cu")["NORM_VALUES"]
    for hidden in (1004, 2048, 3584, 5000, 8192):  # every value of the row has a thread's register
        (threads,) = launch.norm_block(hidden)
        assert threads % 32 == 0 and threads * values >= hidden and threads <= 1024
    with pytest.raises(MinimoeError, match="rows of up to 8192 values"):
        launch.norm_block(8193)


def test_router_grid_gives_each_token_a_warp_and_rejects_what_the_kernel_cannot_hold():
    (blocks,), (threads,) = launch.router_grid(tokens=9, experts=60, top_k=4)
    assert blocks * threads // 32 >= 9 and threads % 32 == 0
    with pytest.raises(MinimoeError, match="at most 256 experts"):
        launch.router_grid(1, 257, 4)
    with pytest.raises(MinimoeError, match="top_k"):
        launch.router_grid(1, 8, 9)
    with pytest.raises(MinimoeError, match="at most 32 experts per token"):
        launch.router_grid(1, 64, 33)


def test_route_dispatch_block_has_a_warp_per_token_and_a_thread_per_expert():
    assert launch.route_dispatch_block(tokens=1, experts=60) == (64,)
    assert launch.route_dispatch_block(tokens=8, experts=60) == (256,)
    assert launch.route_dispatch_block(tokens=3, experts=200) == (224,)
    with pytest.raises(MinimoeError, match="at most 32 tokens"):
        launch.route_dispatch_block(tokens=33, experts=60)


def test_gemv_grid_has_a_warp_per_output_feature():
    (x, y), (threads,) = launch.gemv_grid(out_features=2816, groups=4)
    assert y == 4 and x * threads // 32 >= 2816 > (x - 1) * threads // 32
    (x, y), (threads,) = launch.gemv_grid(out_features=2048, groups=1, split=4)  # 4 warps per output feature
    assert y == 1 and x * threads // 32 == 4 * 2048


def test_gemv_split_shares_a_short_matrixs_rows_among_warps():
    assert launch.gemv_split(151936, 1, 2048) == 1  # the output head: 18,992 blocks already
    assert launch.gemv_split(2816, 8, 2048) == 1  # eight experts' gate/up: 2,816 blocks
    assert launch.gemv_split(2048, 1, 2048) == 1  # o_proj: 256 blocks
    assert launch.gemv_split(61, 1, 2048) == 4  # the router (8 blocks): no warp reads fewer than 512 inputs
    assert launch.gemv_split(61, 1, 1030) == 2
    assert launch.gemv_split(40, 1, 72) == 1  # too short a row to share


def test_gemm_shared_memory_tiles_are_free_of_bank_conflicts():
    """gemm_grouped's shared-memory accesses, warp by warp, with its constants: each of the 32 banks
    (4-byte words) is hit by at most one distinct address per access (equal addresses are broadcast)."""
    c = launch.kernel_constants("matmul.cu")
    stride, step = c["TILE_M"] + c["TILE_PAD"], c["TILE_M"] // c["PATCH"]

    def conflicts(addresses):  # the n-way conflict of one warp-wide access
        per_bank = {}
        for address in set(addresses):
            per_bank[address % 32] = per_bank.get(address % 32, 0) + 1
        return max(per_bank.values())

    threads = range(c["TILE_M"] * c["TILE_N"] // c["PATCH"] ** 2)
    for warp in range(len(threads) // 32):
        lanes = threads[32 * warp : 32 * warp + 32]
        for first in range(0, c["TILE_M"] * c["TILE_K"], len(threads)):  # staging stores xs[k][r]
            assert conflicts([(i // c["TILE_K"]) + (i % c["TILE_K"]) * stride for i in (first + t for t in lanes)]) == 1
        for k in range(c["TILE_K"]):
            for i in range(c["PATCH"]):  # reads xs[k][tr + step i] and ws[k][tc + step i]
                assert conflicts([k * stride + t // step + step * i for t in lanes]) == 1
                assert conflicts([k * stride + t % step + step * i for t in lanes]) == 1
    assert conflicts([(i // 16) + (i % 16) * 64 for i in range(32)]) == 16  # the unpadded stride this replaced


def test_gemm_schedule_tiles_only_groups_with_rows():
    counts = np.array([0, 130, 1, 0, 64])
    offsets = np.concatenate([[0], np.cumsum(counts)])
    groups, rows = launch.gemm_schedule(counts, offsets)
    assert groups.tolist() == [1, 1, 1, 2, 4]
    assert rows.tolist() == [0, 64, 128, 130, 131]  # the first row of each 64-row tile, in x's numbering
    (x, y), (threads,) = launch.gemm_grid(out_features=2048, tiles=groups.size)
    assert (x, y, threads) == (32, 5, 256)
    empty = launch.gemm_schedule(np.zeros(3, int), np.zeros(4, int))
    assert empty[0].size == 0


def test_attention_launch_fits_shared_memory_and_checks_head_layouts():
    for head_dim in (8, 64, 128, 256):
        grid, block, shared, tile = launch.prefill_attention_launch(tokens=37, heads=16, batch=2, head_dim=head_dim)
        assert shared <= launch.SHARED_MEMORY_BYTES and tile >= 1
        assert grid[0] * block[0] // 32 >= 37 and grid[1:] == (16, 2)
        plan = launch.decode_attention_launch(heads=16, batch=2, head_dim=head_dim, keys=37)
        assert plan.grid == (1, 16, 2) and plan.shared_bytes == plan.block[0] // 32 * (head_dim + 2) * 4
        assert plan.merge_block[0] >= head_dim and plan.merge_grid == (16, 2)
    with pytest.raises(MinimoeError, match="head_dim up to 256"):
        launch.check_attention(16, 16, 512)
    with pytest.raises(MinimoeError, match="do not split evenly"):
        launch.check_attention(6, 4, 64)


def test_check_model_accepts_qwen_moe_and_names_what_does_not_fit():
    import json

    from minimoe import ModelConfig
    from minimoe.config import shipped_configs

    raw = json.loads(shipped_configs()["qwen1.5-moe-a2.7b"].read_text())
    launch.check_model(ModelConfig.from_dict(raw, source="hub"))
    with pytest.raises(MinimoeError, match="at most 256 experts, this model has 300"):
        launch.check_model(ModelConfig.from_dict(raw | {"num_experts": 300}, source="test"))
    with pytest.raises(MinimoeError, match="head_dim up to 256, this model has 512"):
        launch.check_model(ModelConfig.from_dict(raw | {"hidden_size": 8192}, source="test"))


@pytest.mark.parametrize("keys", [1, 255, 256, 257, 1000, 4097, 32768])
@pytest.mark.parametrize("heads, batch", [(16, 1), (16, 8), (2, 1)])
def test_decode_splits_give_every_block_keys_and_stay_near_the_target_grid(keys, heads, batch):
    splits = launch.decode_splits(keys, heads, batch)
    chunk = launch.ceil_div(keys, splits)  # what the kernel gives each block
    assert (splits - 1) * chunk < keys <= splits * chunk  # every key covered, no block empty
    assert splits == 1 or chunk > launch.DECODE_MIN_KEYS_PER_SPLIT // 2  # splitting never starves a block
    assert heads * batch * splits < max(launch.DECODE_TARGET_BLOCKS, heads * batch) + heads * batch


def test_decode_splits_a_long_cache_over_the_gpu_at_batch_1():
    assert launch.decode_splits(50, heads=16, batch=1) == 1  # short: one block per head
    assert launch.decode_splits(577, heads=16, batch=1) == 10  # 160 blocks of 58 keys, not 16 of 577
    assert launch.decode_splits(4000, heads=16, batch=1) == 16  # 256 blocks instead of 16, 250 keys each
    assert launch.decode_splits(4000, heads=16, batch=32) == 1  # enough blocks already


def test_dispatch_block_has_a_thread_per_expert():
    assert launch.dispatch_block(60) == (64,)
    with pytest.raises(MinimoeError, match="at most 1024 experts"):
        launch.dispatch_block(1025)


# --- dispatch bookkeeping --------------------------------------------------------------------------

def random_routing(rng, tokens=11, experts=8, top_k=3):
    probs = layers.softmax(np, rng.standard_normal((tokens, experts)).astype(np.float32))
    choice = layers.route(np, np.log(probs), top_k, norm_topk_prob=False)
    return choice.expert_ids, choice.expert_weights


def test_dispatch_plan_groups_each_experts_slots_contiguously_in_slot_order():
    rng = np.random.default_rng(0)
    ids, _ = random_routing(rng)
    plan = launch.dispatch_plan(ids, 8)
    flat = ids.reshape(-1)
    assert plan.counts.tolist() == np.bincount(flat, minlength=8).tolist()
    assert plan.offsets[0] == 0 and plan.offsets[-1] == flat.size and np.all(np.diff(plan.offsets) == plan.counts)
    for expert in range(8):
        slots = plan.perm[plan.offsets[expert] : plan.offsets[expert + 1]]
        assert np.all(flat[slots] == expert) and np.all(np.diff(slots) > 0)
    assert np.array_equal(plan.perm[plan.inv_perm], np.arange(flat.size))
    assert np.array_equal(plan.rows, plan.perm // 3)  # the token of each permuted row (k = 3)
    assert plan.active.tolist() == [e for e in range(8) if plan.counts[e]]


def test_permute_grouped_matmuls_and_combine_equal_routed_experts():
    rng = np.random.default_rng(1)
    tokens, hidden, inter, experts, top_k = 11, 16, 12, 8, 3
    ids, weights = random_routing(rng, tokens, experts, top_k)
    h = rng.standard_normal((tokens, hidden)).astype(np.float32)
    mats = [tuple(rng.standard_normal(shape).astype(np.float32) for shape in ((inter, hidden),) * 2 + ((hidden, inter),))
            for _ in range(experts)]
    linear = lambda w: (lambda x: x @ w.T)  # noqa: E731
    mlps = [lambda x, m=m: layers.swiglu(np, x, *map(linear, m)) for m in mats]  # one-argument callables
    expected = layers.routed_experts(np, h, ids, weights, mlps)

    plan = launch.dispatch_plan(ids, experts)
    permuted = h[plan.rows]  # what the grouped matmuls read: each expert's tokens contiguous
    expert_out = np.empty_like(permuted)
    for e in plan.active:  # the grouped matmuls: each group of rows meets only its expert's weights
        rows = slice(plan.offsets[e], plan.offsets[e + 1])
        expert_out[rows] = layers.swiglu(np, permuted[rows], *map(linear, mats[e]))
    np.testing.assert_allclose(launch.combine(expert_out, plan.inv_perm, weights), expected, rtol=1e-5, atol=1e-6)

    residual, shared = rng.standard_normal((2, tokens, hidden)).astype(np.float32)
    gate = rng.standard_normal(tokens).astype(np.float32)
    np.testing.assert_allclose(launch.combine(expert_out, plan.inv_perm, weights, residual, shared, gate),
                               residual + expected + shared * layers.sigmoid(np, gate)[:, None], rtol=1e-5, atol=1e-6)


def test_check_kv_write_takes_a_full_cache_and_refuses_one_position_more():
    launch.check_kv_write((2, 4, 10, 16), start=7, tokens=3, batch=2, kv_heads=4, head_dim=16)  # fills it exactly
    with pytest.raises(MinimoeError, match=r"positions 8..10 is past its capacity of 10"):
        launch.check_kv_write((2, 4, 10, 16), start=8, tokens=3, batch=2, kv_heads=4, head_dim=16)
    with pytest.raises(MinimoeError, match="does not hold 3 sequences"):
        launch.check_kv_write((2, 4, 10, 16), start=0, tokens=1, batch=3, kv_heads=4, head_dim=16)
