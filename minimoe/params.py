"""Counting parameters from a config alone: total, activated per token, activated non-embedding.

"Activated" counts what one token's forward pass multiplies by: every attention and
norm weight, the router, the shared expert, ``k`` of the routed experts, the
embedding row and the output head.  "Non-embedding" leaves out the input
embedding table and the output head, as the Qwen1.5-MoE blog's table does.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import ModelConfig


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


def _swiglu(hidden: int, intermediate: int) -> int:
    return 3 * hidden * intermediate


def count_parameters(config: ModelConfig) -> ParameterCount:
    """Exact counts for ``config`` (every tensor of :func:`minimoe.weights.expected_shapes`)."""
    h = config.hidden_size
    q_out = config.num_attention_heads * config.head_dim
    kv_out = config.num_key_value_heads * config.head_dim
    attention = h * q_out + 2 * h * kv_out + q_out * h
    if config.qkv_bias:
        attention += q_out + 2 * kv_out
    norms = 2 * h

    total = activated = 0
    for layer in range(config.num_hidden_layers):
        common = attention + norms
        if config.is_sparse_layer(layer):
            expert = _swiglu(h, config.moe_intermediate_size)
            always_on = config.num_experts * h + _swiglu(h, config.shared_expert_intermediate_size) + h
            total += common + always_on + config.num_experts * expert
            activated += common + always_on + config.num_experts_per_tok * expert
        else:
            dense = _swiglu(h, config.intermediate_size)
            total += common + dense
            activated += common + dense

    embedding = config.vocab_size * h * (1 if config.tie_word_embeddings else 2)
    total += embedding + h  # + final norm
    activated += embedding + h
    return ParameterCount(total=total, activated=activated, embedding=embedding)


def format_billions(count: int) -> str:
    return f"{count / 1e9:.2f}B"


def describe_model(config: ModelConfig) -> str:
    """One line about a model: layers, width, experts, parameter counts (what the CLI and reports print)."""
    counts = count_parameters(config)
    experts = (f"{config.num_experts} experts (top-{config.num_experts_per_tok}) + a gated shared expert"
               if config.num_experts else "dense")
    return (f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, {experts}; "
            f"{counts.total:,} parameters, {counts.activated:,} active per token")
