"""Where the GPU backend's time goes: each kernel launch timed, its bytes and FLOPs counted.

``python -m minimoe.gpu_check`` runs these after its checks; each returns plain lists and dicts
(what its JSON holds).  The times come from a pair of CUDA events around each launch
(:class:`LaunchTimer`, hooked in as :data:`minimoe.gpu.kernels.observer`): the GPU's time for
that kernel, not the host's.  CuPy's own few operations (the final norm, the RoPE table) are
not minimoe kernels and are not listed; the step's wall time beside the kernels' sum shows
them and the gaps between launches together.

    with timing_launches() as timer:
        model.forward([token], cache=cache)
    rows = kernel_table(timer.results(), matmul_roles(model.config))

It also holds the ceilings the figures are held to: :func:`copy_bandwidth` measures the
device's memory rate, and :func:`random_tensors` gives a benchmark model random weights of the
real shapes generated on the device (no checkpoint to write or read).
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Callable

import cupy as cp
import numpy as np

from .. import weights
from ..config import ModelConfig
from . import kernels, launch

MATMULS = ("gemv_grouped_bf16", "gemv_grouped_f32", "gemm_grouped_bf16", "gemm_grouped_f32")


# --- ceilings and stand-in weights --------------------------------------------------------------

def elapsed_ms(function: Callable[[], object], repeats: int) -> float:
    """The GPU's milliseconds per call of ``function`` (launching work on the current stream), the
    median of ``repeats`` calls after one warm-up."""
    function()
    times = []
    for _ in range(repeats):
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        function()
        end.record()
        end.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, end))
    return float(np.median(times))


def copy_bandwidth(nbytes: int = 2 << 30, repeats: int = 5) -> float:
    """Bytes per second a device-to-device copy of ``nbytes`` moves, counting each byte read and each
    byte written: the memory rate a kernel that streams its inputs once can reach."""
    source = cp.ones(nbytes // 4, dtype=cp.float32)
    target = cp.empty_like(source)
    ms = elapsed_ms(lambda: cp.copyto(target, source), repeats)
    del source, target
    cp.get_default_memory_pool().free_all_blocks()
    return 2 * nbytes / (ms / 1e3)


def random_tensors(config: ModelConfig, seed: int = 0) -> Callable[[str], "cp.ndarray"]:
    """``tensor(name)`` -> random bf16 bits (uint16) of the tensor's checkpoint shape, made on the device at
    :func:`minimoe.weights.random_init`'s scale: what :func:`minimoe.gpu.blocks.build_from` takes."""
    shapes = weights.expected_shapes(config)
    generator = cp.random.RandomState(seed)

    def tensor(name: str):
        mean, std = weights.random_init(name, shapes[name])
        values = generator.standard_normal(shapes[name], dtype=cp.float32) * std + mean
        return (values.view(cp.uint32) >> 16).astype(cp.uint16)  # truncated to bf16: a valid bf16 either way

    return tensor


# --- timing each launch --------------------------------------------------------------------------

class LaunchTimer:
    """A :data:`minimoe.gpu.kernels.observer` that brackets each launch with two CUDA events."""

    def __init__(self):
        self.launches = []  # (kernel name, its arguments, start event, end event)

    def __call__(self, name, launch_, args, kwargs):
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        result = launch_(*args, **kwargs)
        end.record()
        self.launches.append((name, args[2], start, end))  # args: (grid, block, kernel arguments)
        return result

    def results(self) -> list[tuple[str, tuple, float]]:
        """(name, kernel arguments, microseconds) per launch, in launch order (after the GPU finishes)."""
        cp.cuda.Device().synchronize()
        return [(name, arguments, 1e3 * cp.cuda.get_elapsed_time(start, end))
                for name, arguments, start, end in self.launches]


@contextlib.contextmanager
def timing_launches():
    """Every minimoe kernel launched inside is timed: ``with timing_launches() as timer: ...``."""
    timer = LaunchTimer()
    kernels.observer = timer
    try:
        yield timer
    finally:
        kernels.observer = None


@contextlib.contextmanager
def compiled_with(**defines):
    """Kernels launched inside are compiled with these ``#define`` overrides (e.g. ``GEMV_UNROLL=1``)."""
    kernels.variant = tuple(f"{name}={value}" for name, value in defines.items())
    try:
        yield
    finally:
        kernels.variant = ()


# --- what each launch did ------------------------------------------------------------------------

def matmul_roles(config: ModelConfig) -> dict[tuple[int, int, bool], str]:
    """What a matmul of ``(out_features, in_features, grouped)`` is in this model."""
    H, D, E = config.hidden_size, config.head_dim, config.num_experts
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    roles = {((heads + 2 * kv_heads) * D, H, False): "attention q/k/v", (H, heads * D, False): "attention o",
             (config.vocab_size, H, False): "output head", (2 * config.intermediate_size, H, False): "dense MLP gate/up",
             (H, config.intermediate_size, False): "dense MLP down"}
    if config.sparse_layers:
        roles |= {(E, H, False): "router", (1, H, False): "shared expert gate",
                  (2 * config.shared_expert_intermediate_size, H, False): "shared expert gate/up",
                  (H, config.shared_expert_intermediate_size, False): "shared expert down",
                  (2 * config.moe_intermediate_size, H, True): "experts gate/up",
                  (H, config.moe_intermediate_size, True): "experts down"}
    return roles


def nbytes(value) -> int:
    return value.nbytes if isinstance(value, cp.ndarray) else 0


def matmul_launch(arguments: tuple) -> tuple[int, int, int, int]:
    """(out_features, in_features, groups the launch read, rows) of a gemv/gemm launch's arguments
    (their order in matmul.cu's GEMV_ARGS / GEMM_ARGS)."""
    weight, y, offsets = arguments[2], arguments[4], arguments[5]
    out_features, in_features = int(arguments[8]), int(arguments[9])
    if not isinstance(offsets, cp.ndarray):  # one group
        return out_features, in_features, 1, y.shape[0]
    counts = cp.asnumpy(cp.diff(offsets))
    return out_features, in_features, int((counts > 0).sum()), y.shape[0]


def launch_label(name: str, arguments: tuple, roles: dict) -> tuple[str, int, float]:
    """(label, bytes moved, FLOPs) of one launch.  Bytes: a matmul's weight rows of the groups it read
    plus its input and output; any other kernel, every array it is handed (each read or written
    once, a close count for these streaming kernels)."""
    if name in MATMULS:
        out_features, in_features, groups, rows = matmul_launch(arguments)
        weight = arguments[2]
        read = weight.nbytes // weight.shape[0] * groups
        grouped = weight.shape[0] > 1
        role = roles.get((out_features, in_features, grouped), f"{out_features}x{in_features}")
        label = f"{name} {role} ({out_features}x{in_features}{f', {groups} of {weight.shape[0]} groups' if grouped else ''})"
        x_bytes = rows * in_features * 4
        return label, read + x_bytes + nbytes(arguments[4]), 2.0 * rows * out_features * in_features
    return name, sum(nbytes(a) for a in arguments), 0.0


def kernel_table(results: list[tuple[str, tuple, float]], roles: dict, per: int = 1) -> list[dict]:
    """Launches grouped by label, most time first: launches, microseconds, bytes, GB/s, TFLOP/s -- each
    divided by ``per`` (e.g. tokens, for a per-token table)."""
    table = defaultdict(lambda: {"launches": 0, "us": 0.0, "bytes": 0, "flops": 0.0})
    for name, arguments, us in results:
        label, moved, flops = launch_label(name, arguments, roles)
        row = table[label]
        row["launches"] += 1
        row["us"] += us
        row["bytes"] += moved
        row["flops"] += flops
    rows = []
    for label, row in sorted(table.items(), key=lambda item: -item[1]["us"]):
        seconds = row["us"] / 1e6
        rows.append({"kernel": label, "launches": row["launches"] / per, "us": row["us"] / per,
                     "bytes": row["bytes"] / per, "gb_s": row["bytes"] / seconds / 1e9 if seconds else 0.0,
                     "tflop_s": row["flops"] / seconds / 1e12 if seconds else 0.0})
    return rows


# --- the measurements ----------------------------------------------------------------------------

def step_profile(run: Callable[[], object], roles: dict, per: int = 1) -> dict:
    """One call of ``run`` (a forward pass) with every launch timed: the kernel table and the kernels'
    total microseconds (divided by ``per``)."""
    with timing_launches() as timer:
        run()
    rows = kernel_table(timer.results(), roles, per)
    return {"kernels": rows, "kernel_us": sum(r["us"] for r in rows)}


def decode_attention_sweep(config: ModelConfig, keys_list=(577, 4096), repeats: int = 50, seed: int = 0) -> list[dict]:
    """Decode attention (one query, batch 1, the model's heads) over ``keys`` cached positions at each
    split count: microseconds per call (with the merge), and GB/s of the keys and values read.
    ``chosen`` marks the split count :func:`minimoe.gpu.launch.decode_splits` picks."""
    heads, kv_heads, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    rng = cp.random.RandomState(seed)
    rows = []
    for keys in keys_list:
        q = rng.standard_normal((1, heads * D), dtype=cp.float32)
        k, v = (rng.standard_normal((1, kv_heads, keys, D), dtype=cp.float32) for _ in range(2))
        chosen = launch.decode_splits(keys, heads, 1)
        for splits in sorted({1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, chosen}):
            if splits > keys:
                continue
            us = 1e3 * elapsed_ms(lambda: kernels.causal_attention(q, k, v, 1, heads, D, keys - 1, splits=splits),
                                  repeats)
            rows.append({"keys": keys, "splits": splits, "blocks": splits * heads, "us": us,
                         "gb_s": (k.nbytes + v.nbytes) / (us / 1e6) / 1e9, "chosen": splits == chosen})
    return rows


def gemv_variants(config: ModelConfig, unrolls=(1, 4), repeats: int = 20, seed: int = 0) -> list[dict]:
    """The decode GEMV (one token) on the model's projections, compiled with each GEMV_UNROLL (weight
    loads a lane has in flight): microseconds and GB/s of the weights read, per variant."""
    H, E, k = config.hidden_size, config.num_experts, config.num_experts_per_tok
    rng = cp.random.RandomState(seed)
    roles = matmul_roles(config)
    shapes = [(role, out, inp, E if grouped else 1) for (out, inp, grouped), role in roles.items()
              if role in ("attention q/k/v", "attention o", "shared expert gate/up", "shared expert down",
                          "experts gate/up", "experts down", "output head")]
    chosen = kernels.dispatch(cp.asarray((np.arange(k) * (E // k)).reshape(1, k), dtype=cp.int32), E)
    rows = []
    for role, out, inp, groups in shapes:
        weight = (rng.standard_normal((groups, out, inp), dtype=cp.float32).view(cp.uint32) >> 16).astype(cp.uint16)
        x = rng.standard_normal((1, inp), dtype=cp.float32)
        if groups == 1:
            def call():
                return kernels.grouped_matmul(x, weight, None, None, None, None, 1)
            read = weight.nbytes
        else:
            def call():
                return kernels.grouped_matmul(x, weight, None, chosen.offsets, chosen.active, chosen.num_active, 1,
                                              x_rows=chosen.rows)
            read = weight.nbytes // groups * k
        for unroll in unrolls:
            with compiled_with(GEMV_UNROLL=unroll):
                us = 1e3 * elapsed_ms(call, repeats)
            rows.append({"matmul": f"{role} ({out}x{inp}{f', {k} of {groups} groups' if groups > 1 else ''})",
                         "unroll": unroll, "us": us, "weight_bytes": read, "gb_s": read / (us / 1e6) / 1e9})
        del weight
    return rows
