#!/usr/bin/env python
"""Make the small reference checkpoints that minimoe's parity tests read.

For each configuration below this script builds a random model with transformers
(the reference implementation), gives its weights a scale at which routing is
decisive, saves it in the Hub's layout (config.json + safetensors, in the dtype and
sharding the fixture asks for), and records what *transformers* computes on it:

* logits for a batch of prompts (reloaded in float32 from the saved file, so both
  sides use exactly the stored weights),
* each sparse layer's router logits (``output_router_logits=True``) and ``aux_loss``,
* a greedy continuation decoded token by token through transformers' own KV cache.

Rerun with ``python scripts/make_fixtures.py`` (needs the ``test`` extra: torch and
transformers).  Output goes to ``tests/fixtures/<name>/`` and stays a few hundred KB.
The live tests import :func:`build_fixture` from here to run the same comparison on
freshly made models.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"

TINY = dict(
    vocab_size=96,
    hidden_size=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=48,
    max_position_embeddings=48,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
)
TINY_MOE = dict(TINY, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=24)


MIN_TOPK_MARGIN = 5e-4


@dataclass
class FixtureSpec:
    """One reference checkpoint: architecture, config overrides, storage dtype and sharding."""

    name: str
    architecture: str  # a model_type: "qwen2_moe", "qwen2", "mixtral", "olmoe" or "qwen3_moe"
    config: dict
    dtype: str = "float32"  # how the weights are stored: float32, float16 or bfloat16
    shard_size: str | None = None  # e.g. "40KB" to split into several shards
    hub_spelling: bool = False  # rewrite config.json with transformers-4 keys (rope_theta, torch_dtype)
    seed: int = 0
    router_scale: float = 2.0  # router weights' std is router_scale / sqrt(H); larger spreads the router's choices
    # Smallest gap between the k-th and (k+1)-th router probability the prompts must have.  With 64 experts the
    # 8th and 9th are close for some token of almost any prompt; float32 differences are ~1e-7, far below either.
    min_margin: float = MIN_TOPK_MARGIN
    notes: str = ""
    generation_config: dict | None = None  # written as generation_config.json when given
    extra: dict = field(default_factory=dict)


SPECS = [
    FixtureSpec("moe_gqa", "qwen2_moe", dict(TINY_MOE, num_hidden_layers=2, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
                notes="grouped-query attention (4 query heads over 2 kv heads), norm_topk_prob false"),
    FixtureSpec("moe_norm_topk", "qwen2_moe", dict(TINY_MOE, num_hidden_layers=2, num_key_value_heads=4, norm_topk_prob=True,
                                                   num_experts_per_tok=3, rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
                seed=1, notes="norm_topk_prob true, top-3, full multi-head attention"),
    FixtureSpec("moe_dense_layer", "qwen2_moe", dict(TINY_MOE, num_hidden_layers=3, mlp_only_layers=[1]),
                dtype="float16", seed=2, notes="layer 1 is a dense MLP among sparse layers (mlp_only_layers), f16 storage"),
    FixtureSpec("moe_sparse_step2", "qwen2_moe", dict(TINY_MOE, num_hidden_layers=4, decoder_sparse_step=2),
                seed=3, notes="decoder_sparse_step 2: layers 1 and 3 sparse, 0 and 2 dense"),
    FixtureSpec("moe_tied", "qwen2_moe", dict(TINY_MOE, num_hidden_layers=2, tie_word_embeddings=True),
                seed=4, notes="tied input embedding and output head"),
    FixtureSpec("moe_bf16_sharded", "qwen2_moe", dict(TINY_MOE, num_hidden_layers=3, rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
                dtype="bfloat16", shard_size="40KB", hub_spelling=True, seed=5,
                notes="bf16 weights in several shards with an index; config.json in the Hub's transformers-4 spelling"),
    FixtureSpec("dense_qwen2", "qwen2", dict(TINY, num_hidden_layers=2), seed=6, notes="dense Qwen2ForCausalLM"),
    FixtureSpec("moe_explicit_fields", "qwen2_moe",
                dict(TINY_MOE, num_hidden_layers=2, head_dim=12, rms_norm_eps=0.05, qkv_bias=False,
                     rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
                seed=7, generation_config={"eos_token_id": [5, 7], "bos_token_id": 1},
                notes="fields away from their defaults: head_dim 12 (not hidden/heads = 8), rms_norm_eps 0.05, "
                      "no q/k/v bias, rope_theta 500; generation_config.json's eos [5, 7] differs from config.json's 2"),
    # The MoE family: each differs from Qwen2-MoE in a few named ways (minimoe.config.FAMILIES).
    FixtureSpec("moe_qwen2_57b_shape", "qwen2_moe",
                dict(TINY, hidden_size=56, num_attention_heads=28, num_key_value_heads=4, num_hidden_layers=2,
                     num_experts=64, num_experts_per_tok=8, moe_intermediate_size=8, shared_expert_intermediate_size=64,
                     intermediate_size=64),
                dtype="bfloat16", seed=7, router_scale=2.5, min_margin=2e-5, notes="Qwen2-57B-A14B's proportions: 64 experts, top-8, GQA 28/4, "
                                                 "shared expert 8 experts wide"),
    FixtureSpec("moe_mixtral", "mixtral", dict(TINY, num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2),
                seed=8, notes="MixtralForCausalLM: 8 full-width experts, top-2 renormalised, no shared expert, "
                              "block_sparse_moe / w1 w2 w3 names"),
    FixtureSpec("moe_olmoe", "olmoe", dict(TINY, num_hidden_layers=2, num_experts=8, num_experts_per_tok=3,
                                           pad_token_id=0),
                seed=9, notes="OlmoeForCausalLM: top-3 not renormalised, RMSNorm over the whole q and k projections"),
    FixtureSpec("moe_qwen3", "qwen3_moe", dict(TINY, num_hidden_layers=3, head_dim=12, num_experts=8, num_experts_per_tok=2,
                                                moe_intermediate_size=16, norm_topk_prob=True, mlp_only_layers=[0]),
                seed=10, notes="Qwen3MoeForCausalLM: per-head q/k RMSNorm, head_dim 12 != hidden/heads, "
                               "renormalised top-2, layer 0 dense (mlp_only_layers)"),
    # The other models the Qwen1.5-MoE blog names.
    FixtureSpec("moe_deepseek", "deepseek",
                dict(TINY, num_hidden_layers=3, num_experts=8, num_experts_per_tok=3, moe_intermediate_size=16,
                     shared_expert_intermediate_size=2 * 16, mlp_only_layers=[0], qkv_bias=False,
                     num_key_value_heads=4),
                seed=11, notes="DeepseekForCausalLM, recorded from its exact equivalent in transformers (a Qwen2-MoE "
                               "without q/k/v biases, shared-expert gate 0, shared down projection doubled): "
                               "2 ungated shared experts of 16, top-3 of 8 not renormalised, layer 0 dense "
                               "(first_k_dense_replace 1)"),
    FixtureSpec("moe_dbrx", "dbrx",
                dict(d_model=32, n_heads=4, n_layers=2, max_seq_len=48, vocab_size=96,
                     attn_config=dict(kv_n_heads=2, clip_qkv=1.5, rope_theta=500000.0),
                     ffn_config=dict(ffn_hidden_size=16, moe_num_experts=8, moe_top_k=3, moe_normalize_expert_weights=1.0),
                     rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
                seed=12, notes="DbrxForCausalLM: LayerNorm without bias, fused Wqkv clipped at 1.5, GQA 4/2, "
                               "top-3 of 8 divided by their 1-norm, experts stacked in w1/v1/w2"),
    FixtureSpec("dense_mistral", "mistral", dict(TINY, num_hidden_layers=2, sliding_window=5),
                seed=13, notes="MistralForCausalLM with a sliding window of 5 positions: the 12-token prompts "
                               "and the greedy continuation reach past it"),
    FixtureSpec("dense_gemma", "gemma", dict(TINY, num_hidden_layers=2, head_dim=16, hidden_act="gelu_pytorch_tanh"),
                seed=14, notes="GemmaForCausalLM: GeGLU (tanh), RMSNorm scaling by 1 + w, embedding times sqrt(32), "
                               "head_dim 16 != hidden/heads, tied head"),
]

# Prompts: a batch of 2 sequences of 12 tokens, and greedy continuation of the first for 10 tokens.
BATCH, PROMPT_TOKENS, GREEDY_TOKENS = 2, 12, 10


def _transformers_classes(architecture: str):
    import transformers as t

    return {"qwen2_moe": (t.Qwen2MoeConfig, t.Qwen2MoeForCausalLM), "qwen2": (t.Qwen2Config, t.Qwen2ForCausalLM),
            "mixtral": (t.MixtralConfig, t.MixtralForCausalLM), "olmoe": (t.OlmoeConfig, t.OlmoeForCausalLM),
            "qwen3_moe": (t.Qwen3MoeConfig, t.Qwen3MoeForCausalLM), "dbrx": (t.DbrxConfig, t.DbrxForCausalLM),
            "mistral": (t.MistralConfig, t.MistralForCausalLM), "gemma": (t.GemmaConfig, t.GemmaForCausalLM),
            # DeepSeekMoE is not in transformers: its fixtures are recorded from the Qwen2-MoE equivalent
            # (see deepseek_equivalent) and then saved in DeepSeek's layout.
            "deepseek": (t.Qwen2MoeConfig, t.Qwen2MoeForCausalLM)}[architecture]


def _decisive_init(model, seed: int, router_scale: float) -> None:
    """Weights at a scale where signals survive every layer and routing is clear-cut.

    transformers' default init (std 0.02) leaves router probabilities within 1e-3 of
    uniform, so a rounding difference can swap the k-th and (k+1)-th expert.  Here
    every matrix gets std 1/sqrt(fan_in) (activations keep unit scale), the router
    std ``router_scale``/sqrt(H) (router logits spread over a few units), embeddings std 1.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("norm.weight", "norm_1.weight", "norm_2.weight", "norm_f.weight")):
                values = 1.0 + 0.2 * torch.randn(param.shape, generator=generator)
            elif name.endswith("bias"):
                values = 0.3 * torch.randn(param.shape, generator=generator)
            elif "embed_tokens" in name or name.endswith("wte.weight"):
                values = torch.randn(param.shape, generator=generator)
            elif name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight", "router.layer.weight")):  # the router
                values = router_scale / math.sqrt(param.shape[-1]) * torch.randn(param.shape, generator=generator)
            else:
                values = torch.randn(param.shape, generator=generator) / math.sqrt(param.shape[-1])
            param.copy_(values)


def _to_hub_spelling(config_path: Path) -> None:
    """Rewrite a transformers-5 config.json with the Hub's transformers-4 keys."""
    config = json.loads(config_path.read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope["rope_theta"]
    config["torch_dtype"] = config.pop("dtype")
    config.pop("layer_types", None)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def build_fixture(spec: FixtureSpec, folder: Path) -> dict[str, np.ndarray]:
    """Save ``spec``'s checkpoint under ``folder`` and return transformers' outputs on it."""
    config_class, model_class = _transformers_classes(spec.architecture)
    torch.manual_seed(spec.seed)
    model = model_class(config_class(**spec.config))
    _decisive_init(model, spec.seed, spec.router_scale)
    if spec.architecture == "deepseek":
        return deepseek_fixture(spec, model, folder)
    if folder.exists():
        shutil.rmtree(folder)
    model.to(getattr(torch, spec.dtype)).save_pretrained(folder, max_shard_size=spec.shard_size or "50GB")
    for stray in ("generation_config.json",):
        (folder / stray).unlink(missing_ok=True)
    if spec.generation_config is not None:
        (folder / "generation_config.json").write_text(json.dumps(spec.generation_config, indent=2) + "\n")
    if spec.hub_spelling:
        _to_hub_spelling(folder / "config.json")
    return reference_outputs(spec, folder)


def deepseek_equivalent(model) -> None:
    """Make a Qwen2-MoE compute what DeepSeekMoE computes: its shared-expert gate 0 (sigmoid 0.5 for every
    token) and its shared expert's down projection doubled, so that 0.5 * shared(h) is DeepSeek's ungated
    shared experts; built without q/k/v biases (DeepSeek's llama attention has none)."""
    with torch.no_grad():
        for layer in model.model.layers:
            if hasattr(layer.mlp, "shared_expert_gate"):
                layer.mlp.shared_expert_gate.weight.zero_()
                layer.mlp.shared_expert.down_proj.weight.mul_(2.0)


def deepseek_fixture(spec: FixtureSpec, model, folder: Path) -> dict[str, np.ndarray]:
    """Record transformers' outputs on the Qwen2-MoE equivalent, then save it in DeepSeekMoE's Hub layout:
    ``mlp.shared_experts`` (no gate; down projection halved back) and DeepSeek's config.json keys."""
    import tempfile

    from safetensors.torch import load_file

    deepseek_equivalent(model)
    with tempfile.TemporaryDirectory() as scratch:
        model.save_pretrained(scratch)
        reference = reference_outputs(FixtureSpec(**{**spec.__dict__, "architecture": "qwen2_moe"}), Path(scratch))
        qwen = load_file(str(Path(scratch) / "model.safetensors"))
    tensors = {}
    for name, value in qwen.items():
        if name.endswith("shared_expert_gate.weight"):
            continue  # its sigmoid is 0.5 everywhere: folded into the down projection below
        if ".shared_expert.down_proj." in name:
            value = value * 0.5  # a power of two: exact
        tensors[name.replace(".shared_expert.", ".shared_experts.")] = value.to(getattr(torch, spec.dtype)).numpy()
    c = spec.config
    config = {
        "architectures": ["DeepseekForCausalLM"], "model_type": "deepseek", "attention_bias": False,
        "vocab_size": c["vocab_size"], "hidden_size": c["hidden_size"], "intermediate_size": c["intermediate_size"],
        "moe_intermediate_size": c["moe_intermediate_size"], "num_hidden_layers": c["num_hidden_layers"],
        "num_attention_heads": c["num_attention_heads"], "num_key_value_heads": c["num_key_value_heads"],
        "n_routed_experts": c["num_experts"], "n_shared_experts": c["shared_expert_intermediate_size"] // c["moe_intermediate_size"],
        "num_experts_per_tok": c["num_experts_per_tok"], "first_k_dense_replace": len(c["mlp_only_layers"]),
        "moe_layer_freq": 1, "norm_topk_prob": False, "scoring_func": "softmax", "aux_loss_alpha": 0.001,
        "seq_aux": True, "hidden_act": "silu", "max_position_embeddings": c["max_position_embeddings"],
        "rms_norm_eps": c["rms_norm_eps"], "rope_theta": 10000.0, "rope_scaling": None, "tie_word_embeddings": False,
        "bos_token_id": c["bos_token_id"], "eos_token_id": c["eos_token_id"], "torch_dtype": spec.dtype,
    }
    assert c["mlp_only_layers"] == list(range(config["first_k_dense_replace"]))  # DeepSeek's dense layers come first
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return reference


def reference_outputs(spec: FixtureSpec, folder: Path) -> dict[str, np.ndarray]:
    """What transformers computes on the saved checkpoint, in float32 over the stored weights.

    Prompts are drawn until every token's k-th router probability beats the (k+1)-th
    by at least ``MIN_TOPK_MARGIN``: on a near-tie, a last-bit rounding difference
    may legitimately pick the other expert, and that would test luck, not code.
    """
    _, model_class = _transformers_classes(spec.architecture)
    model = model_class.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    moe = spec.architecture not in ("qwen2", "mistral", "gemma")
    rng = np.random.default_rng(spec.seed + 100)
    with torch.no_grad():
        for _ in range(200):
            ids = torch.from_numpy(rng.integers(0, model.config.vocab_size, (BATCH, PROMPT_TOKENS)))
            out = model(ids, output_router_logits=moe)
            margin = min((topk_margin(r.numpy(), _top_k(model.config)) for r in out.router_logits),
                         default=np.inf) if moe else np.inf
            if margin >= spec.min_margin:
                break
        else:
            raise RuntimeError(f"{spec.name}: no prompt with decisive routing found; raise the router scale")
        result = {"ids": ids.numpy(), "logits": out.logits.numpy()}
        if moe:
            result["aux_loss"] = np.array(out.aux_loss.item(), dtype=np.float32)
            result["min_topk_margin"] = np.array(margin, dtype=np.float32)
            for layer, logits in enumerate(out.router_logits):
                result[f"router_logits.{layer}"] = logits.numpy()
        result["greedy"] = _greedy(model, ids[:1], GREEDY_TOKENS)
    return result


def _top_k(config) -> int:
    """Experts per token: ``num_experts_per_tok``, DBRX's ``ffn_config.moe_top_k``."""
    return config.ffn_config.moe_top_k if hasattr(config, "ffn_config") else config.num_experts_per_tok


def _greedy(model, ids, steps: int) -> np.ndarray:
    """Greedy continuation through transformers' own KV cache: ``[1, T]`` -> ``[steps]`` token ids."""
    # transformers 5.x renamed past_key_values to cache (the old name goes in 5.40).
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(ids, use_cache=True)
    tokens = []
    for _ in range(steps):
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(int(token))
        out = model(token, use_cache=True, **{cache_arg: getattr(out, cache_arg)})
    return np.array(tokens, dtype=np.int64)


def topk_margin(router_logits: np.ndarray, k: int) -> float:
    """Smallest gap between the k-th and (k+1)-th router probability over all tokens."""
    z = router_logits - router_logits.max(-1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    ranked = -np.sort(-probs, axis=-1)
    return float((ranked[:, k - 1] - ranked[:, k]).min())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=FIXTURES, help="where to write the fixtures")
    parser.add_argument("--only", nargs="+", metavar="NAME", choices=[spec.name for spec in SPECS],
                        help="remake only these fixtures (the manifest keeps the others' entries)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    manifest_path = args.out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if args.only and manifest_path.exists() else {}
    for spec in SPECS:
        if args.only and spec.name not in args.only:
            continue
        reference = build_fixture(spec, args.out / spec.name)
        save_file({k: np.ascontiguousarray(v) for k, v in reference.items()}, str(args.out / spec.name / "reference.safetensors"))
        entry = {"architecture": spec.architecture, "dtype": spec.dtype, "notes": spec.notes}
        if "min_topk_margin" in reference:
            entry["min_topk_margin"] = round(float(reference["min_topk_margin"]), 7)
            entry["required_margin"] = spec.min_margin
        manifest[spec.name] = entry
        print(f"{spec.name:20s} {entry}")
    ordered = {spec.name: manifest[spec.name] for spec in SPECS if spec.name in manifest}
    manifest_path.write_text(json.dumps(ordered, indent=2) + "\n")


if __name__ == "__main__":
    main()
