"""Walk one token through one decoder layer, stage by stage, every intermediate named.

:func:`step_through` recomputes a decoder layer with the functions of
:mod:`minimoe.layers`, one visible step at a time, in the order the model runs them:

    input_norm -> q, k, v -> RoPE -> attention scores -> attention weights -> attention output
    -> o_proj -> residual -> post-attention norm -> router logits -> router probabilities
    -> top-k -> each chosen expert's output -> shared expert and its gate -> layer output

Every stage is an entry of the returned :class:`LayerWalk`, for the one token at
``position`` (attention still reads all the positions before it).  The walk never
uses the model's own block code for the inspected layer, and a test holds its result
to the model's forward, so the walkthrough and the model cannot drift apart.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from .. import layers
from ..errors import MinimoeError


def _norm(xp, x, weight, eps: float, norm: str):
    """The layer's norm (``DecoderLayer.norm``): RMSNorm, or DBRX's LayerNorm without a bias."""
    return layers.layer_norm(xp, x, weight, eps) if norm == "layer" else layers.rms_norm(xp, x, weight, eps)


class LayerWalk(OrderedDict):
    """Named intermediates of one token through one layer (``walk["router_probs"]``, ...).

    ``walk.describe()`` lists each stage with its shape.
    """

    def describe(self) -> str:
        return "\n".join(f"{name:28s} {tuple(np.shape(value))}" for name, value in self.items())


def residual_before(model, ids: np.ndarray, layer: int) -> np.ndarray:
    """The residual stream entering decoder layer ``layer``: ids ``[T]`` -> ``[T, H]``."""
    xp, c = model.xp, model.config
    cos, sin = layers.rope_tables(xp, xp.arange(len(ids)), c.head_dim, c.rope_theta)
    x = model.embed_tokens(ids[None])  # [1, T, H], times the family's embedding scale (Gemma)
    for block in model.decoder[:layer]:
        x = block(model.ops, x, cos, sin, None, 0)
    return x[0]


def step_through(model, ids, layer: int, position: int = -1) -> LayerWalk:
    """The stages of decoder layer ``layer`` for the token at ``position`` of ids ``[T]``."""
    xp, c = model.xp, model.config
    ids = model.check_ids(ids)
    if ids.ndim != 1:
        raise MinimoeError("step_through takes one sequence of ids [T]")
    if not 0 <= layer < c.num_hidden_layers:
        raise MinimoeError(f"layer {layer} is outside [0, {c.num_hidden_layers})")
    tokens = len(ids)
    position = position % tokens if -tokens <= position < tokens else None
    if position is None:
        raise MinimoeError(f"position is outside the {tokens} tokens")
    block = model.decoder[layer]
    attention = block.attention
    walk = LayerWalk()

    x = residual_before(model, ids[: position + 1], layer)  # [P+1, H]: the token and everything before it
    walk["residual_in"] = x[position]
    h = _norm(xp, x, block.input_norm, c.rms_norm_eps, block.norm)
    walk["input_norm"] = h[position]
    q, k, v = attention.q(h)[None], attention.k(h)[None], attention.v(h)[None]  # [1, P+1, nh*D], [1, P+1, nkv*D] x 2
    if attention.clip_qkv is not None:  # DBRX: q, k, v clamped
        q, k, v = (xp.clip(t, -attention.clip_qkv, attention.clip_qkv) for t in (q, k, v))
    norm = attention.qk_norm
    if norm and not norm.per_head:  # OLMoE: RMSNorm over the whole q and k projections
        q, k = norm(xp, q, k)
    q = layers.split_heads(q, c.num_attention_heads, c.head_dim)  # [1, nh, P+1, D]
    k = layers.split_heads(k, c.num_key_value_heads, c.head_dim)
    v = layers.split_heads(v, c.num_key_value_heads, c.head_dim)
    if norm and norm.per_head:  # Qwen3-MoE: RMSNorm over each head
        q, k = norm(xp, q, k)
    walk["q"], walk["k"], walk["v"] = q[0, :, position], k[0, :, position], v[0, :, position]  # [heads, D]
    cos, sin = layers.rope_tables(xp, xp.arange(position + 1), c.head_dim, c.rope_theta)
    q, k = layers.apply_rope(xp, q, cos, sin), layers.apply_rope(xp, k, cos, sin)
    walk["q_rotated"], walk["k_rotated"] = q[0, :, position], k[0, :, position]
    # Scores of this token's query heads against every key up to and including it.
    keys = xp.repeat(k[0], c.num_kv_groups, axis=0)  # [nh, P+1, D]: head h reads kv head h // groups
    values = xp.repeat(v[0], c.num_kv_groups, axis=0)
    walk["attention_scores"] = xp.einsum("hd,hsd->hs", q[0, :, position], keys) / np.sqrt(c.head_dim)  # [nh, P+1]
    if attention.sliding_window is not None:  # Mistral: keys older than the window are masked out
        walk["attention_scores"][:, : max(0, position + 1 - attention.sliding_window)] = -np.inf
    walk["attention_weights"] = layers.softmax(xp, walk["attention_scores"], axis=-1)
    heads = xp.einsum("hs,hsd->hd", walk["attention_weights"], values)  # [nh, D]
    walk["attention_heads"] = heads
    walk["attention_output"] = attention.o(heads.reshape(1, -1))[0]  # [H]
    residual = walk["residual_in"] + walk["attention_output"]
    walk["residual_after_attention"] = residual
    h = _norm(xp, residual[None], block.post_attention_norm, c.rms_norm_eps, block.norm)  # [1, H]
    walk["post_attention_norm"] = h[0]

    if not block.is_sparse:
        mlp = block.mlp
        walk["mlp_output"] = layers.swiglu(xp, h, mlp.gate, mlp.up, mlp.down, layers.ACTIVATIONS[mlp.activation])[0]
        walk["residual_out"] = residual + walk["mlp_output"]
        return walk
    moe = block.mlp
    choice = layers.route(xp, moe.router(h), moe.top_k, moe.norm_topk_prob, norm_p=moe.topk_norm_p)
    walk["router_logits"], walk["router_probs"] = choice.logits[0], choice.probs[0]
    walk["expert_ids"], walk["expert_weights"] = choice.expert_ids[0], choice.expert_weights[0]
    routed = xp.zeros_like(residual)
    for expert, weight in zip(choice.expert_ids[0].tolist(), choice.expert_weights[0].tolist()):
        mlp = moe.experts[expert]
        out = layers.swiglu(xp, h, mlp.gate, mlp.up, mlp.down, layers.ACTIVATIONS[mlp.activation])[0]
        walk[f"expert_{expert}_output"] = out
        routed = routed + weight * out
    walk["routed_output"] = routed
    walk["moe_output"] = routed
    if moe.shared is not None:  # Qwen2-MoE's gated shared expert; DeepSeekMoE's ungated one (gate 1)
        s = moe.shared
        shared, gate = layers.shared_expert(
            xp, h, lambda x: layers.swiglu(xp, x, s.gate, s.up, s.down, layers.ACTIVATIONS[s.activation]), moe.shared_gate)
        walk["shared_gate"], walk["shared_output"] = gate[0], shared[0]
        walk["moe_output"] = routed + shared[0]
    walk["residual_out"] = residual + walk["moe_output"]
    return walk
