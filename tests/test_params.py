"""Parameter counts from config.json: transformers' own count for the total, the blog's table for the rest."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from minimoe import MinimoeError, ModelConfig, count_parameters
from minimoe.cli import shipped_configs
from minimoe.params import Architecture, token_cost

from conftest import FIXTURES

QWEN_MOE = shipped_configs()["qwen1.5-moe-a2.7b"]

# The Qwen1.5-MoE blog's table (https://qwenlm.github.io/blog/qwen-moe/), billions:
# total, activated, activated non-embedding.
BLOG_TABLE = {
    "mistral-7b": (7.2, 7.2, 7.0),
    "gemma-7b": (8.5, 8.5, 7.8),
    "qwen1.5-7b": (7.7, 7.7, 6.4),
    "deepseek-moe-16b-base": (16.4, 2.8, 2.4),
    "qwen1.5-moe-a2.7b": (14.3, 2.7, 2.0),
}


def test_qwen1_5_moe_matches_the_blog():
    """The Qwen1.5-MoE blog: 14.3B parameters, 2.7B activated, 2.0B activated non-embedding.

    The exact non-embedding count is 2.07B; the blog's table truncates it (it lists the
    exact 6.48B of Qwen1.5-7B as 6.4B the same way), so we hold it to [2.0B, 2.1B).
    """
    counts = count_parameters(ModelConfig.from_file(QWEN_MOE))
    assert round(counts.total / 1e9, 1) == 14.3
    assert round(counts.activated / 1e9, 1) == 2.7
    assert 2.0e9 <= counts.activated_non_embedding < 2.1e9


def blog_figure(count: int) -> set[float]:
    """The one-decimal figures a table could print for ``count``: rounded, or truncated as the blog does for Qwen."""
    return {round(count / 1e9, 1), int(count / 1e8) / 10}


@pytest.mark.parametrize("name", sorted(BLOG_TABLE))
def test_every_model_of_the_blog_table(name):
    """All five rows of the blog's table, each from its shipped config.json alone."""
    counts = count_parameters(Architecture.from_file(shipped_configs()[name]))
    computed = (counts.total, counts.activated, counts.activated_non_embedding)
    for blog, count in zip(BLOG_TABLE[name], computed):
        assert blog in blog_figure(count), (name, blog, count)


def test_deepseek_moe_matches_its_paper():
    """DeepSeekMoE is not in transformers; its paper and model card give 16.4B total, 2.8B activated.

    Its config makes layer 0 dense (first_k_dense_replace 1) and 27 layers of 64
    routed experts (top-6) plus 2 shared ones, all of width 1408.  Counted by hand:
    a routed or shared expert is 3 * 2048 * 1408 parameters.
    """
    arch = Architecture.from_file(shipped_configs()["deepseek-moe-16b-base"])
    assert arch.moe_layers == tuple(range(1, 28))
    expert = 3 * 2048 * 1408
    attention_and_norms = 4 * 2048 * 2048 + 2 * 2048
    moe_layer_total = attention_and_norms + 64 * 2048 + 66 * expert  # router + 64 routed + 2 shared
    moe_layer_active = attention_and_norms + 64 * 2048 + 8 * expert  # router + 6 routed + 2 shared
    dense_layer = attention_and_norms + 3 * 2048 * 10944
    embedding = 2 * 102400 * 2048
    counts = count_parameters(arch)
    assert counts.total == dense_layer + 27 * moe_layer_total + embedding + 2048
    assert counts.activated == dense_layer + 27 * moe_layer_active + embedding + 2048
    assert round(counts.total / 1e9, 1) == 16.4 and round(counts.activated / 1e9, 1) == 2.8


def test_unknown_architectures_are_refused():
    with pytest.raises(MinimoeError, match="model_type 'llama'"):
        Architecture.from_config({"model_type": "llama"})
    with pytest.raises(MinimoeError, match="not a valid mistral config"):
        Architecture.from_config({"model_type": "mistral", "hidden_size": 8})


def test_token_cost_is_two_flops_per_multiplied_weight():
    """At decode, a token multiplies by every activated weight but the embedding table (a lookup)."""
    arch = Architecture.from_file(QWEN_MOE)
    counts = count_parameters(arch)
    cost = token_cost(arch, context=0)
    assert cost.attention_flops == 0 and cost.kv_cache_bytes == 0
    assert cost.matmul_flops == 2 * (counts.activated - 151936 * 2048)
    with_context = token_cost(arch, context=1000)
    # 24 layers x 16 heads x 128 dims: 2 FLOPs each for q.k and for the weighted values, per position
    assert with_context.attention_flops == 24 * 16 * 128 * 4 * 1000
    assert with_context.kv_cache_bytes == 24 * 2 * 2048 * 2 * 1000


@pytest.mark.parametrize("config_path", [QWEN_MOE] + [shipped_configs()[name] for name in ("qwen1.5-7b", "mistral-7b", "gemma-7b")]
                         + [FIXTURES / name / "config.json" for name in
                                                      ("moe_sparse_step2", "moe_tied", "dense_qwen2", "moe_dense_layer")])
def test_total_equals_transformers_own_count(config_path):
    assert count_parameters(Architecture.from_file(config_path)).total == transformers_count(config_path)
    if json.loads(config_path.read_text())["model_type"].startswith("qwen2"):  # the model minimoe runs: same count
        assert count_parameters(ModelConfig.from_file(config_path)).total == transformers_count(config_path)


def transformers_count(config_path) -> int:
    """Parameters of transformers' own model for a config.json, built on the meta device (shapes only, no memory)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    raw = json.loads(config_path.read_text())
    model_class = {"qwen2_moe": transformers.Qwen2MoeForCausalLM, "qwen2": transformers.Qwen2ForCausalLM,
                   "mistral": transformers.MistralForCausalLM, "gemma": transformers.GemmaForCausalLM}[raw["model_type"]]
    config = transformers.AutoConfig.for_model(**raw)
    with torch.device("meta"):
        reference = model_class(config)
    # tied weights are one tensor (Gemma's head is its embedding): parameters() yields each once
    return sum(p.numel() for p in reference.parameters())


def test_params_cli_prints_the_counts():
    result = subprocess.run([sys.executable, "-m", "minimoe", "params", "qwen1.5-moe-a2.7b"],
                            capture_output=True, text=True, check=True)
    assert "14.32B" in result.stdout and "2.69B" in result.stdout and "2.07B" in result.stdout
    assert "(14,315,784,192)" in result.stdout
    mistral = subprocess.run([sys.executable, "-m", "minimoe", "params", "mistral-7b"],
                             capture_output=True, text=True, check=True)
    assert "all dense" in mistral.stdout and "7.24B" in mistral.stdout


def test_cli_errors_are_clear_with_nonzero_exit(tmp_path):
    missing = subprocess.run([sys.executable, "-m", "minimoe", "params", str(tmp_path / "nope")],
                             capture_output=True, text=True)
    assert missing.returncode == 1
    assert "minimoe: error:" in missing.stderr and "not a shipped config" in missing.stderr
    usage = subprocess.run([sys.executable, "-m", "minimoe", "params", "--bogus"], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage:" in usage.stderr
