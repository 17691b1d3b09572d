"""The array-module abstraction and the weight matrices that live on it.

Every layer function in :mod:`minimoe.layers` takes an array module ``xp``
(NumPy here; CuPy for the GPU backend) and never names NumPy directly.  What
differs between backends is how a *stored* weight -- bf16 in the checkpoint --
meets a float32 activation.  That is :class:`Linear`'s job.

On the CPU we keep every large weight in its stored dtype, memory-mapped from the
checkpoint, and upcast it to float32 in blocks of rows into one reused scratch
buffer right before the BLAS call.  The block stays in cache between the upcast
and the matmul, the model never holds a float32 copy of itself, and the
checkpoint's bytes are read only when a layer (or an expert) actually runs.

Work is spread over minimoe's threads with :func:`parallel_map`: the rows of one
matrix here, and, in the blocks of :mod:`minimoe.model`, whole pieces of a layer
(the chosen experts, the slices of a wide MLP, the query chunks of attention).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType

import numpy as np

from .errors import MinimoeError

BACKENDS = ("numpy", "cupy", "cupy-plain")  # cupy: minimoe's CUDA kernels; cupy-plain: minimoe.layers on CuPy

# Matrices with at most this many elements (norm weights, biases, the router,
# the shared-expert gate) are upcast once at load: they are tiny, and re-upcasting
# them on every call would cost more than the matmul itself.
SMALL_MATRIX_ELEMENTS = 1 << 18

# Each thread upcasts its rows of a weight this many float32 elements at a time (8 MiB),
# in one NumPy call.  Few, large calls matter more than keeping the block in L2: the
# threads take turns holding the GIL between calls, and on two cores each hand-off costs
# a few microseconds, as much as a small call's work (measured on the 2-layer real-shape
# checkpoint, 64-token prefill: the routed experts took 0.51 s upcast 64 rows at a time,
# 0.35 s a whole matrix at a time).
UPCAST_ELEMENTS = 1 << 21

# OpenBLAS multiplies small matrices (M * N * K up to 100^3) with a kernel of its own that
# skips packing; above that a skinny product takes the packed path, 2-3x slower per weight
# element with 2-12 tokens (measured, one core: 64 rows x 4 tokens x 2048 at 10 G weight
# elements/s, 128 rows at 3.6).  So with fewer than FEW_TOKENS tokens an upcast block is
# multiplied in pieces that stay under this bound; with more, in one call.
SMALL_GEMM_MNK = 100 ** 3
FEW_TOKENS = 16

# OpenBLAS multiplies a float32 block up to twice as fast as W @ x.T ([out, N]) as
# x @ W.T ([N, out]) when x has few rows: measured 3.0 vs 1.7 G weight elements/s at 4
# tokens, 106 vs 85 GFLOP/s at 64, about even at 1024.  Below this many tokens each piece
# computes the transposed product and its thread writes it back into the output's columns
# (N * rows, small beside the piece's rows * in); above it the copy would cost more than the gain.
WEIGHT_FIRST_BELOW_TOKENS = 256

# The bf16 -> f32 upcast runs on one core inside NumPy, and at decode it costs more
# than the matmul.  So minimoe runs its own threads, this many (NumPy releases the GIL in
# both the cast and the BLAS call): a matrix's rows are split over them, each thread
# upcasting and multiplying its own blocks, and the model's blocks hand them whole
# pieces of a layer (see `parallel_map`), while BLAS is held to one thread for the
# duration of a forward (see `single_threaded_blas`) so that the two kinds of threads
# do not fight over the same cores.  The math in minimoe.layers stays sequential.
NUM_THREADS = int(os.environ.get("MINIMOE_NUM_THREADS", 0)) or len(os.sched_getaffinity(0))


def array_module(backend: str) -> ModuleType:
    """The array module (``xp``) for a backend name."""
    if backend == "numpy":
        return np
    if backend in ("cupy", "cupy-plain"):
        return import_cupy()
    raise MinimoeError(f"unknown backend {backend!r}; choose one of {BACKENDS}")


def import_cupy() -> ModuleType:
    """CuPy, once it is known to work here; MinimoeError saying what is missing otherwise.

    Imported only when the cupy backend is asked for: ``import minimoe`` never needs CuPy.
    """
    try:
        import cupy
    except ImportError as error:
        raise MinimoeError(
            "backend 'cupy' needs CuPy, which is not installed: pip install -e '.[gpu]' "
            "(cupy-cuda12x; cupy-cuda13x for CUDA 13), or use backend='numpy'"
        ) from error
    try:
        devices = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:  # CUDARuntimeError when there is no driver or no device
        raise MinimoeError(f"backend 'cupy': CuPy is installed but finds no usable GPU ({error}); "
                           "use backend='numpy'") from error
    if devices == 0:
        raise MinimoeError("backend 'cupy': CuPy is installed but this machine has no GPU; use backend='numpy'")
    return cupy


def to_numpy(x) -> np.ndarray:
    """A NumPy array of ``x``, copied from the GPU when it is a CuPy array (the cupy backend's logits)."""
    return x.get() if hasattr(x, "__cuda_array_interface__") else np.asarray(x)


class _Scratch(threading.local):
    """A float32 buffer per thread, grown on demand and reused by every blocked upcast.

    Reusing it keeps the allocator (and the page faults of fresh memory) out of the
    decode loop; one per thread because the rows of a matrix are upcast in parallel.
    """

    def __init__(self) -> None:
        self._buffer = np.empty(0, dtype=np.float32)

    def take(self, rows: int, cols: int) -> np.ndarray:
        if self._buffer.size < rows * cols:
            self._buffer = np.empty(rows * cols, dtype=np.float32)
        return self._buffer[: rows * cols].reshape(rows, cols)


_scratch = _Scratch()


class _WorkerFlag(threading.local):
    flag = False  # True in minimoe's own pool threads


_in_worker = _WorkerFlag()
_pool: ThreadPoolExecutor | None = None
_blas = None  # threadpoolctl's controller, made at first use (the GPU backend never needs it)


def single_threaded_blas():
    """Context manager: BLAS uses one thread inside it (minimoe's own threads split the work)."""
    global _blas
    if _blas is None:
        from threadpoolctl import ThreadpoolController

        _blas = ThreadpoolController()
    return _blas.limit(limits=1, user_api="blas")


def parallel_map(function, items) -> list:
    """``[function(item) for item in items]``, spread over minimoe's threads.

    Called from inside one of those threads (a :class:`Linear` inside an expert that
    runs on its own thread), it runs the items right there: the threads are already busy.
    """
    global _pool
    items = list(items)
    if len(items) <= 1 or _in_worker.flag:
        return [function(item) for item in items]
    if _pool is None:
        _pool = ThreadPoolExecutor(NUM_THREADS, thread_name_prefix="minimoe", initializer=_mark_worker)
    return list(_pool.map(function, items))


def _mark_worker() -> None:
    _in_worker.flag = True


def small_gemm_rows(tokens: int, cols: int) -> int:
    """Rows of a ``[rows, cols]`` weight that ``tokens`` tokens multiply within OpenBLAS's small kernel.

    The most rows with rows * tokens * cols <= ``SMALL_GEMM_MNK`` (at least one).
    """
    return max(1, SMALL_GEMM_MNK // (max(tokens, 1) * cols))


def row_ranges(rows: int, parts: int) -> list[range]:
    """``range(rows)`` cut into at most ``parts`` contiguous, near-equal pieces (one per thread)."""
    parts = max(1, min(parts, rows))
    bounds = [rows * i // parts for i in range(parts + 1)]
    return [range(start, stop) for start, stop in zip(bounds[:-1], bounds[1:])]


class Linear:
    """``y = x @ W.T (+ b)`` for a weight ``W [out, in]`` kept in its stored dtype.

    ``W`` may be a memory-mapped bf16/f16 view straight from the checkpoint.  A call
    splits ``W``'s rows over minimoe's threads; each thread upcasts its rows to
    float32 8 MiB at a time into a reused scratch buffer and multiplies that
    block, so the model never holds a float32 copy of itself and a
    weight's bytes are read only when it is used.  Small weights (norms, the router,
    the shared-expert gate) are upcast once, here, and used as float32 directly.
    """

    def __init__(self, weight: np.ndarray, bias: np.ndarray | None = None):
        self.small = weight.size <= SMALL_MATRIX_ELEMENTS
        if self.small:
            weight = np.asarray(weight, dtype=np.float32)
        self.weight = weight
        self.bias = None if bias is None else np.asarray(bias, dtype=np.float32)

    @property
    def shape(self) -> tuple[int, int]:
        """``(out_features, in_features)``."""
        return self.weight.shape

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x ``[..., in]`` float32 -> ``[..., out]`` float32."""
        flat = x.reshape(-1, x.shape[-1])  # [N, in]
        tokens, out_features = flat.shape[0], self.shape[0]
        if self.small:
            y = flat @ self.weight.T
        else:
            y = np.empty((tokens, out_features), dtype=np.float32)  # [N, out]
            weight_first = tokens < WEIGHT_FIRST_BELOW_TOKENS

            def multiply(w, rows: slice) -> None:
                if weight_first:  # [rows, N] = W[rows] @ x.T, transposed into y's columns by this thread
                    y[:, rows] = self.weight_first_product(w, flat).T
                else:
                    np.matmul(flat, w.T, out=y[:, rows])

            self.in_row_blocks(multiply)
        if self.bias is not None:
            y += self.bias
        return y.reshape(*x.shape[:-1], out_features)

    def in_row_blocks(self, multiply) -> None:
        """``multiply(W[rows] as float32, rows)`` over all of ``W``'s rows, shared out over the threads.

        Each thread upcasts its rows ``UPCAST_ELEMENTS`` at a time into its reused scratch
        buffer and hands ``multiply`` each upcast block.
        """
        cols = self.shape[1]
        upcast_rows = max(1, UPCAST_ELEMENTS // cols)

        def run(rows: range) -> None:
            for start in range(rows.start, rows.stop, upcast_rows):
                stop = min(start + upcast_rows, rows.stop)
                block = self.weight[start:stop]
                if block.dtype != np.float32:  # bf16 -> f32, into this thread's reused buffer
                    block = _scratch.take(stop - start, cols)
                    np.copyto(block, self.weight[start:stop], casting="unsafe")
                multiply(block, slice(start, stop))

        parallel_map(run, row_ranges(self.shape[0], NUM_THREADS))

    @staticmethod
    def weight_first_product(block: np.ndarray, x: np.ndarray) -> np.ndarray:
        """``block @ x.T``: block ``[R, in]``, x ``[N, in]`` -> ``[R, N]``.

        With fewer than ``FEW_TOKENS`` tokens the block is multiplied as a stack of pieces of
        :func:`small_gemm_rows` rows: one ``np.matmul`` for the whole stack (NumPy calls BLAS
        once per piece without coming back to Python, so without a GIL hand-off between
        pieces) and one for the rows left over.
        """
        rows, tokens = block.shape[0], x.shape[0]
        piece = small_gemm_rows(tokens, block.shape[1])
        if tokens >= FEW_TOKENS or piece >= rows:  # one call: many tokens, or a block of one piece
            return block @ x.T
        stacked = rows // piece * piece
        out = np.empty((rows, tokens), dtype=np.float32)
        np.matmul(block[:stacked].reshape(-1, piece, block.shape[1]), x.T,
                  out=out[:stacked].reshape(-1, piece, tokens))  # [pieces, piece, N]
        if stacked < rows:
            np.matmul(block[stacked:], x.T, out=out[stacked:])
        return out

    def row_slice(self, rows: range) -> "Linear":
        """The output features ``rows`` of this layer: ``W[rows]`` (a view, no copy) and their bias."""
        bias = None if self.bias is None else self.bias[rows.start:rows.stop]
        return Linear(self.weight[rows.start:rows.stop], bias)

    def column_slice(self, columns: range) -> "Linear":
        """The part of this layer that reads input features ``columns``: ``W[:, columns]``.

        The column slices' outputs add up to the layer's, so a bias (which would be added once
        per slice) has no place in them.
        """
        if self.bias is not None:
            raise ValueError("column slices of a layer with a bias do not add up to the layer")
        return Linear(self.weight[:, columns.start:columns.stop])

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Rows ``W[ids]`` as float32 (an embedding lookup): ids ``[...]`` -> ``[..., in]``."""
        return self.weight[ids].astype(np.float32)


class DeviceLinear:
    """``y = x @ W.T (+ b)`` on a GPU array module (CuPy), with plain matmuls: ``backend="cupy-plain"``.

    The weight is copied to the device once, as float32 (the stored bf16 values upcast exactly), so
    the device runs :mod:`minimoe.layers` as NumPy does; ``backend="cupy"`` keeps bf16 and runs
    minimoe's own kernels instead (:mod:`minimoe.gpu`).
    """

    def __init__(self, xp, weight: np.ndarray, bias: np.ndarray | None = None):
        self.xp = xp
        self.weight = xp.asarray(np.asarray(weight, dtype=np.float32))
        self.bias = None if bias is None else xp.asarray(np.asarray(bias, dtype=np.float32))

    @property
    def shape(self) -> tuple[int, int]:
        """``(out_features, in_features)``."""
        return self.weight.shape

    def __call__(self, x):
        """x ``[..., in]`` float32 -> ``[..., out]`` float32."""
        y = x @ self.weight.T
        return y if self.bias is None else y + self.bias

    def rows(self, ids):
        """Rows ``W[ids]`` (an embedding lookup): ids ``[...]`` -> ``[..., in]``."""
        return self.weight[self.xp.asarray(ids)]
