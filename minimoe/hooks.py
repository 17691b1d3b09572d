"""What a forward pass takes besides its tokens: routing interventions, and a recorder of what it computes.

The model (:mod:`minimoe.model`) reads these and nothing above it: an :class:`Interventions`
changes how its sparse layers route; a :class:`Recorder` collects the arrays each layer hands
it (the raw material of a :class:`minimoe.inspect.trace.RoutingTrace`).  :data:`LAYER_FIELDS` and
:data:`OUTPUT_FIELDS` name those arrays, their one home: every backend records through them
and the trace is made of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from .errors import MinimoeError

# What a sparse layer records per token, what every decoder layer records, and what the model records
# once per forward (under the key OUTPUT): the arrays a RoutingTrace is made of.
SPARSE_LAYER_FIELDS = ("router_logits", "router_probs", "expert_ids", "raw_weights", "expert_weights", "shared_gate",
                       "shared_norm", "routed_norm")
LAYER_FIELDS = ("attention_norm",)
OUTPUT_FIELDS = ("token_ids", "positions", "logits")
OUTPUT = -1  # the recorder's key for model-level arrays (token ids, positions, logits), beside the layer indices


# --- interventions ----------------------------------------------------------------------------

INTERVENTION_KEYS = ("disabled_experts", "forced_experts", "top_k", "shared_expert")  # Interventions.build's keywords

@dataclass(frozen=True)
class LayerInterventions:
    """What to change in one sparse layer's routing (see :class:`Interventions`)."""

    disabled: tuple[int, ...] = ()
    forced: tuple[int, ...] | None = None
    top_k: int | None = None
    shared_expert: bool = True


@dataclass(frozen=True)
class Interventions:
    """Changes to the routing: what every function that runs the model takes as ``interventions=``.

    Pass a mapping of these keys (or an :class:`Interventions` already built by :meth:`build`):

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

    @classmethod
    def of(cls, config, interventions: "Mapping | Interventions | None") -> "Interventions | None":
        """``interventions=`` as given to a function that runs the model, validated for ``config``; None for none.

        A mapping names :meth:`build`'s keywords; an unknown key raises MinimoeError listing the known ones.
        """
        if interventions is None or isinstance(interventions, cls):
            return interventions
        if not isinstance(interventions, Mapping):
            raise MinimoeError(f"interventions must be a mapping such as {{'disabled_experts': {{layer: [expert]}}}}, "
                               f"got {type(interventions).__name__}")
        unknown = sorted(set(interventions) - set(INTERVENTION_KEYS))
        if unknown:
            raise MinimoeError(f"unknown intervention {unknown[0]!r}: the interventions are "
                               f"{', '.join(INTERVENTION_KEYS)}")
        return cls.build(config, **interventions) if interventions else None

    def describe(self) -> str:
        """What is changed, in a few words (for summaries): 'none', or e.g. 'disabled 2 experts in layer 3; top-1'."""
        parts = [f"disabled {len(e)} expert{'s' * (len(e) != 1)} in layer {layer}"
                 for layer, e in self.disabled_experts.items()]
        parts += [f"forced experts {list(e)} in layer {layer}" for layer, e in self.forced_experts.items()]
        if self.top_k is not None:
            ks = set(self.top_k.values()) if isinstance(self.top_k, dict) else {self.top_k}
            parts.append(f"top-{ks.pop()}" if len(ks) == 1 else f"top-k by layer {self.top_k}")
        if self.shared_expert is False:
            parts.append("no shared expert")
        elif self.shared_expert is not True:
            parts.append(f"shared expert only in layers {sorted(self.shared_expert)}")
        return "; ".join(parts) or "none"

    def for_layer(self, layer: int) -> LayerInterventions:
        shared = self.shared_expert if isinstance(self.shared_expert, bool) else layer in self.shared_expert
        k = self.top_k.get(layer) if isinstance(self.top_k, dict) else self.top_k
        return LayerInterventions(self.disabled_experts.get(layer, ()), self.forced_experts.get(layer), k, shared)


def describe_interventions(interventions: Interventions | None) -> str:
    """:meth:`Interventions.describe`, or ``"none"`` where nothing was changed (``None``)."""
    return "none" if interventions is None else interventions.describe()


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
