"""The Hub's tensor names and the shapes the config implies: the one home of both.

Linear weights are stored ``[out_features, in_features]`` (``y = x @ W.T``), as
PyTorch's ``nn.Linear`` keeps them.  :func:`expected_shapes` lists every tensor a
checkpoint must hold for a config; the loader checks them all before anything runs.

The families share Qwen2's (Llama's) names except for the sparse block: Mixtral calls it
``block_sparse_moe`` and its experts' matrices ``w1`` (gate), ``w3`` (up), ``w2`` (down);
DeepSeekMoE calls its shared expert ``shared_experts`` (and has no gate for it).  DBRX keeps
MosaicML's names and stacks tensors (:data:`DBRX_NAMES`, :func:`dbrx_views`): q, k and v in one
``Wqkv``, and each layer's experts in three ``[E * I, H]`` matrices ``w1`` (gate), ``v1`` (up)
and ``w2`` (down, stored transposed: ``y = a @ w2[e]``).  The model is built from Qwen2's
names; for DBRX :func:`tensor_views` answers them with views into the stacked tensors.
"""

from __future__ import annotations

import re
from typing import Callable

from ..config import ModelConfig

EMBED = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"


def layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}"


def attention_names(layer: int) -> dict[str, str]:
    """Names of one layer's attention tensors, keyed by role."""
    p = f"{layer_prefix(layer)}.self_attn"
    return {
        "q_weight": f"{p}.q_proj.weight", "q_bias": f"{p}.q_proj.bias",
        "k_weight": f"{p}.k_proj.weight", "k_bias": f"{p}.k_proj.bias",
        "v_weight": f"{p}.v_proj.weight", "v_bias": f"{p}.v_proj.bias",
        "o_weight": f"{p}.o_proj.weight",
    }


def qk_norm_names(layer: int) -> dict[str, str]:
    """The RMSNorm weights on queries and keys (OLMoE, Qwen3-MoE; see ``ModelConfig.qk_norm``)."""
    p = f"{layer_prefix(layer)}.self_attn"
    return {"q": f"{p}.q_norm.weight", "k": f"{p}.k_norm.weight"}


def norm_names(layer: int) -> dict[str, str]:
    p = layer_prefix(layer)
    return {"input": f"{p}.input_layernorm.weight", "post_attention": f"{p}.post_attention_layernorm.weight"}


def swiglu_names(prefix: str) -> dict[str, str]:
    """gate/up/down projections of one SwiGLU MLP under ``prefix`` (dense MLP, expert or shared expert)."""
    return {proj: f"{prefix}.{proj}_proj.weight" for proj in ("gate", "up", "down")}


def dense_mlp_prefix(layer: int) -> str:
    return f"{layer_prefix(layer)}.mlp"


def moe_prefix(layer: int, model_type: str = "qwen2_moe") -> str:
    """The sparse block of a layer: ``mlp`` everywhere but Mixtral's ``block_sparse_moe``."""
    return f"{layer_prefix(layer)}.{'block_sparse_moe' if model_type == 'mixtral' else 'mlp'}"


def router_name(layer: int, model_type: str = "qwen2_moe") -> str:
    return f"{moe_prefix(layer, model_type)}.gate.weight"


def expert_prefix(layer: int, expert: int, model_type: str = "qwen2_moe") -> str:
    return f"{moe_prefix(layer, model_type)}.experts.{expert}"


MIXTRAL_EXPERT_MATRICES = {"gate": "w1", "up": "w3", "down": "w2"}


def expert_names(layer: int, expert: int, model_type: str = "qwen2_moe") -> dict[str, str]:
    """gate/up/down of one routed expert (Mixtral: w1/w3/w2)."""
    prefix = expert_prefix(layer, expert, model_type)
    if model_type == "mixtral":
        return {part: f"{prefix}.{matrix}.weight" for part, matrix in MIXTRAL_EXPERT_MATRICES.items()}
    return swiglu_names(prefix)


def shared_expert_prefix(layer: int, model_type: str = "qwen2_moe") -> str:
    """The shared expert: ``mlp.shared_expert``, DeepSeekMoE's ``mlp.shared_experts`` (one MLP for all of them)."""
    return f"{layer_prefix(layer)}.mlp.{'shared_experts' if model_type == 'deepseek' else 'shared_expert'}"


def shared_expert_gate_name(layer: int) -> str:
    return f"{layer_prefix(layer)}.mlp.shared_expert_gate.weight"


def _swiglu_shapes(names: dict[str, str], hidden: int, intermediate: int) -> dict[str, tuple[int, ...]]:
    return {
        names["gate"]: (intermediate, hidden),
        names["up"]: (intermediate, hidden),
        names["down"]: (hidden, intermediate),
    }


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the model reads, with its shape, in the Hub's naming."""
    if config.model_type == "dbrx":
        return dbrx_shapes(config)
    h, d = config.hidden_size, config.head_dim
    q_out, kv_out = config.num_attention_heads * d, config.num_key_value_heads * d
    shapes: dict[str, tuple[int, ...]] = {EMBED: (config.vocab_size, h), FINAL_NORM: (h,)}
    if not config.tie_word_embeddings:
        shapes[LM_HEAD] = (config.vocab_size, h)
    for layer in range(config.num_hidden_layers):
        attn = attention_names(layer)
        shapes.update({attn["q_weight"]: (q_out, h), attn["k_weight"]: (kv_out, h),
                       attn["v_weight"]: (kv_out, h), attn["o_weight"]: (h, q_out)})
        if config.qkv_bias:
            shapes.update({attn["q_bias"]: (q_out,), attn["k_bias"]: (kv_out,), attn["v_bias"]: (kv_out,)})
        qk_norm = qk_norm_names(layer)
        if config.qk_norm == "projection":  # OLMoE: over all of q, all of k
            shapes.update({qk_norm["q"]: (q_out,), qk_norm["k"]: (kv_out,)})
        elif config.qk_norm == "head":  # Qwen3-MoE: one head's width, shared by every head
            shapes.update({qk_norm["q"]: (d,), qk_norm["k"]: (d,)})
        for name in norm_names(layer).values():
            shapes[name] = (h,)
        if config.is_sparse_layer(layer):
            shapes[router_name(layer, config.model_type)] = (config.num_experts, h)
            for expert in range(config.num_experts):
                names = expert_names(layer, expert, config.model_type)
                shapes.update(_swiglu_shapes(names, h, config.moe_intermediate_size))
            if config.has_shared_expert:
                names = swiglu_names(shared_expert_prefix(layer, config.model_type))
                shapes.update(_swiglu_shapes(names, h, config.shared_expert_intermediate_size))
                if config.shared_expert_gate:
                    shapes[shared_expert_gate_name(layer)] = (1, h)
        else:
            shapes.update(_swiglu_shapes(swiglu_names(dense_mlp_prefix(layer)), h, config.intermediate_size))
    return shapes


# --- DBRX: MosaicML's names, stacked tensors ------------------------------------------------

DBRX_NAMES = {  # Qwen2's name (a regular expression) -> DBRX's (as transformers' DbrxForCausalLM and the Hub)
    r"model\.embed_tokens\.weight": "transformer.wte.weight",
    r"model\.norm\.weight": "transformer.norm_f.weight",
    r"lm_head\.weight": "lm_head.weight",
    r"model\.layers\.(\d+)\.input_layernorm\.weight": r"transformer.blocks.\1.norm_attn_norm.norm_1.weight",
    r"model\.layers\.(\d+)\.post_attention_layernorm\.weight": r"transformer.blocks.\1.norm_attn_norm.norm_2.weight",
    r"model\.layers\.(\d+)\.self_attn\.([qkv])_proj\.weight": r"transformer.blocks.\1.norm_attn_norm.attn.Wqkv.weight",
    r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight": r"transformer.blocks.\1.norm_attn_norm.attn.out_proj.weight",
    r"model\.layers\.(\d+)\.mlp\.gate\.weight": r"transformer.blocks.\1.ffn.router.layer.weight",
    r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.gate_proj\.weight": r"transformer.blocks.\1.ffn.experts.mlp.w1",
    r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.up_proj\.weight": r"transformer.blocks.\1.ffn.experts.mlp.v1",
    r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.down_proj\.weight": r"transformer.blocks.\1.ffn.experts.mlp.w2",
}


def dbrx_name(name: str) -> str:
    """DBRX's name of the tensor holding Qwen2's ``name`` (whole, or stacked with others)."""
    for pattern, replacement in DBRX_NAMES.items():
        if re.fullmatch(pattern, name):
            return re.sub(pattern, replacement, name)
    raise KeyError(f"{name}: no such tensor in a DBRX checkpoint")


def dbrx_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a DBRX checkpoint, with its shape (Hub names)."""
    h, d, experts = config.hidden_size, config.head_dim, config.num_experts
    qkv_out = (config.num_attention_heads + 2 * config.num_key_value_heads) * d
    shapes: dict[str, tuple[int, ...]] = {dbrx_name(EMBED): (config.vocab_size, h), dbrx_name(FINAL_NORM): (h,)}
    if not config.tie_word_embeddings:
        shapes[LM_HEAD] = (config.vocab_size, h)
    for layer in range(config.num_hidden_layers):
        shapes[dbrx_name(norm_names(layer)["input"])] = (h,)
        shapes[dbrx_name(norm_names(layer)["post_attention"])] = (h,)
        shapes[dbrx_name(attention_names(layer)["q_weight"])] = (qkv_out, h)
        shapes[dbrx_name(attention_names(layer)["o_weight"])] = (h, config.num_attention_heads * d)
        shapes[dbrx_name(router_name(layer))] = (experts, h)
        for matrix in expert_names(layer, 0).values():
            shapes[dbrx_name(matrix)] = (experts * config.moe_intermediate_size, h)
    return shapes


def dbrx_views(config: ModelConfig, stored: Callable) -> Callable:
    """Qwen2's name -> that tensor as a view into DBRX's stored (stacked) tensors ``stored(dbrx_name)``.

    q, k and v are row blocks of ``Wqkv`` ``[(nh + 2 nkv) D, H]``; expert ``e``'s gate and up are rows
    ``e*I .. (e+1)*I`` of ``w1`` and ``v1``; its down projection ``[H, I]`` is the transpose of those rows
    of ``w2`` (DBRX computes ``a @ w2[e]``).
    """
    d, width = config.head_dim, config.moe_intermediate_size
    q_rows, kv_rows = config.num_attention_heads * d, config.num_key_value_heads * d
    qkv = {"q": slice(0, q_rows), "k": slice(q_rows, q_rows + kv_rows), "v": slice(q_rows + kv_rows, q_rows + 2 * kv_rows)}

    def view(name: str):
        tensor = stored(dbrx_name(name))
        if attention := re.fullmatch(r"model\.layers\.\d+\.self_attn\.([qkv])_proj\.weight", name):
            return tensor[qkv[attention[1]]]
        if expert := re.fullmatch(r"model\.layers\.\d+\.mlp\.experts\.(\d+)\.(\w+)_proj\.weight", name):
            rows = tensor[int(expert[1]) * width:(int(expert[1]) + 1) * width]  # [I, H]
            return rows.T if expert[2] == "down" else rows
        return tensor

    return view


def tensor_views(config: ModelConfig, stored: Callable) -> Callable:
    """``stored`` (a checkpoint's tensors by Hub name) as a function of Qwen2's names, which the model is built
    from: the same function for every family but DBRX, whose stacked tensors it slices (:func:`dbrx_views`)."""
    return dbrx_views(config, stored) if config.model_type == "dbrx" else stored


def random_init(name: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """(mean, std) of the random values a stand-in checkpoint gives tensor ``name`` of ``shape``: norms
    near 1, small biases, unit embeddings, matrices at 1/sqrt(fan_in) (the router at twice that, so
    that routing is decisive) -- a scale at which activations stay sane through every layer."""
    if name.endswith(("norm.weight", "norm_1.weight", "norm_2.weight", "norm_f.weight")):
        return 1.0, 0.1
    if name.endswith(".bias"):
        return 0.0, 0.1
    if "embed_tokens" in name or name.endswith("wte.weight"):
        return 0.0, 1.0
    return 0.0, (2.0 if name.endswith(("mlp.gate.weight", "router.layer.weight")) else 1.0) / shape[-1] ** 0.5
