"""The training loss and its gradient with respect to every weight: :func:`loss_and_grads`.

How it runs, in three steps:

1. **Forward, on a tape.**  The forward pass is the model's own (:meth:`minimoe.model.Model.forward`,
   the one composition of the blocks), run over :class:`TapedOperations`: the reference operations of
   :mod:`minimoe.ops`, on the same array module, each also saving on a tape what its backward needs --
   its inputs, and the outputs of the projections inside it (caught by :class:`Recorded` wrappers
   handed to the very same :mod:`minimoe.layers` functions).  Nothing here restates the forward.
2. **The loss**, as transformers computes it with ``labels`` and ``output_router_logits=True``:
   cross-entropy of each position's logits against the next label (labels shifted left by one, the
   last position and labels of -100 ignored), plus ``aux_loss_coef`` times the routers' load-balancing
   loss over all sparse layers.
3. **Backward.**  :class:`Backward` walks the model's blocks in reverse, each method the mirror of a
   forward block of :mod:`minimoe.model` (``decoder_layer`` of ``DecoderLayer.__call__``, ``moe`` of
   ``SparseMoeBlock.__call__``, ...).  It pops the tape, so each operation's saved values come off in
   the reverse of the order they went on -- and each pop names the operation it expects, so a forward
   whose order changed fails loudly here rather than producing wrong gradients.  The arithmetic is the
   layer backwards of :mod:`minimoe.layers`; gradients are collected by weight (:class:`Gradients`).

What the tape keeps is small next to the weights' gradients at these sizes: per layer a few ``[N, H]``
activations, the MLPs' ``[N, I]`` gate and up outputs, and q, k, v; attention's ``[T, S]`` weights are
recomputed in the backward instead of kept (as FlashAttention does).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .. import layers
from ..errors import MinimoeError
from ..model import Attention, DecoderLayer, Model, SparseMoeBlock
from ..ops import Operations
from .parameters import parameters


def loss_and_grads(model: Model, input_ids, labels=None, *, aux_loss_coef: float | None = None) -> tuple[float, dict]:
    """The training loss on a batch and its gradient with respect to every weight.

    input_ids ``[B, T]`` (or one sequence ``[T]``); ``labels`` the same shape, what transformers takes as
    ``labels=`` (position ``t`` is scored on predicting ``labels[t + 1]``; -100 marks a label to ignore),
    by default the inputs themselves.  ``aux_loss_coef`` weighs the load-balancing loss (default: the
    config's ``router_aux_loss_coef``).  Returns ``(loss, grads)``: the loss as a float, and a float32
    array per weight under its checkpoint name, shaped like it -- zeros for a weight the batch did not
    reach (an expert no token chose).  The weights are :func:`minimoe.train.parameters`' (made on the
    first call).
    """
    params = parameters(model)
    xp, config = model.xp, model.config
    ids = model.check_ids(input_ids)
    ids = ids[None] if ids.ndim == 1 else ids
    targets = xp.asarray(next_token_targets(ids, labels, config.vocab_size).reshape(-1))  # [B*T]
    coef = config.router_aux_loss_coef if aux_loss_coef is None else float(aux_loss_coef)

    taped = TapedOperations(model.ops)
    logits = dataclasses.replace(model, ops=taped).forward(ids)  # [B, T, V]: the model's own forward
    flat_logits = logits.reshape(-1, logits.shape[-1])
    loss = layers.cross_entropy(xp, flat_logits, targets)
    d_logits = layers.cross_entropy_backward(xp, flat_logits, targets).reshape(logits.shape)
    del logits, flat_logits

    choices = taped.router_choices()
    d_router_probs = None
    if choices:  # transformers adds the balance loss with output_router_logits=True, whatever the coefficient
        loss += coef * layers.load_balancing_loss(xp, [c.logits for c in choices], config.num_experts,
                                                  config.num_experts_per_tok)
        d_router_probs = coef * layers.load_balancing_loss_backward(xp, [c.expert_ids for c in choices],
                                                                    config.num_experts)
    grads = Gradients(params, xp)
    with taped.forward_context():  # NumPy: BLAS on one thread, minimoe's threads split the work (as in the forward)
        Backward(taped, grads, d_router_probs).model(model, d_logits)
    return float(loss), grads.complete()


def next_token_targets(ids: np.ndarray, labels, vocab_size: int) -> np.ndarray:
    """What each position of ids ``[B, T]`` is scored on predicting: ``labels[:, t + 1]`` (labels default to
    ids), and -100 (ignored) at the last position -- transformers' shift for ``labels=``.  -> ``[B, T]``."""
    labels = ids if labels is None else np.asarray(labels)
    if labels.shape != ids.shape:
        raise MinimoeError(f"labels must have the shape of input_ids {list(ids.shape)}, got {list(labels.shape)}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise MinimoeError(f"labels must be integers, got dtype {labels.dtype}")
    bad = (labels != layers.IGNORE_INDEX) & ((labels < 0) | (labels >= vocab_size))
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise MinimoeError(f"label {int(labels[where])} at position {where} is neither a token id in "
                           f"[0, {vocab_size}) nor {layers.IGNORE_INDEX} (ignored)")
    targets = np.full(ids.shape, layers.IGNORE_INDEX, dtype=np.int64)
    targets[:, :-1] = labels[:, 1:]
    if (targets == layers.IGNORE_INDEX).all():
        raise MinimoeError("no position has a label to predict: every label after the first position is "
                           f"{layers.IGNORE_INDEX} (or the sequences are one token long)")
    return targets


# --- 1. the forward, on a tape -----------------------------------------------------------------------------

class Recorded:
    """A projection that keeps the output of its last call (for the backward), otherwise the projection itself."""

    def __init__(self, projection):
        self.projection = projection
        self.output = None

    def __call__(self, x):
        self.output = self.projection(x)
        return self.output


class TapedOperations(Operations):
    """The reference operations (:class:`minimoe.ops.Operations`, on ``ops``' array module), each also putting
    what its backward needs on :attr:`tape`, a stack of ``(operation, saved values)``.

    An operation built on another leaves both on the tape: ``add_rms_norm`` leaves its ``rms_norm``,
    ``shared_expert`` its ``swiglu`` (then its own entry).
    """

    def __init__(self, ops: Operations):
        super().__init__(ops.xp)
        self.tape: list[tuple[str, dict]] = []
        self._experts: dict = {}  # a routed expert (its SwiGLU) -> what it saved, for the routed_experts running

    def save(self, operation: str, **values) -> None:
        self.tape.append((operation, values))

    def pop(self, operation: str) -> dict:
        """The values the last operation on the tape saved; it must be ``operation``."""
        found, values = self.tape.pop()
        if found != operation:
            raise MinimoeError(f"backward expected the forward's {operation!r} next on the tape, found {found!r}: "
                               "minimoe.train.backward no longer mirrors minimoe.model's blocks")
        return values

    def router_choices(self) -> list:
        """Each sparse layer's :class:`minimoe.layers.RouterChoice`, in layer order."""
        return [values["choice"] for operation, values in self.tape if operation == "route"]

    def embed(self, embedding, ids):
        self.save("embed", ids=ids)
        return super().embed(embedding, ids)

    def rms_norm(self, x, weight, eps: float):
        y = super().rms_norm(x, weight, eps)
        self.save("rms_norm", x=x, weight=weight, eps=eps, y=y)
        return y

    def attention_inputs(self, attention, h, cos, sin, cache, layer: int, start: int):
        q, k, v = (Recorded(getattr(attention, key)) for key in "qkv")
        recorded = dataclasses.replace(attention, q=q, k=k, v=v)
        heads = super().attention_inputs(recorded, h, cos, sin, cache, layer, start)
        self.save("attention_inputs", h=h, cos=cos, sin=sin, q=q.output, k=k.output)  # q, k before their norms
        return heads

    def attention(self, q, k, v, start: int):
        out = super().attention(q, k, v, start)
        self.save("attention", q=q, k=k, v=v, start=start, out=out)
        return out

    def swiglu(self, mlp, h):
        """:func:`minimoe.layers.swiglu` whole (not in slices), keeping its gate and up outputs."""
        saved = self.run_swiglu(mlp, h)
        self.save("swiglu", **saved)
        return saved["y"]

    def run_swiglu(self, mlp, x) -> dict:
        gate, up = Recorded(mlp.gate), Recorded(mlp.up)
        y = layers.swiglu(self.xp, x, gate, up, mlp.down)
        return dict(x=x, gate_out=gate.output, up_out=up.output, y=y)

    def route(self, moe, h, change):
        choice = super().route(moe, h, change)
        self.save("route", h=h, choice=choice)
        return choice

    def routed_experts(self, moe, h, choice):
        self._experts = {}
        out = super().routed_experts(moe, h, choice)  # runs self.expert(mlp) of each chosen expert
        self.save("routed_experts", choice=choice, experts=self._experts)
        return out

    def expert(self, mlp):
        def run(x):
            saved = self._experts[mlp] = self.run_swiglu(mlp, x)
            return saved["y"]

        return run

    def shared_expert(self, moe, h, choice, on: bool):
        shared = super().shared_expert(moe, h, choice, on)  # (gated output, gate), its swiglu on the tape
        self.save("shared_expert", h=h, gate=shared[1])
        return shared


# --- 3. the backward: the model's blocks in reverse ------------------------------------------------------

class Gradients:
    """The gradients found so far, by the name :func:`parameters` gives each weight's array; a weight
    reached twice (a tied embedding, or q, k and v reading one norm's output) gets the sum."""

    def __init__(self, params: dict, xp):
        self.params, self.xp = params, xp
        self.name_of = {id(array): name for name, array in params.items()}
        self.found: dict = {}

    def add(self, weight, grad) -> None:
        name = self.name_of[id(weight)]
        if name in self.found:
            self.found[name] = self.found[name] + grad
        else:
            self.found[name] = grad

    def complete(self) -> dict:
        """Every weight's gradient as float32 in the parameters' order, zeros for one nothing reached."""
        xp = self.xp
        return {name: (self.found[name].astype(xp.float32, copy=False) if name in self.found
                       else xp.zeros_like(array)) for name, array in self.params.items()}


class Backward:
    """The backward of :class:`minimoe.model.Model`: each method the mirror of one forward block, taking the
    gradient of the loss with respect to the block's output and returning it with respect to its input,
    its weights' gradients added to ``grads``."""

    def __init__(self, taped: TapedOperations, grads: Gradients, d_router_probs=None):
        self.xp, self.taped, self.grads = taped.xp, taped, grads
        self.d_router_probs = d_router_probs  # [E]: the balance loss's gradient on every router probability

    def model(self, model: Model, d_logits) -> None:
        """Mirror of :meth:`Model.run` after :meth:`Operations.embed`: d_logits ``[B, T, V]``."""
        final = self.taped.pop("rms_norm")
        d_x = self.norm(final, self.projection(model.lm_head, final["y"], d_logits))
        for layer in reversed(model.decoder):
            d_x = self.decoder_layer(layer, d_x)
        ids = self.taped.pop("embed")["ids"]
        self.grads.add(model.embed.weight, layers.embedding_backward(self.xp, d_x, self.xp.asarray(ids),
                                                                     model.config.vocab_size, model.config.pad_token_id))

    def decoder_layer(self, layer: DecoderLayer, d_out):
        """Mirror of :meth:`DecoderLayer.__call__`, ``x1 = x + attention(norm(x)); out = x1 + mlp(norm(x1))``:
        d_out ``[B, T, H]`` -> d x."""
        if layer.is_sparse:
            d_h = self.moe(layer.mlp, d_out.reshape(-1, d_out.shape[-1])).reshape(d_out.shape)
        else:
            d_h = self.swiglu(layer.mlp, self.taped.pop("swiglu"), d_out)
        d_x1 = d_out + self.norm(self.taped.pop("rms_norm"), d_h)  # add_rms_norm's norm
        d_h = self.attention(layer.attention, d_x1)
        return d_x1 + self.norm(self.taped.pop("rms_norm"), d_h)

    def attention(self, attention: Attention, d_out):
        """Mirror of :meth:`Attention.__call__` and :meth:`Operations.attention_inputs`: d_out ``[B, T, H]`` -> d h."""
        xp, norm = self.xp, attention.qk_norm
        saved = self.taped.pop("attention")
        d_heads = self.projection(attention.o, saved["out"], d_out)  # [B, T, nh*D]
        dq, dk, dv = layers.causal_attention_backward(xp, d_heads, saved["q"], saved["k"], saved["v"], saved["start"])
        inputs = self.taped.pop("attention_inputs")
        q, k = inputs["q"], inputs["k"]  # the projections' outputs [B, T, nh*D], [B, T, nkv*D]
        dq = layers.apply_rope_backward(xp, dq, inputs["cos"], inputs["sin"])
        dk = layers.apply_rope_backward(xp, dk, inputs["cos"], inputs["sin"])
        if norm and norm.per_head:  # Qwen3-MoE: each head's D values
            dq, dk = self.qk_norm(norm, dq, dk, layers.split_heads(q, attention.num_heads, attention.head_dim),
                                  layers.split_heads(k, attention.num_kv_heads, attention.head_dim))
        dq, dk, dv = layers.merge_heads(dq), layers.merge_heads(dk), layers.merge_heads(dv)
        if norm and not norm.per_head:  # OLMoE: the whole projection
            dq, dk = self.qk_norm(norm, dq, dk, q, k)
        h = inputs["h"]
        return (self.projection(attention.q, h, dq) + self.projection(attention.k, h, dk)
                + self.projection(attention.v, h, dv))

    def qk_norm(self, norm, dq, dk, q, k):
        dq, dq_weight = layers.rms_norm_backward(self.xp, dq, q, norm.q_weight, norm.eps)
        dk, dk_weight = layers.rms_norm_backward(self.xp, dk, k, norm.k_weight, norm.eps)
        self.grads.add(norm.q_weight, dq_weight)
        self.grads.add(norm.k_weight, dk_weight)
        return dq, dk

    def moe(self, moe: SparseMoeBlock, d_out):
        """Mirror of :meth:`SparseMoeBlock.__call__` (``out = residual + routed + shared``, the residual's
        gradient taken by the caller): d_out ``[N, H]`` -> d h."""
        xp = self.xp
        shared = self.taped.pop("shared_expert")
        d_h = xp.zeros_like(d_out)
        if moe.shared is not None:
            mlp = self.taped.pop("swiglu")
            d_expert, d_gate = layers.shared_expert_backward(xp, d_out, mlp["y"], shared["gate"])
            d_h = self.swiglu(moe.shared, mlp, d_expert) + self.projection(moe.shared_gate, shared["h"], d_gate)
        routed = self.taped.pop("routed_experts")
        choice, saved = routed["choice"], {moe.experts.index(mlp): values for mlp, values in routed["experts"].items()}

        def expert_backward(expert: int, d_expert_out):
            return self.swiglu(moe.experts[expert], saved[expert], d_expert_out)

        d_routed, d_weights = layers.routed_experts_backward(
            xp, d_out, choice.expert_ids, choice.expert_weights, {e: values["y"] for e, values in saved.items()},
            expert_backward, self.taped.map)
        route = self.taped.pop("route")
        d_logits = layers.route_backward(xp, d_weights, choice, moe.norm_topk_prob, self.d_router_probs)
        return d_h + d_routed + self.projection(moe.router, route["h"], d_logits)

    def swiglu(self, mlp, saved: dict, d_out):
        """Backward of one SwiGLU MLP (a dense layer's, an expert, the shared expert) from what it saved."""
        dx, weight_grads = layers.swiglu_backward(self.xp, d_out, saved["x"], saved["gate_out"], saved["up_out"],
                                                  mlp.gate.weight, mlp.up.weight, mlp.down.weight)
        for projection, grad in zip((mlp.gate, mlp.up, mlp.down), weight_grads):
            self.grads.add(projection.weight, grad)
        return dx

    def norm(self, saved: dict, d_out):
        """Backward of an :meth:`Operations.rms_norm` from what it saved."""
        dx, d_weight = layers.rms_norm_backward(self.xp, d_out, saved["x"], saved["weight"], saved["eps"])
        self.grads.add(saved["weight"], d_weight)
        return dx

    def projection(self, projection, x, d_out):
        """Backward of ``projection(x) = x @ W.T (+ b)``: d x, with W's (and b's) gradient added."""
        dx, d_weight, d_bias = layers.linear_backward(self.xp, d_out, x, projection.weight)
        self.grads.add(projection.weight, d_weight)
        if projection.bias is not None:
            self.grads.add(projection.bias, d_bias)
        return dx
