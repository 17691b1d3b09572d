"""Opening a checkpoint as a model: :func:`load`, and the model it returns, with the ways to use it.

:func:`load` reads ``config.json``, maps the safetensors shards, checks every tensor's name and
shape against the config, and builds :mod:`minimoe.model`'s blocks on a backend, whose table
of operations (:mod:`minimoe.ops`) also says how it holds the weights (memory-mapped bf16 for
NumPy; copied to the GPU once for CuPy).  What it returns, a :class:`LoadedModel`, is that
:class:`~minimoe.model.Model` with generation (:mod:`minimoe.generate`), routing traces of
texts of any length (:mod:`minimoe.inspect.tracing`) and a walk through one layer
(:mod:`minimoe.inspect.stepthrough`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import numpy as np

from .backend import BACKENDS, array_module
from .checkpoint import names
from .checkpoint.reader import Checkpoint
from .config import ModelConfig, read_json_object
from .errors import MinimoeError
from .generate import generate_stream
from .hooks import Interventions, Recorder
from .inspect.stepthrough import step_through
from .inspect.trace import RoutingTrace
from .inspect.tracing import Progress, trace_text
from .model import Attention, DecoderLayer, KVCache, Model, QKNorm, SparseMoeBlock, SwiGLU
from .ops import Operations


class LoadedModel(Model):
    """A :class:`~minimoe.model.Model` opened from a checkpoint, with the ways to use it beside its forward pass."""

    def generate(self, ids, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None, *, eos_token_ids: Iterable[int] | None = None,
                 stop_strings: Iterable[str] = (), tokenizer=None, record: Recorder | None = None,
                 interventions: Mapping | Interventions | None = None) -> list[int]:
        """New token ids after ``ids`` ``[T]``; ``temperature=0`` is greedy (the keywords: see
        :func:`minimoe.generate.generate_stream`)."""
        return list(self.generate_stream(ids, max_new_tokens, temperature, top_k, top_p, seed,
                                         eos_token_ids=eos_token_ids, stop_strings=stop_strings, tokenizer=tokenizer,
                                         record=record, interventions=interventions))

    def generate_stream(self, ids, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                        top_p: float | None = None, seed: int | None = None, *,
                        eos_token_ids: Iterable[int] | None = None, stop_strings: Iterable[str] = (), tokenizer=None,
                        record: Recorder | None = None,
                        interventions: Mapping | Interventions | None = None) -> Iterator[int]:
        """Like :meth:`generate`, yielding each new token id as soon as it is chosen."""
        return generate_stream(self, ids, max_new_tokens, temperature, top_k, top_p, seed, eos_token_ids,
                               stop_strings, tokenizer, record, interventions)

    def trace(self, ids, tokenizer=None, *, interventions: Mapping | Interventions | None = None,
              window: int | None = None, overlap: int | None = None, keep_logits: bool | None = None,
              progress: Progress = True, **intervention_keywords) -> RoutingTrace:
        """Run one text ``ids`` ``[T]`` of any length and return what the router did (a
        :class:`~minimoe.inspect.trace.RoutingTrace`).

        ``interventions`` change the routing as in :meth:`forward`; the keywords
        ``disabled_experts=``, ``forced_experts=``, ``top_k=``, ``shared_expert=`` are the same
        thing spelled directly (``model.trace(ids, disabled_experts={3: [7]})``).  With a
        ``tokenizer``, the trace also holds each token's text.  A text longer than the context
        is traced window by window (``window``, ``overlap``, ``keep_logits``, ``progress``: see
        :func:`minimoe.inspect.tracing.trace_text`).  To trace tokens that continue a cached
        sequence, use :meth:`trace_continuation`.
        """
        interventions = _interventions(self.config, interventions, intervention_keywords)
        return trace_text(self, ids, tokenizer, interventions=interventions, window=window, overlap=overlap,
                          keep_logits=keep_logits, progress=progress)

    def trace_continuation(self, ids, cache: KVCache, tokenizer=None, *,
                           interventions: Mapping | Interventions | None = None) -> RoutingTrace:
        """Run ``ids`` ``[T]`` after the sequence in ``cache`` (adding them to it) and trace them.

        Positions continue the cache's; the text must fit in the context that is left.
        """
        if np.asarray(ids).ndim != 1:
            raise MinimoeError("trace_continuation takes one sequence of ids [T]; trace a batch one row at a time")
        interventions = Interventions.of(self.config, interventions)
        recorder = Recorder()
        self.forward(ids, cache, record=recorder, interventions=interventions)
        return RoutingTrace.from_recorder(recorder, self.config, tokenizer, interventions)

    def step_through(self, ids, layer: int, position: int = -1):
        """Every stage of decoder ``layer`` for one token, named (see :mod:`minimoe.inspect.stepthrough`)."""
        if self.backend != "numpy":
            raise MinimoeError("step_through runs on the numpy backend: load the model with minimoe.load(path) "
                               "to walk a layer")
        return step_through(self, ids, layer, position)


def _interventions(config: ModelConfig, interventions, keywords: dict) -> Interventions | None:
    """``interventions=`` or the same keys given as keywords (DESIGN's ``trace(ids, disabled_experts=...)``), not both."""
    if keywords and interventions is not None:
        raise MinimoeError(f"pass interventions either as interventions= or as keywords, not both "
                           f"(got interventions= and {', '.join(sorted(keywords))}=)")
    return Interventions.of(config, keywords or interventions)


def load(path: str | Path, backend: str = "numpy", progress: Callable[..., Iterable] | None = None) -> LoadedModel:
    """Open a Hugging Face checkpoint folder (config.json + safetensors) as a model.

    Weights are memory-mapped, not read: opening the 28.6 GB Qwen1.5-MoE-A2.7B
    takes seconds and little memory.  Every tensor's presence and shape is checked
    against the config first.  ``progress`` (e.g. ``tqdm.tqdm``) wraps the shards as
    they are opened and the tensors as they are checked.
    ``backend="cupy"`` copies the weights to the GPU once and runs every layer there with
    minimoe's CUDA kernels (:mod:`minimoe.gpu`; forward then returns CuPy arrays, see
    :func:`minimoe.to_numpy`); ``backend="cupy-plain"`` runs the reference operations of
    :mod:`minimoe.ops` on CuPy instead.
    """
    ops = operations(backend)
    folder = Path(path)
    if not folder.is_dir():
        raise MinimoeError(f"{folder}: not a folder (expected a Hugging Face checkpoint folder)")
    config = ModelConfig.from_file(folder)
    check_backend(config, ops)
    opening = (lambda shards: progress(shards, desc="opening shards", unit="file")) if progress else None
    checkpoint = Checkpoint(folder, progress=opening)
    expected = names.expected_shapes(config).items()
    check_shapes(checkpoint, progress(expected, desc="checking tensors", unit="tensor") if progress else expected)
    model = build(config, checkpoint.array, ops)
    model.checkpoint = checkpoint
    if (folder / "generation_config.json").exists():
        model.generation_config = read_json_object(folder / "generation_config.json")
    return model


def operations(backend: str) -> Operations:
    """The table of operations a backend computes with (:mod:`minimoe.ops`)."""
    if backend not in BACKENDS:
        raise MinimoeError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    xp = array_module(backend)  # MinimoeError, saying what is missing, where CuPy or a GPU is
    if backend == "cupy":
        from .gpu.ops import KernelOperations

        return KernelOperations()
    return Operations(xp)


def check_backend(config: ModelConfig, ops: Operations) -> None:
    """MinimoeError, before any weight is read, for a model the backend cannot run."""
    check = getattr(ops, "check_model", None)
    if check is not None:
        check(config)


def check_shapes(checkpoint: Checkpoint, expected: Iterable[tuple[str, tuple[int, ...]]]) -> None:
    """MinimoeError naming the first tensor that is missing or of another shape than the config implies."""
    for name, shape in expected:
        if name not in checkpoint:
            raise MinimoeError(f"{checkpoint.folder}: tensor {name!r} is missing")
        found = checkpoint.info(name).shape
        if found != shape:
            raise MinimoeError(
                f"{checkpoint.folder}: tensor {name!r} has shape {list(found)}, expected {list(shape)} from config.json"
            )


def build(config: ModelConfig, tensor: Callable[[str], object], ops: Operations) -> LoadedModel:
    """The model whose weights ``tensor(name)`` gives (a checkpoint's stored array, by its Hub name), held as
    the backend ``ops`` holds them."""
    tensor = names.tensor_views(config, tensor)  # by Qwen2's names, whatever the family calls them
    family = config.family

    def vector(name):
        return ops.vector(tensor(name))

    def norm_weight(name):
        """A norm's weight as the model multiplies by it: Gemma stores w and scales by 1 + w (computed here once,
        in float32, as transformers computes it on every call)."""
        weight = np.asarray(tensor(name), dtype=np.float32)
        return ops.vector(1.0 + weight if family.norm == "rms_one_plus" else weight)

    def mlp_tensors(mlp_names: dict[str, str]) -> list:
        return [tensor(mlp_names[part]) for part in ("gate", "up", "down")]

    def swiglu(mlp_names: dict[str, str]) -> SwiGLU:
        return SwiGLU(*ops.swiglu_weights(*mlp_tensors(mlp_names)), activation=family.activation)

    def attention(layer) -> Attention:
        n = names.attention_names(layer)
        biases = [tensor(n[f"{key}_bias"]) for key in "qkv"] if config.qkv_bias else None
        q, k, v, o = ops.attention_weights(*(tensor(n[f"{key}_weight"]) for key in "qkvo"), biases=biases)
        return Attention(q, k, v, o, num_heads=config.num_attention_heads, num_kv_heads=config.num_key_value_heads,
                         head_dim=config.head_dim, qk_norm=qk_norm(layer) if config.qk_norm else None,
                         clip_qkv=config.clip_qkv, sliding_window=config.sliding_window)

    def qk_norm(layer) -> QKNorm:
        norm_names = names.qk_norm_names(layer)
        return QKNorm(vector(norm_names["q"]), vector(norm_names["k"]), per_head=config.qk_norm == "head",
                      eps=config.rms_norm_eps)

    def feed_forward(layer):
        if not config.is_sparse_layer(layer):
            return swiglu(names.swiglu_names(names.dense_mlp_prefix(layer)))
        experts = [mlp_tensors(names.expert_names(layer, e, config.model_type)) for e in range(config.num_experts)]
        shared = None
        if config.has_shared_expert:
            shared = mlp_tensors(names.swiglu_names(names.shared_expert_prefix(layer, config.model_type)))
        gated = shared and config.shared_expert_gate
        router, expert_weights, shared_gate, shared_weights = ops.moe_weights(
            tensor(names.router_name(layer, config.model_type)), experts,
            tensor(names.shared_expert_gate_name(layer)) if gated else None, shared)
        return SparseMoeBlock(router=router, experts=[SwiGLU(*mlp, activation=family.activation) for mlp in expert_weights],
                              shared=None if shared_weights is None else SwiGLU(*shared_weights, activation=family.activation),
                              shared_gate=shared_gate, top_k=config.num_experts_per_tok,
                              norm_topk_prob=config.norm_topk_prob, topk_norm_p=config.topk_norm_p)

    decoder = []
    for layer in range(config.num_hidden_layers):
        norms = names.norm_names(layer)
        decoder.append(DecoderLayer(index=layer, input_norm=norm_weight(norms["input"]),
                                    post_attention_norm=norm_weight(norms["post_attention"]), attention=attention(layer),
                                    mlp=feed_forward(layer), eps=config.rms_norm_eps,
                                    norm="layer" if family.norm == "layer" else "rms"))
    embed = ops.linear(tensor(names.EMBED))
    lm_head = embed if config.tie_word_embeddings else ops.linear(tensor(names.LM_HEAD))
    return LoadedModel(config, embed, decoder, norm_weight(names.FINAL_NORM), lm_head, ops,
                       embed_scale=config.embedding_scale)
