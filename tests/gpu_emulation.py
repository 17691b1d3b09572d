"""Run the GPU backend on a CPU: a NumPy stand-in for CuPy, and each CUDA kernel emulated in NumPy.

There is no GPU in CI, but most of what can go wrong on one is host-side: the order
of a launch's arguments, the strides handed to a kernel, which rows a grouped matmul
owns, the stacking of weights, the plumbing between blocks.  So the tests swap
``cupy`` for NumPy and ``minimoe.gpu.kernels.compiled`` for :func:`emulated_kernel`, whose
functions take a kernel's exact arguments (``(grid, block, args, shared_mem)``, the
``args`` in the ``.cu`` signature's order, strides in elements) and compute what that
kernel computes, written from its ``.cu`` source.  The real wrappers and blocks then
run unchanged, and their result is held to the NumPy backend.

What this cannot catch is a bug inside a kernel body; ``python -m minimoe.gpu_check``
covers that on a GPU machine.
"""

from __future__ import annotations

import functools
import re
import sys
import time
import types

import numpy as np

from minimoe.gpu import launch


class FakeEvent:
    """A CUDA event on the host: the time it was recorded."""

    def record(self, stream=None):
        self.time = time.perf_counter()

    def synchronize(self):
        pass


class FakePool:
    def free_all_blocks(self):
        pass

    def total_bytes(self):
        return 0


def fake_cupy() -> types.ModuleType:
    """A ``cupy`` module that is NumPy (plus ``asnumpy``, a runtime that reports one device, events that
    read the host's clock, a memory pool that holds nothing, and ``random.RandomState`` as NumPy's generator)."""
    module = types.ModuleType("cupy")
    module.__getattr__ = lambda name: getattr(np, name)
    module.asnumpy = np.asarray
    module.asarray = lambda a, dtype=None: np.array(a, dtype=dtype)  # a copy, as from host to device
    module.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=lambda: 1),
                                        Device=lambda: types.SimpleNamespace(synchronize=lambda: None),
                                        Event=FakeEvent,
                                        get_elapsed_time=lambda start, end: 1e3 * (end.time - start.time))
    module.get_default_memory_pool = FakePool
    module.random = types.SimpleNamespace(RandomState=np.random.default_rng)
    return module


def install(monkeypatch) -> None:
    """Make ``backend="cupy"`` run on NumPy with emulated kernels, for one test."""
    import minimoe.gpu

    monkeypatch.setitem(sys.modules, "cupy", fake_cupy())
    for name in ("kernels", "ops", "decode", "profile"):  # re-imported over the fake cupy (`from .gpu import kernels` reads the attribute)
        monkeypatch.delitem(sys.modules, f"minimoe.gpu.{name}", raising=False)
        monkeypatch.delattr(minimoe.gpu, name, raising=False)
    import minimoe.gpu.kernels as kernels

    monkeypatch.setattr(kernels, "compiled", emulated_kernel)  # kernels.kernel still counts the launches
    monkeypatch.setattr(kernels, "address", lambda x: x.ctypes.data)
    monkeypatch.setattr(kernels, "upload", lambda target, host: np.copyto(target, host))


def emulated_kernel(file_name: str, name: str, defines: tuple[str, ...] = ()):
    """A stand-in for ``kernels.compiled(file_name, name, defines)``: checks the arguments (:func:`check_arguments`),
    then runs the NumPy version (the same whatever ``defines`` tune)."""
    parameters = kernel_parameters(file_name, name)
    function = KERNELS[name]

    def launch_(grid, block, args, shared_mem=0):
        check_arguments(file_name, name, parameters, args)
        function(grid, block, *args)

    return launch_


C_SCALARS = {"int": np.int32, "long": np.int64, "float": np.float32}


def check_arguments(file_name: str, name: str, parameters: list[tuple[str, str]], args) -> None:
    """Each argument against the kernel's C parameter list: a misplaced int32 where the kernel reads a
    64-bit ``long`` would shift every later argument on a GPU."""
    assert len(args) == len(parameters), f"{name}: {len(args)} arguments for {len(parameters)} parameters"
    for arg, (c_type, parameter) in zip(args, parameters):
        expected = (np.ndarray, np.uint64) if c_type == "pointer" else C_SCALARS[c_type]
        null = isinstance(arg, np.uint64)
        assert isinstance(arg, expected) and not (null and arg != 0), \
            f"{name}: {parameter} is {c_type} in {file_name}, got {type(arg).__name__}"


def kernel_parameter_text(file_name: str, name: str) -> list[str]:
    """The C parameter declarations of an ``extern "C"`` kernel, parameter-list macros expanded."""
    text = (launch.KERNEL_DIR / file_name).read_text().replace("\\\n", " ")
    match = re.search(rf'extern "C" __global__ void {name}\((.*?)\)\s*\{{', text, flags=re.DOTALL)
    assert match, f"{name} is not declared in {file_name}"
    params = match.group(1).strip()
    macro = re.fullmatch(r"(\w+)\((.*)\)", params)
    if macro:  # e.g. GEMV_ARGS(unsigned short): expand the parameter-list macro
        argument, body = re.search(rf"#define {macro.group(1)}\((\w+)\)(.*)", text).groups()
        params = re.sub(rf"\b{argument}\b", macro.group(2), body)
    return [" ".join(param.split()) for param in params.split(",")]


def kernel_parameters(file_name: str, name: str) -> list[tuple[str, str]]:
    """(``"pointer"`` or the C scalar type, parameter name) of each parameter of a kernel."""
    result = []
    for param in kernel_parameter_text(file_name, name):
        words = param.replace("*", " * ").split()
        result.append(("pointer" if "*" in words else words[-2], words[-1]))
    return result


def _given(pointer) -> bool:
    return isinstance(pointer, np.ndarray)  # a null pointer arrives as np.uint64(0)


def _float32(weight: np.ndarray) -> np.ndarray:
    return (weight.astype(np.uint32) << 16).view(np.float32) if weight.dtype == np.uint16 else weight


def _rows(pointer: np.ndarray, width: int) -> np.ndarray:
    return pointer.reshape(-1, width)


# --- the kernels, in NumPy ------------------------------------------------------------------------

def rms_norm(grid, block, x, weight, out, hidden, eps):
    xr = _rows(x, hidden)
    _rows(out, hidden)[:] = xr / np.sqrt(np.mean(xr * xr, axis=-1, keepdims=True) + eps) * weight


def add_rms_norm(grid, block, x, delta, weight, total, out, hidden, eps):
    _rows(total, hidden)[:] = _rows(x, hidden) + _rows(delta, hidden)
    rms_norm(grid, block, total, weight, out, hidden, eps)


def rope_store_kv(grid, block, x, cos, sin, k_cache, v_cache, rows, tokens, heads, kv_heads, head_dim, row_stride,
                  kv_batch_stride, kv_head_stride, kv_start, position):
    half, all_heads = head_dim // 2, heads + 2 * kv_heads
    kv_start = int(position[0]) if _given(position) else kv_start
    assert grid[0] * block[0] >= rows * all_heads * half
    shape = (rows // tokens, kv_heads, k_cache.size // (rows // tokens * kv_heads * head_dim), head_dim)
    caches = [np.lib.stride_tricks.as_strided(c, shape, (kv_batch_stride * 4, kv_head_stride * 4, head_dim * 4, 4))
              for c in (k_cache, v_cache)]
    for row in range(rows):
        b, t = divmod(row, tokens)
        v = x.reshape(-1)[row * row_stride : row * row_stride + all_heads * head_dim].reshape(all_heads, head_dim)
        first, second = v[: heads + kv_heads, :half].copy(), v[: heads + kv_heads, half:].copy()
        v[: heads + kv_heads, :half] = first * cos[t, :half] - second * sin[t, :half]
        v[: heads + kv_heads, half:] = second * cos[t, half:] + first * sin[t, half:]
        caches[0][b, :, kv_start + t] = v[heads : heads + kv_heads]
        caches[1][b, :, kv_start + t] = v[heads + kv_heads :]


def route_topk(grid, block, logits, logits_stride, used, probs, expert_ids, raw, weights, disabled, tokens, experts,
               top_k, shared_groups, norm):
    rows = _rows(logits, logits_stride)[:tokens]
    values = rows[:, :experts].copy()
    if _given(disabled):
        values[:, disabled.astype(bool)] = -np.inf
    _rows(used, experts)[:] = values
    with np.errstate(invalid="ignore"):  # a row with no usable logit: NaN probabilities, as in the kernel
        p = np.exp(values - values.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
    _rows(probs, experts)[:] = p
    ids = np.argsort(-p, axis=-1, kind="stable")[:, :top_k]  # highest first, lower id first on ties, NaN last
    chosen = np.take_along_axis(p, ids, -1)
    slots = top_k + shared_groups
    _rows(expert_ids, slots)[:, :top_k] = ids
    _rows(raw, slots)[:, :top_k] = chosen
    _rows(weights, slots)[:, :top_k] = chosen / chosen.sum(-1, keepdims=True) if norm else chosen
    if shared_groups:  # the shared expert's groups, weighted by the sigmoid of the gate's logit (column `experts`)
        gate = (1.0 / (1.0 + np.exp(-rows[:, experts])))[:, None]
        _rows(expert_ids, slots)[:, top_k:] = experts + np.arange(shared_groups)
        _rows(raw, slots)[:, top_k:] = _rows(weights, slots)[:, top_k:] = gate


def moe_dispatch(grid, block, expert_ids, slots, experts, top_k, counts, offsets, perm, inv_perm, rows, active,
                 num_active):
    assert block[0] >= experts and grid == (1,)
    plan = launch.dispatch_plan(expert_ids.reshape(-1)[:slots].reshape(-1, top_k), experts)
    counts[:], offsets[:], perm[:], inv_perm[:], rows[:] = plan.counts, plan.offsets, plan.perm, plan.inv_perm, plan.rows
    active[: plan.active.size] = plan.active
    num_active[0] = plan.active.size


def route_dispatch(grid, block, logits, logits_stride, used, probs, expert_ids, raw, weights, disabled, tokens, experts,
                   top_k, shared_groups, norm, counts, offsets, perm, inv_perm, rows, active, num_active):
    assert grid == (1,) and block[0] >= max(32 * tokens, experts + shared_groups)
    route_topk(grid, block, logits, logits_stride, used, probs, expert_ids, raw, weights, disabled, tokens, experts,
               top_k, shared_groups, norm)
    slots = top_k + shared_groups
    moe_dispatch((1,), block, expert_ids, tokens * slots, experts + shared_groups, slots, counts, offsets, perm,
                 inv_perm, rows, active, num_active)


def moe_combine(grid, block, expert_out, inv_perm, weights, residual, shared, shared_gate, gate_stride, out, tokens,
                top_k, hidden):
    gate = np.lib.stride_tricks.as_strided(shared_gate, (tokens,), (4 * gate_stride,)) if _given(shared_gate) else None
    _rows(out, hidden)[:] = launch.combine(
        _rows(expert_out, hidden), inv_perm, _rows(weights, top_k), _rows(residual, hidden) if _given(residual) else None,
        _rows(shared, hidden) if _given(shared) else None, gate)


def _silu_mul(gate, up):
    return gate / (1.0 + np.exp(-gate)) * up


def _matmul_rows(x, x_rows, weight, bias, y, group, first, last, out_features, in_features, glu_output=False,
                 swiglu_input=False):
    w = _float32(weight.reshape(-1, out_features * (2 if glu_output else 1), in_features)[group])
    inputs = _rows(x, in_features * (2 if swiglu_input else 1))[x_rows[first:last] if _given(x_rows) else slice(first, last)]
    if swiglu_input:  # [gate | up] -> silu(gate) * up
        inputs = _silu_mul(inputs[:, :in_features], inputs[:, in_features:])
    rows = inputs @ w.T
    if glu_output:  # [gate | up] of the output -> silu(gate) * up
        rows = _silu_mul(rows[:, :out_features], rows[:, out_features:])
    _rows(y, out_features)[first:last] = rows + (bias if _given(bias) else 0.0)


def gemv_grouped(grid, block, x, x_rows, weight, bias, y, offsets, active, num_active, out_features, in_features,
                 total_rows, split, glu_output=False):
    assert split in (1, 2, 4, 8) and grid[0] * block[0] // 32 // split >= out_features
    if not _given(offsets):  # one group owning every row
        assert not _given(active) and not _given(num_active) and grid[1] == 1
        _matmul_rows(x, x_rows, weight, bias, y, 0, 0, total_rows, out_features, in_features, glu_output)
        return
    assert grid[1] >= num_active[0]
    for group in active[: num_active[0]]:
        _matmul_rows(x, x_rows, weight, bias, y, group, offsets[group], offsets[group + 1], out_features, in_features,
                     glu_output)


def gemm_grouped(grid, block, x, x_rows, weight, bias, y, offsets, tile_group, tile_row, out_features, in_features,
                 total_rows, swiglu_input=False):
    tile = launch.kernel_constants("matmul.cu")["TILE_M"]
    assert grid[1] == tile_group.size and grid[0] * launch.kernel_constants("matmul.cu")["TILE_N"] >= out_features
    for group, first in zip(tile_group, tile_row):
        end = offsets[group + 1] if _given(offsets) else total_rows
        _matmul_rows(x, x_rows, weight, bias, y, group, first, min(first + tile, end), out_features, in_features,
                     swiglu_input=swiglu_input)


def _attention(q, k, v, out, batch, tokens, heads, kv_heads, head_dim, q_row_stride, kv_batch_stride, kv_head_stride,
               keys, query_start, scale):
    q_rows = _rows(q, q_row_stride)[: batch * tokens, : heads * head_dim].reshape(batch, tokens, heads, head_dim)
    kk, vv = _kv_views(k, v, batch, kv_heads, keys, head_dim, kv_batch_stride, kv_head_stride)
    group = heads // kv_heads
    for b in range(batch):
        for h in range(heads):
            scores = q_rows[b, :, h] @ kk[b, h // group].T * scale  # [T, S]
            visible = np.arange(keys)[None, :] <= query_start + np.arange(tokens)[:, None]
            scores = np.where(visible, scores, -np.inf)
            weights = np.exp(scores - scores.max(-1, keepdims=True))
            weights /= weights.sum(-1, keepdims=True)
            out.reshape(batch, tokens, heads, head_dim)[b, :, h] = weights @ vv[b, h // group]


def attention_prefill(grid, block, q, k, v, out, tokens, heads, kv_heads, head_dim, q_row_stride, kv_batch_stride,
                      kv_head_stride, query_start, key_tile, scale):
    batch = grid[2]
    _attention(q, k, v, out, batch, tokens, heads, kv_heads, head_dim, q_row_stride, kv_batch_stride, kv_head_stride,
               query_start + tokens, query_start, scale)


def _kv_views(k, v, batch, kv_heads, keys, head_dim, kv_batch_stride, kv_head_stride):
    strides = (kv_batch_stride * 4, kv_head_stride * 4, head_dim * 4, 4)
    return [np.lib.stride_tricks.as_strided(a, (batch, kv_heads, keys, head_dim), strides) for a in (k, v)]


def _merge_records(records: np.ndarray) -> np.ndarray:
    """Online-softmax records ``[..., R, D + 2]`` (acc, m, l) -> the attention output ``[..., D]``."""
    acc, m, l = records[..., :-2], records[..., -2:-1], records[..., -1:]
    with np.errstate(invalid="ignore"):  # -inf - -inf for a split with no keys: weighed 0 below
        weight = np.where(m == -np.inf, 0.0, np.exp(m - m.max(-2, keepdims=True)))
    return (acc * weight).sum(-2) / (l * weight).sum(-2)


def attention_decode(grid, block, q, k, v, partial, out, heads, kv_heads, head_dim, q_row_stride, kv_batch_stride,
                     kv_head_stride, keys, position, scale):
    splits, batch = grid[0], grid[2]
    assert grid[1] == heads
    capacity = keys
    keys = int(position[0]) + 1 if _given(position) else keys
    assert keys <= capacity  # the graph path passes the whole cache and reads the count on the device
    per_split = -(-keys // splits)
    queries = _rows(q, q_row_stride)[:batch, : heads * head_dim].reshape(batch, heads, head_dim)
    kk, vv = _kv_views(k, v, batch, kv_heads, keys, head_dim, kv_batch_stride, kv_head_stride)
    group = heads // kv_heads
    records = np.zeros((batch, heads, splits, head_dim + 2), dtype=np.float32)  # each split's (acc, m, l)
    records[..., -2] = -np.inf  # a split with no keys: m = -inf, l = 0, acc = 0
    for b in range(batch):
        for h in range(heads):
            for split in range(splits):
                chunk = slice(split * per_split, min(keys, (split + 1) * per_split))
                scores = kk[b, h // group, chunk] @ queries[b, h] * scale
                if scores.size:
                    weights = np.exp(scores - scores.max())
                    records[b, h, split] = np.concatenate([weights @ vv[b, h // group, chunk],
                                                           [scores.max(), weights.sum()]])
    if splits == 1:
        out.reshape(batch, heads, head_dim)[:] = _merge_records(records)
    else:
        partial.reshape(records.shape)[:] = records


def attention_decode_merge(grid, block, partial, out, heads, head_dim, splits):
    batch = grid[1]
    out.reshape(batch, heads, head_dim)[:] = _merge_records(partial.reshape(batch, heads, splits, head_dim + 2))


def gather_rows(grid, block, weight, ids, out, rows, width):
    assert grid[0] * block[0] >= rows * width
    _rows(out, width)[:rows] = _float32(weight.reshape(-1, width)[ids.reshape(-1)[:rows]])


KERNELS = {
    "rms_norm": rms_norm, "add_rms_norm": add_rms_norm, "rope_store_kv": rope_store_kv,
    "route_topk": route_topk, "moe_dispatch": moe_dispatch, "route_dispatch": route_dispatch, "moe_combine": moe_combine,
    **{f"{kind}_grouped{glu}_{weight}": functools.partial(gemv_grouped, glu_output=bool(glu))
       for kind in ("gemv", "gemv1", "gemv1_split") for glu in ("", "_glu") for weight in ("bf16", "f32")},
    **{f"gemm_grouped{swiglu}_{weight}": functools.partial(gemm_grouped, swiglu_input=bool(swiglu))
       for swiglu in ("", "_swiglu") for weight in ("bf16", "f32")},
    "attention_prefill": attention_prefill, "attention_decode": attention_decode,
    "attention_decode_merge": attention_decode_merge, "gather_rows_bf16": gather_rows, "gather_rows_f32": gather_rows,
}
