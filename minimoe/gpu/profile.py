"""Where the GPU backend's time goes: each kernel launch timed, its bytes and FLOPs counted.

``python -m minimoe.gpu_check`` runs these after its checks; each returns plain lists and dicts
(what its JSON holds).  The times come from a pair of CUDA events around each launch
(:class:`LaunchTimer`, hooked in as :data:`minimoe.gpu.kernels.observer`): the GPU's time for
that kernel, not the host's.  CuPy's own few operations (the RoPE table) are not minimoe
kernels and are not listed; the step's wall time beside the kernels' sum shows
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
import functools
from collections import defaultdict
from typing import Callable

import cupy as cp
import numpy as np

from ..checkpoint import names
from ..config import ModelConfig
from . import kernels, launch

L2_FLUSH_BYTES = 256 << 20  # data a micro-benchmark cycles through: several times the H200's 60 MB of L2
MATMULS = tuple(f"{kind}_grouped{variant}_{weight}"
                for kind, variants in (("gemv", ("", "_glu")), ("gemv1", ("", "_glu")), ("gemv1_split", ("", "_glu")),
                                       ("gemm", ("", "_swiglu")))
                for variant in variants for weight in ("bf16", "f32"))


# --- ceilings and stand-in weights --------------------------------------------------------------

# One thread that spins for a number of clock cycles: it keeps the GPU busy while the host queues work
# behind it, so that the work then runs back to back and its events time the kernels, not the launches.
SPIN = r"""
extern "C" __global__ void spin(long long cycles) {
    const long long start = clock64();
    while (clock64() - start < cycles) {}
}
"""


@contextlib.contextmanager
def gpu_held(ms: float = 100.0):
    """The GPU kept busy for ``ms`` milliseconds while the body queues its work on the current stream (the
    body must queue it faster than that, and must not wait for the GPU)."""
    spin = cp.RawKernel(SPIN, "spin")
    cycles_per_ms = cp.cuda.runtime.getDeviceProperties(0)["clockRate"]  # kHz: cycles per millisecond
    spin((1,), (1,), (np.int64(ms * cycles_per_ms),))
    yield


def gpu_us_per_call(calls: list[Callable[[], object]], repeats: int) -> float:
    """The GPU's microseconds per call: the median over ``repeats`` calls, cycling through ``calls`` (each on
    other data, so that the L2 cache does not already hold the next call's inputs), each timed by a pair of
    CUDA events, all queued behind :func:`gpu_held` so that the host's launch time is not counted."""
    for call in calls[:2]:
        call()  # warm-up: compiles the kernels
    events = []
    with gpu_held():
        for i in range(repeats):
            start, end = cp.cuda.Event(), cp.cuda.Event()
            start.record()
            calls[i % len(calls)]()
            end.record()
            events.append((start, end))
    events[-1][1].synchronize()
    return float(np.median([1e3 * cp.cuda.get_elapsed_time(start, end) for start, end in events]))


def copy_bandwidth(nbytes: int = 2 << 30, repeats: int = 5) -> float:
    """Bytes per second a device-to-device copy of ``nbytes`` moves, counting each byte read and each
    byte written: the memory rate a kernel that streams its inputs once can reach."""
    source = cp.ones(nbytes // 4, dtype=cp.float32)
    target = cp.empty_like(source)
    us = gpu_us_per_call([lambda: cp.copyto(target, source)], repeats)
    del source, target
    cp.get_default_memory_pool().free_all_blocks()
    return 2 * nbytes / (us / 1e6)


def random_tensors(config: ModelConfig, seed: int = 0) -> Callable[[str], "cp.ndarray"]:
    """``tensor(name)`` -> random bf16 bits (uint16) of the tensor's checkpoint shape, made on the device at
    :func:`minimoe.names.random_init`'s scale: what :func:`minimoe.gpu.blocks.build_from` takes."""
    shapes = names.expected_shapes(config)
    generator = cp.random.RandomState(seed)

    def tensor(name: str):
        mean, std = names.random_init(name, shapes[name])
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
        roles |= {(E + 1, H, False): "router and shared expert gate",
                  (2 * config.shared_expert_intermediate_size, H, False): "shared expert gate/up",
                  (H, config.shared_expert_intermediate_size, False): "shared expert down",
                  (2 * config.moe_intermediate_size, H, True): "experts gate/up",
                  (H, config.moe_intermediate_size, True): "experts down"}
    return roles


def nbytes(value) -> int:
    return value.nbytes if isinstance(value, cp.ndarray) else 0


def matmul_launch(name: str, arguments: tuple) -> tuple[int, int, int, int, int]:
    """(out_features, in_features, groups the launch read, rows, input floats per row) of a gemv/gemm launch
    (its arguments in matmul.cu's GEMV_ARGS / GEMM_ARGS order)."""
    y, offsets = arguments[4], arguments[5]
    out_features, in_features = int(arguments[8]), int(arguments[9])
    out_features *= 2 if "_glu_" in name else 1  # the weight's rows: a GLU kernel's output is half of them
    width = in_features * (2 if "_swiglu_" in name else 1)  # a SwiGLU input row holds gate and up
    if not isinstance(offsets, cp.ndarray):  # one group
        return out_features, in_features, 1, y.shape[0], width
    counts = cp.asnumpy(cp.diff(offsets))
    return out_features, in_features, int((counts > 0).sum()), y.shape[0], width


def launch_label(name: str, arguments: tuple, roles: dict) -> tuple[str, int, float]:
    """(label, bytes moved, FLOPs) of one launch.  Bytes: a matmul's weight rows of the groups it read
    plus its input and output; the embedding lookup, the rows it copies; any other kernel, every array
    it is handed (each read or written once, a close count for these streaming kernels)."""
    if name in MATMULS:
        out_features, in_features, groups, rows, width = matmul_launch(name, arguments)
        weight = arguments[2]
        read = weight.nbytes // weight.shape[0] * groups
        grouped = weight.shape[0] > 1
        role = roles.get((out_features, in_features, grouped), f"{out_features}x{in_features}")
        label = f"{name} {role} ({out_features}x{in_features}{f', {groups} of {weight.shape[0]} groups' if grouped else ''})"
        x_bytes = rows * width * 4
        return label, read + x_bytes + nbytes(arguments[4]), 2.0 * rows * out_features * in_features
    if name.startswith("gather_rows"):  # arguments: the whole table, the ids, the rows out
        table, out = arguments[0], arguments[2]
        return name, out.size * table.itemsize + out.nbytes, 0.0
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

def step_profile(run: Callable[[], object], roles: dict, per: int = 1, hold: bool = True) -> dict:
    """One call of ``run`` (a forward pass) with every launch timed: the kernel table, the kernels' total
    microseconds and the GPU's span from the first kernel's start to the last one's end (kernels, CuPy's
    own operations and the gaps between them), each divided by ``per``.  ``hold``: queue the call behind
    :func:`gpu_held`, so the kernels run back to back as a CUDA graph would run them (for a call that
    never waits for the GPU: a decode step); without it, each kernel runs as the host launches it."""
    with timing_launches() as timer, (gpu_held(200.0) if hold else contextlib.nullcontext()):
        run()
    results = timer.results()
    rows = kernel_table(results, roles, per)
    first, last = timer.launches[0][2], timer.launches[-1][3]
    return {"kernels": rows, "kernel_us": sum(r["us"] for r in rows),
            "span_us": 1e3 * cp.cuda.get_elapsed_time(first, last) / per, "queued": hold}


def decode_attention_sweep(config: ModelConfig, keys_list=(577, 4096), repeats: int = 30, seed: int = 0) -> list[dict]:
    """Decode attention (one query, batch 1, the model's heads) over ``keys`` cached positions at each
    split count: the GPU's microseconds per call (with the merge; each call on another layer's keys and
    values, as in a decode step), and GB/s of the keys and values read.  ``chosen`` marks the split
    count :func:`minimoe.gpu.launch.decode_splits` picks."""
    heads, kv_heads, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    rng = cp.random.RandomState(seed)
    rows = []
    for keys in keys_list:
        q = rng.standard_normal((1, heads * D), dtype=cp.float32)
        layers_ = max(2, L2_FLUSH_BYTES // (2 * kv_heads * keys * D * 4))  # more keys and values than the L2 holds
        caches = [[rng.standard_normal((1, kv_heads, keys, D), dtype=cp.float32) for _ in range(2)]
                  for _ in range(layers_)]
        chosen = launch.decode_splits(keys, heads, 1)
        for splits in sorted({1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, chosen}):
            if splits > keys:
                continue
            calls = [functools.partial(kernels.causal_attention, q, k, v, 1, heads, D, keys - 1, splits=splits)
                     for k, v in caches]
            us = gpu_us_per_call(calls, repeats)
            rows.append({"keys": keys, "splits": splits, "blocks": splits * heads, "us": us,
                         "gb_s": 2 * caches[0][0].nbytes / (us / 1e6) / 1e9, "chosen": splits == chosen})
        del caches
    return rows


def gemv_variants(config: ModelConfig, unrolls=(1, 2, 4, 8), repeats: int = 30, seed: int = 0) -> list[dict]:
    """The one-token GEMV on the model's projections, compiled with each GEMV_UNROLL (weight loads a lane
    has in flight): the GPU's microseconds per call and GB/s of the weights read (each call reads other
    weights -- another copy, or other experts -- so none comes from the L2 cache)."""
    H, E, k = config.hidden_size, config.num_experts, config.num_experts_per_tok
    rng = cp.random.RandomState(seed)
    roles = matmul_roles(config)
    shapes = [(role, out, inp, E if grouped else 1) for (out, inp, grouped), role in roles.items()
              if role in ("attention q/k/v", "attention o", "shared expert gate/up", "shared expert down",
                          "experts gate/up", "experts down", "output head")]
    plans = [kernels.dispatch(cp.asarray(np.arange(first, first + k).reshape(1, k), dtype=cp.int32), E)
             for first in range(0, E - k + 1, k)]  # disjoint experts, call after call
    rows = []
    for role, out, inp, groups in shapes:
        x = rng.standard_normal((1, inp), dtype=cp.float32)
        if groups == 1:
            copies = max(2, -(-L2_FLUSH_BYTES // (out * inp * 2)))
            weights_ = [random_bits(rng, (1, out, inp)) for _ in range(copies)]
            calls = [functools.partial(kernels.grouped_matmul, x, w, None, None, None, None, 1) for w in weights_]
            read = out * inp * 2
        else:
            weights_ = [random_bits(rng, (groups, out, inp))]
            calls = [functools.partial(kernels.grouped_matmul, x, weights_[0], None, plan.offsets, plan.active,
                                       plan.num_active, 1, x_rows=plan.rows) for plan in plans]
            read = out * inp * 2 * k
        for unroll in unrolls:
            with compiled_with(GEMV_UNROLL=unroll):
                us = gpu_us_per_call(calls, repeats)
            rows.append({"matmul": f"{role} ({out}x{inp}{f', {k} of {groups} groups' if groups > 1 else ''})",
                         "unroll": unroll, "us": us, "weight_bytes": read, "gb_s": read / (us / 1e6) / 1e9})
        del weights_
    return rows


def random_bits(rng, shape) -> "cp.ndarray":
    """Random bf16 bit patterns (uint16) of unit normal values."""
    return (rng.standard_normal(shape, dtype=cp.float32).view(cp.uint32) >> 16).astype(cp.uint16)
