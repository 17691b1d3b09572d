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
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from typing import Sequence

import numpy as np
from threadpoolctl import ThreadpoolController

from .errors import MinimoeError
from .weight_cache import WeightCache

BACKENDS = ("numpy", "cupy")

# Matrices with at most this many elements (norm weights, biases, the router,
# the shared-expert gate) are upcast once at load: they are tiny, and re-upcasting
# them on every call would cost more than the matmul itself.
SMALL_MATRIX_ELEMENTS = 1 << 18

# Rows per upcast block are chosen so that one block holds about this many
# float32 elements: 2 MiB for decode (in L2/L3 between the cast and the GEMV, and
# large enough that the per-call overhead and the threads' GIL hand-offs stay
# small), 4 MiB once there are enough tokens for the GEMM to dominate.
BLOCK_ELEMENTS_DECODE = 1 << 19
BLOCK_ELEMENTS_PREFILL = 1 << 20
PREFILL_TOKENS = 16

# The bf16 -> f32 upcast runs on one core inside NumPy, and at decode it costs more
# than the matmul.  So minimoe parallelises over row blocks itself: a matrix's rows
# are split over this many threads (NumPy releases the GIL in both the cast and the
# BLAS call), each upcasting and multiplying its own blocks, while BLAS is held to
# one thread for the duration of a forward (see `single_threaded_blas`) so that the
# two kinds of threads do not fight over the same cores.
NUM_THREADS = int(os.environ.get("MINIMOE_NUM_THREADS", 0)) or len(os.sched_getaffinity(0))


def array_module(backend: str) -> ModuleType:
    """The array module (``xp``) for a backend name."""
    if backend == "numpy":
        return np
    if backend == "cupy":
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
    decode loop; one per thread because the row blocks of a matrix are upcast in
    parallel.
    """

    def __init__(self) -> None:
        self._buffer = np.empty(0, dtype=np.float32)

    def take(self, rows: int, cols: int) -> np.ndarray:
        if self._buffer.size < rows * cols:
            self._buffer = np.empty(rows * cols, dtype=np.float32)
        return self._buffer[: rows * cols].reshape(rows, cols)


_scratch = _Scratch()
_pool: ThreadPoolExecutor | None = None
_blas: ThreadpoolController | None = None


def single_threaded_blas():
    """Context manager: BLAS uses one thread inside it (minimoe's own threads split the work)."""
    global _blas
    if _blas is None:
        _blas = ThreadpoolController()
    return _blas.limit(limits=1, user_api="blas")


_worker = threading.local()


def _in_worker() -> bool:
    return getattr(_worker, "active", False)


def _thread_pool() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(NUM_THREADS, thread_name_prefix="minimoe", initializer=_mark_worker)
    return _pool


def _mark_worker() -> None:
    _worker.active = True


def parallel_map(function, items) -> list:
    """``[function(item) for item in items]``, spread over minimoe's threads.

    Work already running on one of those threads runs serially (a worker waiting
    on its own pool would deadlock it), so callers can nest freely: the outermost
    parallel_map -- over experts, or over one matrix's row blocks -- takes the threads.
    """
    items = list(items)
    if len(items) <= 1 or NUM_THREADS <= 1 or _in_worker():
        return [function(item) for item in items]
    return list(_thread_pool().map(function, items))


def project(linears: Sequence["Linear"], x: np.ndarray) -> list[np.ndarray]:
    """``[W(x) for W in linears]``, with all their row blocks shared out over the threads as one job.

    x ``[..., in]`` -> one ``[..., out_i]`` per weight.  For independent projections of
    the same input (q/k/v, an MLP's gate/up) this is one hand-off to the threads
    instead of one per matrix, and the threads get equal shares of the total work.
    """
    flat = x.reshape(int(np.prod(x.shape[:-1])), x.shape[-1])  # not -1: x may be [N, 0] (no shared expert)
    outputs = [np.empty((flat.shape[0], linear.shape[0]), dtype=np.float32) for linear in linears]
    budget = BLOCK_ELEMENTS_DECODE if flat.shape[0] < PREFILL_TOKENS else BLOCK_ELEMENTS_PREFILL
    blocks = []  # (linear, output, first row, last row, float32 copy or None, fill the copy?)
    filled = []  # (linear, copy) to hand to the weight cache once written
    for linear, y in zip(linears, outputs):
        if linear.small:
            np.matmul(flat, linear.weight.T, out=y)
            continue
        copy, fill = linear.working_copy()
        if fill:
            filled.append((linear, copy))
        out_features, in_features = linear.shape
        rows = max(1, min(out_features, budget // in_features))
        blocks += [(linear, y, start, min(start + rows, out_features), copy, fill)
                   for start in range(0, out_features, rows)]

    def run(group):
        for linear, y, start, stop, copy, fill in group:
            linear.matmul_rows(flat, y, start, stop, copy, fill)

    try:
        parallel_map(run, balanced_groups(blocks, NUM_THREADS))  # serial when already on a worker
    except BaseException:  # an error or Ctrl-C mid-fill: hand the unfilled copies' bytes back to the budget
        for linear, copy in filled:
            linear.cache.release(copy)
        raise
    for linear, copy in filled:
        linear.cache.store(linear, copy)
    results = []
    for linear, y in zip(linears, outputs):
        if linear.bias is not None:
            y += linear.bias
        results.append(y.reshape(*x.shape[:-1], linear.shape[0]))
    return results


def balanced_groups(blocks: list, parts: int) -> list[list]:
    """Cut a list of ``(linear, y, start, stop, ...)`` blocks into at most ``parts`` contiguous
    groups of about equal work (weight elements)."""
    costs = [(block[3] - block[2]) * block[0].shape[1] for block in blocks]
    total, groups, current, done = sum(costs), [], [], 0
    for block, cost in zip(blocks, costs):
        current.append(block)
        done += cost
        if done >= total * (len(groups) + 1) / parts and len(groups) < parts - 1:
            groups.append(current)
            current = []
    if current:
        groups.append(current)
    return groups


class Linear:
    """``y = x @ W.T (+ b)`` for a weight ``W [out, in]`` kept in its stored dtype.

    ``W`` may be a memory-mapped bf16/f16 view straight from the checkpoint; it
    is read, upcast and multiplied one block of rows at a time (see :func:`project`).
    Small weights are upcast once, here, and used as float32 directly.  With a
    ``cache`` (:class:`minimoe.weight_cache.WeightCache`), the float32 copy made by a
    call is kept for the next one while the cache's byte budget allows.
    """

    def __init__(self, weight: np.ndarray, bias: np.ndarray | None = None, cache: WeightCache | None = None):
        self.small = weight.size <= SMALL_MATRIX_ELEMENTS
        if self.small:
            weight = np.asarray(weight, dtype=np.float32)
        self.weight = weight
        self.bias = None if bias is None else np.asarray(bias, dtype=np.float32)
        self.cache = None if self.small or weight.dtype == np.float32 else cache

    @property
    def shape(self) -> tuple[int, int]:
        """``(out_features, in_features)``."""
        return self.weight.shape

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x ``[..., in]`` float32 -> ``[..., out]`` float32."""
        return project([self], x)[0]

    def working_copy(self) -> tuple[np.ndarray | None, bool]:
        """Where this call's float32 rows come from, as ``(copy, fill)``.

        ``(cached copy, False)`` on a cache hit; ``(empty [out, in] array, True)`` on a
        miss the cache has made room for -- the blocks are upcast into it, and it is
        stored afterwards; ``(None, False)`` without a cache or room: blocks go through
        the scratch buffer.
        """
        if self.cache is None:
            return None, False
        copy = self.cache.lookup(self)
        if copy is not None:
            return copy, False
        copy = self.cache.allocate(self.shape)
        return copy, copy is not None

    def matmul_rows(self, x: np.ndarray, y: np.ndarray, start: int, stop: int,
                    copy: np.ndarray | None = None, fill: bool = False) -> None:
        """``y[:, start:stop] = x @ W[start:stop].T`` for x ``[N, in]``, upcasting that block of ``W``
        (into the scratch buffer, or into ``copy`` when ``fill``; a filled ``copy`` is used as it is)."""
        if copy is not None:
            block = copy[start:stop]
            if fill:
                np.copyto(block, self.weight[start:stop], casting="unsafe")  # bf16 -> f32, kept
        elif self.weight.dtype != np.float32:
            block = _scratch.take(stop - start, self.weight.shape[1])
            np.copyto(block, self.weight[start:stop], casting="unsafe")  # bf16 -> f32
        else:
            block = self.weight[start:stop]
        np.matmul(x, block.T, out=y[:, start:stop])

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Rows ``W[ids]`` as float32 (an embedding lookup): ids ``[...]`` -> ``[..., in]``."""
        return self.weight[ids].astype(np.float32)
