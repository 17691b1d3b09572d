"""Host-side launch logic of the GPU kernels, in plain Python and NumPy (no CuPy needed).

Everything here runs, and is tested, on a CPU: the grid and block sizes each
kernel is launched with, the tile schedule of the grouped GEMM, and the NumPy
reference of the MoE dispatch bookkeeping that ``moe_dispatch`` / ``moe_combine``
(``minimoe/kernels/moe.cu``) compute on the GPU.  The kernels' compile-time
constants (tile sizes, warps per block) live in the ``.cu`` files, their one home;
:func:`kernel_constants` reads them from there.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..errors import MinimoeError

KERNEL_DIR = Path(__file__).resolve().parent / "cuda"
GPU_MODEL_TYPES = ("qwen2_moe", "qwen2")  # the families the kernels run (no q/k norms, no Mixtral naming)
WARP = 32
MAX_BLOCK = 1024
ELEMENTWISE_BLOCK = 256  # threads per block of the one-thread-per-element kernels (RoPE, SwiGLU, combine)
ROUTER_WARPS = 4  # tokens per block of route_topk (one warp each)
ATTENTION_WARPS = 4  # queries per block in prefill (one warp each, sharing each k/v tile)
# Decode attention (flash-decoding): each (sequence, head) splits its cached keys over up to
# enough blocks for DECODE_TARGET_BLOCKS in all (2 per SM of a 132-SM H200), and at most one
# split per DECODE_MIN_KEYS_PER_SPLIT keys (4 per warp), so a short cache is not cut into
# blocks that do little but merge; the block's 16 warps each take every 16th key of its chunk.
# Measured on an H200 (docs/gpu.md), 16 heads at 577 keys: 23 us in 3 splits of 193 keys, 16 us
# in 8 to 16 splits of 37 to 73; at 4,096 keys the 16 splits the target grid allows are fastest.
DECODE_ATTENTION_WARPS = 16
DECODE_TARGET_BLOCKS = 264
DECODE_MIN_KEYS_PER_SPLIT = 64
GEMV_TARGET_BLOCKS = 256  # blocks a GEMV launch aims for (measured on an H200: more, by splitting q/k/v or o_proj, did not help)
GEMV_MIN_PART = 512  # inputs a GEMV warp reads at the least when warps share an output (two loads per lane)
SHARED_MEMORY_BYTES = 48 * 1024  # dynamic shared memory a kernel may use without an opt-in


# What minimoe hands CuPy's RawModule besides the source.  CuPy adds its own options
# (``-ftz=true``, ``-arch=...``, include folders); tests/test_gpu_kernels_compile.py compiles
# every module through NVRTC with the same ones.
COMPILE_OPTIONS = ("-std=c++17",)
SHARED_HEADER = "common.cuh"


def kernel_sources() -> list[Path]:
    """The ``.cu`` files of the package, in name order."""
    return sorted(KERNEL_DIR.glob("*.cu"))


def module_source(file_name: str) -> str:
    """The text CuPy compiles for one ``.cu`` file: the file with ``#include "common.cuh"`` replaced by
    the header itself.

    CuPy's on-disk binary cache is keyed on the source text and the options, never on the
    files an ``#include`` pulls in, so an edited header would keep running the old binaries.
    Inlined, the header is part of the key.
    """
    source = (KERNEL_DIR / file_name).read_text()
    header = (KERNEL_DIR / SHARED_HEADER).read_text()
    include = f'#include "{SHARED_HEADER}"'
    if source.count(include) != 1:
        raise MinimoeError(f"{file_name} must include {SHARED_HEADER} exactly once (found {source.count(include)})")
    return source.replace(include, f"// ---- {SHARED_HEADER}, inlined ----\n{header}\n// ---- end of {SHARED_HEADER} ----")


@cache
def kernel_constants(file_name: str) -> dict[str, int]:
    """The integer ``#define NAME value`` lines of a kernel file (its compile-time constants)."""
    text = (KERNEL_DIR / file_name).read_text()
    return {name: int(value) for name, value in re.findall(r"^#define\s+(\w+)\s+(\d+)\b", text, flags=re.MULTILINE)}


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def round_up(a: int, multiple: int) -> int:
    return ceil_div(a, multiple) * multiple


# --- grids and blocks ----------------------------------------------------------------------------

def elementwise_grid(elements: int) -> tuple[tuple[int], tuple[int]]:
    """(grid, block) for one thread per element."""
    return (max(1, ceil_div(elements, ELEMENTWISE_BLOCK)),), (ELEMENTWISE_BLOCK,)


def norm_block(hidden: int) -> tuple[int]:
    """Threads per row of rms_norm: enough for NORM_VALUES values each, in whole warps, at least 256 (or the
    row rounded up to a warp, if smaller).  MinimoeError for a row no block can hold."""
    values = kernel_constants("norm.cu")["NORM_VALUES"]
    if hidden > values * MAX_BLOCK:
        raise MinimoeError(f"the GPU norm kernels hold rows of up to {values * MAX_BLOCK} values, "
                           f"this model's hidden size is {hidden}")
    return (min(MAX_BLOCK, max(min(256, round_up(hidden, WARP)), round_up(ceil_div(hidden, values), WARP))),)


def router_grid(tokens: int, experts: int, top_k: int) -> tuple[tuple[int], tuple[int]]:
    """(grid, block) of route_topk: one warp per token.  MinimoeError for shapes the kernel cannot hold."""
    capacity = WARP * kernel_constants("moe.cu")["MAX_EXPERTS_PER_LANE"]
    if experts > capacity:
        raise MinimoeError(f"the GPU router handles at most {capacity} experts, this model has {experts}")
    if not 1 <= top_k <= experts:
        raise MinimoeError(f"top_k {top_k} must be in [1, {experts}]")
    if top_k > WARP:
        raise MinimoeError(f"the GPU router chooses at most {WARP} experts per token (a lane each), got top_k {top_k}")
    return (ceil_div(tokens, ROUTER_WARPS),), (ROUTER_WARPS * WARP,)


def dispatch_block(experts: int) -> tuple[int]:
    """Threads of moe_dispatch's single block: one per expert, rounded up to a warp."""
    if experts > MAX_BLOCK:
        raise MinimoeError(f"the GPU MoE dispatch handles at most {MAX_BLOCK} experts, this model has {experts}")
    return (round_up(experts, WARP),)


def route_dispatch_block(tokens: int, experts: int) -> tuple[int]:
    """Threads of route_dispatch's single block: a warp per token, and at least one thread per expert."""
    threads = max(WARP * tokens, dispatch_block(experts)[0])
    if threads > MAX_BLOCK:
        raise MinimoeError(f"route_dispatch routes at most {MAX_BLOCK // WARP} tokens in one block, got {tokens}")
    return (threads,)


def gemv_split(out_features: int, groups: int, in_features: int) -> int:
    """Warps sharing each output feature of a GEMV (1, 2, 4 or 8): the fewest that give the launch
    GEMV_TARGET_BLOCKS blocks, as long as each warp keeps at least GEMV_MIN_PART inputs.  A matrix of
    very few rows (the router's 61: 8 blocks of one warp per row) otherwise leaves most of the GPU idle;
    the output head's 151,936 rows need no split."""
    warps = kernel_constants("matmul.cu")["GEMV_WARPS"]
    split = 1
    while (split < warps and ceil_div(out_features * split, warps) * max(1, groups) < GEMV_TARGET_BLOCKS
           and in_features // (2 * split) >= GEMV_MIN_PART):
        split *= 2
    return split


def gemv_grid(out_features: int, groups: int, split: int = 1) -> tuple[tuple[int, int], tuple[int]]:
    """(grid, block) of gemv_grouped: ``split`` warps per output feature; grid.y covers ``groups`` active groups."""
    warps = kernel_constants("matmul.cu")["GEMV_WARPS"]
    return (ceil_div(out_features * split, warps), max(1, groups)), (warps * WARP,)


def gemm_schedule(counts: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The tiles of gemm_grouped: for each group with rows, one tile per TILE_M of them.

    counts ``[G]``, offsets ``[G + 1]`` -> (tile_group ``[tiles]``, tile_row ``[tiles]``: the group
    and the first row, in x's row numbering, of each tile), int32.  Empty groups get no tile.
    """
    tile = kernel_constants("matmul.cu")["TILE_M"]
    groups, rows = [], []
    for group, (count, start) in enumerate(zip(np.asarray(counts).tolist(), np.asarray(offsets).tolist())):
        for first in range(0, count, tile):
            groups.append(group)
            rows.append(start + first)
    return np.array(groups, dtype=np.int32), np.array(rows, dtype=np.int32)


def gemm_grid(out_features: int, tiles: int) -> tuple[tuple[int, int], tuple[int]]:
    """(grid, block) of gemm_grouped: grid.x over TILE_N output columns, grid.y over the schedule's tiles."""
    c = kernel_constants("matmul.cu")
    threads = (c["TILE_M"] // c["PATCH"]) * (c["TILE_N"] // c["PATCH"])  # each thread computes PATCH x PATCH outputs
    return (ceil_div(out_features, c["TILE_N"]), tiles), (threads,)


def check_attention(heads: int, kv_heads: int, head_dim: int) -> None:
    """MinimoeError unless the attention kernels can run this head layout."""
    max_dim = WARP * kernel_constants("attention.cu")["MAX_DIMS_PER_LANE"]
    if head_dim > max_dim:
        raise MinimoeError(f"the GPU attention kernels handle head_dim up to {max_dim}, this model has {head_dim}")
    if heads % kv_heads:
        raise MinimoeError(f"{heads} attention heads do not split evenly over {kv_heads} key/value heads")


def check_kv_write(cache_shape: tuple[int, ...], start: int, tokens: int, batch: int, kv_heads: int,
                   head_dim: int) -> None:
    """MinimoeError unless a KV cache of ``cache_shape`` ``[B, kv_heads, capacity, D]`` can take ``tokens``
    new positions of ``batch`` sequences at ``start`` (rope_store_kv writes there without checking)."""
    if tuple(cache_shape[:2]) + tuple(cache_shape[3:]) != (batch, kv_heads, head_dim):
        raise MinimoeError(f"KV cache of shape {tuple(cache_shape)} does not hold {batch} sequences of "
                           f"{kv_heads} key/value heads of {head_dim}")
    if start < 0 or start + tokens > cache_shape[2]:
        raise MinimoeError(f"KV cache write at positions {start}..{start + tokens - 1} is past its capacity "
                           f"of {cache_shape[2]} positions")


def check_model(config) -> None:
    """MinimoeError, at load, for a model (a :class:`~minimoe.config.ModelConfig`) the kernels cannot run."""
    check_attention(config.num_attention_heads, config.num_key_value_heads, config.head_dim)
    norm_block(config.hidden_size)
    if config.sparse_layers:
        router_grid(1, config.num_experts, config.num_experts_per_tok)
        dispatch_block(config.num_experts)


def attention_key_tile(head_dim: int) -> int:
    """Keys per shared-memory tile in prefill attention: as many as fit (k and v tiles) in 48 KiB, at most 32."""
    return max(1, min(32, SHARED_MEMORY_BYTES // (2 * 4 * head_dim)))


def prefill_attention_launch(tokens: int, heads: int, batch: int, head_dim: int):
    """(grid, block, shared bytes, key tile) of attention_prefill."""
    tile = attention_key_tile(head_dim)
    return (ceil_div(tokens, ATTENTION_WARPS), heads, batch), (ATTENTION_WARPS * WARP,), 2 * tile * head_dim * 4, tile


class DecodeAttentionLaunch(NamedTuple):
    """How attention_decode runs: ``splits`` blocks per (sequence, head), each over ceil(keys / splits) keys."""

    grid: tuple[int, int, int]  # (splits, heads, B)
    block: tuple[int]
    shared_bytes: int  # per warp a record of D + 2 floats (accumulator, m, l)
    splits: int
    merge_grid: tuple[int, int]  # attention_decode_merge's (heads, B), run when splits > 1
    merge_block: tuple[int]


def decode_splits(keys: int, heads: int, batch: int) -> int:
    """Blocks per (sequence, head) of decode attention over ``keys`` cached positions (the kernel gives
    each ceil(keys / splits) of them)."""
    return max(1, min(ceil_div(keys, DECODE_MIN_KEYS_PER_SPLIT), DECODE_TARGET_BLOCKS // (heads * batch)))


def decode_attention_launch(heads: int, batch: int, head_dim: int, keys: int,
                            splits: int | None = None) -> DecodeAttentionLaunch:
    """The launch of attention_decode (and of its merge) for one new token over ``keys`` positions
    (the CUDA-graph decode passes its cache's capacity: the count it attends to is read on the device),
    in :func:`decode_splits` splits unless ``splits`` says how many (a profile's sweep)."""
    splits = splits or decode_splits(keys, heads, batch)
    return DecodeAttentionLaunch((splits, heads, batch), (DECODE_ATTENTION_WARPS * WARP,),
                                 DECODE_ATTENTION_WARPS * (head_dim + 2) * 4, splits, (heads, batch),
                                 (round_up(head_dim, WARP),))


# --- the MoE dispatch bookkeeping, in NumPy -------------------------------------------------------

class DispatchPlan(NamedTuple):
    """Where each (token, expert) assignment goes.  ``slot = token * k + j`` is a token's j-th choice."""

    counts: np.ndarray  # [E] assignments per expert
    offsets: np.ndarray  # [E + 1] first permuted position of each expert (exclusive prefix sum of counts)
    perm: np.ndarray  # [N * k] the slot at each permuted position: expert 0's slots first, each in slot order
    inv_perm: np.ndarray  # [N * k] the permuted position of each slot
    rows: np.ndarray  # [N * k] the token each permuted position reads (perm // k)
    active: np.ndarray  # [A] the experts with at least one assignment, ascending


def dispatch_plan(expert_ids: np.ndarray, num_experts: int) -> DispatchPlan:
    """The NumPy reference of ``moe_dispatch``: expert_ids ``[N, k]`` -> :class:`DispatchPlan`.

    The same grouping :func:`minimoe.layers.routed_experts` makes with a stable argsort
    and a bincount, written out as the GPU computes it.
    """
    top_k = np.shape(expert_ids)[-1]
    flat = np.asarray(expert_ids).reshape(-1)
    counts = np.bincount(flat, minlength=num_experts).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    perm = np.argsort(flat, kind="stable").astype(np.int32)
    inv_perm = np.empty_like(perm)
    inv_perm[perm] = np.arange(perm.size, dtype=np.int32)
    return DispatchPlan(counts, offsets, perm, inv_perm, perm // top_k, np.flatnonzero(counts).astype(np.int32))


def combine(expert_out: np.ndarray, inv_perm: np.ndarray, weights: np.ndarray, residual=None, shared=None,
            shared_gate=None) -> np.ndarray:
    """The NumPy reference of ``moe_combine``.

    expert_out ``[N * k, H]`` (permuted order), inv_perm ``[N * k]``, weights ``[N, k]``;
    residual, shared ``[N, H]`` and shared_gate ``[N]`` (the gate's logit) optional -> ``[N, H]``:
    ``residual + sum_j weights[:, j] * expert_out[inv_perm[slot]] + sigmoid(shared_gate) * shared``.
    """
    tokens, top_k = weights.shape
    per_slot = expert_out[inv_perm].reshape(tokens, top_k, -1)  # back in token order
    out = np.einsum("nk,nkh->nh", weights, per_slot)
    if shared is not None:
        out = out + shared / (1.0 + np.exp(-shared_gate))[:, None]
    return out if residual is None else residual + out
