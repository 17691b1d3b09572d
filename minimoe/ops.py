"""The operations a forward pass is made of, and the reference way to compute each.

:mod:`minimoe.model` composes the model from these operations, once, for every backend.
:class:`Operations` is the reference table: each operation written with the functions of
:mod:`minimoe.layers` over an array module ``xp``, its weights :class:`minimoe.backend.Linear`
matrices.  ``Operations()`` is the NumPy backend (``backend="numpy"``); ``Operations(cupy)`` runs
the very same code on a GPU (``backend="cupy-plain"``).  :class:`minimoe.gpu.ops.KernelOperations`
(``backend="cupy"``) replaces each operation with the CUDA kernels of :mod:`minimoe.gpu`, and
``python -m minimoe.gpu_check`` holds every kernel against the function here it replaces:

============================ =============================================== ==============================
operation                    reference (this file)                           kernel (minimoe/gpu/cuda/)
============================ =============================================== ==============================
``linear`` (a projection)    :class:`~minimoe.backend.Linear`                 ``gemv``/``gemm`` (matmul.cu)
``embed``                    ``Linear.rows``                                  ``gather_rows`` (matmul.cu)
``rms_norm``                 :func:`layers.rms_norm`                          ``rms_norm`` (norm.cu)
``add_rms_norm``             ``x + delta``, then :func:`layers.rms_norm`      ``add_rms_norm`` (norm.cu)
``attention_inputs``         q/k/v, q/k norm, :func:`layers.apply_rope`,      q/k/v stacked in one matmul,
                             :meth:`KVCache.update`                           ``rope_store_kv`` (rope.cu)
``attention``                :func:`layers.causal_attention`                  ``attention_*`` (attention.cu)
``swiglu``                   :func:`layers.swiglu`                            gate/up stacked, ``*_glu`` and
                                                                              ``*_swiglu`` matmuls
``route``                    :func:`layers.route`                             ``route_topk`` / ``route_dispatch``
``routed_experts``           :func:`layers.routed_experts`                    ``moe_dispatch``, grouped matmuls
``shared_expert``            :func:`layers.shared_expert`                     (its gate stacked under the router;
                                                                              itself among the experts' groups)
``moe_output``               ``residual + routed + shared``                   ``moe_combine`` (moe.cu)
============================ =============================================== ==============================

Speed on the CPU lives here, not in the model: the chosen experts, the slices of a wide MLP and the
query chunks of a long prompt run on minimoe's threads (:func:`minimoe.backend.parallel_map`), and
:class:`~minimoe.backend.Linear` spreads a matrix's rows over them.
"""

from __future__ import annotations

import contextlib
from weakref import WeakKeyDictionary

import numpy as np

from . import layers
from .backend import NUM_THREADS, DeviceLinear, Linear, parallel_map, row_ranges, single_threaded_blas

# Queries attended to at once in a long prompt (see Operations.attention): the score array of a
# chunk is [B, heads, 256, S] float32, 16 MB for Qwen1.5-MoE at S = 1024, not 64 MB.
QUERY_CHUNK = 256


class Operations:
    """The reference operations, over the array module ``xp`` (NumPy, or CuPy for ``cupy-plain``)."""

    def __init__(self, xp=np):
        self.xp = xp
        self.name = "numpy" if xp is np else "cupy-plain"
        self._wide = WeakKeyDictionary()  # SwiGLU -> its slices by inner width, one per thread (numpy only)

    # --- weights, as this backend holds them (called once, at load) ------------------------------------

    def linear(self, weight, bias=None):
        """The projection ``y = x @ W.T (+ b)`` of a stored weight ``[out, in]`` (bf16, f16 or f32)."""
        if self.xp is np:
            return Linear(weight, bias)
        return DeviceLinear(self.xp, weight, bias)

    def vector(self, values):
        """A norm's weight or a bias as float32 on this backend's device ``[n]``."""
        return self.xp.asarray(np.asarray(values, dtype=np.float32))

    def attention_weights(self, q, k, v, o, biases=None) -> tuple:
        """q, k, v, o projections from stored weights (and the q/k/v biases, or None)."""
        biases = biases or (None, None, None)
        return (*(self.linear(w, b) for w, b in zip((q, k, v), biases)), self.linear(o))

    def swiglu_weights(self, gate, up, down) -> tuple:
        """gate, up, down projections of one SwiGLU MLP (a dense layer's or the shared expert)."""
        return self.linear(gate), self.linear(up), self.linear(down)

    def moe_weights(self, router, experts, shared_gate=None, shared=None) -> tuple:
        """A sparse block's router ``[E, H]``, its experts (each a (gate, up, down) of stored weights), and the
        shared expert's gate ``[1, H]`` and (gate, up, down), or None -> (router, expert triples, shared gate,
        shared triple) as projections."""
        return (self.linear(router), [self.swiglu_weights(*mlp) for mlp in experts],
                None if shared_gate is None else self.linear(shared_gate),
                None if shared is None else self.swiglu_weights(*shared))

    def weights_replaced(self) -> None:
        """Forget what was made from the weights' arrays (the wide MLPs' slices, :meth:`swiglu`): the model's
        arrays have been replaced (:func:`minimoe.train.parameters` puts float32 copies in their place)."""
        self._wide.clear()

    # --- a forward pass --------------------------------------------------------------------------------

    def forward_context(self):
        """What a forward pass runs inside: NumPy's BLAS held to one thread (minimoe's own threads split the work)."""
        return single_threaded_blas() if self.xp is np else contextlib.nullcontext()

    def embed(self, embedding, ids):
        """The embedding rows of ``ids`` ``[B, T]`` -> ``[B, T, H]`` float32."""
        return embedding.rows(ids)

    def rms_norm(self, x, weight, eps: float):
        """:func:`minimoe.layers.rms_norm`.  x ``[..., H]`` -> ``[..., H]``."""
        return layers.rms_norm(self.xp, x, weight, eps)

    def add_rms_norm(self, x, delta, weight, eps: float):
        """The decoder layer's ``x = x + delta; h = rms_norm(x)``: x, delta ``[..., H]`` -> (x + delta, h)."""
        x = x + delta
        return x, self.rms_norm(x, weight, eps)

    def attention_inputs(self, attention, h, cos, sin, cache, layer: int, start: int):
        """Queries, keys and values for :meth:`attention`: the projections of h ``[B, T, H]``, split into heads,
        q/k-normed where the family does, rotated by RoPE (cos/sin ``[T, D]``), and the new keys and values
        added to the cache -> q ``[B, nh, T, D]``, k, v ``[B, nkv, S, D]`` (the cached positions, then these)."""
        xp, norm = self.xp, attention.qk_norm
        q, k, v = attention.q(h), attention.k(h), attention.v(h)  # [B, T, nh*D], [B, T, nkv*D], [B, T, nkv*D]
        if norm and not norm.per_head:  # OLMoE: over the whole projection
            q, k = norm(xp, q, k)
        q = layers.split_heads(q, attention.num_heads, attention.head_dim)  # [B, nh, T, D]
        k = layers.split_heads(k, attention.num_kv_heads, attention.head_dim)  # [B, nkv, T, D]
        v = layers.split_heads(v, attention.num_kv_heads, attention.head_dim)
        if norm and norm.per_head:  # Qwen3-MoE: over each head's D values
            q, k = norm(xp, q, k)
        q, k = layers.apply_rope(xp, q, cos, sin), layers.apply_rope(xp, k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # [B, nkv, S, D]
        return q, k, v

    def attention(self, q, k, v, start: int):
        """:func:`minimoe.layers.causal_attention` -> ``[B, T, nh*D]``, the queries ``QUERY_CHUNK`` at a time.

        Each chunk reads only the keys up to its own last position, so a long prompt never
        builds a ``[B, nh, T, S]`` score array and skips the masked-out upper triangle.  The
        chunks are independent: they run on the threads, the last (longest) first so that the
        threads finish together.
        """
        xp, tokens = self.xp, q.shape[2]
        if tokens <= QUERY_CHUNK:
            return layers.causal_attention(xp, q, k, v, query_start=start)

        def chunk(first: int):
            last = min(first + QUERY_CHUNK, tokens)
            return layers.causal_attention(xp, q[:, :, first:last], k[:, :, : start + last], v[:, :, : start + last],
                                           query_start=start + first)

        longest_first = range(0, tokens, QUERY_CHUNK)[::-1]
        return xp.concatenate(self.map(chunk, longest_first)[::-1], axis=1)

    def swiglu(self, mlp, h):
        """:func:`minimoe.layers.swiglu` of an MLP run on its own (a dense layer's, the shared expert):
        h ``[..., H]`` -> ``[..., H]``.

        On the CPU it runs as one slice of its inner width per thread: slice ``s`` takes its rows of
        gate and up and its columns of down, and ``down(silu(gate(h)) * up(h)) = sum_s down[:, s](silu(
        gate[s](h)) * up[s](h))``, the same MLP (tensor parallelism, as in Megatron-LM), each thread
        doing three matmuls and its share of the elementwise work.
        """
        if self.xp is not np:
            return layers.swiglu(self.xp, h, mlp.gate, mlp.up, mlp.down)
        slices = self._wide.get(mlp)
        if slices is None:
            slices = self._wide[mlp] = [(mlp.gate.row_slice(s), mlp.up.row_slice(s), mlp.down.column_slice(s))
                                        for s in row_ranges(mlp.gate.shape[0], NUM_THREADS)]
        if len(slices) == 1:
            return layers.swiglu(self.xp, h, *slices[0])
        partial = parallel_map(lambda part: layers.swiglu(self.xp, h, *part), slices)
        return sum(partial[1:], partial[0])

    def route(self, moe, h, change):
        """The router's choice for h ``[N, H]`` (:func:`minimoe.layers.route`, with the layer's interventions
        ``change``) -> :class:`minimoe.layers.RouterChoice`."""
        return layers.route(self.xp, moe.router(h), change.top_k or moe.top_k, moe.norm_topk_prob, change.disabled,
                            change.forced)

    def routed_experts(self, moe, h, choice):
        """:func:`minimoe.layers.routed_experts`: the chosen experts' weighted sum ``[N, H]``, one expert a thread."""
        return layers.routed_experts(self.xp, h, choice.expert_ids, choice.expert_weights,
                                     [self.expert(mlp) for mlp in moe.experts], self.map)

    def expert(self, mlp):
        """A routed expert as a one-argument callable ``[n, H] -> [n, H]`` (run whole: the experts share the threads)."""
        return lambda x: layers.swiglu(self.xp, x, mlp.gate, mlp.up, mlp.down)

    def shared_expert(self, moe, h, choice, on: bool):
        """:func:`minimoe.layers.shared_expert` -> (its gated output ``[N, H]``, zeros when switched off (``on``
        False), and its gate ``[N]``); zeros for both in a family without one."""
        xp = self.xp
        if moe.shared is None:
            return xp.zeros_like(h), xp.zeros(len(h), dtype=xp.float32)
        output, gate = layers.shared_expert(xp, h, lambda x: self.swiglu(moe.shared, x), moe.shared_gate)
        return (output if on else xp.zeros_like(output)), gate

    def moe_output(self, residual, routed, shared, choice):
        """``residual + routed + shared``, each ``[N, H]``: a sparse layer's output added to the residual stream."""
        return residual + routed + shared[0]

    def moe_parts(self, routed, shared, choice) -> tuple:
        """(routed ``[N, H]``, shared ``[N, H]``, the shared expert's gate ``[N]``) as :meth:`routed_experts` and
        :meth:`shared_expert` gave them: what a trace records of them."""
        return routed, shared[0], shared[1]

    def map(self, function, items) -> list:
        """``[function(item) for item in items]``: on the CPU, on minimoe's threads."""
        return parallel_map(function, items) if self.xp is np else [function(item) for item in items]
