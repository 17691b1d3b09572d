"""The two bundled models: a miniature Qwen1.5-MoE and the dense parent it was upcycled from.

Each is in the Hub's layout, loads in transformers with logits equal to minimoe's, has the structure its
model card claims, refuses prompts past the context it was trained at, and scores on the held-out slices
shipped in tests/data/held_out what its card says.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import minimoe
from minimoe.errors import MinimoeError
from minimoe.inspect.tracing import log_softmax

from parity import LOGIT_TOLERANCE, relative_error

MOE, DENSE = minimoe.default_model_path(), minimoe.default_model_path("dense")
SLICES = Path(__file__).resolve().parent / "data" / "held_out"
CARD_TOLERANCE = 0.05  # nats/token: the card's figure (torch, float32) against minimoe's recomputation
SLICE_WINDOW = 256  # as scripts/train_bundled_model.py's slice_loss reads the slices


def config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def training(folder: Path) -> dict:
    return json.loads((folder / "training.json").read_text())


@pytest.mark.parametrize("folder", [MOE, DENSE], ids=["moe", "dense"])
def test_bundled_model_has_the_hub_layout_a_model_card_and_bf16_weights(folder):
    names = {path.name for path in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", "README.md", "training.json"} <= names
    model = minimoe.load(folder)
    assert model.checkpoint.info("model.embed_tokens.weight").dtype.name == "bfloat16"


def test_both_bundled_models_fit_in_30_mb_and_share_one_tokenizer():
    size = sum(path.stat().st_size for folder in (MOE, DENSE) for path in folder.iterdir() if path.is_file())
    assert size <= 30_000_000
    assert (MOE / "tokenizer.json").read_bytes() == (DENSE / "tokenizer.json").read_bytes()


def test_the_moe_has_qwen15_moe_routing_structure_exactly():
    moe = config(MOE)
    assert moe["architectures"] == ["Qwen2MoeForCausalLM"]
    assert (moe["num_experts"], moe["num_experts_per_tok"], moe["norm_topk_prob"]) == (60, 4, False)
    assert moe["shared_expert_intermediate_size"] == 4 * moe["moe_intermediate_size"]
    assert moe["decoder_sparse_step"] == 1 and moe["mlp_only_layers"] == []  # every layer is a MoE layer


def test_the_dense_parent_relates_to_the_moe_as_qwen15_18b_does_to_qwen15_moe():
    moe, dense = config(MOE), config(DENSE)
    assert dense["architectures"] == ["Qwen2ForCausalLM"]
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size"):
        assert dense[key] == moe[key], key
    real_ratio = 5504 / 1408  # Qwen1.5-1.8B's FFN over Qwen1.5-MoE-A2.7B's expert width
    assert abs(dense["intermediate_size"] / moe["moe_intermediate_size"] - real_ratio) < 0.05


@pytest.mark.parametrize("folder", [MOE, DENSE], ids=["moe", "dense"])
def test_context_is_the_trained_context_and_longer_prompts_are_refused(folder):
    context = config(folder)["max_position_embeddings"]
    assert context == training(folder)["context"]
    model = minimoe.load(folder)
    model.forward(np.zeros(context, dtype=np.int64))  # the whole trained context is fine
    with pytest.raises(MinimoeError, match=f"context of {context} positions"):
        model.forward(np.zeros(context + 1, dtype=np.int64))


def test_default_model_path_names_the_bundled_models():
    assert MOE.name == "tiny-moe" and DENSE.name == "tiny-dense"
    assert minimoe.default_model_path("moe") == MOE
    with pytest.raises(MinimoeError, match="'moe', 'dense'|'dense', 'moe'"):
        minimoe.default_model_path("sparse")


@pytest.mark.parametrize("folder", [MOE, DENSE], ids=["moe", "dense"])
def test_bundled_model_matches_transformers(folder):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tok = minimoe.load_tokenizer(folder)
    ids = tok.encode("def parse_args(argv=None):\n    parser = argparse.ArgumentParser()\n")
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0].numpy()
    assert relative_error(minimoe.load(folder).forward(ids), expected) < LOGIT_TOLERANCE


def slice_loss(model: minimoe.Model, ids: list[int]) -> float:
    """Mean next-token cross-entropy over consecutive windows of SLICE_WINDOW tokens (the remainder dropped)."""
    losses = []
    for start in range(0, len(ids) - SLICE_WINDOW + 1, SLICE_WINDOW):
        window = np.array(ids[start : start + SLICE_WINDOW])
        log_probs = log_softmax(model.forward(window))[:-1]
        losses.append(-log_probs[np.arange(SLICE_WINDOW - 1), window[1:]].mean())
    return float(np.mean(losses))


@pytest.mark.parametrize("texts", ["stdlib", "third_party"])
@pytest.mark.parametrize("label,folder", [("tiny-moe", MOE), ("tiny-dense", DENSE)], ids=["moe", "dense"])
def test_model_card_held_out_figures_are_recomputed_on_the_shipped_slices(label, folder, texts):
    evaluation = json.loads((MOE / "evaluation.json").read_text())
    card = evaluation["models"][label][f"{texts}_slice"]
    assert f"{card:.3f}" in (folder / "README.md").read_text()  # the figure the card prints
    ids = minimoe.load_tokenizer(folder).encode((SLICES / f"{texts}.txt").read_text())
    assert len(ids) >= 8 * SLICE_WINDOW
    assert abs(slice_loss(minimoe.load(folder), ids) - card) < CARD_TOLERANCE


def test_a_built_wheel_carries_both_bundled_models(tmp_path):
    """A non-editable install gets the models too: their files are package data in pyproject.toml."""
    import subprocess
    import sys
    import zipfile

    root = MOE.parents[2]
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(root), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("minimoe-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in (MOE, DENSE):
        for path in folder.iterdir():
            if path.is_file():
                assert f"minimoe/assets/{folder.name}/{path.name}" in names
