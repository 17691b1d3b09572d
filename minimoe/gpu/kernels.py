"""CuPy launch wrappers of the CUDA kernels in ``minimoe/kernels/*.cu``.

Each wrapper takes and returns CuPy float32 arrays, names the NumPy function it
replaces, and leaves grid and block sizes to :mod:`minimoe.gpu.launch` (plain Python,
tested on a CPU).  The ``.cu`` files are compiled at first use by NVRTC through
``cupy.RawModule`` (CuPy caches the binaries on disk, keyed on the source with common.cuh
inlined), so no build step is needed.

This module imports CuPy: only the GPU backend imports it, after
:func:`minimoe.backend.import_cupy` has checked that CuPy and a GPU are there.
"""

from __future__ import annotations

from functools import cache
from typing import NamedTuple

import cupy as cp
import numpy as np

from .. import layers
from . import launch

NULL = np.uint64(0)  # a null pointer argument (an optional input the kernel skips)


@cache
def module(file_name: str, defines: tuple[str, ...] = ()) -> "cp.RawModule":
    """The compiled kernels of one ``.cu`` file (common.cuh inlined, so CuPy's cache key covers it),
    with ``defines`` (``"NAME=value"``) overriding its ``#ifndef`` constants."""
    options = launch.COMPILE_OPTIONS + tuple(f"-D{define}" for define in defines)
    return cp.RawModule(code=launch.module_source(file_name), options=options)


@cache
def compiled(file_name: str, name: str, defines: tuple[str, ...] = ()) -> "cp.RawKernel":
    """One kernel of a ``.cu`` file, looked up once (a decode step launches ~17 per sparse layer)."""
    return module(file_name, defines).get_function(name)


launches = 0  # kernel launches made through kernel() since import: gpu_check reports them per decoded token
# Profiling hooks (minimoe.gpu.profile), None / () in normal use:
observer = None  # called as observer(name, launch, args, kwargs) in place of launch(*args, **kwargs)
variant: tuple[str, ...] = ()  # defines every kernel is compiled with (see profile.compiled_with)


def kernel(file_name: str, name: str):
    """A kernel to launch as ``kernel(file, name)(grid, block, args, shared_mem=0)``; counts its launches."""
    launch_ = compiled(file_name, name, variant) if variant else compiled(file_name, name)

    def counted(*args, **kwargs):
        global launches
        launches += 1
        if observer is not None:
            return observer(name, launch_, args, kwargs)
        return launch_(*args, **kwargs)

    return counted


def _contiguous(x):
    """x as a C-contiguous float32 array whose data starts 16-byte aligned (the vector loads need it)."""
    x = cp.ascontiguousarray(x, dtype=cp.float32)
    return x if address(x) % 16 == 0 else x.copy()


def upload(target, host: np.ndarray) -> None:
    """Copy ``host`` into the device array ``target`` of the same shape and dtype, in place, on the current
    stream (``target[...] = host`` would take the host array for a scalar fill)."""
    target.set(np.ascontiguousarray(host, dtype=target.dtype), stream=cp.cuda.get_current_stream())


def address(x) -> int:
    """The device address of x's first element."""
    return x.data.ptr


def _optional(x):
    return NULL if x is None else _contiguous(x)


# --- normalisation, RoPE, SwiGLU --------------------------------------------------------------------

def rms_norm(x, weight, eps: float):
    """Replaces :func:`minimoe.layers.rms_norm`.  x ``[..., H]``, weight ``[H]`` -> ``[..., H]``."""
    x = _contiguous(x)
    hidden = x.shape[-1]
    out = cp.empty_like(x)
    kernel("norm.cu", "rms_norm")((x.size // hidden,), launch.norm_block(hidden),
                                  (x, weight, out, np.int32(hidden), np.float32(eps)))
    return out


def add_rms_norm(x, delta, weight, eps: float):
    """``x + delta`` and its :func:`~minimoe.layers.rms_norm`, in one pass.  x, delta ``[..., H]`` -> (sum, normed)."""
    x, delta = _contiguous(x), _contiguous(delta)
    hidden = x.shape[-1]
    total, out = cp.empty_like(x), cp.empty_like(x)
    kernel("norm.cu", "add_rms_norm")((x.size // hidden,), launch.norm_block(hidden),
                                      (x, delta, weight, total, out, np.int32(hidden), np.float32(eps)))
    return total, out


def rope_store_kv(rows, cos, sin, k_cache, v_cache, start: int, tokens: int, heads: int, kv_heads: int,
                  head_dim: int, position=None) -> None:
    """Replaces :func:`minimoe.layers.apply_rope` on q and k (in place) and :meth:`minimoe.model.KVCache.update`.

    rows ``[B * T, (heads + 2 * kv_heads) * D]`` contiguous: the fused qkv output (q heads, k heads,
    v heads); cos/sin ``[T, D]`` from :func:`minimoe.layers.rope_tables`; k_cache, v_cache
    ``[B, kv_heads, capacity, D]`` float32 buffers (the KV cache's, or fresh ones) that receive the
    rotated keys and the values at positions ``start .. start + T - 1``.  ``position`` (the CUDA-graph
    decode): a device int32 ``[1]`` holding ``start``, read by the kernel instead; the caller has
    checked it against the capacity.
    """
    for cache in (k_cache, v_cache):
        if cache.dtype != cp.float32 or not cache.flags.c_contiguous:
            raise ValueError("k_cache and v_cache must be contiguous float32 [B, kv_heads, capacity, D] buffers")
    launch.check_kv_write(k_cache.shape, start, tokens, rows.shape[0] // max(tokens, 1), kv_heads, head_dim)
    pairs = rows.shape[0] * (heads + 2 * kv_heads) * (head_dim // 2)
    grid, block = launch.elementwise_grid(pairs)
    kernel("rope.cu", "rope_store_kv")(
        grid, block, (rows, _contiguous(cos), _contiguous(sin), k_cache, v_cache, np.int64(rows.shape[0]),
                      np.int32(tokens), np.int32(heads), np.int32(kv_heads), np.int32(head_dim), np.int64(rows.shape[1]),
                      np.int64(k_cache.strides[0] // 4), np.int64(k_cache.strides[1] // 4), np.int32(start),
                      NULL if position is None else position))


# --- the router and the MoE dispatch ------------------------------------------------------------------

def route(router_logits, top_k: int, norm_topk_prob: bool, disabled=(), experts: int | None = None,
          shared_groups: int = 0) -> layers.RouterChoice:
    """Replaces :func:`minimoe.layers.route` (without ``forced``).  router_logits ``[N, E]`` -> RouterChoice.

    ``experts``: the router's logits are the first ``experts`` columns of wider rows (the GPU's router
    output with the shared expert gate's logit stacked after them); default: every column.
    ``shared_groups`` S: the shared expert runs as S always-on experts E .. E + S - 1, and the
    choice's ids and weights are ``[N, k + S]``: each token's k routed experts, then the S groups
    weighted by sigmoid(the gate's logit, column E).  expert_ids are int32 on the GPU (the dispatch
    kernel's index type).
    """
    logits = _contiguous(router_logits)
    tokens, experts = logits.shape[0], experts or logits.shape[1]
    grid, block = launch.router_grid(tokens, experts, top_k)
    outputs = _choice_arrays(tokens, experts, top_k + shared_groups)
    kernel("moe.cu", "route_topk")(grid, block, (logits, np.int32(logits.shape[1]), *outputs,
                                                 _disabled_mask(disabled, experts), np.int32(tokens), np.int32(experts),
                                                 np.int32(top_k), np.int32(shared_groups), np.int32(norm_topk_prob)))
    return layers.RouterChoice(*outputs)


def _choice_arrays(tokens: int, experts: int, slots: int) -> tuple:
    """The route kernels' outputs: logits used ``[N, E]``, probs ``[N, E]``, ids ``[N, slots]`` int32, raw and
    final weights ``[N, slots]`` (RouterChoice's fields, in its order)."""
    used, probs = (cp.empty((tokens, experts), dtype=cp.float32) for _ in range(2))
    ids = cp.empty((tokens, slots), dtype=cp.int32)
    raw, weights = (cp.empty((tokens, slots), dtype=cp.float32) for _ in range(2))
    return used, probs, ids, raw, weights


def _disabled_mask(disabled, experts: int):
    """``[E]`` bytes, 1 for a disabled expert, or a null pointer when none is."""
    if not len(disabled):
        return NULL
    mask = cp.zeros(experts, dtype=cp.uint8)
    mask[cp.asarray(list(disabled))] = 1
    return mask


def dispatch(expert_ids, num_experts: int) -> launch.DispatchPlan:
    """The GPU :func:`minimoe.gpu.launch.dispatch_plan`.  expert_ids ``[N, k]`` -> :class:`DevicePlan`."""
    ids = cp.ascontiguousarray(expert_ids, dtype=cp.int32)
    plan = _plan_arrays(ids.size, num_experts)
    kernel("moe.cu", "moe_dispatch")((1,), launch.dispatch_block(num_experts),
                                     (ids, np.int32(ids.size), np.int32(num_experts), np.int32(ids.shape[-1]), *plan))
    return DevicePlan(*plan)


def _plan_arrays(slots: int, num_experts: int) -> tuple:
    """The dispatch kernels' outputs, in :class:`DevicePlan`'s order."""
    counts = cp.empty(num_experts, dtype=cp.int32)
    offsets = cp.empty(num_experts + 1, dtype=cp.int32)
    perm, inv_perm, rows = (cp.empty(slots, dtype=cp.int32) for _ in range(3))
    active, num_active = cp.empty(num_experts, dtype=cp.int32), cp.empty(1, dtype=cp.int32)
    return counts, offsets, perm, inv_perm, rows, active, num_active


def route_dispatch(router_logits, top_k: int, norm_topk_prob: bool, disabled=(), experts: int | None = None,
                   shared_groups: int = 0):
    """:func:`route` then :func:`dispatch` (over the E + S experts) in one launch, for a few tokens (a decode
    step): router_logits ``[N, >= E]`` -> (RouterChoice, :class:`DevicePlan`)."""
    logits = _contiguous(router_logits)
    tokens, experts = logits.shape[0], experts or logits.shape[1]
    launch.router_grid(tokens, experts, top_k)  # the checks of what the kernel can hold
    slots = top_k + shared_groups
    outputs, plan = _choice_arrays(tokens, experts, slots), _plan_arrays(tokens * slots, experts + shared_groups)
    kernel("moe.cu", "route_dispatch")((1,), launch.route_dispatch_block(tokens, experts + shared_groups),
                                       (logits, np.int32(logits.shape[1]), *outputs, _disabled_mask(disabled, experts),
                                        np.int32(tokens), np.int32(experts), np.int32(top_k), np.int32(shared_groups),
                                        np.int32(norm_topk_prob), *plan))
    return layers.RouterChoice(*outputs), DevicePlan(*plan)


class DevicePlan(NamedTuple):
    """:class:`minimoe.gpu.launch.DispatchPlan`'s fields as device arrays, ``active`` ``[E]`` valid up to
    ``num_active`` ``[1]`` (how many experts have tokens is known only on the device)."""

    counts: "cp.ndarray"
    offsets: "cp.ndarray"
    perm: "cp.ndarray"
    inv_perm: "cp.ndarray"
    rows: "cp.ndarray"
    active: "cp.ndarray"
    num_active: "cp.ndarray"


def combine(expert_out, inv_perm, weights, residual=None, shared=None, shared_gate=None):
    """The GPU :func:`minimoe.gpu.launch.combine` (the ``out[rows] += y * w`` of :func:`minimoe.layers.routed_experts`,
    plus the gated shared expert and the residual).  expert_out ``[N * k, H]`` -> ``[N, H]``.

    shared_gate ``[N]``: the gate's logit per token, which may be a column of a wider array (the
    router output it is stacked in), read in place.
    """
    tokens, top_k = weights.shape
    hidden = expert_out.shape[1]
    out = cp.empty((tokens, hidden), dtype=cp.float32)
    grid, block = launch.elementwise_grid(tokens * hidden)
    gate, gate_stride = NULL, 1
    if shared_gate is not None:
        gate = shared_gate if shared_gate.dtype == cp.float32 and shared_gate.ndim == 1 else _contiguous(shared_gate)
        gate_stride = gate.strides[0] // 4
    args = (_contiguous(expert_out), inv_perm, _contiguous(weights), _optional(residual), _optional(shared), gate,
            np.int32(gate_stride), out, np.int32(tokens), np.int32(top_k), np.int32(hidden))
    kernel("moe.cu", "moe_combine")(grid, block, args)
    return out


# --- matmuls on stored weights ----------------------------------------------------------------------------

def weight_suffix(weight) -> str:
    """Which kernel variant reads this weight: bf16 bit patterns (uint16) or float32."""
    return {cp.dtype(cp.uint16): "bf16", cp.dtype(cp.float32): "f32"}[weight.dtype]


def grouped_matmul(x, weight, bias, offsets, active, num_active, max_rows_per_group: int, counts=None, x_rows=None,
                   glu_output: bool = False, swiglu_input: bool = False):
    """``y[rows of g] = x[rows of g] @ weight[g].T (+ bias)`` for every group g.  Replaces
    :class:`minimoe.backend.Linear` (one group) and each expert's matmul in :func:`minimoe.layers.routed_experts`.

    x ``[R, in]`` rows grouped by ``offsets`` ``[G + 1]`` -- or, with ``x_rows`` ``[R]``, row r is
    ``x[x_rows[r]]`` (the experts read the hidden states in dispatch order, no permuted copy); weight
    ``[G, out, in]`` (uint16 bf16 bits or float32); ``active`` / ``num_active``: the groups with rows
    (device arrays).  ``offsets``, ``active`` and ``num_active`` all None: one group owning all R rows
    (a plain projection; nothing on the device describes it).  Up to GEMV_MAX_ROWS rows per group a
    GEMV kernel runs (grid over ``active``, no host sync; the one-row kernel for groups of one row);
    beyond, the tiled GEMM runs on a tile schedule built from ``counts`` (host ints; read from the
    device when not given).  -> ``[R, out]`` float32, in the grouped order.

    The two halves of a SwiGLU (see :func:`swiglu`): ``glu_output`` (GEMV only), the weight is
    ``[gate; up]`` and y ``[R, out / 2]`` is ``silu(gate) * up``; ``swiglu_input`` (GEMM only), x's
    rows are ``[gate | up]`` ``[R, 2 * in]`` and the product reads ``silu(gate) * up``.
    """
    x = _contiguous(x)
    groups, out_features, in_features = weight.shape
    gemv = max_rows_per_group <= launch.kernel_constants("matmul.cu")["GEMV_MAX_ROWS"]
    if (glu_output and not gemv) or (swiglu_input and gemv):
        raise ValueError("a GEMV forms a SwiGLU's activation as its output, a GEMM as its input")
    if x.shape[-1] != in_features * (2 if swiglu_input else 1):
        raise ValueError(f"x has rows of {x.shape[-1]} values for a weight of {in_features} inputs"
                         f"{' (a SwiGLU input holds 2 * in)' if swiglu_input else ''}")
    rows = x.shape[0] if x_rows is None else x_rows.shape[0]
    ungrouped = offsets is None
    if ungrouped and groups != 1:
        raise ValueError(f"a weight of {groups} groups needs the dispatch offsets of its rows")
    row_map = NULL if x_rows is None else cp.ascontiguousarray(x_rows, dtype=cp.int32)
    out_width = out_features // 2 if glu_output else out_features
    y = cp.empty((rows, out_width), dtype=cp.float32)
    suffix = weight_suffix(weight)
    sizes = (np.int32(out_width), np.int32(in_features), np.int32(rows))
    if gemv:
        launched_groups = 1 if ungrouped else min(groups, rows)
        # the one-row kernel keeps more loads in flight, and may share a short matrix's rows among warps
        split = launch.gemv_split(out_width, launched_groups, in_features) if max_rows_per_group == 1 else 1
        grid, block = launch.gemv_grid(out_width, launched_groups, split)
        dispatch = (NULL, NULL, NULL) if ungrouped else (offsets, active, num_active)
        kind = "gemv" if max_rows_per_group > 1 else "gemv1_split" if split > 1 else "gemv1"
        variant = f"{'_glu' if glu_output else ''}_{suffix}"
        kernel("matmul.cu", f"{kind}_grouped{variant}")(grid, block, (x, row_map, weight, _optional(bias), y,
                                                                      *dispatch, *sizes, np.int32(split)))
        return y
    if ungrouped:
        counts_host = np.array([rows])
    else:
        counts_host = cp.asnumpy(cp.diff(offsets)) if counts is None else counts
    tile_group, tile_row = launch.gemm_schedule(counts_host, np.concatenate([[0], np.cumsum(counts_host)]))
    if tile_group.size:
        grid, block = launch.gemm_grid(out_features, tile_group.size)
        variant = f"{'_swiglu' if swiglu_input else ''}_{suffix}"
        kernel("matmul.cu", f"gemm_grouped{variant}")(grid, block, (x, row_map, weight, _optional(bias), y,
                                                                     NULL if ungrouped else offsets,
                                                                     cp.asarray(tile_group), cp.asarray(tile_row),
                                                                     *sizes))
    return y


def swiglu(x, gate_up, down, offsets=None, active=None, num_active=None, max_rows_per_group: int | None = None,
           counts=None, x_rows=None):
    """Replaces :func:`minimoe.layers.swiglu` (and each expert's in :func:`minimoe.layers.routed_experts`):
    ``down(silu(gate(x)) * up(x))``, the activation formed inside one of the two matmuls.

    gate_up ``[G, 2I, in]`` (each group's gate rows, then its up rows), down ``[G, out, I]``; x, the
    grouping and ``x_rows`` as :func:`grouped_matmul` takes them (no grouping: one group of all rows).
    Few rows per group (GEMV): the gate/up kernel writes the activation ``[R, I]``, the down kernel
    reads it; many (GEMM): gate/up writes ``[R, 2I]``, the down GEMM forms the activation as it reads.
    -> ``[R, out]``, in the grouped order.
    """
    rows = (x.shape[0] if x_rows is None else x_rows.shape[0]) if max_rows_per_group is None else max_rows_per_group
    gemv = rows <= launch.kernel_constants("matmul.cu")["GEMV_MAX_ROWS"]
    hidden = grouped_matmul(x, gate_up, None, offsets, active, num_active, rows, counts, x_rows, glu_output=gemv)
    return grouped_matmul(hidden, down, None, offsets, active, num_active, rows, counts, swiglu_input=not gemv)


def gather_rows(weight, ids, out=None):
    """Replaces :meth:`minimoe.backend.Linear.rows` (the embedding lookup): ``weight[0][ids]`` as float32.

    weight ``[1, V, H]`` (bf16 bits or float32), ids a device int32 array ``[...]`` -> ``[..., H]``
    (into ``out`` when given: the CUDA-graph decode's fixed buffer).
    """
    width = weight.shape[-1]
    out = cp.empty((*ids.shape, width), dtype=cp.float32) if out is None else out
    grid, block = launch.elementwise_grid(ids.size * width)
    kernel("matmul.cu", f"gather_rows_{weight_suffix(weight)}")(grid, block, (weight, ids, out, np.int32(ids.size),
                                                                               np.int32(width)))
    return out


# --- attention ---------------------------------------------------------------------------------------------

def causal_attention(q_rows, k, v, tokens: int, heads: int, head_dim: int, query_start: int, position=None,
                     splits: int | None = None):
    """Replaces :func:`minimoe.layers.causal_attention`.

    q_rows ``[B * T, width]``: each row's first ``heads * D`` floats are the (rotated) query
    heads (the fused qkv output, read in place); k, v ``[B, nkv, S, D]`` views whose last two
    axes are contiguous (the KV cache's buffers, or fresh arrays).  -> ``[B, T, heads * D]``.
    T == 1 runs the decode kernel (flash-decoding: the keys split over blocks, then merged), longer the
    tiled prefill kernel.  ``position`` (decode only, the CUDA-graph path): a device int32 ``[1]``
    holding the query's position; k and v are then the whole cache and the kernel attends to
    positions ``0 .. position``.  ``splits``: decode's blocks per head, instead of
    :func:`~minimoe.gpu.launch.decode_splits`' choice (a profile's sweep).
    """
    batch, kv_heads, keys = k.shape[0], k.shape[1], k.shape[2]
    launch.check_attention(heads, kv_heads, head_dim)
    for array in (k, v):
        if array.dtype != cp.float32 or array.strides[3] != 4 or array.strides[2] != 4 * head_dim:
            raise ValueError("k and v need float32 [B, nkv, S, D] views with contiguous [S, D] planes")
    if k.strides != v.strides:
        raise ValueError("k and v must share one layout")
    out = cp.empty((batch, tokens, heads * head_dim), dtype=cp.float32)
    strides = (np.int64(q_rows.shape[1]), np.int64(k.strides[0] // 4), np.int64(k.strides[1] // 4))
    scale = np.float32(1.0 / np.sqrt(head_dim))
    if tokens == 1:
        plan = launch.decode_attention_launch(heads, batch, head_dim, keys, splits)
        partial = cp.empty((batch, heads, plan.splits, head_dim + 2), dtype=cp.float32) if plan.splits > 1 else NULL
        kernel("attention.cu", "attention_decode")(
            plan.grid, plan.block, (q_rows, k, v, partial, out, np.int32(heads), np.int32(kv_heads),
                                    np.int32(head_dim), *strides, np.int32(keys),
                                    NULL if position is None else position, scale),
            shared_mem=plan.shared_bytes)
        if plan.splits > 1:
            kernel("attention.cu", "attention_decode_merge")(
                plan.merge_grid, plan.merge_block, (partial, out, np.int32(heads), np.int32(head_dim),
                                                    np.int32(plan.splits)))
    else:
        if position is not None:
            raise ValueError("a device-side position is for decode (one token per sequence)")
        grid, block, shared, key_tile = launch.prefill_attention_launch(tokens, heads, batch, head_dim)
        kernel("attention.cu", "attention_prefill")(
            grid, block, (q_rows, k, v, out, np.int32(tokens), np.int32(heads), np.int32(kv_heads),
                          np.int32(head_dim), *strides, np.int32(query_start), np.int32(key_tile), scale),
            shared_mem=shared)
    return out
