"""The model on the GPU: :mod:`minimoe.model`'s blocks, each step a kernel of :mod:`minimoe.gpu.kernels`.

The composition is the CPU model's, step for step (see :class:`minimoe.model.DecoderLayer`):

    h = rms_norm(x);            x, h = x + attention(h), rms_norm(x + attention(h))   # add_rms_norm
    x = x + routed(h) + sigmoid(shared_gate(h)) * shared(h)                          # moe_combine

Weights go to the GPU once, at load, in the dtype the kernels read: bf16 stays bf16
(uint16 bit patterns, half the bytes of float32; the matmul kernels upcast as they
read), f16 and f32 checkpoints (the test fixtures) become float32.  Matrices that read
the same input are stacked so one kernel launch computes them: q/k/v into one ``qkv``
weight, each SwiGLU's gate and up into one ``gate_up``, the router and the shared
expert's gate into one ``router``, and all of a layer's experts into ``[E, out, in]``
tensors the grouped matmuls index by expert.  Activations and
the KV cache stay on the device; :meth:`GpuModel.forward` returns CuPy logits
(``minimoe.to_numpy`` brings them back) and hands routing traces NumPy arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import cupy as cp
import numpy as np

from .. import layers, weights
from ..backend import to_numpy
from ..checkpoint import Checkpoint
from ..config import ModelConfig
from ..errors import MinimoeError
from ..model import Model
from ..routing import NO_INTERVENTIONS, LayerInterventions
from . import kernels, launch


def device_weight(array: np.ndarray):
    """A stored weight copied to the GPU in the dtype the kernels read: bf16 stays bf16 (as uint16 bit
    patterns), anything else becomes float32."""
    if array.dtype.name == "bfloat16":
        return cp.asarray(np.ascontiguousarray(array).view(np.uint16))
    return cp.asarray(np.asarray(array, dtype=np.float32))


class GpuLinear:
    """``y = x @ W.T (+ b)`` on the GPU; the :class:`minimoe.backend.Linear` of the cupy backend.

    ``weight`` is ``[G, out, in]``: G = 1 for a projection, G = experts for a layer's stacked
    experts (called through :meth:`grouped`).  Build with :meth:`stacked`.
    """

    def __init__(self, weight, bias=None):
        self.weight = weight  # [G, out, in] uint16 (bf16 bits) or float32
        self.bias = bias  # [out] float32 or None

    @classmethod
    def stacked(cls, groups: list[list], biases: list | None = None) -> "GpuLinear":
        """One weight from device matrices: ``groups[g]`` are stacked along the output axis into group g.

        ``stacked([[q, k, v]])`` is the fused qkv projection; ``stacked([[gate_e, up_e] for e in experts])``
        the experts' gate_up.  Each matrix is copied into place and may be dropped afterwards.
        """
        first = groups[0][0]
        out = sum(m.shape[0] for m in groups[0])
        weight = cp.empty((len(groups), out, first.shape[1]), dtype=first.dtype)
        for g, matrices in enumerate(groups):
            row = 0
            for matrix in matrices:
                weight[g, row : row + matrix.shape[0]] = matrix
                row += matrix.shape[0]
        bias = None if biases is None else cp.concatenate(biases).astype(cp.float32)
        return cls(weight, bias)

    @property
    def shape(self) -> tuple[int, int]:
        """``(out_features, in_features)``."""
        return self.weight.shape[1:]

    def __call__(self, x):
        """x ``[..., in]`` float32 -> ``[..., out]`` float32."""
        flat = x.reshape(-1, x.shape[-1])
        rows = flat.shape[0]
        y = kernels.grouped_matmul(flat, self.weight, self.bias, None, None, None, max_rows_per_group=rows)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def grouped(self, x, plan: kernels.DevicePlan, max_rows_per_group: int, counts=None, x_rows=None):
        """Rows grouped by ``plan`` (expert e's at plan.offsets[e]..) -> ``[R, out]`` in that order: x ``[R, in]``
        already in dispatch order, or the token rows ``[N, in]`` read through ``x_rows = plan.rows``."""
        return kernels.grouped_matmul(x, self.weight, self.bias, plan.offsets, plan.active, plan.num_active,
                                      max_rows_per_group, counts, x_rows)

    def rows(self, ids):
        """Rows ``W[ids]`` as float32 (the embedding lookup): host ids ``[...]`` -> ``[..., in]``."""
        return kernels.gather_rows(self.weight, cp.asarray(np.asarray(ids, dtype=np.int32)))


@dataclass
class GpuAttention:
    """Mirrors :class:`minimoe.model.Attention`: fused qkv, RoPE in place and the new k/v into the cache
    (one kernel, in place of ``KVCache.update``), attention, o_proj."""

    qkv: GpuLinear
    o: GpuLinear
    num_heads: int
    num_kv_heads: int
    head_dim: int

    def __call__(self, h, cos, sin, layer: int, cache, start: int, position=None):
        """h ``[B, T, H]`` -> ``[B, T, H]``; new keys/values go into ``cache`` when given.

        ``position`` (the CUDA-graph decode, :mod:`minimoe.gpu.decode`): ``start`` as a device int32 ``[1]``,
        which the kernels read instead, so one captured step serves every position.
        """
        batch, tokens, _ = h.shape
        rows = self.qkv(h.reshape(batch * tokens, -1))  # [B*T, (nh + 2 nkv) * D]: q heads, k heads, v heads
        if cache is not None:  # the cache's [B, nkv, capacity, D] buffers; Model.forward reserved the room
            keys, values = cache.keys[layer], cache.values[layer]
        else:
            keys, values = (cp.empty((batch, self.num_kv_heads, tokens, self.head_dim), dtype=cp.float32)
                            for _ in range(2))
        kernels.rope_store_kv(rows, cos, sin, keys, values, start, tokens, self.num_heads, self.num_kv_heads,
                              self.head_dim, position)
        end = keys.shape[2] if position is not None else start + tokens  # the device-side count bounds the graph's
        attended = kernels.causal_attention(rows, keys[:, :, :end], values[:, :, :end], tokens, self.num_heads,
                                            self.head_dim, start, position)
        return self.o(attended)


@dataclass
class GpuSwiGLU:
    """Mirrors :func:`minimoe.layers.swiglu`: ``down(silu(gate(x)) * up(x))`` with gate/up as one matmul
    (:func:`minimoe.gpu.kernels.swiglu`: the activation formed inside one of the two matmuls)."""

    gate_up: GpuLinear
    down: GpuLinear

    def __call__(self, h):
        """h ``[N, H]`` -> ``[N, H]``."""
        return kernels.swiglu(h, self.gate_up.weight, self.down.weight)


@dataclass
class GpuSparseMoe:
    """Mirrors :class:`minimoe.model.SparseMoeBlock`, with the residual add folded into the combine and the
    shared expert's gate stacked under the router (one matmul gives both).

    When the shared expert is a whole number S of experts wide (Qwen1.5-MoE's 5632 = 4 x 1408), it runs
    as S more experts, E .. E + S - 1, that every token uses: group E + s holds rows s*I .. (s+1)*I - 1
    of its gate and of its up projection and those columns of its down projection, so its output is
    the sum of the S groups' (a SwiGLU splits exactly along its intermediate axis).  Each token then
    has k + S slots, the S weighted by sigmoid(gate), and one grouped matmul runs all of them.
    Otherwise (``shared_groups`` 0) the shared expert runs on its own, as ``shared``.
    """

    router: GpuLinear  # [1, E + 1, H]: the router's E rows, then the shared expert gate's
    gate_up: GpuLinear  # [E + S, 2 * moe_intermediate, H]
    down: GpuLinear  # [E + S, H, moe_intermediate]
    shared: GpuSwiGLU | None  # the shared expert, when it is not in the groups
    shared_groups: int  # S
    top_k: int
    norm_topk_prob: bool

    def __call__(self, h, residual, layer: int, change: LayerInterventions = NO_INTERVENTIONS, record=None):
        """h, residual ``[N, H]`` -> ``residual + routed(h) + shared(h)`` ``[N, H]``."""
        tokens, groups = h.shape[0], self.shared_groups
        num_experts = self.gate_up.weight.shape[0] - groups  # the routed experts; the shared groups follow them
        logits = self.router(h)  # [N, E + 1]
        gate_logit = logits[:, num_experts]  # read in place by the route or the combine kernel
        top_k = change.top_k or self.top_k
        # A token picks an expert at most once, so no expert has more than N rows.  Decode
        # (N <= GEMV_MAX_ROWS) never leaves the device; prefill reads the counts once for the GEMM tiles.
        few = tokens <= launch.kernel_constants("matmul.cu")["GEMV_MAX_ROWS"]
        if change.forced is not None:  # forcing experts is an experiment, not a hot path: the reference router
            choice = with_shared_groups(layers.route(cp, logits[:, :num_experts], top_k, self.norm_topk_prob,
                                                     change.disabled, change.forced), gate_logit, num_experts, groups)
            plan = kernels.dispatch(choice.expert_ids, num_experts + groups)
        elif few:  # decode: the router's choice and the dispatch in one launch
            choice, plan = kernels.route_dispatch(logits, top_k, self.norm_topk_prob, change.disabled, num_experts,
                                                  groups)
        else:
            choice = kernels.route(logits, top_k, self.norm_topk_prob, change.disabled, num_experts, groups)
            plan = kernels.dispatch(choice.expert_ids, num_experts + groups)
        counts = None if few else cp.asnumpy(plan.counts)
        weights = choice.expert_weights  # [N, routed + S]
        routed_slots = weights.shape[1] - groups  # k, or as many experts as were forced
        if groups and not change.shared_expert:  # the shared groups still run, and count for nothing
            weights = weights.copy()
            weights[:, routed_slots:] = 0
        # Each expert reads its tokens straight from h (plan.rows); its output, and all that
        # follows, is in dispatch order [N*(k + S), ...]: each expert's rows contiguous.
        expert_out = kernels.swiglu(h, self.gate_up.weight, self.down.weight, plan.offsets, plan.active,
                                    plan.num_active, tokens, counts, x_rows=plan.rows)
        shared = self.shared(h) if self.shared is not None and change.shared_expert else None
        out = kernels.combine(expert_out, plan.inv_perm, weights, residual, shared,
                              None if shared is None else gate_logit)
        if record is not None:
            routed_weights = weights.copy()
            routed_weights[:, routed_slots:] = 0
            routed = kernels.combine(expert_out, plan.inv_perm, routed_weights)
            gate = layers.sigmoid(cp, gate_logit)
            if groups:
                shared_part = kernels.combine(expert_out, plan.inv_perm, weights - routed_weights)
            else:
                shared_part = cp.zeros_like(routed) if shared is None else shared * gate[:, None]
            routed_choice = layers.RouterChoice(choice.logits, choice.probs,
                                                *(field[:, :routed_slots] for field in choice[2:]))
            record(layer, **routed_choice.trace_fields() | dict(expert_ids=routed_choice.expert_ids.astype(cp.int64)),
                   shared_gate=gate, shared_norm=cp.linalg.norm(shared_part, axis=-1),
                   routed_norm=cp.linalg.norm(routed, axis=-1))
        return out


def with_shared_groups(choice: layers.RouterChoice, gate_logit, num_experts: int, groups: int) -> layers.RouterChoice:
    """``choice``'s ``[N, k]`` ids and weights followed by the shared expert's ``groups`` (ids E .., weight
    sigmoid(gate)): what the route kernels give, for a choice :func:`minimoe.layers.route` made."""
    if not groups:
        return choice
    tokens = choice.expert_ids.shape[0]
    ids = cp.broadcast_to(cp.arange(num_experts, num_experts + groups, dtype=cp.int32), (tokens, groups))
    gate = cp.broadcast_to(layers.sigmoid(cp, gate_logit)[:, None], (tokens, groups)).astype(cp.float32)
    return choice._replace(expert_ids=cp.concatenate([choice.expert_ids.astype(cp.int32), ids], axis=1),
                           raw_weights=cp.concatenate([choice.raw_weights, gate], axis=1),
                           expert_weights=cp.concatenate([choice.expert_weights, gate], axis=1))


@dataclass
class GpuDecoderLayer:
    """Mirrors :class:`minimoe.model.DecoderLayer` (same call signature, so :class:`Model` runs it)."""

    index: int
    input_norm: "cp.ndarray"
    post_attention_norm: "cp.ndarray"
    attention: GpuAttention
    mlp: GpuSwiGLU | GpuSparseMoe
    eps: float

    @property
    def is_sparse(self) -> bool:
        return isinstance(self.mlp, GpuSparseMoe)

    def __call__(self, xp, x, cos, sin, cache, start, interventions=None, record=None, position=None):
        """x ``[B, T, H]`` -> ``[B, T, H]``: attention then feed-forward, each added to the residual.
        ``position``: see :class:`GpuAttention`."""
        shape = x.shape
        h = kernels.rms_norm(x, self.input_norm, self.eps)
        attended = self.attention(h, cos, sin, self.index, cache, start, position)
        if record is not None:
            record(self.index, attention_norm=cp.linalg.norm(attended, axis=-1).reshape(-1))
        x, h = kernels.add_rms_norm(x, attended, self.post_attention_norm, self.eps)
        x, h = x.reshape(-1, shape[-1]), h.reshape(-1, shape[-1])
        if self.is_sparse:
            change = interventions.for_layer(self.index) if interventions else NO_INTERVENTIONS
            return self.mlp(h, x, self.index, change, record).reshape(shape)
        return (x + self.mlp(h)).reshape(shape)


class GpuModel(Model):
    """A :class:`minimoe.model.Model` whose layers run on the GPU.

    ``forward`` returns CuPy logits (``minimoe.to_numpy(logits)`` for NumPy); routing
    traces are recorded as NumPy arrays, so traces, analyses and generation work unchanged.
    """

    def forward(self, ids, cache=None, *, record=None, **interventions):
        host_record = None
        if record is not None:
            def host_record(layer, **arrays):
                record(layer, **{name: to_numpy(array) for name, array in arrays.items()})
        return super().forward(ids, cache, record=host_record, **interventions)

    __call__ = forward

    def step_through(self, ids, layer: int, position: int = -1):
        raise MinimoeError("step_through runs on the numpy backend: load the model with minimoe.load(path) to walk a layer")


def build(config: ModelConfig, checkpoint: Checkpoint) -> GpuModel:
    """The GPU model of a checked checkpoint (the cupy counterpart of :func:`minimoe.model._build`)."""
    model = build_from(config, lambda name: device_weight(checkpoint.array(name)))
    model.checkpoint = checkpoint
    return model


def build_from(config: ModelConfig, tensor) -> GpuModel:
    """The GPU model whose weights ``tensor(name)`` gives: a device array of the checkpoint tensor's shape,
    uint16 bf16 bits or float32 (:func:`device_weight` of a stored tensor; random ones for a benchmark)."""
    def small(name):  # norms and biases: float32 vectors
        values = tensor(name)
        return upcast(values) if values.dtype == cp.uint16 else values.astype(cp.float32)

    def linear(name) -> GpuLinear:
        return GpuLinear.stacked([[tensor(name)]])

    def swiglu(prefix) -> GpuSwiGLU:
        names = weights.swiglu_names(prefix)
        return GpuSwiGLU(GpuLinear.stacked([[tensor(names["gate"]), tensor(names["up"])]]), linear(names["down"]))

    def attention(layer) -> GpuAttention:
        n = weights.attention_names(layer)
        biases = [small(n[f"{key}_bias"]) for key in "qkv"] if config.qkv_bias else None
        return GpuAttention(
            qkv=GpuLinear.stacked([[tensor(n["q_weight"]), tensor(n["k_weight"]), tensor(n["v_weight"])]], biases),
            o=linear(n["o_weight"]),
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            head_dim=config.head_dim,
        )

    def feed_forward(layer):
        if not config.is_sparse_layer(layer):
            return swiglu(weights.dense_mlp_prefix(layer))
        inter, shared_inter = config.moe_intermediate_size, config.shared_expert_intermediate_size
        groups = shared_inter // inter if shared_inter % inter == 0 else 0  # the shared expert as always-on experts
        experts = [weights.swiglu_names(weights.expert_prefix(layer, e)) for e in range(config.num_experts)]
        gate_up = [[tensor(names["gate"]), tensor(names["up"])] for names in experts]
        down = [[tensor(names["down"])] for names in experts]
        shared_names = weights.swiglu_names(weights.shared_expert_prefix(layer))
        if groups:
            gate, up, shared_down = (tensor(shared_names[key]) for key in ("gate", "up", "down"))
            cuts = [slice(s * inter, (s + 1) * inter) for s in range(groups)]
            gate_up += [[gate[cut], up[cut]] for cut in cuts]
            down += [[shared_down[:, cut]] for cut in cuts]
        return GpuSparseMoe(
            router=GpuLinear.stacked([[tensor(weights.router_name(layer)),
                                       tensor(weights.shared_expert_gate_name(layer))]]),
            gate_up=GpuLinear.stacked(gate_up),
            down=GpuLinear.stacked(down),
            shared=None if groups else swiglu(weights.shared_expert_prefix(layer)),
            shared_groups=groups,
            top_k=config.num_experts_per_tok,
            norm_topk_prob=config.norm_topk_prob,
        )

    launch.check_model(config)  # before copying gigabytes to the GPU
    decoder = []
    for layer in range(config.num_hidden_layers):
        norms = weights.norm_names(layer)
        decoder.append(GpuDecoderLayer(layer, small(norms["input"]), small(norms["post_attention"]), attention(layer),
                                       feed_forward(layer), config.rms_norm_eps))
    embed = linear(weights.EMBED)
    lm_head = embed if config.tie_word_embeddings else linear(weights.LM_HEAD)
    return GpuModel(config, embed, decoder, small(weights.FINAL_NORM), lm_head, None, "cupy", cp)


def upcast(bits):
    """bf16 bit patterns (uint16) as float32, on the device: a bf16 is the top half of a float32."""
    return (bits.astype(cp.uint32) << 16).view(cp.float32)
