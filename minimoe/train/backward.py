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

Speed on the CPU is :class:`TapedOperations`' business, as it is :class:`~minimoe.ops.Operations`' in the
forward: with NumPy's BLAS on one thread, minimoe's threads take independent pieces -- the chosen experts,
the slices of a wide MLP's inner width, a weight's rows in a big matmul's backward, the sequences of the
batch (in blocks of queries) in attention, the rows of the logits in the cross-entropy.  Each piece is the
same :mod:`minimoe.layers` function on a part of the arrays; on a GPU everything runs whole.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .. import layers
from ..backend import NUM_THREADS, row_ranges
from ..errors import MinimoeError
from ..model import Attention, DecoderLayer, Model, SparseMoeBlock
from ..ops import Operations
from .parameters import parameters

SPLIT_WORK = 1 << 24  # multiply-adds of a backward matmul worth cutting into one slice per thread
ATTENTION_QUERY_ROWS = 64  # queries per block of a sequence's attention (see TapedOperations.query_blocks)
CROSS_ENTROPY_ROWS = 256  # rows of [N, V] logits per piece: its temporaries stay in cache (4 MB at V = 4096)


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
    loss, d_logits = taped.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets)  # d_logits in logits' place
    d_logits = d_logits.reshape(logits.shape)
    del logits

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

    def pieces(self, count: int, size: int = 1) -> list[range]:
        """``range(count)`` in pieces of about ``size`` for minimoe's threads (NumPy), whole on a GPU."""
        if self.xp is not np:
            return [range(count)]
        return row_ranges(count, max(NUM_THREADS, -(-count // size)))

    def cross_entropy(self, logits, targets) -> tuple[float, object]:
        """:func:`minimoe.layers.cross_entropy` of logits ``[N, V]`` and its gradient, written over the logits
        (not needed after), ``CROSS_ENTROPY_ROWS`` rows at a time on the threads -> (loss, gradient ``[N, V]``)."""
        xp = self.xp
        count = int(xp.sum(targets != layers.IGNORE_INDEX))

        def rows(part: range) -> float:
            chunk, chunk_targets = logits[part.start:part.stop], targets[part.start:part.stop]
            loss = layers.cross_entropy(xp, chunk, chunk_targets, count)
            chunk[...] = layers.cross_entropy_backward(xp, chunk, chunk_targets, count)
            return loss

        return sum(self.map(rows, self.pieces(len(logits), CROSS_ENTROPY_ROWS))), logits

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

    def query_blocks(self, tokens: int) -> list[range]:
        """The queries ``range(tokens)`` in blocks of ``ATTENTION_QUERY_ROWS`` (NumPy; whole on a GPU): a block
        attends only to the keys up to its last position, so the masked-out upper triangle is mostly skipped
        (at T = 256, 62% of the full ``[T, S]`` work)."""
        return self.pieces(tokens, ATTENTION_QUERY_ROWS) if self.xp is np else [range(tokens)]

    def attention(self, q, k, v, start: int, window: int | None = None):
        """:meth:`Operations.attention` one sequence of the batch at a time on the threads, each in
        :meth:`query_blocks` -> ``[B, T, nh*D]``."""
        xp = self.xp

        def sequences(part: range):
            b = slice(part.start, part.stop)
            return xp.concatenate([super(TapedOperations, self).attention(
                q[b, :, block.start:block.stop], k[b, :, :start + block.stop], v[b, :, :start + block.stop],
                start + block.start, window=window) for block in self.query_blocks(q.shape[2])], axis=1)

        out = xp.concatenate(self.map(sequences, self.pieces(len(q))), axis=0)
        self.save("attention", q=q, k=k, v=v, start=start, window=window, out=out)
        return out

    def attention_backward(self, dy, q, k, v, out, start: int, window: int | None = None):
        """:func:`minimoe.layers.causal_attention_backward` one sequence at a time on the threads, in the
        forward's query blocks: each block gives its queries' dq and adds to the dk, dv of the keys it saw."""
        xp = self.xp

        def sequences(part: range):
            b = slice(part.start, part.stop)
            dq, dk, dv = xp.zeros_like(q[b]), xp.zeros_like(k[b]), xp.zeros_like(v[b])
            for block in self.query_blocks(q.shape[2]):
                rows, keys = slice(block.start, block.stop), slice(0, start + block.stop)
                dq[:, :, rows], block_dk, block_dv = layers.causal_attention_backward(
                    xp, dy[b, rows], q[b, :, rows], k[b, :, keys], v[b, :, keys], out[b, rows], start + block.start,
                    window)
                dk[:, :, keys] += block_dk
                dv[:, :, keys] += block_dv
            return dq, dk, dv

        parts = self.map(sequences, self.pieces(len(q)))
        return tuple(xp.concatenate(grads, axis=0) for grads in zip(*parts))  # dq, dk, dv

    def weight_slices(self, rows: int, work: int) -> list[range]:
        """A weight's ``rows`` in one slice per thread when ``work`` (multiply-adds) is worth spreading
        (NumPy), else whole."""
        return self.pieces(rows, rows) if work >= SPLIT_WORK else [range(rows)]

    def linear_backward(self, weight, x, dy):
        """:func:`minimoe.layers.linear_backward` with ``W [out, in]`` cut into row slices, one per thread: each
        slice gives its rows of dW and db and a part of dx, and dx is the parts' sum."""
        xp = self.xp
        flat_x, flat_dy = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])

        def rows(part: range):
            piece = slice(part.start, part.stop)
            return layers.linear_backward(xp, flat_dy[:, piece], flat_x, weight[piece])

        found = self.map(rows, self.weight_slices(weight.shape[0], flat_x.shape[0] * weight.size))
        dx = sum(part[0] for part in found[1:]) + found[0][0] if len(found) > 1 else found[0][0]
        return (dx.reshape(*x.shape[:-1], -1), xp.concatenate([part[1] for part in found]),
                xp.concatenate([part[2] for part in found]))

    def swiglu(self, mlp, h):
        """:meth:`run_swiglu` of a dense layer's MLP or the shared expert, in slices on the threads."""
        saved = self.run_swiglu(mlp, h)
        self.save("swiglu", **saved)
        return saved["y"]

    def run_swiglu(self, mlp, x, whole: bool = False) -> dict:
        """:func:`minimoe.layers.swiglu` of ``mlp`` on x ``[..., H]``, keeping its gate and up outputs ->
        ``dict(x, y, slices=[(inner range, gate out, up out), ...])``.

        As :meth:`Operations.swiglu` does, in slices of the inner width, one per thread: slice ``s`` runs
        its rows of gate and up and its columns of down, and y is the slices' sum -- unless ``whole`` (an
        expert, already on a thread of its own) or on a GPU.  The backward cuts the MLP where this did.
        """
        inner = mlp.gate.weight.shape[0]
        parts = [range(inner)] if whole else self.weight_slices(inner, 3 * x.size // x.shape[-1] * mlp.gate.weight.size)

        def run(part: range):
            projections = (mlp.gate, mlp.up, mlp.down) if len(parts) == 1 else (
                mlp.gate.row_slice(part), mlp.up.row_slice(part), mlp.down.column_slice(part))  # views
            gate, up = Recorded(projections[0]), Recorded(projections[1])
            activation = layers.ACTIVATIONS[mlp.activation]  # silu: parameters() refuses the others
            return layers.swiglu(self.xp, x, gate, up, projections[2], activation), (part, gate.output, up.output)

        found = self.map(run, parts)
        y = sum(part[0] for part in found[1:]) + found[0][0] if len(found) > 1 else found[0][0]
        return dict(x=x, y=y, slices=[part[1] for part in found])

    def swiglu_backward(self, mlp, saved: dict, dy):
        """:func:`minimoe.layers.swiglu_backward` from what :meth:`run_swiglu` saved, slice by slice on the
        threads: each slice gives its rows of gate's and up's gradients, its columns of down's, and a part of
        dx, the parts' sum -> (dx, (d gate, d up, d down))."""
        xp, gate, up, down = self.xp, mlp.gate.weight, mlp.up.weight, mlp.down.weight

        def columns(piece_saved):
            part, gate_out, up_out = piece_saved
            piece = slice(part.start, part.stop)
            return layers.swiglu_backward(xp, dy, saved["x"], gate_out, up_out, gate[piece], up[piece], down[:, piece])

        found = self.map(columns, saved["slices"])
        if len(found) == 1:
            return found[0]
        dx = sum(part[0] for part in found[1:]) + found[0][0]
        return dx, (xp.concatenate([part[1][0] for part in found]), xp.concatenate([part[1][1] for part in found]),
                    xp.concatenate([part[1][2] for part in found], axis=1))

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
            saved = self._experts[mlp] = self.run_swiglu(mlp, x, whole=True)
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
        dq, dk, dv = self.taped.attention_backward(d_heads, saved["q"], saved["k"], saved["v"], saved["out"],
                                                   saved["start"], saved["window"])
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
        dx, weight_grads = self.taped.swiglu_backward(mlp, saved, d_out)
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
        dx, d_weight, d_bias = self.taped.linear_backward(projection.weight, x, d_out)
        self.grads.add(projection.weight, d_weight)
        if projection.bias is not None:
            self.grads.add(projection.bias, d_bias)
        return dx
