"""Parameter counts from config.json: transformers' own count for the total, our arithmetic for the rest.

The Qwen1.5-MoE blog's table (tests/blog_quotes.py, as the blog prints it) is set beside our
counts, and where the two differ the difference is named here and explained in the README.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from minimoe import MinimoeError, ModelConfig, count_parameters
from minimoe.config import shipped_configs
from minimoe.inspect.params import Architecture, token_cost

from blog_quotes import BLOG_TABLE
from conftest import FIXTURES

QWEN_MOE = shipped_configs()["qwen1.5-moe-a2.7b"]
COLUMNS = ("total", "activated", "activated non-embedding")

# What we expect our counts to be, in billions rounded to one decimal:
# total, activated, activated non-embedding.  A dense model activates every parameter.
EXPECTED = {
    "mistral-7b": (7.2, 7.2, 7.0),
    "gemma-7b": (8.5, 8.5, 7.8),
    "qwen1.5-7b": (7.7, 7.7, 6.5),
    "deepseek-moe-16b-base": (16.4, 2.8, 2.4),
    "qwen1.5-moe-a2.7b": (14.3, 2.7, 2.1),
}

# Where the blog's table (as quoted) differs from those expectations, and why.
DIFFERENCES_FROM_THE_BLOG = {
    ("gemma-7b", "activated"): "the blog gives Gemma-7B's count without its embedding table (7.75B), not all 8.54B",
    ("qwen1.5-7b", "activated non-embedding"): "the blog cuts 6.48B to 6.4 (its text says 6.5 billion)",
    ("qwen1.5-moe-a2.7b", "activated non-embedding"): "the blog cuts 2.07B to 2.0",
}


def counted(name: str) -> tuple[int, int, int]:
    counts = count_parameters(Architecture.from_file(shipped_configs()[name]))
    return counts.total, counts.activated, counts.activated_non_embedding


def test_qwen1_5_moe_counts():
    """14.32B parameters, 2.69B activated, 2.07B activated non-embedding; the same through ModelConfig."""
    counts = count_parameters(ModelConfig.from_file(QWEN_MOE))
    assert (counts.total, counts.activated, counts.activated_non_embedding) == counted("qwen1.5-moe-a2.7b")
    assert round(counts.total / 1e9, 2) == 14.32
    assert round(counts.activated / 1e9, 2) == 2.69
    assert round(counts.activated_non_embedding / 1e9, 2) == 2.07


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_model_of_the_blog_table(name):
    """All five models of the blog's table, each counted from its shipped config.json alone."""
    assert tuple(round(count / 1e9, 1) for count in counted(name)) == EXPECTED[name]


def test_the_blog_table_differs_from_our_counts_only_where_we_say():
    differences = {(name, column) for name, (_, *blog) in BLOG_TABLE.items()
                   for column, ours, theirs in zip(COLUMNS, EXPECTED[name], blog) if ours != theirs}
    assert differences == set(DIFFERENCES_FROM_THE_BLOG)


def test_gemma_7b_activated_in_the_blog_is_its_count_without_the_embedding():
    """The blog's 7.8 for Gemma-7B's activated parameters: its 256000 x 3072 embedding table left out."""
    total, activated, non_embedding = counted("gemma-7b")
    assert activated == total and total - 256000 * 3072 == non_embedding
    assert round(non_embedding / 1e9, 1) == BLOG_TABLE["gemma-7b"][2]


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
    with pytest.raises(MinimoeError, match="missing required field 'num_attention_heads'"):
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
