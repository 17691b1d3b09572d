"""Routing traces: what the router did, token by token and layer by layer.

A :class:`RoutingTrace` holds, for one sequence of ``T`` tokens through a model with
``S`` sparse layers (of ``L`` decoder layers), ``E`` routed experts and ``k`` chosen per
token, everything needed to study the routing:

==================== ============= ==========================================================
field                shape         meaning
==================== ============= ==========================================================
``token_ids``        ``[T]``       the tokens, in order
``positions``        ``[T]``       their positions in the sequence (they continue a cache)
``layers``           ``[S]``       decoder-layer index of each sparse layer
``router_logits``    ``[S, T, E]`` ``h @ gate.T``; a disabled expert's logit is ``-inf``
``router_probs``     ``[S, T, E]`` softmax over all (enabled) experts
``expert_ids``       ``[S, T, k]`` the chosen experts, highest probability first
``raw_weights``      ``[S, T, k]`` their router probabilities (before ``norm_topk_prob``)
``expert_weights``   ``[S, T, k]`` the weights the experts' outputs are scaled by
``shared_gate``      ``[S, T]``    ``sigmoid(h @ shared_expert_gate.T)``, the shared expert's scale
``attention_norm``   ``[L, T]``    L2 norm of what attention adds to the residual stream
``shared_norm``      ``[S, T]``    L2 norm of what the gated shared expert adds
``routed_norm``      ``[S, T]``    L2 norm of what the routed experts add (weighted sum)
``logits``           ``[T, V]``    the model's output logits
==================== ============= ==========================================================

plus ``num_experts`` (E), ``top_k`` (k as run, after any intervention), ``routing_rule``
(the model's gating rule in words: how many experts, top-k, renormalised or not, a shared
expert or none; families differ, see :data:`minimoe.config.FAMILIES`) and, when a
tokenizer was given, ``tokens``: each token's text.  Traces of consecutive pieces of
one sequence (a prompt, then generated tokens through the cache) join with
:meth:`RoutingTrace.concat`; a text longer than the model's context is traced window
by window and joined that way (:mod:`minimoe.windows`; such a trace keeps an empty
``[T, 0]`` logits array).  When an intervention gave layers different k
(``top_k={layer: k}``, ``forced_experts``), the k axis has the largest k and the
other layers are padded with expert ``-1`` and weight ``0``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from .errors import MinimoeError

ARRAY_FIELDS = ("token_ids", "positions", "layers", "router_logits", "router_probs", "expert_ids", "raw_weights",
                "expert_weights", "shared_gate", "attention_norm", "shared_norm", "routed_norm", "logits")
# The recorder's key for model-level arrays (token ids, positions, logits), beside the layer indices.
OUTPUT = -1
# Fields whose token axis is not the first one (it is axis 1 for per-layer arrays).
TOKEN_AXIS = {"token_ids": 0, "positions": 0, "logits": 0, "layers": None}


@dataclass
class RoutingTrace:
    token_ids: np.ndarray
    positions: np.ndarray
    layers: np.ndarray
    router_logits: np.ndarray
    router_probs: np.ndarray
    expert_ids: np.ndarray
    raw_weights: np.ndarray
    expert_weights: np.ndarray
    shared_gate: np.ndarray
    attention_norm: np.ndarray
    shared_norm: np.ndarray
    routed_norm: np.ndarray
    logits: np.ndarray
    num_experts: int
    top_k: int
    tokens: list[str] | None = field(default=None)
    routing_rule: str = ""  # the gating rule that produced it, e.g. "softmax over 60 experts, top-4, ..."

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    def layer_index(self, layer: int) -> int:
        """Position of decoder layer ``layer`` among the sparse layers (the S axis)."""
        matches = np.flatnonzero(self.layers == layer)
        if matches.size == 0:
            raise MinimoeError(f"layer {layer} is not a sparse layer of this trace (sparse layers: {self.layers.tolist()})")
        return int(matches[0])

    @classmethod
    def from_recorder(cls, recorder: "Recorder", config, tokenizer=None) -> "RoutingTrace":
        """Assemble a trace from what a :class:`Recorder` collected during one or more forwards."""
        sparse = config.sparse_layers
        if not sparse:
            raise MinimoeError("this model has no sparse layers: there is no routing to trace")
        per_layer = {name: recorder.stacked(name, sparse) for name in (
            "router_logits", "router_probs", "shared_gate", "shared_norm", "routed_norm")}
        # Interventions may give layers different k: pad with expert -1 and weight 0 to the largest.
        per_layer["expert_ids"] = recorder.stacked("expert_ids", sparse, fill=-1)
        per_layer["raw_weights"] = recorder.stacked("raw_weights", sparse, fill=0.0)
        per_layer["expert_weights"] = recorder.stacked("expert_weights", sparse, fill=0.0)
        token_ids = recorder.joined("token_ids", OUTPUT)
        return cls(
            token_ids=token_ids,
            positions=recorder.joined("positions", OUTPUT),
            layers=np.array(sparse),
            attention_norm=recorder.stacked("attention_norm", range(config.num_hidden_layers)),
            logits=recorder.joined("logits", OUTPUT),
            num_experts=config.num_experts,
            top_k=int(per_layer["expert_ids"].shape[2]),
            tokens=None if tokenizer is None else [tokenizer.decode([int(t)]) for t in token_ids],
            routing_rule=config.routing_rule,
            **per_layer,
        )

    # --- joining and slicing ---------------------------------------------------------

    @classmethod
    def concat(cls, traces: Sequence["RoutingTrace"]) -> "RoutingTrace":
        """One trace from consecutive pieces of the same sequence (joined along the token axis)."""
        if not traces:
            raise MinimoeError("concat needs at least one trace")
        if len(traces) == 1:  # nothing to join: no copy of its (possibly [T, vocab]) arrays
            return traces[0]
        first = traces[0]
        for other in traces[1:]:
            if (not np.array_equal(other.layers, first.layers) or other.num_experts != first.num_experts
                    or other.routing_rule != first.routing_rule):
                raise MinimoeError("traces to concat must come from the same model")
        joined = {}
        for name in ARRAY_FIELDS:
            axis = TOKEN_AXIS.get(name, 1)
            values = [getattr(t, name) for t in traces]
            joined[name] = values[0] if axis is None else np.concatenate(values, axis=axis)
        tokens = None if any(t.tokens is None for t in traces) else [s for t in traces for s in t.tokens]
        top_k = first.top_k if all(t.top_k == first.top_k for t in traces) else max(t.top_k for t in traces)
        return replace(first, **joined, top_k=top_k, tokens=tokens)

    def first(self, count: int) -> "RoutingTrace":
        """The trace of the first ``count`` tokens (this trace itself if it is no longer)."""
        return self if self.num_tokens <= count else self.select(0, count)

    def select(self, start: int, stop: int | None = None) -> "RoutingTrace":
        """The trace of tokens ``start .. stop - 1`` (Python slice rules; views, not copies)."""
        cut = {}
        for name in ARRAY_FIELDS:
            axis = TOKEN_AXIS.get(name, 1)
            value = getattr(self, name)
            cut[name] = value if axis is None else value[(slice(None),) * axis + (slice(start, stop),)]
        tokens = None if self.tokens is None else self.tokens[start:stop]
        return replace(self, **cut, tokens=tokens)

    def shifted(self, offset: int) -> "RoutingTrace":
        """The same trace with ``offset`` added to its positions (a window's positions become the text's)."""
        return replace(self, positions=self.positions + offset)

    def without_logits(self) -> "RoutingTrace":
        """The same trace with an empty ``[T, 0]`` logits array (the ``[T, vocab]`` one is large)."""
        return replace(self, logits=np.zeros((self.num_tokens, 0), dtype=np.float32))

    # --- export ----------------------------------------------------------------------

    def metadata(self) -> dict[str, Any]:
        """The trace's fields that are not arrays."""
        return {"num_experts": self.num_experts, "top_k": self.top_k, "tokens": self.tokens,
                "routing_rule": self.routing_rule}

    def save_npz(self, path: str | Path, include_logits: bool = True) -> None:
        """All arrays plus metadata in one ``.npz`` (no pickles: plain numeric arrays and a JSON string).

        ``include_logits=False`` leaves out the ``[T, vocab]`` logits (for Qwen1.5-MoE, 0.6 MB a
        token); such a file loads back with an empty ``[T, 0]`` logits array.
        """
        trace = self if include_logits else self.without_logits()
        arrays = {name: getattr(trace, name) for name in ARRAY_FIELDS}
        np.savez_compressed(path, **arrays, meta=np.array(json.dumps(self.metadata())))

    @classmethod
    def load_npz(cls, path: str | Path) -> "RoutingTrace":
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {name: data[name] for name in ARRAY_FIELDS}
                meta = json.loads(str(data["meta"]))
        except (OSError, KeyError, ValueError) as exc:
            raise MinimoeError(f"{path}: not a minimoe routing trace ({exc})") from None
        return cls(**arrays, num_experts=meta["num_experts"], top_k=meta["top_k"], tokens=meta["tokens"],
                   routing_rule=meta.get("routing_rule", ""))

    def to_json(self, path: str | Path | None = None, include_logits: bool = False) -> dict[str, Any]:
        """A JSON-ready dict of the trace (logits left out unless asked: they are large); written if ``path``."""
        data = {name: getattr(self, name).tolist() for name in ARRAY_FIELDS if include_logits or name != "logits"}
        data = _finite(data)
        data.update(self.metadata())
        if path is not None:
            Path(path).write_text(json.dumps(data))
        return data

    def rows(self) -> list[dict[str, Any]]:
        """The tidy table: one row per token x sparse layer x chosen expert."""
        return list(self.iter_rows())

    def iter_rows(self) -> Iterator[dict[str, Any]]:
        """:meth:`rows` one at a time (a long text's table need not be in memory at once)."""
        for s, layer in enumerate(self.layers.tolist()):
            for t in range(self.num_tokens):
                for rank in range(self.expert_ids.shape[2]):
                    yield {
                        "position": int(self.positions[t]), "token_id": int(self.token_ids[t]),
                        "token": None if self.tokens is None else self.tokens[t],
                        "layer": layer, "rank": rank, "expert": int(self.expert_ids[s, t, rank]),
                        "weight": float(self.expert_weights[s, t, rank]),
                        "probability": float(self.raw_weights[s, t, rank]),
                        "shared_gate": float(self.shared_gate[s, t]),
                    }

    def to_dataframe(self):
        """:meth:`rows` as a pandas DataFrame (pandas is optional: install it to use this)."""
        try:
            import pandas
        except ImportError:
            raise MinimoeError("to_dataframe needs pandas (pip install pandas); rows() gives the same table") from None
        return pandas.DataFrame(self.rows())

    def write_csv(self, path: str | Path) -> None:
        """:meth:`rows` as CSV, which pandas, R or a spreadsheet reads."""
        import csv

        rows = self.iter_rows()
        first = next(rows, None)
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(first) if first else ["position"])
            writer.writeheader()
            if first:
                writer.writerow(first)
                writer.writerows(rows)


def _finite(value):
    """JSON has no -inf: disabled experts' logits become None."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value



# --- interventions -------------------------------------------------------------------------

@dataclass(frozen=True)
class LayerInterventions:
    """What to change in one sparse layer's routing (see :class:`Interventions`)."""

    disabled: tuple[int, ...] = ()
    forced: tuple[int, ...] | None = None
    top_k: int | None = None
    shared_expert: bool = True


@dataclass(frozen=True)
class Interventions:
    """Changes to the routing, as keyword arguments of ``Model.forward``/``Model.trace``.

    * ``disabled_experts={layer: [expert, ...]}``: those experts are removed from the
      router of that decoder layer (logit -inf before the softmax), as if it never had them;
    * ``forced_experts={layer: [expert, ...]}``: every token in that layer uses exactly
      these experts, weighted by their router probabilities;
    * ``top_k``: how many experts each token uses, for all sparse layers (an int) or per
      layer (``{layer: k}``);
    * ``shared_expert=False``: the shared expert is switched off in every sparse layer
      (or pass a collection of decoder layers to switch it off only there).
    """

    disabled_experts: dict[int, tuple[int, ...]] = field(default_factory=dict)
    forced_experts: dict[int, tuple[int, ...]] = field(default_factory=dict)
    top_k: int | dict[int, int] | None = None
    shared_expert: bool | frozenset[int] = True  # after build(): a bool, or the layers where it stays on

    @classmethod
    def build(cls, config, disabled_experts=None, forced_experts=None, top_k=None, shared_expert=True) -> "Interventions":
        """Validated interventions for a model ``config``; bad layers, experts or k raise MinimoeError."""
        sparse = set(config.sparse_layers)

        def layers_of(name: str, mapping) -> dict[int, tuple[int, ...]]:
            result = {}
            for layer, experts in (mapping or {}).items():
                if layer not in sparse:
                    raise MinimoeError(f"{name}: layer {layer} is not a sparse layer (sparse layers: {sorted(sparse)})")
                experts = tuple(int(e) for e in experts)
                bad = [e for e in experts if not 0 <= e < config.num_experts]
                if bad:
                    raise MinimoeError(f"{name}: expert {bad[0]} in layer {layer} is outside [0, {config.num_experts})")
                if len(set(experts)) != len(experts):
                    raise MinimoeError(f"{name}: layer {layer} lists an expert twice: {list(experts)}")
                result[int(layer)] = experts
            return result

        disabled = layers_of("disabled_experts", disabled_experts)
        forced = layers_of("forced_experts", forced_experts)
        for layer, experts in forced.items():
            if set(experts) & set(disabled.get(layer, ())):
                raise MinimoeError(f"forced_experts: layer {layer} forces an expert it also disables")
            if not experts:
                raise MinimoeError(f"forced_experts: layer {layer} forces no experts")
        ks = top_k if isinstance(top_k, dict) else {layer: top_k for layer in sparse} if top_k is not None else {}
        for layer, k in ks.items():
            if layer not in sparse:
                raise MinimoeError(f"top_k: layer {layer} is not a sparse layer")
            enabled = config.num_experts - len(disabled.get(layer, ()))
            if not (isinstance(k, int) and 1 <= k <= enabled):
                raise MinimoeError(f"top_k: {k!r} for layer {layer} must be an integer in [1, {enabled}]")
        for layer, experts in disabled.items():
            if layer not in forced:  # forced experts are never disabled, so those layers always have them
                _check_enough_left(layer, config.num_experts - len(experts), config.num_experts,
                                   ks.get(layer, config.num_experts_per_tok))
        if not isinstance(shared_expert, bool):
            shared_expert = frozenset(layer for layer in sparse if layer not in set(shared_expert))
        return cls(disabled, forced, ks or None, shared_expert)

    def for_layer(self, layer: int) -> LayerInterventions:
        shared = self.shared_expert if isinstance(self.shared_expert, bool) else layer in self.shared_expert
        k = self.top_k.get(layer) if isinstance(self.top_k, dict) else self.top_k
        return LayerInterventions(self.disabled_experts.get(layer, ()), self.forced_experts.get(layer), k, shared)


def _check_enough_left(layer: int, enabled: int, num_experts: int, k: int) -> None:
    """MinimoeError unless ``enabled`` experts leave a token its ``k`` to choose.

    With none left the router's softmax is 0/0 (NaN logits); with fewer than k, top-k
    would "choose" disabled experts with weight 0.  Neither is silently patched over:
    to run a layer with fewer experts per token, say so with ``top_k={layer: n}``.
    """
    if enabled == 0:
        raise MinimoeError(f"disabled_experts: layer {layer} disables all {num_experts} experts, 0 remain: "
                           "its tokens would have no expert to route to")
    if enabled < k:
        raise MinimoeError(f"disabled_experts: layer {layer} leaves {enabled} of {num_experts} experts, fewer than "
                           f"the {k} each token uses: disable fewer, or pass top_k={{{layer}: {enabled}}} too")


NO_INTERVENTIONS = LayerInterventions()


# --- recording a forward pass ---------------------------------------------------------------

class Recorder:
    """Collects named per-layer arrays as a forward pass runs (the raw material of a trace).

    Layers call ``recorder(layer, name=array, ...)``; repeated calls (decoding token by
    token through a cache) append, and :meth:`stacked` joins them along the token axis.
    """

    def __init__(self) -> None:
        self.values: dict[str, dict[int, list]] = {}

    def __call__(self, layer: int, **arrays) -> None:
        for name, array in arrays.items():
            self.values.setdefault(name, {}).setdefault(layer, []).append(array)

    def joined(self, name: str, layer: int) -> np.ndarray:
        """``[T, ...]``: one layer's named array, the pieces of successive calls joined in order."""
        pieces = self.values[name][layer]
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=0)  # no copy for one forward

    def stacked(self, name: str, layers: Sequence[int], fill=None) -> np.ndarray:
        """``[len(layers), T, ...]``: the named array of each layer, tokens joined in call order.

        With ``fill``, layers whose last axis is shorter (fewer experts per token, after a
        per-layer intervention) are padded to the longest with ``fill``.
        """
        arrays = [self.joined(name, layer) for layer in layers]
        if fill is not None:
            width = max(a.shape[-1] for a in arrays)
            pad = [(0, 0)] * (arrays[0].ndim - 1)
            arrays = [np.pad(a, pad + [(0, width - a.shape[-1])], constant_values=fill) for a in arrays]
        return np.stack(arrays)


def trace_generation(model, ids, max_new_tokens: int, tokenizer=None, interventions: dict | None = None,
                     window: int | None = None, overlap: int | None = None,
                     **sampling) -> tuple[list[int], RoutingTrace]:
    """Generate after ``ids`` and trace every token the model read: (new ids, trace).

    The trace grows token by token through the KV cache: it covers the prompt and each
    generated token that was fed back (all but the last, which no forward pass reads).
    ``sampling`` takes :meth:`Model.generate`'s keywords (temperature, top_k, top_p, seed, ...).

    A prompt too long to leave ``max_new_tokens`` positions free in the context is traced
    window by window (``window``, ``overlap``: see :mod:`minimoe.windows`), and generation
    continues from its last ``context - max_new_tokens`` tokens, all the model can see;
    the generated tokens' positions continue the prompt's.
    """
    from .windows import trace_text  # minimoe.windows builds on this module

    ids = [int(i) for i in ids]
    seen = model.config.max_position_embeddings - max_new_tokens  # prompt tokens generation can read
    long_prompt = 0 < seen < len(ids)
    recorder = Recorder()
    new_ids = list(model.generate_stream(ids[-seen:] if long_prompt else ids, max_new_tokens, record=recorder,
                                         interventions=interventions, tokenizer=tokenizer, **sampling))
    grown = RoutingTrace.from_recorder(recorder, model.config)
    if long_prompt:
        prompt = trace_text(model, ids, window=window, overlap=overlap, **(interventions or {}))
        generated = grown.select(seen).shifted(len(ids) - seen)
        grown = RoutingTrace.concat([prompt, generated if prompt.logits.shape[1] else generated.without_logits()])
    if tokenizer is not None:
        grown.tokens = [tokenizer.decode([int(t)]) for t in grown.token_ids]
    return new_ids, grown


# --- measuring an intervention ----------------------------------------------------------------

@dataclass(frozen=True)
class NextTokenChange:
    """Per position, how an intervention changed the next-token distribution (a piece of a text)."""

    kl: np.ndarray  # [n] KL(original || intervened), nats
    top1_changed: np.ndarray  # [n] bool: the most likely next token changed
    base_nll: np.ndarray  # [m <= n] -log p(actual next token), original; m < n at the end of the text
    nll: np.ndarray  # [m] the same, intervened


@dataclass(frozen=True)
class InterventionEffect:
    """How an intervention changed the next-token distribution, position by position."""

    kl_per_token: np.ndarray  # [T] KL(original || intervened) of each position's next-token distribution, nats
    mean_kl: float
    last_kl: float  # at the last position: the distribution the next generated token comes from
    loss: float  # mean cross-entropy of the actual next tokens (positions 0..T-2), intervened
    base_loss: float  # the same without the intervention
    top1_changed: float  # fraction of positions whose most likely next token changed

    @property
    def loss_change(self) -> float:
        return self.loss - self.base_loss

    @classmethod
    def join(cls, pieces: Sequence[NextTokenChange]) -> "InterventionEffect":
        """The effect over a whole text from its pieces, in order (one piece, or one per window)."""
        kl = np.concatenate([p.kl for p in pieces])
        base_nll, nll = np.concatenate([p.base_nll for p in pieces]), np.concatenate([p.nll for p in pieces])

        def mean(values: np.ndarray) -> float:
            return float(values.mean()) if len(values) else float("nan")  # a one-token text has no next token

        changed = np.concatenate([p.top1_changed for p in pieces])
        return cls(kl_per_token=kl, mean_kl=float(kl.mean()), last_kl=float(kl[-1]), loss=mean(nll),
                   base_loss=mean(base_nll), top1_changed=float(changed.mean()))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """``[..., V]`` -> ``[..., V]`` float64 log-probabilities."""
    z = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def next_token_effect(base: np.ndarray, changed: np.ndarray, next_ids: np.ndarray) -> NextTokenChange:
    """Compare log-probabilities ``[n, V]`` position by position; ``next_ids`` ``[m <= n]``: the actual next tokens."""
    rows = np.arange(len(next_ids))
    return NextTokenChange(kl=(np.exp(base) * (base - changed)).sum(-1),
                           top1_changed=base.argmax(-1) != changed.argmax(-1),
                           base_nll=-base[rows, next_ids], nll=-changed[rows, next_ids])


def measure_intervention(model, ids, base_logits: np.ndarray | None = None, **interventions) -> InterventionEffect:
    """Run ``ids`` ``[T]`` with and without ``interventions`` and compare the next-token distributions.

    ``base_logits`` (``[T, V]``, from ``model.forward(ids)``) saves the plain run when
    several interventions are measured on the same text.  The text must fit the model's
    context; :func:`minimoe.windows.measure_interventions` measures longer ones window by window.
    """
    ids = np.asarray(ids)
    base = log_softmax(model.forward(ids) if base_logits is None else base_logits)
    changed = log_softmax(model.forward(ids, **interventions))
    return InterventionEffect.join([next_token_effect(base, changed, ids[1:])])
