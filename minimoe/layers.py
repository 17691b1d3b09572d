"""The layers of Qwen2-MoE, each a small function over an array module ``xp``.

Shapes use: ``B`` batch, ``T`` new tokens, ``S`` all positions attended to
(cache + new), ``H`` hidden size, ``nh`` query heads, ``nkv`` key/value heads,
``D`` head dim, ``E`` experts, ``k`` experts per token, ``N`` flattened tokens.

Weights arrive as callables (:class:`minimoe.backend.Linear`: ``W(x) = x @ W.T + b``)
so that the same function runs on NumPy or on the GPU.  Everything computes
in float32, which is also where transformers keeps its softmaxes and norms.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

Projection = Callable  # x [..., in] -> [..., out], e.g. minimoe.backend.Linear
Expert = Callable  # x [n, H] -> [n, H], a SwiGLU MLP (e.g. minimoe.model.SwiGLU)
Array = object  # a NumPy or CuPy array; shapes are given in each docstring


# --- normalisation and activations -------------------------------------------------

def rms_norm(xp, x, weight, eps: float):
    """Root-mean-square norm: ``x / sqrt(mean(x^2) + eps) * w``.  x ``[..., H]`` -> ``[..., H]``."""
    variance = xp.mean(xp.square(x), axis=-1, keepdims=True)
    return x / xp.sqrt(variance + eps) * weight


def layer_norm(xp, x, weight, eps: float):
    """LayerNorm without a bias (DBRX): ``(x - mean(x)) / sqrt(var(x) + eps) * w``.  x ``[..., H]`` -> ``[..., H]``.

    The same as :func:`rms_norm` of ``x`` minus its mean: the variance is the mean square of the
    centred values.
    """
    return rms_norm(xp, x - xp.mean(x, axis=-1, keepdims=True), weight, eps)


def silu(xp, x):
    """``x * sigmoid(x)``, elementwise."""
    return x / (1.0 + xp.exp(-x))


def gelu_tanh(xp, x):
    """GELU in its tanh approximation (Gemma's GeGLU): ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``."""
    return 0.5 * x * (1.0 + xp.tanh(xp.float32((2.0 / 3.141592653589793) ** 0.5) * (x + xp.float32(0.044715) * x ** 3)))


# A gated MLP's activation by the name a Family gives it: SwiGLU's silu, Gemma's GeGLU.
ACTIVATIONS = {"silu": silu, "gelu_tanh": gelu_tanh}


def sigmoid(xp, x):
    return 1.0 / (1.0 + xp.exp(-x))


def softmax(xp, x, axis: int = -1):
    """Numerically stable softmax along ``axis`` (max subtracted first)."""
    shifted = x - xp.max(x, axis=axis, keepdims=True)
    exp = xp.exp(shifted)
    return exp / xp.sum(exp, axis=axis, keepdims=True)


# --- rotary position embedding ---------------------------------------------------

def rope_tables(xp, positions, head_dim: int, theta: float):
    """cos and sin tables for the given absolute positions.  positions ``[T]`` -> (``[T, D]``, ``[T, D]``).

    ``inv_freq = theta^(-arange(0, D, 2) / D)``; each frequency appears twice, once
    for the first half of the head and once for the second (the rotate-half layout).
    Computed in float32 exactly as transformers does, so that long positions round
    the same way.
    """
    exponents = xp.arange(0, head_dim, 2, dtype=xp.float32) / xp.float32(head_dim)
    inv_freq = (1.0 / (xp.float32(theta) ** exponents)).astype(xp.float32)  # [D/2]
    angles = positions.astype(xp.float32)[:, None] * inv_freq[None, :]  # [T, D/2]
    angles = xp.concatenate([angles, angles], axis=-1)  # [T, D]
    return xp.cos(angles), xp.sin(angles)


def rotate_half(xp, x):
    """``[x1, x2] -> [-x2, x1]`` on the last axis, halves split down the middle (not interleaved)."""
    half = x.shape[-1] // 2
    return xp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(xp, x, cos, sin):
    """Rotate each head's vector by its position's angles.  x ``[B, heads, T, D]``, cos/sin ``[T, D]``."""
    return x * cos + rotate_half(xp, x) * sin


# --- attention ---------------------------------------------------------------------

def split_heads(x, num_heads: int, head_dim: int):
    """``[B, T, heads * D]`` -> ``[B, heads, T, D]``."""
    batch, tokens, _ = x.shape
    return x.reshape(batch, tokens, num_heads, head_dim).transpose(0, 2, 1, 3)


def causal_attention(xp, q, k, v, query_start: int, window: int | None = None):
    """Grouped-query causal attention, over a sliding window of ``window`` positions if given.

    q ``[B, nh, T, D]`` for positions ``query_start .. query_start + T - 1``;
    k, v ``[B, nkv, S, D]`` for positions ``0 .. S - 1``.  Returns ``[B, T, nh * D]``.

    Query head ``h`` reads key/value head ``h // (nh / nkv)``: we view the query heads
    as ``[nkv, groups]`` instead of repeating k and v, which is the same arithmetic
    without the copies.  Scores are scaled by ``1/sqrt(D)``; a query at position ``p``
    sees keys ``0..p``; with a ``window`` (Mistral's ``sliding_window``), only the last ``window`` of
    them, ``p - window + 1 .. p``.
    """
    batch, num_heads, tokens, head_dim = q.shape
    num_kv, keys = k.shape[1], k.shape[2]
    groups = num_heads // num_kv
    q = q.reshape(batch, num_kv, groups, tokens, head_dim)
    scores = q @ k[:, :, None].swapaxes(-1, -2) / xp.float32(head_dim) ** 0.5  # [B, nkv, g, T, S]
    query_pos = xp.arange(query_start, query_start + tokens)[:, None]
    key_pos = xp.arange(keys)[None, :]
    visible = key_pos <= query_pos
    if window is not None:
        visible = visible & (key_pos > query_pos - window)
    scores = xp.where(visible, scores, xp.float32(-xp.inf))
    weights = softmax(xp, scores, axis=-1)
    out = weights @ v[:, :, None]  # [B, nkv, g, T, D]
    out = out.reshape(batch, num_heads, tokens, head_dim)
    return out.transpose(0, 2, 1, 3).reshape(batch, tokens, num_heads * head_dim)


# --- feed-forward ------------------------------------------------------------------

def swiglu(xp, x, gate: Projection, up: Projection, down: Projection, activation: Callable = silu):
    """The SwiGLU MLP: ``down(silu(gate(x)) * up(x))``.  x ``[..., H]`` -> ``[..., H]`` (inner width ``I``).

    ``activation`` replaces silu in another gated MLP: :func:`gelu_tanh` makes Gemma's GeGLU.
    """
    return down(activation(xp, gate(x)) * up(x))  # [..., I] -> [..., H]


class RouterChoice(NamedTuple):
    """What the router decided for N tokens."""

    logits: "Array"  # [N, E] as used: a disabled expert's logit is -inf
    probs: "Array"  # [N, E] softmax over all (enabled) experts
    expert_ids: "Array"  # [N, k] chosen experts, highest probability first
    raw_weights: "Array"  # [N, k] their probabilities
    expert_weights: "Array"  # [N, k] what their outputs are scaled by (renormalised if norm_topk_prob)

    def trace_fields(self) -> dict:
        """The arrays under the names a :class:`minimoe.inspect.trace.RoutingTrace` gives them."""
        return dict(router_logits=self.logits, router_probs=self.probs, expert_ids=self.expert_ids,
                    raw_weights=self.raw_weights, expert_weights=self.expert_weights)


def route(xp, router_logits, top_k: int, norm_topk_prob: bool, disabled: Sequence[int] = (),
          forced: Sequence[int] | None = None, norm_p: float = 1.0) -> RouterChoice:
    """The router's choice per token.  router_logits ``[N, E]`` -> :class:`RouterChoice`.

    Softmax over *all* experts, then the k largest probabilities, highest first.
    Without ``norm_topk_prob`` (Qwen1.5-MoE's setting) the k weights are those raw
    probabilities and sum to less than 1; with it they are renormalised to sum to 1 (divided by
    their ``norm_p``-norm, which for p = 1 is their sum; DBRX names its p in
    ``moe_normalize_expert_weights``).

    Interventions: ``disabled`` experts are removed from the router (their logits
    set to -inf before the softmax, as if the router had no row for them);
    ``forced`` experts are used by every token instead of its top-k, each weighted by
    its router probability.
    """
    logits = router_logits.astype(xp.float32)
    if len(disabled):
        logits = logits.copy()
        logits[:, list(disabled)] = -xp.inf
    probs = softmax(xp, logits, axis=-1)
    if forced is None:
        # The k largest probabilities, highest first; among equal probabilities the lower
        # expert id first (a stable sort), the rule the GPU kernel follows too.
        expert_ids = xp.argsort(-probs, axis=-1, kind="stable")[:, :top_k]  # [N, k]
    else:
        expert_ids = xp.broadcast_to(xp.asarray(forced), (probs.shape[0], len(forced)))
        order = xp.argsort(-xp.take_along_axis(probs, expert_ids, -1), axis=-1, kind="stable")
        expert_ids = xp.take_along_axis(expert_ids, order, -1)
    raw_weights = xp.take_along_axis(probs, expert_ids, axis=-1)
    weights = raw_weights / topk_norm(xp, raw_weights, norm_p) if norm_topk_prob else raw_weights
    return RouterChoice(logits, probs, expert_ids, raw_weights, weights)


def topk_norm(xp, weights, p: float):
    """The p-norm of each token's k weights ``[N, k]`` -> ``[N, 1]``: their sum for p = 1 (they are positive)."""
    if p == 1:
        return xp.sum(weights, axis=-1, keepdims=True)
    return xp.sum(weights ** p, axis=-1, keepdims=True) ** (1.0 / p)


def routed_experts(xp, h, expert_ids, expert_weights, experts: Sequence[Expert], map_each: Callable = map):
    """Weighted sum of the chosen experts' outputs, each expert run only on its own tokens.

    h ``[N, H]``, expert_ids / expert_weights ``[N, k]``, ``experts[e]`` a callable
    ``[n, H] -> [n, H]`` (a SwiGLU MLP) -> ``[N, H]``: token ``i`` gets
    ``sum_j expert_weights[i, j] * experts[expert_ids[i, j]](h[i])``.

    The N*k (token, expert) assignments are sorted by expert, so that each chosen
    expert runs once, on the batch of tokens routed to it; experts no token chose are
    never touched (nothing here grows with the number of experts).  The chosen experts
    are independent of each other: ``map_each`` runs them (the built-in ``map``, one after
    another; the NumPy model passes :func:`minimoe.backend.parallel_map`, one expert a thread).
    """
    top_k = expert_ids.shape[1]
    flat_ids = expert_ids.reshape(-1)  # [N*k]
    flat_weights = expert_weights.reshape(-1)  # [N*k]
    slots = xp.argsort(flat_ids, kind="stable")  # assignment slots, grouped by expert
    chosen, starts = xp.unique(flat_ids[slots], return_index=True)  # each chosen expert, where its slots begin
    bounds = starts.tolist() + [flat_ids.shape[0]]
    # each chosen expert with its assignments; their tokens are the slots // top_k
    groups = [(expert, slots[begin:end]) for expert, begin, end in zip(chosen.tolist(), bounds[:-1], bounds[1:])]

    def run(group):  # one expert on the tokens routed to it: [n_e, H] -> [n_e, H]
        expert, mine = group
        return experts[expert](h[mine // top_k])

    out = xp.zeros_like(h)
    for (_, mine), output in zip(groups, map_each(run, groups)):
        # a token picks an expert at most once, so its rows do not repeat and += is safe
        out[mine // top_k] += output * flat_weights[mine][:, None]
    return out


def shared_expert(xp, h, expert: Expert, shared_gate: Projection | None):
    """The always-on shared expert, scaled per token by a sigmoid gate.

    h ``[N, H]`` -> (output ``[N, H]``, gate value ``[N]``).  ``expert`` is a SwiGLU MLP;
    ``shared_gate`` maps ``H -> 1`` and its sigmoid decides how much of the shared
    expert each token takes.  Without a gate (None: DeepSeekMoE's shared experts) every
    token takes all of it, a gate of 1.
    """
    if shared_gate is None:
        return expert(h), xp.ones(h.shape[0], dtype=xp.float32)
    gate_value = sigmoid(xp, shared_gate(h))[:, 0]  # [N]
    return expert(h) * gate_value[:, None], gate_value


# --- the router's auxiliary loss ---------------------------------------------------

def load_balancing_loss(xp, router_logits: Sequence, num_experts: int, top_k: int) -> float:
    """The Switch-Transformer load-balancing loss, computed as transformers computes it.

    router_logits: one ``[N, E]`` array per sparse layer.  With ``f_e`` the share of
    top-k slots (summed over layers, divided by the number of token rows, so
    ``sum_e f_e = k``) and ``P_e`` the mean router probability of expert ``e``:
    ``loss = E * sum_e f_e * P_e``.  Perfectly uniform routing gives ``k``.
    """
    if not router_logits:
        return 0.0
    slot_counts = xp.zeros(num_experts, dtype=xp.float32)
    prob_sums = xp.zeros(num_experts, dtype=xp.float32)
    rows = 0
    for logits in router_logits:
        choice = route(xp, logits, top_k, norm_topk_prob=False)
        slot_counts += xp.bincount(choice.expert_ids.reshape(-1), minlength=num_experts)
        prob_sums += choice.probs.sum(axis=0)
        rows += logits.shape[0]
    return float(num_experts * xp.sum((slot_counts / rows) * (prob_sums / rows)))
