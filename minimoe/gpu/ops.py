"""The GPU's table of operations: each operation of :class:`minimoe.ops.Operations` computed by CUDA kernels.

:mod:`minimoe.model` composes the model from the same operations on every backend; this class
replaces the reference's NumPy-style code with the kernels of :mod:`minimoe.gpu.kernels`
(``backend="cupy"``).  Its weights live on the GPU, copied once at load, bf16 kept as bf16 (uint16
bit patterns, half the bytes of float32; the matmul kernels upcast as they read), f16 and f32
checkpoints (the test fixtures) as float32.  Matrices that read the same input are *stacked*
so that one launch reads them all, and each block's projections are views into the stack:
q/k/v in one weight, each SwiGLU's gate and up in one, the router and the shared expert's gate
in one, and a sparse layer's experts in ``[E, out, in]`` tensors the grouped matmuls index by
expert.  When the shared expert is a whole number S of experts wide (Qwen1.5-MoE's 5632 =
4 x 1408), it joins them as S more groups, E .. E + S - 1, that every token uses, weighted by
sigmoid(its gate): a SwiGLU splits exactly along its intermediate axis, so its output is the sum
of the S groups', and one grouped matmul runs every expert a token uses.

Which kernel replaces what (``python -m minimoe.gpu_check`` holds each to the reference):

=================== ==================================================================================
operation           kernels
=================== ==================================================================================
projections         ``gemv*_grouped`` (a decode step's few rows), ``gemm_grouped`` (prefill)
``embed``           ``gather_rows``
``rms_norm``        ``rms_norm``; ``add_rms_norm`` for the residual add fused with the next norm
``attention_inputs`` the stacked q/k/v projection, then ``rope_store_kv`` (RoPE in place, k/v into the cache)
``attention``       ``attention_prefill``, or ``attention_decode`` (+ ``attention_decode_merge``)
``swiglu``          ``gemv*_glu`` (silu(gate) * up written by the gate/up matmul), or ``gemm_*_swiglu``
``route``           the stacked router matmul, then ``route_dispatch`` (a few tokens) or ``route_topk``
                    and ``moe_dispatch``
``routed_experts``  the experts' grouped gate/up and down matmuls, over the dispatch's groups
``shared_expert``   among the experts' groups, or its own ``swiglu``
``moe_output``      ``moe_combine``: the weighted experts, the gated shared expert and the residual
=================== ==================================================================================
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import NamedTuple

import cupy as cp
import numpy as np

from .. import layers
from ..config import ModelConfig
from ..errors import MinimoeError
from ..ops import Operations
from . import kernels, launch


def device_weight(array):
    """A weight on the GPU in the dtype the kernels read: bf16 stays bf16 (uint16 bit patterns), anything else
    becomes float32.  ``array``: a stored (host) tensor, or one already on the device (bf16 bits or float32)."""
    if array.dtype.name == "bfloat16":  # a stored tensor (ml_dtypes' bfloat16, on the host)
        return cp.asarray(np.ascontiguousarray(array).view(np.uint16))
    if isinstance(array, cp.ndarray):  # made on the device: bf16 bits, or float32
        return array if array.dtype in (cp.uint16, cp.float32) else array.astype(cp.float32)
    return cp.asarray(np.asarray(array, dtype=np.float32))


def upcast(bits):
    """bf16 bit patterns (uint16) as float32, on the device: a bf16 is the top half of a float32."""
    return (bits.astype(cp.uint32) << 16).view(cp.float32)


class GpuLinear:
    """``y = x @ W.T (+ b)`` on the GPU: the projection of the cupy backend.

    ``weight`` is ``[G, out, in]``: G = 1 for a projection, G = experts for a layer's stacked
    experts (called through :func:`minimoe.gpu.kernels.grouped_matmul`).  A projection that is
    part of a stack (q of q/k/v, an expert's gate) has ``weight`` a view into it, and ``stacked``
    the :class:`GpuLinear` of the whole stack, which the operations launch once for all its parts.
    """

    def __init__(self, weight, bias=None, stacked: "GpuLinear | None" = None):
        self.weight = weight  # [G, out, in] uint16 (bf16 bits) or float32
        self.bias = bias  # [out] float32 or None
        self.stacked = stacked

    @classmethod
    def stack(cls, groups: list[list], biases: list | None = None) -> "GpuLinear":
        """One weight from matrices: ``groups[g]`` are stacked along the output axis into group g (host or device
        arrays, each copied into place, bf16 kept as bf16)."""
        first = device_weight(groups[0][0])
        out = sum(m.shape[0] for m in groups[0])
        weight = cp.empty((len(groups), out, first.shape[1]), dtype=first.dtype)
        for g, matrices in enumerate(groups):
            row = 0
            for matrix in matrices:
                weight[g, row : row + matrix.shape[0]] = device_weight(matrix)
                row += matrix.shape[0]
        bias = None if biases is None else cp.concatenate([vector(b) for b in biases])
        return cls(weight, bias)

    def part(self, rows: slice, groups: slice = slice(0, 1)) -> "GpuLinear":
        """The projection of output rows ``rows`` of groups ``groups`` of this stack (a view, and its bias)."""
        bias = None if self.bias is None else self.bias[rows]
        return GpuLinear(self.weight[groups, rows], bias, stacked=self)

    @property
    def shape(self) -> tuple[int, int]:
        """``(out_features, in_features)`` of one group."""
        return self.weight.shape[1:]

    def __call__(self, x):
        """x ``[..., in]`` float32 -> ``[..., out]`` float32."""
        flat = x.reshape(-1, x.shape[-1])
        y = kernels.grouped_matmul(flat, self.weight, self.bias, None, None, None, max_rows_per_group=flat.shape[0])
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def rows(self, ids):
        """Rows ``W[ids]`` as float32 (the embedding lookup): ids ``[...]``, on the host or the device -> ``[..., in]``."""
        ids = ids if isinstance(ids, cp.ndarray) else cp.asarray(np.asarray(ids, dtype=np.int32))
        return kernels.gather_rows(self.weight, ids.astype(cp.int32, copy=False))


def vector(values):
    """A norm's weight or a bias as float32 on the device ``[n]`` (bf16 bits upcast)."""
    values = device_weight(values)
    return upcast(values) if values.dtype == cp.uint16 else values


class QueryRows(NamedTuple):
    """The queries of :meth:`KernelOperations.attention_inputs`: the fused q/k/v projection's rows
    ``[B * T, (nh + 2 nkv) * D]``, whose first ``nh * D`` floats the attention kernels read in place."""

    rows: "cp.ndarray"
    tokens: int
    heads: int
    head_dim: int


@dataclass
class DeviceChoice:
    """The router's choice on the GPU: what :func:`minimoe.layers.route` gives, and what the kernels after it need.

    ``weights`` ``[N, k + S]`` scale each of a token's slots (its k experts, then the shared expert's S
    groups); ``plan`` groups the slots by expert; ``counts`` (host, prefill only) sizes the GEMM's tiles.
    """

    choice: layers.RouterChoice  # its [N, k] columns: the routed experts
    weights: "cp.ndarray"
    plan: kernels.DevicePlan
    gate_logit: "cp.ndarray | None"  # [N], the shared expert gate's logit, a column of the stacked router output
    counts: np.ndarray | None
    shared_groups: int

    def trace_fields(self) -> dict:
        return self.choice.trace_fields() | {"expert_ids": self.choice.expert_ids.astype(cp.int64)}


class KernelOperations(Operations):
    """:class:`minimoe.ops.Operations` with every operation a CUDA kernel (``backend="cupy"``).

    ``position``: a device int32 ``[1]`` holding the new token's position, read by the RoPE and
    decode-attention kernels instead of the host's ``start`` -- the CUDA-graph decoder's operations
    (:mod:`minimoe.gpu.decode`), so that one captured step serves every position.
    """

    def __init__(self, position=None):
        super().__init__(cp)
        self.name = "cupy"
        self.position = position

    def check_model(self, config: ModelConfig) -> None:
        """MinimoeError, before any weight is copied, for a model the kernels cannot run."""
        if config.model_type not in launch.GPU_MODEL_TYPES:
            raise MinimoeError(f"backend 'cupy' runs {' and '.join(launch.GPU_MODEL_TYPES)} models; "
                               f"{config.model_type} ({config.family.architecture}) runs on backend='numpy'")
        launch.check_model(config)

    # --- weights, stacked -------------------------------------------------------------------------------

    def linear(self, weight, bias=None):
        return GpuLinear.stack([[weight]], None if bias is None else [bias])

    def vector(self, values):
        return vector(values)

    def attention_weights(self, q, k, v, o, biases=None) -> tuple:
        qkv = GpuLinear.stack([[q, k, v]], biases)
        bounds = np.cumsum([0, q.shape[0], k.shape[0], v.shape[0]])
        return (*(qkv.part(slice(a, b)) for a, b in zip(bounds[:-1], bounds[1:])), self.linear(o))

    def swiglu_weights(self, gate, up, down) -> tuple:
        gate_up = GpuLinear.stack([[gate, up]])
        inter = gate.shape[0]
        return gate_up.part(slice(0, inter)), gate_up.part(slice(inter, 2 * inter)), self.linear(down)

    def moe_weights(self, router, experts, shared_gate=None, shared=None) -> tuple:
        """The router with the shared expert's gate stacked under it; the experts stacked by group, the shared
        expert among them when it is a whole number of experts wide (else on its own)."""
        num_experts, inter = len(experts), experts[0][0].shape[0]
        stacked_router = GpuLinear.stack([[router] + ([] if shared_gate is None else [shared_gate])])
        router_part = stacked_router.part(slice(0, num_experts))
        gate_part = None if shared_gate is None else stacked_router.part(slice(num_experts, num_experts + 1))
        groups = shared[0].shape[0] // inter if shared is not None and shared[0].shape[0] % inter == 0 else 0
        gate_up = [[gate, up] for gate, up, _ in experts]
        down = [[d] for _, _, d in experts]
        if groups:  # group E + s: rows s*I .. (s+1)*I - 1 of the shared gate and up, those columns of its down
            cuts = [slice(s * inter, (s + 1) * inter) for s in range(groups)]
            gate_up += [[shared[0][cut], shared[1][cut]] for cut in cuts]
            down += [[shared[2][:, cut]] for cut in cuts]
        gate_up, down = GpuLinear.stack(gate_up), GpuLinear.stack(down)

        def expert(groups_: slice) -> tuple:
            return gate_up.part(slice(0, inter), groups_), gate_up.part(slice(inter, 2 * inter), groups_), \
                down.part(slice(None), groups_)

        expert_parts = [expert(slice(e, e + 1)) for e in range(num_experts)]
        if groups:
            shared_parts = expert(slice(num_experts, num_experts + groups))  # views of its groups, run among the experts
        else:
            shared_parts = None if shared is None else self.swiglu_weights(*shared)
        return router_part, expert_parts, gate_part, shared_parts

    # --- a forward pass ---------------------------------------------------------------------------------

    def forward_context(self):
        return contextlib.nullcontext()

    def embed(self, embedding, ids):
        return embedding.rows(ids)

    def rms_norm(self, x, weight, eps: float):
        return kernels.rms_norm(x, weight, eps)

    def add_rms_norm(self, x, delta, weight, eps: float):
        return kernels.add_rms_norm(x, delta, weight, eps)

    def attention_inputs(self, attention, h, cos, sin, cache, layer: int, start: int):
        """The stacked q/k/v projection, then ``rope_store_kv``: RoPE on q and k in place and the new keys and values
        into the cache's ``[B, nkv, capacity, D]`` buffers (fresh ones without a cache) -> (:class:`QueryRows`,
        keys, values) for :meth:`attention`."""
        batch, tokens, _ = h.shape
        heads, kv_heads, head_dim = attention.num_heads, attention.num_kv_heads, attention.head_dim
        rows = attention.q.stacked(h.reshape(batch * tokens, -1))  # [B*T, (nh + 2 nkv) * D]: q heads, k heads, v heads
        if cache is not None:  # Model.forward reserved the room
            keys, values = cache.keys[layer], cache.values[layer]
        else:
            keys, values = (cp.empty((batch, kv_heads, tokens, head_dim), dtype=cp.float32) for _ in range(2))
        kernels.rope_store_kv(rows, cos, sin, keys, values, start, tokens, heads, kv_heads, head_dim, self.position)
        end = keys.shape[2] if self.position is not None else start + tokens  # the device-side position bounds a graph's
        return QueryRows(rows, tokens, heads, head_dim), keys[:, :, :end], values[:, :, :end]

    def attention(self, q, k, v, start: int):
        return kernels.causal_attention(q.rows, k, v, q.tokens, q.heads, q.head_dim, start, self.position)

    def swiglu(self, mlp, h):
        """The MLP's gate and up in one stacked weight: :func:`minimoe.gpu.kernels.swiglu`."""
        flat = h.reshape(-1, h.shape[-1])
        return kernels.swiglu(flat, mlp.gate.stacked.weight, mlp.down.weight).reshape(*h.shape[:-1], -1)

    def route(self, moe, h, change):
        tokens = h.shape[0]
        experts, gate_up = len(moe.experts), moe.experts[0].gate.stacked
        groups = gate_up.weight.shape[0] - experts  # the shared expert's, after the routed experts
        logits = moe.router.stacked(h)  # [N, E + 1]: the router's logits, then the shared expert gate's
        gate_logit = logits[:, experts] if moe.shared_gate is not None else None
        top_k = change.top_k or moe.top_k
        # A token picks an expert at most once, so no expert has more than N rows.  Decode
        # (N <= GEMV_MAX_ROWS) never leaves the device; prefill reads the counts once for the GEMM tiles.
        few = tokens <= launch.kernel_constants("matmul.cu")["GEMV_MAX_ROWS"]
        if change.forced is not None:  # forcing experts is an experiment, not a hot path: the reference router
            routed = layers.route(cp, logits[:, :experts], top_k, moe.norm_topk_prob, change.disabled, change.forced)
            choice = with_shared_groups(routed, gate_logit, experts, groups)
            plan = kernels.dispatch(choice.expert_ids, experts + groups)
        elif few:  # decode: the router's choice and the dispatch in one launch
            choice, plan = kernels.route_dispatch(logits, top_k, moe.norm_topk_prob, change.disabled, experts, groups)
        else:
            choice = kernels.route(logits, top_k, moe.norm_topk_prob, change.disabled, experts, groups)
            plan = kernels.dispatch(choice.expert_ids, experts + groups)
        weights = choice.expert_weights  # [N, routed + S]
        routed_slots = weights.shape[1] - groups  # k, or as many experts as were forced
        if groups and not change.shared_expert:  # the shared groups still run, and count for nothing
            weights = weights.copy()
            weights[:, routed_slots:] = 0
        columns = layers.RouterChoice(choice.logits, choice.probs, *(field[:, :routed_slots] for field in choice[2:]))
        return DeviceChoice(columns, weights, plan, gate_logit, None if few else cp.asnumpy(plan.counts), groups)

    def routed_experts(self, moe, h, choice: DeviceChoice):
        """Every expert a token uses (the shared expert's groups too), each on its own tokens: the grouped SwiGLU
        over the dispatch's groups -> ``[N * (k + S), H]`` in dispatch order (each expert's rows contiguous)."""
        first = moe.experts[0]
        plan = choice.plan
        return kernels.swiglu(h, first.gate.stacked.weight, first.down.stacked.weight, plan.offsets, plan.active,
                              plan.num_active, h.shape[0], choice.counts, x_rows=plan.rows)

    def shared_expert(self, moe, h, choice: DeviceChoice, on: bool):
        """(its output ``[N, H]``, None): gated in :meth:`moe_output`; (None, None) when it ran among the experts'
        groups (or is switched off)."""
        if choice.shared_groups or moe.shared is None or not on:
            return None, None
        return self.swiglu(moe.shared, h), None

    def moe_output(self, residual, routed, shared, choice: DeviceChoice):
        """``moe_combine``: each token's weighted slots, the gated shared expert and the residual, in one pass."""
        output = shared[0]
        return kernels.combine(routed, choice.plan.inv_perm, choice.weights, residual, output,
                               None if output is None else choice.gate_logit)

    def moe_parts(self, routed, shared, choice: DeviceChoice) -> tuple:
        """(routed ``[N, H]``, shared ``[N, H]``, its gate ``[N]``), for a trace: the combine run once for each part."""
        routed_weights = choice.weights.copy()
        routed_weights[:, choice.weights.shape[1] - choice.shared_groups:] = 0
        routed_part = kernels.combine(routed, choice.plan.inv_perm, routed_weights)
        gate = layers.sigmoid(cp, choice.gate_logit) if choice.gate_logit is not None \
            else cp.zeros(len(routed_part), dtype=cp.float32)
        if choice.shared_groups:
            shared_part = kernels.combine(routed, choice.plan.inv_perm, choice.weights - routed_weights)
        elif shared[0] is None:
            shared_part = cp.zeros_like(routed_part)
        else:
            shared_part = shared[0] * gate[:, None]
        return routed_part, shared_part, gate

    def map(self, function, items) -> list:
        return [function(item) for item in items]


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
