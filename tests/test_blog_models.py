"""The other models the Qwen1.5-MoE blog names, run: DeepSeekMoE-16B, DBRX, Mistral-7B and Gemma-7B.

Logits, cached decoding, greedy continuations and router picks are held to transformers' recorded outputs
by tests/test_parity.py, which runs on every fixture (moe_deepseek, moe_dbrx, dense_mistral, dense_gemma
among them).  Here: that each family's difference is what makes the match (switch it off and parity
breaks), the families' own options against transformers run live, their Hub layouts, parameter counts
against transformers' models built on the meta device, and what is refused (the GPU backend's refusal of
these families: tests/test_moe_family.py).

DeepSeekMoE is not in transformers.  Its fixture is recorded from an exact equivalent that transformers
does ship (scripts/make_fixtures.py, ``deepseek_equivalent``): a Qwen2-MoE without q/k/v biases, with
every shared-expert gate weight 0 (so sigmoid(0) = 0.5 for every token) and the shared expert's down
projection doubled, which makes ``0.5 * shared(h)`` DeepSeekMoE's ungated shared experts (one MLP of
``n_shared_experts x moe_intermediate_size``); its dense first layer is Qwen2-MoE's ``mlp_only_layers
[0]``.  Halving the down projection back for DeepSeek's layout is exact in float32 (a power of two).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest

import minimoe
from minimoe import MinimoeError, ModelConfig, count_parameters
from minimoe.checkpoint import names
from minimoe.checkpoint.reader import Checkpoint
from minimoe.config import FAMILIES, shipped_configs
from minimoe.inspect.params import Architecture

from conftest import FIXTURES, load_reference
from parity import LOGIT_TOLERANCE, relative_error
from test_moe_family import edited_copy, transformers_counts, transformers_logits

BLOG_FIXTURES = ["moe_deepseek", "moe_dbrx", "dense_mistral", "dense_gemma"]


def model_and_reference(name):
    return minimoe.load(FIXTURES / name), load_reference(FIXTURES / name)


def parity_error(model, reference) -> float:
    return relative_error(model.forward(reference["ids"]), reference["logits"])


# --- each difference is what makes the match -----------------------------------------------------------

def without_sliding_window(model):
    for layer in model.decoder:
        layer.attention.sliding_window = None


def without_clipping(model):
    for layer in model.decoder:
        layer.attention.clip_qkv = None


def with_rms_norm(model):
    for layer in model.decoder:
        layer.norm = "rms"


def without_embedding_scale(model):
    model.embed_scale = 1.0


def with_silu(model):
    for layer in model.decoder:
        layer.mlp.activation = "silu"


def without_shared_experts(model):
    for layer in model.decoder:
        if layer.is_sparse:
            layer.mlp.shared = None


@pytest.mark.parametrize("name, undo", [
    ("dense_mistral", without_sliding_window),
    ("moe_dbrx", without_clipping),
    ("moe_dbrx", with_rms_norm),
    ("dense_gemma", without_embedding_scale),
    ("dense_gemma", with_silu),
    ("moe_deepseek", without_shared_experts),
])
def test_each_family_difference_is_what_makes_parity(name, undo):
    model, reference = model_and_reference(name)
    assert parity_error(model, reference) < LOGIT_TOLERANCE
    undo(model)
    assert parity_error(model, reference) > 1e-3


def test_gemma_norms_scale_by_one_plus_w():
    """Gemma stores w and multiplies by 1 + w: loading the stored weights as plain RMSNorm weights breaks parity."""
    model, reference = model_and_reference("dense_gemma")
    stored = Checkpoint(FIXTURES / "dense_gemma").array(names.norm_names(0)["input"])
    np.testing.assert_array_equal(model.decoder[0].input_norm, 1.0 + stored.astype(np.float32))
    model.decoder[0].input_norm = np.asarray(stored, dtype=np.float32)
    assert parity_error(model, reference) > 1e-3


def test_mistral_window_is_reached_by_the_prompts_and_the_cache():
    """The prompts (12 tokens) and the cached greedy decoding (10 more) go past the window of 5."""
    model, reference = model_and_reference("dense_mistral")
    window = model.config.sliding_window
    assert window == 5 and reference["ids"].shape[1] > window
    cache = model.new_cache()
    steps = [model.forward(reference["ids"][0][:3], cache=cache)]
    steps += [model.forward([token], cache=cache) for token in reference["ids"][0][3:]]
    assert relative_error(np.concatenate(steps), reference["logits"][0]) < LOGIT_TOLERANCE


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_gemma_embedding_scale_is_rounded_to_the_dtype_as_transformers_rounds_it(dtype):
    """transformers multiplies Gemma's embeddings by ``embed_scale.to(weight.dtype)``: sqrt(3072) in bf16 is 55.5."""
    torch = pytest.importorskip("torch")
    raw = {**json.loads(shipped_configs()["gemma-7b"].read_text()), "torch_dtype": dtype}
    theirs = torch.tensor(3072 ** 0.5).to(getattr(torch, dtype)).item()
    assert ModelConfig.from_dict(raw).embedding_scale == theirs
    assert ModelConfig.from_file(shipped_configs()["mistral-7b"]).embedding_scale == 1.0


# --- options against transformers, live ------------------------------------------------------------------

def dbrx_with(**ffn_changes):
    raw = json.loads((FIXTURES / "moe_dbrx" / "config.json").read_text())
    return {"ffn_config": {**raw["ffn_config"], **ffn_changes}}


@pytest.mark.parametrize("p", [2.0, None])
def test_dbrx_top_k_weights_divided_by_their_p_norm_as_transformers(p, tmp_path):
    """``moe_normalize_expert_weights``: p = 2 divides the k weights by their 2-norm; null leaves them as they are."""
    source = FIXTURES / "moe_dbrx"
    folder = edited_copy(source, tmp_path / "p", **dbrx_with(moe_normalize_expert_weights=p))
    model, ids = minimoe.load(folder), load_reference(source)["ids"][0]
    assert relative_error(model.forward(ids), transformers_logits(folder, ids)) < LOGIT_TOLERANCE
    weights = model.trace(ids).expert_weights
    if p is None:
        assert (weights.sum(-1) < 1).all()
    else:
        np.testing.assert_allclose(np.linalg.norm(weights, ord=p, axis=-1), 1, rtol=1e-5)


def test_dbrx_interventions_equal_transformers_with_another_k(tmp_path):
    source = FIXTURES / "moe_dbrx"
    model, ids = minimoe.load(source), load_reference(source)["ids"][0]
    folder = edited_copy(source, tmp_path / "k", **dbrx_with(moe_top_k=4))
    theirs = transformers_logits(folder, ids)
    assert relative_error(model.forward(ids, interventions={"top_k": 4}), theirs) < LOGIT_TOLERANCE


# --- the Hub layouts ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", BLOG_FIXTURES)
def test_the_checkpoint_holds_exactly_the_tensors_the_config_implies(name):
    """Names and shapes as transformers' save_pretrained wrote them (DeepSeek's: renamed from its equivalent)."""
    checkpoint = Checkpoint(FIXTURES / name)
    expected = names.expected_shapes(ModelConfig.from_file(FIXTURES / name))
    assert {tensor: checkpoint.info(tensor).shape for tensor in checkpoint.names} == expected


def test_dbrx_experts_are_views_into_the_stacked_tensors():
    """Expert e's gate/up are rows e*I.. of w1/v1; its down projection the transpose of those rows of w2."""
    config = ModelConfig.from_file(FIXTURES / "moe_dbrx")
    checkpoint = Checkpoint(FIXTURES / "moe_dbrx")
    view = names.tensor_views(config, checkpoint.array)
    width, e = config.moe_intermediate_size, 5
    w2 = checkpoint.array("transformer.blocks.1.ffn.experts.mlp.w2")
    np.testing.assert_array_equal(view(f"model.layers.1.mlp.experts.{e}.down_proj.weight"),
                                  w2[e * width:(e + 1) * width].T)
    wqkv = checkpoint.array("transformer.blocks.0.norm_attn_norm.attn.Wqkv.weight")
    v = view("model.layers.0.self_attn.v_proj.weight")
    assert v.shape == (config.num_key_value_heads * config.head_dim, config.hidden_size)
    np.testing.assert_array_equal(v, wqkv[-v.shape[0]:])


def test_deepseek_config_fields_are_read_under_deepseeks_names():
    config = ModelConfig.from_file(shipped_configs()["deepseek-moe-16b-base"])
    assert (config.num_experts, config.num_experts_per_tok, config.moe_intermediate_size) == (64, 6, 1408)
    assert config.shared_expert_intermediate_size == 2 * 1408 and not config.shared_expert_gate
    assert config.sparse_layers == list(range(1, 28)) and not config.norm_topk_prob
    every_other = ModelConfig.from_dict({**json.loads(shipped_configs()["deepseek-moe-16b-base"].read_text()),
                                         "first_k_dense_replace": 2, "moe_layer_freq": 3})
    assert every_other.sparse_layers == [layer for layer in range(2, 28) if layer % 3 == 0]


# --- trace and step-through ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", BLOG_FIXTURES)
def test_step_through_reproduces_the_forward_of_each_blog_model(name):
    """Every layer's walk (minimoe.layers, step by step) ends where the model's forward does, at a position
    past Mistral's window; in the MoEs it picks the experts the trace records."""
    model = minimoe.load(FIXTURES / name)
    ids, position = load_reference(FIXTURES / name)["ids"][0], 9
    trace = model.trace(ids) if model.config.sparse_layers else None
    for layer in range(model.config.num_hidden_layers):
        walk = model.step_through(ids, layer, position=position)
        after = minimoe.inspect.stepthrough.residual_before(model, ids, layer + 1)
        np.testing.assert_allclose(walk["residual_out"], after[position], rtol=1e-5, atol=1e-5)
        if model.decoder[layer].is_sparse:
            s = trace.layer_index(layer)
            assert walk["expert_ids"].tolist() == trace.expert_ids[s, position].tolist()
            assert ("shared_output" in walk) == model.config.has_shared_expert


def test_traces_say_what_each_moe_family_does():
    deepseek = minimoe.load(FIXTURES / "moe_deepseek")
    trace = deepseek.trace([5, 6, 7, 8])
    assert trace.routing_rule == "softmax over 8 experts, top-3, not renormalised, + ungated shared expert"
    assert (trace.shared_gate == 1).all() and (trace.shared_norm > 0).all()
    assert (trace.expert_weights.sum(-1) < 1).all()
    dbrx = minimoe.load(FIXTURES / "moe_dbrx").trace([5, 6, 7, 8])
    assert dbrx.routing_rule == "softmax over 8 experts, top-3, renormalised to sum 1"
    assert (dbrx.shared_gate == 0).all()
    for dense in ("dense_mistral", "dense_gemma"):
        assert minimoe.load(FIXTURES / dense).config.sparse_layers == []


# --- parameter counts ---------------------------------------------------------------------------------------

DBRX_HUB = shipped_configs()["dbrx-base"]
COUNTED = [shipped_configs()["mistral-7b"], shipped_configs()["gemma-7b"], DBRX_HUB] + [
    FIXTURES / name / "config.json" for name in ("moe_dbrx", "dense_mistral", "dense_gemma")]


@pytest.mark.parametrize("path", COUNTED, ids=[f"{p.parent.name}/{p.stem}" for p in COUNTED])
def test_counts_equal_transformers_own_model(path):
    raw = json.loads(path.read_text())
    counts = count_parameters(Architecture.from_file(path))
    assert (counts.total, counts.activated) == transformers_counts(raw)


def test_deepseek_counts_equal_its_transformers_equivalent_less_the_gates():
    """DeepSeekMoE-16B against the Qwen2-MoE equivalent built on the meta device: the same tensors plus one
    shared-expert gate ``[1, H]`` per sparse layer, which DeepSeekMoE does not have."""
    raw = json.loads(shipped_configs()["deepseek-moe-16b-base"].read_text())
    config = ModelConfig.from_dict(raw)
    equivalent = {"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "qkv_bias": False,
                  **{key: getattr(config, key) for key in (
                      "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                      "intermediate_size", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
                      "shared_expert_intermediate_size", "tie_word_embeddings")},
                  "mlp_only_layers": list(config.mlp_only_layers)}
    total, activated = transformers_counts(equivalent)
    gates = len(config.sparse_layers) * config.hidden_size
    counts = count_parameters(config)
    assert (counts.total, counts.activated) == (total - gates, activated - gates)
    assert (round(counts.total / 1e9, 1), round(counts.activated / 1e9, 1)) == (16.4, 2.8)  # DeepSeek's own figures


@pytest.mark.parametrize("name", BLOG_FIXTURES)
def test_counts_equal_the_tensors_in_each_fixture(name):
    checkpoint = Checkpoint(FIXTURES / name)
    stored = sum(math.prod(checkpoint.info(tensor).shape) for tensor in checkpoint.names)
    assert count_parameters(ModelConfig.from_file(FIXTURES / name)).total == stored


def test_params_cli_prints_dbrx_total():
    result = subprocess.run([sys.executable, "-m", "minimoe", "params", "dbrx-base"], capture_output=True, text=True,
                            check=True)
    printed = re.search(r"^\s+total\s+\S+\s+\(([\d,]+)\)", result.stdout, re.MULTILINE)
    assert int(printed[1].replace(",", "")) == transformers_counts(json.loads(DBRX_HUB.read_text()))[0]
    assert "dbrx" in result.stdout


# --- refusals -------------------------------------------------------------------------------------------------

def shipped(name: str, **changes) -> dict:
    return {**json.loads(shipped_configs()[name].read_text()), **changes}


@pytest.mark.parametrize("raw, message", [
    (shipped("deepseek-moe-16b-base", scoring_func="sigmoid"), "scoring_func 'sigmoid' is not supported"),
    (shipped("deepseek-moe-16b-base", attention_bias=True), "attention_bias is true.*not supported for deepseek"),
    (shipped("gemma-7b", hidden_act="relu"), "hidden_act 'relu' is not supported for gemma"),
    (shipped("mistral-7b", rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope scaling \\('linear'\\)"),
    (shipped("mistral-7b", sliding_window=0), "sliding_window must be positive"),
    (shipped("qwen1.5-7b", use_sliding_window=True), "use_sliding_window is true"),
    (shipped("olmoe-1b-7b", clip_qkv=8.0), "clip_qkv is 8.0: clipping q/k/v is implemented for DBRX only"),
    (shipped("dbrx-base", ffn_config={"ffn_act_fn": {"name": "gelu"}, "moe_num_experts": 16, "moe_top_k": 4}),
     "hidden_act 'gelu' is not supported for dbrx"),
])
def test_what_minimoe_does_not_implement_is_refused_by_name(raw, message):
    with pytest.raises(MinimoeError, match=message):
        ModelConfig.from_dict(raw, "config.json")


def test_dbrx_counts_are_databricks_figures():
    """Databricks announces DBRX as 132B parameters in total, 36B active on any input."""
    counts = count_parameters(Architecture.from_file(DBRX_HUB))
    assert (round(counts.total / 1e9), round(counts.activated / 1e9)) == (132, 36)


def test_dbrx_rope_theta_is_read_where_dbrx_puts_it():
    """The Hub's dbrx-base config.json has its theta in attn_config; a transformers 5.x file in rope_parameters."""
    assert ModelConfig.from_file(DBRX_HUB).rope_theta == 500000
    assert ModelConfig.from_file(FIXTURES / "moe_dbrx").rope_theta == 500000
    assert ModelConfig.from_dict({**json.loads(DBRX_HUB.read_text()),
                                  "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}).rope_theta == 1e4


@pytest.mark.parametrize("name", ["dense_mistral", "moe_dbrx"])
def test_the_cli_benches_the_blog_models(name, tmp_path):
    """``minimoe bench`` on a Mistral past its window (8 prompt tokens, window 5) and on DBRX's stacked layout."""
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, "-m", "minimoe", "bench", "--model", str(FIXTURES / name), "--prompt-tokens", "8",
                    "--new-tokens", "3", "--repeat", "1", "--json", str(out)], check=True, capture_output=True)
    assert json.loads(out.read_text())["engines"]["minimoe"]["status"] == "ok"
