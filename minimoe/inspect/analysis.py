"""Routing analyses from the MoE literature, computed over :class:`~minimoe.inspect.trace.RoutingTrace` objects.

Every function takes ``traces``: one trace or a list of them.  A list is pooled: all
tokens of all traces count as one sample, except where token order matters
(:func:`consecutive_same_expert`), where a pair of tokens is only adjacent inside one
trace.  The traces must come from the same model (same sparse layers, same number of
experts) and have run with the same k.

Shapes use the trace's letters: ``S`` sparse layers, ``E`` routed experts, ``k``
experts chosen per token, ``N`` tokens pooled over all traces, ``D`` domains.  Layers
are indexed along the S axis (``trace.layers[s]`` is the decoder layer), except where
a function takes a decoder-layer number (``layer``, ``from_layer``, ``to_layer``).

What each function measures, and where it comes from:

* :func:`expert_load` -- how evenly the experts are used, and the Switch-Transformer
  load-balancing loss per layer;
* :func:`routing_entropy` -- how confident the router is (entropy, top-1 and top-k mass);
* :func:`coactivation` -- which experts are chosen together (OLMoE);
* :func:`consecutive_same_expert` -- whether neighbouring tokens go to the same expert (Mixtral);
* :func:`vocabulary_specialization` -- which token ids each expert takes (OLMoE, ST-MoE);
  :func:`expert_tokens` for one expert;
* :func:`token_routing` -- where one token goes in each layer, and how consistently
  (:func:`token_ids_for` turns a text into the ids to ask about);
* :func:`domain_specialization` -- how each text domain spreads over the experts (Mixtral, OLMoE);
* :func:`layer_transitions` -- how the top-1 expert in one layer predicts the next;
* :func:`shared_vs_routed` -- how much the always-on shared expert contributes (Qwen-MoE, DeepSeekMoE);
* :func:`expert_cache_hit_rate` -- how often an LRU cache of experts would already hold the ones a
  token needs (the reuse that mixtral-offloading's expert cache lives on);
* :func:`distinct_experts_per_batch` -- how many experts a batch of B tokens touches, beside
  :func:`expected_distinct_experts` for a uniform router (why batched serving reads nearly every expert).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from .. import layers
from ..errors import MinimoeError
from .trace import RoutingTrace

Traces = RoutingTrace | Sequence[RoutingTrace]  # one trace, or several pooled


# --- input -----------------------------------------------------------------------------

def _trace_list(traces: Traces) -> list[RoutingTrace]:
    """``traces`` as a non-empty list of traces of one model, run with one k, holding at least one token."""
    items = [traces] if isinstance(traces, RoutingTrace) else list(traces)
    if not items:
        raise MinimoeError("no routing traces given: pass a RoutingTrace or a non-empty list of them")
    for i, trace in enumerate(items):
        if not isinstance(trace, RoutingTrace):
            raise MinimoeError(f"traces[{i}] is a {type(trace).__name__}, not a RoutingTrace")
    RoutingTrace.check_same_model(items)
    ks = {trace.expert_ids.shape[2] for trace in items}
    if len(ks) > 1:
        # Pooling mixes distributions that are not comparable (and arrays that do not stack).
        raise MinimoeError(f"traces ran with different numbers of experts per token {sorted(ks)}: analyse them apart")
    if sum(trace.num_tokens for trace in items) == 0:
        raise MinimoeError("the traces hold no tokens")
    return items


def _pooled(items: Sequence[RoutingTrace], name: str) -> np.ndarray:
    """A per-layer field ``[S, T, ...]`` of every trace, joined along the token axis: ``[S, N, ...]``."""
    if len(items) == 1:
        return getattr(items[0], name)  # no copy in the common case
    return np.concatenate([getattr(trace, name) for trace in items], axis=1)


def _span(values: np.ndarray) -> str:
    """A per-layer figure in a summary: ``0.42`` for one layer, ``0.31..0.52`` (smallest..largest) for several."""
    values = np.asarray(values, dtype=np.float64)
    low, high = values.min(), values.max()
    return f"{low:.3g}" if low == high else f"{low:.3g}..{high:.3g}"


def _chosen_mask(expert_ids: np.ndarray, num_experts: int) -> np.ndarray:
    """expert_ids ``[..., k]`` -> ``[..., E]`` booleans: which experts each token chose (any rank).

    Padding (expert -1, in layers that ran with fewer experts than the trace's k) matches no expert.
    """
    return (expert_ids[..., :, None] == np.arange(num_experts)).any(axis=-2)


def _bincount_rows(ids: np.ndarray, num_experts: int, weights: np.ndarray | None = None) -> np.ndarray:
    """ids ``[S, ...]`` -> ``[S, E]``: how often each expert id occurs in each layer, in one bincount.

    With ``weights`` (the shape of ``ids``), their sums per expert instead of counts.
    Padding ids (-1) are not counted.
    """
    flat = ids.reshape(ids.shape[0], -1)
    offsets = np.arange(flat.shape[0])[:, None] * num_experts  # layer s counts into bins s*E .. s*E+E-1
    valid = flat >= 0
    cells = (flat + offsets)[valid]
    weights = None if weights is None else weights.reshape(flat.shape)[valid]
    return np.bincount(cells, weights=weights, minlength=flat.shape[0] * num_experts).reshape(-1, num_experts)


def _normalise_rows(counts: np.ndarray) -> np.ndarray:
    """Each row divided by its sum along the last axis; rows that sum to 0 stay 0 (not NaN)."""
    totals = counts.sum(axis=-1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros(counts.shape, dtype=np.float64), where=totals > 0)


# --- load --------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)  # eq=False: arrays do not compare with ==
class ExpertLoad:
    """How the routed-expert assignments spread over the experts, per sparse layer."""

    counts: np.ndarray  # [S, E] int: times each expert was chosen, any rank
    share: np.ndarray  # [S, E] counts / (N * k); each row sums to 1
    cv: np.ndarray  # [S] coefficient of variation of counts over experts (population std / mean); 0 = even
    max_over_mean: np.ndarray  # [S] busiest expert's count / mean count; 1 = even, E/k = one expert per slot
    balance_loss: np.ndarray  # [S] the transformers load-balancing loss of that layer alone; k when uniform

    def __repr__(self) -> str:
        layers, experts = self.counts.shape
        return (f"ExpertLoad({layers} layers x {experts} experts, {int(self.counts[0].sum()):,} assignments a layer; "
                f"cv {_span(self.cv)}, busiest/mean {_span(self.max_over_mean)}, "
                f"balance loss {_span(self.balance_loss)})")


def expert_load(traces: Traces) -> ExpertLoad:
    """Expert load per sparse layer (see :class:`ExpertLoad` for the fields and shapes).

    ``counts[s, e]`` counts the tokens that chose expert ``e`` in layer ``s`` at any of
    the k ranks, so a row sums to ``N * k``.  ``balance_loss[s]`` is
    :func:`minimoe.layers.load_balancing_loss` on layer ``s``'s router logits alone
    (all traces' tokens pooled): ``E * sum_e f_e * P_e``, where ``f_e`` is the share of
    tokens choosing ``e`` and ``P_e`` its mean router probability.  It re-routes from the
    logits with the traces' k, as transformers does, so forced experts do not enter it.
    It is ``k`` for uniform routing and grows towards ``E`` as routing collapses.
    """
    items = _trace_list(traces)
    num_experts = items[0].num_experts
    expert_ids = _pooled(items, "expert_ids")
    counts = _bincount_rows(expert_ids, num_experts)
    mean = counts.mean(axis=1)  # N * k / E > 0: _trace_list guarantees a token
    logits = _pooled(items, "router_logits")
    layer_k = (expert_ids >= 0).sum(axis=-1).max(axis=-1)  # [S] each layer's own k (padding excluded)
    # One call per layer: the library's loss sums over the layers it is given.
    balance = [layers.load_balancing_loss(np, [logits[s]], num_experts, int(layer_k[s])) for s in range(logits.shape[0])]
    return ExpertLoad(
        counts=counts,
        share=_normalise_rows(counts),
        cv=counts.std(axis=1) / mean,
        max_over_mean=counts.max(axis=1) / mean,
        balance_loss=np.array(balance, dtype=np.float64),
    )


# --- confidence -----------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class RoutingEntropy:
    """How sharp the router's distribution is, per sparse layer."""

    entropy: np.ndarray  # [S, N] nats, of each token's router_probs (tokens in trace order, traces in list order)
    mean_entropy: np.ndarray  # [S] entropy averaged over tokens
    max_entropy: float  # log E: the entropy of a uniform router
    top1_mass: np.ndarray  # [S] mean over tokens of the largest router probability (1/E when uniform)
    topk_mass: np.ndarray  # [S] mean over tokens of the k chosen experts' total probability (k/E when uniform)

    def __repr__(self) -> str:
        layers, tokens = self.entropy.shape
        return (f"RoutingEntropy({layers} layers, {tokens:,} tokens; mean entropy {_span(self.mean_entropy)} of "
                f"at most {self.max_entropy:.2f} nats, top-1 mass {_span(self.top1_mass)}, "
                f"top-k mass {_span(self.topk_mass)})")


def routing_entropy(traces: Traces) -> RoutingEntropy:
    """Entropy ``H = -sum_e p_e log p_e`` of the router's distribution per token (see :class:`RoutingEntropy`).

    Experts with zero probability (disabled ones, whose logit is -inf, or underflow)
    contribute ``0 * log 0 = 0``.  ``max_entropy`` is ``log E`` even when experts are
    disabled, so that layers and interventions compare on one scale.
    """
    items = _trace_list(traces)
    probs = _pooled(items, "router_probs").astype(np.float64)
    # log(1) = 0 where p = 0: the term vanishes without a log(0) warning or 0 * -inf = NaN.
    entropy = -(probs * np.log(np.where(probs > 0, probs, 1.0))).sum(axis=-1)
    return RoutingEntropy(
        entropy=entropy,
        mean_entropy=entropy.mean(axis=1),
        max_entropy=float(np.log(items[0].num_experts)),
        top1_mass=probs.max(axis=-1).mean(axis=1),
        topk_mass=_pooled(items, "raw_weights").astype(np.float64).sum(axis=-1).mean(axis=1),
    )


# --- which experts go together ---------------------------------------------------------------

def coactivation(traces: Traces) -> np.ndarray:
    """``[S, E, E]``: ``[s, i, j]`` = P(expert j is chosen | expert i is chosen) in layer s, over tokens.

    Both "chosen" mean among a token's k experts, any rank.  The diagonal is 1 for every
    expert that was chosen at least once; the row of a never-chosen expert is all 0.
    The matrix is not symmetric: a popular expert is a likely partner of a rare one,
    not the other way round.
    """
    items = _trace_list(traces)
    chosen = _chosen_mask(_pooled(items, "expert_ids"), items[0].num_experts).astype(np.float32)  # [S, N, E]
    # together[s, i, j] = tokens choosing both i and j; float32 sums of 0/1 are exact below 2^24 tokens,
    # and the batched matmul runs on BLAS.
    together = np.matmul(chosen.transpose(0, 2, 1), chosen).astype(np.float64)  # [S, E, E]
    alone = np.diagonal(together, axis1=1, axis2=2)[:, :, None]  # [S, E, 1] tokens choosing i
    return np.divide(together, alone, out=np.zeros_like(together), where=alone > 0)


# --- neighbouring tokens ---------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class ConsecutiveRate:
    """How often neighbouring tokens share an expert, per sparse layer, with the chance rates to compare."""

    top1_rate: np.ndarray  # [S] fraction of adjacent pairs whose top-1 experts are equal
    topk_overlap: np.ndarray  # [S] fraction of adjacent pairs whose chosen sets share at least one expert
    chance_uniform: float  # 1/E: top1_rate if the top-1 expert were uniformly random
    chance_given_load: np.ndarray  # [S] sum_e q_e^2, q = observed top-1 share: top1_rate if tokens were independent

    def __repr__(self) -> str:
        return (f"ConsecutiveRate({len(self.top1_rate)} layers; same top-1 {_span(self.top1_rate)} "
                f"(chance {self.chance_uniform:.3f} uniform, {_span(self.chance_given_load)} given the load), "
                f"shared expert among top-k {_span(self.topk_overlap)})")


def consecutive_same_expert(traces: Traces) -> ConsecutiveRate:
    """Temporal locality of routing, as in the Mixtral paper (see :class:`ConsecutiveRate`).

    A pair ``(t, t+1)`` counts only inside one trace (never the last token of one
    trace with the first of the next) and only when ``positions[t+1] = positions[t] + 1``,
    so that a trace joined from unrelated sequences does not invent neighbours.

    Two baselines, because the first alone flatters the router: ``chance_uniform = 1/E``
    is the rate Mixtral compares against (top-1 experts drawn uniformly), but with
    uneven load two *unrelated* tokens already agree more often than that -- both
    likely land on the busy experts.  ``chance_given_load = sum_e q_e^2``, with ``q`` the
    observed top-1 load, is the rate if each token drew its top-1 expert independently
    from that load; only a ``top1_rate`` above it says that neighbours really route alike.
    """
    items = _trace_list(traces)
    num_experts = items[0].num_experts
    same = overlap = 0
    pairs = 0
    for trace in items:  # per trace, so that no pair straddles two traces
        adjacent = np.diff(trace.positions) == 1  # [T-1]
        top1 = trace.expert_ids[:, :, 0]  # [S, T]
        chosen = _chosen_mask(trace.expert_ids, num_experts)  # [S, T, E]
        same = same + ((top1[:, 1:] == top1[:, :-1]) & adjacent).sum(axis=1)
        overlap = overlap + ((chosen[:, 1:] & chosen[:, :-1]).any(axis=-1) & adjacent).sum(axis=1)
        pairs += int(adjacent.sum())
    if pairs == 0:
        raise MinimoeError("consecutive_same_expert needs a trace with at least two consecutive tokens")
    top1_share = _normalise_rows(_bincount_rows(_pooled(items, "expert_ids")[:, :, 0], num_experts))
    return ConsecutiveRate(
        top1_rate=same / pairs,
        topk_overlap=overlap / pairs,
        chance_uniform=1.0 / num_experts,
        chance_given_load=(top1_share**2).sum(axis=1),
    )


# --- what the experts read -----------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class ExpertVocabulary:
    """The token ids one expert takes most often in one layer."""

    expert: int
    token_ids: np.ndarray  # [<=top] most frequent first (ties: smaller id first); only ids it took at least once
    counts: np.ndarray  # [<=top] how many times this expert was chosen for each of them
    exclusivity: np.ndarray  # [<=top] counts / occurrences of that id: 1.0 = every occurrence chose this expert

    def __repr__(self) -> str:
        top = ", ".join(f"{int(t)} x{int(c)}" for t, c in zip(self.token_ids[:5], self.counts[:5]))
        more = f", ... ({len(self.token_ids)} ids)" if len(self.token_ids) > 5 else ""
        return f"ExpertVocabulary(expert {self.expert}: token id x count {top or 'none'}{more})"


def vocabulary_specialization(traces: Traces, layer: int, top: int = 10) -> list[ExpertVocabulary]:
    """Per expert of decoder layer ``layer``, the ``top`` token ids routed to it most often (E entries, by expert).

    A token counts for an expert if the expert is among its k chosen.  ``exclusivity``
    tells a specialist from a generalist: an expert whose top ids are just the most
    frequent tokens of the text has low exclusivity; one that takes every occurrence of
    its ids has 1.0.  An expert that took fewer than ``top`` distinct ids lists fewer.
    """
    items = _trace_list(traces)
    if top < 1:
        raise MinimoeError(f"top must be at least 1, got {top}")
    s = items[0].layer_index(layer)
    num_experts = items[0].num_experts
    token_ids = np.concatenate([trace.token_ids for trace in items])  # [N]
    expert_ids = np.concatenate([trace.expert_ids[s] for trace in items])  # [N, k]
    # Count over the distinct ids only: E x (ids present) instead of E x vocabulary.
    vocab, column = np.unique(token_ids, return_inverse=True)
    column = column.reshape(-1)  # numpy 2 may keep the input's shape
    occurrences = np.bincount(column, minlength=len(vocab))  # [U]
    pair = expert_ids * len(vocab) + column[:, None]  # [N, k] (expert, id) cell of each assignment
    pair = pair[expert_ids >= 0]  # padding (-1) is no assignment
    table = np.bincount(pair, minlength=num_experts * len(vocab)).reshape(num_experts, len(vocab))
    result = []
    for expert in range(num_experts):
        row = table[expert]
        best = np.argsort(-row, kind="stable")[:top]  # stable: ties keep vocab's ascending id order
        best = best[row[best] > 0]
        result.append(ExpertVocabulary(expert=expert, token_ids=vocab[best], counts=row[best],
                                       exclusivity=row[best] / occurrences[best]))
    return result


def expert_tokens(traces: Traces, layer: int, expert: int, top: int = 20) -> ExpertVocabulary:
    """The ``top`` token ids expert ``expert`` of decoder layer ``layer`` takes most often, with counts.

    The question "which tokens does this expert take?" for one expert; see
    :func:`vocabulary_specialization` for every expert at once and what ``exclusivity`` means.
    """
    items = _trace_list(traces)
    if not 0 <= expert < items[0].num_experts:
        raise MinimoeError(f"expert {expert} is outside [0, {items[0].num_experts})")
    return vocabulary_specialization(items, layer, top)[expert]


# --- one token: where does it go? -------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class TokenRouting:
    """Where every occurrence of one token id was routed, per sparse layer."""

    token_id: int
    text: str | None  # the token's text, when the traces were made with a tokenizer and it occurs
    occurrences: int  # N_t: how many times it occurs in the traces
    layers: np.ndarray  # [S] decoder layer of each row
    counts: np.ndarray  # [S, E] occurrences with expert e among the k chosen
    top1_counts: np.ndarray  # [S, E] occurrences with expert e as the top-1
    mean_weight: np.ndarray  # [S, E] mean weight of expert e over the occurrences that chose it (0 where none did)

    def __repr__(self) -> str:
        text = f" {self.text!r}" if self.text is not None else ""
        top1 = ", ".join(f"{int(layer)}: {int(e)}" for layer, e in zip(self.layers, self.top1_expert))
        return (f"TokenRouting(token {self.token_id}{text}, {self.occurrences} occurrence{'s' * (self.occurrences != 1)}, {len(self.layers)} layers; "
                f"most frequent top-1 expert by layer {{{top1}}})")

    @property
    def top1_expert(self) -> np.ndarray:
        """``[S]`` the most frequent top-1 expert (the smaller id on a tie; -1 where the token never occurs)."""
        return np.where(self.occurrences > 0, self.top1_counts.argmax(axis=1), -1)

    @property
    def top1_consistency(self) -> np.ndarray:
        """``[S]`` share of the occurrences whose top-1 is :attr:`top1_expert`: 1.0 = always the same expert."""
        return self.top1_counts.max(axis=1) / max(self.occurrences, 1)


def token_routing(traces: Traces, token_id: int, text: str | None = None) -> TokenRouting:
    """Where token ``token_id`` was routed, over all its occurrences (see :class:`TokenRouting`).

    A token that does not occur gives all-zero counts, not an error: "never seen" is an answer.
    To ask by text, :func:`token_ids_for` turns a text into the ids to query.  ``text``
    names the token in the result (default: its text in the traces, if they hold texts).
    """
    items = _trace_list(traces)
    token_id = int(token_id)
    at = [np.flatnonzero(trace.token_ids == token_id) for trace in items]  # its positions in each trace
    ids = np.concatenate([trace.expert_ids[:, where] for trace, where in zip(items, at)], axis=1)  # [S, N_t, k]
    weights = np.concatenate([trace.expert_weights[:, where] for trace, where in zip(items, at)], axis=1)
    num_experts = items[0].num_experts
    counts = _bincount_rows(ids, num_experts)  # a token chooses an expert at most once: count = occurrences
    weight_sums = _bincount_rows(ids, num_experts, weights)  # [S, E] the weights given to each expert, summed
    if text is None:
        text = next((trace.tokens[int(where[0])] for trace, where in zip(items, at)
                     if trace.tokens is not None and where.size), None)
    return TokenRouting(
        token_id=token_id, text=text, occurrences=int(ids.shape[1]), layers=items[0].layers,
        counts=counts, top1_counts=_bincount_rows(ids[:, :, 0], num_experts),
        mean_weight=np.divide(weight_sums, counts, out=np.zeros(counts.shape), where=counts > 0),
    )


def token_ids_for(tokenizer, query: str | int) -> list[int]:
    """The token ids a query names: an id as is, or a text by the leading-space rule below.

    Byte-level BPE vocabularies (Qwen's included) spell a word differently at the start of
    a line (``"def"``) and after a space (``" def"``), as two unrelated ids.  So a text
    without leading whitespace names both variants: ``"def"`` -> the ids of ``"def"`` and
    ``" def"``, those that are one token each.  A text that starts with whitespace
    (``" def"``, ``"\n"``) names exactly itself.  MinimoeError if no variant is one token.
    """
    if isinstance(query, (int, np.integer)):
        return [int(query)]
    if not query:
        raise MinimoeError("an empty text names no token")
    variants = [query] if query[0].isspace() else [query, " " + query]
    encoded = {variant: tokenizer.encode(variant) for variant in variants}
    ids = [pieces[0] for pieces in encoded.values() if len(pieces) == 1]
    if not ids:
        splits = "; ".join(f"{v!r} -> {tokenizer.token_texts(pieces)}" for v, pieces in encoded.items())
        raise MinimoeError(f"{query!r} is not one token of this vocabulary ({splits}): query one of its pieces")
    return ids


@dataclass(frozen=True, eq=False)
class DomainSpecialization:
    """How each domain's assignments spread over the experts, per layer."""

    domains: list[str]  # [D] names, in the order given
    share: np.ndarray  # [D, S, E] the domain's share of assignments going to each expert (sums to 1 over E)
    ratio: np.ndarray  # [D, S, E] share / (1/E): 1 = uniform, E = every assignment of the domain to that expert

    def __repr__(self) -> str:
        domains, layers, experts = self.ratio.shape
        return (f"DomainSpecialization({domains} domains {self.domains}, {layers} layers x {experts} experts; "
                f"largest share / uniform {self.ratio.max():.2f})")


def domain_specialization(domains: Mapping[str, Traces]) -> DomainSpecialization:
    """Expert load per text domain, relative to uniform (the OLMoE paper's view; see :class:`DomainSpecialization`).

    ``domains`` maps a name (``"code"``, ``"arxiv"``, ...) to that domain's traces.
    A ratio well above 1 for one domain only marks an expert specialised in it; the
    same ratio in every domain marks an expert that is just busy.
    """
    if not domains:
        raise MinimoeError("domain_specialization needs at least one domain")
    names = list(domains)
    pools = [_trace_list(domains[name]) for name in names]
    RoutingTrace.check_same_model([pool[0] for pool in pools])  # within a pool it is checked; here across domains
    share = np.stack([expert_load(pool).share for pool in pools])
    return DomainSpecialization(domains=names, share=share, ratio=share * pools[0][0].num_experts)


# --- across layers --------------------------------------------------------------------------

def layer_transitions(traces: Traces, from_layer: int, to_layer: int) -> np.ndarray:
    """``[E, E]``: ``[i, j]`` = P(top-1 expert at decoder layer ``to_layer`` is j | top-1 at ``from_layer`` is i).

    Rows are normalised over tokens; a row is 0 where expert i was never top-1 at
    ``from_layer``.  A near-permutation matrix means the experts of the two layers
    form paths; rows close to the ``to_layer`` load mean the layers route independently.
    """
    items = _trace_list(traces)
    source, target = items[0].layer_index(from_layer), items[0].layer_index(to_layer)
    num_experts = items[0].num_experts
    top1 = _pooled(items, "expert_ids")[:, :, 0]  # [S, N]
    cells = top1[source] * num_experts + top1[target]  # row-major (i, j) index of each token
    counts = np.bincount(cells, minlength=num_experts * num_experts).reshape(num_experts, num_experts)
    return _normalise_rows(counts)


# --- the shared expert ------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class SharedVsRouted:
    """What the always-on shared expert adds beside the routed experts, per sparse layer."""

    mean_shared_gate: np.ndarray  # [S] mean sigmoid gate of the shared expert
    mean_shared_norm: np.ndarray  # [S] mean L2 norm of the gated shared expert's output
    mean_routed_norm: np.ndarray  # [S] mean L2 norm of the routed experts' weighted sum
    shared_fraction: np.ndarray  # [S] mean over tokens of shared_norm / (shared_norm + routed_norm)

    def __repr__(self) -> str:
        return (f"SharedVsRouted({len(self.shared_fraction)} layers; shared share of the MoE output "
                f"{_span(self.shared_fraction)}, mean gate {_span(self.mean_shared_gate)})")


def shared_vs_routed(traces: Traces) -> SharedVsRouted:
    """The shared expert's share of each sparse layer's MoE output, by norm (see :class:`SharedVsRouted`).

    ``shared_fraction`` is averaged per token (a ratio of norms, not of the mean norms),
    so that a few tokens with large outputs do not decide it.  A token where both norms
    are 0 counts as 0.  With the shared expert switched off its norm and fraction are 0,
    while its gate is still the router's value.
    """
    items = _trace_list(traces)
    shared = _pooled(items, "shared_norm").astype(np.float64)  # [S, N]
    routed = _pooled(items, "routed_norm").astype(np.float64)
    total = shared + routed
    fraction = np.divide(shared, total, out=np.zeros_like(total), where=total > 0)
    return SharedVsRouted(
        mean_shared_gate=_pooled(items, "shared_gate").astype(np.float64).mean(axis=1),
        mean_shared_norm=shared.mean(axis=1),
        mean_routed_norm=routed.mean(axis=1),
        shared_fraction=fraction.mean(axis=1),
    )


# --- offloading: an LRU cache of experts ------------------------------------------------------

@dataclass(frozen=True, eq=False)
class ExpertCacheHits:
    """Simulated hit rate of a least-recently-used expert cache, per sparse layer and cache size."""

    cache_sizes: np.ndarray  # [C] experts each layer's cache holds
    hit_rate: np.ndarray  # [S, C] fraction of expert requests found in the cache
    requests: int  # expert requests per layer (N * k, padding excluded in the first layer)

    def __repr__(self) -> str:
        shown = range(0, len(self.cache_sizes), max(1, len(self.cache_sizes) // 4))  # a few sizes: one line
        rates = ", ".join(f"{int(self.cache_sizes[c])}: {_span(self.hit_rate[:, c])}" for c in shown)
        return (f"ExpertCacheHits({self.hit_rate.shape[0]} layers, {self.requests:,} requests a layer; "
                f"hit rate by cache size {{{rates}}})")


def expert_cache_hit_rate(traces: Traces, cache_sizes: Sequence[int] | None = None) -> ExpertCacheHits:
    """Replay the routing through an LRU cache of experts, one cache per sparse layer (see :class:`ExpertCacheHits`).

    This is what an offloading engine that keeps ``C`` experts of each layer in fast
    memory (mixtral-offloading keeps them on the GPU) would see: token by token, in
    order, each of the ``k`` experts a token chose is a request; a hit if the cache
    holds it, else it is loaded and the least recently used expert is evicted.  Every
    trace starts from an empty cache, so its first loads are misses.  Default sizes:
    ``k, 2k, ...`` up to ``E`` (at ``E`` only those first loads miss).
    """
    items = _trace_list(traces)
    num_experts, k = items[0].num_experts, items[0].expert_ids.shape[2]
    sizes = np.asarray(cache_sizes if cache_sizes is not None else sorted({*range(k, num_experts, k), num_experts}))
    if sizes.size == 0 or (sizes < 1).any():
        raise MinimoeError(f"cache sizes must be at least 1, got {sizes.tolist()}")
    num_layers = items[0].expert_ids.shape[0]
    hits = np.zeros((num_layers, len(sizes)), dtype=np.int64)
    requests = np.zeros(num_layers, dtype=np.int64)
    for trace in items:
        for s in range(num_layers):
            wanted = [[e for e in token if e >= 0] for token in trace.expert_ids[s].tolist()]  # padding is no request
            requests[s] += sum(len(token) for token in wanted)
            for c, size in enumerate(sizes.tolist()):
                hits[s, c] += _lru_hits(wanted, size)
    return ExpertCacheHits(cache_sizes=sizes, hit_rate=hits / np.maximum(requests, 1)[:, None], requests=int(requests[0]))


def _lru_hits(requests: Sequence[Sequence[int]], size: int) -> int:
    """Hits of an LRU cache of ``size`` entries, starting empty, over per-token request lists."""
    cache: OrderedDict[int, None] = OrderedDict()  # least recently used first
    hits = 0
    for token in requests:
        for expert in token:
            if expert in cache:
                hits += 1
                cache.move_to_end(expert)
            else:
                cache[expert] = None
                if len(cache) > size:
                    cache.popitem(last=False)
    return hits


# --- experts a batch touches ------------------------------------------------------------------

def expected_distinct_experts(num_experts: int, top_k: int, batch: int | np.ndarray) -> np.ndarray:
    """``E * (1 - (1 - k/E)^B)``: the mean number of distinct experts ``B`` tokens choose under uniform routing.

    Each token chooses ``k`` of ``E`` experts, every set of ``k`` equally likely, independently of the
    other tokens.  One token misses a given expert with probability ``C(E-1, k) / C(E, k) = 1 - k/E``,
    all ``B`` of them with ``(1 - k/E)^B``; summing over the ``E`` experts gives the formula.
    ``batch``: an int or an array of batch sizes; the result has its shape.
    """
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** np.asarray(batch, dtype=np.float64))


@dataclass(frozen=True, eq=False)
class BatchExperts:
    """How many distinct experts a batch of ``B`` tokens touches, per sparse layer."""

    batch_sizes: np.ndarray  # [B'] the batch sizes measured
    distinct: np.ndarray  # [S, B'] mean distinct experts chosen by a batch of that size, over the draws
    uniform: np.ndarray  # [B'] expected_distinct_experts(E, k, batch_sizes): a uniform router
    num_experts: int
    draws: int  # random batches drawn per size

    def __repr__(self) -> str:
        last = len(self.batch_sizes) - 1
        return (f"BatchExperts({self.distinct.shape[0]} layers, {self.draws} batches a size; at B = "
                f"{int(self.batch_sizes[last])}: {_span(self.distinct[:, last])} of {self.num_experts} experts, "
                f"uniform {self.uniform[last]:.1f})")


def distinct_experts_per_batch(traces: Traces, batch_sizes: Sequence[int], draws: int = 200,
                               seed: int = 0) -> BatchExperts:
    """Distinct experts touched by ``B`` tokens drawn at random from the traces (see :class:`BatchExperts`).

    A decode step of a server batching ``B`` sequences runs one token of each: ``B`` tokens from
    different places of different texts.  Each of ``draws`` batches per size is ``B`` tokens drawn
    without replacement from all the traces' tokens pooled; every expert any of them chose (at any
    rank) counts once.  Padding (expert -1) counts as no expert.
    """
    items = _trace_list(traces)
    num_experts, k = items[0].num_experts, items[0].expert_ids.shape[2]
    chosen = _chosen_mask(_pooled(items, "expert_ids"), num_experts)  # [S, N, E]
    sizes = np.asarray(batch_sizes, dtype=np.int64)
    tokens = chosen.shape[1]
    if sizes.size == 0 or (sizes < 1).any() or (sizes > tokens).any():
        raise MinimoeError(f"batch sizes must be between 1 and the {tokens} tokens traced, got {sizes.tolist()}")
    rng = np.random.default_rng(seed)
    distinct = np.zeros((chosen.shape[0], len(sizes)))
    for b, size in enumerate(sizes.tolist()):
        for _ in range(draws):
            batch = rng.choice(tokens, size=size, replace=False)
            distinct[:, b] += chosen[:, batch].any(axis=1).sum(axis=-1)
    return BatchExperts(batch_sizes=sizes, distinct=distinct / draws,
                        uniform=expected_distinct_experts(num_experts, k, sizes), num_experts=num_experts, draws=draws)
