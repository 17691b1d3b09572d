"""The layers of Qwen2-MoE, each a small function over an array module ``xp``.

Shapes use: ``B`` batch, ``T`` new tokens, ``S`` all positions attended to
(cache + new), ``H`` hidden size, ``nh`` query heads, ``nkv`` key/value heads,
``D`` head dim, ``E`` experts, ``k`` experts per token, ``N`` flattened tokens.

Weights arrive as callables (:class:`minimoe.backend.Linear`: ``W(x) = x @ W.T + b``)
so that the same function runs on NumPy or on the GPU.  Everything computes
in float32, which is also where transformers keeps its softmaxes and norms.

Each layer's backward sits right after it (``rms_norm_backward`` after ``rms_norm``):
given the gradient of the loss with respect to the layer's output (``dy``) and what the
forward saw, it returns the gradients with respect to the inputs and weights, its math in
its docstring.  A backward takes weights as plain matrices ``W [out, in]``.
:mod:`minimoe.train` composes them into the model's backward pass; the tests hold each
against finite differences.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

Projection = Callable  # x [..., in] -> [..., out], e.g. minimoe.backend.Linear
Expert = Callable  # x [n, H] -> [n, H], a SwiGLU MLP (e.g. minimoe.model.SwiGLU)
Array = object  # a NumPy or CuPy array; shapes are given in each docstring


# --- projections and the embedding (their forwards: minimoe.backend.Linear) ------------

def linear_backward(xp, dy, x, weight):
    """Gradients of ``y = x @ W.T (+ b)``.  dy ``[..., out]``, x ``[..., in]``, W ``[out, in]`` ->
    (dx ``[..., in]``, dW ``[out, in]``, db ``[out]``): ``dx = dy @ W``, ``dW = sum over rows of
    dy^T x``, ``db = sum over rows of dy``."""
    flat_dy, flat_x = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
    return dy @ weight, flat_dy.T @ flat_x, flat_dy.sum(axis=0)


def embedding_backward(xp, dy, ids, vocab_size: int, padding_id: int | None = None):
    """Gradient of the embedding lookup ``y = E[ids]``.  dy ``[..., H]``, ids ``[...]`` -> dE ``[V, H]``:
    row ``v`` gathers the gradients of every position that holds token ``v`` (a scatter-add).  The row of
    ``padding_id``, if any, gets none (PyTorch's ``nn.Embedding(padding_idx=...)``, which transformers
    builds with the config's ``pad_token_id``)."""
    grad = xp.zeros((vocab_size, dy.shape[-1]), dtype=dy.dtype)
    xp.add.at(grad, ids.reshape(-1), dy.reshape(-1, dy.shape[-1]))
    if padding_id is not None:
        grad[padding_id] = 0
    return grad


# --- normalisation and activations -------------------------------------------------

def rms_norm(xp, x, weight, eps: float):
    """Root-mean-square norm: ``x / sqrt(mean(x^2) + eps) * w``.  x ``[..., H]`` -> ``[..., H]``."""
    variance = xp.mean(xp.square(x), axis=-1, keepdims=True)
    return x / xp.sqrt(variance + eps) * weight


def rms_norm_backward(xp, dy, x, weight, eps: float):
    """Gradients of :func:`rms_norm`.  dy, x ``[..., H]`` -> (dx ``[..., H]``, dweight ``[H]``).

    With ``r = 1 / sqrt(mean(x^2) + eps)``, ``n = x * r`` and ``y = n * w``:
    ``dw = sum over rows of dy * n``, and with ``g = dy * w``,
    ``dx = r * (g - n * mean(g * n))`` -- the second term is how each ``x_j`` also moves ``r``.
    """
    r = 1.0 / xp.sqrt(xp.mean(xp.square(x), axis=-1, keepdims=True) + eps)  # [..., 1]
    normed = x * r
    g = dy * weight
    dweight = (dy * normed).reshape(-1, x.shape[-1]).sum(axis=0)
    dx = r * (g - normed * xp.mean(g * normed, axis=-1, keepdims=True))
    return dx, dweight


def silu(xp, x):
    """``x * sigmoid(x)``, elementwise."""
    return x / (1.0 + xp.exp(-x))


def sigmoid(xp, x):
    return 1.0 / (1.0 + xp.exp(-x))


def softmax(xp, x, axis: int = -1):
    """Numerically stable softmax along ``axis`` (max subtracted first)."""
    shifted = x - xp.max(x, axis=axis, keepdims=True)
    exp = xp.exp(shifted)
    return exp / xp.sum(exp, axis=axis, keepdims=True)


def softmax_backward(xp, dy, y, axis: int = -1):
    """Gradient of ``y = softmax(x)`` with respect to x, given y: ``y * (dy - sum(dy * y))``, the sum along
    ``axis`` (the Jacobian ``diag(y) - y y^T`` applied to dy)."""
    return y * (dy - xp.sum(dy * y, axis=axis, keepdims=True))


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


def apply_rope_backward(xp, dy, cos, sin):
    """Gradient of :func:`apply_rope`.  dy ``[B, heads, T, D]`` -> dx, the inverse rotation of dy.

    ``y = x * cos + R x * sin`` with ``R`` = :func:`rotate_half`, a linear map whose transpose is
    ``-R`` (``[x1, x2] -> [-x2, x1]`` is a quarter turn), so ``dx = dy * cos - R(dy * sin)``.
    """
    return dy * cos - rotate_half(xp, dy * sin)


# --- attention ---------------------------------------------------------------------

def split_heads(x, num_heads: int, head_dim: int):
    """``[B, T, heads * D]`` -> ``[B, heads, T, D]``."""
    batch, tokens, _ = x.shape
    return x.reshape(batch, tokens, num_heads, head_dim).transpose(0, 2, 1, 3)


def merge_heads(x):
    """``[B, heads, T, D]`` -> ``[B, T, heads * D]`` (the inverse of :func:`split_heads`)."""
    batch, heads, tokens, head_dim = x.shape
    return x.transpose(0, 2, 1, 3).reshape(batch, tokens, heads * head_dim)


def attention_weights(xp, q, k, query_start: int):
    """The causal softmax weights of grouped-query attention.  q ``[B, nh, T, D]``, k ``[B, nkv, S, D]`` ->
    ``[B, nkv, nh / nkv, T, S]`` (query head ``h`` is group ``h % (nh / nkv)`` of key head ``h // (nh / nkv)``).

    Scores are scaled by ``1/sqrt(D)``; a query at position ``p`` sees keys ``0..p``.
    """
    batch, num_heads, tokens, head_dim = q.shape
    num_kv, keys = k.shape[1], k.shape[2]
    q = q.reshape(batch, num_kv, num_heads // num_kv, tokens, head_dim)
    scores = q @ k[:, :, None].swapaxes(-1, -2) / xp.float32(head_dim) ** 0.5  # [B, nkv, g, T, S]
    query_pos = xp.arange(query_start, query_start + tokens)[:, None]
    key_pos = xp.arange(keys)[None, :]
    scores = xp.where(key_pos <= query_pos, scores, xp.float32(-xp.inf))
    return softmax(xp, scores, axis=-1)


def causal_attention(xp, q, k, v, query_start: int):
    """Grouped-query causal attention.

    q ``[B, nh, T, D]`` for positions ``query_start .. query_start + T - 1``;
    k, v ``[B, nkv, S, D]`` for positions ``0 .. S - 1``.  Returns ``[B, T, nh * D]``.

    Query head ``h`` reads key/value head ``h // (nh / nkv)``: we view the query heads
    as ``[nkv, groups]`` instead of repeating k and v, which is the same arithmetic
    without the copies (:func:`attention_weights`).
    """
    weights = attention_weights(xp, q, k, query_start)  # [B, nkv, g, T, S]
    out = weights @ v[:, :, None]  # [B, nkv, g, T, D]
    return merge_heads(out.reshape(q.shape))


def causal_attention_backward(xp, dy, q, k, v, query_start: int):
    """Gradients of :func:`causal_attention`.  dy ``[B, T, nh * D]`` -> (dq ``[B, nh, T, D]``, dk, dv
    ``[B, nkv, S, D]``).

    The weights ``P = softmax(q k^T / sqrt(D))`` are recomputed from q and k rather than kept
    from the forward (as FlashAttention does).  With ``O = P v``: ``dv = P^T dO``, ``dP = dO v^T``,
    ``dS = softmax_backward(dP, P) / sqrt(D)``, ``dq = dS k``, ``dk = dS^T q``; a key head's ``dk`` and
    ``dv`` sum over the query heads of its group (taken as more rows of one matmul).
    """
    batch, num_heads, tokens, head_dim = q.shape
    num_kv, keys = k.shape[1], k.shape[2]
    rows = num_heads // num_kv * tokens  # a key head's query rows: its group's heads, each T tokens
    weights = attention_weights(xp, q, k, query_start).reshape(batch, num_kv, rows, keys)  # P [B, nkv, g*T, S]
    d_out = split_heads(dy, num_heads, head_dim).reshape(batch, num_kv, rows, head_dim)  # dO [B, nkv, g*T, D]
    dv = weights.swapaxes(-1, -2) @ d_out  # [B, nkv, S, D]
    d_scores = softmax_backward(xp, d_out @ v.swapaxes(-1, -2), weights) / xp.float32(head_dim) ** 0.5
    dq = (d_scores @ k).reshape(q.shape)  # [B, nh, T, D]
    dk = d_scores.swapaxes(-1, -2) @ q.reshape(batch, num_kv, rows, head_dim)  # [B, nkv, S, D]
    return dq, dk, dv


# --- feed-forward ------------------------------------------------------------------

def swiglu(xp, x, gate: Projection, up: Projection, down: Projection):
    """The SwiGLU MLP: ``down(silu(gate(x)) * up(x))``.  x ``[..., H]`` -> ``[..., H]`` (inner width ``I``)."""
    return down(silu(xp, gate(x)) * up(x))  # [..., I] -> [..., H]


def swiglu_backward(xp, dy, x, gate_out, up_out, gate_w, up_w, down_w):
    """Gradients of :func:`swiglu`, given what its forward computed: dy, x ``[..., H]``, gate_out = gate(x),
    up_out = up(x) ``[..., I]``, weights gate_w, up_w ``[I, H]``, down_w ``[H, I]`` -> (dx ``[..., H]``,
    (d gate_w, d up_w, d down_w)).

    With ``s = sigmoid(g)``, ``a = silu(g) * u`` and ``y = a @ down^T``: ``d down = dy^T a``,
    ``da = dy @ down``, ``du = da * silu(g)``, ``dg = da * u * s * (1 + g * (1 - s))`` (silu's
    derivative), then ``d gate = dg^T x``, ``d up = du^T x``, ``dx = dg @ gate + du @ up``.
    """
    shape = x.shape
    dy, x = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, shape[-1])  # [N, H]
    g, u = gate_out.reshape(-1, gate_out.shape[-1]), up_out.reshape(-1, up_out.shape[-1])  # [N, I]
    s = sigmoid(xp, g)
    activated = g * s  # silu(g)
    d_down = dy.T @ (activated * u)
    da = dy @ down_w
    du = da * activated
    dg = da * u * s * (1.0 + g * (1.0 - s))
    dx = dg @ gate_w + du @ up_w
    return dx.reshape(shape), (dg.T @ x, du.T @ x, d_down)


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
          forced: Sequence[int] | None = None) -> RouterChoice:
    """The router's choice per token.  router_logits ``[N, E]`` -> :class:`RouterChoice`.

    Softmax over *all* experts, then the k largest probabilities, highest first.
    Without ``norm_topk_prob`` (Qwen1.5-MoE's setting) the k weights are those raw
    probabilities and sum to less than 1; with it they are renormalised to sum to 1.

    Interventions: ``disabled`` experts are removed from the router (their logits
    set to -inf before the softmax, as if the router had no row for them);
    ``forced`` experts are used by every token instead of its top-k, each weighted by
    its router probability.
    """
    logits = router_logits.astype(xp.result_type(router_logits.dtype, xp.float32))  # float32 (float64 stays)
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
    weights = raw_weights / xp.sum(raw_weights, axis=-1, keepdims=True) if norm_topk_prob else raw_weights
    return RouterChoice(logits, probs, expert_ids, raw_weights, weights)


def route_backward(xp, d_weights, choice: RouterChoice, norm_topk_prob: bool, d_probs=None):
    """Gradient of :func:`route` with respect to the router logits.  d_weights ``[N, k]`` (of
    ``choice.expert_weights``), optionally d_probs ``[E]`` or ``[N, E]`` reaching every probability directly
    (the load-balancing loss) -> ``[N, E]``.

    Which experts are chosen is piecewise constant in the logits: no gradient flows through the
    choice, only through the chosen probabilities.  With ``norm_topk_prob``, ``w_j = p_j / s`` with
    ``s = sum_i p_i`` over the chosen, so ``dp_j = (dw_j - sum_i dw_i w_i) / s``; without it
    ``dp_j = dw_j``.  Then the softmax: ``d logits = softmax_backward(dp, probs)``.
    """
    d_raw = d_weights
    if norm_topk_prob:
        total = xp.sum(choice.raw_weights, axis=-1, keepdims=True)
        d_raw = (d_weights - xp.sum(d_weights * choice.expert_weights, axis=-1, keepdims=True)) / total
    full = xp.zeros(choice.probs.shape, dtype=d_raw.dtype) if d_probs is None else \
        xp.broadcast_to(d_probs, choice.probs.shape).astype(d_raw.dtype)  # a copy: written below
    full[xp.arange(len(full))[:, None], choice.expert_ids] += d_raw  # each row's k experts are distinct
    return softmax_backward(xp, full, choice.probs)


def expert_groups(xp, expert_ids) -> list:
    """The N*k (token, expert) assignments grouped by expert: ``(expert, slots)`` for each chosen expert, in
    expert order, ``slots`` its positions in the flattened ``[N*k]`` assignments in token order (the token of
    a slot is ``slot // k``).  expert_ids ``[N, k]``."""
    flat_ids = expert_ids.reshape(-1)  # [N*k]
    slots = xp.argsort(flat_ids, kind="stable")  # assignment slots, grouped by expert
    chosen, starts = xp.unique(flat_ids[slots], return_index=True)  # each chosen expert, where its slots begin
    bounds = starts.tolist() + [flat_ids.shape[0]]
    return [(expert, slots[begin:end]) for expert, begin, end in zip(chosen.tolist(), bounds[:-1], bounds[1:])]


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
    flat_weights = expert_weights.reshape(-1)  # [N*k]
    groups = expert_groups(xp, expert_ids)  # each chosen expert with its assignments; their tokens: slots // top_k

    def run(group):  # one expert on the tokens routed to it: [n_e, H] -> [n_e, H]
        expert, mine = group
        return experts[expert](h[mine // top_k])

    out = xp.zeros_like(h)
    for (_, mine), output in zip(groups, map_each(run, groups)):
        # a token picks an expert at most once, so its rows do not repeat and += is safe
        out[mine // top_k] += output * flat_weights[mine][:, None]
    return out


def routed_experts_backward(xp, dy, expert_ids, expert_weights, expert_outputs, expert_backward: Callable,
                            map_each: Callable = map):
    """Gradients of :func:`routed_experts`.  dy ``[N, H]``, expert_ids / expert_weights ``[N, k]``,
    ``expert_outputs[e]`` ``[n_e, H]`` what expert ``e`` returned on its tokens (in token order),
    ``expert_backward(e, d_out)`` the backward of expert ``e`` (``[n_e, H] -> [n_e, H]``, collecting its
    weights' gradients) -> (dh ``[N, H]``, d expert_weights ``[N, k]``).

    Token ``i`` got ``sum_j w_ij f_e(h_i)`` with ``e = expert_ids[i, j]``: so ``d w_ij = dy_i . f_e(h_i)``,
    and expert ``e`` sees ``w_ij dy_i`` on its own tokens only -- experts no token chose get no gradient.
    """
    top_k = expert_ids.shape[1]
    flat_weights = expert_weights.reshape(-1)  # [N*k]
    d_weights = xp.zeros(flat_weights.shape, dtype=dy.dtype)
    groups = expert_groups(xp, expert_ids)

    def run(group):  # one expert's backward on the tokens routed to it
        expert, mine = group
        d_rows = dy[mine // top_k]  # [n_e, H]
        d_weights[mine] = xp.sum(d_rows * expert_outputs[expert], axis=-1)  # each slot is one expert's
        return expert_backward(expert, d_rows * flat_weights[mine][:, None])

    dh = xp.zeros_like(dy)
    for (_, mine), dx in zip(groups, map_each(run, groups)):
        dh[mine // top_k] += dx  # a token's rows do not repeat within one expert
    return dh, d_weights.reshape(expert_ids.shape)


def shared_expert(xp, h, expert: Expert, shared_gate: Projection):
    """The always-on shared expert, scaled per token by a sigmoid gate.

    h ``[N, H]`` -> (output ``[N, H]``, gate value ``[N]``).  ``expert`` is a SwiGLU MLP;
    ``shared_gate`` maps ``H -> 1`` and its sigmoid decides how much of the shared
    expert each token takes.
    """
    gate_value = sigmoid(xp, shared_gate(h))[:, 0]  # [N]
    return expert(h) * gate_value[:, None], gate_value


def shared_expert_backward(xp, dy, expert_out, gate_value):
    """Gradients of :func:`shared_expert`'s output ``s * f(h)``.  dy, expert_out = f(h) ``[N, H]``, gate_value
    s ``[N]`` -> (d expert_out ``[N, H]``, d gate logit ``[N, 1]``): ``df = s * dy`` and, through the
    sigmoid, ``d logit = (dy . f(h)) * s * (1 - s)``."""
    d_gate = xp.sum(dy * expert_out, axis=-1) * gate_value * (1.0 - gate_value)  # [N]
    return dy * gate_value[:, None], d_gate[:, None]


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
    dtype = xp.result_type(router_logits[0].dtype, xp.float32)  # float32 (float64 stays)
    slot_counts = xp.zeros(num_experts, dtype=dtype)
    prob_sums = xp.zeros(num_experts, dtype=dtype)
    rows = 0
    for logits in router_logits:
        choice = route(xp, logits, top_k, norm_topk_prob=False)
        slot_counts += xp.bincount(choice.expert_ids.reshape(-1), minlength=num_experts)
        prob_sums += choice.probs.sum(axis=0)
        rows += logits.shape[0]
    return float(num_experts * xp.sum((slot_counts / rows) * (prob_sums / rows)))


def load_balancing_loss_backward(xp, expert_ids: Sequence, num_experts: int):
    """Gradient of :func:`load_balancing_loss` with respect to each router probability ``p[r, e]``, of every
    row of every sparse layer.  expert_ids: the chosen ``[N, k]`` per sparse layer -> ``[E]``, the same for
    every row.

    The slot shares ``f_e = c_e / R`` (``c_e`` slots over all ``R`` rows) are piecewise constant, and
    ``P_e = sum_r p[r, e] / R``, so ``d loss / d p[r, e] = E * c_e / R^2``: a router is pushed away from
    the experts that already get more than their share.
    """
    rows = sum(ids.shape[0] for ids in expert_ids)
    counts = sum(xp.bincount(ids.reshape(-1), minlength=num_experts) for ids in expert_ids)
    return (num_experts * counts / float(rows) ** 2).astype(xp.float32)


# --- the language-modelling loss -----------------------------------------------------

IGNORE_INDEX = -100  # a target that takes no part in the loss (torch's and transformers' convention)


def cross_entropy(xp, logits, targets) -> float:
    """Mean cross-entropy of the next-token predictions.  logits ``[N, V]``, targets ``[N]`` -> a float.

    ``mean over rows with targets != IGNORE_INDEX of (log sum_v exp(logits_v) - logits_target)``, the
    log-sum-exp taken after subtracting the row's maximum.
    """
    kept = targets != IGNORE_INDEX
    logits, targets = logits[kept], targets[kept]  # [M, V], [M]
    top = xp.max(logits, axis=-1, keepdims=True)
    log_total = xp.log(xp.sum(xp.exp(logits - top), axis=-1)) + top[:, 0]  # [M]
    return float(xp.mean(log_total - xp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]))


def cross_entropy_backward(xp, logits, targets):
    """Gradient of :func:`cross_entropy` with respect to the logits ``[N, V]``: on a row with a target,
    ``(softmax(logits) - onehot(target)) / M`` (M the rows with a target); 0 on the others."""
    kept = targets != IGNORE_INDEX
    grad = softmax(xp, logits, axis=-1)
    grad[xp.arange(len(grad)), xp.where(kept, targets, 0)] -= 1.0
    grad *= (kept / xp.sum(kept)).astype(grad.dtype)[:, None]
    return grad
