"""How fast prefill could be with NumPy on this machine, beside how fast it is.

NumPy cannot multiply bf16 matrices: every bf16 weight is first upcast to float32
(:class:`minimoe.backend.Linear`), then multiplied with float32 BLAS.  So the fastest a
NumPy forward can go is bounded by two rates of *this* machine, measured in the same
process as the forward:

* ``gemm_flops``: float32 matrix multiply, FLOP/s, with BLAS on every core
  (``x [T, H] @ W.T [H, H]`` at the prompt's T);
* ``copy_bytes``: memory copy, bytes read + written per second, over minimoe's threads;
* ``cast_bytes``: bf16 bytes per second that NumPy's bf16 -> float32 cast reads from
  memory, over minimoe's threads, upcasting blocks the way :class:`minimoe.backend.Linear` does.

Each weight matrix ``W [rows, cols]`` that ``n`` tokens multiply costs at least
``max(2 n rows cols / gemm_flops, stored_bytes / copy_bytes)`` -- the matmul, or
streaming the stored bf16 weight from memory (2 bytes an element; its float32 copy is
made block by block in cache, so only the bf16 read has to reach memory; a weight that
is float32 from load needs no upcast), whichever is longer, as if the two overlapped
perfectly.  Attention's
scores and weighted values (``2 * 2 * T * S * heads * head_dim`` per layer, the full
``T x S`` square that minimoe computes before masking) run at the GEMM rate.  A routed
expert is counted once, with the tokens the router actually sent to it on this prompt
(:func:`expert_loads` from a trace): with few tokens per expert, experts are bound by
bandwidth; with many, by the GEMM.

The sum over the forward is the roofline time; ``measured / roofline`` is how close
minimoe is to NumPy's limit (docs/benchmarks.md explains the model and its limits).

That roofline streams the bf16 bytes at the copy bandwidth.  A copy's rate counts its
reads and its writes, while the upcast's cost is mostly the read (and the cast), so on a
machine whose cast reads slower than that rate, no NumPy code reaches it.
``cast_bound=True`` streams them at ``cast_bytes`` instead: the limit with the cast NumPy
has, which ``minimoe bench --roofline`` reports beside the first.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable

import ml_dtypes
import numpy as np

from ..backend import NUM_THREADS, SMALL_MATRIX_ELEMENTS, Linear, parallel_map, row_ranges
from ..config import ModelConfig

FLOAT32_BYTES = 4


@dataclass(frozen=True)
class Rates:
    """What this machine does per second with NumPy."""

    gemm_flops: float  # float32 matmul FLOP/s
    copy_bytes: float  # bytes read + written per second by a memory copy
    cast_bytes: float  # bf16 bytes read per second by NumPy's cast to float32


@dataclass(frozen=True)
class MatrixWork:
    """One weight matrix ``[rows, cols]`` multiplied by ``tokens`` rows of activations."""

    name: str
    rows: int
    cols: int
    tokens: int
    stored_bytes: int  # bytes per stored element: 2 for bf16 (upcast needed), 4 for float32 (none)

    @property
    def flops(self) -> int:
        return 2 * self.tokens * self.rows * self.cols

    @property
    def upcast_bytes(self) -> int:
        """Bytes of the stored weight the upcast streams from memory (0 for a weight float32 from load)."""
        if self.stored_bytes == FLOAT32_BYTES:
            return 0
        return self.rows * self.cols * self.stored_bytes


def expert_loads(expert_ids: np.ndarray, num_experts: int) -> list[np.ndarray]:
    """Tokens routed to each expert, per sparse layer.  expert_ids ``[S, T, k]`` -> S arrays ``[E]``."""
    return [np.bincount(ids[ids >= 0].reshape(-1), minlength=num_experts) for ids in expert_ids]


def prefill_work(config: ModelConfig, tokens: int, loads: Iterable[np.ndarray], stored_bytes: int = 2,
                 small_elements: int = SMALL_MATRIX_ELEMENTS) -> list[MatrixWork]:
    """Every matrix multiply of a ``tokens``-token prefill, in order.

    ``loads``: tokens per routed expert in each sparse layer (:func:`expert_loads`).
    Matrices of at most ``small_elements`` elements (the router, the shared-expert gate)
    are float32 from load time, as :class:`minimoe.backend.Linear` keeps them.
    """
    c, h = config, config.hidden_size
    q_out, kv_out = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim

    def matrix(name, rows, cols, n):
        dtype_bytes = FLOAT32_BYTES if rows * cols <= small_elements else stored_bytes
        return MatrixWork(name, rows, cols, n, dtype_bytes)

    def mlp(prefix, width, n):
        return [matrix(f"{prefix}.gate", width, h, n), matrix(f"{prefix}.up", width, h, n),
                matrix(f"{prefix}.down", h, width, n)]

    loads = iter(loads)
    work = []
    for layer in range(c.num_hidden_layers):
        p = f"layer {layer}"
        work += [matrix(f"{p} q", q_out, h, tokens), matrix(f"{p} k", kv_out, h, tokens),
                 matrix(f"{p} v", kv_out, h, tokens), matrix(f"{p} o", h, q_out, tokens)]
        if not c.is_sparse_layer(layer):
            work += mlp(f"{p} mlp", c.intermediate_size, tokens)
            continue
        work.append(matrix(f"{p} router", c.num_experts, h, tokens))
        for expert, n in enumerate(next(loads).tolist()):
            if n:
                work += mlp(f"{p} expert {expert}", c.moe_intermediate_size, n)
        if c.has_shared_expert:
            work += mlp(f"{p} shared expert", c.shared_expert_intermediate_size, tokens)
            work.append(matrix(f"{p} shared gate", 1, h, tokens))
    work.append(matrix("lm_head", c.vocab_size, h, tokens))
    return work


def attention_flops(config: ModelConfig, tokens: int) -> int:
    """Scores and weighted values of every layer over the full ``T x T`` square (a prefill from position 0)."""
    return config.num_hidden_layers * 2 * 2 * tokens * tokens * config.num_attention_heads * config.head_dim


@dataclass(frozen=True)
class Roofline:
    """The fastest NumPy prefill of a prompt, from the work and the rates."""

    tokens: int
    matmul_s: float  # matrices bound by the GEMM rate
    bandwidth_s: float  # matrices bound by the upcast's memory traffic
    attention_s: float
    rates: Rates

    @property
    def seconds(self) -> float:
        return self.matmul_s + self.bandwidth_s + self.attention_s

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def roofline(config: ModelConfig, tokens: int, loads: Iterable[np.ndarray], rates: Rates,
             stored_bytes: int = 2, small_elements: int = SMALL_MATRIX_ELEMENTS,
             cast_bound: bool = False) -> Roofline:
    """The roofline of a ``tokens``-token prefill with the given expert loads (see :func:`prefill_work`).

    The stored weights stream at the copy bandwidth, or with ``cast_bound`` at NumPy's cast rate.
    """
    stream_bytes = rates.cast_bytes if cast_bound else rates.copy_bytes
    matmul = bandwidth = 0.0
    for work in prefill_work(config, tokens, loads, stored_bytes, small_elements):
        compute, traffic = work.flops / rates.gemm_flops, work.upcast_bytes / stream_bytes
        if compute >= traffic:
            matmul += compute
        else:
            bandwidth += traffic
    return Roofline(tokens, matmul, bandwidth, attention_flops(config, tokens) / rates.gemm_flops, rates)


# --- measuring the rates --------------------------------------------------------------------

def _best_seconds(run, repeat: int) -> float:
    run()  # warm: first touch of the pages, BLAS's thread start
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def measure_gemm_flops(tokens: int, hidden: int, repeat: int = 5) -> float:
    """float32 FLOP/s of ``x [tokens, hidden] @ W.T [hidden, hidden]``, BLAS on all its threads."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((tokens, hidden), dtype=np.float32)
    w = rng.standard_normal((hidden, hidden), dtype=np.float32)
    out = np.empty((tokens, hidden), dtype=np.float32)
    seconds = _best_seconds(lambda: np.matmul(x, w.T, out=out), repeat)
    return 2 * tokens * hidden * hidden / seconds


def measure_copy_bytes(megabytes: int = 256, repeat: int = 5) -> float:
    """Memory copy bandwidth, bytes read + written per second, over minimoe's threads."""
    source = np.ones(megabytes * (1 << 20) // FLOAT32_BYTES, dtype=np.float32)
    target = np.empty_like(source)
    pieces = row_ranges(source.size, NUM_THREADS)

    def copy():
        parallel_map(lambda r: np.copyto(target[r.start:r.stop], source[r.start:r.stop]), pieces)

    return 2 * source.nbytes / _best_seconds(copy, repeat)


def measure_cast_bytes(cols: int, megabytes: int = 256, repeat: int = 5) -> float:
    """bf16 bytes per second NumPy's cast to float32 reads from memory, over minimoe's threads.

    The cast runs the way a bf16 :class:`minimoe.backend.Linear` ``[rows, cols]`` upcasts its
    weight: each thread casts its rows a block at a time into its reused float32 scratch (the
    multiply is left out).
    """
    weight = np.ones((megabytes * (1 << 20) // (2 * cols), cols), dtype=ml_dtypes.bfloat16)
    layer = Linear(weight)
    return weight.nbytes / _best_seconds(lambda: layer.in_row_blocks(lambda block, rows: None), repeat)


def measure_rates(tokens: int, hidden: int) -> Rates:
    return Rates(measure_gemm_flops(tokens, hidden), measure_copy_bytes(), measure_cast_bytes(hidden))
