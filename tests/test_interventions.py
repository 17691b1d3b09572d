"""Routing interventions that would leave a layer without enough experts are refused; valid ones never give NaN."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import minimoe
from minimoe import MinimoeError

IDS = [1, 50, 300, 7, 99, 1000, 12, 3]
EXPERTS = minimoe.ModelConfig.from_file(minimoe.default_model_path() / "config.json").num_experts  # 60


@pytest.fixture(scope="module")
def model():
    return minimoe.load(minimoe.default_model_path())  # 4 sparse layers, 60 experts, top-4


def test_disabling_every_expert_of_a_layer_says_none_remain(model):
    experts = model.config.num_experts
    with pytest.raises(MinimoeError, match=f"layer 2 disables all {experts} experts, 0 remain"):
        model.forward(IDS, interventions={"disabled_experts": {2: range(experts)}})


def test_leaving_fewer_than_k_says_how_many_remain(model):
    experts = model.config.num_experts
    with pytest.raises(MinimoeError, match=rf"layer 1 leaves 2 of {experts} experts, fewer than the 4 each token "
                                           r"uses: disable fewer, or pass top_k=\{1: 2\} too"):
        model.trace(IDS, interventions={"disabled_experts": {1: range(experts - 2)}})


def test_fewer_experts_with_a_matching_top_k_run(model):
    experts = model.config.num_experts
    trace = model.trace(IDS, interventions={"disabled_experts": {1: range(experts - 2)}, "top_k": {1: 2}})
    chosen = trace.expert_ids[trace.layer_index(1)]
    assert (np.sort(chosen[:, :2], axis=-1) == [experts - 2, experts - 1]).all() and (chosen[:, 2:] == -1).all()
    np.testing.assert_allclose(trace.router_probs[1, :, 14:].sum(-1), 1.0, rtol=1e-6)


def test_forced_experts_need_no_others(model):
    trace = model.trace(IDS, interventions={"disabled_experts": {0: range(2, EXPERTS)}, "forced_experts": {0: [0, 1]}})
    assert np.isfinite(trace.logits).all() and set(np.unique(trace.expert_ids[0])) == {0, 1, -1}  # -1: padding to k


layer_sets = st.dictionaries(st.sampled_from([0, 1, 2, 3]), st.sets(st.integers(0, EXPERTS - 1), max_size=EXPERTS),
                             max_size=4)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(disabled=layer_sets, top_k=st.one_of(st.none(), st.integers(1, EXPERTS)),
       shared=st.one_of(st.booleans(), st.sets(st.sampled_from([0, 1, 2, 3]))))
def test_interventions_are_refused_or_finite(model, disabled, top_k, shared):
    k = top_k or 4
    if any(EXPERTS - len(off) < k for off in disabled.values()):  # some layer left with fewer than k experts
        with pytest.raises(MinimoeError, match="remain|top_k"):
            model.trace(IDS, interventions=dict(disabled_experts=disabled, top_k=top_k, shared_expert=shared))
        return
    trace = model.trace(IDS, interventions=dict(disabled_experts=disabled, top_k=top_k, shared_expert=shared))
    assert np.isfinite(trace.logits).all()
    for name in ("router_probs", "raw_weights", "expert_weights", "shared_gate", "shared_norm", "routed_norm",
                 "attention_norm"):
        assert np.isfinite(getattr(trace, name)).all(), name
    assert not np.isnan(trace.router_logits).any()  # -inf marks a disabled expert, never NaN
    for layer, off in disabled.items():
        chosen = trace.expert_ids[trace.layer_index(layer)]
        assert not np.isin(chosen, list(off)).any()  # a disabled expert is never chosen, not even with weight 0


# --- how interventions are passed ----------------------------------------------------------------------

def test_the_keyword_spelling_of_trace_is_the_same_run(model):
    """DESIGN's ``model.trace(ids, disabled_experts=...)`` means ``interventions={"disabled_experts": ...}``."""
    spelled = model.trace(IDS, disabled_experts={1: [0, 5]}, top_k=2)
    mapped = model.trace(IDS, interventions={"disabled_experts": {1: [0, 5]}, "top_k": 2})
    built = model.trace(IDS, interventions=minimoe.Interventions.build(model.config, {1: [0, 5]}, top_k=2))
    for other in (mapped, built):
        np.testing.assert_array_equal(spelled.expert_ids, other.expert_ids)
        np.testing.assert_array_equal(spelled.logits, other.logits)
    assert spelled.top_k == 2 and not np.isin(spelled.expert_ids[1], [0, 5]).any()


@pytest.mark.parametrize("call, message", [
    (lambda m: m.forward(IDS, interventions={"disable_experts": {1: [0]}}),
     "unknown intervention 'disable_experts': the interventions are disabled_experts, forced_experts, top_k, "
     "shared_expert"),
    (lambda m: m.trace(IDS, dissabled_experts={1: [0]}), "unknown intervention 'dissabled_experts'"),
    (lambda m: m.forward(IDS, interventions=[("top_k", 1)]), "interventions must be a mapping"),
    (lambda m: m.trace(IDS, interventions={"top_k": 1}, top_k=2), "either as interventions= or as keywords"),
])
def test_a_badly_passed_intervention_says_what_is_wrong(model, call, message):
    with pytest.raises(MinimoeError, match=message):
        call(model)
