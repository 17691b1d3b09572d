"""The backward pass: each layer's backward against finite differences (float64, small shapes), then
``minimoe.train.loss_and_grads`` -- the loss and every gradient -- against transformers' float32 autograd
on every fixture family, and on the cupy backend's no-kernel level through the emulation."""

from __future__ import annotations

import numpy as np
import pytest

from minimoe import layers

xp = np


def numeric_gradient(loss, array: np.ndarray, step: float = 1e-6) -> np.ndarray:
    """d loss() / d array by central differences, one element at a time (``array`` is changed in place and
    restored)."""
    grad = np.zeros_like(array)
    for index in np.ndindex(array.shape):
        kept = array[index]
        array[index] = kept + step
        above = loss()
        array[index] = kept - step
        below = loss()
        array[index] = kept
        grad[index] = (above - below) / (2 * step)
    return grad


def assert_gradient(analytic, loss, array, tolerance: float = 1e-7) -> None:
    """The analytic gradient equals the finite-difference one, relative to its largest element."""
    numeric = numeric_gradient(loss, array)
    assert analytic.shape == array.shape
    scale = np.abs(numeric).max()
    assert scale > 0
    assert np.abs(analytic - numeric).max() <= tolerance * scale


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def weighted_sum(rng, shape):
    """A random cotangent c and the loss ``sum(c * y)``, whose gradient with respect to y is c."""
    c = rng.standard_normal(shape)
    return c, lambda y: float(np.sum(c * y))


def test_linear_backward(rng):
    x, w, b = rng.standard_normal((2, 3, 4)), rng.standard_normal((5, 4)), rng.standard_normal(5)
    c, loss = weighted_sum(rng, (2, 3, 5))
    dx, dw, db = layers.linear_backward(xp, c, x, w)
    forward = lambda: loss(x @ w.T + b)  # noqa: E731
    for analytic, array in ((dx, x), (dw, w), (db, b)):
        assert_gradient(analytic, forward, array)


def test_embedding_backward_adds_up_repeated_tokens(rng):
    table, ids = rng.standard_normal((6, 3)), np.array([[1, 4, 1], [0, 1, 5]])
    c, loss = weighted_sum(rng, (2, 3, 3))
    assert_gradient(layers.embedding_backward(xp, c, ids, 6), lambda: loss(table[ids]), table)


@pytest.mark.parametrize("shape", [(2, 3, 5), (7, 4)])
def test_rms_norm_backward(rng, shape):
    x, w = rng.standard_normal(shape), 1 + 0.2 * rng.standard_normal(shape[-1])
    c, loss = weighted_sum(rng, shape)
    dx, dw = layers.rms_norm_backward(xp, c, x, w, eps=1e-2)
    forward = lambda: loss(layers.rms_norm(xp, x, w, 1e-2))  # noqa: E731
    assert_gradient(dx, forward, x)
    assert_gradient(dw, forward, w)


def test_softmax_backward(rng):
    x = rng.standard_normal((3, 6))
    c, loss = weighted_sum(rng, (3, 6))
    assert_gradient(layers.softmax_backward(xp, c, layers.softmax(xp, x)), lambda: loss(layers.softmax(xp, x)), x)


def test_rope_backward(rng):
    cos, sin = (t.astype(np.float64) for t in layers.rope_tables(xp, np.arange(3, 7), 6, 100.0))
    x = rng.standard_normal((2, 3, 4, 6))
    c, loss = weighted_sum(rng, x.shape)
    assert_gradient(layers.apply_rope_backward(xp, c, cos, sin), lambda: loss(layers.apply_rope(xp, x, cos, sin)), x)


@pytest.mark.parametrize("heads, kv_heads, tokens, start", [(4, 2, 3, 2), (2, 2, 4, 0), (6, 1, 1, 4)])
def test_causal_attention_backward(rng, heads, kv_heads, tokens, start):
    """Grouped-query (4 heads over 2), multi-head, and one query over a cache of 4, all causal."""
    q = rng.standard_normal((2, heads, tokens, 6))
    k, v = rng.standard_normal((2, 2, kv_heads, start + tokens, 6))
    c, loss = weighted_sum(rng, (2, tokens, heads * 6))
    dq, dk, dv = layers.causal_attention_backward(xp, c, q, k, v, start)
    forward = lambda: loss(layers.causal_attention(xp, q, k, v, start))  # noqa: E731
    for analytic, array in ((dq, q), (dk, k), (dv, v)):
        assert_gradient(analytic, forward, array)


def test_swiglu_backward(rng):
    x = rng.standard_normal((2, 3, 5))
    gate, up, down = rng.standard_normal((6, 5)), rng.standard_normal((6, 5)), rng.standard_normal((5, 6))
    c, loss = weighted_sum(rng, x.shape)
    dx, (d_gate, d_up, d_down) = layers.swiglu_backward(xp, c, x, x @ gate.T, x @ up.T, gate, up, down)
    forward = lambda: loss(layers.swiglu(xp, x, lambda a: a @ gate.T, lambda a: a @ up.T, lambda a: a @ down.T))  # noqa: E731
    for analytic, array in ((dx, x), (d_gate, gate), (d_up, up), (d_down, down)):
        assert_gradient(analytic, forward, array)


def decisive_logits(rng, tokens: int, experts: int) -> np.ndarray:
    """Router logits whose top-k never changes under a finite-difference step (gaps of at least 0.1)."""
    return np.stack([rng.permutation(experts) * 0.4 + 0.05 * rng.standard_normal(experts) for _ in range(tokens)])


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_route_backward_flows_through_the_chosen_probabilities(rng, norm_topk_prob):
    logits = decisive_logits(rng, 5, 6)
    c, loss = weighted_sum(rng, (5, 3))
    extra = rng.standard_normal(6)  # a gradient reaching every probability directly, as the balance loss's does

    def forward():
        choice = layers.route(xp, logits, 3, norm_topk_prob)
        return loss(choice.expert_weights) + float(np.sum(choice.probs * extra))

    choice = layers.route(xp, logits, 3, norm_topk_prob)
    assert_gradient(layers.route_backward(xp, c, choice, norm_topk_prob, extra), forward, logits)


def test_route_backward_with_top_1_renormalised_gives_the_router_nothing(rng):
    """k = 1 with renormalisation: the weight is always 1, so the output gives the router no gradient."""
    logits = decisive_logits(rng, 4, 5)
    choice = layers.route(xp, logits, 1, norm_topk_prob=True)
    assert np.all(choice.expert_weights == 1.0)
    assert np.abs(layers.route_backward(xp, rng.standard_normal((4, 1)), choice, True)).max() < 1e-15


def swiglu_weights(rng, hidden: int, inner: int):
    return rng.standard_normal((inner, hidden)), rng.standard_normal((inner, hidden)), rng.standard_normal((hidden, inner))


def test_routed_experts_backward(rng):
    """Gradients reach h, the expert weights, and each chosen expert's matrices; an expert no token chose
    gets none."""
    hidden, inner, experts, tokens = 4, 3, 5, 6
    h = rng.standard_normal((tokens, hidden))
    weights = [swiglu_weights(rng, hidden, inner) for _ in range(experts)]
    ids = np.array([[0, 2], [2, 1], [1, 0], [0, 3], [2, 0], [3, 1]])  # expert 4 unused
    expert_weights = rng.random((tokens, 2))
    c, loss = weighted_sum(rng, (tokens, hidden))

    def expert(e):
        gate, up, down = weights[e]
        return lambda x: layers.swiglu(xp, x, lambda a: a @ gate.T, lambda a: a @ up.T, lambda a: a @ down.T)

    forward = lambda: loss(layers.routed_experts(xp, h, ids, expert_weights, [expert(e) for e in range(experts)]))  # noqa: E731
    rows = {e: np.nonzero((ids == e).any(axis=1))[0] for e in range(experts)}  # each expert's tokens, in order
    outputs = {e: expert(e)(h[rows[e]]) for e in range(experts)}
    weight_grads = {}

    def expert_backward(e, d_out):
        gate, up, _ = weights[e]
        x = h[rows[e]]
        dx, weight_grads[e] = layers.swiglu_backward(xp, d_out, x, x @ gate.T, x @ up.T, *weights[e])
        return dx

    dh, d_weights = layers.routed_experts_backward(xp, c, ids, expert_weights, outputs, expert_backward)
    assert_gradient(dh, forward, h)
    assert_gradient(d_weights, forward, expert_weights)
    assert sorted(weight_grads) == [0, 1, 2, 3]
    for e in range(4):
        for analytic, array in zip(weight_grads[e], weights[e]):
            assert_gradient(analytic, forward, array)


def test_shared_expert_backward(rng):
    h, gate_w = rng.standard_normal((5, 4)), rng.standard_normal((1, 4))
    mixing = rng.standard_normal((4, 4))  # the expert, any function of h: here linear
    c, loss = weighted_sum(rng, (5, 4))
    forward = lambda: loss(layers.shared_expert(xp, h, lambda a: a @ mixing, lambda a: a @ gate_w.T)[0])  # noqa: E731
    out, gate_value = layers.shared_expert(xp, h, lambda a: a @ mixing, lambda a: a @ gate_w.T)
    d_expert, d_logit = layers.shared_expert_backward(xp, c, h @ mixing, gate_value)
    dh_gate, d_gate_w, _ = layers.linear_backward(xp, d_logit, h, gate_w)
    assert_gradient(d_expert @ mixing.T + dh_gate, forward, h)
    assert_gradient(d_gate_w, forward, gate_w)


def test_load_balancing_loss_backward(rng):
    """Through each layer's softmax to its router logits, the slot counts over all layers held fixed."""
    logits = [decisive_logits(rng, 5, 6), decisive_logits(rng, 5, 6)]
    forward = lambda: layers.load_balancing_loss(xp, logits, 6, 2)  # noqa: E731
    choices = [layers.route(xp, lg, 2, False) for lg in logits]
    d_probs = layers.load_balancing_loss_backward(xp, [c.expert_ids for c in choices], 6)
    for choice, array in zip(choices, logits):
        analytic = layers.softmax_backward(xp, np.broadcast_to(d_probs, choice.probs.shape), choice.probs)
        assert_gradient(analytic, forward, array, tolerance=1e-6)  # d_probs is float32


def test_cross_entropy_backward_ignores_minus_100(rng):
    logits, targets = rng.standard_normal((5, 7)), np.array([3, -100, 0, 6, -100])
    kept = targets != -100
    expected = -np.mean(np.log(layers.softmax(xp, logits[kept]))[np.arange(3), targets[kept]])
    assert layers.cross_entropy(xp, logits, targets) == pytest.approx(expected, rel=1e-12)
    grad = layers.cross_entropy_backward(xp, logits, targets)
    assert_gradient(grad, lambda: layers.cross_entropy(xp, logits, targets), logits)
    assert np.all(grad[~kept] == 0)


# --- the whole model against transformers' autograd -------------------------------------------------------

torch = pytest.importorskip("torch", reason="gradient parity needs torch (pip install -e '.[test]')")
pytest.importorskip("transformers", reason="gradient parity needs transformers (pip install -e '.[test]')")

import minimoe  # noqa: E402
from minimoe import train  # noqa: E402
from minimoe.checkpoint import names  # noqa: E402

from conftest import FIXTURE_NAMES, FIXTURES, load_reference  # noqa: E402


def transformers_loss_and_grads(folder, ids, labels=None, aux_loss_coef=None) -> tuple[float, dict]:
    """transformers' own loss (``labels=``, ``output_router_logits=True``) and torch's autograd gradients on
    the checkpoint in ``folder``, in float32, under the checkpoint's tensor names: the fused expert
    tensors of transformers 5 (``experts.gate_up_proj [E, 2I, H]``, gate rows first, and
    ``experts.down_proj [E, H, I]``) are cut back into each expert's gate, up and down."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    config = minimoe.ModelConfig.from_file(folder)
    if aux_loss_coef is not None:
        model.router_aux_loss_coef = aux_loss_coef
    ids = torch.from_numpy(ids)
    labels = ids if labels is None else torch.from_numpy(labels)
    moe = config.num_experts > 0
    loss = model(ids, labels=labels, **({"output_router_logits": True} if moe else {})).loss
    loss.backward()
    grads = {}
    for name, param in model.named_parameters():
        grad = param.grad.numpy() if param.grad is not None else np.zeros(param.shape, dtype=np.float32)
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        if name.endswith("mlp.experts.gate_up_proj"):
            inner = grad.shape[1] // 2
            for expert in range(grad.shape[0]):
                expert_names = names.expert_names(layer, expert, config.model_type)
                grads[expert_names["gate"]], grads[expert_names["up"]] = grad[expert, :inner], grad[expert, inner:]
        elif name.endswith("mlp.experts.down_proj"):
            for expert in range(grad.shape[0]):
                grads[names.expert_names(layer, expert, config.model_type)["down"]] = grad[expert]
        elif moe and name.endswith("mlp.gate.weight") and config.is_sparse_layer(layer):
            grads[names.router_name(layer, config.model_type)] = grad  # Mixtral's block_sparse_moe in the checkpoint
        else:
            grads[name] = grad
    return loss.item(), grads


# Both sides compute in float32 from the same stored weights; what separates them is float32 rounding in
# another order of summation, compounded through the layers of the backward.  Measured worst case over every
# fixture: see GRADIENT_TOLERANCE's use below and docs; a wrong term (a missing renormalisation, a
# transposed weight) shows up at 1e-2 and above.
LOSS_TOLERANCE = 1e-6  # relative
GRADIENT_TOLERANCE = 1e-5  # of each tensor's largest gradient


def gradient_errors(ours: dict, theirs: dict) -> dict[str, float]:
    """Per tensor, the largest |ours - theirs| over the largest |theirs| (0 where both are all zeros)."""
    assert set(ours) == set(theirs)
    errors = {}
    for name, expected in theirs.items():
        got = ours[name]
        assert got.shape == expected.shape and got.dtype == np.float32, name
        scale = np.abs(expected).max()
        errors[name] = float(np.abs(got - expected).max() / scale) if scale > 0 else float(np.abs(got).max() > 0)
    return errors


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_loss_and_every_gradient_equal_transformers(name):
    folder = FIXTURES / name
    ids = load_reference(folder)["ids"]  # prompts whose top-k is decisive (scripts/make_fixtures.py)
    model = minimoe.load(folder)
    loss, grads = train.loss_and_grads(model, ids)
    their_loss, their_grads = transformers_loss_and_grads(folder, ids)
    assert set(grads) == set(names.expected_shapes(model.config))
    assert loss == pytest.approx(their_loss, rel=LOSS_TOLERANCE)
    errors = gradient_errors(grads, their_grads)
    worst = max(errors, key=errors.get)
    assert errors[worst] < GRADIENT_TOLERANCE, (worst, errors[worst])


def test_ignored_labels_and_a_strong_balance_loss_equal_transformers():
    """Explicit labels with -100 (ignored) and the balance loss weighted 1.0 instead of the config's 0.001,
    so that its gradient through every router is as large as the language model's."""
    folder = FIXTURES / "moe_norm_topk"
    ids = load_reference(folder)["ids"]
    labels = ids.copy()
    labels[0, 3:7] = -100
    labels[1, -1] = -100
    model = minimoe.load(folder)
    loss, grads = train.loss_and_grads(model, ids, labels, aux_loss_coef=1.0)
    their_loss, their_grads = transformers_loss_and_grads(folder, ids, labels, aux_loss_coef=1.0)
    assert loss == pytest.approx(their_loss, rel=LOSS_TOLERANCE)
    errors = gradient_errors(grads, their_grads)
    assert max(errors.values()) < GRADIENT_TOLERANCE
    without = train.loss_and_grads(model, ids, labels, aux_loss_coef=0.0)
    router = names.router_name(0)
    assert np.abs(without[1][router] - grads[router]).max() > 0.1 * np.abs(grads[router]).max()  # it matters
