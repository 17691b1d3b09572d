"""The MoE family side by side: DeepSeekMoE, DBRX, Mixtral, OLMoE, Qwen3-MoE and Qwen2-57B next to Qwen1.5-MoE.

(DeepSeekMoE, DBRX and the blog's dense comparison models have their own tests: tests/test_blog_models.py.)

Parameter counts are held to transformers' own models built on the meta device and to the
totals the models' authors publish; routing interventions to transformers run on a
checkpoint edited to mean the same thing; refusals to the exact family feature refused.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import minimoe
from minimoe import MinimoeError, ModelConfig, count_parameters
from minimoe.checkpoint.reader import Checkpoint
from minimoe.config import shipped_configs
from minimoe.config import FAMILIES
from minimoe.inspect.params import Architecture, family_table, format_family_table
from minimoe.inspect.trace import RoutingTrace

from conftest import FIXTURES, ROOT, load_reference
from parity import LOGIT_TOLERANCE, relative_error
import gpu_emulation

# Shipped config name: (total, activated) in billions, as the models' authors publish them
# (Mistral AI's Mixtral announcement, the OLMoE paper, Qwen's Qwen3-30B-A3B and Qwen2 pages).
PUBLISHED = {
    "mixtral-8x7b": (46.7, 12.9),
    "olmoe-1b-7b": (6.9, 1.3),
    "qwen3-30b-a3b": (30.5, 3.3),
    "qwen2-57b-a14b": (57.4, 14.2),
}
FAMILY_FIXTURES = ["moe_mixtral", "moe_olmoe", "moe_qwen3", "moe_qwen2_57b_shape"]
NEW_FAMILY_FIXTURES = ["moe_mixtral", "moe_olmoe", "moe_qwen3"]  # the model types that are not qwen2_moe
# The side-by-side designs of docs/moe-family.md and notebooks/06_moe_family.ipynb.
SIDE_BY_SIDE = {
    "Qwen1.5-MoE-A2.7B": "qwen1.5-moe-a2.7b",
    "DeepSeekMoE-16B": "deepseek-moe-16b-base",
    "DBRX": "dbrx-base",
    "Mixtral-8x7B": "mixtral-8x7b",
    "OLMoE-1B-7B": "olmoe-1b-7b",
    "Qwen3-30B-A3B": "qwen3-30b-a3b",
    "Qwen2-57B-A14B": "qwen2-57b-a14b",
}


def raw_config(path: Path) -> dict:
    return json.loads(path.read_text())


def published_figure(count: int) -> set[float]:
    """The one-decimal figures a model card could print for ``count``: rounded or truncated."""
    return {round(count / 1e9, 1), int(count / 1e8) / 10}


# --- parameter counts -------------------------------------------------------------------------------

def transformers_counts(raw: dict) -> tuple[int, int]:
    """(total, activated) of transformers' own model for a config.json, built on the meta device.

    Activated = total less the ``E - k`` of ``E`` routed experts a token does not use:
    ``(E - k) / E`` of every parameter under a sparse block's ``experts`` (fused
    ``[E, ...]`` tensors or one module per expert, whichever transformers builds).
    """
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.AutoConfig.for_model(**raw)
    with torch.device("meta"):
        reference = getattr(transformers, raw["architectures"][0])(config)
    total = sum(p.numel() for p in reference.parameters())
    experts = sum(p.numel() for name, p in reference.named_parameters() if ".experts." in name)
    ffn = getattr(config, "ffn_config", None)  # DBRX keeps its expert counts there
    count, k = (ffn.moe_num_experts, ffn.moe_top_k) if ffn else (getattr(config, "num_experts", 0),
                                                                  getattr(config, "num_experts_per_tok", 0))
    return total, total - (experts * (count - k) // count if count else 0)


FAMILY_CONFIGS = [shipped_configs()[name] for name in PUBLISHED] + [FIXTURES / name / "config.json"
                                                                     for name in FAMILY_FIXTURES]


@pytest.mark.parametrize("path", FAMILY_CONFIGS, ids=[f"{p.parent.name}/{p.stem}" for p in FAMILY_CONFIGS])
def test_counts_equal_transformers_own_model(path):
    total, activated = transformers_counts(raw_config(path))
    for counts in (count_parameters(Architecture.from_file(path)), count_parameters(ModelConfig.from_file(path))):
        assert (counts.total, counts.activated) == (total, activated)


@pytest.mark.parametrize("name", FAMILY_FIXTURES)
def test_counts_equal_the_tensors_in_each_fixture(name):
    checkpoint = Checkpoint(FIXTURES / name)
    stored = sum(math.prod(checkpoint.info(tensor).shape) for tensor in checkpoint.names)
    assert count_parameters(ModelConfig.from_file(FIXTURES / name)).total == stored


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_shipped_configs_give_the_published_totals(name):
    counts = count_parameters(Architecture.from_file(shipped_configs()[name]))
    total, activated = PUBLISHED[name]
    assert total in published_figure(counts.total), (name, counts.total)
    assert activated in published_figure(counts.activated), (name, counts.activated)


def test_qk_norm_weights_are_counted_as_each_family_shapes_them():
    """OLMoE: q_norm [heads*D] and k_norm [kv_heads*D] per layer; Qwen3-MoE: one [D] each per layer."""
    olmoe, qwen3 = (Architecture.from_file(shipped_configs()[name]) for name in ("olmoe-1b-7b", "qwen3-30b-a3b"))
    for arch, per_layer in ((olmoe, 16 * 128 + 16 * 128), (qwen3, 2 * 128)):
        without = count_parameters(dataclasses.replace(arch, qk_norm=None))
        assert count_parameters(arch).total - without.total == arch.num_hidden_layers * per_layer


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_params_cli_prints_transformers_total(name):
    result = subprocess.run([sys.executable, "-m", "minimoe", "params", name], capture_output=True, text=True,
                            check=True)
    printed = re.search(r"^\s+total\s+\S+\s+\(([\d,]+)\)", result.stdout, re.MULTILINE)
    assert printed, result.stdout
    total, _ = transformers_counts(raw_config(shipped_configs()[name]))
    assert int(printed[1].replace(",", "")) == total
    assert raw_config(shipped_configs()[name])["model_type"] in result.stdout


# --- the side-by-side table --------------------------------------------------------------------------

def side_by_side():
    return family_table({label: shipped_configs()[name] for label, name in SIDE_BY_SIDE.items()})


def test_family_table_from_the_configs():
    """Each column from its config.json's own fields, by independent arithmetic."""
    designs = side_by_side()
    assert [d.name for d in designs] == list(SIDE_BY_SIDE)
    for design, name in zip(designs, SIDE_BY_SIDE.values()):
        raw = raw_config(shipped_configs()[name])
        ffn = raw.get("ffn_config", {})  # DBRX's
        experts = raw.get("num_experts") or raw.get("num_local_experts") or raw.get("n_routed_experts") or ffn["moe_num_experts"]
        k = raw.get("num_experts_per_tok") or ffn["moe_top_k"]
        assert design.expert_sets_per_layer == math.comb(experts, k)
        sparse = (raw.get("num_hidden_layers") or raw["n_layers"]) - raw.get("first_k_dense_replace", 0)
        assert design.log10_expert_sets_per_token == pytest.approx(sparse * math.log10(math.comb(experts, k)))
        if raw["model_type"] in FAMILIES:  # the gating rule is the runnable config's own
            config = ModelConfig.from_dict(raw)
            assert design.arch.routing_rule == config.routing_rule
            assert design.arch.norm_topk_prob == (raw["model_type"] in ("mixtral", "dbrx") or raw.get("norm_topk_prob", False))
    by_name = {d.name: d for d in designs}
    # shared experts in units of one routed expert: Qwen1.5-MoE's "4 shared experts", DeepSeekMoE's 2
    shared = [by_name[n].shared_in_experts for n in ("Qwen1.5-MoE-A2.7B", "DeepSeekMoE-16B", "Qwen2-57B-A14B")]
    assert shared == [4, 2, 8]
    assert all(by_name[n].arch.shared_intermediate_size == 0
               for n in ("DBRX", "Mixtral-8x7B", "OLMoE-1B-7B", "Qwen3-30B-A3B"))
    assert by_name["DBRX"].expert_sets_per_layer == 1820  # C(16, 4), the 65x more combinations Databricks cites
    assert by_name["Mixtral-8x7B"].arch.moe_intermediate_size == 14336  # full width: Mistral-7B's FFN
    assert (by_name["OLMoE-1B-7B"].arch.qk_norm, by_name["Qwen3-30B-A3B"].arch.qk_norm) == ("projection", "head")
    assert by_name["Mixtral-8x7B"].expert_sets_per_layer == 28  # C(8, 2)


def test_the_docs_page_shows_the_computed_table():
    """docs/moe-family.md embeds the table; it must be what minimoe computes from the configs today."""
    page = (ROOT / "docs" / "moe-family.md").read_text(encoding="utf-8")
    assert format_family_table(side_by_side()) in page


# --- refusals ---------------------------------------------------------------------------------------

def family_config(name: str, **changes) -> dict:
    return {**raw_config(shipped_configs()[name]), **changes}


@pytest.mark.parametrize("raw, message", [
    (family_config("mixtral-8x7b", sliding_window=4096), "sliding_window is 4096: Mixtral would attend over a sliding"),
    (family_config("olmoe-1b-7b", clip_qkv=8.0), "clip_qkv is 8.0"),
    (family_config("olmoe-1b-7b", attention_bias=True), "attention_bias is true.*not supported for olmoe"),
    (family_config("qwen3-30b-a3b", attention_bias=True), "attention_bias is true.*not supported for qwen3_moe"),
    (family_config("qwen3-30b-a3b", use_sliding_window=True), "use_sliding_window is true"),
    (family_config("qwen3-30b-a3b", rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope scaling \\('yarn'\\)"),
    (family_config("mixtral-8x7b", hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
])
def test_family_features_minimoe_does_not_implement_are_refused_by_name(raw, message):
    with pytest.raises(MinimoeError, match=message):
        ModelConfig.from_dict(raw, "config.json")


def test_an_unknown_model_type_names_the_supported_ones():
    with pytest.raises(MinimoeError) as refused:
        ModelConfig.from_dict({**raw_config(shipped_configs()["qwen3-30b-a3b"]), "model_type": "deepseek_v3"})
    for model_type, family in FAMILIES.items():
        assert model_type in str(refused.value) and family.architecture in str(refused.value)
    assert "'deepseek_v3'" in str(refused.value)


@pytest.mark.parametrize("name", NEW_FAMILY_FIXTURES + ["moe_deepseek", "moe_dbrx", "dense_mistral", "dense_gemma"])
def test_the_cupy_backend_refuses_a_family_it_does_not_implement_before_copying_weights(name, monkeypatch):
    gpu_emulation.install(monkeypatch)

    def no_reading(self, tensor):
        raise AssertionError(f"weight {tensor} read before the refusal")

    monkeypatch.setattr(Checkpoint, "array", no_reading)
    architecture = FAMILIES[ModelConfig.from_file(FIXTURES / name).model_type].architecture
    with pytest.raises(MinimoeError, match=f"backend 'cupy' runs qwen2_moe and qwen2 models; .*{architecture}.*numpy"):
        minimoe.load(FIXTURES / name, backend="cupy")


# --- the layer walk and the routing arrays --------------------------------------------------------------

@pytest.mark.parametrize("name", FAMILY_FIXTURES)
def test_routing_arrays_mean_what_the_family_says(name):
    model, ids = minimoe.load(FIXTURES / name), load_reference(FIXTURES / name)["ids"][0]
    config, trace = model.config, model.trace(ids)
    assert trace.expert_ids.shape == (len(config.sparse_layers), trace.num_tokens, config.num_experts_per_tok)
    sums = trace.expert_weights.sum(-1)
    if config.norm_topk_prob:
        np.testing.assert_allclose(sums, 1, rtol=1e-5)
    else:  # the k router probabilities as they are: less than 1
        np.testing.assert_allclose(trace.expert_weights, trace.raw_weights)
        assert (sums < 1).all()
    if config.has_shared_expert:
        assert ((trace.shared_gate > 0) & (trace.shared_gate < 1)).all() and (trace.shared_norm > 0).all()
    else:  # and switching the missing shared expert off changes nothing
        assert (trace.shared_gate == 0).all() and (trace.shared_norm == 0).all()
        np.testing.assert_array_equal(model.forward(ids, interventions={"shared_expert": False}), model.forward(ids))


# --- interventions against transformers on an edited checkpoint -------------------------------------------

def transformers_logits(folder: Path, ids) -> np.ndarray:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits[0].numpy()


def edited_copy(source: Path, folder: Path, edit_tensors=None, **config_changes) -> Path:
    """A copy of a fixture with some tensors edited and config.json fields changed."""
    folder.mkdir()
    checkpoint = Checkpoint(source)
    tensors = {name: np.array(checkpoint.array(name)) for name in checkpoint.names}
    save_file(edit_tensors(tensors) if edit_tensors else tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({**raw_config(source / "config.json"), **config_changes}))
    return folder


def without_expert(removed: int):
    """Edit: delete routed expert ``removed`` of every sparse layer (its tensors and its router row), renumbering."""
    expert = re.compile(r"(.*\.experts\.)(\d+)(\..*)")

    def edit(tensors):
        out = {}
        for name, value in tensors.items():
            match = expert.match(name)
            if match and int(match[2]) == removed:
                continue
            if match and int(match[2]) > removed:
                name = f"{match[1]}{int(match[2]) - 1}{match[3]}"
            if re.search(r"\.(mlp|block_sparse_moe)\.gate\.weight$", name):
                value = np.delete(value, removed, axis=0)
            out[name] = value
        return out
    return edit


def experts_key(source: Path) -> str:
    raw = raw_config(source / "config.json")
    return next(key for key in FAMILIES[raw["model_type"]].experts_keys if raw.get(key) is not None)


@pytest.mark.parametrize("name", NEW_FAMILY_FIXTURES)
def test_disabling_an_expert_equals_transformers_without_it(name, tmp_path):
    """Softmax over the other experts, top-k among them: the same as a model that never had the expert."""
    source, removed = FIXTURES / name, 3
    model, ids = minimoe.load(source), load_reference(source)["ids"][0]
    without = edited_copy(source, tmp_path / "without", without_expert(removed),
                          **{experts_key(source): model.config.num_experts - 1})
    disabled = {layer: [removed] for layer in model.config.sparse_layers}
    theirs = transformers_logits(without, ids)
    assert relative_error(model.forward(ids, interventions={"disabled_experts": disabled}), theirs) < LOGIT_TOLERANCE
    assert relative_error(model.forward(ids), theirs) > 1e-3  # it did change something
    assert not (model.trace(ids, interventions={"disabled_experts": disabled}).expert_ids == removed).any()


@pytest.mark.parametrize("name", NEW_FAMILY_FIXTURES)
def test_changing_k_equals_transformers_with_that_k(name, tmp_path):
    source = FIXTURES / name
    model, ids = minimoe.load(source), load_reference(source)["ids"][0]
    k = model.config.num_experts_per_tok + 1
    theirs = transformers_logits(edited_copy(source, tmp_path / "k", num_experts_per_tok=k), ids)
    assert relative_error(model.forward(ids, interventions={"top_k": k}), theirs) < LOGIT_TOLERANCE
    assert relative_error(model.forward(ids), theirs) > 1e-3


@pytest.mark.parametrize("name, rule", [
    ("moe_mixtral", "softmax over 8 experts, top-2, renormalised to sum 1"),
    ("moe_olmoe", "softmax over 8 experts, top-3, not renormalised"),
    ("moe_qwen3", "softmax over 8 experts, top-2, renormalised to sum 1"),
    ("moe_qwen2_57b_shape", "softmax over 64 experts, top-8, not renormalised, + sigmoid-gated shared expert"),
])
def test_a_trace_says_which_routing_rule_produced_it(name, rule, tmp_path):
    trace = minimoe.load(FIXTURES / name).trace([5, 6, 7, 8])
    assert trace.routing_rule == rule
    trace.save_npz(tmp_path / "t.npz")
    assert RoutingTrace.load_npz(tmp_path / "t.npz").routing_rule == rule
    assert RoutingTrace.concat([trace, trace]).routing_rule == rule and trace.select(1, 3).routing_rule == rule
    assert trace.to_json()["routing_rule"] == rule
