"""Check the GPU backend on a GPU machine, in one command:

    PYTHONUNBUFFERED=1 python -m minimoe.gpu_check --json gpu_check.json

1. the device: its name, and its memory's copy rate, measured (the bound below divides by it);
2. every CUDA kernel against the NumPy function it replaces, on random inputs of the
   real Qwen1.5-MoE-A2.7B's shapes (:data:`REAL_SHAPES`), and again at sizes that are no
   multiple of the kernels' blocks (:data:`ODD_SHAPES`), within :data:`TOLERANCES`;
3. full-model logits, cupy vs numpy backend, on the test fixtures and the bundled model --
   eagerly, and decoded through CUDA graphs (with the key/value splits some of them empty,
   and with the cache regrown and the step captured again);
4. one training step (:func:`minimoe.train.loss_and_grads`: the backward of :mod:`minimoe.layers` on
   CuPy, backend ``cupy-plain``) against the numpy backend's: the loss and every weight's gradient,
   on the test fixtures and the bundled model;
5. a benchmark on the real model's shapes (all 24 layers unless ``--bench-layers``), with random
   weights made on the device (or a checkpoint folder, ``--checkpoint``): prefill and decode
   tokens/s of minimoe-cupy, eagerly and as CUDA graphs, against the bandwidth bound (every byte
   a decode token reads -- weights and the KV cache -- over the measured copy rate), then where
   the time goes (:mod:`minimoe.gpu.profile`: each kernel of a decode step and of a prefill,
   decode attention at each split count, the GEMV's unrolling), then transformers (bf16, eager
   attention, same GPU) for comparison.

Every check is printed as it finishes, and the JSON is rewritten after every stage, so a run cut
off by a time limit keeps all it measured; a stage that fails becomes a failed row and the run
goes on.  The check needs only NumPy and CuPy to start (the kernel checks); the model checks
and the benchmark also read checkpoints (ml_dtypes) and tokenizers like the rest of minimoe.
Exits 0 when every check passed, 1 otherwise -- and 1, with a one-line reason (in the JSON too),
where CuPy or a GPU is missing.  ``--stages`` and ``--shapes`` run a part (e.g. the odd-shape
kernel checks under ``compute-sanitizer``).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import layers
from ..backend import import_cupy, to_numpy
from ..config import ModelConfig, shipped_configs
from ..errors import MinimoeError
from ..files import write_text
from ..gpu.launch import GPU_MODEL_TYPES
from ..inspect.params import count_parameters

REPO = Path(__file__).resolve().parent.parent.parent
FIXTURES = REPO / "tests" / "fixtures"
STAGES = ("kernels", "models", "train", "bench")

# Qwen1.5-MoE-A2.7B's shapes (minimoe/configs/qwen1.5-moe-a2.7b.json), for the kernel checks.
REAL_SHAPES = dict(hidden=2048, heads=16, head_dim=128, experts=60, moe_intermediate=1408, shared_intermediate=5632,
                   top_k=4, vocab=151936)
# Sizes that are no multiple of the blocks the kernels cut them into (the norm's 256 threads, the
# GEMM's 64x64 tiles and k-steps of 16, the GEMV's 8-wide loads, a warp's 32 lanes or experts),
# so a kernel dividing by its block size instead of the real size fails here.
ODD_SHAPES = dict(hidden=1004, heads=12, head_dim=72, experts=45, moe_intermediate=700, shared_intermediate=1500,
                  top_k=5, vocab=50001)

# Largest |gpu - numpy| / max|numpy| allowed.  Both sides read the same bf16 weights,
# upcast exactly, and accumulate in float32, so a kernel differs from NumPy only in
# the order of its float32 sums (~1e-6 relative over 2048 terms); 1e-4 leaves room for
# that and still catches any wrong index, which shows up at 1e-1.  Whole models
# compound it over layers: 1e-3, ten times finer than one bf16 rounding step (2^-8).
TOLERANCES = {"kernel": 1e-4, "model": 1e-3, "train": 1e-4}
# "train": of each tensor's largest gradient.  The backward runs the same float32 arithmetic on both sides
# (cuBLAS against OpenBLAS, summing in other orders): the CPU's gradients equal torch's to 3e-6 of each
# tensor's largest (tests/test_train_grads.py), and the GPU's should equal the CPU's as closely.
DECODE_TARGET_SPEEDUP = 3.0
DECODE_TARGET_BANDWIDTH_SHARE = 0.50  # within 2x of the bandwidth bound


@dataclass
class Check:
    name: str
    error: float  # relative error (or, for exact checks, the number of mismatches)
    tolerance: float

    @property
    def passed(self) -> bool:
        return bool(self.error <= self.tolerance)


def relative_error(got, expected) -> float:
    """max |got - expected| / max |expected|, on the host."""
    got, expected = np.asarray(to_numpy(got), dtype=np.float64), np.asarray(expected, dtype=np.float64)
    return float(np.abs(got - expected).max() / max(np.abs(expected).max(), 1e-30))


# --- arithmetic and formatting (pure Python, tested on CPU) ------------------------------------------

def decode_bytes_per_token(config: ModelConfig, bytes_per_parameter: int = 2) -> int:
    """Weight bytes one decode token must read: every active parameter except the embedding
    table, of which it reads one row, while the output head is read whole."""
    counts = count_parameters(config)
    head = config.vocab_size * config.hidden_size
    return (counts.activated_non_embedding + head + config.hidden_size) * bytes_per_parameter


def kv_bytes_per_token(config: ModelConfig, keys: float, bytes_per_value: int = 4) -> float:
    """Bytes of the KV cache one decode token reads when attending to ``keys`` positions: a key and a
    value of every key/value head at each position, in every layer (float32 on the GPU)."""
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * keys * bytes_per_value


def bandwidth_bound(bytes_per_token: float, bandwidth: float) -> float:
    """The decode tokens/s a memory rate of ``bandwidth`` bytes/s allows at batch 1 (every byte read once)."""
    return bandwidth / bytes_per_token


def format_table(header: list[str], rows: list[list]) -> str:
    """A plain-text table: columns as wide as their widest cell, numbers right-aligned."""
    cells = [[c if isinstance(c, str) else f"{c:,.4g}" if isinstance(c, float) else str(c) for c in row]
             for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = []
    for n, row in enumerate(cells):
        lines.append("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m minimoe.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", default=",".join(STAGES),
                        help=f"comma-separated stages to run, of {', '.join(STAGES)} (default: all)")
    parser.add_argument("--shapes", default="real,odd", help="kernel checks at these shapes: real, odd or both")
    parser.add_argument("--no-bench", action="store_true",
                        help="skip the benchmark (same as --stages kernels,models,train)")
    parser.add_argument("--bench-layers", type=int, default=24, help="decoder layers of the benchmark model")
    parser.add_argument("--prefill", type=int, default=512, help="prompt tokens of the benchmark")
    parser.add_argument("--decode", type=int, default=64, help="greedy decode steps of the benchmark")
    parser.add_argument("--checkpoint", type=Path, help="benchmark this real-shape checkpoint folder instead of random "
                                                        "weights made on the device")
    parser.add_argument("--no-transformers", action="store_true", help="skip the transformers comparison")
    parser.add_argument("--no-memory-pool", action="store_true",
                        help="give every array its own cudaMalloc (no CuPy pool), so that compute-sanitizer sees "
                             "each array's bounds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write every check and figure to this file (after every stage)")
    args = parser.parse_args(argv)
    args.stages = [stage.strip() for stage in args.stages.split(",") if stage.strip()]
    if args.no_bench:
        args.stages = [stage for stage in args.stages if stage != "bench"]
    args.shapes = [shape.strip() for shape in args.shapes.split(",") if shape.strip()]
    for value, allowed, option in ((args.stages, STAGES, "--stages"), (args.shapes, ("real", "odd"), "--shapes")):
        unknown = sorted(set(value) - set(allowed))
        if unknown:
            parser.error(f"{option}: unknown {', '.join(unknown)}; choose from {', '.join(allowed)}")
    return args


class Report:
    """What the run has found so far: each check printed as it finishes, and everything written to the
    JSON file (when given) after every stage -- atomically, so a killed run leaves the last whole file."""

    def __init__(self, path: Path | None):
        self.path = path
        self.data: dict = {"checks": []}
        self.checks: list[Check] = []

    def add(self, check: Check) -> None:
        self.checks.append(check)
        self.data["checks"].append({"name": check.name, "error": check.error, "tolerance": check.tolerance,
                                    "passed": check.passed})
        print(f"{'ok' if check.passed else 'FAIL':<4}  {check.error:>10.3g}  {check.tolerance:>7.0e}  {check.name}",
              flush=True)

    def add_all(self, checks) -> None:
        for check in checks:
            self.add(check)
        self.write()

    def set(self, key: str, value) -> None:
        self.data[key] = value
        self.write()

    def write(self) -> None:
        if self.path is None:
            return
        write_text(self.path, json.dumps(self.data, indent=2, default=float) + "\n")

    @property
    def failed(self) -> list[str]:
        return [check.name for check in self.checks if not check.passed]


def stage(report: Report, name: str, function, *args):
    """``function(*args)``, or -- if it raises -- a failed check saying so (traceback on stderr), so one broken
    stage leaves every other stage's figures standing."""
    try:
        return function(*args)
    except Exception as error:  # noqa: BLE001 -- reported, and the run goes on to the next stage
        traceback.print_exc()
        report.add(failure(name, error))
        report.write()
        return None


def failure(name: str, error: BaseException) -> Check:
    """A check that failed because ``name`` raised ``error``: its first line in the check's name."""
    message = str(error).splitlines()[0] if str(error) else ""
    return Check(f"{name}: raised {type(error).__name__}: {message}", float("inf"), 0)


# --- 1. kernels against their NumPy functions ------------------------------------------------------------

def bf16_matrix(rng, shape) -> np.ndarray:
    """Random bf16 bit patterns (as uint16) of a 1/sqrt(fan_in)-scaled matrix."""
    values = rng.standard_normal(shape, dtype=np.float32) / shape[-1] ** 0.5  # a Python float keeps float32
    return (values.view(np.uint32) >> 16).astype(np.uint16)  # truncation: a valid bf16 either way


def upcast(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


@dataclass
class Inputs:
    """What every kernel check draws on: CuPy, a random generator and the shapes to test at."""

    cp: object
    rng: np.random.Generator
    shapes: dict

    def f32(self, *shape) -> np.ndarray:
        return self.rng.standard_normal(shape, dtype=np.float32)

    def dev(self, array):
        return self.cp.asarray(array)


def check_norms(t: Inputs, rows: int = 300, hidden: int | None = None) -> list[Check]:
    """rms_norm and add_rms_norm over ``rows`` rows of ``hidden`` (default: the shapes' hidden size)."""
    from ..gpu import kernels

    hidden, tol = hidden or t.shapes["hidden"], TOLERANCES["kernel"]
    x, delta, w = t.f32(rows, hidden), t.f32(rows, hidden), 1 + 0.1 * t.f32(hidden)
    normed = kernels.rms_norm(t.dev(x), t.dev(w), 1e-6)
    total, normed_sum = kernels.add_rms_norm(t.dev(x), t.dev(delta), t.dev(w), 1e-6)
    width = "" if hidden == t.shapes["hidden"] else f" (hidden {hidden})"
    return [Check(f"rms_norm{width}", relative_error(normed, layers.rms_norm(np, x, w, 1e-6)), tol),
            Check(f"add_rms_norm{width}", max(relative_error(total, x + delta),
                                              relative_error(normed_sum, layers.rms_norm(np, x + delta, w, 1e-6))), tol)]


def check_rope_and_attention(t: Inputs, heads: int, kv_heads: int, tokens: int, start: int) -> list[Check]:
    """rope_store_kv, then prefill and decode attention over the cache it filled (2 sequences)."""
    from ..gpu import kernels

    D, tol = t.shapes["head_dim"], TOLERANCES["kernel"]
    rows = t.f32(2 * tokens, (heads + 2 * kv_heads) * D)  # the fused qkv output of 2 sequences
    cos, sin = layers.rope_tables(np, np.arange(start, start + tokens), D, 1e6)

    def rotated(first, count):  # the reference: heads first .. first+count-1 of rows, rotated -> [B, count, T, D]
        block = rows[:, first * D : (first + count) * D].reshape(2, tokens, -1)
        return layers.apply_rope(np, layers.split_heads(block, count, D), cos, sin)

    q, k_new = rotated(0, heads), rotated(heads, kv_heads)
    v_new = layers.split_heads(rows[:, (heads + kv_heads) * D :].reshape(2, tokens, -1), kv_heads, D)
    keys = start + tokens
    kk, vv = t.f32(2, kv_heads, keys + 5, D), t.f32(2, kv_heads, keys + 5, D)  # a cache with spare capacity
    device_rows, device_k, device_v = t.dev(rows), t.dev(kk), t.dev(vv)  # copied before the kernel writes
    kk[:, :, start:keys], vv[:, :, start:keys] = k_new, v_new  # what the cache must hold afterwards
    kernels.rope_store_kv(device_rows, t.dev(cos), t.dev(sin), device_k, device_v, start, tokens, heads, kv_heads, D)
    got = to_numpy(device_rows).reshape(2, tokens, -1, D).transpose(0, 2, 1, 3)  # [B, all heads, T, D]
    checks = [Check(f"rope_store_kv ({heads}/{kv_heads} heads): q, k in place, k and v cached", max(
        relative_error(got[:, :heads], q), relative_error(got[:, heads : heads + kv_heads], k_new),
        relative_error(device_k, kk), relative_error(device_v, vv)), tol)]
    kk, vv, device_k, device_v = kk[:, :, :keys], vv[:, :, :keys], device_k[:, :, :keys], device_v[:, :, :keys]
    out = kernels.causal_attention(device_rows, device_k, device_v, tokens, heads, D, start)
    checks.append(Check(f"attention prefill ({heads}/{kv_heads} heads, T={tokens}, S={keys})",
                        relative_error(out, layers.causal_attention(np, q, kk, vv, start)), tol))
    last = device_rows.reshape(2, tokens, -1)[:, -1:].reshape(2, -1).copy()  # decode: the last query alone
    out = kernels.causal_attention(last, device_k, device_v, 1, heads, D, keys - 1)
    checks.append(Check(f"attention decode ({heads}/{kv_heads} heads, S={keys})",
                        relative_error(out, layers.causal_attention(np, q[:, :, -1:], kk, vv, keys - 1)), tol))
    return checks


def check_decode_attention(t: Inputs, heads: int, kv_heads: int, keys: int, batch: int = 1) -> list[Check]:
    """Decode attention (one query per sequence) over ``keys`` cached positions of a larger cache,
    split over blocks and merged (flash-decoding) when the cache is long."""
    from ..gpu import kernels, launch

    D = t.shapes["head_dim"]
    q = t.f32(batch, heads, 1, D)
    kk, vv = 2 * t.f32(batch, kv_heads, keys + 3, D), t.f32(batch, kv_heads, keys + 3, D)  # spare capacity
    rows = t.dev(np.ascontiguousarray(q.transpose(0, 2, 1, 3)).reshape(batch, heads * D))
    out = kernels.causal_attention(rows, t.dev(kk)[:, :, :keys], t.dev(vv)[:, :, :keys], 1, heads, D, keys - 1)
    want = layers.causal_attention(np, q, kk[:, :, :keys], vv[:, :, :keys], keys - 1)
    splits = launch.decode_splits(keys, heads, batch)
    return [Check(f"attention decode ({heads}/{kv_heads} heads, B={batch}, S={keys}, {splits} splits)",
                  relative_error(out, want), TOLERANCES["kernel"])]


def check_moe(t: Inputs, tokens: int, experts: np.ndarray) -> list[Check]:
    """The MoE chain for ``tokens`` tokens: route (from the router's logits stacked with the shared gate's, as
    the GPU model computes them), dispatch (and both in one launch), the experts' grouped gate/up and down
    matmuls (the down one reading silu(gate) * up), combine.

    experts: a layer's stacked gate_up weights ``[E, 2I, H]`` as bf16 bits.
    """
    from ..gpu import kernels, launch

    s, tol, checks = t.shapes, TOLERANCES["kernel"], []
    E, k, H, inter = s["experts"], s["top_k"], s["hidden"], s["moe_intermediate"]
    stacked = 3 * t.f32(tokens, E + 1)  # the router's E logits, then the shared expert gate's
    logits = stacked[:, :E]
    for norm, disabled in ((False, ()), (True, (0, 5))):
        got = kernels.route(t.dev(stacked), k, norm, disabled, experts=E)
        want = layers.route(np, logits, k, norm, disabled)
        checks.append(Check(f"route (N={tokens}, norm={norm}, disabled={list(disabled)}): id mismatches",
                            int((to_numpy(got.expert_ids) != want.expert_ids).sum()), 0))
        checks.append(Check(f"route (N={tokens}, norm={norm}): probs/weights", max(
            relative_error(got.probs, want.probs), relative_error(got.expert_weights, want.expert_weights)), tol))
    want_plan = launch.dispatch_plan(want.expert_ids, E)
    plan = kernels.dispatch(t.dev(want.expert_ids.astype(np.int32)), E)
    checks.append(Check(f"moe_dispatch (N={tokens}): mismatches", plan_mismatches(plan, want_plan), 0))
    if tokens <= launch.kernel_constants("matmul.cu")["GEMV_MAX_ROWS"]:
        choice, fused = kernels.route_dispatch(t.dev(stacked), k, True, (0, 5), experts=E)
        checks.append(Check(f"route_dispatch (N={tokens}, norm=True, disabled=[0, 5]): id and plan mismatches",
                            int((to_numpy(choice.expert_ids) != want.expert_ids).sum())
                            + plan_mismatches(fused, want_plan), 0))
    checks += check_shared_groups(t, stacked, want, groups=3)

    h = t.f32(tokens, H)
    permuted = h[want_plan.rows]  # each expert's tokens contiguous
    want_out = np.zeros((tokens * k, 2 * inter), dtype=np.float32)
    for e in want_plan.active:
        rows = slice(want_plan.offsets[e], want_plan.offsets[e + 1])
        want_out[rows] = permuted[rows] @ upcast(experts[e]).T
    def grouped(x, plan, rows, x_rows=None):  # the experts' gate/up matmul over the dispatch's groups
        return kernels.grouped_matmul(x, t.dev(experts), None, plan.offsets, plan.active, plan.num_active, rows,
                                      x_rows=x_rows)

    gate_up = grouped(t.dev(h), plan, tokens, x_rows=plan.rows)
    checks.append(Check(f"grouped matmul, experts, tokens by row map (N={tokens})", relative_error(gate_up, want_out),
                        tol))
    checks.append(Check(f"grouped matmul, experts, permuted rows (N={tokens})",
                        relative_error(grouped(t.dev(permuted), plan, tokens), want_out), tol))
    down = bf16_matrix(t.rng, (E, H, inter))
    activation = layers.silu(np, want_out[:, :inter]) * want_out[:, inter:]
    want_down = np.zeros((tokens * k, H), dtype=np.float32)
    for e in want_plan.active:
        rows = slice(want_plan.offsets[e], want_plan.offsets[e + 1])
        want_down[rows] = activation[rows] @ upcast(down[e]).T
    got_down = kernels.swiglu(t.dev(h), t.dev(experts), t.dev(down), plan.offsets, plan.active, plan.num_active,
                              tokens, x_rows=plan.rows)
    checks.append(Check(f"grouped swiglu, experts: down(silu(gate) * up) (N={tokens})",
                        relative_error(got_down, want_down), tol))
    expert_out, residual, shared = t.f32(tokens * k, H), t.f32(tokens, H), t.f32(tokens, H)
    got = kernels.combine(t.dev(expert_out), plan.inv_perm, t.dev(want.expert_weights), t.dev(residual),
                          t.dev(shared), t.dev(stacked)[:, E])  # the gate's logit read in place, a column
    want_sum = launch.combine(expert_out, want_plan.inv_perm, want.expert_weights, residual, shared, stacked[:, E])
    checks.append(Check(f"moe_combine (N={tokens})", relative_error(got, want_sum), tol))
    return checks


def check_shared_groups(t: Inputs, stacked: np.ndarray, want: layers.RouterChoice, groups: int) -> list[Check]:
    """The routers with the shared expert as ``groups`` always-on experts after the E routed ones: each token's
    k choices then the groups E .., weighted by sigmoid(the gate's logit, the stacked column E); and the
    dispatch of all those slots over E + groups experts."""
    from ..gpu import kernels, launch

    tokens, E, k = stacked.shape[0], stacked.shape[1] - 1, want.expert_ids.shape[1]
    gate = np.repeat(layers.sigmoid(np, stacked[:, E:]), groups, axis=1)
    ids = np.concatenate([want.expert_ids, np.broadcast_to(E + np.arange(groups), (tokens, groups))], axis=1)
    weights = np.concatenate([want.expert_weights, gate], axis=1)
    name = f"(N={tokens}, norm=True, disabled=[0, 5], {groups} shared groups)"
    choices = [("route", kernels.route(t.dev(stacked), k, True, (0, 5), E, groups), None)]
    if tokens <= launch.kernel_constants("matmul.cu")["GEMV_MAX_ROWS"]:
        choices.append(("route_dispatch", *kernels.route_dispatch(t.dev(stacked), k, True, (0, 5), E, groups)))
    checks = []
    for kernel, choice, plan in choices:
        mismatches = int((to_numpy(choice.expert_ids) != ids).sum())
        if plan is not None:
            mismatches += plan_mismatches(plan, launch.dispatch_plan(ids, E + groups))
        checks.append(Check(f"{kernel} {name}: id{' and plan' if plan is not None else ''} mismatches", mismatches, 0))
        checks.append(Check(f"{kernel} {name}: weights", relative_error(choice.expert_weights, weights),
                            TOLERANCES["kernel"]))
    return checks


def plan_mismatches(plan, want: "launch.DispatchPlan") -> int:
    """1 unless a device dispatch plan equals the NumPy one field for field, else 0."""
    exact = all(np.array_equal(to_numpy(getattr(plan, f)), getattr(want, f))
                for f in ("counts", "offsets", "perm", "inv_perm", "rows"))
    exact &= np.array_equal(to_numpy(plan.active)[: int(to_numpy(plan.num_active)[0])], want.active)
    return 0 if exact else 1


def lower_id_first_top_k(logits: np.ndarray, top_k: int) -> np.ndarray:
    """minimoe's top-k rule, from the logits alone: the k largest, highest first, the lower expert id first
    among equal values (softmax keeps both the order and the ties).  logits ``[N, E]`` -> ``[N, k]``."""
    return np.argsort(-logits, axis=-1, kind="stable")[:, :top_k]


def check_router_ties(t: Inputs, tokens: int) -> list[Check]:
    """route_topk on integer-valued logits (many exact ties), with and without disabled experts."""
    from ..gpu import kernels

    E, k = t.shapes["experts"], t.shapes["top_k"]
    logits = t.rng.integers(-2, 3, (tokens, E)).astype(np.float32)
    disabled = tuple(range(2, E))  # two experts left, k > 2: the rest are chosen among exact zeros
    masked = logits.copy()
    masked[:, list(disabled)] = -np.inf
    mismatches = [int((to_numpy(kernels.route(t.dev(logits), k, False).expert_ids)
                       != lower_id_first_top_k(logits, k)).sum()),
                  int((to_numpy(kernels.route(t.dev(logits), k, False, disabled).expert_ids)
                       != lower_id_first_top_k(masked, k)).sum())]
    return [Check(f"route ties (N={tokens}, integer logits; all experts / 2 left): id mismatches", sum(mismatches), 0)]


def check_unusable_router_rows(t: Inputs) -> list[Check]:
    """Rows with no usable logit (all -inf, a NaN, a +inf) through route, dispatch and combine: the ids stay in
    range (experts 0..k-1, NaN weights, as layers.route gives), the other rows are untouched."""
    from ..gpu import kernels, launch

    E, k, H = t.shapes["experts"], t.shapes["top_k"], t.shapes["hidden"]
    logits = 3 * t.f32(6, E)
    logits[0], logits[1, E // 2], logits[2, 1] = -np.inf, np.nan, np.inf
    with np.errstate(invalid="ignore"):
        want = layers.route(np, logits[3:], k, True)
    choice = kernels.route(t.dev(logits), k, True)
    ids, weights = to_numpy(choice.expert_ids), to_numpy(choice.expert_weights)
    wrong = int((ids[:3] != np.arange(k)).sum() + (~np.isnan(weights[:3])).sum() + (ids[3:] != want.expert_ids).sum())
    checks = [Check("route, rows of -inf / NaN / +inf: experts 0..k-1 with NaN weights, other rows exact: mismatches",
                    wrong, 0)]
    plan = kernels.dispatch(choice.expert_ids, E)
    slots = np.arange(ids.size)
    exact = np.array_equal(np.sort(to_numpy(plan.perm)), slots) and np.array_equal(to_numpy(plan.inv_perm)[to_numpy(plan.perm)], slots)
    checks.append(Check("moe_dispatch after unusable rows: perm is a permutation (mismatches)", 0 if exact else 1, 0))
    expert_out = t.f32(ids.size, H)
    got = to_numpy(kernels.combine(t.dev(expert_out), plan.inv_perm, choice.expert_weights))
    want_out = launch.combine(expert_out, launch.dispatch_plan(ids, E).inv_perm, weights)
    checks.append(Check("moe_combine after unusable rows: NaN rows NaN, the rest", 
                        relative_error(got[3:], want_out[3:]) + float(not np.isnan(got[:3]).all()),
                        TOLERANCES["kernel"]))
    return checks


def check_linear(t: Inputs, out_features: int, tokens: int, bias: bool) -> list[Check]:
    """One bf16 projection (GEMV up to GEMV_MAX_ROWS tokens -- the one-row kernel for one -- GEMM beyond)."""
    from ..gpu.ops import GpuLinear

    H = t.shapes["hidden"]
    weight, h = bf16_matrix(t.rng, (1, out_features, H)), t.f32(tokens, H)
    b = t.f32(out_features) if bias else None
    got = GpuLinear(t.dev(weight), None if b is None else t.dev(b))(t.dev(h))
    want = h @ upcast(weight[0]).T + (0.0 if b is None else b)
    return [Check(f"linear bf16 {out_features}x{H}{' + bias' if bias else ''} (N={tokens})",
                  relative_error(got, want), TOLERANCES["kernel"])]


def check_swiglu(t: Inputs, inter: int, tokens: int) -> list[Check]:
    """A SwiGLU MLP of width ``inter`` on bf16 weights: its activation formed by the gate/up GEMV (up to
    GEMV_MAX_ROWS tokens) or by the down GEMM (beyond), against :func:`minimoe.layers.swiglu`."""
    from ..gpu import kernels

    H = t.shapes["hidden"]
    gate_up, down, h = bf16_matrix(t.rng, (1, 2 * inter, H)), bf16_matrix(t.rng, (1, H, inter)), t.f32(tokens, H)
    up = upcast(gate_up[0])
    want = layers.swiglu(np, h, lambda x: x @ up[:inter].T, lambda x: x @ up[inter:].T,
                         lambda x: x @ upcast(down[0]).T)
    got = kernels.swiglu(t.dev(h), t.dev(gate_up), t.dev(down))
    return [Check(f"swiglu bf16 {H} -> {inter} -> {H} (N={tokens})", relative_error(got, want), TOLERANCES["kernel"])]


def guarded(name: str, function, *args) -> list[Check]:
    """``function(*args)``'s checks; an exception becomes one failed check (and its traceback on stderr),
    so one broken kernel does not hide the others' results."""
    try:
        return function(*args)
    except Exception as error:  # noqa: BLE001 -- reported, and the run goes on to the next check
        traceback.print_exc()
        return [failure(name, error)]


def check_kernels(cp, rng, shapes: dict = REAL_SHAPES):
    """Each kernel wrapper of :mod:`minimoe.gpu.kernels` against its NumPy function, at ``shapes``: the
    checks, yielded as each group of them finishes."""
    t = Inputs(cp, rng, shapes)
    s = shapes
    yield from guarded("norms", check_norms, t)
    yield from guarded("norms of wide rows", check_norms, t, 3, 5000)  # more threads than 256 per row
    for heads, kv_heads, tokens, start in ((s["heads"], s["heads"], 200, 0), (s["heads"], 4, 64, 300)):
        # multi-head prefill from position 0; grouped-query continuing a cache of 300 positions
        yield from guarded(f"rope and attention ({heads}/{kv_heads} heads)", check_rope_and_attention, t, heads,
                           kv_heads, tokens, start)
    for keys in (700, 4000):  # flash-decoding: several splits per head at batch 1
        yield from guarded(f"decode attention (S={keys})", check_decode_attention, t, s["heads"], 4, keys)
    yield from guarded("router ties", check_router_ties, t, 64)
    yield from guarded("unusable router rows", check_unusable_router_rows, t)
    experts = bf16_matrix(rng, (s["experts"], 2 * s["moe_intermediate"], s["hidden"]))
    for tokens in (1, 7, 300):  # GEMV (decode), GEMV (small batch), GEMM (prefill)
        yield from guarded(f"moe (N={tokens})", check_moe, t, tokens, experts)
        yield from guarded(f"linear (N={tokens})", check_linear, t, s["shared_intermediate"], tokens, True)
        yield from guarded(f"swiglu (N={tokens})", check_swiglu, t, s["shared_intermediate"], tokens)
    yield from guarded("lm_head", check_linear, t, s["vocab"], 3, False)


# --- 2. whole models: cupy backend vs numpy backend ------------------------------------------------------

def model_folders() -> list[Path]:
    from ..assets import default_model_path

    fixtures = sorted(p.parent for p in FIXTURES.glob("*/config.json")
                      if ModelConfig.from_file(p).model_type in GPU_MODEL_TYPES)  # the families the GPU runs
    return fixtures + [Path(default_model_path())]


def check_model(folder: Path, rng) -> list[Check]:
    """Logits of the cupy and numpy backends on one model folder: a prefill, and a prefill then decode steps."""
    from ..loading import load

    cpu, gpu = load(folder), load(folder, backend="cupy")
    ids = rng.integers(0, cpu.config.vocab_size, 40)
    error = relative_error(gpu.forward(ids), cpu.forward(ids))
    caches = cpu.new_cache(), gpu.new_cache()
    cpu.forward(ids[:30], cache=caches[0]), gpu.forward(ids[:30], cache=caches[1])
    for t in range(30, 40):
        error = max(error, relative_error(gpu.forward(ids[t : t + 1], cache=caches[1]),
                                          cpu.forward(ids[t : t + 1], cache=caches[0])))
    return [Check(f"model logits: {folder.name} (prefill 40; prefill 30 + decode 10)", error, TOLERANCES["model"])]


def check_graph_decode(folder: Path, rng, capture: bool = True, prompt: int = 30, steps: int = 10,
                       capacity: int | None = None) -> list[Check]:
    """Decode through :class:`minimoe.gpu.decode.GraphDecoder` (captured as a CUDA graph, or with
    ``capture=False`` its fixed-buffer step run eagerly) against the numpy backend, token by token.

    ``capacity``: the KV cache's, which the graph's decode attention is launched over (its splits
    cover the capacity, the keys past the position are skipped on the device): 1024 after a short
    prompt leaves most splits empty; one smaller than prompt + steps makes the cache grow mid-run,
    and the step is captured again.  Between steps, the CuPy memory pool is emptied and refilled
    with other arrays, so a graph reading memory it does not own reads garbage.
    """
    import cupy as cp

    from ..loading import load
    from ..gpu.decode import GraphDecoder

    cpu, gpu = load(folder), load(folder, backend="cupy")
    ids = rng.integers(0, cpu.config.vocab_size, prompt + steps)
    caches = cpu.new_cache(capacity), gpu.new_cache(capacity)
    cpu.forward(ids[:prompt], cache=caches[0]), gpu.forward(ids[:prompt], cache=caches[1])
    decoder = GraphDecoder(gpu, caches[1], capture=capture)
    error, litter = 0.0, []
    for t in range(prompt, prompt + steps):
        error = max(error, relative_error(decoder([ids[t]]), cpu.forward(ids[t : t + 1], cache=caches[0])))
        cp.get_default_memory_pool().free_all_blocks()
        litter = [cp.full(int(n), np.nan, dtype=cp.float32) for n in rng.integers(1, 1 << 16, 8)]
    del litter
    way = "CUDA graph" if capture else "fixed buffers, eager"
    grown = caches[1].capacity > (capacity or 0) and capacity is not None
    setting = (f"capacity {caches[1].capacity}" if capacity is None
               else f"capacity {capacity}{f' grown to {caches[1].capacity}' if grown else ''}")
    checks = [Check(f"model logits: {folder.name} (prefill {prompt} + {steps} decode steps, {way}, {setting})", error,
                    TOLERANCES["model"])]
    if grown and capture:
        checks.append(Check(f"{folder.name}: the grown cache was captured again (captures - 2)",
                            abs(decoder.captures - 2), 0))
    return checks


GRAPH_DECODES = (dict(), dict(prompt=2, steps=10, capacity=1024), dict(prompt=6, steps=10, capacity=8))


def check_models(rng, folders=None):
    """:func:`check_model` and :func:`check_graph_decode` (each of :data:`GRAPH_DECODES`) on each folder
    (default: the test fixtures and the bundled model): the checks, yielded model by model."""
    for folder in folders or model_folders():
        yield from guarded(folder.name, check_model, folder, rng)
        for setting in GRAPH_DECODES:
            yield from guarded(f"{folder.name} graph decode {setting}",
                               functools.partial(check_graph_decode, **setting), folder, rng)


# --- 3. one training step: the backward on the GPU ------------------------------------------------------------

def training_folders() -> list[Path]:
    """The test fixtures of every family minimoe can train (:func:`minimoe.train.parameters.missing_backward`; on
    the reference operations, so not only the GPU kernels' families) and the bundled model."""
    from ..assets import default_model_path
    from ..train.parameters import missing_backward

    return sorted(p.parent for p in FIXTURES.glob("*/config.json")
                  if missing_backward(ModelConfig.from_file(p)) is None) + [Path(default_model_path())]


def check_training_step(folder: Path, rng, batch: int = 2, tokens: int = 24) -> list[Check]:
    """One training step on ``folder``'s model, backend ``cupy-plain`` (the layer backwards on CuPy; the CUDA
    kernels have none) against the numpy backend: the loss, and the worst gradient over every tensor (its
    largest |gpu - numpy| over its largest |numpy|).  The name gives the batch's smallest top-k margin over
    all sparse layers: a top-k decided by less than float32's rounding may pick another expert on the GPU."""
    from ..hooks import Recorder
    from ..loading import load
    from ..train import loss_and_grads

    cpu, gpu = load(folder), load(folder, backend="cupy-plain")
    ids = rng.integers(0, cpu.config.vocab_size, (batch, min(tokens, cpu.config.max_position_embeddings)))
    loss, grads = loss_and_grads(cpu, ids)
    gpu_loss, gpu_grads = loss_and_grads(gpu, ids)
    errors = {name: relative_error(gpu_grads[name], grad) for name, grad in grads.items() if np.abs(grad).max() > 0}
    errors.update({name: float(np.abs(to_numpy(gpu_grads[name])).max() > 0)  # zero on the CPU: zero here too
                   for name, grad in grads.items() if not np.abs(grad).max() > 0})
    worst = max(errors, key=errors.get)
    recorder = Recorder()
    cpu.forward(ids, record=recorder)
    k, margins = cpu.config.num_experts_per_tok, []
    for layer in cpu.config.sparse_layers:
        descending = -np.sort(-recorder.joined("router_probs", layer), axis=-1)  # [N, E]
        margins.append((descending[:, k - 1] - descending[:, k]).min() if k < descending.shape[1] else np.inf)
    margin = f", top-k margin {min(margins):.1e}" if margins else ""
    setting = f"{folder.name} (batch {ids.shape[0]} x {ids.shape[1]}{margin})"
    return [Check(f"training step loss: {setting}", abs(gpu_loss - loss) / abs(loss), TOLERANCES["train"]),
            Check(f"training step gradients, worst of {len(grads)}: {setting}: {worst}", errors[worst],
                  TOLERANCES["train"])]


def check_training(rng, folders=None):
    """:func:`check_training_step` on each folder (default: the test fixtures and the bundled model)."""
    for folder in folders or training_folders():
        yield from guarded(f"{folder.name} training step", check_training_step, folder, rng)


# --- 4. the benchmark -------------------------------------------------------------------------------------------

def device_info(cp) -> dict:
    """The GPU's name and size, the software, and its memory's copy rate (measured: the bound's denominator)."""
    from ..gpu import profile

    properties = cp.cuda.runtime.getDeviceProperties(0)
    name = properties["name"]
    return {"name": name.decode() if isinstance(name, bytes) else str(name),
            "multiprocessors": int(properties["multiProcessorCount"]),
            "memory_gb": int(properties["totalGlobalMem"]) / 1e9,
            "compute_capability": f"{properties['major']}.{properties['minor']}",
            "cupy": cp.__version__, "cuda_runtime": cp.cuda.runtime.runtimeGetVersion(),
            "cuda_driver": cp.cuda.runtime.driverGetVersion(), "copy_gb_s": profile.copy_bandwidth() / 1e9}


def format_device(info: dict) -> str:
    return (f"Device: {info['name']}, {info['multiprocessors']} SMs, {info['memory_gb']:.0f} GB, compute capability "
            f"{info['compute_capability']}; CuPy {info['cupy']}, CUDA runtime {info['cuda_runtime']}, driver "
            f"{info['cuda_driver']}; device-to-device copy {info['copy_gb_s']:,.0f} GB/s (read + written)")


def benchmark_model(cp, args):
    """(config, model, its source) of the benchmark: the ``--checkpoint`` folder, or the shipped Qwen1.5-MoE-A2.7B
    config with ``--bench-layers`` layers and random weights made on the device."""
    from ..loading import load

    if args.checkpoint:
        model = load(args.checkpoint, backend="cupy")
        return model.config, model, str(args.checkpoint)
    from ..loading import build
    from ..gpu import profile
    from ..gpu.ops import KernelOperations

    raw = json.loads(shipped_configs()["qwen1.5-moe-a2.7b"].read_text()) | {"num_hidden_layers": args.bench_layers}
    config = ModelConfig.from_dict(raw, source="qwen1.5-moe-a2.7b")
    model = build(config, profile.random_tensors(config, args.seed), KernelOperations())
    return config, model, "random weights (made on the GPU)"


def time_decode(cp, model, prompt: np.ndarray, steps: int, graph: bool) -> dict:
    """Greedy decode after ``prompt``, eagerly (``model.forward``) or through a captured CUDA graph
    (:class:`~minimoe.gpu.decode.GraphDecoder`): tokens/s, the tokens, minimoe's kernel launches per
    token (a graph replay counts none), the host's time per token -- until the step returns, before
    the GPU finishes; near the whole time per token means the host, not the GPU, bounds decode --
    and, for a graph, how long capturing it took."""
    from ..gpu import kernels
    from ..gpu.decode import GraphDecoder

    cache = model.new_cache(capacity=len(prompt) + steps + 1)  # no growth mid-run (a graph would be re-captured)
    token = int(model.forward(prompt, cache=cache)[-1].argmax())
    step = GraphDecoder(model, cache) if graph else (lambda ids: model.forward(ids, cache=cache))
    token = int(step([token])[-1].argmax())  # warm-up (and the capture)
    cp.cuda.Device().synchronize()
    launches, host, tokens = kernels.launches, 0.0, []
    started = time.perf_counter()
    for _ in range(steps):
        t0 = time.perf_counter()
        logits = step([token])
        host += time.perf_counter() - t0
        token = int(logits[-1].argmax())  # the host needs the token: a sync, as in generation
        tokens.append(token)
    elapsed = time.perf_counter() - started
    result = {"decode_tok_s": steps / elapsed, "ms_per_token": 1e3 * elapsed / steps,
              "launches_per_token": (kernels.launches - launches) / steps, "host_ms_per_token": 1e3 * host / steps,
              "tokens": tokens}
    if graph:
        result["capture_s"] = step.capture_seconds
    return result


def time_prefill(cp, model, prompt: np.ndarray, repeats: int = 3) -> float:
    """Prefill tokens/s: the best of ``repeats`` forward passes over ``prompt`` into a fresh cache."""
    best = float("inf")
    for _ in range(repeats):
        cp.cuda.Device().synchronize()
        t0 = time.perf_counter()
        int(model.forward(prompt, cache=model.new_cache(capacity=len(prompt)))[-1].argmax())
        best = min(best, time.perf_counter() - t0)
    return len(prompt) / best


def time_minimoe(cp, model, prompt: np.ndarray, decode: int, report: Report, bench: dict) -> None:
    """Prefill, eager decode and CUDA-graph decode, each into ``bench["minimoe"]`` (written as it is measured);
    the graph's tokens are held to the eager decode's."""
    ours = bench["minimoe"] = {}
    time_decode(cp, model, prompt[:16], 2, graph=False)  # compile the kernels (NVRTC; cached on disk afterwards)
    ours["prefill_tok_s"] = time_prefill(cp, model, prompt)
    ours["eager"] = time_decode(cp, model, prompt, decode, graph=False)
    ours["memory_gb"] = cp.get_default_memory_pool().total_bytes() / 1e9
    report.write()
    print(f"minimoe: prefill {ours['prefill_tok_s']:,.0f} tok/s; eager decode {ours['eager']['decode_tok_s']:,.1f} "
          f"tok/s", flush=True)
    try:
        ours["graph"] = time_decode(cp, model, prompt, decode, graph=True)
    except Exception as error:  # noqa: BLE001 -- the eager figures stand; say why there is no graph row
        traceback.print_exc()
        ours["graph"] = {"error": f"CUDA-graph decode failed: {type(error).__name__}: {error}"}
        report.add(failure("CUDA-graph decode of the benchmark model", error))
    else:
        eager, graph = ours["eager"]["tokens"], ours["graph"]["tokens"]
        report.add(Check(f"benchmark: CUDA-graph decode's {len(graph)} tokens equal the eager decode's (mismatches)",
                         sum(a != b for a, b in zip(eager, graph)), 0))
        print(f"minimoe: CUDA-graph decode {ours['graph']['decode_tok_s']:,.1f} tok/s (captured in "
              f"{ours['graph']['capture_s']:.2f} s)", flush=True)
    report.write()


def profile_minimoe(cp, model, prompt: np.ndarray, report: Report, bench: dict) -> None:
    """Where minimoe's time goes (:mod:`minimoe.gpu.profile`), each part into ``bench["profile"]`` as it is
    measured: one decode step's kernels at the benchmark's context, a prefill's kernels, decode attention at
    577 and 4k keys over split counts, the GEMV at each unrolling."""
    from ..gpu import profile

    config = model.config
    roles = profile.matmul_roles(config)
    result = bench["profile"] = {}
    cache = model.new_cache(capacity=len(prompt) + 64)
    model.forward(prompt, cache=cache)
    for _ in range(bench["decode_steps"] // 2):  # the middle of the timed decode's context
        model.forward([1], cache=cache)
    result["decode_step"] = profile.step_profile(lambda: model.forward([1], cache=cache), roles)
    result["decode_step"]["keys"] = cache.length
    report.write()
    print("\n" + format_kernels(f"One eager decode step at {cache.length} keys, per kernel", result["decode_step"]),
          flush=True)
    result["prefill"] = profile.step_profile(lambda: model.forward(prompt, cache=model.new_cache(len(prompt))), roles)
    result["prefill"]["tokens"] = len(prompt)
    report.write()
    print("\n" + format_kernels(f"One prefill of {len(prompt)} tokens, per kernel", result["prefill"]), flush=True)
    result["decode_attention"] = profile.decode_attention_sweep(config)
    report.write()
    print("\n" + format_table(["keys", "splits", "blocks", "us", "GB/s", "chosen"],
                              [[r["keys"], r["splits"], r["blocks"], r["us"], r["gb_s"], "<-" if r["chosen"] else ""]
                               for r in result["decode_attention"]]), flush=True)
    result["gemv"] = profile.gemv_variants(config)
    report.write()
    print("\n" + format_table(["GEMV, one token", "unroll", "us", "weight MB", "GB/s"],
                              [[r["matmul"], r["unroll"], r["us"], r["weight_bytes"] / 1e6, r["gb_s"]]
                               for r in result["gemv"]]), flush=True)


def format_kernels(title: str, step: dict) -> str:
    rows = [[r["kernel"], r["launches"], r["us"], r["bytes"] / 1e6, r["gb_s"], r["tflop_s"]] for r in step["kernels"]]
    return (f"{title} (kernels' sum {step['kernel_us']:,.0f} us):\n"
            + format_table(["kernel", "launches", "us", "MB", "GB/s", "TFLOP/s"], rows))


def time_transformers(source, prompt: np.ndarray, decode: int, random_weights: bool) -> dict:
    """transformers' prefill and decode on the same GPU (scripts/transformers_reference.py), or why not.
    Any failure on that side -- missing, loading, out of memory, an API change -- is reported here, as
    an error with its traceback, and never touches minimoe's figures."""
    from .bench import reference_module

    try:
        return reference_module().time_on_gpu(source, prompt, decode, random_weights=random_weights)
    except Exception as error:  # noqa: BLE001 -- the comparison is optional; minimoe's figures stand
        return {"error": f"transformers could not be timed: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}",
                "traceback": traceback.format_exc()}


def run_benchmark(cp, args, report: Report) -> None:
    """The benchmark stage, each part written to the report as it is measured: the setting and the bound,
    minimoe's rates, its profile, then transformers'."""
    config, model, source = benchmark_model(cp, args)
    steps = args.decode
    mean_keys = args.prefill + (steps + 3) / 2  # the timed steps attend to prefill + 2 .. prefill + steps + 1 keys
    weight_bytes, kv_bytes = decode_bytes_per_token(config), kv_bytes_per_token(config, mean_keys)
    copy_rate = report.data["device"]["copy_gb_s"] * 1e9
    bench = {"source": source, "layers": config.num_hidden_layers, "prefill_tokens": args.prefill,
             "decode_steps": steps, "mean_keys": mean_keys, "weight_bytes_per_token": weight_bytes,
             "kv_bytes_per_token": kv_bytes, "copy_gb_s": copy_rate / 1e9,
             "bound_tok_s": bandwidth_bound(weight_bytes + kv_bytes, copy_rate)}
    report.set("benchmark", bench)
    print(f"\nBenchmark: {config.num_hidden_layers} layers of Qwen1.5-MoE-A2.7B's shapes, {source}; bound "
          f"{bench['bound_tok_s']:,.0f} tok/s", flush=True)
    rng = np.random.default_rng(args.seed)
    prompt = rng.integers(0, config.vocab_size, args.prefill)
    stage(report, "benchmark: minimoe", time_minimoe, cp, model, prompt, steps, report, bench)
    stage(report, "benchmark: profile", profile_minimoe, cp, model, prompt, report, bench)
    del model
    cp.get_default_memory_pool().free_all_blocks()
    if args.no_transformers:
        bench["transformers"] = {"error": "not run (--no-transformers)"}
    else:
        with tempfile.TemporaryDirectory(prefix="minimoe-bench-") as scratch:
            folder = args.checkpoint
            if folder is None:  # transformers builds the same config with its own random weights
                folder = Path(scratch)
                raw = json.loads(shipped_configs()["qwen1.5-moe-a2.7b"].read_text()) | {"num_hidden_layers": config.num_hidden_layers}
                (folder / "config.json").write_text(json.dumps(raw))
            bench["transformers"] = time_transformers(folder, prompt, steps, random_weights=args.checkpoint is None)
        if "traceback" in bench["transformers"]:
            print(bench["transformers"]["traceback"], file=sys.stderr)
    report.write()
    print("\n" + format_benchmark(bench), flush=True)


def benchmark_rows(ours: dict, theirs: dict, bound: float) -> list[list]:
    """The benchmark's table rows: each engine's rates and memory, minimoe's decode (eager and, when
    measured, as a CUDA graph) against both targets."""
    rows = []
    engines = []
    if "eager" in ours:
        engines.append(("minimoe (cupy), eager decode", {**ours, **ours["eager"]}))
    if "graph" in ours:
        engines.append(("minimoe (cupy), CUDA-graph decode", ours["graph"] if "error" in ours["graph"]
                        else {**ours, **ours["graph"]}))
    for engine, result in engines + [("transformers (bf16, eager)", theirs)]:
        if "error" in result:
            rows.append([engine, result["error"], "", "", "", ""])
            continue
        row = [engine, result["prefill_tok_s"], result["decode_tok_s"], result["memory_gb"], "", ""]
        if engine.startswith("minimoe"):
            speedup = result["decode_tok_s"] / theirs["decode_tok_s"] if "error" not in theirs else float("nan")
            row[4] = f"{speedup:.2f}x (target >= {DECODE_TARGET_SPEEDUP:g}x)"
            row[5] = (f"{result['decode_tok_s'] / bound:.0%} of {bound:,.0f} "
                      f"(target >= {DECODE_TARGET_BANDWIDTH_SHARE:.0%})")
        rows.append(row)
    return rows


def launch_rows(ours: dict) -> list[list]:
    """Decode's host side, per token: minimoe's kernel launches and the host's time, eager and as a graph."""
    rows = []
    for way in ("eager", "graph"):
        result = ours.get(way)
        if result is None or "error" in result:
            continue
        rows.append(["CUDA graph" if way == "graph" else way, result["decode_tok_s"], result["launches_per_token"],
                     result["host_ms_per_token"], result["ms_per_token"]])
    return rows


def format_benchmark(result: dict) -> str:
    """The benchmark's caption and table."""
    header = ["engine", "prefill tok/s", "decode tok/s", "GPU memory GB", "decode vs transformers",
              "decode vs bandwidth bound"]
    per_token = (result["weight_bytes_per_token"] + result["kv_bytes_per_token"]) / 1e9
    return (f"Benchmark: {result['layers']} layers of Qwen1.5-MoE-A2.7B's shapes ({result['source']}); prefill "
            f"{result['prefill_tokens']} tokens, then {result['decode_steps']} greedy decode steps, batch 1.  Bound = "
            f"{per_token:.2f} GB per token ({result['weight_bytes_per_token'] / 1e9:.2f} GB of bf16 weights + "
            f"{result['kv_bytes_per_token'] / 1e9:.2f} GB of float32 KV cache at {result['mean_keys']:.0f} keys) / "
            f"{result['copy_gb_s']:,.0f} GB/s measured.\n"
            f"Memory: minimoe = CuPy pool held, transformers = torch peak allocated.\n"
            + format_table(header, benchmark_rows(result.get("minimoe", {}), result.get("transformers", {"error": "not run"}),
                                                  result["bound_tok_s"]))
            + "\n\nDecode per token on the host (kernel launches: minimoe's own; a graph replay is one launch):\n"
            + format_table(["decode", "tok/s", "kernel launches", "host ms", "wall ms"],
                           launch_rows(result.get("minimoe", {}))))


def main(argv=None) -> int:
    args = parse_args(argv)
    report = Report(args.json)
    started = time.perf_counter()
    try:
        cp = import_cupy()
    except MinimoeError as error:
        print(f"gpu_check: nothing to check here: {error}", file=sys.stderr)
        report.set("error", str(error))
        return 1
    if args.no_memory_pool:
        cp.cuda.set_allocator(None)
    rng = np.random.default_rng(args.seed)
    info = stage(report, "device", device_info, cp)
    report.set("device", info)
    if info:
        print(format_device(info), flush=True)
    print(f"{'':<4}  {'error':>10}  {'tol':>7}  check", flush=True)
    if "kernels" in args.stages:
        for label, shapes in (("real", REAL_SHAPES), ("odd", ODD_SHAPES)):
            if label in args.shapes:
                report.add_all(Check(f"[{label}] {check.name}", check.error, check.tolerance)
                               for check in check_kernels(cp, rng, shapes))
    if "models" in args.stages:
        report.add_all(check_models(rng))
    if "train" in args.stages:
        report.add_all(check_training(rng))
    if "bench" in args.stages and info:
        stage(report, "benchmark", run_benchmark, cp, args, report)
    failed = report.failed
    print(f"\n{len(report.checks) - len(failed)}/{len(report.checks)} checks passed in "
          f"{time.perf_counter() - started:.0f} s" + (f"; FAILED: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
