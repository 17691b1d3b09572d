"""Routing traces, interventions and the layer walk: against transformers where it has an equivalent."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import minimoe
from minimoe import MinimoeError
from minimoe.checkpoint.reader import Checkpoint
from minimoe.inspect.trace import ARRAY_FIELDS, RoutingTrace
from minimoe.inspect.tracing import measure_interventions, trace_generation

from conftest import FIXTURES, load_reference
from parity import LOGIT_TOLERANCE, check_routing, relative_error

torch = pytest.importorskip("torch", reason="the reference model needs torch + transformers")
transformers = pytest.importorskip("transformers")

SOURCE = FIXTURES / "moe_gqa"  # float32, 2 sparse layers, 8 experts, top-2


def transformers_logits(folder: Path, ids) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits[0].numpy()


def variant(tmp_path: Path, edit_tensors=None, **config_changes) -> Path:
    """A copy of SOURCE with some tensors edited and config.json fields changed."""
    folder = tmp_path / "variant"
    folder.mkdir()
    checkpoint = Checkpoint(SOURCE)
    tensors = {name: np.array(checkpoint.array(name)) for name in checkpoint.names}
    save_file(edit_tensors(tensors) if edit_tensors else tensors, str(folder / "model.safetensors"))
    config = json.loads((SOURCE / "config.json").read_text())
    config.update(config_changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_trace_matches_transformers_router_on_every_fixture():
    for name in sorted(p.name for p in FIXTURES.iterdir() if p.name.startswith("moe_")):
        check_routing(minimoe.load(FIXTURES / name), load_reference(FIXTURES / name))


def test_disabling_an_expert_equals_transformers_without_it(tmp_path):
    """disabled_experts removes the expert from the router: the same as a model built without it."""
    removed, ids = 3, load_reference(SOURCE)["ids"][0]

    def drop_expert(tensors):
        out = {}
        for name, value in tensors.items():
            match = re.match(r"(model\.layers\.\d+\.mlp\.experts\.)(\d+)(\..*)", name)
            if match and int(match[2]) == removed:
                continue
            if match and int(match[2]) > removed:
                name = f"{match[1]}{int(match[2]) - 1}{match[3]}"
            if name.endswith("mlp.gate.weight"):
                value = np.delete(value, removed, axis=0)
            out[name] = value
        return out

    without = variant(tmp_path, drop_expert, num_experts=7)
    model = minimoe.load(SOURCE)
    sparse = model.config.sparse_layers
    ours = model.forward(ids, interventions={"disabled_experts": {layer: [removed] for layer in sparse}})
    assert relative_error(ours, transformers_logits(without, ids)) < LOGIT_TOLERANCE
    assert relative_error(model.forward(ids), transformers_logits(without, ids)) > 1e-3  # it did change something
    trace = model.trace(ids, interventions={"disabled_experts": {layer: [removed] for layer in sparse}})
    assert not (trace.expert_ids == removed).any()
    assert np.isneginf(trace.router_logits[:, :, removed]).all() and (trace.router_probs[:, :, removed] == 0).all()


def test_disabling_in_one_layer_only_touches_that_layer():
    model, ids = minimoe.load(SOURCE), load_reference(SOURCE)["ids"][0]
    plain = model.trace(ids)
    popular = int(np.bincount(plain.expert_ids[1].reshape(-1)).argmax())  # layer 1's busiest expert
    trace = model.trace(ids, interventions={"disabled_experts": {1: [popular]}})
    assert not (trace.expert_ids[1] == popular).any()
    np.testing.assert_array_equal(trace.expert_ids[0], plain.expert_ids[0])  # layer 0 runs before it


def test_changing_k_equals_transformers_with_that_k(tmp_path):
    ids = load_reference(SOURCE)["ids"][0]
    ours = minimoe.load(SOURCE).forward(ids, interventions={"top_k": 3})
    assert relative_error(ours, transformers_logits(variant(tmp_path, num_experts_per_tok=3), ids)) < LOGIT_TOLERANCE


def zero_shared(tensors):
    """The shared expert's output projection zeroed: the checkpoint equivalent of ``shared_expert=False``."""
    return {name: np.zeros_like(v) if "shared_expert.down_proj" in name else v for name, v in tensors.items()}


def test_switching_the_shared_expert_off_equals_transformers_with_it_zeroed(tmp_path):
    ids = load_reference(SOURCE)["ids"][0]
    model = minimoe.load(SOURCE)
    ours = model.forward(ids, interventions={"shared_expert": False})
    assert relative_error(ours, transformers_logits(variant(tmp_path, zero_shared), ids)) < LOGIT_TOLERANCE
    trace = model.trace(ids, interventions={"shared_expert": False})
    assert (trace.shared_norm == 0).all() and (trace.shared_gate > 0).all()  # gate still reported
    only_layer_1 = model.trace(ids, interventions={"shared_expert": [1]})
    assert (only_layer_1.shared_norm[1] == 0).all() and (only_layer_1.shared_norm[0] > 0).all()


def test_forced_experts_are_used_with_their_router_probabilities():
    model, ids = minimoe.load(SOURCE), load_reference(SOURCE)["ids"][0]
    trace = model.trace(ids, interventions={"forced_experts": {0: [6, 1]}})
    forced = np.array([6, 1])
    most_likely_first = np.argsort(-trace.router_probs[0][:, forced], axis=-1)
    np.testing.assert_array_equal(trace.expert_ids[0], forced[most_likely_first])
    np.testing.assert_allclose(trace.raw_weights[0], np.take_along_axis(trace.router_probs[0], trace.expert_ids[0], -1))


@pytest.mark.parametrize("kwargs, message", [
    (dict(disabled_experts={5: [0]}), "layer 5 is not a sparse layer"),
    (dict(disabled_experts={0: [8]}), "expert 8 in layer 0 is outside \\[0, 8\\)"),
    (dict(forced_experts={0: [1, 1]}), "lists an expert twice"),
    (dict(forced_experts={0: [2]}, disabled_experts={0: [2]}), "forces an expert it also disables"),
    (dict(top_k=8, disabled_experts={0: [1]}), "top_k: 8 for layer 0 must be an integer in \\[1, 7\\]"),
    (dict(top_k=0), "top_k: 0"),
])
def test_bad_interventions_are_refused(kwargs, message):
    with pytest.raises(MinimoeError, match=message):
        minimoe.load(SOURCE).forward([1, 2, 3], interventions=kwargs)


def transformers_run(folder: Path, ids) -> tuple[torch.Tensor, float]:
    """transformers' logits ``[T, V]`` and its language-model loss on ``ids``."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(torch.from_numpy(ids)[None], labels=torch.from_numpy(ids)[None])
    return out.logits[0], out.loss.item()


def test_measure_interventions_against_transformers_on_the_modified_model(tmp_path):
    """top_k=1 without the shared expert is transformers with num_experts_per_tok=1 and the shared
    expert zeroed.  From the two transformers runs, torch's kl_div gives KL(original || intervened)
    per position (the original is the reference distribution); the loss after the intervention is
    the modified model's own loss."""
    ids = load_reference(SOURCE)["ids"][0]
    original, base_loss = transformers_run(SOURCE, ids)
    modified, loss = transformers_run(variant(tmp_path, zero_shared, num_experts_per_tok=1), ids)
    log_p, log_q = torch.log_softmax(original.double(), -1), torch.log_softmax(modified.double(), -1)
    kl = torch.nn.functional.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1).numpy()
    reverse = torch.nn.functional.kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1).numpy()
    assert np.abs(kl - reverse).max() > 0.03 * kl.max()  # asymmetric far beyond the tolerance below

    change = {"top_k": 1, "shared_expert": False}
    effect = measure_interventions(minimoe.load(SOURCE), ids, {"top-1, no shared": change}, progress=False)["top-1, no shared"]
    np.testing.assert_allclose(effect.kl_per_token, kl, rtol=1e-4, atol=1e-6)
    assert effect.mean_kl == pytest.approx(kl.mean(), rel=1e-4)
    assert effect.last_kl == pytest.approx(kl[-1], rel=1e-4, abs=1e-6)
    assert effect.loss == pytest.approx(loss, rel=1e-5) and effect.base_loss == pytest.approx(base_loss, rel=1e-5)
    assert effect.loss_change == pytest.approx(loss - base_loss, rel=1e-3)
    assert effect.top1_changed == pytest.approx((original.argmax(-1) != modified.argmax(-1)).double().mean().item())
    assert 0 < effect.top1_changed < 1  # neither count is trivially right


def test_measuring_no_change_gives_zero():
    model, ids = minimoe.load(SOURCE), load_reference(SOURCE)["ids"][0]
    unchanged = {"the model's own k": {"top_k": model.config.num_experts_per_tok}}
    effect = measure_interventions(model, ids, unchanged, progress=False)["the model's own k"]
    assert effect.mean_kl == pytest.approx(0, abs=1e-9) and effect.loss == effect.base_loss


def test_trace_grows_through_generation_like_one_pass():
    model = minimoe.load(SOURCE)
    new_ids, grown = trace_generation(model, [5, 6, 7, 8], 6, temperature=0, eos_token_ids=[])
    assert new_ids == model.generate([5, 6, 7, 8], 6, temperature=0, eos_token_ids=[])
    whole = model.trace([5, 6, 7, 8] + new_ids[:-1])
    np.testing.assert_array_equal(grown.token_ids, whole.token_ids)
    np.testing.assert_array_equal(grown.positions, np.arange(9))
    np.testing.assert_array_equal(grown.expert_ids, whole.expert_ids)
    np.testing.assert_allclose(grown.router_probs, whole.router_probs, atol=1e-5)
    cache = model.new_cache()  # the same sequence traced in two pieces through one cache
    pieces = RoutingTrace.concat([model.trace_continuation(whole.token_ids[:4], cache),
                                  model.trace_continuation(whole.token_ids[4:], cache)])
    assert cache.length == 9 and pieces.interventions == grown.interventions == "none"
    _, top1 = trace_generation(model, [5, 6, 7, 8], 3, temperature=0, interventions={"top_k": 1})
    assert top1.interventions == "top-1" and top1.top_k == 1
    for name in ARRAY_FIELDS:
        assert getattr(pieces, name).shape == getattr(whole, name).shape, name
    np.testing.assert_array_equal(pieces.expert_ids, whole.expert_ids)
    np.testing.assert_array_equal(pieces.positions, whole.positions)
    np.testing.assert_allclose(pieces.attention_norm, whole.attention_norm, rtol=1e-5)


@pytest.mark.parametrize("name", ["moe_dense_layer", "moe_mixtral", "moe_olmoe", "moe_qwen3"])
def test_step_through_reproduces_the_forward(name):
    """Every layer's walk ends where the model's forward does (dense layers among sparse ones in moe_dense_layer;
    the other families' q/k norms and missing shared expert in the rest)."""
    model = minimoe.load(FIXTURES / name)
    ids = load_reference(FIXTURES / name)["ids"][0]
    trace = model.trace(ids)
    for layer in range(model.config.num_hidden_layers):
        walk = model.step_through(ids, layer, position=7)
        after = minimoe.inspect.stepthrough.residual_before(model, ids, layer + 1)
        np.testing.assert_allclose(walk["residual_out"], after[7], rtol=1e-5, atol=1e-5)
        if model.decoder[layer].is_sparse:
            s = trace.layer_index(layer)
            np.testing.assert_allclose(walk["router_probs"], trace.router_probs[s, 7], atol=1e-6)
            assert walk["expert_ids"].tolist() == trace.expert_ids[s, 7].tolist()
            assert f"expert_{walk['expert_ids'][0]}_output" in walk
            assert ("shared_output" in walk) == model.config.has_shared_expert


def test_step_through_of_a_dense_layer_and_a_layer_out_of_range():
    model = minimoe.load(FIXTURES / "moe_dense_layer")  # layer 1 dense, layers 0 and 2 sparse
    ids = load_reference(FIXTURES / "moe_dense_layer")["ids"][0]
    assert "router_logits" not in model.step_through(ids, 1)
    with pytest.raises(MinimoeError, match="layer 3 is outside"):
        model.step_through(ids, 3)


def test_exports_round_trip(tmp_path):
    model = minimoe.load(minimoe.default_model_path())
    tok = minimoe.load_tokenizer(minimoe.default_model_path())
    trace = model.trace(tok.encode("for i in range(10):"), tokenizer=tok, interventions={"disabled_experts": {0: [1]}})
    trace.save_npz(tmp_path / "t.npz")
    again = RoutingTrace.load_npz(tmp_path / "t.npz")
    np.testing.assert_array_equal(again.expert_ids, trace.expert_ids)
    assert again.tokens == trace.tokens and again.top_k == trace.top_k
    assert again.interventions == trace.interventions == "disabled 1 expert in layer 0"
    rows = trace.rows()
    assert len(rows) == len(trace.layers) * trace.num_tokens * trace.top_k
    assert rows[0]["token"] == trace.tokens[0] and rows[0]["expert"] == int(trace.expert_ids[0, 0, 0])
    trace.save_npz(tmp_path / "small.npz", include_logits=False)
    small = RoutingTrace.load_npz(tmp_path / "small.npz")
    assert small.logits.shape == (trace.num_tokens, 0)
    np.testing.assert_array_equal(small.router_probs, trace.router_probs)
    trace.write_csv(tmp_path / "t.csv")
    assert (tmp_path / "t.csv").read_text().count("\n") == len(rows) + 1
    data = json.loads(json.dumps(trace.to_json(tmp_path / "t.json")))
    assert data["router_logits"][0][0][1] is None  # the disabled expert's -inf
    with pytest.raises(MinimoeError, match="not a minimoe routing trace"):
        RoutingTrace.load_npz(tmp_path / "t.csv")


def test_a_dense_model_has_no_routing_to_trace():
    with pytest.raises(MinimoeError, match="no sparse layers"):
        minimoe.load(FIXTURES / "dense_qwen2").trace([1, 2, 3])


def test_layers_with_different_k_are_padded_and_analysable():
    from minimoe.inspect import analysis

    model, ids = minimoe.load(SOURCE), load_reference(SOURCE)["ids"][0]
    trace = model.trace(ids, interventions={"top_k": {0: 3, 1: 1}})
    assert trace.expert_ids.shape[2] == 3 and trace.top_k == 3
    assert (trace.expert_ids[1, :, 1:] == -1).all() and (trace.expert_weights[1, :, 1:] == 0).all()
    assert (trace.expert_ids[0] >= 0).all()
    load = analysis.expert_load(trace)
    assert load.counts[0].sum() == 3 * len(ids) and load.counts[1].sum() == len(ids)
    assert analysis.coactivation(trace)[1].sum() == np.count_nonzero(load.counts[1])  # only the diagonal in layer 1
    forced = model.trace(ids, interventions={"forced_experts": {1: [4]}})
    assert (forced.expert_ids[1, :, 0] == 4).all() and (forced.expert_ids[1, :, 1:] == -1).all()


def transformers_block_outputs(folder: Path, ids) -> dict:
    """What each of transformers' blocks adds to the residual stream, caught with forward hooks:
    ``("attention", l)`` ``[T, H]`` per layer; per sparse layer ``("routed", l)`` ``[T, H]``,
    ``("shared", l)`` ``[T, H]`` (before its gate) and ``("gate", l)`` ``[T, 1]`` (before the sigmoid)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    seen = {}

    def keep(key):
        def hook(module, inputs, output):
            seen[key] = (output[0][0] if key[0] == "attention" else output).numpy()
        return hook

    for index, layer in enumerate(model.model.layers):
        layer.self_attn.register_forward_hook(keep(("attention", index)))
        if hasattr(layer.mlp, "experts"):
            layer.mlp.experts.register_forward_hook(keep(("routed", index)))
            layer.mlp.shared_expert.register_forward_hook(keep(("shared", index)))
            layer.mlp.shared_expert_gate.register_forward_hook(keep(("gate", index)))
    with torch.no_grad():
        model(torch.from_numpy(ids)[None])
    return seen


def test_trace_shapes_and_norms_match_transformers_with_dense_layers_among_sparse():
    """moe_sparse_step2: layers 0 and 2 dense, 1 and 3 sparse.  attention_norm covers all four
    layers, the routing fields the two sparse ones; the norms are those of what transformers'
    attention, routed experts and gated shared expert add."""
    folder = FIXTURES / "moe_sparse_step2"
    ids = load_reference(folder)["ids"][0]
    model = minimoe.load(folder)
    c, tokens = model.config, len(ids)
    trace = model.trace(ids)
    L, S, E, k = c.num_hidden_layers, 2, c.num_experts, c.num_experts_per_tok
    assert trace.layers.tolist() == [1, 3]
    shapes = {"token_ids": (tokens,), "positions": (tokens,), "layers": (S,), "router_logits": (S, tokens, E),
              "router_probs": (S, tokens, E), "expert_ids": (S, tokens, k), "raw_weights": (S, tokens, k),
              "expert_weights": (S, tokens, k), "shared_gate": (S, tokens), "attention_norm": (L, tokens),
              "shared_norm": (S, tokens), "routed_norm": (S, tokens), "logits": (tokens, c.vocab_size)}
    assert set(shapes) == set(ARRAY_FIELDS)
    for name, shape in shapes.items():
        assert getattr(trace, name).shape == shape, name

    seen = transformers_block_outputs(folder, ids)
    norm = lambda rows: np.linalg.norm(rows, axis=-1)  # noqa: E731
    for layer in range(L):
        np.testing.assert_allclose(trace.attention_norm[layer], norm(seen["attention", layer]), rtol=1e-5)
    for s, layer in enumerate(trace.layers):
        gate = 1 / (1 + np.exp(-seen["gate", layer][:, 0]))
        np.testing.assert_allclose(trace.shared_gate[s], gate, rtol=1e-5)
        np.testing.assert_allclose(trace.shared_norm[s], norm(gate[:, None] * seen["shared", layer]), rtol=1e-5)
        np.testing.assert_allclose(trace.routed_norm[s], norm(seen["routed", layer]), rtol=1e-5)


def test_rows_give_each_experts_weight_and_router_probability():
    """On moe_norm_topk the weights are renormalised, so weight and probability differ."""
    folder = FIXTURES / "moe_norm_topk"
    trace = minimoe.load(folder).trace(load_reference(folder)["ids"][0])
    rows = trace.rows()
    weight_sums = {}
    for row in rows:
        s, t = trace.layer_index(row["layer"]), row["position"]
        assert row["probability"] == pytest.approx(float(trace.router_probs[s, t, row["expert"]]), rel=1e-6)
        weight_sums[row["layer"], t] = weight_sums.get((row["layer"], t), 0.0) + row["weight"]
    assert all(total == pytest.approx(1.0, rel=1e-5) for total in weight_sums.values())
    assert all(row["weight"] > row["probability"] for row in rows)


def test_write_json_writes_what_to_json_returns_block_by_block(tmp_path, monkeypatch):
    """The streamed JSON file is the dict to_json builds: -inf as null, blocks of rows joined, logits when asked."""
    from minimoe.inspect import trace as trace_module

    model = minimoe.load(minimoe.default_model_path())
    tok = minimoe.load_tokenizer(minimoe.default_model_path())
    trace = model.trace(tok.encode("for i in range(10):\n    print(i)\n"), tokenizer=tok,
                        interventions={"disabled_experts": {0: [1]}})
    monkeypatch.setattr(trace_module, "JSON_ROWS_PER_WRITE", 3)  # several blocks per [T, E] array
    for include_logits in (False, True):
        trace.write_json(tmp_path / "t.json", include_logits=include_logits)
        written = json.loads((tmp_path / "t.json").read_text(encoding="utf-8"))
        assert written == json.loads(json.dumps(trace.to_json(include_logits=include_logits)))
        assert written["router_logits"][0][0][1] is None and ("logits" in written) == include_logits
