"""config.json parsing: both spellings, the dense sibling, and refusals of what we do not compute."""

from __future__ import annotations

import json

import pytest

from minimoe import MinimoeError, ModelConfig
from minimoe.cli import shipped_configs

from conftest import FIXTURES

QWEN_MOE = shipped_configs()["qwen1.5-moe-a2.7b"]


def hub_config() -> dict:
    return json.loads(QWEN_MOE.read_text())


def test_hub_spelling_of_qwen1_5_moe():
    config = ModelConfig.from_file(QWEN_MOE)
    assert (config.hidden_size, config.num_hidden_layers, config.num_experts) == (2048, 24, 60)
    assert (config.num_experts_per_tok, config.moe_intermediate_size, config.shared_expert_intermediate_size) == (4, 1408, 5632)
    assert config.rope_theta == 1e6 and config.dtype == "bfloat16" and config.head_dim == 128
    assert config.norm_topk_prob is False and config.tie_word_embeddings is False
    assert config.max_position_embeddings == 8192 and config.eos_token_id == 151643
    assert config.sparse_layers == list(range(24))


def test_transformers5_spelling_reads_the_same():
    raw = hub_config()
    raw["rope_parameters"] = {"rope_theta": raw.pop("rope_theta"), "rope_type": "default"}
    raw["dtype"] = raw.pop("torch_dtype")
    raw["layer_types"] = ["full_attention"] * raw["num_hidden_layers"]
    assert ModelConfig.from_dict(raw) == ModelConfig.from_file(QWEN_MOE)


def test_fixture_in_transformers5_spelling_is_read():
    config = ModelConfig.from_file(FIXTURES / "moe_gqa")
    assert config.num_key_value_heads == 2 and config.num_kv_groups == 2 and config.rope_theta == 10000.0


def test_dense_sibling_has_no_sparse_layers():
    config = ModelConfig.from_file(FIXTURES / "dense_qwen2")
    assert config.model_type == "qwen2" and config.num_experts == 0 and config.sparse_layers == []


@pytest.mark.parametrize(
    "step, mlp_only, layers, sparse",
    [(1, [], 4, [0, 1, 2, 3]), (2, [], 4, [1, 3]), (1, [0, 2], 4, [1, 3]), (3, [5], 6, [2])],
)
def test_sparse_layer_rule(step, mlp_only, layers, sparse):
    raw = dict(hub_config(), decoder_sparse_step=step, mlp_only_layers=mlp_only, num_hidden_layers=layers)
    assert ModelConfig.from_dict(raw).sparse_layers == sparse


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "deepseek_v3"}, "model_type 'deepseek_v3' is not supported; minimoe runs qwen2_moe (Qwen2MoeForCausalLM), qwen2"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
        ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope scaling ('yarn')"),
        ({"rope_parameters": {"rope_theta": 1e6, "rope_type": "linear", "factor": 2.0}}, "rope scaling ('linear')"),
        ({"use_sliding_window": True}, "sliding-window attention is not supported"),
        ({"layer_types": ["sliding_attention"] + ["full_attention"] * 23}, "layer_types marks layers [0]"),
        ({"num_key_value_heads": 3}, "multiple of num_key_value_heads (3)"),
        ({"num_experts_per_tok": 61}, "num_experts_per_tok (61) must be between 1 and num_experts (60)"),
        ({"hidden_size": "2048"}, "field 'hidden_size' must be int"),
        ({"decoder_sparse_step": 0}, "decoder_sparse_step must be >= 1"),
    ],
)
def test_unsupported_settings_are_refused(change, message):
    raw = dict(hub_config(), **change)
    with pytest.raises(MinimoeError, match="^config: .*") as error:
        ModelConfig.from_dict(raw)
    assert message in str(error.value)


def test_missing_field_is_named():
    raw = hub_config()
    del raw["num_experts"]
    with pytest.raises(MinimoeError, match="missing required field 'num_experts'"):
        ModelConfig.from_dict(raw)


def test_bad_files_name_the_file(tmp_path):
    with pytest.raises(MinimoeError, match="no config.json found"):
        ModelConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(MinimoeError, match=r"config.json: not valid JSON"):
        ModelConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(MinimoeError, match="JSON object"):
        ModelConfig.from_file(tmp_path)
