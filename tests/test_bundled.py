"""The bundled model: in the Hub's layout, loadable by transformers, and equal to it logit for logit."""

from __future__ import annotations

import json

import numpy as np
import pytest

import minimoe

from parity import LOGIT_TOLERANCE, relative_error

BUNDLED = minimoe.default_model_path()


def test_bundled_model_has_the_hub_layout_and_a_model_card():
    names = {path.name for path in BUNDLED.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", "README.md"} <= names
    config = json.loads((BUNDLED / "config.json").read_text())
    assert config["architectures"] == ["Qwen2MoeForCausalLM"] and config["num_experts"] >= 16
    model = minimoe.load(BUNDLED)
    assert model.checkpoint.info("model.embed_tokens.weight").dtype.name == "bfloat16"
    assert sum(f.path.stat().st_size for f in model.checkpoint.files.values()) < 10_000_000


def test_bundled_model_matches_transformers():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tok = minimoe.load_tokenizer(BUNDLED)
    ids = tok.encode("def parse_args(argv=None):\n    parser = argparse.ArgumentParser()\n")
    reference = transformers.AutoModelForCausalLM.from_pretrained(BUNDLED, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0].numpy()
    assert relative_error(minimoe.load(BUNDLED).forward(ids), expected) < LOGIT_TOLERANCE
