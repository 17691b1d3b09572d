"""Decode one token per sequence on fixed buffers, captured as a CUDA graph: one launch per token.

Eager decode (``model.forward([token], cache=cache)``) issues 12 kernel launches per sparse layer
from Python and allocates every intermediate; at batch 1 that host work, not memory bandwidth,
bounds the speed.  :class:`GraphDecoder` runs the same forward pass with every step input on a
fixed device buffer -- the token ids, the new position (read by ``rope_store_kv`` and
``attention_decode`` on the device), its RoPE row -- and every intermediate drawn from a memory
pool of its own, so a step's kernel arguments never change.  CuPy then captures the step once
in a CUDA graph, and each token costs one small host-to-device copy and one graph launch.

    decoder = GraphDecoder(model, cache)           # after the prompt's prefill filled `cache`
    logits = decoder([token])                      # [B, V] on the GPU, valid until the next step

With ``capture=False`` the same fixed-buffer step runs eagerly (what the CPU tests exercise: they
have no CUDA graphs).  Interventions and routing traces are not supported here: use ``forward``.
"""

from __future__ import annotations

import time

import cupy as cp
import numpy as np

from .. import layers
from ..errors import MinimoeError
from . import kernels, launch
from .ops import KernelOperations


class GraphDecoder:
    """Decode steps of a model loaded with ``backend="cupy"`` over one KV cache, each one graph launch."""

    def __init__(self, model, cache, capture: bool = True):
        if cache.batch_size is None:
            raise MinimoeError("GraphDecoder continues a cache: run the prompt through model.forward(ids, cache=cache) first")
        if model.backend != "cupy":
            raise MinimoeError(f"GraphDecoder runs a model loaded with backend='cupy', not {model.backend!r}")
        if cache.batch_size > launch.kernel_constants("matmul.cu")["GEMV_MAX_ROWS"]:
            raise MinimoeError(f"the CUDA-graph decode takes batches of up to "
                               f"{launch.kernel_constants('matmul.cu')['GEMV_MAX_ROWS']} sequences "
                               f"(the expert matmuls need no host sync up to there), got {cache.batch_size}")
        self.model, self.cache, self.capture = model, cache, capture
        config = model.config
        # The step's inputs, on the device in one buffer (one copy per token): the token ids [B], the
        # position [1] and its RoPE row's cos and sin [D] each (float32 bits in int32 slots).
        batch, D = cache.batch_size, config.head_dim
        self.inputs = cp.zeros(batch + 1 + 2 * D, dtype=cp.int32)
        self.tokens = self.inputs[:batch].reshape(batch, 1)
        self.position = self.inputs[batch : batch + 1]
        self.cos = self.inputs[batch + 1 : batch + 1 + D].view(cp.float32).reshape(1, D)
        self.sin = self.inputs[batch + 1 + D :].view(cp.float32).reshape(1, D)
        self.ops = KernelOperations(position=self.position)  # the kernels read the position on the device
        self.graph = None
        self.captured_for = None  # (cache buffer address, capacity) the graph's pointers and splits belong to
        self.captures, self.capture_seconds = 0, 0.0  # how often the step was captured, and how long that took
        self.logits = None
        self.pool = None
        self.stream = cp.cuda.Stream(non_blocking=True) if capture else None  # graphs are captured off the null stream

    def __call__(self, token_ids):
        """The next token of each sequence, ids ``[B]`` -> logits ``[B, V]`` (a view of the step's own buffer)."""
        ids = self.model.check_ids(np.asarray(token_ids).reshape(self.cache.batch_size, 1))
        cache, config = self.cache, self.model.config
        position = cache.length
        if position + 1 > config.max_position_embeddings:
            raise MinimoeError(f"{position} cached + 1 new token exceed the context of "
                               f"{config.max_position_embeddings} positions (max_position_embeddings)")
        cache.reserve(cache.batch_size, 1)  # may reallocate: the graph is then captured again
        cos, sin = layers.rope_tables(np, np.array([position]), config.head_dim, config.rope_theta)
        if not self.capture:
            self.set_inputs(ids, position, cos, sin)
            self.logits = self.step()
        else:
            caller = cp.cuda.get_current_stream()
            self.stream.wait_event(caller.record())  # the caller is done with the last step's logits
            with self.stream:
                self.set_inputs(ids, position, cos, sin)
                if self.captured_for != (kernels.address(cache.keys[0]), cache.capacity):
                    self.capture_step()
                self.graph.launch(self.stream)
            caller.wait_event(self.stream.record())  # the caller's next work sees this step's logits
        cache.advance(1)
        return self.logits[:, 0]

    def set_inputs(self, ids: np.ndarray, position: int, cos: np.ndarray, sin: np.ndarray) -> None:
        """The step's inputs copied into the fixed buffer: one host-to-device copy, on the current stream."""
        host = np.concatenate([ids.reshape(-1).astype(np.int32), [np.int32(position)],
                               cos.astype(np.float32).reshape(-1).view(np.int32),
                               sin.astype(np.float32).reshape(-1).view(np.int32)])
        kernels.upload(self.inputs, host)

    def step(self):
        """One decode step on the fixed buffers -> logits ``[B, 1, V]``: the model's own forward pass
        (:meth:`minimoe.model.Model.run`), its operations reading the position on the device."""
        model = self.model
        return model.run(self.ops, self.ops.embed(model.embed, self.tokens), self.cos, self.sin, self.cache,
                         self.cache.length)

    def capture_step(self) -> None:
        """Capture the step as a CUDA graph, on this decoder's stream.

        Run first with the default allocator (compiling the kernels), then once from a memory pool
        of this decoder's own, then captured: the capture allocates the same sizes again, all from
        that pool's cache, and as nothing else draws from the pool, the addresses the graph holds
        are never handed out to anything else.  Every other address the graph holds belongs to
        something this decoder keeps alive: the model's weights, the cache's buffers (a new buffer
        means a new capture) and the step's inputs.  No launch reads a device array cached
        elsewhere (a plain projection passes no dispatch arrays), which another owner could free.
        The warm-ups write this step's k/v, which the graph's first launch writes again.
        """
        started = time.perf_counter()
        self.step()
        self.pool = cp.cuda.MemoryPool()
        with cp.cuda.using_allocator(self.pool.malloc):
            self.step()
            self.stream.synchronize()
            self.stream.begin_capture()
            self.logits = self.step()
            self.graph = self.stream.end_capture()
        self.captured_for = (kernels.address(self.cache.keys[0]), self.cache.capacity)
        self.stream.synchronize()
        self.captures += 1
        self.capture_seconds += time.perf_counter() - started
