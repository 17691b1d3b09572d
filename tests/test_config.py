"""config.json parsing: both spellings, the dense sibling, and refusals of what we do not compute."""

from __future__ import annotations

import json

import pytest

from minimoe import MinimoeError, ModelConfig
from minimoe.config import shipped_configs

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


# --- defaults and explicit fields, against what transformers builds from the same file ----------

# Only the fields minimoe requires; everything else is left to each side's defaults.
# 32 heads: transformers' default key/value head count (16 or 32) must divide them.
MINIMAL_MOE = dict(model_type="qwen2_moe", vocab_size=16, hidden_size=128, num_hidden_layers=4, num_attention_heads=32,
                   intermediate_size=8, max_position_embeddings=32, num_experts=4, num_experts_per_tok=2,
                   moe_intermediate_size=4, shared_expert_intermediate_size=4)
MINIMAL_DENSE = {k: v for k, v in MINIMAL_MOE.items() if k in (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
    "max_position_embeddings")} | {"model_type": "qwen2", "num_attention_heads": 64}  # Qwen2Config's kv default: 32
# Every optional field set away from its default (and head_dim away from hidden / heads).
EXPLICIT = dict(rope_theta=500.0, norm_topk_prob=True, decoder_sparse_step=2, mlp_only_layers=[3], rms_norm_eps=1e-3,
                num_key_value_heads=8, tie_word_embeddings=True, router_aux_loss_coef=0.05, qkv_bias=False,
                head_dim=12, bos_token_id=3, eos_token_id=[4, 5])


def read_by_both(tmp_path, raw: dict):
    """(minimoe's config, transformers' config, transformers' model) from one config.json."""
    pytest.importorskip("torch", reason="the reference config needs torch + transformers")
    transformers = pytest.importorskip("transformers")
    (tmp_path / "config.json").write_text(json.dumps(raw))
    theirs = transformers.AutoConfig.from_pretrained(tmp_path)
    return ModelConfig.from_file(tmp_path), theirs, transformers.AutoModelForCausalLM.from_config(theirs)


def assert_reads_like_transformers(ours: ModelConfig, theirs, model) -> None:
    """Each field minimoe computes with equals what transformers' model is built from."""
    attention = model.model.layers[0].self_attn
    assert ours.rope_theta == theirs.rope_parameters["rope_theta"]
    assert ours.rms_norm_eps == theirs.rms_norm_eps == model.model.norm.variance_epsilon
    assert ours.head_dim == attention.head_dim
    assert ours.num_key_value_heads == theirs.num_key_value_heads
    assert ours.num_attention_heads * ours.head_dim == attention.q_proj.out_features
    assert ours.num_key_value_heads * ours.head_dim == attention.k_proj.out_features
    assert ours.qkv_bias == (attention.q_proj.bias is not None)
    assert ours.tie_word_embeddings == (model.lm_head.weight is model.model.embed_tokens.weight)
    assert ours.bos_token_id == theirs.bos_token_id
    assert ours.eos_token_id == (tuple(theirs.eos_token_id) if isinstance(theirs.eos_token_id, list)
                                 else theirs.eos_token_id)
    sparse = [i for i, layer in enumerate(model.model.layers) if type(layer.mlp).__name__.endswith("SparseMoeBlock")]
    assert ours.sparse_layers == sparse
    if ours.model_type == "qwen2_moe":
        assert ours.norm_topk_prob == theirs.norm_topk_prob
        assert ours.router_aux_loss_coef == theirs.router_aux_loss_coef
        assert ours.decoder_sparse_step == theirs.decoder_sparse_step
        assert list(ours.mlp_only_layers) == theirs.mlp_only_layers


@pytest.mark.parametrize("raw", [MINIMAL_MOE, MINIMAL_DENSE], ids=["qwen2_moe", "qwen2"])
def test_defaults_are_transformers_defaults(tmp_path, raw):
    assert_reads_like_transformers(*read_by_both(tmp_path, raw))


@pytest.mark.parametrize("spelling", ["hub", "transformers5"])
def test_explicit_fields_are_read_as_transformers_reads_them(tmp_path, spelling):
    raw = dict(MINIMAL_MOE, **EXPLICIT)
    if spelling == "transformers5":
        raw["rope_parameters"] = {"rope_theta": raw.pop("rope_theta"), "rope_type": "default"}
    ours, theirs, model = read_by_both(tmp_path, raw)
    assert_reads_like_transformers(ours, theirs, model)
    assert (ours.head_dim, ours.rope_theta, ours.sparse_layers) == (12, 500.0, [1])  # really not the defaults


@pytest.mark.parametrize("field, default", [
    ("rope_theta", 10000.0), ("norm_topk_prob", False), ("decoder_sparse_step", 1), ("mlp_only_layers", ()),
    ("rms_norm_eps", 1e-6), ("tie_word_embeddings", False), ("router_aux_loss_coef", 0.001), ("qkv_bias", True),
    ("head_dim", 4), ("num_key_value_heads", 16), ("bos_token_id", None), ("eos_token_id", None),
])
def test_each_default_alone(field, default):
    """The same defaults, written out: a field missing from the file takes Qwen2MoeConfig's default
    (head_dim = hidden / heads; num_key_value_heads a fixed 16, not the number of query heads)."""
    assert getattr(ModelConfig.from_dict(MINIMAL_MOE), field) == default
