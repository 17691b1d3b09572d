"""The Qwen2-MoE model: the one composition of the forward pass, for every backend.

Per decoder layer, in one residual stream ``x [B, T, H]``:

    h = rms_norm(x);  x += attention(h)            # RoPE, multi-head or grouped-query, KV cache
    h = rms_norm(x);  x += moe(h)  or  mlp(h)      # sparse layers: routed experts + gated shared expert

then a final norm and the output head: ``[B, T, H] -> [B, T, V]``.  The blocks below say
what is computed, in which order, through the operations of a backend (``ops``): the
reference :class:`minimoe.ops.Operations` writes each with :mod:`minimoe.layers` (on NumPy,
or on CuPy), :class:`minimoe.gpu.ops.KernelOperations` with CUDA kernels.  How a weight
multiplies, which pieces run on which thread, which steps one kernel fuses: that is the
backend's business, not this file's.  :func:`minimoe.load` builds a model from a checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from . import layers
from .checkpoint.reader import Checkpoint
from .config import ModelConfig
from .errors import MinimoeError
from .hooks import NO_INTERVENTIONS, OUTPUT, Interventions, LayerInterventions, Recorder
from .ops import Operations

Projection = layers.Projection  # x [..., in] -> [..., out]: a weight matrix as the backend holds it


# --- the KV cache ------------------------------------------------------------------

class KVCache:
    """Keys and values of every layer for the positions seen so far, preallocated.

    Per layer, ``keys``/``values`` are ``[B, nkv, capacity, D]`` float32.  Writing a
    step copies its new rows into place; when capacity runs out it doubles (up to the
    context length), so decoding never concatenates per token.  ``length`` is the
    number of positions stored, i.e. the position of the next token.
    """

    def __init__(self, config: ModelConfig, capacity: int | None = None, xp=np):
        self.config = config
        self.xp = xp
        self.max_length = config.max_position_embeddings
        self.capacity = min(capacity or 256, self.max_length)
        self.length = 0
        self.batch_size: int | None = None
        self.keys: list = []
        self.values: list = []

    def _allocate(self, batch_size: int, capacity: int) -> None:
        c = self.config
        shape = (batch_size, c.num_key_value_heads, capacity, c.head_dim)
        new_keys = [self.xp.zeros(shape, dtype=self.xp.float32) for _ in range(c.num_hidden_layers)]
        new_values = [self.xp.zeros(shape, dtype=self.xp.float32) for _ in range(c.num_hidden_layers)]
        for old, new in zip(self.keys + self.values, new_keys + new_values):
            new[:, :, : self.length] = old[:, :, : self.length]
        self.keys, self.values, self.capacity = new_keys, new_values, capacity

    def reserve(self, batch_size: int, new_tokens: int) -> None:
        """Make room for ``new_tokens`` more positions of a ``batch_size`` batch."""
        if self.batch_size is None:
            self.batch_size = batch_size
        elif batch_size != self.batch_size:
            raise MinimoeError(f"this cache holds a batch of {self.batch_size} sequences, got a batch of {batch_size}")
        needed = self.length + new_tokens
        if not self.keys or needed > self.capacity:
            capacity = self.capacity
            while capacity < needed:
                capacity *= 2
            self._allocate(batch_size, min(capacity, self.max_length))

    def update(self, layer: int, k, v):
        """Store k, v ``[B, nkv, T, D]`` after the cached positions; return all ``[B, nkv, S, D]``."""
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, tokens: int) -> None:
        """Mark ``tokens`` new positions as stored (after every layer has written them)."""
        self.length += tokens


# --- the blocks ----------------------------------------------------------------------

@dataclass
class QKNorm:
    """RMSNorm on queries and keys before RoPE (OLMoE, Qwen3-MoE; Qwen2-MoE has none).

    ``per_head`` False (OLMoE): one norm over the whole q projection ``[.., nh*D]`` and
    one over k; True (Qwen3-MoE): one ``[D]`` weight applied to each head's vector.
    """

    q_weight: np.ndarray
    k_weight: np.ndarray
    per_head: bool
    eps: float

    def __call__(self, xp, q, k):
        """RMSNorm of q and k over their last axis (a whole projection, or one head's ``D``)."""
        return layers.rms_norm(xp, q, self.q_weight, self.eps), layers.rms_norm(xp, k, self.k_weight, self.eps)


@dataclass(eq=False)
class Attention:
    """Multi-head (or grouped-query) causal self-attention with RoPE, over the KV cache."""

    q: Projection  # H -> nh * D (with a bias in Qwen2)
    k: Projection  # H -> nkv * D
    v: Projection  # H -> nkv * D
    o: Projection  # nh * D -> H
    num_heads: int
    num_kv_heads: int
    head_dim: int
    qk_norm: QKNorm | None = None
    clip_qkv: float | None = None  # DBRX: q, k, v clamped to [-clip_qkv, clip_qkv] after their projections
    sliding_window: int | None = None  # Mistral: each query sees only the last sliding_window positions

    def __call__(self, ops: Operations, h, cos, sin, cache: KVCache | None, layer: int, start: int):
        """h ``[B, T, H]`` -> ``[B, T, H]``; the new keys and values go into ``cache`` when given."""
        q, k, v = ops.attention_inputs(self, h, cos, sin, cache, layer, start)  # projected, RoPE'd, cached
        if self.sliding_window is None:
            return self.o(ops.attention(q, k, v, start))  # [B, T, nh*D] -> [B, T, H]
        # (only the reference operations take a window: the CUDA kernels' families have none)
        return self.o(ops.attention(q, k, v, start, window=self.sliding_window))


@dataclass(eq=False)
class SwiGLU:
    """A SwiGLU MLP, ``down(silu(gate(h)) * up(h))``: a dense layer's, an expert, or the shared expert.

    ``activation`` names another gate activation (:data:`minimoe.layers.ACTIVATIONS`): Gemma's
    ``gelu_tanh`` makes it a GeGLU.
    """

    gate: Projection  # H -> I
    up: Projection  # H -> I
    down: Projection  # I -> H
    activation: str = "silu"

    def __call__(self, ops: Operations, h):
        """h ``[..., H]`` -> ``[..., H]``."""
        return ops.swiglu(self, h)


@dataclass(eq=False)
class SparseMoeBlock:
    """Router + routed experts (+ the sigmoid-gated shared expert, in Qwen2-MoE).

    Every family here routes alike (softmax over all experts, top k, weights
    renormalised iff ``norm_topk_prob``: divided by their ``topk_norm_p``-norm, their sum
    but in a DBRX configured otherwise); Mixtral, OLMoE, Qwen3-MoE and DBRX have no shared
    expert (``shared`` None), and their traces show its gate and output as 0; DeepSeekMoE's
    has no gate (``shared_gate`` None), and its traces show a gate of 1.
    """

    router: Projection  # H -> E, no bias
    experts: Sequence[SwiGLU]
    shared: SwiGLU | None
    shared_gate: Projection | None  # H -> 1
    top_k: int
    norm_topk_prob: bool
    topk_norm_p: float = 1.0

    def __call__(self, ops: Operations, h, residual, layer: int, change: LayerInterventions = NO_INTERVENTIONS,
                 record=None):
        """h, residual ``[N, H]`` -> ``residual + routed + shared`` ``[N, H]``: the chosen experts' weighted sum
        and the gated shared expert, added to the residual stream."""
        choice = ops.route(self, h, change)  # each token's k experts and their weights
        routed = ops.routed_experts(self, h, choice)  # each chosen expert run on its own tokens
        shared = ops.shared_expert(self, h, choice, change.shared_expert)  # sigmoid(gate(h)) * shared(h), and the gate
        if record is not None:
            routed_part, shared_part, gate = ops.moe_parts(routed, shared, choice)
            norm = ops.xp.linalg.norm
            record(layer, **choice.trace_fields(), shared_gate=gate, shared_norm=norm(shared_part, axis=-1),
                   routed_norm=norm(routed_part, axis=-1))
        return ops.moe_output(residual, routed, shared, choice)  # residual + routed + shared


def normalise(ops: Operations, x, weight, eps: float, norm: str = "rms"):
    """The family's norm of x ``[..., H]``: RMSNorm (``"rms"``; Gemma's ``1 + w`` is folded into its weight when
    the model is built) or DBRX's LayerNorm without a bias (``"layer"``)."""
    return ops.layer_norm(x, weight, eps) if norm == "layer" else ops.rms_norm(x, weight, eps)


@dataclass(eq=False)
class DecoderLayer:
    index: int
    input_norm: object  # [H]
    post_attention_norm: object  # [H]
    attention: Attention
    mlp: SwiGLU | SparseMoeBlock
    eps: float
    norm: str = "rms"  # "layer": DBRX's LayerNorm (see normalise)

    @property
    def is_sparse(self) -> bool:
        return isinstance(self.mlp, SparseMoeBlock)

    def __call__(self, ops: Operations, x, cos, sin, cache, start, interventions: Interventions | None = None,
                 record=None):
        """x ``[B, T, H]`` -> ``[B, T, H]``: attention then feed-forward, each added to the residual."""
        h = normalise(ops, x, self.input_norm, self.eps, self.norm)
        attended = self.attention(ops, h, cos, sin, cache, self.index, start)
        if record is not None:
            record(self.index, attention_norm=ops.xp.linalg.norm(attended, axis=-1).reshape(-1))
        if self.norm == "rms":
            x, h = ops.add_rms_norm(x, attended, self.post_attention_norm, self.eps)  # x += attended; h = norm(x)
        else:
            x = x + attended
            h = normalise(ops, x, self.post_attention_norm, self.eps, self.norm)
        if not self.is_sparse:
            return x + self.mlp(ops, h)
        change = interventions.for_layer(self.index) if interventions else NO_INTERVENTIONS
        flat = x.reshape(-1, x.shape[-1])  # [N, H], N = B*T: the router sees tokens, not sequences
        return self.mlp(ops, h.reshape(flat.shape), flat, self.index, change, record).reshape(x.shape)


# --- the model -----------------------------------------------------------------------

@dataclass(eq=False)
class Model:
    """A Qwen2-MoE (or dense Qwen2, or another family of :data:`minimoe.config.FAMILIES`) causal language
    model ready to run on a backend (``ops``).  Build one with :func:`minimoe.load`."""

    config: ModelConfig
    embed: Projection  # [V, H]: its rows are the token embeddings
    decoder: list[DecoderLayer]
    final_norm: object  # [H]
    lm_head: Projection  # H -> V (the embedding itself when tied)
    ops: Operations = field(default_factory=Operations, repr=False)
    embed_scale: float = 1.0  # Gemma: the embedding rows times sqrt(hidden) (ModelConfig.embedding_scale)
    checkpoint: Checkpoint | None = None
    generation_config: dict = field(default_factory=dict)

    @property
    def backend(self) -> str:
        """The backend's name: ``numpy``, ``cupy`` or ``cupy-plain``."""
        return self.ops.name

    @property
    def xp(self):
        """The array module the model computes with (NumPy, or CuPy)."""
        return self.ops.xp

    @property
    def eos_token_ids(self) -> list[int]:
        """Ids that end a generation: generation_config.json's ``eos_token_id``, else config.json's."""
        eos = self.generation_config.get("eos_token_id", self.config.eos_token_id)
        if eos is None:
            return []
        return [int(eos)] if isinstance(eos, int) else [int(e) for e in eos]

    def new_cache(self, capacity: int | None = None) -> KVCache:
        """An empty KV cache for incremental decoding (``capacity`` positions preallocated)."""
        return KVCache(self.config, capacity, self.xp)

    def forward(self, ids, cache: KVCache | None = None, *, record: Recorder | None = None,
                interventions: Mapping | Interventions | None = None):
        """Logits for every position.  ids ``[T]`` -> ``[T, V]``; ids ``[B, T]`` -> ``[B, T, V]``.

        With ``cache``, the ids continue the cached sequence (positions start at
        ``cache.length``) and their keys/values are added to it.  ``record`` (a
        :class:`minimoe.hooks.Recorder`) receives every layer's routing arrays, as NumPy
        arrays whatever the backend.  ``interventions`` change the routing: a mapping such as
        ``{"disabled_experts": {layer: [expert, ...]}}`` (keys ``disabled_experts``,
        ``forced_experts``, ``top_k``, ``shared_expert``; see :class:`~minimoe.hooks.Interventions`).
        """
        xp = self.xp
        batch = self.check_ids(ids)
        unbatched = batch.ndim == 1
        if unbatched:
            batch = batch[None]
        start = cache.length if cache is not None else 0
        tokens = batch.shape[1]
        if start + tokens > self.config.max_position_embeddings:
            raise MinimoeError(
                f"{start} cached + {tokens} new tokens exceed the context of "
                f"{self.config.max_position_embeddings} positions (max_position_embeddings)"
            )
        changes = Interventions.of(self.config, interventions)
        if cache is not None:
            cache.reserve(batch.shape[0], tokens)
        if record is not None and xp is not np:  # a trace holds NumPy arrays, whatever the backend
            record = on_the_host(record)
        cos, sin = layers.rope_tables(xp, xp.arange(start, start + tokens), self.config.head_dim, self.config.rope_theta)
        with self.ops.forward_context():
            logits = self.run(self.ops, self.embed_tokens(batch), cos, sin, cache, start, changes, record)
        if cache is not None:
            cache.advance(tokens)
        if record is not None:
            record(OUTPUT, token_ids=batch.reshape(-1), positions=np.tile(np.arange(start, start + tokens), len(batch)),
                   logits=logits.reshape(-1, logits.shape[-1]))
        return logits[0] if unbatched else logits

    __call__ = forward

    def embed_tokens(self, ids):
        """The embedding rows of ids ``[B, T]`` -> ``[B, T, H]`` float32, times the family's ``embed_scale``."""
        x = self.ops.embed(self.embed, ids)
        return x if self.embed_scale == 1.0 else x * self.xp.float32(self.embed_scale)

    def run(self, ops: Operations, x, cos, sin, cache: KVCache | None, start: int,
            interventions: Interventions | None = None, record=None):
        """The decoder layers, the final norm and the output head over embedded tokens: x ``[B, T, H]`` at
        positions ``start ..`` (RoPE tables cos/sin ``[T, D]``) -> logits ``[B, T, V]``.  :meth:`forward`'s
        core, which the GPU's CUDA-graph decoder (:mod:`minimoe.gpu.decode`) captures as it is."""
        for layer in self.decoder:
            x = layer(ops, x, cos, sin, cache, start, interventions, record)
        norm = "layer" if self.config.family.norm == "layer" else "rms"
        return self.lm_head(normalise(ops, x, self.final_norm, self.config.rms_norm_eps, norm))

    def aux_loss(self, ids) -> float:
        """The router's load-balancing loss on ``ids`` (unscaled, as transformers' ``aux_loss``)."""
        recorder = Recorder()
        self.forward(ids, record=recorder)
        c = self.config
        router_logits = [recorder.joined("router_logits", layer) for layer in c.sparse_layers]
        return layers.load_balancing_loss(np, router_logits, c.num_experts, c.num_experts_per_tok)  # recorded on the host

    def check_ids(self, ids) -> np.ndarray:
        """ids as an int64 ``[T]`` or ``[B, T]`` array; MinimoeError for any other shape, dtype or an id outside the vocabulary."""
        array = np.asarray(ids)
        if array.ndim not in (1, 2) or array.size == 0:
            raise MinimoeError(f"token ids must be a non-empty [T] or [B, T] array, got shape {array.shape}")
        if not np.issubdtype(array.dtype, np.integer):
            raise MinimoeError(f"token ids must be integers, got dtype {array.dtype}")
        bad = np.flatnonzero((array < 0) | (array >= self.config.vocab_size))
        if bad.size:
            where = np.unravel_index(bad[0], array.shape)
            raise MinimoeError(
                f"token id {int(array[where])} at position {tuple(int(i) for i in where)} is outside the "
                f"vocabulary [0, {self.config.vocab_size})"
            )
        return array.astype(np.int64)



def on_the_host(record):
    """``record`` receiving NumPy copies of the (device) arrays the layers hand it."""
    def host_record(layer, **arrays):
        record(layer, **{name: array.get() if hasattr(array, "get") else array for name, array in arrays.items()})

    return host_record
