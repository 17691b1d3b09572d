"""The comparisons shared by the recorded-fixture and live parity tests.

Each function takes a minimoe model and what transformers computed on the same
checkpoint, and asserts that minimoe reproduces it.
"""

from __future__ import annotations

import numpy as np

# Both sides compute in float32 from the same stored values (bf16/f16 weights are upcast
# exactly on both sides: the references are transformers run in float32 over the stored
# weights), so all that separates them is float32 rounding in a different summation order
# (NumPy's BLAS against torch's kernels).  Measured: at most 5.5e-7 of the largest logit over
# every fixture, batched, row by row and through the cache (4.6 float32 epsilons); 6e-7 on the
# bundled model (9e-7 at 1,000 tokens).  2e-6 (~17 epsilons) leaves room for other CPUs' BLAS
# kernels; a bf16-sized tolerance (~1e-2) would only hide bugs, as no reference computes in bf16.
LOGIT_TOLERANCE = 2e-6  # relative to the largest reference logit
ROUTER_PROB_TOLERANCE = 2e-6  # absolute, on probabilities; measured worst 7.8e-7
AUX_LOSS_TOLERANCE = 1e-6  # relative; measured worst 1.2e-7


def relative_error(ours: np.ndarray, theirs: np.ndarray) -> float:
    """Largest absolute difference, relative to the largest reference logit."""
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def router_logits_of(reference: dict[str, np.ndarray]) -> list[np.ndarray]:
    keys = sorted((k for k in reference if k.startswith("router_logits.")), key=lambda k: int(k.split(".")[1]))
    return [reference[k] for k in keys]


def check_logits(model, reference) -> None:
    ids, expected = reference["ids"], reference["logits"]
    batched = model.forward(ids)
    assert batched.shape == expected.shape
    assert relative_error(batched, expected) < LOGIT_TOLERANCE
    for row in range(ids.shape[0]):
        single = model.forward(ids[row])
        assert single.shape == expected[row].shape
        assert relative_error(single, expected[row]) < LOGIT_TOLERANCE


def check_cached_decoding(model, reference) -> None:
    """Token-by-token decoding through the cache: same logits as one full forward, and
    the same greedy continuation as transformers' (decoded through its own cache)."""
    prompt, greedy = reference["ids"][0], reference["greedy"]
    cache = model.new_cache(capacity=4)  # small, so that decoding has to grow it
    step_logits = [model.forward(prompt[:5], cache=cache)]
    for token in prompt[5:]:
        step_logits.append(model.forward([token], cache=cache))
    assert cache.length == len(prompt)
    assert relative_error(np.concatenate(step_logits), reference["logits"][0]) < LOGIT_TOLERANCE

    generated, logits = [], step_logits[-1]
    for _ in range(len(greedy)):
        token = int(logits[-1].argmax())
        generated.append(token)
        logits = model.forward([token], cache=cache)
    assert generated == greedy.tolist()


def check_routing(model, reference) -> None:
    """The trace's router logits per sparse layer equal transformers', and so do the chosen experts and aux loss."""
    expected = router_logits_of(reference)
    k = model.config.num_experts_per_tok
    for row, ids in enumerate(reference["ids"]):
        trace = model.trace(ids)
        assert len(trace.layers) == len(expected) == len(model.config.sparse_layers)
        tokens = slice(row * len(ids), (row + 1) * len(ids))  # transformers flattens the batch
        for s, theirs in enumerate(expected):
            theirs = theirs[tokens]
            assert relative_error(trace.router_logits[s], theirs) < LOGIT_TOLERANCE
            their_probs = np.exp(theirs - theirs.max(-1, keepdims=True))
            their_probs /= their_probs.sum(-1, keepdims=True)
            assert np.abs(trace.router_probs[s] - their_probs).max() < ROUTER_PROB_TOLERANCE
            their_experts = np.argsort(-theirs, axis=-1, kind="stable")[:, :k]
            assert (np.sort(trace.expert_ids[s], axis=-1) == np.sort(their_experts, axis=-1)).all()
    aux = model.aux_loss(reference["ids"])
    assert abs(aux - reference["aux_loss"].item()) < AUX_LOSS_TOLERANCE * abs(reference["aux_loss"].item())
