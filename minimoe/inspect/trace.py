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
expert or none; families differ, see :data:`minimoe.config.FAMILIES`), ``interventions``
(what was changed in the routing, in words, or ``"none"``) and, when a tokenizer was given,
``tokens``: each token's text.  ``print(trace)`` shows one line of these; the arrays are its
attributes.  Traces of consecutive pieces of
one sequence (a prompt, then generated tokens through the cache) join with
:meth:`RoutingTrace.concat`; a text longer than the model's context is traced window
by window and joined that way (:mod:`minimoe.inspect.tracing`; such a trace keeps an empty
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

from ..errors import MinimoeError
from ..files import atomic_write, write_text
from ..hooks import LAYER_FIELDS, OUTPUT, SPARSE_LAYER_FIELDS, Interventions, Recorder, describe_interventions

# Every array of a trace: the output's, the sparse layers' axis, then what the layers record (their one home
# is minimoe.hooks, which every backend records through).
ARRAY_FIELDS = ("token_ids", "positions", "layers", *SPARSE_LAYER_FIELDS, *LAYER_FIELDS, "logits")
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
    interventions: str = "none"  # what was changed in the routing, in words (Interventions.describe)

    def __repr__(self) -> str:
        """One line: what the trace covers (its arrays are one attribute away, e.g. ``trace.expert_ids``)."""
        first, last = (int(self.positions[0]), int(self.positions[-1])) if self.num_tokens else (0, -1)
        logits = "no logits" if self.logits.shape[1] == 0 else f"logits [{self.num_tokens}, {self.logits.shape[1]}]"
        return (f"RoutingTrace({self.num_tokens:,} tokens at positions {first}..{last}, "
                f"sparse layers {_layer_list(self.layers)} of {self.attention_norm.shape[0]}, "
                f"{self.num_experts} experts, top-{self.top_k}, interventions: {self.interventions}, {logits})")

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
    def from_recorder(cls, recorder: "Recorder", config, tokenizer=None,
                      interventions: Interventions | None = None) -> "RoutingTrace":
        """Assemble a trace from what a :class:`Recorder` collected during one or more forwards (run with
        ``interventions``, which the trace names)."""
        sparse = config.sparse_layers
        if not sparse:
            raise MinimoeError("this model has no sparse layers: there is no routing to trace")
        # Interventions may give layers different k: pad with expert -1 and weight 0 to the largest.
        fills = {"expert_ids": -1, "raw_weights": 0.0, "expert_weights": 0.0}
        per_layer = {name: recorder.stacked(name, sparse, fill=fills.get(name)) for name in SPARSE_LAYER_FIELDS}
        per_layer |= {name: recorder.stacked(name, range(config.num_hidden_layers)) for name in LAYER_FIELDS}
        token_ids = recorder.joined("token_ids", OUTPUT)
        return cls(
            token_ids=token_ids,
            positions=recorder.joined("positions", OUTPUT),
            layers=np.array(sparse),
            logits=recorder.joined("logits", OUTPUT),
            num_experts=config.num_experts,
            top_k=int(per_layer["expert_ids"].shape[2]),
            tokens=None if tokenizer is None else tokenizer.token_texts(token_ids),
            routing_rule=config.routing_rule,
            interventions=describe_interventions(interventions),
            **per_layer,
        )

    # --- joining and slicing ---------------------------------------------------------

    @staticmethod
    def check_same_model(traces: Sequence["RoutingTrace"]) -> None:
        """MinimoeError unless every trace comes from one model (its sparse layers, experts and routing rule)."""
        first = traces[0]
        for i, other in enumerate(traces[1:], start=1):
            if (not np.array_equal(other.layers, first.layers) or other.num_experts != first.num_experts
                    or other.routing_rule != first.routing_rule):
                raise MinimoeError(
                    f"traces come from different models: trace {i} has sparse layers {other.layers.tolist()}, "
                    f"{other.num_experts} experts and {other.routing_rule!r} routing; trace 0 has "
                    f"{first.layers.tolist()}, {first.num_experts} and {first.routing_rule!r}")

    @classmethod
    def concat(cls, traces: Sequence["RoutingTrace"]) -> "RoutingTrace":
        """One trace from consecutive pieces of the same sequence (joined along the token axis)."""
        if not traces:
            raise MinimoeError("concat needs at least one trace")
        if len(traces) == 1:  # nothing to join: no copy of its (possibly [T, vocab]) arrays
            return traces[0]
        first = traces[0]
        cls.check_same_model(traces)
        joined = {}
        for name in ARRAY_FIELDS:
            axis = TOKEN_AXIS.get(name, 1)
            values = [getattr(t, name) for t in traces]
            joined[name] = values[0] if axis is None else np.concatenate(values, axis=axis)
        tokens = None if any(t.tokens is None for t in traces) else [s for t in traces for s in t.tokens]
        top_k = first.top_k if all(t.top_k == first.top_k for t in traces) else max(t.top_k for t in traces)
        changed = " | ".join(dict.fromkeys(t.interventions for t in traces))  # each different one once, in order
        return replace(first, **joined, top_k=top_k, tokens=tokens, interventions=changed)

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

    def without_router_scores(self) -> "RoutingTrace":
        """The same trace with empty ``[S, T, 0]`` router_logits and router_probs.

        Every expert's score, ``[S, T, E]``, is most of a trace's size; the chosen experts' own
        probabilities stay in ``raw_weights``.  Analyses that need the whole distribution
        (:func:`minimoe.inspect.analysis.routing_entropy`) need the full trace.
        """
        empty = np.zeros(self.router_probs.shape[:2] + (0,), dtype=np.float32)
        return replace(self, router_logits=empty, router_probs=empty)

    # --- export ----------------------------------------------------------------------

    def metadata(self) -> dict[str, Any]:
        """The trace's fields that are not arrays."""
        return {"num_experts": self.num_experts, "top_k": self.top_k, "tokens": self.tokens,
                "routing_rule": self.routing_rule, "interventions": self.interventions}

    def save_npz(self, path: str | Path, include_logits: bool = True, include_router_scores: bool = True) -> None:
        """All arrays plus metadata in one ``.npz`` (no pickles: plain numeric arrays and a JSON string).

        ``include_logits=False`` leaves out the ``[T, vocab]`` logits (for Qwen1.5-MoE, 0.6 MB a
        token); ``include_router_scores=False`` leaves out router_logits and router_probs
        ``[S, T, E]`` (see :meth:`without_router_scores`).  Such a file loads back with empty
        ``[T, 0]`` / ``[S, T, 0]`` arrays in their place.
        """
        trace = self if include_logits else self.without_logits()
        trace = trace if include_router_scores else trace.without_router_scores()
        arrays = {name: getattr(trace, name) for name in ARRAY_FIELDS}
        with atomic_write(path) as handle:  # a handle: numpy would add ".npz" to another name
            np.savez_compressed(handle, **arrays, meta=np.array(json.dumps(self.metadata())))

    @classmethod
    def load_npz(cls, path: str | Path) -> "RoutingTrace":
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {name: data[name] for name in ARRAY_FIELDS}
                meta = json.loads(str(data["meta"]))
        except (OSError, KeyError, ValueError) as exc:
            raise MinimoeError(f"{path}: not a minimoe routing trace ({exc})") from None
        return cls(**arrays, num_experts=meta["num_experts"], top_k=meta["top_k"], tokens=meta["tokens"],
                   routing_rule=meta.get("routing_rule", ""), interventions=meta.get("interventions", "none"))

    def to_json(self, path: str | Path | None = None, include_logits: bool = False) -> dict[str, Any]:
        """A JSON-ready dict of the trace (logits left out unless asked: they are large); written if ``path``
        (by :meth:`write_json`, which writes the same JSON without building this dict)."""
        data = {name: getattr(self, name).tolist() for name in self._json_fields(include_logits)}
        data = _finite(data)
        data.update(self.metadata())
        if path is not None:
            self.write_json(path, include_logits)
        return data

    def write_json(self, path: str | Path, include_logits: bool = False) -> None:
        """The trace as JSON (what :meth:`to_json` returns), written one row of an array at a time: a long
        text's trace is never in memory as Python lists or as one string."""
        fields = [(name, getattr(self, name)) for name in self._json_fields(include_logits)]
        fields += self.metadata().items()
        with atomic_write(path, "w", encoding="utf-8") as handle:
            handle.write("{")
            for i, (name, value) in enumerate(fields):
                handle.write(f"{', ' if i else ''}{json.dumps(name)}: ")
                if isinstance(value, np.ndarray):
                    _write_json_array(handle, value)
                else:
                    handle.write(json.dumps(value))
            handle.write("}")

    def _json_fields(self, include_logits: bool) -> list[str]:
        return [name for name in ARRAY_FIELDS if include_logits or name != "logits"]

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
        with atomic_write(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(first) if first else ["position"])
            writer.writeheader()
            if first:
                writer.writerow(first)
                writer.writerows(rows)


def _layer_list(layers: np.ndarray) -> str:
    """``[0, 2, 4]``, or ``1..26`` for a run of consecutive layers (a summary stays one line)."""
    values = [int(layer) for layer in layers]
    if len(values) > 3 and values == list(range(values[0], values[-1] + 1)):
        return f"{values[0]}..{values[-1]}"
    return str(values)


JSON_ROWS_PER_WRITE = 1024  # rows of a 2-D array converted and written at once: bounded memory, few calls


def _write_json_array(handle, array: np.ndarray) -> None:
    """``array`` as a JSON list of lists, written a block of rows at a time (``-inf`` as ``null``, as in
    :meth:`RoutingTrace.to_json`)."""
    if array.ndim > 2:
        handle.write("[")
        for i, part in enumerate(array):
            handle.write(", " if i else "")
            _write_json_array(handle, part)
        handle.write("]")
    elif array.ndim < 2 or len(array) <= JSON_ROWS_PER_WRITE:
        handle.write(_json_list(array))
    else:
        handle.write("[")
        for start in range(0, len(array), JSON_ROWS_PER_WRITE):
            rows = _json_list(array[start : start + JSON_ROWS_PER_WRITE])[1:-1]  # "[a, b]" -> "a, b"
            handle.write((", " if start else "") + rows)
        handle.write("]")


def _json_list(array: np.ndarray) -> str:
    values = array.tolist()
    return json.dumps(values if np.isfinite(array).all() else _finite(values))


def _finite(value):
    """JSON has no -inf: disabled experts' logits become None."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value
