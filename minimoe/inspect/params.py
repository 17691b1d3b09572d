"""Counting parameters from a config alone: total, activated per token, activated non-embedding.

"Activated" counts what one token's forward pass multiplies by: every attention and
norm weight, the router, the shared expert, ``k`` of the routed experts, the
embedding row and the output head.  "Non-embedding" leaves out the input
embedding table and the output head; the Qwen1.5-MoE blog's table does not define the
term, and leaving out both reproduces its figures.

The counting rules live in one place, :func:`count_parameters`, over an
:class:`Architecture`: a short description of a decoder-only transformer (attention
widths, MLP widths, which layers are mixture-of-experts and what their experts look
like).  :meth:`Architecture.from_config` reads one from the ``config.json`` of every
family minimoe runs (Qwen2 / Qwen2-MoE, Mixtral, OLMoE, Qwen3-MoE, DeepSeekMoE, DBRX,
Mistral, Gemma), through :class:`~minimoe.config.ModelConfig`, so
:data:`~minimoe.config.FAMILIES` and the sparse-layer rule keep their one home.

:func:`family_table` sets MoE designs side by side (:class:`Design`): experts, widths,
gating, parameters, cost per token and how many expert sets a token can choose from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..config import FAMILIES, ModelConfig, read_config_file
from ..errors import MinimoeError

# Every MLP of these models is gated (SwiGLU, or GeGLU for Gemma): gate, up and down matrices.
GATED_MLP_MATRICES = 3


@dataclass(frozen=True)
class Architecture:
    """What parameter counting needs to know about a decoder-only transformer.

    Attention is grouped-query with ``num_key_value_heads`` key/value heads of
    ``head_dim``; ``qkv_bias`` adds biases to q/k/v (Qwen) but never to o; ``qk_norm``
    adds RMSNorm weights on q and k (``"projection"``: over the whole projections, OLMoE;
    ``"head"``: one ``[head_dim]`` weight each, Qwen3-MoE).  A layer listed in
    ``moe_layers`` has a router, ``num_experts`` routed experts of
    ``moe_intermediate_size`` (``top_k`` of them per token) and a shared expert of
    ``shared_intermediate_size`` (0: none), scaled by a sigmoid gate if
    ``shared_expert_gate`` (DeepSeekMoE's has none); every other layer has a dense MLP of
    ``intermediate_size``.  Norms count one ``[H]`` weight each, whichever norm (DBRX's
    LayerNorm has no bias).
    ``norm_topk_prob`` and ``routing_rule`` describe the gating (they count no parameters).
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    qkv_bias: bool = False
    tie_word_embeddings: bool = False
    moe_layers: tuple[int, ...] = ()
    num_experts: int = 0
    top_k: int = 0
    moe_intermediate_size: int = 0
    shared_intermediate_size: int = 0
    shared_expert_gate: bool = False
    qk_norm: str | None = None
    norm_topk_prob: bool = False
    routing_rule: str = "dense: no router"

    @classmethod
    def from_config(cls, raw: dict[str, Any], source: str = "config") -> "Architecture":
        """Read a parsed ``config.json`` of a family minimoe runs."""
        model_type = raw.get("model_type")
        reader = READERS.get(model_type)
        if reader is None:
            raise MinimoeError(f"{source}: cannot count parameters of model_type {model_type!r} "
                               f"(known: {', '.join(READERS)})")
        try:
            return reader(raw, source)
        except (KeyError, TypeError) as exc:
            raise MinimoeError(f"{source}: not a valid {model_type} config ({exc!r})") from None

    @classmethod
    def from_file(cls, path: str | Path) -> "Architecture":
        """Read ``config.json`` (or a folder holding one)."""
        return cls.from_config(*read_config_file(path))

    @classmethod
    def from_model_config(cls, config: ModelConfig) -> "Architecture":
        """The architecture of a model minimoe runs (a family of :data:`~minimoe.config.FAMILIES`)."""
        return cls(
            model_type=config.model_type, vocab_size=config.vocab_size, hidden_size=config.hidden_size,
            num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
            num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim,
            intermediate_size=config.intermediate_size, qkv_bias=config.qkv_bias,
            tie_word_embeddings=config.tie_word_embeddings, moe_layers=tuple(config.sparse_layers),
            num_experts=config.num_experts, top_k=config.num_experts_per_tok,
            moe_intermediate_size=config.moe_intermediate_size,
            shared_intermediate_size=config.shared_expert_intermediate_size,
            shared_expert_gate=config.has_shared_expert and config.shared_expert_gate, qk_norm=config.qk_norm,
            norm_topk_prob=config.norm_topk_prob, routing_rule=config.routing_rule,
        )


# --- reading each architecture's config.json ----------------------------------------------

def _runnable(raw: dict[str, Any], source: str) -> Architecture:
    return Architecture.from_model_config(ModelConfig.from_dict(raw, source))


READERS: dict[str, Callable[[dict[str, Any], str], Architecture]] = {model_type: _runnable for model_type in FAMILIES}


# --- counting ---------------------------------------------------------------------------

@dataclass(frozen=True)
class ParameterCount:
    total: int
    activated: int
    embedding: int  # input embedding table + output head (counted once when tied)

    @property
    def activated_non_embedding(self) -> int:
        return self.activated - self.embedding

    def rows(self) -> list[tuple[str, int]]:
        return [
            ("total", self.total),
            ("activated per token", self.activated),
            ("activated non-embedding", self.activated_non_embedding),
        ]


def _gated_mlp(hidden: int, intermediate: int) -> int:
    return GATED_MLP_MATRICES * hidden * intermediate


def _attention(arch: Architecture) -> int:
    h = arch.hidden_size
    q_out = arch.num_attention_heads * arch.head_dim
    kv_out = arch.num_key_value_heads * arch.head_dim
    weights = h * q_out + 2 * h * kv_out + q_out * h  # q, k, v, o
    qk_norm = {None: 0, "projection": q_out + kv_out, "head": 2 * arch.head_dim}[arch.qk_norm]
    return weights + (q_out + 2 * kv_out if arch.qkv_bias else 0) + qk_norm


def count_parameters(config: ModelConfig | Architecture) -> ParameterCount:
    """Exact counts for a model (for Qwen, every tensor of :func:`minimoe.checkpoint.names.expected_shapes`)."""
    arch = Architecture.from_model_config(config) if isinstance(config, ModelConfig) else config
    h = arch.hidden_size
    common = _attention(arch) + 2 * h  # + input and post-attention norms
    moe_layers = set(arch.moe_layers)
    total = activated = 0
    for layer in range(arch.num_hidden_layers):
        if layer in moe_layers:
            expert = _gated_mlp(h, arch.moe_intermediate_size)
            always_on = (arch.num_experts * h  # the router
                         + _gated_mlp(h, arch.shared_intermediate_size) + (h if arch.shared_expert_gate else 0))
            total += common + always_on + arch.num_experts * expert
            activated += common + always_on + arch.top_k * expert
        else:
            dense = _gated_mlp(h, arch.intermediate_size)
            total += common + dense
            activated += common + dense

    embedding = arch.vocab_size * h * (1 if arch.tie_word_embeddings else 2)
    total += embedding + h  # + final norm
    activated += embedding + h
    return ParameterCount(total=total, activated=activated, embedding=embedding)


# --- what a token costs -------------------------------------------------------------------

@dataclass(frozen=True)
class TokenCost:
    """The work of one token at decode (batch 1), after ``context`` cached positions."""

    matmul_flops: int  # 2 per multiply-add with a weight: the activated weights, less the embedding lookup
    attention_flops: int  # q.k scores and the weighted sum of values over the context
    weight_bytes: int  # activated weights read once (the embedding table only for one row)
    kv_cache_bytes: int  # keys and values of every layer for the context, read once

    @property
    def flops(self) -> int:
        return self.matmul_flops + self.attention_flops

    @property
    def bytes_read(self) -> int:
        return self.weight_bytes + self.kv_cache_bytes


def token_cost(arch: Architecture, context: int, weight_bytes: int = 2, cache_bytes: int = 2) -> TokenCost:
    """FLOPs and bytes of one decoded token (bf16 weights and cache by default).

    The input embedding is a row lookup, not a matmul, so it costs no FLOPs and reads
    one row; a tied table is read whole anyway, as the output head.  Attention adds
    ``2 * 2 * heads * head_dim * context`` per layer (scores, then the weighted values).
    """
    counts = count_parameters(arch)
    lookup = 0 if arch.tie_word_embeddings else arch.vocab_size * arch.hidden_size
    multiplied = counts.activated - lookup
    kv_width = arch.num_key_value_heads * arch.head_dim
    return TokenCost(
        matmul_flops=2 * multiplied,
        attention_flops=arch.num_hidden_layers * 4 * arch.num_attention_heads * arch.head_dim * context,
        weight_bytes=weight_bytes * (multiplied + arch.hidden_size),
        kv_cache_bytes=cache_bytes * arch.num_hidden_layers * 2 * kv_width * context,
    )


# --- MoE designs side by side -------------------------------------------------------------

QK_NORM_WORDS = {None: "none", "projection": "RMSNorm over all of q and of k", "head": "RMSNorm per head"}


@dataclass(frozen=True)
class Design:
    """One model's MoE design, everything computed from its config (see :func:`family_table`)."""

    name: str
    arch: Architecture
    counts: ParameterCount
    cost: TokenCost  # one decoded token, bf16, after ``context`` cached positions
    context: int

    @property
    def shared_in_experts(self) -> float:
        """The shared expert's width in units of one routed expert's (Qwen1.5-MoE: 5632 / 1408 = 4)."""
        return self.arch.shared_intermediate_size / self.arch.moe_intermediate_size

    @property
    def active_expert_width(self) -> int:
        """Intermediate units a token runs through per sparse layer: k routed experts + the shared one."""
        return self.arch.top_k * self.arch.moe_intermediate_size + self.arch.shared_intermediate_size

    @property
    def expert_sets_per_layer(self) -> int:
        """How many different sets of k experts one token can be routed to in one layer: C(E, k)."""
        return math.comb(self.arch.num_experts, self.arch.top_k)

    @property
    def log10_expert_sets_per_token(self) -> float:
        """log10 of C(E, k) ** (sparse layers): the expert paths one token can take through the model."""
        return len(self.arch.moe_layers) * math.log10(self.expert_sets_per_layer)


def family_table(configs: dict[str, str | Path], context: int = 2048) -> list[Design]:
    """A :class:`Design` per ``{name: config.json path}``, in order; ``context`` for the cost per token."""
    designs = []
    for name, path in configs.items():
        arch = Architecture.from_file(path)
        designs.append(Design(name, arch, count_parameters(arch), token_cost(arch, context), context))
    return designs


def family_rows(designs: list[Design]) -> list[tuple[str, list[str]]]:
    """(quantity, one cell per design) rows of the side-by-side table."""
    def shared(d: Design) -> str:
        width = d.arch.shared_intermediate_size
        return f"{width:,} (= {d.shared_in_experts:g} experts)" if width else "none"

    context = f"context {designs[0].context}" if designs else ""
    rows: list[tuple[str, Callable[[Design], str]]] = [
        ("model_type", lambda d: d.arch.model_type),
        ("routed experts", lambda d: str(d.arch.num_experts)),
        ("active experts (top-k)", lambda d: str(d.arch.top_k)),
        ("expert width", lambda d: f"{d.arch.moe_intermediate_size:,}"),
        ("shared expert width", shared),
        ("expert width a token runs through", lambda d: f"{d.active_expert_width:,}"),
        ("gating rule", lambda d: d.arch.routing_rule),
        ("top-k weights renormalised", lambda d: "yes" if d.arch.norm_topk_prob else "no"),
        ("q/k norm", lambda d: QK_NORM_WORDS[d.arch.qk_norm]),
        ("sparse layers", lambda d: f"{len(d.arch.moe_layers)} of {d.arch.num_hidden_layers}"),
        ("total parameters", lambda d: format_count(d.counts.total)),
        ("activated parameters", lambda d: format_count(d.counts.activated)),
        ("activated non-embedding", lambda d: format_count(d.counts.activated_non_embedding)),
        (f"GFLOP per token ({context})", lambda d: f"{d.cost.flops / 1e9:.1f}"),
        (f"GB read per token (bf16, {context})", lambda d: f"{d.cost.bytes_read / 1e9:.2f}"),
        ("expert sets per layer, C(E, k)", lambda d: f"{d.expert_sets_per_layer:,}"),
        ("expert sets per token, all layers", lambda d: f"10^{d.log10_expert_sets_per_token:.1f}"),
    ]
    return [(label, [cell(d) for d in designs]) for label, cell in rows]


def format_family_table(designs: list[Design]) -> str:
    """The side-by-side table in Markdown, one column per design."""
    lines = ["| | " + " | ".join(d.name for d in designs) + " |", "|---" * (len(designs) + 1) + "|"]
    lines += [f"| {label} | " + " | ".join(cells) + " |" for label, cells in family_rows(designs)]
    return "\n".join(lines)


# --- printing --------------------------------------------------------------------------

def format_count(count: int) -> str:
    """A parameter count in billions, or millions below a billion (a 3.3M model is not "0.00B")."""
    return f"{count / 1e9:.2f}B" if count >= 1e9 else f"{count / 1e6:.2f}M"


def describe_architecture(arch: Architecture) -> str:
    """``qwen2_moe, 24 layers, 24 sparse: 60 experts (top-4) of width 1408 + shared expert of 5632`` and the like."""
    if not arch.moe_layers:
        return f"{arch.model_type}, {arch.num_hidden_layers} layers, all dense"
    shared = f" + shared expert of {arch.shared_intermediate_size}" if arch.shared_intermediate_size else ""
    return (f"{arch.model_type}, {arch.num_hidden_layers} layers, {len(arch.moe_layers)} sparse: "
            f"{arch.num_experts} experts (top-{arch.top_k}) of width {arch.moe_intermediate_size}{shared}")


def describe_model(config: ModelConfig) -> str:
    """One line about a model: layers, width, experts, parameter counts (what the CLI and reports print)."""
    counts = count_parameters(config)
    shared = " + a gated shared expert" if config.has_shared_expert else ""
    experts = (f"{config.num_experts} experts (top-{config.num_experts_per_tok}){shared}"
               if config.num_experts else "dense")
    return (f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, {experts}; "
            f"{counts.total:,} parameters, {counts.activated:,} active per token")


__all__ = ["Architecture", "Design", "ParameterCount", "TokenCost", "count_parameters", "token_cost",
           "describe_architecture", "describe_model", "family_rows", "family_table", "format_count",
           "format_family_table"]
