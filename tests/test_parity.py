"""minimoe against transformers' recorded outputs on every fixture checkpoint.

The references were computed by transformers (scripts/make_fixtures.py); nothing
here compares minimoe with itself except where stated (cache vs full forward is
also held to transformers' greedy continuation).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import minimoe
from minimoe import backend
from minimoe.checkpoint import names

from conftest import FIXTURES, MOE_FIXTURES, load_reference
from parity import ROUTER_PROB_TOLERANCE, check_cached_decoding, check_logits, check_routing


def test_logits_match_transformers(fixture_dir):
    check_logits(minimoe.load(fixture_dir), load_reference(fixture_dir))


def test_cached_decoding_matches_full_forward_and_greedy(fixture_dir):
    check_cached_decoding(minimoe.load(fixture_dir), load_reference(fixture_dir))


@pytest.mark.parametrize("name", MOE_FIXTURES)
def test_router_experts_and_aux_loss_match_transformers(name):
    check_routing(minimoe.load(FIXTURES / name), load_reference(FIXTURES / name))


def test_blocked_upcast_path_matches_transformers(fixture_dir, monkeypatch):
    """The fixtures are small enough that every weight would be upcast once at load;
    force the blocked bf16/f16 -> f32 path (tiny blocks, several per matrix) instead."""
    monkeypatch.setattr(backend, "SMALL_MATRIX_ELEMENTS", 0)
    monkeypatch.setattr(backend, "UPCAST_ELEMENTS", 300)
    monkeypatch.setattr(backend, "SMALL_GEMM_MNK", 100)
    model = minimoe.load(fixture_dir)
    query = names.tensor_views(model.config, model.checkpoint.array)("model.layers.0.self_attn.q_proj.weight")
    stored = query.dtype  # (DBRX's q is a view into its fused Wqkv)
    assert model.decoder[0].attention.q.weight.dtype == stored
    check_logits(model, load_reference(fixture_dir))


@pytest.mark.parametrize("name", MOE_FIXTURES)
def test_routing_is_as_decisive_as_transformers_found_it(name):
    """The fixture maker picked prompts whose k-th and (k+1)-th router probabilities differ by at
    least the fixture's required margin in transformers (5e-4; 2e-5 for 64 experts, top-8: see
    make_fixtures) -- a near-tie would make parity a coin toss: minimoe's own router probabilities
    on those prompts must show the same smallest margin."""
    reference = load_reference(FIXTURES / name)
    model = minimoe.load(FIXTURES / name)
    k = model.config.num_experts_per_tok
    probs = np.concatenate([model.trace(ids).router_probs for ids in reference["ids"]], axis=1)  # [S, B*T, E]
    ranked = -np.sort(-probs, axis=-1)
    ours = float((ranked[..., k - 1] - ranked[..., k]).min())
    margin = reference["min_topk_margin"].item()
    manifest = json.loads((FIXTURES / "manifest.json").read_text())
    required = manifest[name].get("required_margin", 5e-4)
    assert required >= 2e-5 and margin >= required, f"{name}: top-k margin {margin} too small"
    assert ours == pytest.approx(margin, abs=2 * ROUTER_PROB_TOLERANCE)
    assert manifest[name]["min_topk_margin"] == pytest.approx(margin, abs=5e-6)


def _backed_by_file(array: np.ndarray) -> bool:
    while array is not None:
        if isinstance(array, np.memmap):
            return True
        array = array.base
    return False


def test_weights_stay_in_stored_dtype_and_memory_mapped(monkeypatch):
    """Nothing upcasts the model at load: large matrices keep their bf16 bytes in the file mapping."""
    monkeypatch.setattr(backend, "SMALL_MATRIX_ELEMENTS", 0)
    model = minimoe.load(FIXTURES / "moe_bf16_sharded")
    for weight in (model.decoder[0].mlp.experts[0].gate.weight, model.lm_head.weight, model.embed.weight):
        assert weight.dtype.name == "bfloat16"
        assert _backed_by_file(weight)
        assert not weight.flags.writeable
