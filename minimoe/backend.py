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

from types import ModuleType

import numpy as np

from .errors import MinimoeError

BACKENDS = ("numpy",)

# Matrices with at most this many elements (norm weights, biases, the router,
# the shared-expert gate) are upcast once at load: they are tiny, and re-upcasting
# them on every call would cost more than the matmul itself.
SMALL_MATRIX_ELEMENTS = 1 << 18

# Rows per upcast block are chosen so that one block holds about this many
# float32 elements: 1 MiB for decode (fits in L2 beside the BLAS working set),
# 4 MiB once there are enough tokens for the GEMM to dominate.
BLOCK_ELEMENTS_DECODE = 1 << 18
BLOCK_ELEMENTS_PREFILL = 1 << 20
PREFILL_TOKENS = 16


def array_module(backend: str) -> ModuleType:
    """The array module (``xp``) for a backend name."""
    if backend == "numpy":
        return np
    if backend == "cupy":
        raise MinimoeError(
            "backend 'cupy' is not available in this version of minimoe (the GPU backend is not built yet); "
            "use backend='numpy'"
        )
    raise MinimoeError(f"unknown backend {backend!r}; choose one of {BACKENDS}")


class _Scratch:
    """One float32 buffer, grown on demand and reused by every blocked upcast.

    minimoe runs one forward at a time per process, so a single buffer suffices;
    reusing it keeps the allocator (and the page faults of fresh memory) out of
    the decode loop.
    """

    def __init__(self) -> None:
        self._buffer = np.empty(0, dtype=np.float32)

    def take(self, rows: int, cols: int) -> np.ndarray:
        if self._buffer.size < rows * cols:
            self._buffer = np.empty(rows * cols, dtype=np.float32)
        return self._buffer[: rows * cols].reshape(rows, cols)


_scratch = _Scratch()


class Linear:
    """``y = x @ W.T (+ b)`` for a weight ``W [out, in]`` kept in its stored dtype.

    ``W`` may be a memory-mapped bf16/f16 view straight from the checkpoint; it
    is read, upcast and multiplied one block of rows at a time.  Small weights
    and float32 weights are used as float32 directly.
    """

    def __init__(self, weight: np.ndarray, bias: np.ndarray | None = None):
        if weight.dtype != np.float32 and weight.size <= SMALL_MATRIX_ELEMENTS:
            weight = weight.astype(np.float32)
        self.weight = weight
        self.bias = None if bias is None else np.asarray(bias, dtype=np.float32)

    @property
    def shape(self) -> tuple[int, int]:
        """``(out_features, in_features)``."""
        return self.weight.shape

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x ``[..., in]`` float32 -> ``[..., out]`` float32."""
        lead = x.shape[:-1]
        flat = x.reshape(-1, x.shape[-1])
        if self.weight.dtype == np.float32:
            y = flat @ self.weight.T
        else:
            y = self._blocked_matmul(flat)
        if self.bias is not None:
            y += self.bias
        return y.reshape(*lead, self.weight.shape[0])

    def _blocked_matmul(self, x: np.ndarray) -> np.ndarray:
        """x ``[N, in]`` -> ``[N, out]``, upcasting ``W`` a block of rows at a time."""
        out_features, in_features = self.weight.shape
        budget = BLOCK_ELEMENTS_PREFILL if x.shape[0] >= PREFILL_TOKENS else BLOCK_ELEMENTS_DECODE
        rows = max(1, min(out_features, budget // in_features))
        y = np.empty((x.shape[0], out_features), dtype=np.float32)
        for start in range(0, out_features, rows):
            stop = min(start + rows, out_features)
            block = _scratch.take(stop - start, in_features)
            np.copyto(block, self.weight[start:stop], casting="unsafe")  # bf16 -> f32
            np.matmul(x, block.T, out=y[:, start:stop])
        return y

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Rows ``W[ids]`` as float32 (an embedding lookup): ids ``[...]`` -> ``[..., in]``."""
        return self.weight[ids].astype(np.float32)
