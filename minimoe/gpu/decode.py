"""Decode one token per sequence on fixed buffers, captured as a CUDA graph: one launch per token.

Eager decode (``model.forward([token], cache=cache)``) issues ~17 kernel launches per sparse layer
from Python and allocates every intermediate; at batch 1 that host work, not memory bandwidth, is
likely to bound the speed.  :class:`GraphDecoder` runs the same blocks with every step input on a
fixed device buffer -- the token ids, the new position (read by ``rope_store_kv`` and
``attention_decode`` on the device), its RoPE row -- and every intermediate drawn from a memory
pool of its own, so a step's kernel arguments never change.  CuPy then captures the step once
in a CUDA graph, and each token costs a few small host-to-device copies and one graph launch.

    decoder = GraphDecoder(model, cache)           # after the prompt's prefill filled `cache`
    logits = decoder([token])                      # [B, V] on the GPU, valid until the next step

With ``capture=False`` the same fixed-buffer step runs eagerly (what the CPU tests exercise: they
have no CUDA graphs).  Interventions and routing traces are not supported here: use ``forward``.
"""

from __future__ import annotations

import cupy as cp
import numpy as np

from .. import layers
from ..errors import MinimoeError
from . import kernels, launch


class GraphDecoder:
    """Greedy-friendly decode steps of a :class:`~minimoe.gpu.blocks.GpuModel` over one KV cache."""

    def __init__(self, model, cache, capture: bool = True):
        if cache.batch_size is None:
            raise MinimoeError("GraphDecoder continues a cache: run the prompt through model.forward(ids, cache=cache) first")
        if cache.batch_size > launch.kernel_constants("matmul.cu")["GEMV_MAX_ROWS"]:
            raise MinimoeError(f"the CUDA-graph decode takes batches of up to "
                               f"{launch.kernel_constants('matmul.cu')['GEMV_MAX_ROWS']} sequences "
                               f"(the expert matmuls need no host sync up to there), got {cache.batch_size}")
        self.model, self.cache, self.capture = model, cache, capture
        config = model.config
        self.tokens = cp.zeros((cache.batch_size, 1), dtype=cp.int32)  # the step's inputs, on the device
        self.position = cp.zeros(1, dtype=cp.int32)
        self.cos, self.sin = (cp.zeros((1, config.head_dim), dtype=cp.float32) for _ in range(2))
        self.graph = None
        self.captured_for = None  # (cache buffer address, capacity) the graph's pointers and splits belong to
        self.logits = None
        self.pool = self.stream = None

    def __call__(self, token_ids):
        """The next token of each sequence, ids ``[B]`` -> logits ``[B, V]`` (a view of the step's own buffer)."""
        ids = self.model.check_ids(np.asarray(token_ids).reshape(self.cache.batch_size, 1))
        cache = self.cache
        position = cache.length
        if position + 1 > self.model.config.max_position_embeddings:
            raise MinimoeError(f"{position} cached + 1 new token exceed the context of "
                               f"{self.model.config.max_position_embeddings} positions (max_position_embeddings)")
        cache.reserve(cache.batch_size, 1)  # may reallocate: the graph is then captured again
        cos, sin = layers.rope_tables(np, np.array([position]), self.model.config.head_dim, self.model.config.rope_theta)
        self.tokens[...] = ids.astype(np.int32)  # host -> device copies into the fixed buffers
        self.position[...] = np.array([position], dtype=np.int32)
        self.cos[...], self.sin[...] = cos.astype(np.float32), sin.astype(np.float32)
        if not self.capture:
            self.logits = self.step()
        elif self.captured_for != (kernels.address(cache.keys[0]), cache.capacity):
            self.capture_step()
            self.graph.launch(self.stream)
        else:
            self.graph.launch(self.stream)
        cache.advance(1)
        return self.logits[:, 0]

    def step(self):
        """One decode step on the fixed buffers -> logits ``[B, 1, V]``: :meth:`minimoe.model.Model.forward`'s
        composition for one token, the position read on the device."""
        model, cache = self.model, self.cache
        x = kernels.gather_rows(model.embed.weight, self.tokens)  # [B, 1, H]
        for layer in model.decoder:
            x = layer(cp, x, self.cos, self.sin, cache, cache.length, position=self.position)
        x = layers.rms_norm(cp, x, model.final_norm, model.config.rms_norm_eps)
        return model.lm_head(x)

    def capture_step(self) -> None:
        """Run the step once (compiling kernels and filling a private memory pool), then capture it.

        The pool is this decoder's alone, so the intermediates' addresses the graph holds are never
        handed to anything else; the capture allocates the same sizes again, all from the pool's cache.
        """
        self.pool, self.stream = cp.cuda.MemoryPool(), cp.cuda.Stream(non_blocking=True)
        with cp.cuda.using_allocator(self.pool.malloc), self.stream:
            self.step()  # warm-up: writes this step's k/v, which the graph's first launch writes again
            self.stream.synchronize()
            self.stream.begin_capture()
            self.logits = self.step()
            self.graph = self.stream.end_capture()
        self.captured_for = (kernels.address(self.cache.keys[0]), self.cache.capacity)
