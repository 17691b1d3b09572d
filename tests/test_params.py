"""Parameter counts from config.json: transformers' own count for the total, the blog's table for the rest."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from minimoe import ModelConfig, count_parameters
from minimoe.cli import shipped_configs

from conftest import FIXTURES

QWEN_MOE = shipped_configs()["qwen1.5-moe-a2.7b"]


def test_qwen1_5_moe_matches_the_blog():
    """The Qwen1.5-MoE blog: 14.3B parameters, 2.7B activated, 2.0B activated non-embedding.

    The exact non-embedding count is 2.07B; the blog's table truncates it (it lists the
    exact 6.48B of Qwen1.5-7B as 6.4B the same way), so we hold it to [2.0B, 2.1B).
    """
    counts = count_parameters(ModelConfig.from_file(QWEN_MOE))
    assert round(counts.total / 1e9, 1) == 14.3
    assert round(counts.activated / 1e9, 1) == 2.7
    assert 2.0e9 <= counts.activated_non_embedding < 2.1e9


@pytest.mark.parametrize("config_path", [QWEN_MOE] + [FIXTURES / name / "config.json" for name in
                                                      ("moe_sparse_step2", "moe_tied", "dense_qwen2", "moe_dense_layer")])
def test_total_equals_transformers_own_count(config_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    raw = json.loads(config_path.read_text())
    model_class = {"qwen2_moe": transformers.Qwen2MoeForCausalLM, "qwen2": transformers.Qwen2ForCausalLM}[raw["model_type"]]
    config = transformers.AutoConfig.for_model(**raw)
    with torch.device("meta"):  # shapes only, no memory
        reference = model_class(config)
    # tied weights are one tensor; count each distinct parameter once
    expected = sum(p.numel() for p in reference.parameters())
    assert count_parameters(ModelConfig.from_file(config_path)).total == expected


def test_params_cli_prints_the_counts():
    result = subprocess.run([sys.executable, "-m", "minimoe", "params", "qwen1.5-moe-a2.7b"],
                            capture_output=True, text=True, check=True)
    assert "14.32B" in result.stdout and "2.69B" in result.stdout and "2.07B" in result.stdout
    assert "(14,315,784,192)" in result.stdout


def test_cli_errors_are_clear_with_nonzero_exit(tmp_path):
    missing = subprocess.run([sys.executable, "-m", "minimoe", "params", str(tmp_path / "nope")],
                             capture_output=True, text=True)
    assert missing.returncode == 1
    assert "minimoe: error:" in missing.stderr and "not a shipped config" in missing.stderr
    usage = subprocess.run([sys.executable, "-m", "minimoe", "params", "--bogus"], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage:" in usage.stderr
