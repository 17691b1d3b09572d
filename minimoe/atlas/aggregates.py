"""The atlas's statistics: counts over a corpus, folded in one window at a time, that add up exactly.

An :class:`Atlas` holds, for a model with ``S`` sparse layers (``L`` in the names below, the
layer axis), ``E`` routed experts, ``k`` chosen per token and a vocabulary of ``V``, over ``D``
domains:

========================== ================ ==================================================================
field                      shape            meaning
========================== ================ ==================================================================
``tokens``, ``documents``  int              tokens and documents counted (each token once)
``domains``                ``D`` names      sorted
``domain_tokens``          ``[D]``          tokens per domain (``domain_documents``: documents)
``slot_counts``            ``[L, E]``       top-k assignments: how often each expert was among a token's k
``top1_counts``            ``[L, E]``       how often it was a token's first choice
``domain_slot_counts``     ``[D, L, E]``    top-k assignments per domain
``coactivation``           ``[L, E, E]``    tokens that chose both experts (the diagonal: ``slot_counts``)
``transitions``            ``[L-1, E, E]``  a token's top-1 expert in one sparse layer -> in the next
``repeat_top1``            ``[L]``          consecutive tokens of a document with the same top-1 expert,
                                            of ``repeat_pairs`` such pairs
``repeat_shared``          ``[L]``          experts two consecutive tokens share, summed over the pairs
``token_counts``           ``[V]``          occurrences of each token id
``token_top1``             sparse           per token id, layer and expert: top-1 counts (:meth:`Atlas.vocabulary`)
``distinct_sum``           ``[L, B]``       distinct experts touched by each batch of ``b = 1 .. B``
                                            consecutive tokens of a document, summed over the
                                            ``distinct_batches [B]`` such batches (:meth:`Atlas.distinct_experts`)
``entropy_hist``           ``[L, BINS]``    router entropy (nats, 0 .. ln E) per token
``mass_hist``              ``[L, BINS]``    top-k weight mass (the chosen k's router probabilities summed, 0 .. 1)
``shared_gate_hist``       ``[L, BINS]``    the shared expert's sigmoid gate (0 .. 1)
``sample_hash``            ``[L, E, M]``    the example contexts each expert keeps, by the ``M`` smallest hashes
``sample_context``         ``[L, E, M, C]`` of its (document, position) pairs: ``C`` token ids around the token
                                            (the token at ``CONTEXT_BEFORE``; ``-1`` pads)
========================== ================ ==================================================================

Every field is a count or a bottom-M sample, so :meth:`Atlas.merge` of two atlases is the atlas of
both corpora, bit for bit, in any order and any grouping: integers add exactly, and a bottom-M
hash sample of a union is the bottom M of the two samples (a deterministic sample that merges
exactly; the hash depends only on the document's key, the token's position, the layer and the
expert, never on which worker saw it).

:class:`Accumulator` folds one document at a time into an atlas, window by window
(:meth:`Accumulator.add_window`), with NumPy over the whole window: no Python loop per token.
Its memory is fixed by the model's shape (``E x E`` per layer, the vocabulary's counts),
not by the corpus; the sparse per-token-id counts grow with the distinct (token, layer,
expert) triples seen, at most ``V x L x E``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MinimoeError
from ..files import atomic_write

MAX_BATCH = 256  # the distinct-experts curve covers batches of 1 .. MAX_BATCH consecutive tokens
BINS = 64  # bins of each histogram
SAMPLES = 8  # example contexts kept per layer and expert
CONTEXT_BEFORE, CONTEXT_AFTER = 12, 6  # tokens of context around an example token
EMPTY_HASH = np.uint64(2**64 - 1)  # an unused sample slot
FORMAT = 1  # of the saved file

# Per-domain arrays (axis 0 is the domain), re-indexed when two atlases' domain lists are joined.
DOMAIN_ARRAYS = ("domain_tokens", "domain_documents", "domain_slot_counts")
# Arrays that simply add.
SUMMED_ARRAYS = ("slot_counts", "top1_counts", "coactivation", "transitions", "repeat_top1", "repeat_shared",
                 "token_counts", "distinct_sum", "distinct_batches", "entropy_hist", "mass_hist", "shared_gate_hist")


@dataclass
class Atlas:
    """Routing statistics of a corpus (the fields: see the module docstring)."""

    model: dict[str, Any]  # what identifies the model: name, fingerprint, layers, num_experts, top_k, vocab_size
    domains: list[str]
    tokens: int
    documents: int
    repeat_pairs: int
    domain_tokens: np.ndarray
    domain_documents: np.ndarray
    domain_slot_counts: np.ndarray
    slot_counts: np.ndarray
    top1_counts: np.ndarray
    coactivation: np.ndarray
    transitions: np.ndarray
    repeat_top1: np.ndarray
    repeat_shared: np.ndarray
    token_counts: np.ndarray
    token_top1_keys: np.ndarray  # sorted keys (id * L + layer) * E + expert
    token_top1_values: np.ndarray  # their counts
    distinct_sum: np.ndarray
    distinct_batches: np.ndarray
    entropy_hist: np.ndarray
    mass_hist: np.ndarray
    shared_gate_hist: np.ndarray
    sample_hash: np.ndarray
    sample_context: np.ndarray
    skipped: list[str] = field(default_factory=list)  # documents left out (--skip-unreadable), with why

    # --- making and joining ----------------------------------------------------------------------

    @classmethod
    def empty(cls, model: dict[str, Any], domains: list[str] = ()) -> "Atlas":
        """An atlas of nothing, for a model described by ``model`` (see :func:`model_identity`)."""
        L, E, V, D = len(model["layers"]), model["num_experts"], model["vocab_size"], len(domains)
        count = lambda *shape: np.zeros(shape, dtype=np.int64)  # noqa: E731
        return cls(model=dict(model), domains=list(domains), tokens=0, documents=0, repeat_pairs=0,
                   domain_tokens=count(D), domain_documents=count(D), domain_slot_counts=count(D, L, E),
                   slot_counts=count(L, E), top1_counts=count(L, E), coactivation=count(L, E, E),
                   transitions=count(max(L - 1, 0), E, E), repeat_top1=count(L), repeat_shared=count(L),
                   token_counts=count(V), token_top1_keys=count(0), token_top1_values=count(0),
                   distinct_sum=count(L, MAX_BATCH), distinct_batches=count(MAX_BATCH),
                   entropy_hist=count(L, BINS), mass_hist=count(L, BINS), shared_gate_hist=count(L, BINS),
                   sample_hash=np.full((L, E, SAMPLES), EMPTY_HASH, dtype=np.uint64),
                   sample_context=np.full((L, E, SAMPLES, CONTEXT_BEFORE + 1 + CONTEXT_AFTER), -1, dtype=np.int32))

    def with_domains(self, domains: list[str]) -> "Atlas":
        """The same atlas over a superset of its domains (in the given order; the new ones count nothing)."""
        if domains == self.domains:
            return self
        missing = set(self.domains) - set(domains)
        if missing:
            raise ValueError(f"with_domains would drop domains {sorted(missing)}")
        where = [domains.index(name) for name in self.domains]
        grown = {}
        for name in DOMAIN_ARRAYS:
            old = getattr(self, name)
            grown[name] = np.zeros((len(domains), *old.shape[1:]), dtype=old.dtype)
            grown[name][where] = old
        return replace(self, domains=list(domains), **grown)

    def merge(self, other: "Atlas") -> "Atlas":
        """The atlas of both corpora (exact: counts add, samples keep the smallest hashes of both)."""
        if other.model != self.model:
            raise MinimoeError(f"cannot merge atlases of different models: {describe_model(self.model)} and "
                               f"{describe_model(other.model)}")
        domains = sorted(set(self.domains) | set(other.domains))
        a, b = self.with_domains(domains), other.with_domains(domains)
        summed = {name: getattr(a, name) + getattr(b, name) for name in (*SUMMED_ARRAYS, *DOMAIN_ARRAYS)}
        keys, values = add_sparse(a.token_top1_keys, a.token_top1_values, b.token_top1_keys, b.token_top1_values)
        hashes, contexts = keep_smallest(a.sample_hash, a.sample_context, b.sample_hash.reshape(-1),
                                         b.sample_context.reshape(-1, b.sample_context.shape[-1]),
                                         np.repeat(np.arange(a.sample_hash.shape[0] * a.sample_hash.shape[1]),
                                                   SAMPLES))
        return replace(a, tokens=a.tokens + b.tokens, documents=a.documents + b.documents,
                       repeat_pairs=a.repeat_pairs + b.repeat_pairs, token_top1_keys=keys, token_top1_values=values,
                       sample_hash=hashes, sample_context=contexts, skipped=sorted(a.skipped + b.skipped), **summed)

    # --- reading it ------------------------------------------------------------------------------

    @property
    def layers(self) -> list[int]:
        """Decoder-layer index of each sparse layer (the L axis)."""
        return list(self.model["layers"])

    @property
    def num_experts(self) -> int:
        return int(self.model["num_experts"])

    @property
    def top_k(self) -> int:
        return int(self.model["top_k"])

    def __repr__(self) -> str:
        return (f"Atlas({self.tokens:,} tokens in {self.documents:,} documents, {len(self.domains)} domains, "
                f"{describe_model(self.model)})")

    def load_share(self) -> np.ndarray:
        """``[L, E]``: each expert's share of its layer's top-k assignments (sums to 1 per layer; uniform 1/E)."""
        return self.slot_counts / np.maximum(self.slot_counts.sum(-1, keepdims=True), 1)

    def domain_preference(self) -> np.ndarray:
        """``[D, L, E]``: P(domain | expert) / P(domain), per layer: above 1 the expert takes more of that
        domain's tokens than the domain's share of the corpus (the ratio OLMoE's domain-specialisation plots show
        as a share; 1 is chance)."""
        given_expert = self.domain_slot_counts / np.maximum(self.slot_counts[None], 1)
        share = self.domain_tokens / max(self.tokens, 1)
        return given_expert / np.maximum(share, 1e-300)[:, None, None]

    def repeat_rate(self) -> np.ndarray:
        """``[L]``: the fraction of consecutive token pairs with the same top-1 expert (Mixtral's analysis;
        chance under uniform routing is 1/E)."""
        return self.repeat_top1 / max(self.repeat_pairs, 1)

    def distinct_experts(self) -> np.ndarray:
        """``[L, B]``: mean distinct experts touched by a batch of ``b = 1 .. B`` consecutive tokens (column b-1);
        NaN where no document had ``b`` tokens."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.distinct_sum / self.distinct_batches[None].astype(float)

    def uniform_distinct(self) -> np.ndarray:
        """``[B]``: the same under uniform, independent routing, ``E (1 - (1 - k/E)^b)``."""
        E, k = self.num_experts, self.top_k
        return E * (1 - (1 - k / E) ** np.arange(1, MAX_BATCH + 1))

    def vocabulary(self, count: int = 1000, min_occurrences: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """The ``count`` most frequent token ids (ties: lower id first) seen at least ``min_occurrences`` times,
        and their top-1 counts ``[n, L, E]`` (OLMoE's vocabulary specialisation: counts / token_counts[ids])."""
        order = np.lexsort((np.arange(len(self.token_counts)), -self.token_counts))
        ids = order[self.token_counts[order] >= max(min_occurrences, 1)][:count]
        L, E = len(self.layers), self.num_experts
        dense = np.zeros((len(ids), L, E), dtype=np.int64)
        row_of = np.full(len(self.token_counts), -1)
        row_of[ids] = np.arange(len(ids))
        token, rest = np.divmod(self.token_top1_keys, L * E)
        keep = row_of[token] >= 0
        dense.reshape(len(ids), L * E)[row_of[token[keep]], rest[keep]] = self.token_top1_values[keep]
        return ids, dense

    # --- files -----------------------------------------------------------------------------------

    def save(self, path: str | Path, **extra: Any) -> None:
        """One ``.npz`` (integer arrays and a JSON header, no pickles), written atomically; ``extra`` goes into
        the header (a shard's plan and index)."""
        header = {"format": FORMAT, "model": self.model, "domains": self.domains, "tokens": self.tokens,
                  "documents": self.documents, "repeat_pairs": self.repeat_pairs, "skipped": self.skipped, **extra}
        arrays = {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), np.ndarray)}
        with atomic_write(path) as handle:
            np.savez_compressed(handle, header=np.array(json.dumps(header)), **arrays)


def read_atlas(path: str | Path) -> tuple[Atlas, dict[str, Any]]:
    """(the atlas, its file's header) from a file :meth:`Atlas.save` wrote; MinimoeError for anything else."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            header = json.loads(str(data["header"]))
            if header.get("format") != FORMAT:
                raise MinimoeError(f"{path}: an atlas file of format {header.get('format')!r}, not {FORMAT}")
            arrays = {f.name: data[f.name] for f in fields(Atlas) if f.name in data.files}
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        raise MinimoeError(f"{path}: not a readable atlas file ({exc})") from None
    scalars = {name: header[name] for name in ("model", "domains", "tokens", "documents", "repeat_pairs", "skipped")}
    return Atlas(**scalars, **arrays), header


def load(out_dir: str | Path) -> Atlas:
    """The atlas ``minimoe atlas ... --out DIR`` built: ``DIR/atlas.npz`` (or that file itself)."""
    path = Path(out_dir)
    path = path / "atlas.npz" if path.is_dir() else path
    if not path.exists():
        raise MinimoeError(f"{path}: no atlas here (minimoe atlas INPUT... --out DIR writes DIR/atlas.npz)")
    return read_atlas(path)[0]


# --- the model's identity -------------------------------------------------------------------------

def model_identity(model, path: str | Path) -> dict[str, Any]:
    """What an atlas records of its model: the routing's shape and a fingerprint of the checkpoint's bytes
    (config.json, each weight file's size and its first and last MiB), so that shards of two
    different checkpoints are never merged."""
    c, folder = model.config, Path(path)
    digest = hashlib.blake2b(digest_size=12)
    digest.update((folder / "config.json").read_bytes())
    for weights in sorted(folder.glob("*.safetensors")):
        size = weights.stat().st_size
        digest.update(f"{weights.name}:{size}".encode())
        with open(weights, "rb") as handle:
            digest.update(handle.read(1 << 20))
            handle.seek(max(size - (1 << 20), 0))
            digest.update(handle.read(1 << 20))
    return {"name": folder.name, "fingerprint": digest.hexdigest(), "layers": list(c.sparse_layers),
            "num_experts": int(c.num_experts), "top_k": int(c.num_experts_per_tok), "vocab_size": int(c.vocab_size)}


def describe_model(model: dict[str, Any]) -> str:
    return (f"model {model['name']} ({len(model['layers'])} sparse layers, {model['num_experts']} experts, "
            f"top-{model['top_k']}, fingerprint {model['fingerprint']})")


# --- folding windows in -----------------------------------------------------------------------------

class Accumulator:
    """Folds documents into an :class:`Atlas`, window by window, vectorised over each window's tokens.

    ``begin(key, domain, ids)`` starts a document (``key``: its stable name, which seeds its
    sample hashes; ``ids`` ``[T]``: all its tokens, for the example contexts), ``add_window(trace)``
    folds in each of its windows' traces in order (:func:`minimoe.inspect.tracing.trace_windows`).
    """

    def __init__(self, model: dict[str, Any]):
        self.atlas = Atlas.empty(model)
        self.L, self.E = len(model["layers"]), model["num_experts"]
        self._pending_keys: list[np.ndarray] = []
        self._pending_size = 0

    def begin(self, key: str, domain: str, ids: np.ndarray) -> None:
        atlas = self.atlas
        if domain not in atlas.domains:
            self.atlas = atlas = atlas.with_domains(sorted([*atlas.domains, domain]))
        self.domain = atlas.domains.index(domain)
        self.ids = np.asarray(ids, dtype=np.int64)
        self.seed = np.uint64(int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little"))
        self.previous: tuple[np.ndarray, np.ndarray] | None = None  # the last token's top-1 [L] and choice [L, E]
        self.carry = np.zeros((0, self.L, self.E), dtype=bool)  # the last (up to MAX_BATCH - 1) tokens' choices
        atlas.documents += 1
        atlas.domain_documents[self.domain] += 1

    def add_window(self, trace) -> None:
        """Fold in one window's trace (``[L, T, ...]`` arrays, positions in the document)."""
        a, L, E = self.atlas, self.L, self.E
        chosen = trace.expert_ids  # [L, T, k]
        T = chosen.shape[1]
        if T == 0:
            return
        layer = np.arange(L)[:, None, None]
        a.tokens += T
        a.domain_tokens[self.domain] += T
        slots = np.bincount((layer * E + chosen).ravel(), minlength=L * E).reshape(L, E)
        a.slot_counts += slots
        a.domain_slot_counts[self.domain] += slots
        top1 = chosen[:, :, 0]  # [L, T]
        a.top1_counts += np.bincount((layer[:, :, 0] * E + top1).ravel(), minlength=L * E).reshape(L, E)
        pairs = (layer[..., None] * E + chosen[..., :, None]) * E + chosen[..., None, :]  # [L, T, k, k]
        a.coactivation += np.bincount(pairs.ravel(), minlength=L * E * E).reshape(L, E, E)
        if L > 1:
            steps = (layer[:-1, :, 0] * E + top1[:-1]) * E + top1[1:]  # [L-1, T]
            a.transitions += np.bincount(steps.ravel(), minlength=(L - 1) * E * E).reshape(L - 1, E, E)
        onehot = np.zeros((T, L, E), dtype=bool)  # [T, L, E]: the experts each token chose
        np.put_along_axis(onehot, chosen.transpose(1, 0, 2), True, axis=2)
        self._repeats(top1, onehot)
        a.token_counts += np.bincount(trace.token_ids, minlength=len(a.token_counts))
        self._add_token_top1(((trace.token_ids[None, :] * L + layer[:, :, 0]) * E + top1).ravel())
        self._distinct(onehot, int(trace.positions[0]))
        self._histograms(trace)
        self._sample(trace, chosen)

    def _repeats(self, top1: np.ndarray, onehot: np.ndarray) -> None:
        """Consecutive tokens (across windows too) that keep their top-1 expert, and the experts they share."""
        a = self.atlas
        if self.previous is not None:
            top1 = np.concatenate([self.previous[0][:, None], top1], axis=1)
            onehot = np.concatenate([self.previous[1][None], onehot])
        a.repeat_pairs += top1.shape[1] - 1
        a.repeat_top1 += (top1[:, 1:] == top1[:, :-1]).sum(1)
        a.repeat_shared += (onehot[1:] & onehot[:-1]).sum((0, 2))
        self.previous = (top1[:, -1], onehot[-1])

    def _distinct(self, onehot: np.ndarray, first: int) -> None:
        """Distinct experts in each batch of b consecutive tokens at positions ``[j b, (j + 1) b)`` of the
        document, for every b, counted in the window where the batch ends (earlier tokens come from the carry).

        With ``C`` the running count of each expert's uses, a batch ``[s, s + b)`` touched the experts
        whose ``C[s + b] - C[s]`` is positive: all the batches of every b at once, about 6 T rows of ``[L, E]``."""
        a, L = self.atlas, self.L
        rows = np.concatenate([self.carry, onehot])  # [P + T, L, E], the first at document position `start`
        start = first - len(self.carry)
        end = first + len(onehot)
        uses = np.zeros((len(rows) + 1, *rows.shape[1:]), dtype=np.int32)
        np.cumsum(rows, axis=0, out=uses[1:])
        sizes = np.arange(1, MAX_BATCH + 1)
        lo = (first // sizes) * sizes  # for each b, the first batch that ends in this window starts here
        counts = np.maximum((end - sizes - lo) // sizes + 1, 0)  # batches of each b that end in this window
        b = np.repeat(sizes, counts)  # [N]: each batch's size
        j = np.arange(len(b)) - np.repeat(np.cumsum(counts) - counts, counts)
        starts = np.repeat(lo, counts) + b * j - start  # rows of `uses`
        touched = ((uses[starts + b] - uses[starts]) > 0).sum(2)  # [N, L]
        keys = (np.arange(L)[None, :] * MAX_BATCH + (b - 1)[:, None]).ravel()
        a.distinct_sum += np.bincount(keys, weights=touched.ravel(), minlength=L * MAX_BATCH).reshape(
            L, MAX_BATCH).round().astype(np.int64)  # float64 weights hold these integers exactly
        a.distinct_batches += counts
        self.carry = rows[-(MAX_BATCH - 1):]

    def _histograms(self, trace) -> None:
        a, L = self.atlas, self.L
        probs = trace.router_probs.astype(np.float64)  # [L, T, E]
        with np.errstate(divide="ignore", invalid="ignore"):
            entropy = -np.where(probs > 0, probs * np.log(probs), 0.0).sum(-1)  # [L, T]
        for name, values, top in (("entropy_hist", entropy, np.log(self.E)),
                                  ("mass_hist", trace.raw_weights.astype(np.float64).sum(-1), 1.0),
                                  ("shared_gate_hist", trace.shared_gate.astype(np.float64), 1.0)):
            bins = np.clip((values / top * BINS).astype(np.int64), 0, BINS - 1)
            getattr(a, name)[...] += np.bincount((np.arange(L)[:, None] * BINS + bins).ravel(),
                                                 minlength=L * BINS).reshape(L, BINS)

    def _sample(self, trace, chosen: np.ndarray) -> None:
        """Offer each (token, layer, expert) assignment to that expert's bottom-M hash sample."""
        a, L, E = self.atlas, self.L, self.E
        positions = trace.positions.astype(np.uint64)  # [T]
        layer = np.arange(L, dtype=np.uint64)[:, None, None]
        hashes = mix(self.seed ^ mix(((positions[None, :, None] * np.uint64(L) + layer) * np.uint64(E)
                                      + chosen.astype(np.uint64)) + np.uint64(1)))  # [L, T, k]
        groups = (np.arange(L)[:, None, None] * E + chosen).ravel()
        hashes = hashes.ravel()
        threshold = a.sample_hash.reshape(L * E, SAMPLES).max(-1)  # a group only takes hashes below its largest
        offered = hashes < threshold[groups]
        if not offered.any():
            return
        where = np.broadcast_to(trace.positions[None, :, None], chosen.shape).ravel()[offered]
        a.sample_hash, a.sample_context = keep_smallest(a.sample_hash, a.sample_context, hashes[offered],
                                                        contexts(self.ids, where), groups[offered])

    def _add_token_top1(self, keys: np.ndarray) -> None:
        self._pending_keys.append(keys)
        self._pending_size += len(keys)
        if self._pending_size > 1 << 20:
            self.flush()

    def flush(self) -> Atlas:
        """The atlas so far, with every pending per-token count folded in."""
        if self._pending_keys:
            keys, values = np.unique(np.concatenate(self._pending_keys), return_counts=True)
            a = self.atlas
            a.token_top1_keys, a.token_top1_values = add_sparse(a.token_top1_keys, a.token_top1_values, keys,
                                                                values.astype(np.int64))
            self._pending_keys, self._pending_size = [], 0
        return self.atlas


def add_sparse(keys_a: np.ndarray, values_a: np.ndarray, keys_b: np.ndarray, values_b: np.ndarray):
    """Two sparse count vectors (sorted unique keys, counts) added -> (sorted unique keys, counts)."""
    keys = np.concatenate([keys_a, keys_b])
    values = np.concatenate([values_a, values_b])
    order = np.argsort(keys, kind="stable")
    keys, values = keys[order], values[order]
    if len(keys) == 0:
        return keys.astype(np.int64), values.astype(np.int64)
    first = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    return keys[first].astype(np.int64), np.add.reduceat(values, first).astype(np.int64)


def keep_smallest(hashes: np.ndarray, context: np.ndarray, new_hashes: np.ndarray, new_context: np.ndarray,
                  groups: np.ndarray):
    """Each group's ``M`` smallest hashes of its kept ones ``hashes [G.., M]`` (contexts ``[G.., M, C]``) and the
    offered ones ``new_hashes [n]`` of ``groups [n]`` (contexts ``[n, C]``) -> new (hashes, contexts)."""
    shape, width = hashes.shape, context.shape[-1]
    count = int(np.prod(shape[:-1]))
    all_hashes = np.concatenate([hashes.reshape(-1), new_hashes])
    all_context = np.concatenate([context.reshape(-1, width), new_context])
    all_groups = np.concatenate([np.repeat(np.arange(count), SAMPLES), groups])
    # A hash names one (document, position, layer, expert): two equal ones are a 64-bit collision.
    order = np.lexsort((all_hashes, all_groups))
    sorted_groups = all_groups[order]
    rank = np.arange(len(order)) - np.searchsorted(sorted_groups, sorted_groups, side="left")
    keep = order[rank < SAMPLES]
    slot = (all_groups[keep], rank[rank < SAMPLES])
    out_hashes = np.full((count, SAMPLES), EMPTY_HASH, dtype=np.uint64)
    out_context = np.full((count, SAMPLES, width), -1, dtype=np.int32)
    out_hashes[slot] = all_hashes[keep]
    out_context[slot] = all_context[keep]
    return out_hashes.reshape(shape), out_context.reshape(*shape, width)


def contexts(ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """``[n, C]``: the ids around each of ``positions [n]`` in ``ids [T]`` (the token at CONTEXT_BEFORE; -1 pads)."""
    offsets = np.arange(-CONTEXT_BEFORE, CONTEXT_AFTER + 1)
    where = positions[:, None] + offsets[None, :]
    inside = (where >= 0) & (where < len(ids))
    return np.where(inside, ids[np.clip(where, 0, len(ids) - 1)], -1).astype(np.int32)


def mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser over uint64 arrays (wrapping arithmetic): a well-spread hash of each value."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))
