"""The Qwen2-MoE model: weights from a checkpoint, composed from :mod:`minimoe.layers`.

This file and :mod:`minimoe.layers` are the whole forward pass.  Per decoder layer,
in one residual stream ``x [B, T, H]``:

    h = rms_norm(x);  x += attention(h)            # RoPE, multi-head or grouped-query, KV cache
    h = rms_norm(x);  x += moe(h)  or  mlp(h)      # sparse layers: routed experts + gated shared expert

then a final norm and the output head: ``[B, T, H] -> [B, T, V]``.  Every weight is a
:class:`minimoe.backend.Linear`, called as ``W(x)``; how it multiplies (bf16 upcast in
blocks, spread over threads) is the backend's business, not this file's.  The blocks
here only say which pieces of a layer are independent -- the chosen experts, the slices
of a wide MLP, the query chunks of a long prompt -- and run them with
:func:`minimoe.backend.parallel_map`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from . import layers, weights
from .backend import NUM_THREADS, Linear, array_module, parallel_map, row_ranges, single_threaded_blas
from .checkpoint import Checkpoint
from .config import ModelConfig, read_json_object
from .errors import MinimoeError
from .generate import generate_stream
from .gpu.launch import GPU_MODEL_TYPES
from .routing import NO_INTERVENTIONS, OUTPUT, Interventions, LayerInterventions, Recorder, RoutingTrace
from .windows import trace_text


# Queries attended to at once in a long prompt (see Attention.attend): the score array of a
# chunk is [B, heads, 256, S] float32, 16 MB for Qwen1.5-MoE at S = 1024, not 64 MB.
QUERY_CHUNK = 256


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


@dataclass
class Attention:
    q: Linear
    k: Linear
    v: Linear
    o: Linear
    num_heads: int
    num_kv_heads: int
    head_dim: int
    qk_norm: QKNorm | None = None

    def __call__(self, xp, h, cos, sin, layer: int, cache: KVCache | None, start: int):
        """h ``[B, T, H]`` -> ``[B, T, H]``; new keys/values go into ``cache`` when given."""
        q, k, v = self.q(h), self.k(h), self.v(h)  # [B, T, nh*D], [B, T, nkv*D], [B, T, nkv*D]
        norm = self.qk_norm
        if norm and not norm.per_head:  # OLMoE: over the whole projection
            q, k = norm(xp, q, k)
        q = layers.split_heads(q, self.num_heads, self.head_dim)  # [B, nh, T, D]
        k = layers.split_heads(k, self.num_kv_heads, self.head_dim)  # [B, nkv, T, D]
        v = layers.split_heads(v, self.num_kv_heads, self.head_dim)  # [B, nkv, T, D]
        if norm and norm.per_head:  # Qwen3-MoE: over each head's D values
            q, k = norm(xp, q, k)
        q, k = layers.apply_rope(xp, q, cos, sin), layers.apply_rope(xp, k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # [B, nkv, S, D]: the cached positions, then these
        return self.o(self.attend(xp, q, k, v, start))  # [B, T, nh*D] -> [B, T, H]

    def attend(self, xp, q, k, v, start: int):
        """:func:`layers.causal_attention`, the queries taken ``QUERY_CHUNK`` at a time -> ``[B, T, nh*D]``.

        Each chunk reads only the keys up to its own last position, so a long prompt never
        builds a ``[B, nh, T, S]`` score array and skips the masked-out upper triangle.  The
        chunks are independent: they run on the backend's threads, the last (longest) first
        so that the threads finish together.
        """
        tokens = q.shape[2]
        if tokens <= QUERY_CHUNK:
            return layers.causal_attention(xp, q, k, v, query_start=start)

        def chunk(first: int):
            last = min(first + QUERY_CHUNK, tokens)
            keys = start + last  # positions 0 .. start + last - 1
            return layers.causal_attention(xp, q[:, :, first:last], k[:, :, :keys], v[:, :, :keys],
                                           query_start=start + first)

        longest_first = range(0, tokens, QUERY_CHUNK)[::-1]
        return xp.concatenate(parallel_map(chunk, longest_first)[::-1], axis=1)


@dataclass
class SwiGLU:
    """A SwiGLU MLP (a dense layer's, an expert, or the shared expert), callable as ``mlp(h)``."""

    gate: Linear
    up: Linear
    down: Linear
    xp: object = field(default=np, repr=False)  # held, so that experts are one-argument callables
    slices: list["SwiGLU"] = field(default_factory=list, repr=False)  # see split_by_width

    def __call__(self, h):
        """h ``[..., H]`` -> ``[..., H]``."""
        if self.slices:  # one slice of the inner width a thread; their outputs add up
            partial = parallel_map(lambda mlp: mlp(h), self.slices)
            return sum(partial[1:], partial[0])
        return layers.swiglu(self.xp, h, self.gate, self.up, self.down)

    def split_by_width(self, parts: int) -> "SwiGLU":
        """This MLP, run from now on as ``parts`` slices of its inner width, each on a thread of its own.

        Slice ``s`` of the inner width takes its rows of gate and up and its columns of down, and
        ``down(silu(gate(h)) * up(h)) = sum_s down[:, s](silu(gate[s](h)) * up[s](h))``: the same
        MLP (tensor parallelism, as in Megatron-LM), whose threads each do three matmuls and
        their share of the elementwise work, handing off once instead of once a matrix.
        """
        self.slices = [SwiGLU(self.gate.row_slice(s), self.up.row_slice(s), self.down.column_slice(s), self.xp)
                       for s in row_ranges(self.gate.shape[0], parts)] if parts > 1 else []
        return self


@dataclass
class SparseMoeBlock:
    """Router + routed experts (+ the sigmoid-gated shared expert, in Qwen2-MoE).

    Every family here routes alike (softmax over all experts, top k, weights
    renormalised iff ``norm_topk_prob``); Mixtral, OLMoE and Qwen3-MoE have no shared
    expert (``shared`` None), and their traces show its gate and output as 0.
    """

    router: Linear  # H -> E, no bias
    experts: list[SwiGLU]
    shared: SwiGLU | None
    shared_gate: Linear | None  # H -> 1
    top_k: int
    norm_topk_prob: bool

    def __call__(self, xp, h, layer: int, change: LayerInterventions = NO_INTERVENTIONS, record=None):
        """h ``[B, T, H]`` -> ``[B, T, H]``: the routed experts' weighted sum plus the gated shared expert."""
        flat = h.reshape(-1, h.shape[-1])  # [N, H], N = B*T
        choice = layers.route(xp, self.router(flat), change.top_k or self.top_k, self.norm_topk_prob,
                              change.disabled, change.forced)  # expert_ids, expert_weights [N, k]
        routed = layers.routed_experts(xp, flat, choice.expert_ids, choice.expert_weights, self.experts,
                                        parallel_map)  # [N, H]
        if self.shared is None:  # a family without one
            shared, gate = xp.zeros_like(flat), xp.zeros(len(flat), dtype=xp.float32)
        else:
            shared, gate = layers.shared_expert(xp, flat, self.shared, self.shared_gate)  # [N, H], [N]
        if not change.shared_expert:  # intervention: switched off (its gate is still reported)
            shared = xp.zeros_like(shared)
        if record is not None:
            record(layer, **choice.trace_fields(), shared_gate=gate, shared_norm=xp.linalg.norm(shared, axis=-1),
                   routed_norm=xp.linalg.norm(routed, axis=-1))
        return (routed + shared).reshape(h.shape)


@dataclass
class DecoderLayer:
    index: int
    input_norm: np.ndarray
    post_attention_norm: np.ndarray
    attention: Attention
    mlp: SwiGLU | SparseMoeBlock
    eps: float

    @property
    def is_sparse(self) -> bool:
        return isinstance(self.mlp, SparseMoeBlock)

    def __call__(self, xp, x, cos, sin, cache, start, interventions: Interventions | None = None, record=None):
        """x ``[B, T, H]`` -> ``[B, T, H]``: attention then feed-forward, each added to the residual."""
        h = layers.rms_norm(xp, x, self.input_norm, self.eps)
        attended = self.attention(xp, h, cos, sin, self.index, cache, start)
        if record is not None:
            record(self.index, attention_norm=xp.linalg.norm(attended, axis=-1).reshape(-1))
        x = x + attended
        h = layers.rms_norm(xp, x, self.post_attention_norm, self.eps)
        if self.is_sparse:
            change = interventions.for_layer(self.index) if interventions else NO_INTERVENTIONS
            return x + self.mlp(xp, h, self.index, change, record)
        return x + self.mlp(h)


# --- the model -----------------------------------------------------------------------

@dataclass
class Model:
    """A Qwen2-MoE (or dense Qwen2) causal language model ready to run.

    Build one with :func:`minimoe.load`.  Weights stay memory-mapped in their
    stored dtype; see :class:`minimoe.backend.Linear`.
    """

    config: ModelConfig
    embed: Linear
    decoder: list[DecoderLayer]
    final_norm: np.ndarray
    lm_head: Linear
    checkpoint: Checkpoint | None = None
    backend: str = "numpy"
    xp: object = field(default=np, repr=False)
    generation_config: dict = field(default_factory=dict)

    @property
    def eos_token_ids(self) -> list[int]:
        """Ids that end a generation: generation_config.json's ``eos_token_id``, else config.json's."""
        eos = self.generation_config.get("eos_token_id", self.config.eos_token_id)
        if eos is None:
            return []
        return [int(eos)] if isinstance(eos, int) else [int(e) for e in eos]

    def generate(self, ids, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None, **options) -> list[int]:
        """New token ids after ``ids`` ``[T]`` (see :func:`minimoe.generate.generate_stream` for ``options``:
        ``eos_token_ids``, ``stop_strings`` + ``tokenizer``, ``record``, ``interventions``).  ``temperature=0`` is greedy."""
        return list(self.generate_stream(ids, max_new_tokens, temperature, top_k, top_p, seed, **options))

    def generate_stream(self, ids, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                        top_p: float | None = None, seed: int | None = None, **options) -> Iterator[int]:
        """Like :meth:`generate`, yielding each new token id as soon as it is chosen."""
        return generate_stream(self, ids, max_new_tokens, temperature, top_k, top_p, seed, **options)

    def new_cache(self, capacity: int | None = None) -> KVCache:
        """An empty KV cache for incremental decoding (``capacity`` positions preallocated)."""
        return KVCache(self.config, capacity, self.xp)

    def forward(self, ids, cache: KVCache | None = None, *, record: Recorder | None = None, **interventions):
        """Logits for every position.  ids ``[T]`` -> ``[T, V]``; ids ``[B, T]`` -> ``[B, T, V]``.

        With ``cache``, the ids continue the cached sequence (positions start at
        ``cache.length``) and their keys/values are added to it.  ``record`` (a
        :class:`minimoe.routing.Recorder`) receives every layer's routing arrays; the
        keyword arguments are routing interventions (``disabled_experts``,
        ``forced_experts``, ``top_k``, ``shared_expert``; see :class:`~minimoe.routing.Interventions`).
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
        changes = Interventions.build(self.config, **interventions) if interventions else None
        if cache is not None:
            cache.reserve(batch.shape[0], tokens)

        cos, sin = layers.rope_tables(xp, xp.arange(start, start + tokens), self.config.head_dim, self.config.rope_theta)
        with single_threaded_blas() if xp is np else contextlib.nullcontext():  # NumPy's BLAS, not the GPU
            x = self.embed.rows(batch)  # [B, T, H]
            for layer in self.decoder:
                x = layer(xp, x, cos, sin, cache, start, changes, record)
            x = layers.rms_norm(xp, x, self.final_norm, self.config.rms_norm_eps)
            logits = self.lm_head(x)
        if cache is not None:
            cache.advance(tokens)
        if record is not None:
            record(OUTPUT, token_ids=batch.reshape(-1), positions=np.tile(np.arange(start, start + tokens), len(batch)),
                   logits=logits.reshape(-1, logits.shape[-1]))
        return logits[0] if unbatched else logits

    __call__ = forward

    def trace(self, ids, cache: KVCache | None = None, tokenizer=None, **options) -> RoutingTrace:
        """Run ``ids`` ``[T]`` and return what the router did (a :class:`~minimoe.routing.RoutingTrace`).

        Takes the same ``cache`` and intervention keywords as :meth:`forward`; with a
        ``tokenizer``, the trace also holds each token's text.  Without a cache the text
        may be of any length: it is traced window by window (``window``, ``overlap``,
        ``keep_logits``, ``progress``: see :func:`minimoe.windows.trace_text`).
        """
        if cache is None:
            return trace_text(self, ids, tokenizer, **options)
        if np.asarray(ids).ndim != 1:
            raise MinimoeError("trace takes one sequence of ids [T]; trace a batch one row at a time")
        recorder = Recorder()
        self.forward(ids, cache, record=recorder, **options)
        return RoutingTrace.from_recorder(recorder, self.config, tokenizer)

    def step_through(self, ids, layer: int, position: int = -1):
        """Every stage of decoder ``layer`` for one token, named (see :mod:`minimoe.stepthrough`)."""
        from .stepthrough import step_through

        return step_through(self, ids, layer, position)

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


# --- loading -----------------------------------------------------------------------

def load(path: str | Path, backend: str = "numpy", progress: Callable[..., Iterable] | None = None) -> Model:
    """Open a Hugging Face checkpoint folder (config.json + safetensors) as a :class:`Model`.

    Weights are memory-mapped, not read: opening the 28.6 GB Qwen1.5-MoE-A2.7B
    takes seconds and little memory.  Every tensor's presence and shape is checked
    against the config first.  ``progress`` (e.g. ``tqdm.tqdm``) wraps the shards as
    they are opened and the tensors as they are checked.
    ``backend="cupy"`` copies the weights to the GPU once and runs every layer there
    (:mod:`minimoe.gpu`; forward then returns CuPy arrays, see :func:`minimoe.to_numpy`).
    """
    xp = array_module(backend)
    folder = Path(path)
    if not folder.is_dir():
        raise MinimoeError(f"{folder}: not a folder (expected a Hugging Face checkpoint folder)")
    config = ModelConfig.from_file(folder)
    opening = (lambda shards: progress(shards, desc="opening shards", unit="file")) if progress else None
    checkpoint = Checkpoint(folder, progress=opening)
    expected = weights.expected_shapes(config).items()
    _check_shapes(checkpoint, progress(expected, desc="checking tensors", unit="tensor") if progress else expected)
    model = _build(config, checkpoint, backend, xp)
    if (folder / "generation_config.json").exists():
        model.generation_config = read_json_object(folder / "generation_config.json")
    return model


def _check_shapes(checkpoint: Checkpoint, expected: Iterable[tuple[str, tuple[int, ...]]]) -> None:
    for name, shape in expected:
        if name not in checkpoint:
            raise MinimoeError(f"{checkpoint.folder}: tensor {name!r} is missing")
        found = checkpoint.info(name).shape
        if found != shape:
            raise MinimoeError(
                f"{checkpoint.folder}: tensor {name!r} has shape {list(found)}, expected {list(shape)} from config.json"
            )




def _build(config: ModelConfig, checkpoint: Checkpoint, backend: str, xp) -> Model:
    if backend == "cupy":  # the GPU model: the same blocks, each step a CUDA kernel (minimoe.gpu)
        if config.model_type not in GPU_MODEL_TYPES:
            raise MinimoeError(f"backend 'cupy' runs {' and '.join(GPU_MODEL_TYPES)} models; "
                               f"{config.model_type} ({config.family.architecture}) runs on backend='numpy'")
        from .gpu.blocks import build

        return build(config, checkpoint)

    def tensor(name):
        return checkpoint.array(name)

    def small(name):
        return np.asarray(tensor(name), dtype=np.float32)

    def mlp(names: dict[str, str]) -> SwiGLU:
        return SwiGLU(*(Linear(tensor(names[part])) for part in ("gate", "up", "down")), xp=xp)

    def wide_mlp(names: dict[str, str]) -> SwiGLU:  # a dense layer's or the shared expert: called alone, so split
        return mlp(names).split_by_width(NUM_THREADS)

    def attention(layer) -> Attention:
        n = weights.attention_names(layer)
        bias = (lambda key: small(n[key])) if config.qkv_bias else (lambda key: None)
        return Attention(
            q=Linear(tensor(n["q_weight"]), bias("q_bias")),
            k=Linear(tensor(n["k_weight"]), bias("k_bias")),
            v=Linear(tensor(n["v_weight"]), bias("v_bias")),
            o=Linear(tensor(n["o_weight"])),
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            head_dim=config.head_dim,
            qk_norm=qk_norm(layer) if config.qk_norm else None,
        )

    def qk_norm(layer) -> QKNorm:
        names = weights.qk_norm_names(layer)
        return QKNorm(small(names["q"]), small(names["k"]), per_head=config.qk_norm == "head", eps=config.rms_norm_eps)

    def feed_forward(layer):
        if not config.is_sparse_layer(layer):
            return wide_mlp(weights.swiglu_names(weights.dense_mlp_prefix(layer)))
        shared = config.has_shared_expert
        return SparseMoeBlock(
            router=Linear(tensor(weights.router_name(layer, config.model_type))),
            experts=[mlp(weights.expert_names(layer, e, config.model_type)) for e in range(config.num_experts)],
            shared=wide_mlp(weights.swiglu_names(weights.shared_expert_prefix(layer))) if shared else None,
            shared_gate=Linear(tensor(weights.shared_expert_gate_name(layer))) if shared else None,
            top_k=config.num_experts_per_tok,
            norm_topk_prob=config.norm_topk_prob,
        )

    decoder = []
    for layer in range(config.num_hidden_layers):
        norms = weights.norm_names(layer)
        decoder.append(DecoderLayer(
            index=layer,
            input_norm=small(norms["input"]),
            post_attention_norm=small(norms["post_attention"]),
            attention=attention(layer),
            mlp=feed_forward(layer),
            eps=config.rms_norm_eps,
        ))
    embed = Linear(tensor(weights.EMBED))
    lm_head = embed if config.tie_word_embeddings else Linear(tensor(weights.LM_HEAD))
    return Model(config, embed, decoder, small(weights.FINAL_NORM), lm_head, checkpoint, backend, xp)
